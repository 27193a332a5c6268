"""`python -m extract` for real: a checkpoint run over a folder and a shard split into SQLite and
PostgreSQL, re-runs, a run killed mid-transaction, malformed files, annotated images, torchrun on 2 ranks."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from attributes_helpers import postgres_schema_url, write_checkpoint
from PIL import Image

from common.colour_palette import COLOUR_NAMES
from extract.cli import main
from extract.run import CRASH_AT_BATCH_ENV

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GOOD_IMAGES = 8
THRESHOLD = "0.2"

DUMP_SQL = """
    SELECT i.content_sha256, i.source, i.width, i.height, a.detection_index, a.name, a.category_id, a.score,
           a.x1, a.y1, a.x2, a.y2, c.value, c.share
    FROM attributes a JOIN images i ON i.id = a.image_id
    LEFT JOIN detection_attributes c ON c.model_id = a.model_id AND c.image_id = a.image_id
        AND c.detection_index = a.detection_index AND c.kind = 'colour'
    ORDER BY i.content_sha256, a.detection_index"""
SKIPPED_SQL = "SELECT source, reason FROM skipped ORDER BY source"
# write_checkpoint's TEST_AP_PER_CLASS as the database stores it: an undefined AP is JSON null.
STORED_AP_PER_CLASS = {"bottle": {"AP": 0.5, "AP50": 0.75, "gt_boxes": 4},
                       "can": {"AP": None, "AP50": None, "gt_boxes": 0}}


@pytest.fixture(scope="module")
def checkpoint(small_manifest, module_dir) -> Path:
    return write_checkpoint(small_manifest, module_dir / "model" / "best.pt", test_map=0.25)


@pytest.fixture(scope="module")
def image_folder(small_manifest, module_dir) -> Path:
    """8 good images (one a PNG in a subfolder), a file that is no image, a truncated JPEG and a text file."""
    synth_images = sorted((small_manifest.parent.parent / "synth" / "images").glob("*.jpg"))
    folder = module_dir / "photos"
    folder.mkdir()
    for source in synth_images[: GOOD_IMAGES - 1]:
        shutil.copy(source, folder / source.name)
    (folder / "sub").mkdir()
    Image.open(synth_images[GOOD_IMAGES - 1]).save(folder / "sub" / "converted.png")
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG at all")
    (folder / "truncated.jpg").write_bytes(synth_images[GOOD_IMAGES].read_bytes()[:400])
    (folder / "notes.txt").write_text("not an image suffix: ignored, not reported")
    return folder


def extract(checkpoint: Path, db: Path | str, *extra: str) -> int:
    return main([str(checkpoint), "--db", str(db), "--num-workers", "0", "--batch-size", "2",
                 "--score-threshold", THRESHOLD, *extra])


def query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(sql, params).fetchall()


def assert_consistent(db: Path) -> None:
    """Integrity holds and every extraction has exactly its attribute rows, every image an extraction."""
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    assert query(db, "PRAGMA foreign_key_check") == []
    assert query(db, """SELECT e.id FROM extractions e LEFT JOIN attributes a
                        ON a.model_id = e.model_id AND a.image_id = e.image_id
                        GROUP BY e.id, e.num_attributes HAVING COUNT(a.id) != e.num_attributes""") == []
    assert query(db, "SELECT id FROM images WHERE id NOT IN (SELECT image_id FROM extractions)") == []


@pytest.fixture(scope="module")
def folder_run(checkpoint, image_folder, module_dir):
    """One extraction over the folder into a fresh SQLite file, annotating the default first 4 inputs."""
    out = module_dir / "folder_run"
    out.mkdir()
    stdout = io.StringIO()  # module-scoped fixtures cannot use capsys
    with contextlib.redirect_stdout(stdout):
        assert extract(checkpoint, out / "attributes.sqlite", "--input", str(image_folder),
                       "--annotate-dir", str(out / "annotated")) == 0
    return out / "attributes.sqlite", out / "annotated", stdout.getvalue()


def test_folder_run_writes_model_images_and_attributes(folder_run, checkpoint, image_folder):
    db, _, _ = folder_run
    [(architecture, class_names, test_map, test_ap_per_class, sha)] = query(
        db, "SELECT architecture, class_names, test_map, test_ap_per_class, checkpoint_sha256 FROM models")
    assert architecture == "fasterrcnn_mobilenet_v3_large_320_fpn" and test_map == 0.25
    assert json.loads(test_ap_per_class) == STORED_AP_PER_CLASS
    assert json.loads(class_names) == ["bottle", "box", "can", "shoe", "bag"]
    assert len(sha) == 64
    images = query(db, "SELECT source, width, height FROM images ORDER BY source")
    expected_names = [f"{n:06d}.jpg" for n in range(1, GOOD_IMAGES)] + ["converted.png"]
    assert [Path(source).name for source, _, _ in images] == expected_names
    for source, width, height in images:
        assert Image.open(source).size == (width, height)
    attributes = query(db, "SELECT a.name, a.category_id, a.score, a.x1, a.y1, a.x2, a.y2, i.width, i.height "
                           "FROM attributes a JOIN images i ON i.id = a.image_id")
    assert len(attributes) > GOOD_IMAGES
    names = {"bottle": 1, "box": 3, "can": 4, "shoe": 7, "bag": 9}
    for name, category_id, score, x1, y1, x2, y2, width, height in attributes:
        assert names[name] == category_id and score >= float(THRESHOLD)
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
    assert query(db, "SELECT COUNT(*) FROM extractions") == [(GOOD_IMAGES,)]
    assert_consistent(db)


def test_every_detection_has_one_palette_colour_and_colour_queries_find_them(folder_run, capsys):
    db, _, _ = folder_run
    colours = query(db, """SELECT a.name, c.kind, c.value, c.share FROM attributes a
                             LEFT JOIN detection_attributes c ON c.model_id = a.model_id
                             AND c.image_id = a.image_id AND c.detection_index = a.detection_index""")
    assert len(colours) == query(db, "SELECT COUNT(*) FROM attributes")[0][0]  # one colour row per detection
    for _, kind, value, share in colours:
        assert kind == "colour" and value in COLOUR_NAMES and 0 < share <= 1
    name, _, colour, _ = colours[0]
    expected = query(db, """SELECT COUNT(DISTINCT a.image_id) FROM attributes a JOIN detection_attributes c
                             ON c.model_id = a.model_id AND c.image_id = a.image_id
                             AND c.detection_index = a.detection_index WHERE a.name = ? AND c.value = ?""",
                     (name, colour))[0][0]
    main(["query", str(db), "--attribute", name, "--colour", colour])
    assert len(capsys.readouterr().out.splitlines()) - 1 == expected > 0
    main(["query", str(db), "--colours"])
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["model_id", "name", "colour", "detections", "mean_share"]
    assert sum(int(row[3]) for row in rows[1:]) == len(colours)


def test_no_colour_stores_no_colours(checkpoint, image_folder, tmp_path):
    db = tmp_path / "plain.sqlite"
    assert extract(checkpoint, db, "--input", str(image_folder), "--annotate", "0", "--no-colour") == 0
    assert query(db, "SELECT COUNT(*) FROM attributes")[0][0] > 0
    assert query(db, "SELECT COUNT(*) FROM detection_attributes") == [(0,)]


def test_malformed_files_are_skipped_and_reported(folder_run):
    db, _, stdout = folder_run
    skipped = dict(query(db, "SELECT source, reason FROM skipped"))
    assert {Path(source).name: reason for source, reason in skipped.items()} == {
        "broken.jpg": "undecodable", "truncated.jpg": "truncated"}
    assert f"{GOOD_IMAGES + 2} read, {GOOD_IMAGES} new, 0 already done, 2 skipped" in stdout
    assert "broken.jpg: undecodable" in stdout and "truncated.jpg: truncated" in stdout


def test_annotated_images_are_valid_pngs_of_the_image_size(folder_run):
    db, annotated, _ = folder_run
    files = sorted(annotated.iterdir())
    assert [f.name for f in files] == ["000000_000001.png", "000001_000002.png", "000002_000003.png",
                                       "000003_000004.png"]
    sizes = dict(query(db, "SELECT source, width || 'x' || height FROM images"))
    for file in files:
        with Image.open(file) as image:
            image.verify()
        with Image.open(file) as image:
            assert image.format == "PNG"
            source = next(s for s in sizes if Path(s).stem == file.stem.split("_", 1)[1])
            assert f"{image.width}x{image.height}" == sizes[source]
            original = Image.open(source).convert("RGB")
            assert not np.array_equal(np.asarray(image.convert("RGB")), np.asarray(original))  # boxes drawn


def test_rerun_adds_nothing(folder_run, checkpoint, image_folder, tmp_path, capsys):
    db, _, _ = folder_run
    before = query(db, DUMP_SQL)
    assert extract(checkpoint, db, "--input", str(image_folder), "--annotate", "0") == 0
    assert f"{GOOD_IMAGES} already done" in capsys.readouterr().out
    assert query(db, DUMP_SQL) == before
    assert query(db, "SELECT COUNT(*) FROM extractions") == [(GOOD_IMAGES,)]
    assert query(db, "SELECT COUNT(*) FROM models") == [(1,)]


def test_query_command(folder_run, image_folder, capsys):
    db, _, _ = folder_run
    image = image_folder / "000002.jpg"
    main(["query", str(db), "--image", str(image)])
    lines = capsys.readouterr().out.splitlines()
    expected = query(db, "SELECT COUNT(*) FROM attributes a JOIN images i ON i.id = a.image_id "
                         "WHERE i.source = ?", (str(image.resolve()),))[0][0]
    assert lines[0].split("\t")[:5] == ["model_id", "source", "content_sha256", "detection_index", "name"]
    assert len(lines) - 1 == expected > 0
    main(["query", str(db), "--counts"])
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()[1:]]
    assert sum(int(row[2]) for row in rows) == query(db, "SELECT COUNT(*) FROM attributes")[0][0]
    name = rows[0][1]
    main(["query", str(db), "--attribute", name])
    assert len(capsys.readouterr().out.splitlines()) - 1 == int(rows[0][3])  # one line per image
    main(["query", str(db), "--class-ap"])
    assert capsys.readouterr().out.splitlines() == ["model_id\tname\tAP\tAP50\tgt_boxes",
                                                    "1\tbottle\t0.5000\t0.7500\t4", "1\tcan\tNone\tNone\t0"]
    main(["query", str(db), "--models"])
    header, row = (line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert json.loads(dict(zip(header, row, strict=True))["test_ap_per_class"]) == STORED_AP_PER_CLASS


@pytest.fixture(scope="module")
def val_run(checkpoint, small_manifest, module_dir) -> Path:
    (module_dir / "val_run").mkdir()
    db = module_dir / "val_run" / "attributes.sqlite"
    assert extract(checkpoint, db, "--manifest", str(small_manifest), "--split", "val",
                   "--annotate", "0") == 0
    return db


def test_shard_split_input(val_run, small_manifest):
    """Every sample of the split is extracted once, keyed as SHARD_FILE/KEY."""
    split = json.loads(small_manifest.read_text())["splits"]["val"]
    sources = [source for (source,) in query(val_run, "SELECT source FROM images")]
    keys = sorted(source.split("/")[1] for source in sources)
    assert keys == sorted(f"{image_id:012d}" for image_id in split["image_ids"])
    assert {source.split("/")[0] for source in sources} == {entry["file"] for entry in split["shards"]}
    assert query(val_run, "SELECT COUNT(*) FROM extractions") == [(split["num_samples"],)]
    assert query(val_run, "SELECT COUNT(*) FROM attributes")[0][0] > 0
    assert_consistent(val_run)


def test_killed_run_leaves_consistent_db_and_rerun_completes(checkpoint, small_manifest, val_run, tmp_path):
    db = tmp_path / "attributes.sqlite"
    command = [sys.executable, "-m", "extract", str(checkpoint), "--db", str(db), "--manifest",
               str(small_manifest), "--split", "val", "--batch-size", "2", "--num-workers", "0",
               "--score-threshold", THRESHOLD, "--annotate", "0"]
    env = {**os.environ, CRASH_AT_BATCH_ENV: "3"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    # batches 1 and 2 committed; batch 3 was inserted but its transaction never committed
    assert query(db, "SELECT COUNT(*) FROM extractions") == [(4,)]
    assert_consistent(db)
    assert extract(checkpoint, db, "--manifest", str(small_manifest), "--split", "val",
                   "--annotate", "0") == 0
    assert_consistent(db)
    assert query(db, DUMP_SQL) == query(val_run, DUMP_SQL)


def test_torchrun_two_processes_give_the_rows_of_one(checkpoint, image_folder, tmp_path):
    """Batch size 1, so both runs compute each image alone with one thread: the rows must be equal exactly."""
    single, double = tmp_path / "single.sqlite", tmp_path / "double.sqlite"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers run
    try:
        assert extract(checkpoint, single, "--input", str(image_folder), "--batch-size", "1",
                       "--annotate", "0") == 0
    finally:
        torch.set_num_threads(threads)
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "extract",
               str(checkpoint), "--db", str(double), "--input", str(image_folder), "--batch-size", "1",
               "--num-workers", "0", "--score-threshold", THRESHOLD, "--annotate", "all",
               "--annotate-dir", str(tmp_path / "annotated")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # one summary, from rank 0, counting both ranks' images
    [summary] = [line for line in result.stdout.splitlines() if line.startswith("images: ")]
    assert f"{GOOD_IMAGES + 2} read, {GOOD_IMAGES} new, 0 already done, 2 skipped (on 2 rank(s))" in summary
    assert query(double, DUMP_SQL) == query(single, DUMP_SQL)
    assert query(double, SKIPPED_SQL) == query(single, SKIPPED_SQL)
    assert len(list((tmp_path / "annotated").glob("*.png"))) == GOOD_IMAGES
    assert_consistent(double)


def test_postgresql_end_to_end(checkpoint, image_folder, folder_run, capsys):
    """The folder run into a real PostgreSQL server gives the SQLite run's rows; a re-run adds nothing."""
    import psycopg

    sqlite_db, _, _ = folder_run
    with postgres_schema_url() as url:
        for _ in range(2):
            assert extract(checkpoint, url, "--input", str(image_folder), "--annotate", "0") == 0
        with psycopg.connect(url) as connection:
            rows = connection.execute(DUMP_SQL).fetchall()
            skipped = connection.execute(SKIPPED_SQL).fetchall()
            [(test_map, test_ap_per_class)] = connection.execute(
                "SELECT test_map, test_ap_per_class FROM models").fetchall()
            # the stored text is JSON that PostgreSQL itself can read
            [(bottle_ap,)] = connection.execute(
                "SELECT (test_ap_per_class::json -> 'bottle' ->> 'AP')::float FROM models").fetchall()
        assert [tuple(row) for row in rows] == query(sqlite_db, DUMP_SQL)
        assert [tuple(row) for row in skipped] == query(sqlite_db, SKIPPED_SQL)
        assert test_map == 0.25 and json.loads(test_ap_per_class) == STORED_AP_PER_CLASS and bottle_ap == 0.5
        assert f"{GOOD_IMAGES} already done" in capsys.readouterr().out
        main(["query", url, "--counts"])
        counted = sum(int(line.split("\t")[2]) for line in capsys.readouterr().out.splitlines()[1:])
        assert counted == len(rows)


