"""`python -m extract export` for real: a small checkpoint exported to ONNX once per module, its metadata read
back with onnx, and extraction with `--backend onnxruntime` against `--backend torch` on the synthetic test split,
both databases queried; bad inputs and missing packages give clear errors.

The checkpoint's box NMS is off (box_nms_thresh 1.0, up to 1000 detections): write_checkpoint's random head
scores hundreds of boxes per image within 1e-6 of each other, so which of two near-equal boxes NMS keeps (and so
which others it drops) turns on float rounding, in PyTorch itself as between PyTorch and onnxruntime. Without
suppression every scored box is compared, and each must agree.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections import defaultdict
from pathlib import Path

import onnx
import pytest
from attributes_helpers import MODEL_NAME, write_checkpoint

from common.colour_palette import PALETTE
from data_prep.manifest import load_manifest
from extract.cli import main
from train.checkpoint import load_checkpoint, save_checkpoint

# The tolerance docs/attributes.md states for onnxruntime against PyTorch on the CPU (measured: 3e-7, 2e-5 px).
SCORE_TOLERANCE = 1e-5
BOX_TOLERANCE_PX = 1e-3
MAX_DETECTIONS = "1000"
THRESHOLD = "0.2"
ROWS_SQL = """
    SELECT i.content_sha256, a.detection_index, a.name, c.value, c.share, a.score, a.x1, a.y1, a.x2, a.y2
    FROM attributes a JOIN images i ON i.id = a.image_id
    JOIN detection_attributes c ON c.model_id = a.model_id AND c.image_id = a.image_id
         AND c.detection_index = a.detection_index AND c.kind = 'colour'
    ORDER BY i.content_sha256, a.detection_index"""


@pytest.fixture(scope="module")
def checkpoint(small_manifest, module_dir) -> Path:
    """write_checkpoint's model with its box NMS off (the module docstring says why)."""
    path = write_checkpoint(small_manifest, module_dir / "model" / "best.pt", test_map=0.25)
    state = load_checkpoint(path)
    state["config"]["model"]["builder_kwargs"]["box_nms_thresh"] = 1.0
    save_checkpoint(state, path)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint, module_dir) -> Path:
    out = module_dir / "serving" / "model.onnx"
    started = time.perf_counter()
    assert main(["export", str(checkpoint), "--out", str(out), "--max-detections", MAX_DETECTIONS]) == 0
    print(f"export took {time.perf_counter() - started:.1f} s, {out.stat().st_size / 1e6:.1f} MB")
    return out


def extract(model: Path, db: Path, manifest: Path, *extra: str) -> int:
    """One image per forward pass, as the exported graph runs: PyTorch pads a batch's images to one size, which
    moves scores by up to 0.01 near the borders of the smaller ones."""
    return main([str(model), "--db", str(db), "--manifest", str(manifest), "--split", "test", "--num-workers", "0",
                 "--batch-size", "1", "--score-threshold", THRESHOLD, "--annotate", "0", *extra])


