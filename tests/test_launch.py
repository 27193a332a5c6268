"""The launchers for real: a restarted one-node job, two torchrun "nodes" on 127.0.0.1 training as one job of
world size 2, and the SLURM script's per-node command rendered from a job's environment."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launch.multi_node import main as multi_node_main
from launch.single_node import main as single_node_main
from launch.slurm_command import gpus_per_node, slurm_torchrun_command
from launch.torchrun import TRAIN_SCRIPT
from train.checkpoint import latest_valid_checkpoint
from train.run_checkpoint import KILL_BEFORE_CHECKPOINT_ENV

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def tiny_training(manifest: Path, run_dir: Path) -> list[str]:
    """One optimizer step of one image per process, timed from its start (no throughput warm-up)."""
    return [
        f"data.manifest={manifest}", f"run_dir={run_dir}", "model.name=fasterrcnn_mobilenet_v3_large_320_fpn",
        "model.min_size=96", "model.max_size=128", "model.frozen_batchnorm=false", "data.batch_size=1",
        "data.num_workers=0", "train.max_steps=1", "train.log_every=1",
        "train.throughput_warmup_steps=0", "eval.every_epochs=0", "eval.test_at_end=false",
        "wandb.mode=disabled",
    ]


def launcher_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_single_node_builds_the_standalone_command(capsys):
    assert single_node_main(["--nproc", "2", "--max-restarts", "3", "--dry-run", "--",
                             "--config", "configs/demo_cpu.yaml", "optim.lr=0.01"]) == 0
    printed = shlex.split(capsys.readouterr().out)
    assert printed == [*TORCHRUN, "--standalone", "--nproc-per-node=2", "--max-restarts=3", TRAIN_SCRIPT,
                       "--config", "configs/demo_cpu.yaml", "optim.lr=0.01"]


def test_single_node_without_gpus_starts_one_cpu_process():
    result = subprocess.run([sys.executable, "-m", "launch.single_node", "--dry-run"], cwd=ROOT,
                            env=launcher_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--nproc-per-node=1" in shlex.split(result.stdout) and "no GPU visible" in result.stderr


def test_single_node_restarts_a_failed_worker_group(small_manifest, tmp_path):
    """Rank 0 is killed after step 1 on the first attempt, before its checkpoint; torchrun (through the
    wrapper) starts the group again and the second attempt trains to the end."""
    overrides = tiny_training(small_manifest, tmp_path)
    command = [sys.executable, "-m", "launch.single_node", "--nproc=1", "--max-restarts=1", "--", *overrides]
    env = {**launcher_env(), KILL_BEFORE_CHECKPOINT_ENV: "0:1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith(shlex.join([*TORCHRUN, "--standalone", "--nproc-per-node=1"]))
    starts = [record for record in records(tmp_path) if record.get("event") == "phase"]
    assert len(starts) == 2, "expected two starts of the training script (the failed one and the restart)"
    assert latest_valid_checkpoint(tmp_path)[1]["progress"]["step"] == 1


def test_two_nodes_on_localhost_train_as_one_job(small_manifest, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "launch.multi_node", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-endpoint", endpoint, "--rdzv-id", "test-two-nodes", "--",
               *tiny_training(small_manifest, tmp_path)]
    nodes = [subprocess.Popen(command, cwd=ROOT, env=launcher_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-4000:]
        assert f"--rdzv-backend=c10d --rdzv-endpoint={endpoint} --rdzv-id=test-two-nodes" in output
    _, state = latest_valid_checkpoint(tmp_path)
    assert state["world_size"] == 2 and state["progress"]["step"] == 1
    last = [record for record in records(tmp_path) if record["kind"] == "train"][-1]
    assert last["images_per_s/rank0"] > 0 and last["images_per_s/rank1"] > 0
    assert last["images_seen"] == 2  # 1 image on each of the 2 ranks


@pytest.mark.parametrize("endpoint", ["127.0.0.1:0", "node001", "node001:port", ":29400"])
def test_multi_node_needs_an_explicit_endpoint_port(endpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        multi_node_main(["--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-id", "job", "--dry-run"])
    assert exit_info.value.code == 2 and "HOST:PORT" in capsys.readouterr().err


SLURM_JOB = {"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "2",
             "MASTER_ADDR": "gpu-node-01"}


def test_slurm_command_is_rendered_from_the_job_environment():
    command = slurm_torchrun_command(SLURM_JOB, ["--config", "configs/coco_1x.yaml"], max_restarts=3,
                                     python="python")
    assert command == ["python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
                       "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-node-01:29400", "--rdzv-id=4242",
                       "--max-restarts=3", TRAIN_SCRIPT, "--config", "configs/coco_1x.yaml"]
    custom_port = slurm_torchrun_command({**SLURM_JOB, "MASTER_PORT": "31000"}, [], python="python")
    assert "--rdzv-endpoint=gpu-node-01:31000" in custom_port


def test_slurm_gpu_count_and_missing_variables():
    assert gpus_per_node({"SLURM_GPUS_PER_NODE": "a100:4"}) == 4
    assert gpus_per_node({"SLURM_GPUS_PER_NODE": "gpu:h100:8"}) == 8
    with pytest.raises(ValueError, match="--gpus-per-node"):
        gpus_per_node({})
    without_master = {key: value for key, value in SLURM_JOB.items() if key != "MASTER_ADDR"}
    with pytest.raises(ValueError, match="MASTER_ADDR.*scontrol show hostnames"):
        slurm_torchrun_command(without_master, [])


def test_sbatch_script_starts_one_torchrun_per_node_at_the_first_node(tmp_path):
    """The script as sbatch would run it, with scontrol and srun stand-ins on PATH (srun runs the task once,
    as one node would, and records its own options)."""
    script = (ROOT / "launch/slurm.sbatch").read_text()
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for option in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--cpus-per-task="):
        assert any(option in line for line in header), f"#SBATCH {option} missing"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames node[07-08]" ] && '
                                      'printf "node07\\nnode08\\n"\n')
    (bin_dir / "srun").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "srun_args"}\n'
                                  'while [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[07-08]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "777", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_SUBMIT_DIR": str(ROOT), "PYTHON": sys.executable, "DRY_RUN": "1"}
    command = ["bash", str(ROOT / "launch/slurm.sbatch"), "--config", "configs/coco_1x.yaml",
               "run_dir=/shared/runs/a b"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        *TORCHRUN, "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node07:29400",
        "--rdzv-id=777", "--max-restarts=3", TRAIN_SCRIPT, "--config", "configs/coco_1x.yaml",
        "run_dir=/shared/runs/a b",
    ]
    assert (tmp_path / "srun_args").read_text().split()[:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
