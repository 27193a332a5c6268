"""The training strategy in one place: one process (single), DataParallel (dp) or DDP (ddp).

`setup_strategy` reads torchrun's environment (WORLD_SIZE, LOCAL_RANK, RANK, MASTER_ADDR, MASTER_PORT) and
nothing else, so one node and many nodes are launched the same way. The returned `Strategy` wraps the model,
offers the few collectives the loop and evaluation need (no-ops outside ddp) and tears the process group down.

Plain nn.DataParallel cannot run torchvision detectors: its scatter chunks every tensor along dim 0 (the
channels of each image, the boxes of each target) instead of handing out whole images, and its gather turns
each scalar loss into a per-GPU vector. `ListDataParallel` splits the image and target lists by sample and
merges the replicas' outputs back into what one model would return for the whole batch.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)

STRATEGY_KINDS = ("auto", "ddp", "dp", "single")  # auto: ddp under torchrun, else single
DEVICES = ("auto", "cpu", "cuda")
TORCHRUN_ENV = ("WORLD_SIZE", "LOCAL_RANK")


@dataclass
class Strategy:
    """How this process trains. `device` is where the (unwrapped) model and the batch live."""

    kind: str
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    num_replicas: int = 1  # GPUs that DataParallel splits each batch over; 1 otherwise
    device_ids: list[int] = field(default_factory=list)  # those GPUs' indices under dp
    backend: str | None = None  # process-group backend under ddp: nccl or gloo

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        if self.kind == "ddp":
            return (f"strategy ddp: rank {self.rank} of {self.world_size} (local rank {self.local_rank}) "
                    f"on {self.device}, backend {self.backend}")
        if self.kind == "dp":
            return f"strategy dp: DataParallel over {self.num_replicas} replica(s) on {self.device}"
        return f"strategy single on {self.device}"

    def wrap(self, model: nn.Module) -> nn.Module:
        """Move the model to the device and wrap it; wrapping a wrapped model (after a freeze phase) rebuilds
        the wrapper around the same module."""
        model = self.unwrap(model).to(self.device)
        if self.kind == "ddp":
            device_ids = [self.local_rank] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=device_ids)
        if self.kind == "dp":
            return ListDataParallel(model, device_ids=self.device_ids or None)
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, (DistributedDataParallel, nn.DataParallel)) else model

    def loader_batch_size(self, batch_size: int) -> int:
        """Images per loader batch: dp feeds batch_size images to each of its replicas from one loader."""
        return batch_size * self.num_replicas

    def barrier(self) -> None:
        if self.kind == "ddp":
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's obj, in rank order. Pass CPU objects: they are pickled, and tensors come back on the
        device they were on."""
        if self.kind != "ddp":
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank src's obj on every rank (the other ranks' obj is ignored)."""
        if self.kind != "ddp":
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """Rank src's values copied into every rank's `tensors` (contiguous, on the process group's device),
        in place."""
        if self.kind != "ddp":
            return
        for tensor in tensors:
            dist.broadcast(tensor, src=src)

    def raise_if_any_failed(
        self, error: BaseException | None, what: str, error_type: type[Exception] = RuntimeError
    ) -> None:
        """Collective: each rank passes the error it caught (or None); if any rank failed, every rank raises.

        A rank that fails alone and raises would leave the others blocked in their next collective until the
        process group times out; so every rank reaches this gather, and the failure travels with it. A failing
        rank raises its own exception (its type and traceback intact, the other failing ranks in a note); every
        other rank raises `error_type("<what> failed on rank r: Type: message; rank s: ...")`.
        """
        self.all_gather_or_raise(None, error, what, error_type)

    def all_gather_or_raise(
        self, obj: Any, error: BaseException | None, what: str, error_type: type[Exception] = RuntimeError
    ) -> list[Any]:
        """`all_gather_object(obj)` and `raise_if_any_failed(error, ...)` in one gather: every rank's obj, unless
        a rank passed an error, in which case every rank raises as `raise_if_any_failed` says."""
        described = None if error is None else f"{type(error).__name__}: {error}"
        gathered = self.all_gather_object((obj, described))
        failed = {rank: failure for rank, (_, failure) in enumerate(gathered) if failure}
        if not failed:
            return [item for item, _ in gathered]
        others = "; ".join(f"rank {rank}: {failure}" for rank, failure in failed.items() if rank != self.rank)
        if error is None:
            raise error_type(f"{what} failed on {others}")
        if others:
            error.add_note(f"{what} also failed on {others}")
        raise error

    def teardown(self) -> None:
        """End the process group on the success path; drop every reference to the wrapped model first.

        A DDP wrapper's reducer keeps the process group alive, and DDP sits in reference cycles, so an
        unreferenced wrapper lives on until the garbage collector runs. If that is at interpreter exit, gloo's
        threads are torn down too late and the process can abort with "terminate called without an active
        exception" (SIGABRT) after training has finished. So the garbage is collected first, and a barrier keeps
        any rank from destroying the group while a peer still uses it. On an error path do not call this: a peer
        may be stuck in a collective, and torchrun ends the other workers anyway.
        """
        if self.kind == "ddp" and dist.is_initialized():
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


def setup_strategy(kind: str = "auto", device: str = "auto") -> Strategy:
    """Resolve `kind` (auto|ddp|dp|single) and `device` (auto|cpu|cuda) and set up the process group for ddp.

    auto kind is ddp under torchrun (WORLD_SIZE and LOCAL_RANK set), otherwise single; auto device is cuda
    when a GPU is visible.
    """
    if kind not in STRATEGY_KINDS:
        raise ValueError(f"unknown strategy {kind!r}; choose one of {', '.join(STRATEGY_KINDS)}")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for, but torch sees no GPU; use device=cpu or device=auto")
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    under_torchrun = all(name in os.environ for name in TORCHRUN_ENV)
    if kind == "auto":
        kind = "ddp" if under_torchrun else "single"
    if kind == "ddp":
        if not under_torchrun:
            raise RuntimeError(
                "strategy ddp needs the environment torchrun sets (WORLD_SIZE, LOCAL_RANK, RANK, "
                "MASTER_ADDR, MASTER_PORT): launch with `torchrun --nproc_per_node=N train/main.py ...`, "
                "or use strategy single or dp"
            )
        return _setup_ddp(device_type)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise ValueError(
            f"strategy {kind} runs in one process, but WORLD_SIZE is {world_size}: every process would train "
            "alone; use strategy ddp (or auto) under torchrun, or launch with plain python"
        )
    if kind == "dp":
        return _setup_dp(device_type)
    return Strategy(kind="single", device=_first_device(device_type))


def _setup_ddp(device_type: str) -> Strategy:
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} has no GPU: this node shows {visible} "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                f"start at most {visible} processes per node"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        # device_id binds the NCCL communicator to this GPU, so barriers need not guess the device.
        _init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        _init_process_group("gloo")
    strategy = Strategy(
        kind="ddp", device=device, rank=dist.get_rank(), local_rank=local_rank,
        world_size=dist.get_world_size(), backend=dist.get_backend(),
    )
    log.info("%s", strategy)
    return strategy


def _init_process_group(backend: str, **kwargs) -> None:
    """init_process_group on torchrun's store, under a key prefix of its own for each restart attempt.

    torchrun keeps its store across `--max-restarts` attempts, and the restarted workers would otherwise find
    the dead group's addresses under the same keys: seen here as "Gloo connectFullMesh failed ... Connection
    refused" in about one restart in two (torch 2.14; pytorch/pytorch#167288 reports the same with NCCL).
    """
    store, rank, world_size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"attempt{attempt}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, **kwargs)


def _setup_dp(device_type: str) -> Strategy:
    if device_type == "cuda":
        device_ids = list(range(torch.cuda.device_count()))
        return Strategy(kind="dp", device=torch.device("cuda", device_ids[0]), num_replicas=len(device_ids),
                        device_ids=device_ids)
    if torch.cuda.is_available():
        raise ValueError(
            "strategy dp with device cpu cannot run where a GPU is visible (DataParallel then takes every "
            "GPU); use device cuda, or strategy single on the CPU"
        )
    log.warning("strategy dp on cpu: DataParallel has no GPU to split batches over and just calls the module "
                "(this exercises the code path, not the speed)")
    return Strategy(kind="dp", device=torch.device("cpu"))


def _first_device(device_type: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")


class ListDataParallel(nn.DataParallel):
    """DataParallel for torchvision detectors called as model(images, targets) with lists of samples.

    Each replica gets a contiguous, near-equal slice of whole samples. In training the loss dicts come back
    as their mean weighted by samples per replica, which is what one model returns for the whole batch when
    every image contributes equally to each loss (torchvision samples a fixed number of anchors and proposals
    per image). In evaluation the per-image detections come back concatenated in input order.
    """

    def __init__(self, module: nn.Module, device_ids: Sequence[int] | None = None) -> None:
        super().__init__(module, device_ids=device_ids)
        self.last_chunk_sizes: list[int] = []  # set by scatter, read by gather within one forward

    def scatter(
        self, inputs: tuple[Any, ...], kwargs: dict[str, Any] | None, device_ids: Sequence[Any]
    ) -> tuple[list[tuple[Any, ...]], list[dict[str, Any]]]:
        per_device_args, per_device_kwargs, self.last_chunk_sizes = scatter_by_sample(
            inputs, kwargs or {}, [_as_device(index) for index in device_ids]
        )
        return per_device_args, per_device_kwargs

    def gather(self, outputs: Sequence[Any], output_device: Any) -> Any:
        return gather_by_sample(outputs, self.last_chunk_sizes, _as_device(output_device))


def chunk_sizes(num_samples: int, num_chunks: int) -> list[int]:
    """Near-equal contiguous chunk sizes, larger ones first, never empty: (5, 2) -> [3, 2]; (1, 2) -> [1]."""
    if num_samples < 1:
        raise ValueError("cannot split an empty batch over DataParallel replicas")
    base, extra = divmod(num_samples, num_chunks)
    return [base + (index < extra) for index in range(min(num_chunks, num_samples))]


def to_device(obj: Any, device: torch.device) -> Any:
    """obj with every tensor inside lists, tuples and dicts moved to device; other values unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {key: to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(value, device) for value in obj)
    return obj


def scatter_by_sample(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], devices: Sequence[torch.device]
) -> tuple[list[tuple[Any, ...]], list[dict[str, Any]], list[int]]:
    """Split every list argument (images, targets) into per-device chunks of whole samples.

    Returns the per-device positional args, the per-device kwargs and the chunk sizes. Arguments that are
    not lists (targets=None in evaluation) go to every device unchanged.
    """
    batch_lengths = {len(value) for value in (*args, *kwargs.values()) if isinstance(value, (list, tuple))}
    if len(batch_lengths) != 1:
        raise ValueError(
            "ListDataParallel expects the images (and targets) as lists of equal length, got list lengths "
            f"{sorted(batch_lengths)}"
        )
    sizes = chunk_sizes(batch_lengths.pop(), len(devices))
    per_device_args, per_device_kwargs = [], []
    start = 0
    for size, device in zip(sizes, devices[: len(sizes)], strict=True):
        chunk = slice(start, start + size)
        per_device_args.append(tuple(_take_chunk(value, chunk, device) for value in args))
        per_device_kwargs.append({key: _take_chunk(value, chunk, device) for key, value in kwargs.items()})
        start += size
    return per_device_args, per_device_kwargs, sizes


