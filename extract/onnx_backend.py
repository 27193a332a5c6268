"""An exported detector (extract/export.py) run by onnxruntime on the CPU, as extraction's `--backend
onnxruntime`: it is called like the PyTorch model, so extraction feeds it exactly what it feeds the PyTorch model
(float32 [3, H, W] RGB in [0, 1]) and writes the same rows.

The graph takes one image per run (its preprocessing resizes each image on its own), so a batch runs image by
image; the PyTorch model pads a batch's images to a common size, which differs in the last bits only where a
batch mixes image sizes.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

INPUT_NAMES = ("image", "score_threshold")
OUTPUT_NAMES = ("boxes", "labels", "scores")
REQUIRED_METADATA = ("architecture", "categories", "test_metrics", "input", "max_detections")


def require(module: str, purpose: str) -> ModuleType:
    """`import module`, or an error that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{purpose} needs the {module} package, which is not installed: "
                          "pip install 'product-attributes[export]' (or pip install onnx onnxruntime)") from error


def open_session(path: Path):
    """An onnxruntime CPU session for `path`, with as many threads as torch uses (1 per rank under torchrun)
    that do not spin between runs."""
    ort = require("onnxruntime", "--backend onnxruntime")
    if not Path(path).is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # idle threads sleep instead of spinning: the loader workers decoding the next batch want those cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        raise ValueError(f"{path}: not an ONNX model onnxruntime can load (export one with "
                         f"`python -m extract export CHECKPOINT --out model.onnx`): {error}") from error


def read_serving_metadata(path: Path, session=None) -> dict[str, str]:
    """The metadata extract/export.py serving_metadata wrote, as strings; an error names the file and what is
    missing."""
    session = session or open_session(path)
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"{path}: not exported by `python -m extract export` (metadata lacks {', '.join(missing)})")
    return metadata


class OnnxRuntimeModel(nn.Module):
    """The exported graph behind the PyTorch detector's inference call: a list of float32 [3, H, W] images in,
    a list of {"boxes", "labels", "scores"} out. Runs on the CPU: inputs on another device are copied back."""

    def __init__(self, session, score_threshold: float, max_detections: int):
        super().__init__()
        self.session = session
        self.score_threshold = np.array(score_threshold, dtype=np.float32)
        self.max_detections = max_detections  # the graph's own cap: extraction may keep fewer

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            feed = {INPUT_NAMES[0]: image.detach().float().cpu().numpy(), INPUT_NAMES[1]: self.score_threshold}
            values = self.session.run(list(OUTPUT_NAMES), feed)
            outputs.append({name: torch.from_numpy(value) for name, value in zip(OUTPUT_NAMES, values, strict=True)})
        return outputs


def load_onnx_model(path: Path, score_threshold: float,
                    max_detections: int | None = None) -> tuple[OnnxRuntimeModel, dict]:
    """The exported model at `path` and its metadata, with `test_metrics` and `categories` decoded from JSON;
    at most `max_detections` per image, by default the cap it was exported with. Asking for more than the graph
    keeps is an error rather than silently fewer."""
    session = open_session(path)
    metadata = read_serving_metadata(path, session)
    exported_cap = int(metadata["max_detections"])
    if max_detections is None:
        max_detections = exported_cap
    if max_detections > exported_cap:
        raise ValueError(f"--max-detections {max_detections}: {path} was exported with at most {exported_cap} "
                         f"detections per image; export again with --max-detections {max_detections}")
    decoded = {**metadata, "categories": json.loads(metadata["categories"]),
               "test_metrics": {key: float("nan") if value is None else value
                                for key, value in json.loads(metadata["test_metrics"]).items()}}
    return OnnxRuntimeModel(session, score_threshold, max_detections), decoded
