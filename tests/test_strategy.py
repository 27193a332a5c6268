"""Strategy set-up, the sample-wise DataParallel split/merge, and DDP under a real two-process torchrun."""

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import skimage.data
import torch
import torch.nn.functional as F
from torch import nn

from train.config import ModelConfig
from train.model import build_model
from train.strategy import (
    ListDataParallel,
    Strategy,
    chunk_sizes,
    gather_by_sample,
    scatter_by_sample,
    setup_strategy,
)

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture
def no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU-only behaviour, also where a GPU happens to be visible."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def photos(count: int, height: int = 96, width: int = 128) -> list[torch.Tensor]:
    """Real photos as uint8 [3,H,W], all of one size so that batching adds no padding."""
    names = ("astronaut", "coffee", "chelsea", "rocket")
    images = []
    for index in range(count):
        array = torch.from_numpy(getattr(skimage.data, names[index % len(names)])().copy()).permute(2, 0, 1)
        resized = F.interpolate(array[None].float(), size=(height, width), mode="bilinear", antialias=True)
        image = resized[0].round().clamp(0, 255).to(torch.uint8)
        images.append(image.flip(-1) if index >= len(names) else image)
    return images


def targets_for(images: list[torch.Tensor]) -> list[dict]:
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0 + i, 12.0, 90.0, 80.0]][: 1 + i % 2]),
         "labels": torch.tensor([1, 2][: 1 + i % 2]), "image_id": 100 + i}
        for i, _ in enumerate(images)
    ]


