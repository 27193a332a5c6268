"""Train on several nodes: run this same command on every node.

    # on each of 2 nodes (node001 hosts the rendezvous store, any free port on it):
    python -m launch.multi_node --nnodes 2 --rdzv-endpoint node001:29400 --rdzv-id job42 \\
        -- --config configs/coco_1x.yaml run_dir=/shared/runs/coco_1x

torchrun's c10d rendezvous assigns the node ranks, so no --node-rank is needed: the nodes meet at the endpoint
under the job id (a new id for each job, or an old job's workers could join). run_dir must be on storage that
every node sees: rank 0 writes the checkpoints and every rank reads them on resume. Everything after `--`
goes to train/main.py unchanged. The torchrun command is printed, then this process becomes it.
"""

from __future__ import annotations

import argparse
import sys

from launch.torchrun import (
    launcher_parser,
    parse_endpoint,
    parse_launcher_args,
    rendezvous_command,
    run_or_print,
    visible_gpu_count,
)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = launcher_parser("python -m launch.multi_node", __doc__)
    parser.add_argument("--nnodes", type=int, required=True, help="nodes in the job")
    parser.add_argument("--rdzv-endpoint", required=True,
                        help="HOST:PORT of the rendezvous store, on the first node (explicit port, not 0)")
    parser.add_argument("--rdzv-id", required=True, help="the job's id, the same on every node")
    parser.add_argument("--nproc-per-node", type=int,
                        help="processes per node (one per GPU); default: this node's visible GPUs, or 1")
    args, train_args = parse_launcher_args(parser, argv)
    try:
        parse_endpoint(args.rdzv_endpoint)
    except ValueError as error:
        parser.error(f"--rdzv-endpoint: {error}")
    return args, train_args


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    nproc = args.nproc_per_node if args.nproc_per_node is not None else max(visible_gpu_count(), 1)
    command = rendezvous_command(
        args.nnodes, nproc, args.rdzv_endpoint, args.rdzv_id, args.max_restarts, train_args
    )
    return run_or_print(command, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
