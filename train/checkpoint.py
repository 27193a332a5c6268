"""Checkpoint files for exact resume: atomic writes, validated loads, newest-valid lookup, pruning, RNG state.

A checkpoint is a plain dict that `torch.load(weights_only=True)` accepts (tensors, dicts, lists, tuples, str,
int, float, bool, None), so loading never runs arbitrary pickled code. `save_checkpoint` proves this before
publishing the file. Step checkpoints are `checkpoint-{step:08d}.pt` in the run dir; `best.pt` sits beside
them and is never pruned.
"""

from __future__ import annotations

import hashlib
import random
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.atomic_io import temp_file_destination, write_atomically
from data_prep.class_list import ClassList

BEST_CHECKPOINT_NAME = "best.pt"
_STEP_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{8,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be used (truncated, corrupt, or not weights_only-loadable)."""


def step_checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step:08d}.pt"


def best_checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / BEST_CHECKPOINT_NAME


def save_checkpoint(state: dict, path: Path) -> None:
    """Write `state` to `path` atomically (common/atomic_io.py): a reader sees the old file or the whole new one.

    The temporary file is reloaded with weights_only=True before it is published: a state that could not be
    resumed from is an error now, not at resume time, and the file at `path` stays as it was.
    """
    path = Path(path)
    write_atomically(path, lambda file: torch.save(state, file), verify=lambda temp: _check_loadable(temp, path))


def _check_loadable(temp_path: Path, path: Path) -> None:
    try:
        # mmap: unpickles and checks every global without reading the tensor data into memory.
        torch.load(temp_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise CheckpointError(
            f"{path}: state is not loadable with torch.load(weights_only=True) "
            f"(store only tensors, dicts, lists, tuples, str, int, float, bool, None): {error}"
        ) from error


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint dict; raise CheckpointError naming the file when it is partial or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict at the top level, found {type(state).__name__}")
    return state


def load_model_checkpoint(path: Path) -> dict:
    """A checkpoint of a trained model: `load_checkpoint`, and it must hold the model's weights, class list and
    config (what rebuilding the model needs)."""
    state = load_checkpoint(path)
    missing = [key for key in ("model", "categories", "config") if key not in state]
    if missing:
        raise ValueError(f"{path}: not a checkpoint of train/main.py (missing {', '.join(missing)})")
    return state


def checkpoint_classes(state: Mapping, path: str | Path) -> ClassList:
    """The class list of a checkpoint from `load_model_checkpoint`: what its model's labels mean."""
    return ClassList.from_json(state["categories"], source=path)


def list_step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `checkpoint-{step}.pt` in run_dir, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = _STEP_CHECKPOINT_RE.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_valid_checkpoint(
    run_dir: Path, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict] | None:
    """The newest step checkpoint that loads, with its state; None when there is none.

    Unreadable files (a save killed before the rename cannot leave one, but a disk or copy error can) are
    skipped with a warning naming them, so a run resumes from the one before instead of failing.
    """
    for _, path in reversed(list_step_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, map_location=map_location)
        except CheckpointError as error:
            warnings.warn(f"skipping checkpoint {path}: {error}", RuntimeWarning, stacklevel=2)
    return None


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step checkpoints (best.pt is never touched); return the deleted.

    Also removes temporary files left by a save that was killed mid-write. Call it only from the process that
    saves, after its save has returned, so no temporary file of a save in progress exists.
    """
    if keep_last < 1:
        raise ValueError(f"checkpoint.keep_last must be at least 1, got {keep_last}")
    run_dir = Path(run_dir)
    doomed = [path for _, path in list_step_checkpoints(run_dir)[:-keep_last]]
    doomed += [path for path in run_dir.iterdir() if temp_file_destination(path.name) and path.is_file()]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def capture_rng_state() -> dict:
    """This process's Python, numpy, torch CPU and CUDA generator states, in weights_only-safe types.

    Exact resume needs them: torchvision's RPN and ROI-head samplers draw from torch's global RNG, and data
    augmentation may use any of the others.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of capture_rng_state. CUDA states are restored only where CUDA is available now."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    _restore_cuda_rng_states(state.get("cuda") or [])


def _restore_cuda_rng_states(cuda_states: list[torch.Tensor]) -> None:
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda_states) != visible:
        # Resuming on other hardware: the run goes on, but it is not an exact continuation.
        warnings.warn(
            f"checkpoint has CUDA RNG states for {len(cuda_states)} devices, this process sees {visible}; "
            f"restoring the first {min(len(cuda_states), visible)}",
            RuntimeWarning,
            stacklevel=3,
        )
    for index, cuda_state in enumerate(cuda_states[:visible]):
        torch.cuda.set_rng_state(cuda_state, index)


def tensor_hash(state: Any) -> str:
    """sha256 over a (nested) state dict: key names, tensor dtypes, shapes and bytes, in iteration order.

    Equal hashes mean bitwise-equal weights (or optimizer states); used to check exact resume.
    """
    digest = hashlib.sha256()
    _update_hash(digest, state)
    return digest.hexdigest()


def _update_hash(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(f"dict:{len(value)}:".encode())
        for key, item in value.items():
            digest.update(f"key:{key!r}:".encode())
            _update_hash(digest, item)
    elif isinstance(value, list | tuple):
        digest.update(f"seq:{len(value)}:".encode())
        for item in value:
            _update_hash(digest, item)
    elif value is None or isinstance(value, bool | int | float | str):
        digest.update(f"value:{value!r}:".encode())
    else:
        raise TypeError(f"tensor_hash: unsupported value of type {type(value).__name__}")
