"""Export a trained checkpoint to ONNX for serving: the whole detector in one graph, with what serving needs to
know in the file's metadata.

    python -m extract export CHECKPOINT --out model.onnx [--max-detections N]

The graph takes what the PyTorch model takes in extraction (train/evaluate.py: predict): one RGB image as float32
[3, H, W] in [0, 1], any H and W. Preprocessing stays inside it: torchvision's GeneralizedRCNNTransform (resize
to the model's min_size/max_size, or SSD's fixed square, and normalise with its mean and std), and so does the
postprocessing that maps boxes back to the input image's pixels. A second input, `score_threshold` (float32
scalar), is the model's own score threshold (roi_heads.score_thresh, or the model's for RetinaNet/FCOS/SSD): a
serving threshold applies inside the model as in PyTorch. The per-image cap (`--max-detections`, by default the
checkpoint's eval.max_detections) is fixed in the graph. Outputs: `boxes` float32 [N, 4] (x1, y1, x2, y2 in
input pixels), `labels` int64 [N] (ClassList labels), `scores` float32 [N], best first.

Why the legacy (TorchScript-based) exporter, `dynamo=False`: torch.export, under the default dynamo exporter,
stops at torchvision's batched NMS (`GuardOnDataDependentSymNode` on `boxes.numel() == 0` in
torchvision/ops/boxes.py `_batched_nms_coordinate_trick`) on torch 2.14.1 / torchvision 0.29.1. The legacy
exporter traces, and torchvision scripts its data-dependent parts under tracing (that branch becomes an ONNX If),
so the graph holds for any image size and any number of boxes.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from common.atomic_io import write_atomically
from common.colour_palette import PALETTE
from extract.database import file_sha256
from extract.onnx_backend import INPUT_NAMES, OUTPUT_NAMES, read_serving_metadata, require
from train.checkpoint import checkpoint_classes, load_model_checkpoint
from train.model import model_from_checkpoint, set_max_detections, trained_max_detections

OPSET_VERSION = 17  # onnxruntime >= 1.12 runs it; torch 2.11 to 2.14's legacy exporter writes it
EXAMPLE_IMAGE_SIZE = (3, 128, 128)  # any size: the graph resizes as the model does, and H, W stay free


class ServingModel(nn.Module):
    """The detector for one image, with its score threshold as an input instead of an attribute, and its outputs
    as a tuple (ONNX outputs are flat)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector
        # Faster R-CNN keeps the threshold on roi_heads, RetinaNet/FCOS/SSD on the model (extract/detector.py)
        self.thresholds_owner = getattr(detector, "roi_heads", detector)

    def forward(self, image: torch.Tensor, score_threshold: torch.Tensor):
        # a tensor here makes the traced comparison `scores > score_threshold` read the graph input
        self.thresholds_owner.score_thresh = score_threshold
        detections = self.detector([image])[0]
        return detections["boxes"], detections["labels"], detections["scores"]


def serving_metadata(state: Mapping, checkpoint: Path, model: nn.Module, architecture: str,
                     max_detections: int) -> dict[str, str]:
    """Everything serving needs besides the graph, as ONNX metadata_props (string to string; JSON where
    structured). One place: an attribute that needs more at serving time adds its entry here, and
    extract/onnx_backend.py read_serving_metadata reads them all back."""
    transform = model.transform
    metrics = {key: _json_number(value) for key, value in (state.get("test_metrics") or {}).items()}
    return {
        "architecture": architecture,
        "categories": json.dumps(checkpoint_classes(state, checkpoint).to_json()),
        "test_metrics": json.dumps(metrics, allow_nan=False),  # test-split COCO metrics; null where undefined
        "input": json.dumps({
            "name": INPUT_NAMES[0], "dtype": "float32", "layout": "CHW", "channels": "RGB", "value_range": [0, 1],
            "preprocessing": "in the graph: resize and normalise as below, boxes mapped back to input pixels",
            "min_size": list(transform.min_size), "max_size": transform.max_size,
            "fixed_size": list(transform.fixed_size) if transform.fixed_size else None,
            "image_mean": list(transform.image_mean), "image_std": list(transform.image_std),
        }),
        "outputs": json.dumps({"boxes": "float32 [N, 4] x1 y1 x2 y2 in input pixels",
                               "labels": "int64 [N], categories[label - 1]", "scores": "float32 [N], best first"}),
        "max_detections": str(max_detections),
        # what extraction names colours with (extract/colour.py, run on the image and the boxes after the model)
        "colour_palette": json.dumps(PALETTE),
        "checkpoint_sha256": file_sha256(checkpoint),
        "progress": json.dumps(state.get("progress") or {}),
    }


