"""Scale augmentation (train/augment.py): boxes follow the image on hand-made samples; the reader's draws are
deterministic per (seed, epoch, sample); evaluation is never augmented; the model skips its training resize."""

import random

import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from train.augment import (
    PAD_VALUE,
    LargeScaleJitter,
    Multiscale,
    crop_and_pad,
    drop_small_boxes,
    resize,
    shortest_side_size,
)
from train.checkpoint import latest_valid_checkpoint, tensor_hash
from train.config import DataConfig, ModelConfig, load_config
from train.main import main as train_main
from train.model import build_model
from train.readers import scale_augmentation
from train.shard_reader import ShardBatches, ShardLoader, split_shards


def painted_sample() -> tuple[torch.Tensor, dict]:
    """A black 100 x 200 (h x w) image with two white boxes, and its target (per-box fields as the reader's)."""
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    image[:, 20:60, 40:100] = 255
    image[:, 70:90, 150:190] = 255
    target = {
        "boxes": torch.tensor([[40.0, 20.0, 100.0, 60.0], [150.0, 70.0, 190.0, 90.0]]),
        "labels": torch.tensor([1, 2]),
        "iscrowd": torch.tensor([0, 0]),
        "area": torch.tensor([2400.0, 800.0]),
        "image_id": 7,
    }
    return image, target


def test_resize_scales_boxes_and_areas_with_the_image():
    image, target = painted_sample()
    resized, scaled = resize(image, target, (50, 400))  # y halved, x doubled
    assert resized.shape == (3, 50, 400) and resized.dtype == torch.uint8
    assert scaled["boxes"].tolist() == [[80.0, 10.0, 200.0, 30.0], [300.0, 35.0, 380.0, 45.0]]
    assert scaled["area"].tolist() == [2400.0, 800.0] and scaled["image_id"] == 7
    assert resized[:, 12:28, 84:196].min() == 255 and resized[:, :8].max() == 0  # the white box moved with it


def test_shortest_side_size_draws_the_shorter_side_and_caps_the_longer():
    assert shortest_side_size(100, 200, 50, 1000) == (50, 100)
    assert shortest_side_size(300, 100, 200, 1000) == (600, 200)
    assert shortest_side_size(100, 200, 200, 300) == (150, 300)  # 400 would exceed max_size


def test_crop_shifts_and_clips_boxes_and_drops_those_left_outside():
    image, target = painted_sample()
    cropped, shifted = crop_and_pad(image, target, top=30, left=60, size=70)
    shifted = drop_small_boxes(shifted)
    assert cropped.shape == (3, 70, 70)
    assert torch.equal(cropped, image[:, 30:100, 60:130])
    # box 1 (40..100, 20..60) is clipped to x 60..100, y 30..60; box 2 (x 150..190) is right of the crop
    assert shifted["boxes"].tolist() == [[0.0, 0.0, 40.0, 30.0]]
    assert shifted["labels"].tolist() == [1] and shifted["iscrowd"].tolist() == [0]
    assert shifted["area"].tolist() == [pytest.approx(2400.0 * (40 * 30) / (60 * 40))]


def test_a_sliver_of_a_box_left_by_the_crop_is_dropped():
    image, target = painted_sample()
    target["boxes"][0, 2] = 99.5
    _, shifted = crop_and_pad(image, target, top=0, left=99, size=50)  # box 1 keeps half a pixel of width
    assert shifted["boxes"][0].tolist() == [0.0, 20.0, 0.5, 50.0]
    assert drop_small_boxes(shifted)["labels"].tolist() == []


def test_padding_keeps_boxes_and_fills_with_the_mean():
    image, target = painted_sample()
    padded, kept = crop_and_pad(image, target, top=0, left=0, size=256)
    assert padded.shape == (3, 256, 256) and torch.equal(padded[:, :100, :200], image)
    assert padded[:, 100:, :].amin((1, 2)).tolist() == list(PAD_VALUE) == padded[:, :, 200:].amax((1, 2)).tolist()
    assert torch.equal(kept["boxes"], target["boxes"]) and torch.equal(kept["area"], target["area"])


def test_large_scale_jitter_gives_the_fixed_square_with_boxes_inside_it():
    image, target = painted_sample()
    jitter = LargeScaleJitter((0.5, 2.0), 128)
    sizes = set()
    for draw in range(20):
        out, out_target = jitter(image, target, random.Random(draw))
        again, again_target = jitter(image, target, random.Random(draw))
        assert torch.equal(out, again) and torch.equal(out_target["boxes"], again_target["boxes"])
        assert out.shape == (3, 128, 128)
        boxes = out_target["boxes"]
        assert ((boxes >= 0) & (boxes <= 128)).all() and (boxes[:, 2:] - boxes[:, :2] >= 1).all()
        assert len(boxes) == len(out_target["labels"]) == len(out_target["area"]) == len(out_target["iscrowd"])
        for box in boxes.round().int().tolist():  # a box holds white pixels of its object
            assert out[:, box[1]:box[3], box[0]:box[2]].float().mean() > 200
        sizes.add(tuple(boxes.shape))
    assert len(sizes) > 1  # some draws crop a box away, others keep both


def test_multiscale_draws_from_the_scales():
    image, target = painted_sample()
    multiscale = Multiscale((40, 60, 80), 1000)
    shorter = {multiscale(image, target, random.Random(draw))[0].shape[1] for draw in range(30)}
    assert shorter == {40, 60, 80}


