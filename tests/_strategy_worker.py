"""Worker for tests/test_strategy.py, run as `torchrun --nproc_per_node=2 tests/_strategy_worker.py OUT_DIR`.

Each rank starts from different weights and trains on different data; after two DDP steps the weights must
be identical on both ranks and equal to one process trained on both ranks' batches from rank 0's weights.
Each rank writes what it saw to OUT_DIR/rank{N}.json for the test to check.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

from train.strategy import setup_strategy

STEPS = 2


def tensor_hash(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def weights_hash(model: nn.Module) -> str:
    return tensor_hash(*model.state_dict().values())


def model_and_batches(rank: int) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Rank-specific initial weights (DDP must replace them by rank 0's) and rank-specific data."""
    torch.manual_seed(100 + rank)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    return model, [(torch.randn(4, 8), torch.randn(4, 2)) for _ in range(STEPS)]


def train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for inputs, labels in batches:
        loss = nn.functional.mse_loss(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def single_process_reference(world_size: int) -> nn.Module:
    """Rank 0's initial weights trained on every rank's batches concatenated: what DDP must reproduce."""
    model, _ = model_and_batches(0)
    per_rank = [model_and_batches(rank)[1] for rank in range(world_size)]
    global_batches = []
    for step in range(STEPS):
        inputs = torch.cat([batches[step][0] for batches in per_rank])
        labels = torch.cat([batches[step][1] for batches in per_rank])
        global_batches.append((inputs, labels))
    train(model, global_batches)
    return model


def failure_reports(strategy) -> dict:
    """What raise_if_any_failed did on this rank when no rank, rank 1 alone, and both ranks failed."""
    reports = {}
    for scenario, failing_ranks in {"none": (), "rank1": (1,), "both": (0, 1)}.items():
        error = ValueError(f"broke on rank {strategy.rank}") if strategy.rank in failing_ranks else None
        try:
            strategy.raise_if_any_failed(error, "work")
            reports[scenario] = None
        except Exception as raised:
            reports[scenario] = {"type": type(raised).__name__, "message": str(raised), "own": raised is error,
                                 "notes": getattr(raised, "__notes__", [])}
    return reports


def main(out_dir: Path) -> None:
    strategy = setup_strategy("auto", "cpu")
    model, batches = model_and_batches(strategy.rank)
    initial_hash = weights_hash(model)
    ddp_model = strategy.wrap(model)
    train(ddp_model, batches)
    trained = strategy.unwrap(ddp_model)
    reference = single_process_reference(strategy.world_size)
    max_difference_to_reference = max(
        (a - b).abs().max().item() for a, b in zip(trained.parameters(), reference.parameters(), strict=True)
    )

    result = {
        "kind": strategy.kind,
        "rank": strategy.rank,
        "world_size": strategy.world_size,
        "is_main": strategy.is_main,
        "initial_hash": initial_hash,
        "final_hashes": strategy.all_gather_object(weights_hash(trained)),
        "data_hashes": strategy.all_gather_object([tensor_hash(inputs) for inputs, _ in batches]),
        "max_difference_to_reference": max_difference_to_reference,
        "gathered": strategy.all_gather_object({"rank": strategy.rank, "name": f"r{strategy.rank}"}),
        "broadcast": strategy.broadcast_object({"run_id": f"from-rank-{strategy.rank}"}, src=0),
        "str": str(strategy),
        "failures": failure_reports(strategy),
    }
    (out_dir / f"rank{strategy.rank}.json").write_text(json.dumps(result))
    del ddp_model  # as train/main.py does by returning from train(): teardown needs the wrapper gone
    strategy.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
