"""The class list: which COCO categories a data set or a model knows, and the contiguous label of each.

Labels run 1..K, label 0 being the background that torchvision detectors reserve, so a model for this list
has K + 1 classes. Lists built here (`from_names`, `union`) number the categories in order of category id,
data_prep's rule; a list read back from a manifest or checkpoint (`from_json`) keeps the labels it was
saved with. A category keeps its id everywhere, while its label depends on the list: join two data sets or
grow a model by category id, never by label.

On disk (manifest.json, checkpoints) a class list is `[{"label", "category_id", "name"}, ...]` in label order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

JSON_KEYS = ("label", "category_id", "name")


class Category(NamedTuple):
    label: int
    category_id: int
    name: str


@dataclass(frozen=True)
class ClassList:
    """Categories in label order: `categories[i]` has label i + 1."""

    categories: tuple[Category, ...]
    _label_by_id: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        labels = [category.label for category in self.categories]
        if labels != list(range(1, len(labels) + 1)):
            raise ValueError(f"labels must run 1..{len(labels)} in order, got {labels}")
        label_by_id = {category.category_id: category.label for category in self.categories}
        if len(label_by_id) != len(self.categories):
            counts = Counter(category.category_id for category in self.categories)
            raise ValueError(f"category ids {sorted(i for i, n in counts.items() if n > 1)} appear more than once")
        object.__setattr__(self, "_label_by_id", label_by_id)

    @classmethod
    def from_names(cls, names: Mapping[int, str]) -> ClassList:
        """category id -> name, labelled 1..K in order of category id."""
        return cls(tuple(Category(label, category_id, names[category_id])
                         for label, category_id in enumerate(sorted(names), start=1)))

    @classmethod
    def from_json(cls, entries: object, source: object) -> ClassList:
        """The list saved in a manifest or checkpoint; errors name `source` and the entry."""
        if not isinstance(entries, list):
            raise ValueError(f"{source}: 'categories' must be a JSON list")
        categories = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ValueError(f"{source}: 'categories[{index}]' must be a JSON object")
            for key in JSON_KEYS:
                if key not in entry:
                    raise ValueError(f"{source}: missing key 'categories[{index}].{key}'")
            try:
                categories.append(Category(int(entry["label"]), int(entry["category_id"]), str(entry["name"])))
            except (TypeError, ValueError) as error:
                raise ValueError(f"{source}: 'categories[{index}]': label and category_id must be integers "
                                 f"({error})") from error
        try:
            return cls(tuple(sorted(categories)))
        except ValueError as error:
            raise ValueError(f"{source}: categories: {error}") from error

    def to_json(self) -> list[dict]:
        return [category._asdict() for category in self.categories]

    @classmethod
    def union(cls, class_lists: Sequence[ClassList], sources: Sequence[str]) -> ClassList:
        """Every category of every list, labelled 1..K in order of category id.

        A category id named differently in two lists is an error naming both sources (`sources[i]` names
        `class_lists[i]`).
        """
        names: dict[int, str] = {}
        first_source: dict[int, str] = {}
        for classes, source in zip(class_lists, sources, strict=True):
            for category in classes:
                known = names.setdefault(category.category_id, category.name)
                first_source.setdefault(category.category_id, source)
                if known != category.name:
                    raise ValueError(f"{source}: category id {category.category_id} is '{category.name}' here "
                                     f"but '{known}' in {first_source[category.category_id]}")
        return cls.from_names(names)

    def __iter__(self) -> Iterator[Category]:
        return iter(self.categories)

    def __len__(self) -> int:
        """K, the number of categories (background not counted)."""
        return len(self.categories)

    def __contains__(self, category_id: object) -> bool:
        return category_id in self._label_by_id

    @property
    def num_classes(self) -> int:
        """The number of classes of a torchvision detector for this list: K + 1, background included."""
        return len(self.categories) + 1

    @property
    def category_ids(self) -> tuple[int, ...]:
        """In label order."""
        return tuple(category.category_id for category in self.categories)

    @property
    def names(self) -> list[str]:
        """In label order."""
        return [category.name for category in self.categories]

    def label_of(self, category_id: int) -> int:
        """KeyError(category_id) when the list does not have it."""
        return self._label_by_id[category_id]

    def label_by_category_id(self) -> dict[int, int]:
        """category id -> label, for code that takes a plain mapping."""
        return dict(self._label_by_id)

    def category_of(self, label: int) -> Category:
        """KeyError(label) for the background label 0 and for labels beyond K."""
        if not 1 <= label <= len(self.categories):
            raise KeyError(label)
        return self.categories[label - 1]
