"""The scaling benchmark's outputs: the rows of its table, as CSV, as markdown with the set-up, and as a plot."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from pathlib import Path

from scaling_runs import Result

STRATEGIES = ("single", "dp", "ddp")
CSV_COLUMNS = (
    "strategy", "devices", "device_type", "global_batch", "per_device_batch", "images_per_s",
    "images_per_s_repeats", "speedup", "efficiency", "data_wait_share", "peak_memory_mb",
    "threads_per_process", "device_names", "driver", "interconnect", "status",
)


def table_rows(
    results: Sequence[Result], global_batch: int, on_gpu: bool, facts: dict[str, str]
) -> list[dict]:
    """Speed-up = images/s / single's images/s; efficiency = speed-up / devices."""
    single = next((r.images_per_s for r in results if r.case.strategy == "single"), None)
    rows = []
    for result in results:
        rate = result.images_per_s
        speedup = rate / single if rate is not None and single else None
        rows.append(
            {
                "strategy": result.case.strategy,
                "devices": result.case.devices,
                "device_type": "cuda" if on_gpu else "cpu",
                "global_batch": global_batch,
                "per_device_batch": result.per_device_batch,
                "images_per_s": rate,
                "images_per_s_repeats": ";".join(f"{value:.4f}" for value in result.rates),
                "speedup": speedup,
                "efficiency": speedup / result.case.devices if speedup is not None else None,
                "data_wait_share": statistics.median(result.data_wait_shares)
                if result.data_wait_shares
                else None,
                "peak_memory_mb": result.peak_memory_mb,
                "threads_per_process": result.threads_per_process,
                **facts,
                "status": result.failure or "ok",
            }
        )
    return rows


def write_csv(rows: Sequence[dict], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if value is None else value for key, value in row.items()})


def _cell(value, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def write_markdown(rows: Sequence[dict], path: Path, setup: dict[str, str], on_gpu: bool) -> None:
    unit = "GPUs" if on_gpu else "CPU devices"
    lines = ["# Scaling benchmark", ""]
    if not on_gpu:
        lines += [
            "**CPU figures.** No GPU was visible: the matrix ran on CPU processes (DDP over gloo) to test "
            "the harness. They say nothing about GPU scaling; run the same command on a GPU machine for "
            "those.",
            "",
        ]
    lines += [f"- {key}: {value}" for key, value in setup.items()]
    lines += [
        "",
        f"| strategy | {unit} | global batch | per-device batch | images/s | speed-up | scaling efficiency "
        "| data-wait share | peak memory per GPU (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        rate = _cell(row["images_per_s"]) if row["status"] == "ok" else f"failed: {row['status']}"
        memory = "n/a (CPU)" if not on_gpu else _cell(row["peak_memory_mb"], 0)
        share = None if row["data_wait_share"] is None else 100 * row["data_wait_share"]
        efficiency = None if row["efficiency"] is None else 100 * row["efficiency"]
        lines.append(
            f"| {row['strategy']} | {row['devices']} | {row['global_batch']} | {row['per_device_batch']} "
            f"| {rate} | {_cell(row['speedup'], 2, 'x')} | {_cell(efficiency, 0, '%')} "
            f"| {_cell(share, 1, '%')} | {memory} |"
        )
    lines += [
        "",
        "Notes:",
        "- images/s: the whole job's images per second over the timed steps only (warm-up excluded; the "
        "window ends on a device synchronisation), the median of the repeats (all repeats in scaling.csv).",
        "- speed-up = images/s / images/s of `single`; scaling efficiency = speed-up / devices. The global "
        "batch is the same in every row, so this is strong scaling.",
        "- data-wait share: the part of rank 0's timed wall time spent waiting for the data loader.",
        "- peak memory: torch.cuda.max_memory_allocated on rank 0 (GPU 0 under DataParallel, which also "
        "gathers the outputs), the largest over the repeats.",
    ]
    if not on_gpu:
        lines.append(
            "- `dp` on the CPU: DataParallel has no GPUs to split the batch over and just calls the "
            "module, so it counts as one device and measures the wrapper's overhead only."
        )
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: Sequence[dict], path: Path, on_gpu: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    measured = [row for row in rows if row["images_per_s"] is not None]
    single = next((row["images_per_s"] for row in measured if row["strategy"] == "single"), None)
    most = max(row["devices"] for row in rows)
    if single is not None:
        axes.plot([1, most], [single, single * most], "k--", label="ideal linear (single x devices)")
    for strategy, marker in zip(STRATEGIES, "os^", strict=True):
        points = sorted(
            (row["devices"], row["images_per_s"]) for row in measured if row["strategy"] == strategy
        )
        if points:
            axes.plot(*zip(*points, strict=True), marker=marker, label=strategy)
    axes.set_xlabel("GPUs" if on_gpu else "CPU processes (ddp) / devices")
    axes.set_ylabel("images/s (timed steps, median)")
    axes.set_xticks(range(1, most + 1))
    axes.set_title("Scaling at a fixed global batch" + ("" if on_gpu else " (CPU figures)"))
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # nothing to label when every case failed
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