def test_missing_input_is_a_clear_error(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        extract(checkpoint, tmp_path / "a.sqlite", "--input", str(tmp_path / "nowhere"))


def test_one_file_with_bf16_autocast_and_no_stored_test_map(small_manifest, image_folder, tmp_path):
    """A checkpoint without test metrics gives a NULL test_map; bf16 autocast runs (on the CPU here)."""
    bare = write_checkpoint(small_manifest, tmp_path / "no_test_map.pt")
    db = tmp_path / "attributes.sqlite"
    one_file = str(image_folder / "000001.jpg")
    assert extract(bare, db, "--input", one_file, "--amp", "bf16", "--annotate", "0") == 0
    assert query(db, "SELECT test_map, test_ap_per_class FROM models") == [(None, None)]
    assert query(db, "SELECT COUNT(*) FROM extractions") == [(1,)]
    assert query(db, "SELECT COUNT(*) FROM attributes WHERE score >= ?", (float(THRESHOLD),))[0][0] > 0
    assert_consistent(db)


def test_a_model_trained_by_train_main_is_extracted_with_its_test_map(small_manifest, tmp_path):
    """The whole chain: train/main.py trains a few steps and evaluates on test (metrics.jsonl and the console
    get the per-class APs, the run directory its figures); the final checkpoint carries the test APs, and
    extraction over the test split records them with the model and writes rows, as many per image as the
    training's eval.max_detections allowed."""
    from test_train import records, run_training, tiny_overrides

    from train.checkpoint import latest_valid_checkpoint
    from train.eval_plots import PLOT_NAMES
    from train.evaluate import PER_CLASS_METRICS, per_class_metrics

    run_dir = tmp_path / "run"
    result = run_training(tiny_overrides(small_manifest, run_dir) + ["train.max_steps=3", "eval.every_epochs=0",
                                                                     "eval.max_detections=150"], nproc=0)
    checkpoint, state = latest_valid_checkpoint(run_dir)
    names = [c["name"] for c in state["categories"]]
    [test_record] = [r for r in records(run_dir) if r.get("kind") == "eval"]
    per_class_keys = {f"{metric}/{name}" for metric in PER_CLASS_METRICS for name in names}
    assert per_class_keys <= set(test_record) and per_class_keys <= set(state["test_metrics"])
    assert sum(test_record[f"gt_boxes/{name}"] for name in names) > 0
    assert "AR150" in test_record and "AR100" not in test_record
    assert all((run_dir / f"{name}_test.png").is_file() for name in PLOT_NAMES)
    table = result.stdout[result.stdout.index("eval test step"):].splitlines()[1:len(names) + 2]
    assert table[0].split() == ["class", "AP", "AP50", "gt_boxes"]
    assert [line.split()[0] for line in table[1:]] == names
    database = tmp_path / "attributes.sqlite"
    assert main([str(checkpoint), "--manifest", str(small_manifest), "--split", "test", "--db", str(database),
                 "--score-threshold", "0", "--annotate", "0", "--num-workers", "0"]) == 0
    with contextlib.closing(sqlite3.connect(database)) as connection:
        test_map, test_ap_per_class = connection.execute("SELECT test_map, test_ap_per_class FROM models").fetchone()
        images = connection.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        caps = connection.execute("SELECT DISTINCT max_detections FROM extractions").fetchall()
        attributes = connection.execute("SELECT COUNT(*) FROM attributes").fetchone()[0]
    assert test_map == pytest.approx(state["test_metrics"]["AP"])
    stored = json.loads(test_ap_per_class)
    expected = per_class_metrics(state["test_metrics"])
    assert list(stored) == names == list(expected)
    for name in names:
        for metric, value in expected[name].items():
            assert stored[name][metric] == (None if math.isnan(value) else pytest.approx(value))
    test_ids = json.loads((small_manifest.parent / "manifest.json").read_text())["splits"]["test"]["image_ids"]
    assert images == len(test_ids) and attributes > 0 and caps == [(150,)]


def test_query_piped_into_head_exits_cleanly(folder_run):
    # scripts/demo.sh pipes a query into `head`, which may close the pipe before the query is written; under
    # `set -o pipefail` a BrokenPipeError would fail the whole main job. `true` reads nothing at all.
    db, _, _ = folder_run
    result = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {sys.executable} -m extract query {db} --counts | true"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