def _take_chunk(value: Any, chunk: slice, device: torch.device) -> Any:
    return to_device(list(value[chunk]), device) if isinstance(value, (list, tuple)) else value


def gather_by_sample(outputs: Sequence[Any], sizes: Sequence[int], device: torch.device) -> Any:
    """Merge replica outputs: loss dicts -> sample-weighted mean; detection lists -> one list in order."""
    if len(outputs) != len(sizes):
        raise ValueError(f"{len(outputs)} replica outputs for {len(sizes)} input chunks")
    if all(isinstance(output, Mapping) for output in outputs):
        keys = set(outputs[0])
        if any(set(output) != keys for output in outputs):
            raise ValueError(f"replicas returned different loss keys: {[sorted(out) for out in outputs]}")
        total = sum(sizes)
        return {
            key: sum(out[key].to(device) * (size / total) for out, size in zip(outputs, sizes, strict=True))
            for key in outputs[0]
        }
    if all(isinstance(output, (list, tuple)) for output in outputs):
        return [to_device(detections, device) for output in outputs for detections in output]
    raise TypeError(
        "ListDataParallel expects loss dicts (training) or lists of per-image detections (evaluation), got "
        f"{[type(output).__name__ for output in outputs]}"
    )


def _as_device(index_or_device: Any) -> torch.device:
    """DataParallel keeps GPU indices; the pure functions above take devices (CPU in tests)."""
    if isinstance(index_or_device, (str, torch.device)):
        return torch.device(index_or_device)
    return torch.device("cuda", index_or_device)
