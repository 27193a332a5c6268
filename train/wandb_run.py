"""The Weights & Biases run of a training job: mode choice, a run id that survives restarts, logged images.

One run per job, owned by rank 0 (the other ranks log nothing). The run id is kept in
run_dir/wandb_run_id.txt so that a torchrun restart, or a second invocation on the same run dir, resumes the
same run. wandb charts are keyed by the "step" metric; "images_seen" is logged beside it, so runs with
different global batch sizes can be compared on the same axis.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

# wandb also has "shared" (experimental: several processes log to one run); here rank 0 alone logs.
WANDB_MODES = ("online", "offline", "disabled")
RUN_ID_FILE_NAME = "wandb_run_id.txt"
_DEFAULT_BASE_URL = "https://api.wandb.ai"


def resolve_wandb_mode(config_mode: str | None) -> str:
    """wandb.mode from the config if set, else the WANDB_MODE environment variable, else "online" when an
    API key is configured and "offline" when not (online without a key fails at init)."""
    if config_mode is not None:
        if config_mode not in WANDB_MODES:
            raise ValueError(
                f"wandb.mode must be one of {', '.join(WANDB_MODES)} or null, got {config_mode!r}"
            )
        return config_mode
    if env_mode := os.environ.get("WANDB_MODE"):
        return env_mode
    return "online" if wandb_credentials_available() else "offline"


def wandb_credentials_available() -> bool:
    """True if wandb can authenticate: WANDB_API_KEY, an identity token file or a netrc entry for the host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", _DEFAULT_BASE_URL)).netloc
    netrc_path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        entry = netrc.netrc(netrc_path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def start_wandb_run(
    run_dir: Path,
    cfg_dict: Mapping[str, Any],
    mode: str,
    project: str,
    group: str | None,
    name: str | None,
    extra_config: Mapping[str, Any],
) -> Any:
    """Start or resume the job's wandb run; None when mode is "disabled" or on a rank other than 0.

    `extra_config` holds what the config does not say (strategy, world size, GPU names). The run writes under
    run_dir/wandb/ (offline runs as offline-run-*/, to upload later with `wandb sync`).
    """
    if mode == "disabled" or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return None
    import wandb  # imported here: a few hundred ms that disabled runs and other ranks need not pay

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        dir=run_dir,
        mode=mode,
        project=project,
        group=group,
        name=name,
        config={**cfg_dict, **extra_config},
        id=_persistent_run_id(run_dir),
        resume="allow",
    )
    run.define_metric("step")
    for pattern in ("images_seen", "train/*", "eval/*", "gpu/*"):
        run.define_metric(pattern, step_metric="step")
    return run


def _persistent_run_id(run_dir: Path) -> str:
    from wandb.sdk.lib.runid import generate_id

    id_file = run_dir / RUN_ID_FILE_NAME
    if id_file.is_file() and (run_id := id_file.read_text(encoding="utf-8").strip()):
        return run_id
    run_id = generate_id()
    id_file.write_text(run_id + "\n", encoding="utf-8")
    return run_id


def log_detection_images(
    run: Any,
    images: Sequence[torch.Tensor],
    predictions: Sequence[Mapping[str, torch.Tensor]],
    class_names: Mapping[int, str],
    step: int,
    key: str = "eval/predictions",
    score_threshold: float = 0.0,
    max_boxes: int = 50,
) -> None:
    """Log images with their predicted boxes (torchvision detection output: xyxy pixel boxes, labels, scores).

    `images` are [3, H, W] tensors, uint8 or float in [0, 1]; `class_names` maps label to name (label 0 is
    background). Only the `max_boxes` highest-scoring boxes at or above `score_threshold` are drawn.
    """
    if run is None:
        return
    import wandb

    class_labels = {int(label): str(label_name) for label, label_name in class_names.items()}
    logged = []
    for image, prediction in zip(images, predictions, strict=True):
        box_data = _box_data(prediction, class_labels, score_threshold, max_boxes)
        logged.append(
            wandb.Image(
                _to_hwc_uint8(image),
                boxes={"predictions": {"box_data": box_data, "class_labels": class_labels}},
            )
        )
    run.log({key: logged, "step": step}, step=step)


def wandb_images(files: Mapping[str, Path], run: Any) -> dict[str, Any]:
    """Image files as wandb images by key, to log with other values; {} without a run."""
    if run is None or not files:
        return {}
    import wandb

    return {key: wandb.Image(str(path)) for key, path in files.items()}


def _box_data(
    prediction: Mapping[str, torch.Tensor],
    class_labels: dict[int, str],
    score_threshold: float,
    max_boxes: int,
) -> list[dict[str, Any]]:
    scores = prediction["scores"].detach().cpu()
    keep = torch.nonzero(scores >= score_threshold).flatten()
    keep = keep[scores[keep].argsort(descending=True)][:max_boxes]
    boxes = prediction["boxes"].detach().cpu()[keep].tolist()
    labels = prediction["labels"].detach().cpu()[keep].tolist()
    box_data = []
    for (x1, y1, x2, y2), label, score in zip(boxes, labels, scores[keep].tolist(), strict=True):
        box_data.append(
            {
                "position": {"minX": x1, "minY": y1, "maxX": x2, "maxY": y2},
                "domain": "pixel",
                "class_id": int(label),
                "box_caption": f"{class_labels.get(int(label), label)} {score:.2f}",
                "scores": {"score": score},
            }
        )
    return box_data


def _to_hwc_uint8(image: torch.Tensor) -> Any:
    image = image.detach().cpu()
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return image.permute(1, 2, 0).numpy()


def finish(run: Any) -> None:
    """Close the run (flushes it; without this the process can hang at exit)."""
    if run is not None:
        run.finish()
