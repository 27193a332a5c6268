"""data_prep.class_list: one class list, labelled 1..K by category id, read from and written to its JSON form."""

import pickle

import pytest
import torch

from data_prep.class_list import Category, ClassList

# As a manifest or checkpoint stores it: label order, sparse COCO category ids.
MANIFEST_CATEGORIES = [{"label": 1, "category_id": 3, "name": "bottle"},
                       {"label": 2, "category_id": 17, "name": "box"},
                       {"label": 3, "category_id": 90, "name": "can"}]


def test_built_from_a_manifest_list():
    classes = ClassList.from_json(MANIFEST_CATEGORIES, source="manifest.json")
    assert list(classes) == [Category(1, 3, "bottle"), Category(2, 17, "box"), Category(3, 90, "can")]
    assert len(classes) == 3 and classes.num_classes == 4  # background 0 included
    assert classes.names == ["bottle", "box", "can"] and classes.category_ids == (3, 17, 90)
    assert classes.label_of(17) == 2 and classes.label_by_category_id() == {3: 1, 17: 2, 90: 3}
    assert classes.category_of(3) == Category(3, 90, "can") and classes.category_of(3).name == "can"
    assert 90 in classes and 4 not in classes
    for missing_label in (0, 4):  # background has no category; nor has a label beyond K
        with pytest.raises(KeyError):
            classes.category_of(missing_label)
    with pytest.raises(KeyError):
        classes.label_of(4)


def test_entries_in_any_order_are_read_in_label_order():
    classes = ClassList.from_json(list(reversed(MANIFEST_CATEGORIES)), source="manifest.json")
    assert classes == ClassList.from_json(MANIFEST_CATEGORIES, source="manifest.json")


def test_new_lists_are_labelled_in_order_of_category_id():
    classes = ClassList.from_names({90: "can", 3: "bottle", 17: "box"})
    assert classes.to_json() == MANIFEST_CATEGORIES


def test_union_with_a_new_class_relabels_by_category_id():
    base = ClassList.from_json(MANIFEST_CATEGORIES, source="base.pt")
    grown = ClassList.union([base, ClassList.from_names({5: "shoe", 3: "bottle"})], ["base.pt", "new/manifest.json"])
    assert [(c.label, c.category_id, c.name) for c in grown] == [
        (1, 3, "bottle"), (2, 5, "shoe"), (3, 17, "box"), (4, 90, "can")]
    assert ClassList.union([base], ["base.pt"]) == base


def test_union_with_a_name_conflict_names_both_sources():
    base = ClassList.from_json(MANIFEST_CATEGORIES, source="base.pt")
    renamed = ClassList.from_names({3: "flask"})
    with pytest.raises(ValueError, match="new/manifest.json: category id 3 is 'flask' here but 'bottle' in base.pt"):
        ClassList.union([base, renamed], ["base.pt", "new/manifest.json"])


def test_json_round_trip_keeps_the_on_disk_form(tmp_path):
    classes = ClassList.from_json(MANIFEST_CATEGORIES, source="manifest.json")
    assert classes.to_json() == MANIFEST_CATEGORIES
    assert [list(entry) for entry in classes.to_json()] == [["label", "category_id", "name"]] * 3  # key order
    assert ClassList.from_json(classes.to_json(), source="again") == classes
    torch.save({"categories": classes.to_json()}, tmp_path / "checkpoint.pt")  # as checkpoints hold it
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ClassList.from_json(state["categories"], source="checkpoint.pt") == classes
    copy = pickle.loads(pickle.dumps(classes))  # as DataLoader and data_prep workers receive it
    assert copy == classes and copy.label_of(90) == 3


@pytest.mark.parametrize("entries, message", [
    ({"label": 1}, "manifest.json: 'categories' must be a JSON list"),
    ([{"label": 1, "name": "bottle"}], r"manifest.json: missing key 'categories\[0\].category_id'"),
    ([{"label": "one", "category_id": 3, "name": "bottle"}], r"manifest.json: 'categories\[0\]': label"),
    ([{"label": 1, "category_id": 3, "name": "bottle"}, {"label": 3, "category_id": 4, "name": "box"}],
     r"manifest.json: categories: labels must run 1..2 in order, got \[1, 3\]"),
    ([{"label": 1, "category_id": 3, "name": "bottle"}, {"label": 2, "category_id": 3, "name": "box"}],
     r"manifest.json: categories: category ids \[3\] appear more than once"),
])
def test_a_broken_list_is_an_error_naming_its_source(entries, message):
    with pytest.raises(ValueError, match=message):
        ClassList.from_json(entries, source="manifest.json")
