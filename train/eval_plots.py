"""The figures of a test evaluation, as PNG files beside metrics.jsonl: PR curves per class, the confusion matrix
and AP per class.

The numbers come from elsewhere (train/pr_curves.py: COCOeval's precision array; train/confusion.py: the counts)
so that tests can check them without reading pixels; this module only draws them, with matplotlib's Agg canvas
(no pyplot: no global figure state, nothing that needs a display).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.atomic_io import write_atomically
from train.confusion import IOU_THRESHOLD
from train.pr_curves import PrecisionRecall

PLOT_NAMES = ("pr_curves", "confusion_matrix", "ap_per_class")
MAX_ANNOTATED_CLASSES = 30  # beyond this the matrix's cells are too small for their counts
DPI = 100


@dataclass(frozen=True)
class EvalPlots:
    """Where one evaluation's figures go (`directory`/<name>_<tag>.png) and the confusion matrix's score."""

    directory: Path
    tag: str  # the split, plus "_best" for best.pt's weights: pr_curves_test_best.png
    confusion_score: float

    def paths(self) -> dict[str, Path]:
        return {name: Path(self.directory) / f"{name}_{self.tag}.png" for name in PLOT_NAMES}


def write_eval_plots(plots: EvalPlots, curves: PrecisionRecall, confusion: np.ndarray) -> dict[str, Path]:
    """Draw the three figures and write them atomically; their paths by name."""
    figures = {
        "pr_curves": draw_pr_curves(curves),
        "confusion_matrix": draw_confusion_matrix(confusion, curves.class_names, plots.confusion_score),
        "ap_per_class": draw_ap_per_class(curves, gt_boxes=confusion[:-1].sum(axis=1)),
    }
    paths = plots.paths()
    for name, figure in figures.items():
        write_atomically(paths[name], lambda file, figure=figure: figure.savefig(file, format="png", dpi=DPI))
    return paths


def draw_pr_curves(curves: PrecisionRecall) -> Figure:
    """Precision against recall per class, at IoU 0.5 and averaged over 0.5:0.95, with the mean over classes."""
    figure = _figure(12, 5.5)
    axes = figure.subplots(1, 2, sharey=True)
    colors = _class_colors(len(curves.class_names))
    panels = ((curves.precision_50, curves.ap50, "IoU 0.5", "AP50"),
              (curves.precision_50_95, curves.ap, "IoU 0.5:0.95 (mean)", "AP"))
    for ax, (precision, ap, title, metric) in zip(axes, panels, strict=True):
        for k in np.flatnonzero(curves.defined):
            ax.plot(curves.recall, precision[k], color=colors[k], linewidth=1.2,
                    label=f"{curves.class_names[k]} {ap[k]:.3f}")
        if curves.defined.any():
            mean = precision[curves.defined].mean(axis=0)
            ax.plot(curves.recall, mean, color="black", linewidth=2.5, label=f"all classes {mean.mean():.3f}")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", title=f"{title}: {metric} per class")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize="small", ncol=1 + len(curves.class_names) // 16)
    axes[0].set_ylabel("precision")
    return figure


def draw_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], score_threshold: float) -> Figure:
    """Counts in the cells; colour = the cell's share of its row (how each true class was detected)."""
    names = [*class_names, "background"]
    size = max(6.0, 0.45 * len(names) + 3)
    figure = _figure(size + 1.5, size)
    ax = figure.subplots()
    row_totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, row_totals, out=np.zeros(matrix.shape), where=row_totals > 0)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, names)
    ax.set(xlabel="detected as", ylabel="true class",
           title=f"confusion at score >= {score_threshold:g}, IoU >= {IOU_THRESHOLD:g}")
    if len(names) <= MAX_ANNOTATED_CLASSES:
        for (row, column), count in np.ndenumerate(matrix):
            if count:
                ax.text(column, row, str(count), ha="center", va="center", fontsize="small",
                        color="white" if shares[row, column] > 0.5 else "black")
    return figure


def draw_ap_per_class(curves: PrecisionRecall, gt_boxes: Sequence[int]) -> Figure:
    """AP50 and AP (0.5:0.95) of each class as bars, with the ground-truth boxes each was measured on."""
    count = len(curves.class_names)
    figure = _figure(8, max(3.0, 0.5 * count + 1.5))
    ax = figure.subplots()
    rows = np.arange(count)
    height = 0.4
    for offset, values, label in ((-height / 2, curves.ap50, "AP50"), (height / 2, curves.ap, "AP 0.5:0.95")):
        bars = ax.barh(rows + offset, np.nan_to_num(values), height=height, label=label)
        ax.bar_label(bars, labels=["no ground truth" if np.isnan(v) else f"{v:.3f}" for v in values],
                     padding=3, fontsize="small")
    ax.set_yticks(rows, [f"{name} ({boxes} boxes)" for name, boxes in zip(curves.class_names, gt_boxes,
                                                                          strict=True)])
    ax.invert_yaxis()  # the first class on top, as in the tables
    ax.set(xlim=(0, 1.15), xlabel="average precision", title="AP per class")
    ax.legend(loc="lower right")
    return figure


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _class_colors(count: int) -> list:
    palette = colormaps["tab20"] if count > 10 else colormaps["tab10"]
    return [palette(index % palette.N) for index in range(count)]
