"""Fixed, disjoint, reproducible split assignment from a stable key per image.

Every image gets a value in [0, 1) from sha256(f"{seed}:{key}"), where the key is its image id or the sha256
of its file bytes. Fractions threshold that value, so an image keeps its split when other images are added
or removed; counts take images in order of the value. Nothing depends on input order or worker count.
Within a split, samples are ordered by the same value, which mixes the shards.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

SPLIT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # becomes part of shard file names
FRACTION_TOLERANCE = 1e-6


@dataclass(frozen=True)
class SplitSpec:
    """Named splits with either fractions (summing to 1) or image counts, in the order given."""

    names: tuple[str, ...]
    fractions: tuple[float, ...] | None = None
    counts: tuple[int, ...] | None = None


NO_EMPTY_SPLITS = ("a split with no images is left out rather than given a zero share: e.g. --splits train=1.0 "
                   "for no val (train then with eval.every_epochs=0)")


def parse_splits(text: str) -> SplitSpec:
    """`train=0.8,val=0.1,test=0.1` (fractions) or `train=1600,val=200,test=200` (counts)."""
    names, values = [], []
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or not SPLIT_NAME.match(name):
            raise ValueError(f"--splits: '{part}' is not NAME=VALUE with a name like train or val_2")
        if name in names:
            raise ValueError(f"--splits: split '{name}' named twice")
        names.append(name)
        values.append(value.strip())
    if all(re.fullmatch(r"\d+", v) for v in values):
        counts = tuple(int(v) for v in values)
        if any(c <= 0 for c in counts):
            raise ValueError(f"--splits: counts must be positive: '{text}'; {NO_EMPTY_SPLITS}")
        return SplitSpec(tuple(names), counts=counts)
    try:
        fractions = tuple(float(v) for v in values)
    except ValueError:
        raise ValueError(f"--splits: values must be all fractions or all counts: '{text}'") from None
    if any(f == 0 for f in fractions):
        raise ValueError(f"--splits: '{text}': {NO_EMPTY_SPLITS}")
    if any(not 0 < f <= 1 for f in fractions) or abs(sum(fractions) - 1) > FRACTION_TOLERANCE:
        raise ValueError(f"--splits: fractions must be in (0, 1] and sum to 1: '{text}'")
    return SplitSpec(tuple(names), fractions=fractions)


def unit_value(seed: int, key: str, salt: str = "") -> float:
    """A uniform value in [0, 1) that depends only on (salt, seed, key)."""
    digest = hashlib.sha256(f"{salt}{seed}:{key}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2**53  # 53 bits: exact in a float, never 1.0


def hash_order(keys: dict[int, str], seed: int) -> list[int]:
    """Image ids in order of their split value (ties, only possible for equal keys, by image id)."""
    return sorted(keys, key=lambda image_id: (unit_value(seed, keys[image_id]), image_id))


def subsample(keys: dict[int, str], count: int, seed: int) -> set[int]:
    """The `count` image ids with the lowest value under a salt of their own, so that the subsample is not
    simply the start of one split's order."""
    order = sorted(keys, key=lambda image_id: (unit_value(seed, keys[image_id], salt="subsample:"), image_id))
    return set(order[:count])


def assign_splits(keys: dict[int, str], spec: SplitSpec, seed: int) -> tuple[dict[str, list[int]], list[int]]:
    """Split name -> image ids in sample order, plus the ids no split takes (counts summing to fewer)."""
    order = hash_order(keys, seed)
    splits: dict[str, list[int]] = {name: [] for name in spec.names}
    if spec.counts is not None:
        start = 0
        for name, count in zip(spec.names, spec.counts, strict=True):
            splits[name] = order[start:start + count]
            start += count
        return splits, order[start:]
    bounds, total = [], 0.0
    for fraction in spec.fractions:
        total += fraction
        bounds.append(total)
    bounds[-1] = 1.0  # the last split takes everything above the previous bound, whatever rounding did
    for image_id in order:
        value = unit_value(seed, keys[image_id])
        name = next(name for name, bound in zip(spec.names, bounds, strict=True) if value < bound)
        splits[name].append(image_id)
    return splits, []
