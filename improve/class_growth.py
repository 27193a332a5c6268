"""Grow a detector's class-dependent head tensors to a larger class list, keeping what was learnt per class.

data_prep numbers the classes 1..K in order of category id, so a category that appears later can shift the
labels of those after it: label 3 was "shoe" and is now "can". Rows are therefore matched by category id,
never by label. Each class-dependent tensor keeps the fresh initialisation of the new model for the new
classes, and gets the old model's rows for every class it knew, background (label 0) included.

Where the rows of a class sit depends on the head:
- class-major, `m` rows per class (row = label * m + j): Faster R-CNN's `cls_score` (m = 1) and `bbox_pred`
  (m = 4, one box delta per class);
- anchor-major, `m` anchors (row = anchor * (K + 1) + label): the `cls_logits` of RetinaNet and FCOS and
  the per-level classification convolutions of SSD / SSDlite, which reshape their output to
  [N, anchors, classes, H, W].
A class-dependent tensor of any other head is an error that names it, never a silent partial copy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from data_prep.class_list import ClassList
from train.weights import CLASS_DEPENDENT_PREFIXES

CLASS_MAJOR, ANCHOR_MAJOR = "class-major", "anchor-major"

# (key pattern, layout) for every class-dependent tensor this module knows how to grow.
HEAD_LAYOUTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$"), CLASS_MAJOR),
    (re.compile(r"^head\.classification_head\.cls_logits\.(weight|bias)$"), ANCHOR_MAJOR),
    # SSD300: module_list.N is the conv itself; SSDlite: module_list.N.1 is its pointwise conv.
    (re.compile(r"^head\.classification_head\.module_list\.\d+\.(1\.)?(weight|bias)$"), ANCHOR_MAJOR),
)


@dataclass
class GrowthReport:
    """What grow_state_dict did: category ids whose rows were copied or are new, and the tensors it grew."""

    kept_category_ids: list[int] = field(default_factory=list)
    new_category_ids: list[int] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"class growth: kept the rows of categories {self.kept_category_ids} (and background), "
                f"fresh rows for {self.new_category_ids or 'none'}, in {len(self.tensors)} tensors")


def label_mapping(old: ClassList, new: ClassList) -> dict[int, int]:
    """Old label -> new label of the same category id; background 0 -> 0. Every old category must remain."""
    mapping = {0: 0}
    for category in old:
        if category.category_id not in new:
            raise ValueError(
                f"category {category.category_id} ('{category.name}') of the old model is not in the new class "
                "list: classes can be added, not removed (build the new list with ClassList.union)"
            )
        mapping[category.label] = new.label_of(category.category_id)
    return mapping


def needs_growth(old: ClassList, new: ClassList) -> bool:
    """Whether the label -> category id maps differ (a new class, or the same classes numbered otherwise)."""
    return old.category_ids != new.category_ids


def grow_state_dict(
    old_state: Mapping[str, torch.Tensor],
    fresh_state: Mapping[str, torch.Tensor],
    old_classes: ClassList,
    new_classes: ClassList,
    architecture: str = "the model",
) -> tuple[dict[str, torch.Tensor], GrowthReport]:
    """A state dict for the model of `fresh_state` (built for `new_classes`): every tensor from `old_state`,
    except the class-dependent ones, which start from `fresh_state` and get the old rows of each category of
    `old_classes` at that category's new rows.

    Raises ValueError naming `architecture` and the tensor when a class-dependent tensor has no known
    layout or its shape does not fit the two class counts.
    """
    mapping = label_mapping(old_classes, new_classes)
    old_labels, new_labels = list(mapping), list(mapping.values())
    grown = dict(old_state)
    report = GrowthReport(
        kept_category_ids=sorted(old_classes.category_ids),
        new_category_ids=sorted(set(new_classes.category_ids) - set(old_classes.category_ids)),
    )
    for key, fresh in fresh_state.items():
        if not key.startswith(CLASS_DEPENDENT_PREFIXES) or key not in old_state:
            continue
        layout = _layout(key)
        old = old_state[key]
        if layout is None:
            if old.shape == fresh.shape:  # under a head prefix but not sized by the class count
                continue
            raise ValueError(
                f"{architecture}: cannot grow class-dependent tensor {key} {list(old.shape)} -> "
                f"{list(fresh.shape)}: its row layout is unknown (class growth supports Faster R-CNN, "
                "RetinaNet, FCOS and SSD heads)"
            )
        grown[key] = _copy_rows(key, old, fresh, layout, old_classes.num_classes, new_classes.num_classes,
                                old_labels, new_labels, architecture)
        report.tensors.append(key)
    return grown, report


def _layout(key: str) -> str | None:
    return next((layout for pattern, layout in HEAD_LAYOUTS if pattern.match(key)), None)


def _copy_rows(key, old, fresh, layout, old_classes, new_classes, old_labels, new_labels, architecture):
    per_class = old.shape[0] // old_classes
    if (old.shape[0] != per_class * old_classes or fresh.shape[0] != per_class * new_classes
            or old.shape[1:] != fresh.shape[1:]):
        raise ValueError(
            f"{architecture}: {key} has shape {list(old.shape)} in the old model and {list(fresh.shape)} in "
            f"the new one, which does not fit {old_classes} -> {new_classes} classes (background included)"
        )
    grown = fresh.detach().clone()
    rest = old.shape[1:]
    if layout == CLASS_MAJOR:  # [classes, rows per class, ...]
        old_rows = old.view(old_classes, per_class, *rest)
        grown.view(new_classes, per_class, *rest)[new_labels] = old_rows[old_labels]
    else:  # [anchors, classes, ...]
        old_rows = old.view(per_class, old_classes, *rest)
        grown.view(per_class, new_classes, *rest)[:, new_labels] = old_rows[:, old_labels]
    return grown
