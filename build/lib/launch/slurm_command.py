"""Each node's torchrun command inside a SLURM job, rendered from the job's environment.

    srun --ntasks-per-node=1 python -m launch.slurm_command [--max-restarts R] -- --config ... overrides

launch/slurm.sbatch runs this on every node. It reads SLURM_JOB_NUM_NODES (nodes), SLURM_GPUS_ON_NODE or
SLURM_GPUS_PER_NODE (processes per node), SLURM_JOB_ID (the rendezvous id) and MASTER_ADDR / MASTER_PORT (the
first node, exported by the sbatch script; port 29400 by default). The command is printed, then this process
becomes it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence

from launch.torchrun import launcher_parser, parse_launcher_args, rendezvous_command, run_or_print

DEFAULT_PORT = 29400


def slurm_torchrun_command(
    env: Mapping[str, str], train_args: Sequence[str], max_restarts: int = 0, python: str = sys.executable
) -> list[str]:
    """The torchrun command for this node of the job described by `env` (SLURM's variables plus MASTER_ADDR).

    Raises ValueError naming the variable that is missing or malformed, and the sbatch line that sets it.
    """
    nnodes = _int_variable(env, "SLURM_JOB_NUM_NODES", "#SBATCH --nodes=N")
    job_id = _variable(env, "SLURM_JOB_ID", "sbatch (run inside a SLURM job)")
    master_addr = _variable(
        env, "MASTER_ADDR", 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    )
    port = env.get("MASTER_PORT", str(DEFAULT_PORT))
    return rendezvous_command(
        nnodes, gpus_per_node(env), f"{master_addr}:{port}", job_id, max_restarts, train_args, python
    )


def gpus_per_node(env: Mapping[str, str]) -> int:
    """SLURM_GPUS_ON_NODE (set in job steps), else SLURM_GPUS_PER_NODE ("2", "a100:2" or "gpu:a100:2")."""
    if "SLURM_GPUS_ON_NODE" in env:
        return _int_variable(env, "SLURM_GPUS_ON_NODE", "#SBATCH --gpus-per-node=N")
    value = _variable(env, "SLURM_GPUS_PER_NODE", "#SBATCH --gpus-per-node=N")
    match = re.fullmatch(r"(?:[\w.-]+:)*(\d+)", value)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"SLURM_GPUS_PER_NODE={value!r}: expected a GPU count such as 2 or a100:2")
    return int(match.group(1))


def _variable(env: Mapping[str, str], name: str, set_by: str) -> str:
    value = env.get(name, "")
    if not value:
        raise ValueError(f"environment variable {name} is not set; it comes from: {set_by}")
    return value


def _int_variable(env: Mapping[str, str], name: str, set_by: str) -> int:
    value = _variable(env, name, set_by)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(
            f"environment variable {name}={value!r}: expected a positive integer (from: {set_by})"
        )
    return int(value)


def main(argv: list[str] | None = None) -> int:
    parser = launcher_parser("python -m launch.slurm_command", __doc__)
    args, train_args = parse_launcher_args(parser, sys.argv[1:] if argv is None else argv)
    try:
        command = slurm_torchrun_command(os.environ, train_args, args.max_restarts)
    except ValueError as error:
        print(f"slurm_command: {error}", file=sys.stderr)
        return 2
    return run_or_print(command, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
