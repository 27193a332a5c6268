"""The YAML configs. They ship inside the package, so a command finds its default config from any directory and
in a non-editable install (`bundled_config`)."""

from importlib.resources import files
from pathlib import Path


def bundled_config(name: str) -> Path:
    return Path(str(files(__name__) / name))
