"""What the scaling table says about the machine: the GPUs used, their driver and how they talk."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pynvml
import torch


def visible_gpu_ids() -> list[str]:
    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [index.strip() for index in listed.split(",") if index.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


def hardware_facts(gpu_ids: list[str], out: Path) -> dict[str, str]:
    """GPU names, driver and how the GPUs talk (NVLink links, peer-to-peer access); "n/a (CPU)" without
    GPUs.

    NVML numbers GPUs by PCI bus; the runs set CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA's indices agree. Where
    nvidia-smi exists, its `topo -m` matrix (PCIe switches, NUMA affinity) goes to out/topology.txt.
    """
    if not gpu_ids:
        cpu = platform.processor() or platform.machine()
        return {
            "device_names": f"n/a (CPU: {os.cpu_count()} cores, {cpu})",
            "driver": "n/a (CPU)",
            "interconnect": "n/a (CPU)",
        }
    pynvml.nvmlInit()
    try:
        handles = [
            pynvml.nvmlDeviceGetHandleByIndex(int(gpu))
            if gpu.isdigit()
            else pynvml.nvmlDeviceGetHandleByUUID(gpu)
            for gpu in gpu_ids
        ]
        names = [str(pynvml.nvmlDeviceGetName(handle)) for handle in handles]
        driver = str(pynvml.nvmlSystemGetDriverVersion())
        links = [_active_nvlinks(handle) for handle in handles]
    finally:
        pynvml.nvmlShutdown()
    pairs = [(a, b) for a in range(len(gpu_ids)) for b in range(len(gpu_ids)) if a != b]
    peer = [torch.cuda.can_device_access_peer(a, b) for a, b in pairs]
    if not pairs:
        peer_text = "n/a (one GPU)"
    elif all(peer) or not any(peer):
        peer_text = "yes" if all(peer) else "no"
    else:
        peer_text = ", ".join(
            f"{a}->{b} {'yes' if ok else 'no'}" for (a, b), ok in zip(pairs, peer, strict=True)
        )
    link_text = "PCIe (no active NVLink)"
    if any(links):
        per_gpu = ", ".join(f"GPU{i}: {n} active links" for i, n in zip(gpu_ids, links, strict=True))
        link_text = f"NVLink ({per_gpu})"
    if shutil.which("nvidia-smi"):
        topology = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=60)
        (out / "topology.txt").write_text(topology.stdout + topology.stderr)
    return {
        "device_names": "; ".join(f"GPU{i}: {name}" for i, name in zip(gpu_ids, names, strict=True)),
        "driver": driver,
        "interconnect": f"{link_text}; peer-to-peer access: {peer_text}",
    }


def _active_nvlinks(handle) -> int:
    active = 0
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            active += pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED
        except pynvml.NVMLError:  # no such link, or no NVLink at all (GeForce cards such as the RTX 4090)
            break
    return active
