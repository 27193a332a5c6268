"""The attributes database API on both backends: SQLite files and a real PostgreSQL server
(TEST_POSTGRES_URL; scripts/start_postgres.sh starts one)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from attributes_helpers import postgres_schema_url

from extract.database import (
    MIGRATIONS,
    POSTGRESQL,
    SCHEMA_VERSION,
    SQLITE,
    Detection,
    DetectionAttribute,
    ImageExtraction,
    SchemaVersionError,
    SkippedImage,
    file_sha256,
    open_database,
)

PER_CLASS = {"bottle": {"AP": 0.5, "AP50": 0.9, "gt_boxes": 3}, "can": {"AP": 0.25, "AP50": 0.5, "gt_boxes": 7}}


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    """Where a fresh database lives: a SQLite file path, or a URL into an empty PostgreSQL schema."""
    if request.param == "sqlite":
        yield str(tmp_path / "attributes.sqlite")
        return
    with postgres_schema_url() as url:
        yield url


def raw_execute(target: str, sql: str) -> list[tuple]:
    """Run SQL outside the code under test."""
    if target.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(target, autocommit=True) as connection:
            cursor = connection.execute(sql)
            return cursor.fetchall() if cursor.description else []
    with sqlite3.connect(target) as connection:
        return connection.execute(sql).fetchall()


def checkpoint_file(directory: Path, content: bytes) -> Path:
    path = directory / f"model-{len(content)}.pt"
    path.write_bytes(content)
    return path


def extraction(sha: str, scores: list[float]) -> ImageExtraction:
    detections = [Detection("bottle" if i % 2 else "can", 1 if i % 2 else 4, score, (1.0, 2.0, 30.5, 40.25))
                  for i, score in enumerate(scores)]
    return ImageExtraction(f"photos/{sha}.jpg", sha, 64, 48, detections)


def test_schema_is_created_versioned_and_a_newer_version_refused(target):
    with open_database(target) as db:
        assert db.schema_version() == SCHEMA_VERSION
    with open_database(target) as db:  # opening again keeps the schema as it is
        assert db.schema_version() == SCHEMA_VERSION
    raw_execute(target, "UPDATE schema_version SET version = 99")
    newer = f"schema version 99, newer than the {SCHEMA_VERSION} this code knows"
    with pytest.raises(SchemaVersionError, match=newer):
        open_database(target)


def test_register_model_is_idempotent_by_checkpoint_content(target, tmp_path):
    first = checkpoint_file(tmp_path, b"weights one")
    with open_database(target) as db:
        model_id = db.register_model(first, "fasterrcnn_resnet50_fpn", ["bottle", "can"], None)
        copy = tmp_path / "copy.pt"
        copy.write_bytes(first.read_bytes())
        assert db.register_model(copy, "fasterrcnn_resnet50_fpn", ["bottle", "can"], 0.42, PER_CLASS) == model_id
        # a known value is never replaced by a later one
        other_values = {"bottle": {"AP": 0.0, "AP50": 0.0, "gt_boxes": 1}}
        assert db.register_model(first, "fasterrcnn_resnet50_fpn", ["bottle", "can"], 0.1, other_values) == model_id
        second = checkpoint_file(tmp_path, b"weights two!")
        undefined = {"shoe": {"AP": float("nan"), "AP50": float("nan"), "gt_boxes": 0}}
        other = db.register_model(second, "fcos_resnet50_fpn", ["shoe"], 0.1, undefined)
        assert other != model_id
        models = db.models()
        class_ap = db.class_ap()
        assert db.class_ap(other) == [{"model_id": other, "name": "shoe", "AP": None, "AP50": None, "gt_boxes": 0}]
    assert [m["id"] for m in models] == [model_id, other]
    assert models[0]["checkpoint_sha256"] == file_sha256(first)
    assert models[0]["class_names"] == ["bottle", "can"]
    assert models[0]["test_map"] == 0.42  # a test mAP given later fills the unknown one
    assert models[0]["test_ap_per_class"] == PER_CLASS  # and so do per-class APs
    # NaN (no ground truth of the class in the test split) is stored as JSON null, which SQL reads as NULL
    assert models[1]["test_ap_per_class"] == {"shoe": {"AP": None, "AP50": None, "gt_boxes": 0}}
    assert [(row["model_id"], row["name"], row["AP"]) for row in class_ap] == [
        (model_id, "bottle", 0.5), (model_id, "can", 0.25), (other, "shoe", None)]
    assert models[1]["architecture"] == "fcos_resnet50_fpn" and models[1]["created_at"]


def test_a_version_1_database_opens_migrated_and_its_model_gets_per_class_ap_later(target, tmp_path):
    """A database written before per-class AP existed gains the column and keeps its rows."""
    dialect = POSTGRESQL if target.startswith("postgresql://") else SQLITE
    checkpoint = checkpoint_file(tmp_path, b"an old model")
    raw_execute(target, "CREATE TABLE schema_version (version INTEGER NOT NULL)")
    raw_execute(target, "INSERT INTO schema_version (version) VALUES (1)")
    for statement in MIGRATIONS[1]:
        raw_execute(target, statement.format(id=dialect.id_column))
    raw_execute(target, "INSERT INTO models (checkpoint_sha256, checkpoint_path, architecture, class_names, "
                        f"test_map, created_at) VALUES ('{file_sha256(checkpoint)}', 'old.pt', 'arch', "
                        """'["bottle", "can"]', 0.3, '2024-01-01T00:00:00+00:00')""")
    with open_database(target) as db:
        assert db.schema_version() == SCHEMA_VERSION
        [model] = db.models()
        assert (model["checkpoint_path"], model["test_map"], model["test_ap_per_class"]) == ("old.pt", 0.3, None)
        assert db.class_ap() == []
        assert db.register_model(checkpoint, "arch", ["bottle", "can"], 0.3, PER_CLASS) == model["id"]
    with open_database(target) as db:
        assert db.models()[0]["test_ap_per_class"] == PER_CLASS


def coloured(sha: str, colours: list[tuple[str, str, float]]) -> ImageExtraction:
    """An extraction whose detections are (label, colour, share)."""
    category = {"bottle": 1, "can": 4}
    detections = [Detection(label, category[label], 0.9 - 0.1 * index, (1.0, 2.0, 30.0, 40.0),
                            (DetectionAttribute("colour", colour, share),))
                  for index, (label, colour, share) in enumerate(colours)]
    return ImageExtraction(f"photos/{sha}.jpg", sha, 64, 48, detections)


def test_colours_are_stored_per_detection_and_red_bottles_are_one_query(target, tmp_path):
    with open_database(target) as db:
        model_id = db.register_model(checkpoint_file(tmp_path, b"m"), "arch", ["bottle", "can"], None)
        db.write_batch(model_id, [
            coloured("a" * 64, [("bottle", "red", 0.8), ("can", "blue", 0.6)]),
            coloured("b" * 64, [("bottle", "blue", 0.9), ("can", "red", 0.7)]),
            coloured("c" * 64, [("can", "red", 0.5), ("bottle", "red", 0.55), ("bottle", "red", 0.95)]),
        ], [], 0.5, 10)
        red_bottles = db.images_with_attribute("bottle", colour="red")
        all_bottles = db.images_with_attribute("bottle")
        of_image = db.attributes_of_image("a" * 64)
        counts = db.colour_counts(model_id)
    assert [(row["source"], row["detections"]) for row in red_bottles] == [
        ("photos/aaaa" + "a" * 60 + ".jpg", 1), ("photos/cccc" + "c" * 60 + ".jpg", 2)]
    assert len(all_bottles) == 3
    assert [(row["name"], row["colour"], row["colour_share"]) for row in of_image] == [
        ("bottle", "red", 0.8), ("can", "blue", 0.6)]
    assert [(row["name"], row["colour"], row["detections"]) for row in counts] == [
        ("bottle", "red", 3), ("bottle", "blue", 1), ("can", "red", 2), ("can", "blue", 1)]
    assert counts[0]["mean_share"] == pytest.approx((0.8 + 0.55 + 0.95) / 3)
    rows = raw_execute(target, "SELECT kind, value, share FROM detection_attributes ORDER BY id")
    assert rows[0] == ("colour", "red", 0.8) and len(rows) == 7


def test_a_version_2_database_gains_colours_and_keeps_its_uncoloured_detections(target, tmp_path):
    """Detections written before colours existed stay, with no colour; new ones get theirs."""
    dialect = POSTGRESQL if target.startswith("postgresql://") else SQLITE
    raw_execute(target, "CREATE TABLE schema_version (version INTEGER NOT NULL)")
    raw_execute(target, "INSERT INTO schema_version (version) VALUES (2)")
    for statement in MIGRATIONS[1] + MIGRATIONS[2]:
        raw_execute(target, statement.format(id=dialect.id_column))
    checkpoint = checkpoint_file(tmp_path, b"old")
    raw_execute(target, "INSERT INTO models (checkpoint_sha256, checkpoint_path, architecture, class_names, "
                        f"created_at) VALUES ('{file_sha256(checkpoint)}', 'old.pt', 'arch', '[\"bottle\"]', 'x')")
    raw_execute(target, "INSERT INTO images (content_sha256, source, width, height) VALUES ('old', 'old.jpg', 8, 8)")
    raw_execute(target, "INSERT INTO extractions (model_id, image_id, score_threshold, max_detections, "
                        "num_attributes, created_at) VALUES (1, 1, 0.5, 10, 1, 'x')")
    raw_execute(target, "INSERT INTO attributes (model_id, image_id, detection_index, name, category_id, score, "
                        "x1, y1, x2, y2) VALUES (1, 1, 0, 'bottle', 1, 0.9, 0, 0, 4, 4)")
    with open_database(target) as db:
        assert db.schema_version() == SCHEMA_VERSION == 3
        model_id = db.register_model(checkpoint, "arch", ["bottle"], None)
        db.write_batch(model_id, [coloured("n" * 64, [("bottle", "red", 0.7)])], [], 0.5, 10)
        old = db.attributes_of_image("old.jpg")
        red_bottles = db.images_with_attribute("bottle", colour="red")
        counts = db.colour_counts()
    assert [(row["name"], row["colour"], row["colour_share"]) for row in old] == [("bottle", None, None)]
    assert [row["source"] for row in red_bottles] == ["photos/" + "n" * 64 + ".jpg"]
    assert sorted((row["colour"] or "", row["detections"]) for row in counts) == [("", 1), ("red", 1)]


def test_improvement_rounds_round_trip(target, tmp_path):
    with open_database(target) as db:
        base = db.register_model(checkpoint_file(tmp_path, b"base"), "arch", ["a"], 0.30)
        candidate = db.register_model(checkpoint_file(tmp_path, b"candidate"), "arch", ["a"], 0.35)
        first = db.record_improvement_round(0, None, base, ["shards/a/manifest.json"], "full", None, 0.30,
                                            True, 0.01)
        second = db.record_improvement_round(1, base, candidate, ["a.json", "b.json"], "heads_then_all", 0.30,
                                             0.35, False, 0.05)
    with open_database(target) as db:
        rounds = db.improvement_rounds()
    assert [r["id"] for r in rounds] == [first, second]
    keys = ("round_index", "base_model_id", "candidate_model_id", "data", "base_map", "promoted")
    assert {key: rounds[0][key] for key in keys} == {
        "round_index": 0, "base_model_id": None, "candidate_model_id": base,
        "data": ["shards/a/manifest.json"], "base_map": None, "promoted": True}
    assert rounds[1]["data"] == ["a.json", "b.json"] and rounds[1]["schedule"] == "heads_then_all"
    assert rounds[1]["promoted"] is False
    assert rounds[1]["margin"] == 0.05 and rounds[1]["candidate_map"] == 0.35


def test_write_batch_is_atomic_and_idempotent(target, tmp_path):
    with open_database(target) as db:
        model_id = db.register_model(checkpoint_file(tmp_path, b"m"), "arch", ["bottle", "can"], None)
        batch = [extraction("aa", [0.9, 0.8, 0.7]), extraction("bb", [])]
        assert db.write_batch(model_id, batch, [SkippedImage("bad.jpg", "undecodable", "x")], 0.5, 100) == 2
        assert db.write_batch(model_id, batch, [], 0.5, 100) == 0  # nothing twice

        def fail():
            raise RuntimeError("crash inside the transaction")

        with pytest.raises(RuntimeError, match="crash inside"):
            db.write_batch(model_id, [extraction("cc", [0.6])], [SkippedImage("x.jpg", "truncated", "")], 0.5,
                           100, before_commit=fail)
        assert db.done_image_hashes(model_id) == {"aa", "bb"}
        assert [row["source"] for row in db.skipped()] == ["bad.jpg"]
        rows = db.attributes_of_image("photos/aa.jpg")
        assert [(r["detection_index"], r["name"], r["score"]) for r in rows] == [
            (0, "can", 0.9), (1, "bottle", 0.8), (2, "can", 0.7)]
        assert (rows[0]["x1"], rows[0]["y1"], rows[0]["x2"], rows[0]["y2"]) == (1.0, 2.0, 30.5, 40.25)
        assert db.attributes_of_image("aa") == rows  # by content hash too
        counts = {r["name"]: (r["detections"], r["images"]) for r in db.attribute_counts(model_id)}
        assert counts == {"can": (2, 1), "bottle": (1, 1)}
        assert [r["source"] for r in db.images_with_attribute("can", min_score=0.75)] == ["photos/aa.jpg"]
        assert db.images_with_attribute("can", min_score=0.95) == []
    assert raw_execute(target, "SELECT COUNT(*) FROM attributes") == [(3,)]


def test_unique_constraints_are_enforced_by_the_database(target, tmp_path):
    with open_database(target) as db:
        model_id = db.register_model(checkpoint_file(tmp_path, b"m"), "arch", ["can"], None)
        db.write_batch(model_id, [extraction("aa", [0.9])], [], 0.5, 100)
    duplicate = ("INSERT INTO extractions (model_id, image_id, score_threshold, max_detections, "
                 "num_attributes, created_at) SELECT model_id, image_id, 0.1, 1, 0, 'now' FROM extractions")
    integrity_errors = (sqlite3.IntegrityError,)
    if target.startswith("postgresql://"):
        import psycopg

        integrity_errors = (psycopg.errors.UniqueViolation,)
    with pytest.raises(integrity_errors):
        raw_execute(target, duplicate)