def small_detector(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model, _ = build_model(ModelConfig("fasterrcnn_mobilenet_v3_large_320_fpn", min_size=96, max_size=128), 4)
    return model


class PerSampleLoss(nn.Module):
    """A detector-shaped toy whose losses are means over samples, so any split must give the batch's loss."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        fit = [
            (self.scale * image.float().mean() - t["boxes"].sum() / 100) ** 2
            for image, t in zip(images, targets, strict=True)
        ]
        count = [self.scale * len(t["boxes"]) for t in targets]
        return {"loss_fit": torch.stack(fit).mean(), "loss_count": torch.stack(count).mean()}


def test_chunk_sizes_are_near_equal_contiguous_and_never_empty() -> None:
    assert chunk_sizes(4, 2) == [2, 2]
    assert chunk_sizes(5, 2) == [3, 2]
    assert chunk_sizes(7, 3) == [3, 2, 2]
    assert chunk_sizes(1, 4) == [1]
    with pytest.raises(ValueError, match="empty batch"):
        chunk_sizes(0, 2)


def test_scatter_hands_out_whole_samples_in_order() -> None:
    images = [torch.full((3, 20 + i, 30), i, dtype=torch.uint8) for i in range(5)]
    targets = targets_for(images)
    args, kwargs, sizes = scatter_by_sample((images,), {"targets": targets}, [CPU, CPU])

    assert sizes == [3, 2]
    assert [len(a[0]) for a in args] == [3, 2] and [len(k["targets"]) for k in kwargs] == [3, 2]
    flat_images = args[0][0] + args[1][0]
    flat_targets = kwargs[0]["targets"] + kwargs[1]["targets"]
    for image, sent in zip(images, flat_images, strict=True):
        assert sent.shape == image.shape and torch.equal(sent, image)
    for target, sent in zip(targets, flat_targets, strict=True):
        assert sent["image_id"] == target["image_id"] and torch.equal(sent["boxes"], target["boxes"])


def test_scatter_passes_non_list_arguments_to_every_replica_and_checks_lengths() -> None:
    images = [torch.zeros(3, 8, 8)] * 3
    args, _, _ = scatter_by_sample((images, None), {}, [CPU, CPU])
    assert [a[1] for a in args] == [None, None]
    with pytest.raises(ValueError, match=r"equal length, got list lengths \[2, 3\]"):
        scatter_by_sample((images, targets_for(images)[:2]), {}, [CPU, CPU])


def test_gather_weights_losses_by_samples_and_keeps_detection_order() -> None:
    losses = [{"loss": torch.tensor(1.0)}, {"loss": torch.tensor(4.0)}]
    assert gather_by_sample(losses, [3, 1], CPU)["loss"].item() == pytest.approx((3 * 1.0 + 1 * 4.0) / 4)
    detections = [[{"id": 0}, {"id": 1}], [{"id": 2}]]
    assert [d["id"] for d in gather_by_sample(detections, [2, 1], CPU)] == [0, 1, 2]
    with pytest.raises(ValueError, match="different loss keys"):
        gather_by_sample([{"a": torch.tensor(1.0)}, {"b": torch.tensor(1.0)}], [1, 1], CPU)


def test_training_path_over_two_replicas_gives_the_whole_batch_loss() -> None:
    images, model = photos(5), PerSampleLoss()
    targets = targets_for(images)
    parallel = ListDataParallel(model)
    args, kwargs = parallel.scatter((images, targets), {}, [CPU, CPU])
    outputs = [copy.deepcopy(model)(*a, **k) for a, k in zip(args, kwargs, strict=True)]
    merged = parallel.gather(outputs, CPU)

    whole = model(images, targets)
    assert parallel.last_chunk_sizes == [3, 2]
    for key, value in whole.items():
        assert merged[key].item() == pytest.approx(value.item(), rel=1e-6)
    assert merged["loss_fit"].item() != pytest.approx(outputs[0]["loss_fit"].item())  # a real mix of both


def test_eval_path_over_two_replicas_matches_the_model_run_per_image() -> None:
    # torch's parallel_apply needs an accelerator, so the replicas run one after the other here; scatter and
    # gather are the class's own overrides.
    images = [image.float() / 255 for image in photos(3)]
    model = small_detector().eval()
    parallel = ListDataParallel(model)
    with torch.no_grad():
        args, kwargs = parallel.scatter((images,), {}, [CPU, CPU])
        replicas = [copy.deepcopy(model) for _ in args]
        outputs = [replica(*a, **k) for replica, a, k in zip(replicas, args, kwargs, strict=True)]
        merged = parallel.gather(outputs, CPU)
        per_image = [model([image])[0] for image in images]

    assert parallel.last_chunk_sizes == [2, 1] and len(merged) == 3
    for got, expected in zip(merged, per_image, strict=True):
        assert len(expected["boxes"]) > 0
        for key in ("boxes", "scores", "labels"):
            assert torch.allclose(got[key].float(), expected[key].float(), atol=1e-5), key
    assert not torch.equal(per_image[0]["boxes"], per_image[1]["boxes"])  # the order is really checked


def test_dp_on_cpu_wraps_and_trains_through_dataparallel_forward(no_torchrun_env, no_gpu, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="train.strategy"):
        strategy = setup_strategy("dp", "cpu")
    assert "just calls the module" in caplog.text
    assert (strategy.kind, strategy.num_replicas, strategy.loader_batch_size(2)) == ("dp", 1, 2)
    model = small_detector()
    wrapped = strategy.wrap(model)
    assert isinstance(wrapped, ListDataParallel) and strategy.unwrap(wrapped) is model

    images = [image.float() / 255 for image in photos(2)]
    losses = wrapped(images, targets_for(images))
    sum(losses.values()).backward()
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    wrapped.eval()
    with torch.no_grad():
        assert len(wrapped(images)) == 2


def test_auto_without_torchrun_is_single_with_local_collectives(no_torchrun_env) -> None:
    strategy = setup_strategy("auto", "cpu")
    assert (strategy.kind, strategy.device, strategy.rank, strategy.world_size) == ("single", CPU, 0, 1)
    assert strategy.is_main and strategy.loader_batch_size(3) == 3
    model = nn.Linear(2, 2)
    assert strategy.wrap(model) is model and strategy.unwrap(model) is model
    assert strategy.all_gather_object({"a": 1}) == [{"a": 1}]
    assert strategy.broadcast_object("x") == "x"
    strategy.barrier()
    strategy.teardown()


def test_raise_if_any_failed_in_one_process_raises_the_error_itself() -> None:
    strategy = Strategy(kind="single", device=CPU)
    strategy.raise_if_any_failed(None, "work")  # nothing failed: returns
    error = ValueError("bad input")
    with pytest.raises(ValueError, match="^bad input$") as raised:
        strategy.raise_if_any_failed(error, "work", error_type=KeyError)
    assert raised.value is error and not hasattr(error, "__notes__")


def test_loader_batch_under_dp_covers_every_gpu() -> None:
    strategy = Strategy(kind="dp", device=torch.device("cuda", 0), num_replicas=2, device_ids=[0, 1])
    assert strategy.loader_batch_size(2) == 4


def test_set_up_errors_say_what_to_do(no_torchrun_env, no_gpu, monkeypatch) -> None:
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node=N"):
        setup_strategy("ddp", "cpu")
    with pytest.raises(ValueError, match="auto, ddp, dp, single"):
        setup_strategy("fsdp", "cpu")
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        setup_strategy("single", "tpu")
    with pytest.raises(RuntimeError, match="sees no GPU"):
        setup_strategy("single", "cuda")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE is 2"):
        setup_strategy("single", "cpu")


def test_ddp_under_torchrun_keeps_two_ranks_identical(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [str(torchrun), "--nproc_per_node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
               str(REPO / "tests" / "_strategy_worker.py"), str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, result in enumerate(ranks):
        assert (result["kind"], result["rank"], result["world_size"]) == ("ddp", rank, 2)
        assert result["is_main"] == (rank == 0)
        assert "backend gloo" in result["str"]
        final = result["final_hashes"]
        assert len(final) == 2 and final[0] == final[1]
        assert result["max_difference_to_reference"] < 1e-6  # same as one process on the global batch
        assert result["data_hashes"][0] != result["data_hashes"][1]
        assert result["gathered"] == [{"rank": 0, "name": "r0"}, {"rank": 1, "name": "r1"}]
        assert result["broadcast"] == {"run_id": "from-rank-0"}
    assert ranks[0]["initial_hash"] != ranks[1]["initial_hash"]
    assert ranks[0]["final_hashes"] == ranks[1]["final_hashes"]
    # one failing rank: it raises its own error, the other a RuntimeError naming it; nobody waits
    assert [result["failures"]["none"] for result in ranks] == [None, None]
    assert ranks[1]["failures"]["rank1"] == {"type": "ValueError", "message": "broke on rank 1", "own": True,
                                             "notes": []}
    assert ranks[0]["failures"]["rank1"] == {"type": "RuntimeError", "own": False, "notes": [],
                                             "message": "work failed on rank 1: ValueError: broke on rank 1"}
    for rank, other in ((0, 1), (1, 0)):
        assert ranks[rank]["failures"]["both"] == {
            "type": "ValueError", "message": f"broke on rank {rank}", "own": True,
            "notes": [f"work also failed on rank {other}: ValueError: broke on rank {other}"]}
