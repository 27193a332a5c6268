"""Split assignment: disjoint, reproducible, stable when images are added, independent of input order."""

import random

import pytest

from data_prep.splits import SplitSpec, assign_splits, hash_order, parse_splits, subsample, unit_value


def id_keys(ids) -> dict[int, str]:
    return {image_id: str(image_id) for image_id in ids}


def test_parse_fractions_and_counts():
    assert parse_splits("train=0.8,val=0.1,test=0.1") == SplitSpec(("train", "val", "test"), fractions=(0.8, 0.1, 0.1))
    assert parse_splits("train=1600, val=200") == SplitSpec(("train", "val"), counts=(1600, 200))


@pytest.mark.parametrize("text", [
    "train=0.8,val=0.1",  # does not sum to 1
    "train=0.8,val=0.1,train=0.1",  # a name twice
    "train=0.5,val=100",  # fractions and counts mixed
    "train=0,val=1",
    "train=10,val=0",
    "train-a=0.5,val=0.5",  # not usable in a shard file name
    "train",
])
def test_parse_rejects_bad_specs(text):
    with pytest.raises(ValueError, match="--splits"):
        parse_splits(text)


def test_unit_value_is_uniform_and_seeded():
    values = [unit_value(0, str(i)) for i in range(20000)]
    assert all(0 <= v < 1 for v in values)
    assert abs(sum(values) / len(values) - 0.5) < 0.01
    assert sum(v < 0.1 for v in values) == pytest.approx(2000, abs=150)
    assert unit_value(0, "7") == unit_value(0, "7") != unit_value(1, "7")
    assert unit_value(0, "7") != unit_value(0, "7", salt="subsample:")


def test_fractions_are_disjoint_complete_and_stable_when_images_are_added():
    spec = parse_splits("train=0.8,val=0.1,test=0.1")
    small, leftover = assign_splits(id_keys(range(1000)), spec, seed=3)
    assert leftover == []
    assert sorted(i for ids in small.values() for i in ids) == list(range(1000))
    assert len(small["train"]) == pytest.approx(800, abs=60)
    assert len(small["val"]) == pytest.approx(100, abs=35)
    large, _ = assign_splits(id_keys(range(3000)), spec, seed=3)
    for name in spec.names:
        assert [i for i in large[name] if i < 1000] == small[name]


def test_assignment_does_not_depend_on_input_order():
    ids = list(range(500))
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    for text in ("train=0.7,val=0.3", "train=300,val=100,test=50"):
        spec = parse_splits(text)
        assert assign_splits(id_keys(ids), spec, seed=0) == assign_splits(id_keys(shuffled), spec, seed=0)


def test_counts_take_images_in_hash_order():
    spec = parse_splits("train=60,val=25,test=10")
    splits, leftover = assign_splits(id_keys(range(100)), spec, seed=0)
    assert [len(splits[n]) for n in spec.names] == [60, 25, 10]
    assert splits["train"] + splits["val"] + splits["test"] + leftover == hash_order(id_keys(range(100)), seed=0)
    assert len(leftover) == 5


def test_counts_beyond_the_images_leave_the_last_splits_short():
    splits, leftover = assign_splits(id_keys(range(10)), parse_splits("train=8,val=5"), seed=0)
    assert (len(splits["train"]), len(splits["val"]), leftover) == (8, 2, [])


def test_split_order_is_the_hash_order_and_changes_with_the_seed():
    spec = parse_splits("train=1")
    splits, _ = assign_splits(id_keys(range(200)), spec, seed=0)
    values = [unit_value(0, str(i)) for i in splits["train"]]
    assert values == sorted(values)
    assert splits["train"] != list(range(200))
    assert assign_splits(id_keys(range(200)), spec, seed=1)[0]["train"] != splits["train"]


def test_subsample_is_reproducible_and_not_the_start_of_the_split_order():
    keys = id_keys(range(5000))
    drawn = subsample(keys, 200, seed=0)
    assert len(drawn) == 200
    assert drawn == subsample(dict(reversed(keys.items())), 200, seed=0)
    assert drawn != subsample(keys, 200, seed=1)
    assert drawn != set(hash_order(keys, seed=0)[:200])
    assert subsample(keys, 300, seed=0) >= drawn  # a larger subsample contains the smaller one


def test_content_keys_give_a_split_per_content():
    keys = {1: "aa" * 32, 2: "bb" * 32, 3: "aa" * 32}
    order = hash_order(keys, seed=0)
    assert abs(order.index(1) - order.index(3)) == 1  # same key, same value: neighbours, tie broken by id
    assert order.index(1) < order.index(3)


@pytest.mark.parametrize("text", ["train=1.0,val=0", "train=1.0,val=0.0", "train=100,val=0"])
def test_a_zero_share_says_how_to_have_no_such_split(text):
    with pytest.raises(ValueError, match=r"left out .* --splits train=1\.0 for no val .*eval\.every_epochs=0"):
        parse_splits(text)