def reader_output(shards, *, epoch=0, training=True, start_sample=0, num_workers=0, data=None) -> list:
    data = data or DataConfig(augment="lsj", jitter_range=[0.5, 1.5], crop_size=64)
    dataset = ShardBatches(shards, batch_size=2, seed=1, epoch=epoch, training=training, start_sample=start_sample,
                           scale_augmentation=scale_augmentation(data))
    return [(t["image_id"], tuple(image.shape), image.sum().item(), t["boxes"].tolist())
            for images, targets in ShardLoader(dataset, num_workers=num_workers, pin_memory=False)
            for image, t in zip(images, targets, strict=True)]


def test_reader_draws_are_deterministic_per_seed_epoch_and_sample(small_manifest):
    shards = split_shards(small_manifest, "train")
    first = reader_output(shards)
    assert {shape for _, shape, _, _ in first} == {(3, 64, 64)}
    assert reader_output(shards, num_workers=2) == first
    assert reader_output(shards, start_sample=4) == first[4:]  # a resumed epoch reads the same samples
    other_epoch = {image_id: rest for image_id, *rest in reader_output(shards, epoch=1)}
    assert sum(other_epoch[image_id] != rest for image_id, *rest in first) > len(first) // 2


def test_multiscale_reader_sizes_each_image_from_the_scales(small_manifest):
    data = DataConfig(augment="multiscale", scales=[48, 64], max_size=100)
    output = reader_output(split_shards(small_manifest, "train"), data=data)
    assert {min(shape[1:]) for _, shape, _, _ in output} == {48, 64}
    assert max(max(shape[1:]) for _, shape, _, _ in output) <= 100


def test_evaluation_reader_is_never_augmented(small_manifest):
    shards = split_shards(small_manifest, "val")
    plain = reader_output(shards, training=False, data=DataConfig())
    assert reader_output(shards, training=False) == plain
    assert reader_output(shards, training=False, data=DataConfig(augment="multiscale", scales=[32])) == plain


def test_model_resizes_in_evaluation_only_when_the_reader_sizes_training_images():
    model, _ = build_model(ModelConfig("fasterrcnn_mobilenet_v3_large_320_fpn", min_size=96, max_size=128), 4,
                           resize_in_training=False)
    image, target = painted_sample()
    model.train()
    images, targets = model.transform([image.float() / 255], [target])
    assert images.image_sizes == [(100, 200)] and torch.equal(targets[0]["boxes"], target["boxes"])
    model.eval()
    assert model.transform([image.float() / 255])[0].image_sizes == [(64, 128)]


@pytest.mark.parametrize(("override", "message"), [
    ("data.augment=mosaic", "data.augment: expected one of hflip, multiscale, lsj, got 'mosaic'"),
    ("data.scales=[]", "data: scales must be a non-empty list"),
    ("data.jitter_range=[2.0, 0.5]", "data: jitter_range must be [low, high] with 0 < low <= high"),
    ("data.crop_size=0", "data.crop_size: must be >= 1"),
])
def test_bad_augment_options_name_the_key(override, message):
    with pytest.raises(ValueError, match=f"^command line: {message}".replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def tiny_run(manifest, run_dir, policy: list[str], max_steps: int) -> str:
    """A single-process training run; the hash of its last checkpoint's weights."""
    assert train_main([
        f"data.manifest={manifest}", f"run_dir={run_dir}", "strategy=single", "wandb.mode=disabled",
        "model.name=fasterrcnn_mobilenet_v3_large_320_fpn", "model.min_size=96", "model.max_size=128",
        "model.frozen_batchnorm=false", "model.builder_kwargs.representation_size=32", "data.batch_size=2",
        "data.num_workers=0", "optim.lr=0.01", "optim.warmup_steps=2", "checkpoint.every_steps=2",
        "eval.every_epochs=0", "eval.test_at_end=false", f"train.max_steps={max_steps}", *policy]) == 0
    return tensor_hash(latest_valid_checkpoint(run_dir)[1]["model"])


def record_training_sizes(monkeypatch) -> list[int]:
    """The shorter side of every image the model's transform passes on in training mode, as they come."""
    seen = []
    forward = GeneralizedRCNNTransform.forward

    def recording_forward(transform, images, targets=None):
        image_list, targets = forward(transform, images, targets)
        if transform.training:
            seen.extend(min(size) for size in image_list.image_sizes)
        return image_list, targets

    monkeypatch.setattr(GeneralizedRCNNTransform, "forward", recording_forward)
    return seen


# main's torchrun @record wants a real stderr for its fault handler; under pytest's capture it has none
@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_multiscale_trains_at_the_drawn_sizes(small_manifest, tmp_path, monkeypatch):
    seen = record_training_sizes(monkeypatch)
    tiny_run(small_manifest, tmp_path, ["data.augment=multiscale", "data.scales=[64,80]", "data.max_size=112"],
             max_steps=2)
    assert len(seen) == 4 and set(seen) <= {64, 80}  # the reader's sizes, not model.min_size (96)


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_lsj_trains_on_the_fixed_square_and_resumes_exactly(small_manifest, tmp_path, monkeypatch):
    seen = record_training_sizes(monkeypatch)
    policy = ["data.augment=lsj", "data.jitter_range=[0.3,2.0]", "data.crop_size=80"]
    uninterrupted = tiny_run(small_manifest, tmp_path / "uninterrupted", policy, max_steps=3)
    assert set(seen) == {80}
    tiny_run(small_manifest, tmp_path / "resumed", policy, max_steps=2)
    assert tiny_run(small_manifest, tmp_path / "resumed", policy, max_steps=3) == uninterrupted


def test_a_fixed_size_model_takes_only_the_flip():
    with pytest.raises(ValueError, match="data.augment: lsj sizes training images in the reader, but model.name "
                                         "ssdlite320_mobilenet_v3_large resizes every image to its own fixed size"):
        load_config(None, ["model.name=ssdlite320_mobilenet_v3_large", "data.augment=lsj"])
