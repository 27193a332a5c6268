"""improve.class_growth: rows follow their category id when a new class shifts the labels."""

import pytest
import torch
from torchvision.models.detection.retinanet import RetinaNetClassificationHead

from data_prep.class_list import ClassList
from improve.class_growth import grow_state_dict, label_mapping, needs_growth
from train.config import ModelConfig
from train.model import build_model

SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"

# data_prep numbers labels in order of category id: the new "can" (id 4) pushes shoe and bag up by one.
OLD = ClassList.from_names({1: "bottle", 3: "box", 7: "shoe", 9: "bag"})  # labels 1, 2, 3, 4
NEW = ClassList.union([OLD, ClassList.from_names({4: "can"})], ["old.json", "new.json"])


def test_union_is_labelled_in_order_of_category_id_and_maps_old_labels_by_id():
    assert [(c.label, c.category_id, c.name) for c in NEW] == [
        (1, 1, "bottle"), (2, 3, "box"), (3, 4, "can"), (4, 7, "shoe"), (5, 9, "bag")]
    assert label_mapping(OLD, NEW) == {0: 0, 1: 1, 2: 2, 3: 4, 4: 5}
    assert needs_growth(OLD, NEW) and not needs_growth(NEW, ClassList.from_json(NEW.to_json(), source="copy"))


def test_faster_rcnn_predictor_keeps_each_class_row_by_category_id():
    torch.manual_seed(0)
    old_model, _ = build_model(ModelConfig(SMALL, frozen_batchnorm=False), len(OLD) + 1)
    new_model, _ = build_model(ModelConfig(SMALL, frozen_batchnorm=False), len(NEW) + 1)
    old_state, fresh_state = old_model.state_dict(), new_model.state_dict()

    grown, report = grow_state_dict(old_state, fresh_state, OLD, NEW, "fasterrcnn_mobilenet_v3_large_320_fpn")

    assert report.kept_category_ids == [1, 3, 7, 9] and report.new_category_ids == [4]
    assert sorted(report.tensors) == sorted(f"roi_heads.box_predictor.{layer}.{kind}"
                                            for layer in ("cls_score", "bbox_pred")
                                            for kind in ("weight", "bias"))
    cls_old, cls_new = old_state["roi_heads.box_predictor.cls_score.weight"], grown[
        "roi_heads.box_predictor.cls_score.weight"]
    box_old, box_new = old_state["roi_heads.box_predictor.bbox_pred.weight"], grown[
        "roi_heads.box_predictor.bbox_pred.weight"]
    assert cls_new.shape == (6, cls_old.shape[1]) and box_new.shape == (24, box_old.shape[1])
    for old_label, new_label in {0: 0, 1: 1, 2: 2, 3: 4, 4: 5}.items():  # shoe 3 -> 4, bag 4 -> 5
        assert torch.equal(cls_new[new_label], cls_old[old_label])
        assert torch.equal(box_new[4 * new_label:4 * new_label + 4], box_old[4 * old_label:4 * old_label + 4])
    fresh_can = fresh_state["roi_heads.box_predictor.cls_score.weight"][3]
    assert torch.equal(cls_new[3], fresh_can)  # the new class keeps its fresh initialisation
    assert all(torch.equal(grown[key], old_state[key]) for key in old_state if "box_predictor" not in key)

    # the grown model loads strictly and computes the old logits for every old class, by category id
    new_model.load_state_dict(grown)
    features = torch.randn(5, cls_old.shape[1])
    old_logits, old_deltas = old_model.roi_heads.box_predictor(features)
    new_logits, new_deltas = new_model.roi_heads.box_predictor(features)
    assert torch.allclose(new_logits[:, [0, 1, 2, 4, 5]], old_logits)
    assert torch.allclose(new_deltas.view(5, 6, 4)[:, [0, 1, 2, 4, 5]], old_deltas.view(5, 5, 4))


def test_anchor_major_classification_head_keeps_rows_for_every_anchor():
    torch.manual_seed(0)
    old_head = RetinaNetClassificationHead(in_channels=32, num_anchors=3, num_classes=len(OLD) + 1)
    new_head = RetinaNetClassificationHead(in_channels=32, num_anchors=3, num_classes=len(NEW) + 1)
    with torch.no_grad():  # torchvision starts every class at the same prior: make each row distinct
        for parameter in [*old_head.parameters(), *new_head.parameters()]:
            parameter.normal_()
    prefix = "head.classification_head."
    old_state = {prefix + key: value for key, value in old_head.state_dict().items()}
    fresh_state = {prefix + key: value for key, value in new_head.state_dict().items()}

    grown, report = grow_state_dict(old_state, fresh_state, OLD, NEW, "retinanet_resnet50_fpn")

    assert sorted(report.tensors) == [prefix + "cls_logits.bias", prefix + "cls_logits.weight"]
    new_head.load_state_dict({key[len(prefix):]: value for key, value in grown.items()})
    features = [torch.randn(2, 32, 4, 4), torch.randn(2, 32, 2, 2)]
    old_scores, new_scores = old_head(features), new_head(features)  # [N, anchors * H * W, classes]
    assert old_scores.std(dim=-1).min() > 0.1
    assert torch.allclose(new_scores[..., [0, 1, 2, 4, 5]], old_scores)


def test_removing_a_class_or_renaming_one_is_refused():
    with pytest.raises(ValueError, match=r"category 9 \('bag'\) of the old model is not in the new class"):
        label_mapping(OLD, ClassList.from_json([c for c in NEW.to_json() if c["category_id"] != 9], source="new"))
    renamed = ClassList.from_names({7: "boot"})
    with pytest.raises(ValueError, match="new.json: category id 7 is 'boot' here but 'shoe' in old.json"):
        ClassList.union([OLD, renamed], ["old.json", "new.json"])


def test_a_class_dependent_tensor_of_unknown_layout_is_an_error_naming_the_architecture():
    key = "head.classification_head.extra.weight"
    old_state, fresh_state = {key: torch.zeros(5, 2)}, {key: torch.zeros(6, 2)}
    with pytest.raises(ValueError, match=f"my_detector: cannot grow class-dependent tensor {key}"):
        grow_state_dict(old_state, fresh_state, OLD, NEW, "my_detector")
