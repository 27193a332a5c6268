"""Where a benchmark's result goes: one JSON line appended to a file that keeps every run."""

from __future__ import annotations

import json
from pathlib import Path


def append_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as file:
        file.write(json.dumps(result) + "\n")
    print(f"appended to {path}")
