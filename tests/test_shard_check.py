"""Training checks its shards against the manifest before the first step: sizes always, sha256 on request; under
DDP each rank hashes its share and every rank stops with the same message."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from damage_helpers import copy_set, flip, members, pixel_byte_offset

from train.main import main as train_main
from train.shard_check import check_shards
from train.shard_reader import split_shards
from train.strategy import Strategy

ROOT = Path(__file__).resolve().parents[1]


def overrides(manifest: Path, run_dir: Path) -> list[str]:
    return [f"data.manifest={manifest}", f"run_dir={run_dir}", "model.name=fasterrcnn_mobilenet_v3_large_320_fpn",
            "model.min_size=96", "model.max_size=128", "data.num_workers=0", "wandb.mode=disabled",
            "train.max_steps=1"]


# main's torchrun @record wants a real stderr for its fault handler; under capsys it has none and says so
@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_a_shard_of_the_wrong_size_stops_training_before_the_first_step(small_manifest, tmp_path, capsys):
    manifest = copy_set(small_manifest, tmp_path / "set")
    shard = manifest.parent / "val-00000.tar"
    with shard.open("ab") as file:
        file.write(bytes(1024))
    run_dir = tmp_path / "run"
    assert train_main([*overrides(manifest, run_dir), "strategy=single"]) == 2
    size = shard.stat().st_size
    stderr = capsys.readouterr().err
    assert f"data error: 1 shard(s) differ from {manifest} (checked size only;" in stderr
    assert f"{shard}: size: {size} bytes, the manifest records {size - 1024}" in stderr
    assert not run_dir.exists()  # nothing built, nothing written


def flipped_pixel_copy(small_manifest: Path, destination: Path, shard_name: str) -> tuple[Path, Path]:
    manifest = copy_set(small_manifest, destination)
    shard = manifest.parent / shard_name
    flip(shard, pixel_byte_offset(shard, members(shard)[0]), mask=0x80)
    return manifest, shard


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_the_checksum_option_catches_a_same_size_flip(small_manifest, tmp_path, capsys):
    manifest, shard = flipped_pixel_copy(small_manifest, tmp_path / "set", "train-00002.tar")
    shards = split_shards(manifest, "train")
    check_shards(manifest, shards, Strategy("single", torch.device("cpu")), checksums=False)  # the size is right
    assert f"shards: {len(shards)} (" in capsys.readouterr().out

    run_dir = tmp_path / "run"
    assert train_main([*overrides(manifest, run_dir), "strategy=single", "data.verify_checksums=true"]) == 2
    assert re.search(rf"{shard}: sha256: [0-9a-f]{{64}}, the manifest records", capsys.readouterr().err)
    assert not run_dir.exists()


def test_under_ddp_a_flip_one_rank_hashes_stops_every_rank(small_manifest, tmp_path):
    """Shard i is hashed by rank i % 2: the flipped second train shard by rank 1; rank 0 reports it, and both
    ranks stop."""
    manifest, shard = flipped_pixel_copy(small_manifest, tmp_path / "set", "train-00001.tar")
    logs = tmp_path / "logs"
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
               "--log-dir", str(logs), "--redirects", "3", "train/main.py",
               *overrides(manifest, tmp_path / "run"), "data.verify_checksums=true"]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    stderr_logs = {path.parent.name: path.read_text() for path in logs.rglob("stderr.log")}
    assert sorted(stderr_logs) == ["0", "1"], stderr_logs
    assert f"data error: 1 shard(s) differ from {manifest}" in stderr_logs["0"], stderr_logs["0"][-2000:]
    assert f"{shard}: sha256: " in stderr_logs["0"]
    assert "data error" not in stderr_logs["1"]  # only rank 0 prints
