"""`python -m data_prep verify` and the shard reader on damaged copies of a real shard set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from damage_helpers import copy_set, flip, members, pixel_byte_offset

from data_prep.__main__ import main as data_prep_main
from train.shard_reader import Shard, ShardBatches, ShardReadError, split_shards


def verify(manifest, capsys, workers: int = 0) -> tuple[int, list[str]]:
    code = data_prep_main(["verify", str(manifest), "--num-workers", str(workers)])
    return code, capsys.readouterr().out.splitlines()


def test_fresh_shards_pass(small_manifest, capsys):
    code, lines = verify(small_manifest, capsys, workers=2)
    manifest = json.loads(small_manifest.read_text())
    shards = sum(len(split["shards"]) for split in manifest["splits"].values())
    samples = sum(split["num_samples"] for split in manifest["splits"].values())
    assert code == 0
    assert lines == [lines[-1]] and lines[-1].startswith(f"OK: {shards} shards, {samples} samples")


def test_every_kind_of_mismatch_is_listed_and_fails(small_manifest, tmp_path, capsys):
    manifest = copy_set(small_manifest, tmp_path / "set")
    shards = manifest.parent
    with (shards / "train-00000.tar").open("ab") as file:  # longer: size (and so sha256)
        file.write(bytes(512))
    second = shards / "train-00001.tar"  # same size, one bit of one image's pixel data
    flip(second, pixel_byte_offset(second, members(second)[0]), mask=0x01)
    third = shards / "train-00002.tar"  # same size, the header of the third sample's image: the tar ends there
    flip(third, members(third)[4].offset, count=100)
    (shards / "val-00000.tar").unlink()
    record = json.loads(manifest.read_text())
    record["splits"]["test"]["shards"][0]["num_samples"] += 1  # the file is fine, the count recorded is not
    manifest.write_text(json.dumps(record))
    test_samples = record["splits"]["test"]["shards"][0]["num_samples"]

    code, lines = verify(manifest, capsys, workers=2)
    assert code == 1
    found = sorted(f"{line.split(': ')[1]} {Path(line.split(': ')[0]).name}" for line in lines[:-1])
    assert found == sorted([
        "size train-00000.tar", "sha256 train-00000.tar", "sha256 train-00001.tar", "sha256 train-00002.tar",
        "samples train-00002.tar", "missing val-00000.tar", "samples test-00000.tar",
    ])
    text = "\n".join(lines)
    assert f"train-00000.tar: size: {record['splits']['train']['shards'][0]['bytes'] + 512} bytes" in text
    assert f"test-00000.tar: samples: {test_samples - 1} samples, the manifest records {test_samples}\n" in text
    assert lines[-1].startswith("FAILED: 5 of ")
    assert verify(manifest, capsys, workers=0)[1][:-1] == lines[:-1]  # workers change nothing but the time


def test_a_manifest_without_checksums_is_refused_with_the_key_named(small_manifest, tmp_path, capsys):
    manifest = copy_set(small_manifest, tmp_path / "set")
    record = json.loads(manifest.read_text())
    del record["splits"]["train"]["shards"][0]["sha256"]
    manifest.write_text(json.dumps(record))
    assert data_prep_main(["verify", str(manifest)]) == 2
    assert "missing key 'splits.train.shards[0].sha256'" in capsys.readouterr().err


def read_all(shard_path, num_samples) -> list:
    dataset = ShardBatches([Shard(shard_path, num_samples)], batch_size=1, seed=0, epoch=0, training=False)
    return [(images[0], targets[0]["image_id"]) for images, targets in dataset]


def test_a_damaged_header_stops_the_reader_naming_shard_and_sample(small_manifest, tmp_path):
    """tarfile takes a damaged header for the end of the archive: the reader used to yield the samples before it
    and nothing else, so one rank read fewer samples than the others."""
    shard = split_shards(small_manifest, "train")[0]
    path = tmp_path / shard.path.name
    path.write_bytes(shard.path.read_bytes())
    tar_members = members(path)
    flip(path, tar_members[6].offset, count=100)  # the fourth sample's image header
    with pytest.raises(ShardReadError) as error:
        read_all(path, shard.num_samples)
    last_good = tar_members[5].name.split(".")[0]
    assert str(error.value) == (f"{path}: ends after sample {last_good} (3 samples; the manifest lists "
                                f"{shard.num_samples}): truncated, or a tar header is damaged")

    flip(path, tar_members[6].offset, count=100)  # undo; now the header of the fourth sample's json
    flip(path, tar_members[7].offset, count=100)
    with pytest.raises(ShardReadError, match=rf"{path.name}: sample {tar_members[6].name[:12]}: has members \['jpg'\]"):
        read_all(path, shard.num_samples)


def test_a_pixel_flip_decodes_silently_and_only_the_checksum_sees_it(small_manifest, tmp_path, capsys):
    manifest = copy_set(small_manifest, tmp_path / "set")
    path = manifest.parent / "train-00001.tar"
    num_samples = json.loads(manifest.read_text())["splits"]["train"]["shards"][1]["num_samples"]
    before = read_all(path, num_samples)
    flip(path, pixel_byte_offset(path, members(path)[0]), mask=0x80)
    after = read_all(path, num_samples)

    assert [image_id for _, image_id in after] == [image_id for _, image_id in before]
    difference = (after[0][0].int() - before[0][0].int()).abs()
    assert (difference.amax(0) > 0).float().mean() > 0.5 and difference.float().mean() > 5  # visibly damaged
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(after[1:], before[1:], strict=True))
    code, lines = verify(manifest, capsys)
    assert code == 1 and [line.split(": ")[1] for line in lines[:-1]] == ["sha256"]
    assert lines[0].startswith(f"{path}: sha256: ")
