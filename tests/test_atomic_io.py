"""The one atomic writer: the destination holds the old file or the whole new one, and nothing is left behind."""

import json
from pathlib import Path

import pytest

import common.atomic_io as atomic_io
from common.atomic_io import (
    AtomicFile,
    copy_file_atomically,
    temp_file_destination,
    write_atomically,
    write_json_atomically,
    write_text_atomically,
)


def test_a_failed_verification_leaves_the_destination_untouched_and_no_temporary_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")
    checked = []

    def reject(temp_path: Path) -> None:
        checked.append(temp_path.read_bytes())
        raise ValueError("not loadable")

    with pytest.raises(ValueError, match="not loadable"):
        write_atomically(path, lambda file: file.write(b"new"), verify=reject)

    assert checked == [b"new"]  # the verification saw the finished temporary file
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_crash_in_the_write_callback_leaves_the_old_destination_intact(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")

    def crash(file) -> None:
        file.write(b"half of the new")
        raise KeyboardInterrupt  # not only Exceptions: an interrupted write is cleaned up too

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, crash)

    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_conveniences_publish_whole_files_in_new_directories(tmp_path):
    write_text_atomically(tmp_path / "a" / "config.yaml", "seed: 1\n")
    write_json_atomically(tmp_path / "b" / "round.json", {"AP": 0.5}, indent=2)
    assert (tmp_path / "a" / "config.yaml").read_text() == "seed: 1\n"
    assert json.loads((tmp_path / "b" / "round.json").read_text()) == {"AP": 0.5}
    assert (tmp_path / "b" / "round.json").read_text().endswith("}\n")


def test_a_copy_is_verified_against_its_source_before_it_is_published(tmp_path, monkeypatch):
    source, destination = tmp_path / "candidate.pt", tmp_path / "best" / "best.pt"
    source.write_bytes(bytes(range(256)) * 5000)  # more than one copy chunk
    copy_file_atomically(source, destination)
    assert destination.read_bytes() == source.read_bytes()

    source.write_bytes(b"a newer candidate")
    monkeypatch.setattr(atomic_io, "_sha256_of_file", lambda path: "0" * 64)  # the copy reads back damaged
    with pytest.raises(OSError, match="does not read back equal"):
        copy_file_atomically(source, destination)
    assert destination.read_bytes() == bytes(range(256)) * 5000
    assert [p.name for p in destination.parent.iterdir()] == ["best.pt"]


def test_temporary_files_name_their_destination(tmp_path):
    atomic = AtomicFile(tmp_path / "train-00000.tar")
    assert temp_file_destination(atomic.temp_path.name) == "train-00000.tar"
    atomic.discard()
    assert list(tmp_path.iterdir()) == []
    assert temp_file_destination(".checkpoint-00002000.pt.abc123.tmp") == "checkpoint-00002000.pt"
    for other in ("train-00000.tar", "train-00000.tar.tmp", ".hidden", "notes.tmp"):
        assert temp_file_destination(other) is None
