"""Per-interval training measurements and the sinks they go to (metrics.jsonl, console, wandb).

`IntervalMeter` keeps loss sums on the device so that recording a step never waits for the GPU; the one
host sync per logging interval happens in `summary`. `MetricsLogger` writes on the main process only; on the
other ranks it is built with enabled=False and does nothing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import torch

from train.evaluate import PER_CLASS_METRICS, per_class_metrics
from train.gpu_stats import GpuStatsSampler
from train.wandb_run import wandb_images

METRICS_FILE_NAME = "metrics.jsonl"


class IntervalMeter:
    """Measures one logging interval of this rank's steps: data wait, compute time, images, loss components.

    Per step the loop calls `data_done(wait_s)` when the batch arrives and `step_done(losses, images)` after
    backward; compute time is the time between the two. A "step" is one `step_done` call (a micro-batch under
    gradient accumulation). The first `warmup_steps` steps of this process (start-up, allocator and cudnn
    warm-up, also after a resume) are left out of images_per_s; the end of warm-up is timed without waiting
    for queued GPU work. images_per_s counts the images passed here, i.e. this rank's: sum it over ranks.
    Steps with a non-finite loss component are left out of the loss means (one NaN would poison them) and
    counted in nonfinite_steps.
    """

    def __init__(
        self,
        device: torch.device | str,
        warmup_steps: int,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.device = torch.device(device)
        self.warmup_steps = warmup_steps
        self._clock = clock
        self._steps_in_run = 0
        self._start_interval(self._clock())

    def _start_interval(self, now: float) -> None:
        self._interval_start = now
        self._mark = now
        self._steps = 0
        self._data_wait_s = 0.0
        self._compute_s = 0.0
        self._loss_names: tuple[str, ...] | None = None
        self._loss_sums: torch.Tensor | None = None  # [components], on the device
        self._finite_steps: torch.Tensor | None = None
        # Throughput window: from the end of the last warm-up step (or the interval start) to summary().
        self._throughput_start = now if self._steps_in_run >= self.warmup_steps else None
        self._throughput_images = 0

    def data_done(self, wait_s: float) -> None:
        """The batch arrived after `wait_s` seconds blocked on the loader; compute starts now."""
        self._data_wait_s += wait_s
        self._mark = self._clock()

    def step_done(self, losses: Mapping[str, torch.Tensor], images: int) -> None:
        """Forward and backward are done; `losses` (scalar tensors) are summed on their device, no sync."""
        now = self._clock()
        self._add_losses(losses)
        self._compute_s += now - self._mark
        self._mark = now
        self._steps += 1
        self._steps_in_run += 1
        if self._throughput_start is not None:
            self._throughput_images += images
        elif self._steps_in_run == self.warmup_steps:
            self._throughput_start = now

    def _add_losses(self, losses: Mapping[str, torch.Tensor]) -> None:
        names = tuple(losses)
        if self._loss_names is not None and names != self._loss_names:
            raise ValueError(f"loss components changed within an interval: {self._loss_names} to {names}")
        self._loss_names = names
        values = torch.stack([value.detach().float().reshape(()) for value in losses.values()])
        finite = torch.isfinite(values).all()
        values = torch.where(finite, values, torch.zeros_like(values))
        if self._loss_sums is None:
            self._loss_sums, self._finite_steps = values, finite.to(torch.int64)
        else:
            self._loss_sums += values
            self._finite_steps += finite

    def summary(self, sync_fn: Callable[[], None] | None = None) -> dict[str, float]:
        """Close the interval and return its means; {} if no step was recorded. Starts the next interval.

        `sync_fn` (default: torch.cuda.synchronize on a CUDA device, else nothing) makes the wall time include
        the queued GPU work. This is the interval's one host sync.
        """
        if sync_fn is None:
            sync_fn = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else _no_op
        sync_fn()
        now = self._clock()
        if self._steps == 0:
            self._start_interval(now)
            return {}
        wall_s = now - self._interval_start
        values: dict[str, float] = {}
        if self._loss_sums is not None and self._finite_steps is not None and self._loss_names is not None:
            *loss_sums, finite_steps = torch.cat([self._loss_sums, self._finite_steps.float()[None]]).tolist()
            if finite_steps > 0:
                for name, loss_sum in zip(self._loss_names, loss_sums, strict=True):
                    values[f"losses/{name}"] = loss_sum / finite_steps
                values["loss"] = sum(loss_sums) / finite_steps
            values["nonfinite_steps"] = self._steps - int(finite_steps)
        throughput_start = self._throughput_start
        if throughput_start is not None and self._throughput_images > 0 and now > throughput_start:
            values["images_per_s"] = self._throughput_images / (now - throughput_start)
        values["data_wait_share"] = self._data_wait_s / wall_s if wall_s > 0 else 0.0
        values["step_time_s"] = wall_s / self._steps
        values["compute_time_s"] = self._compute_s / self._steps
        if self.device.type == "cuda":
            values["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start_interval(now)
        return values


def _no_op() -> None:
    pass


class MetricsLogger:
    """Writes records to run_dir/metrics.jsonl (one JSON object a line), the console and, if given, wandb.

    Train and eval records have "kind" (train | eval), "step", "epoch", "images_seen" and their values; events
    have "kind": "event", "event" and the fields given (pass step=). All have "time" (unix seconds). The file
    is appended to, so after a resume it can hold a step twice: readers should keep the last record per
    (kind, split, step). Non-finite floats are written as the strings "nan", "inf", "-inf" (valid JSON).
    Train records also carry the GPU means from `gpu_stats` (keys gpu/{index}/...) when it is given.
    On the console an evaluation is one line of its summary metrics, then its per-class metrics (AP/<class>,
    AP50/<class>, gt_boxes/<class>) as a table.
    wandb gets train values as train/<name>, GPU means as gpu/..., eval metrics as eval/<split>/<name>, an
    evaluation's figures as images plots/<file stem> (pr_curves_test, ...), plus "step" and "images_seen", at
    wandb step `step`; events (except those logged with to_wandb) and string values are not sent. wandb ignores
    a step lower than one it already has, so steps replayed after a resume appear once there. An evaluation of
    earlier weights (best.pt's test metrics after training) goes out at this process's latest wandb step,
    placed on the charts by its own "step" value.
    With enabled=False (ranks other than 0) every method does nothing and no file is opened.
    """

    def __init__(
        self,
        run_dir: Path,
        enabled: bool = True,
        wandb_run: Any = None,
        gpu_stats: GpuStatsSampler | None = None,
        print_fn: Callable[[str], None] | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE_NAME
        self.wandb_run = wandb_run
        self._gpu_stats = gpu_stats
        self._print = print_fn or (lambda line: print(line, flush=True))
        self._images_seen: int | None = None
        self._wandb_step = 0  # the latest step this process logged to wandb
        self._file: TextIO | None = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")

    def log_train(self, step: int, epoch: int, images_seen: int, values: Mapping[str, Any]) -> None:
        """One training interval. `values` is IntervalMeter.summary() plus e.g. "lr" and "phase"."""
        if not self.enabled:
            return
        self._images_seen = images_seen
        gpu_values = self._gpu_stats.snapshot() if self._gpu_stats is not None else {}
        record = {"kind": "train", "step": step, "epoch": epoch, "images_seen": images_seen}
        self._write({**record, **values, **gpu_values})
        self._print(_train_line(step, epoch, values))
        self._log_wandb(step, images_seen, {**_flatten("train", values), **gpu_values})

    def log_eval(
        self,
        step: int,
        epoch: int,
        split: str,
        metrics: Mapping[str, Any],
        images_seen: int | None = None,
        plots: Mapping[str, Path] | None = None,
    ) -> None:
        """Evaluation results of one split; images_seen defaults to the last value given to log_train. `plots`
        are the evaluation's PNG files (train/eval_plots.py), already written."""
        if not self.enabled:
            return
        images_seen = self._images_seen if images_seen is None else images_seen
        record = {"kind": "eval", "split": split, "step": step, "epoch": epoch, "images_seen": images_seen}
        self._write({**record, **metrics})
        # Per-class values ("AP/bottle") would make the line unreadable: they get a table of their own.
        shown = " ".join(
            f"{name} {_format_number(value)}"
            for name, value in metrics.items()
            if "/" not in name and not isinstance(value, Mapping | list | tuple)
        )
        self._print(f"eval {split} step {step} epoch {epoch}: {shown}")
        per_class = per_class_metrics(metrics)
        if per_class:
            self._print(_per_class_table(per_class))
        if plots:
            self._print(f"plots: {', '.join(str(path) for path in plots.values())}")
        images = wandb_images({f"plots/{path.stem}": path for path in (plots or {}).values()}, self.wandb_run)
        self._log_wandb(step, images_seen, {**_flatten(f"eval/{split}", metrics), **images})

    def log_event(self, name: str, *, to_wandb: bool = False, **fields: Any) -> None:
        """Something that happened once: a phase change, a skipped non-finite step, a resume. With `to_wandb`
        (an event worth a mark on the charts: early stopping) its numeric fields go to wandb too, as
        event/<name>/<field> at its `step` field."""
        if not self.enabled:
            return
        self._write({"kind": "event", "event": name, **fields})
        details = " ".join(f"{key}={_format_number(value)}" for key, value in fields.items())
        self._print(f"[{name}] {details}".rstrip())
        if to_wandb:
            values = {key: value for key, value in fields.items() if key != "step"}
            self._log_wandb(fields["step"], None, _flatten(f"event/{name}", values))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def _write(self, record: Mapping[str, Any]) -> None:
        record = {**record, "time": time.time()}
        assert self._file is not None  # _write is only reached when enabled
        self._file.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        self._file.flush()

    def _log_wandb(self, step: int, images_seen: int | None, values: dict[str, Any]) -> None:
        if self.wandb_run is None:
            return
        numeric = {key: value for key, value in values.items() if not isinstance(value, str)}
        numeric["step"] = step
        if images_seen is not None:
            numeric["images_seen"] = images_seen
        self._wandb_step = max(self._wandb_step, step)
        self.wandb_run.log(numeric, step=self._wandb_step)


def _train_line(step: int, epoch: int, values: Mapping[str, Any]) -> str:
    parts = [f"step {step}", f"epoch {epoch}"]
    if "loss" in values:
        parts.append(f"loss {values['loss']:.4f}")
    if "lr" in values:
        parts.append(f"lr {values['lr']:.2e}")
    if "images_per_s" in values:
        parts.append(f"img/s {values['images_per_s']:.1f}")
    if "data_wait_share" in values:
        parts.append(f"data {values['data_wait_share']:.0%}")
    if "phase" in values:
        parts.append(f"phase {values['phase']}")
    return " | ".join(parts)


def _per_class_table(per_class: Mapping[str, Mapping[str, Any]]) -> str:
    """Aligned columns: class, then each of PER_CLASS_METRICS that an evaluation reported; nan = undefined."""
    columns = [metric for metric in PER_CLASS_METRICS if any(metric in row for row in per_class.values())]
    width = max(len("class"), *(len(name) for name in per_class))
    lines = [f"{'class':<{width}}" + "".join(f"{column:>10}" for column in columns)]
    for name, row in per_class.items():
        cells = (row.get(column, "") for column in columns)
        lines.append(f"{name:<{width}}" + "".join(
            f"{cell:>10.3f}" if isinstance(cell, float) else f"{cell!s:>10}" for cell in cells))
    return "\n".join(lines)


def _format_number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _flatten(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(name, value))
        else:
            flat[name] = value
    return flat


def _json_safe(value: Any) -> Any:
    """Tensors and numpy scalars to Python numbers, Paths to str, non-finite floats to strings."""
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, torch.Tensor):
        return _json_safe(value.tolist())
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return _json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value
