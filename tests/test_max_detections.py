"""eval.max_detections, one cap for detections per image: it reaches the model built from the config, COCOeval's
largest maxDets, a model rebuilt from a checkpoint, extraction and the improvement round; more than 100 objects
per image are recalled only with a larger cap."""

import argparse

import pytest
import torch
from _evaluate_worker import CATEGORIES, TableDetector, local_strategy
from model_helpers import SMALL

from extract.detector import load_detector
from improve.round import DEFAULT_CONFIG, round_config
from train.checkpoint import save_checkpoint
from train.config import ModelConfig, config_to_dict, load_config, save_config
from train.evaluate import coco_evaluation, evaluate, score_detections
from train.model import build_model, model_from_checkpoint, trained_max_detections

SMALL_OVERRIDES = [f"model.name={SMALL}", "model.min_size=96", "model.max_size=128"]


def test_eval_max_detections_caps_the_model_built_from_the_config():
    cfg = load_config(None, [*SMALL_OVERRIDES, "eval.max_detections=150"])
    model, _ = build_model(cfg.model, 4, max_detections=cfg.eval.max_detections)
    assert model.roi_heads.detections_per_img == 150
    # RetinaNet, FCOS and SSD keep the cap on the model itself (SSD's own default is 200)
    ssd, _ = build_model(ModelConfig("ssdlite320_mobilenet_v3_large"), 4, max_detections=150)
    assert ssd.detections_per_img == 150
    assert load_config(None).eval.max_detections == 100  # COCO's


def test_the_old_builder_argument_is_a_config_error_naming_the_new_option(tmp_path):
    with pytest.raises(ValueError, match=r"command line: 'model.builder_kwargs.box_detections_per_img' is no longer "
                                         r"an option: set eval.max_detections instead"):
        load_config(None, ["model.builder_kwargs.box_detections_per_img=300"])
    config_file = tmp_path / "old.yaml"
    config_file.write_text("model:\n  builder_kwargs:\n    box_detections_per_img: 300\n")
    with pytest.raises(ValueError, match=f"{config_file}: 'model.builder_kwargs.box_detections_per_img'.*"
                                         "eval.max_detections"):
        load_config(config_file)
    saved = tmp_path / "saved.yaml"  # a saved config loads back: the key is not written any more
    save_config(load_config(None), saved)
    assert load_config(saved) == load_config(None)
    # a config.yaml saved before the move holds the key as null (nothing set): it still loads
    config_file.write_text("model:\n  builder_kwargs:\n    box_detections_per_img: null\n")
    assert load_config(config_file) == load_config(None)


def checkpoint_state(cfg):
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, CATEGORIES.num_classes, max_detections=cfg.eval.max_detections)
    return {"model": model.state_dict(), "categories": CATEGORIES.to_json(), "config": config_to_dict(cfg),
            "progress": {"epoch": 1, "step": 1, "best_ap": -1.0}, "world_size": 1}


def test_a_checkpoint_rebuilds_and_extracts_with_its_max_detections(tmp_path):
    state = checkpoint_state(load_config(None, [*SMALL_OVERRIDES, "eval.max_detections=150"]))
    model, _ = model_from_checkpoint(state, "run/best.pt")
    assert model.roi_heads.detections_per_img == 150

    path = tmp_path / "best.pt"
    save_checkpoint(state, path)
    detector = load_detector(path, score_threshold=0.5)
    assert detector.max_detections == 150 and detector.model.roi_heads.detections_per_img == 150
    asked = load_detector(path, score_threshold=0.5, max_detections=20)  # extract --max-detections 20
    assert asked.max_detections == 20 and asked.model.roi_heads.detections_per_img == 20


def test_a_checkpoint_from_before_the_option_keeps_its_builder_cap():
    state = checkpoint_state(load_config(None, SMALL_OVERRIDES))
    del state["config"]["eval"]["max_detections"]
    assert trained_max_detections(state) == 100  # today's default
    state["config"]["model"]["builder_kwargs"]["box_detections_per_img"] = 300
    model, model_cfg = model_from_checkpoint(state, "old/best.pt")
    assert model.roi_heads.detections_per_img == 300
    assert "box_detections_per_img" not in model_cfg.builder_kwargs.given()


def test_an_improvement_round_inherits_its_base_max_detections(tmp_path):
    trained = load_config(None, [*SMALL_OVERRIDES, "eval.max_detections=150"])
    args = argparse.Namespace(config=DEFAULT_CONFIG, overrides=[], run_dir=tmp_path / "round", base=tmp_path / "b.pt")
    cfg = round_config(args, {"config": config_to_dict(trained)}, tmp_path / "manifest.json", tmp_path / "b.pt")
    assert cfg.eval.max_detections == 150
    args.overrides = ["eval.max_detections=200"]
    cfg = round_config(args, {"config": config_to_dict(trained)}, tmp_path / "manifest.json", tmp_path / "b.pt")
    assert cfg.eval.max_detections == 200


def test_max_detections_caps_cocoeval_and_recall_beyond_100_objects():
    """One image with 150 objects, each found exactly: 100 detections per image can recall only 2/3 of them."""
    boxes = [[float(10 * (i % 15)), float(10 * (i // 15)), 8.0, 8.0] for i in range(150)]
    ground_truth = {"images": [{"id": 1, "width": 160, "height": 110}],
                    "categories": [{"id": 3, "name": "bottle"}],
                    "annotations": [{"id": i + 1, "image_id": 1, "category_id": 3, "bbox": box, "area": 64.0,
                                     "iscrowd": 0} for i, box in enumerate(boxes)]}
    detections = [{"image_id": 1, "category_id": 3, "bbox": box, "score": 1.0 - i / 1000}
                  for i, box in enumerate(boxes)]

    capped = coco_evaluation(ground_truth, detections)
    assert capped.params.maxDets == [1, 10, 100]
    uncapped = coco_evaluation(ground_truth, detections, max_detections=150)
    assert uncapped.params.maxDets == [1, 10, 150]

    at_100 = score_detections(ground_truth, detections)
    at_150 = score_detections(ground_truth, detections, max_detections=150)
    assert at_100["AR100"] == pytest.approx(100 / 150) and at_100["AP"] < 0.7
    assert at_150["AR150"] == pytest.approx(1.0) and at_150["AP"] == pytest.approx(1.0)
    assert "AR100" not in at_150


def test_evaluate_counts_max_detections_per_image(tmp_path):
    """evaluate() passes its max_detections to COCOeval: a detector returning 150 exact boxes scores 1 only then."""
    image = torch.zeros(3, 110, 160, dtype=torch.uint8)
    xyxy = torch.tensor([[10.0 * (i % 15), 10.0 * (i // 15), 10.0 * (i % 15) + 8, 10.0 * (i // 15) + 8]
                         for i in range(150)])
    target = {"boxes": xyxy, "labels": torch.ones(150, dtype=torch.int64), "image_id": 1,
              "iscrowd": torch.zeros(150, dtype=torch.int64), "area": torch.full((150,), 64.0)}
    answers = [{"boxes": xyxy, "labels": torch.ones(150, dtype=torch.int64),
                "scores": torch.linspace(1.0, 0.5, 150)}]
    batches = [([image], [target])]

    def run(**kwargs):
        return evaluate(TableDetector(answers), batches, CATEGORIES, local_strategy(), "cpu", None, **kwargs)

    assert run()["AR100"] == pytest.approx(100 / 150)
    assert run(max_detections=150)["AR150"] == pytest.approx(1.0)