def query(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(sql).fetchall()


def test_export_writes_the_class_list_metrics_and_input_in_the_metadata(exported, small_manifest):
    proto = onnx.load(str(exported))
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    assert metadata["architecture"] == MODEL_NAME
    assert json.loads(metadata["categories"]) == load_manifest(small_manifest)["categories"]
    assert json.loads(metadata["test_metrics"]) == {"AP": 0.25, "AP/bottle": 0.5, "AP50/bottle": 0.75,
                                                    "gt_boxes/bottle": 4, "AP/can": None, "AP50/can": None,
                                                    "gt_boxes/can": 0}
    image_input = json.loads(metadata["input"])
    assert (image_input["dtype"], image_input["value_range"]) == ("float32", [0, 1])
    assert (image_input["min_size"], image_input["max_size"]) == ([96], 128)  # write_checkpoint's sizes
    assert metadata["max_detections"] == MAX_DETECTIONS
    assert json.loads(metadata["colour_palette"]) == {name: [list(rgb) for rgb in anchors]
                                                      for name, anchors in PALETTE.items()}
    assert [node.name for node in proto.graph.input] == ["image", "score_threshold"]
    assert [node.name for node in proto.graph.output] == ["boxes", "labels", "scores"]
    assert sorted(path.name for path in exported.parent.iterdir()) == ["model.onnx"]  # no temporary file left


def test_onnxruntime_extraction_writes_the_rows_of_torch(exported, checkpoint, small_manifest, tmp_path):
    cap = ("--max-detections", MAX_DETECTIONS)
    assert extract(checkpoint, tmp_path / "torch.sqlite", small_manifest, *cap) == 0
    assert extract(exported, tmp_path / "onnx.sqlite", small_manifest, *cap, "--backend", "onnxruntime") == 0
    torch_rows, onnx_rows = query(tmp_path / "torch.sqlite", ROWS_SQL), query(tmp_path / "onnx.sqlite", ROWS_SQL)
    assert len(torch_rows) > 500  # write_checkpoint's model finds some boxes at 0.2 and not others
    assert len(onnx_rows) == len(torch_rows)
    unmatched = unmatched_rows(torch_rows, onnx_rows)
    assert not unmatched, unmatched[:3]
    models_sql = "SELECT architecture, class_names, test_map, test_ap_per_class FROM models"
    assert query(tmp_path / "onnx.sqlite", models_sql) == query(tmp_path / "torch.sqlite", models_sql)
    images_sql = "SELECT content_sha256, source, width, height FROM images ORDER BY content_sha256"
    assert query(tmp_path / "onnx.sqlite", images_sql) == query(tmp_path / "torch.sqlite", images_sql)


def unmatched_rows(expected: list[tuple], got: list[tuple]) -> list[tuple]:
    """Rows of `expected` with no row of `got` for the same image, class and colour within the tolerances (order
    aside: equal scores may come out in either order)."""
    pool = defaultdict(list)
    for row in got:
        pool[row[0], row[2], row[3]].append(row)
    missing = []
    for row in expected:
        candidates = pool[row[0], row[2], row[3]]
        match = next((other for other in candidates if abs(other[4] - row[4]) <= 1e-9
                      and abs(other[5] - row[5]) <= SCORE_TOLERANCE
                      and max(abs(a - b) for a, b in zip(other[6:], row[6:], strict=True)) <= BOX_TOLERANCE_PX), None)
        if match is None:
            missing.append(row)
        else:
            candidates.remove(match)
    return missing


def test_more_detections_than_exported_is_an_error(exported, small_manifest, tmp_path):
    with pytest.raises(ValueError, match="exported with at most 1000 detections per image"):
        extract(exported, tmp_path / "a.sqlite", small_manifest, "--backend", "onnxruntime", "--max-detections", "1001")


def test_a_checkpoint_is_no_onnx_model(checkpoint, small_manifest, tmp_path):
    with pytest.raises(ValueError, match="not an ONNX model onnxruntime can load"):
        extract(checkpoint, tmp_path / "a.sqlite", small_manifest, "--backend", "onnxruntime")


def test_onnxruntime_backend_takes_no_gpu(exported, small_manifest, tmp_path, capsys):
    with pytest.raises(SystemExit):
        extract(exported, tmp_path / "a.sqlite", small_manifest, "--backend", "onnxruntime", "--device", "cuda")
    assert "runs on the CPU in float32" in capsys.readouterr().err


def test_bad_checkpoint_path_is_a_clear_error(tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*missing.pt"):
        main(["export", str(tmp_path / "missing.pt"), "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("package", ["onnx", "onnxruntime"])
def test_missing_package_is_a_clear_error(package, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    with pytest.raises(ImportError, match=rf"needs the {package} package.*product-attributes\[export\]"):
        main(["export", str(checkpoint), "--out", str(tmp_path / "model.onnx")])
    assert not (tmp_path / "model.onnx").exists()


def test_missing_onnxruntime_in_extraction_is_a_clear_error(exported, small_manifest, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"--backend onnxruntime needs the onnxruntime package"):
        extract(exported, tmp_path / "a.sqlite", small_manifest, "--backend", "onnxruntime")
