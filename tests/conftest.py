"""Shared fixtures: a synthetic product set sharded once per test session (real data_prep output); no test
reads the user's torch.hub cache or downloads anything."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.hub

from data_prep.__main__ import main as data_prep_main
from data_prep.synth import write_synthetic_coco


def shard_synthetic_set(root: Path, *, num_images: int, image_size: int, shard_max_count: int,
                        splits: str = "train=0.7,val=0.15,test=0.15") -> Path:
    """Generate and shard a synthetic set under root; returns the manifest path."""
    annotations = write_synthetic_coco(root / "synth", num_images=num_images, image_size=image_size, seed=0)
    out = root / "shards"
    exit_code = data_prep_main([
        "shard", "--input", f"{annotations}:{root / 'synth' / 'images'}", "--out", str(out),
        "--splits", splits, "--shard-max-count", str(shard_max_count),
        "--num-workers", "1", "--seed", "0",
    ])
    assert exit_code == 0
    return out / "manifest.json"


@pytest.fixture(scope="session")
def small_manifest(tmp_path_factory) -> Path:
    """About 60 tiny images in shards of 7 samples, so splits have shards of unequal size."""
    return shard_synthetic_set(tmp_path_factory.mktemp("small"), num_images=60, image_size=96, shard_max_count=7)


@pytest.fixture(scope="module")
def module_dir(request, tmp_path_factory) -> Iterator[Path]:
    """A folder for a module's shared fixtures, removed when the module ends unless one of its tests failed. With
    `tmp_path_retention_policy = "failed"` (pyproject.toml) the suite holds one module's files at a time: kept, its
    checkpoints add up to over 6 GB, more than a CI machine may have free."""
    failed_before = request.session.testsfailed
    path = tmp_path_factory.mktemp(request.module.__name__)
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def offline_torch_hub(tmp_path, monkeypatch):
    """TORCH_HOME is an empty folder (subprocesses inherit it), and a download attempt fails the test: tests seed
    the files they need, and a test that would reach the network fails here instead."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"a test tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