def export_onnx(checkpoint: Path, out: Path, max_detections: int | None = None) -> dict[str, str]:
    """Export `checkpoint` to `out` atomically: the file appears only once onnx's checker, onnxruntime and a
    read-back of the metadata accept it. At most `max_detections` per image, by default as many as the model was
    tested with (its eval.max_detections). Returns the metadata written."""
    onnx = require("onnx", "export")
    require("onnxruntime", "export")  # the export is checked by loading it, before it is published
    state = load_model_checkpoint(checkpoint)
    model, model_cfg = model_from_checkpoint(state, checkpoint)
    if max_detections is None:
        max_detections = trained_max_detections(state)
    set_max_detections(model, max_detections)
    metadata = serving_metadata(state, checkpoint, model, model_cfg.name, max_detections)
    proto = onnx.load_from_string(_traced_onnx(ServingModel(model.eval())))
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)

    def verify(temp_path: Path) -> None:
        if read_serving_metadata(temp_path) != metadata:
            raise ValueError(f"{out}: the metadata does not read back as written; not published")

    data = proto.SerializeToString()
    write_atomically(out, lambda file: file.write(data), verify)
    return metadata


def _traced_onnx(serving: ServingModel) -> bytes:
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(EXAMPLE_IMAGE_SIZE, generator=generator)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter and torchvision's scripting under it are chosen knowingly (module docstring); its
        # traced shape arithmetic warns by the dozen; its index tensors come from nonzero/topk, never negative.
        for message in ("You are using the legacy TorchScript-based ONNX export", "`torch.jit.script` is deprecated",
                        "To copy construct from a tensor", "Exporting aten::index operator of advanced indexing"):
            warnings.filterwarnings("ignore", message=message)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            serving, (example, torch.tensor(0.0)), buffer, dynamo=False, opset_version=OPSET_VERSION,
            input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES), do_constant_folding=True,
            dynamic_axes={INPUT_NAMES[0]: {1: "height", 2: "width"}, **{name: {0: "detections"}
                                                                        for name in OUTPUT_NAMES}},
        )
    return buffer.getvalue()


def _json_number(value):
    return None if isinstance(value, float) and math.isnan(value) else value


# ---- the command --------------------------------------------------------------------------------------------
def parse_export_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m extract export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by train/main.py (best.pt, ...)")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--max-detections", type=int, default=None,
                        help="per image, fixed in the graph: extraction may ask for fewer, not more (default: the "
                        "checkpoint's eval.max_detections, as it was tested)")
    args = parser.parse_args(argv)
    if args.max_detections is not None and args.max_detections < 1:
        parser.error("--max-detections must be >= 1")
    return args


def run_export(argv: list[str]) -> int:
    args = parse_export_args(argv)
    started = time.perf_counter()
    metadata = export_onnx(args.checkpoint, args.out, args.max_detections)
    classes = [entry["name"] for entry in json.loads(metadata["categories"])]
    print(f"exported {metadata['architecture']} ({len(classes)} classes: {', '.join(classes)}) to {args.out}: "
          f"{args.out.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s")
    return 0
