"""Shared by the attribute tests: a small checkpoint in train/main.py's format, a fresh PostgreSQL schema."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest
import torch

from data_prep.manifest import load_manifest
from train.checkpoint import save_checkpoint
from train.config import config_to_dict, load_config
from train.model import build_model

MODEL_NAME = "fasterrcnn_mobilenet_v3_large_320_fpn"
# What write_checkpoint records per class with a test mAP; "can" had no test ground truth (NaN).
TEST_AP_PER_CLASS = {"bottle": {"AP": 0.5, "AP50": 0.75, "gt_boxes": 4},
                     "can": {"AP": float("nan"), "AP50": float("nan"), "gt_boxes": 0}}
POSTGRES_URL_ENV = "TEST_POSTGRES_URL"


def write_checkpoint(manifest: Path, path: Path, test_map: float | None = None, frozen_batchnorm: bool = False) -> Path:
    """A randomly initialised detector for the manifest's classes, saved as train/loop.py saves one.

    Its box head and classification layer get a wider random init than torchvision's, so scores spread out
    (about 0.13 to 0.35 over three classes) and a threshold of 0.2 keeps some detections and drops others.
    """
    categories = load_manifest(manifest)["categories"]
    cfg = load_config(None, [f"data.manifest={manifest}", f"model.name={MODEL_NAME}", "model.min_size=96",
                             "model.max_size=128", f"model.frozen_batchnorm={str(frozen_batchnorm).lower()}"])
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, len(categories) + 1)
    for layer in (model.roi_heads.box_head.fc6, model.roi_heads.box_head.fc7):
        torch.nn.init.normal_(layer.weight, std=0.2)
    torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=1.0)
    state = {
        "model": model.state_dict(),
        "progress": {"epoch": 1, "step": 3, "best_ap": 0.01},
        "world_size": 1,
        "categories": categories,
        "config": config_to_dict(cfg),
    }
    if test_map is not None:
        per_class = {f"{metric}/{name}": value for name, row in TEST_AP_PER_CLASS.items()
                     for metric, value in row.items()}
        state["test_metrics"] = {"AP": test_map, **per_class}
    save_checkpoint(state, path)
    return path


def postgres_base_url() -> str:
    """The test server's URL; a missing one fails the test (CI must run it) unless ALLOW_NO_POSTGRES=1."""
    url = os.environ.get(POSTGRES_URL_ENV)
    if url:
        return url
    if os.environ.get("ALLOW_NO_POSTGRES") == "1":
        pytest.skip(f"{POSTGRES_URL_ENV} not set and ALLOW_NO_POSTGRES=1 (local run)")
    pytest.fail(
        f"{POSTGRES_URL_ENV} is not set: start a server with "
        f'`export {POSTGRES_URL_ENV}="$(bash scripts/start_postgres.sh)"` (or set ALLOW_NO_POSTGRES=1 to '
        "skip the PostgreSQL tests in a local run)"
    )


@contextmanager
def postgres_schema_url() -> Iterator[str]:
    """A URL whose connections work in a fresh, empty schema of the test database; dropped afterwards."""
    import psycopg

    base = postgres_base_url()
    schema = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            separator = "&" if "?" in base else "?"
            yield f"{base}{separator}options={quote(f'-csearch_path={schema}')}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
