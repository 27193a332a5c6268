"""The wheel: a non-editable install has every package, the configs the commands default to, and console
scripts whose targets import and are callable, from a directory outside the source tree."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_packages_configs_and_working_console_scripts(tmp_path):
    # built from a copy: setuptools leaves build/ and *.egg-info/ in the tree it builds
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "data", "runs", "build", "wandb", "*.egg-info", "__pycache__", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
        names = set(archive.namelist())
    for package in ("common", "data_prep", "train", "extract", "improve", "launch", "configs"):
        assert f"{package}/__init__.py" in names
    assert {"configs/finetune_heads.yaml", "configs/demo_cpu.yaml"} <= names

    (entry_points_file,) = site.glob("*.dist-info/entry_points.txt")
    entry_points = configparser.ConfigParser()
    entry_points.read(entry_points_file)
    scripts = dict(entry_points["console_scripts"])
    assert {"prodattr-data", "prodattr-train", "prodattr-extract", "prodattr-improve"} <= set(scripts)

    # Imported from the unpacked wheel alone (cwd outside the tree): every script's target, and improve's
    # default config found inside the installed package rather than by a path into the source tree.
    targets = ", ".join(repr(target) for target in scripts.values())
    check = (
        "import importlib\n"
        f"for target in [{targets}]:\n"
        "    module, name = target.split(':')\n"
        "    assert callable(getattr(importlib.import_module(module), name)), target\n"
        "from improve.round import DEFAULT_CONFIG\n"
        f"assert DEFAULT_CONFIG.is_file() and DEFAULT_CONFIG.is_relative_to({str(site)!r}), DEFAULT_CONFIG\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, check=True)
