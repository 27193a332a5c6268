"""The torchrun command lines our launchers build, in one place, and the hand-over to them.

Every launcher runs `python -m torch.distributed.run` (torchrun) with the Python that runs the launcher, so
the workers use the same environment, and passes the training arguments through to train/main.py untouched.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

TRAIN_SCRIPT = str(Path(__file__).resolve().parents[1] / "train" / "main.py")


def torchrun(python: str = sys.executable) -> list[str]:
    return [python, "-m", "torch.distributed.run"]


def standalone_command(
    nproc: int, max_restarts: int, train_args: Sequence[str], python: str = sys.executable
) -> list[str]:
    """One node: --standalone starts a private c10d store on a free port, so jobs on one host never merge."""
    return [
        *torchrun(python),
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        TRAIN_SCRIPT,
        *train_args,
    ]


def rendezvous_command(
    nnodes: int,
    nproc_per_node: int,
    endpoint: str,
    job_id: str,
    max_restarts: int,
    train_args: Sequence[str],
    python: str = sys.executable,
) -> list[str]:
    """Several nodes: the same command on every node; they meet at the c10d store on `endpoint` (the first
    node's host:port) under `job_id`, and torchrun assigns the node ranks."""
    parse_endpoint(endpoint)
    return [
        *torchrun(python),
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={job_id}",
        f"--max-restarts={max_restarts}",
        TRAIN_SCRIPT,
        *train_args,
    ]


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' -> (host, port). The port must be explicit and not 0: every node dials the same one."""
    host, sep, port_text = endpoint.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(
            f"rendezvous endpoint must be HOST:PORT with a port from 1 to 65535 that every node can reach, "
            f"got {endpoint!r} (e.g. node001:29400)"
        )
    return host, int(port_text)


def visible_gpu_count() -> int:
    import torch  # here, so that building a command line does not pay for importing torch

    return torch.cuda.device_count()


def launcher_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A parser with the options every launcher has: --max-restarts and --dry-run."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="times torchrun restarts the whole worker group after a failure (default 0)")
    parser.add_argument("--dry-run", action="store_true", help="print the torchrun command and exit")
    return parser


def parse_launcher_args(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[argparse.Namespace, list[str]]:
    """Launcher options before a `--`, training arguments (--config, overrides) after it."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, unknown = parser.parse_known_args(argv[:cut])
    if unknown:
        parser.error(f"unrecognized arguments: {shlex.join(unknown)} (training arguments go after `--`)")
    for name in ("nproc", "nproc_per_node", "nnodes"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_restarts < 0:
        parser.error(f"--max-restarts must be at least 0, got {args.max_restarts}")
    return args, argv[cut + 1 :]


def run_or_print(command: Sequence[str], dry_run: bool) -> int:
    """Print the command; unless dry_run, replace this process with it (signals then reach torchrun)."""
    print(shlex.join(command), flush=True)
    if not dry_run:
        os.execv(command[0], list(command))
    return 0
