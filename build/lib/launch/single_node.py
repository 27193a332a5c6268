"""Train on one node: torchrun --standalone with one process per visible GPU.

    python -m launch.single_node -- --config configs/coco2000.yaml            # one process per visible GPU
    python -m launch.single_node --nproc 2 --max-restarts 3 -- --config configs/demo_cpu.yaml optim.lr=0.01

Everything after `--` goes to train/main.py unchanged. Without GPUs it starts one CPU process (gloo) unless
--nproc says more. The torchrun command is printed, then this process becomes it. A restarted worker group
resumes from the newest checkpoint in run_dir, so restarts only help with checkpoints written often enough
(checkpoint.every_steps).
"""

from __future__ import annotations

import argparse
import sys

from launch.torchrun import (
    launcher_parser,
    parse_launcher_args,
    run_or_print,
    standalone_command,
    visible_gpu_count,
)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = launcher_parser("python -m launch.single_node", __doc__)
    parser.add_argument("--nproc", type=int, help="processes (one per GPU); default: the visible GPUs, or 1")
    return parse_launcher_args(parser, argv)


def default_nproc() -> int:
    gpus = visible_gpu_count()
    if gpus == 0:
        print("no GPU visible: 1 CPU process (gloo); --nproc N starts more", file=sys.stderr, flush=True)
    return max(gpus, 1)


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    nproc = args.nproc if args.nproc is not None else default_nproc()
    return run_or_print(standalone_command(nproc, args.max_restarts, train_args), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
