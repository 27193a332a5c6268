"""Train a torchvision detector on data_prep shards.

    torchrun --nproc_per_node=2 train/main.py --config configs/demo_cpu.yaml [dotted.key=value ...]
    python train/main.py --config configs/demo_cpu.yaml strategy=dp

What happens, in order: the config is resolved (typed defaults, YAML, command line) and checked before any heavy
work, starting weights included (a torchvision name for the model, or an existing file); the strategy sets up the
process group (ddp) or not (single, dp); torchvision weights by name are fetched into torch.hub's cache once per
machine, or every rank stops with one message saying where to put the file; then `train` (train/training.py)
builds the model, resumes, runs the epochs and evaluates the test split.
"""

from __future__ import annotations

import argparse
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from train.config import load_config
from train.shard_check import ShardMismatchError
from train.strategy import setup_strategy
from train.training import fetch_weights_once, read_splits, train
from train.weights import PretrainedWeightsUnavailable, starting_weights


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file in configs/ (defaults in train/config.py apply without one)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, applied last")
    return parser.parse_args(argv)


@record
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        starting_weights(cfg.model)  # a weights name resolves, a weights file exists
        read_splits(cfg)  # the manifest has the splits this run reads
    except (ValueError, FileNotFoundError) as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    strategy = setup_strategy(cfg.strategy, cfg.device)
    try:
        fetch_weights_once(cfg, strategy)
    except PretrainedWeightsUnavailable as error:
        if strategy.is_main:
            print(f"weights error: {error}", file=sys.stderr)
        strategy.teardown()  # every rank is here: they all left the same gather with the same error
        return 2
    try:
        train(cfg, strategy)
    except ShardMismatchError as error:  # found before the first step, and raised on every rank together
        if strategy.is_main:
            print(f"data error: {error}", file=sys.stderr)
        strategy.teardown()
        return 2
    strategy.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
