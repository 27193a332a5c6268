"""Background NVML sampling of every GPU on this node: utilisation, memory, power, temperature.

NVML calls serialize in the driver, so they run in a daemon thread at about 1 Hz, never inside a step.
`snapshot()` averages what was sampled since the previous snapshot, aligned with the logging interval.
GPU indices are NVML's (all GPUs of the node, independent of CUDA_VISIBLE_DEVICES). Without an NVIDIA driver
the sampler stays inactive and returns {}; a metric a GPU does not support is left out.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from types import ModuleType
from typing import Any

import pynvml


class GpuStatsSampler:
    def __init__(self, interval_s: float = 1.0, nvml: ModuleType | Any = pynvml) -> None:
        self.interval_s = interval_s
        self._nvml = nvml
        self._handles: list[Any] = []
        self._names: list[str] = []
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.active = False

    def start(self) -> GpuStatsSampler:
        """Initialise NVML and start sampling; stays inactive (no error) when NVML is unavailable."""
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError:
            return self
        try:
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            self._names = [_as_str(nvml.nvmlDeviceGetName(handle)) for handle in self._handles]
        except nvml.NVMLError:
            nvml.nvmlShutdown()
            self._handles, self._names = [], []
            return self
        self.active = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gpu-stats-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and shut NVML down; samples not yet taken by snapshot() are kept."""
        if not self.active:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.active = False
        self._nvml.nvmlShutdown()

    def __enter__(self) -> GpuStatsSampler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def gpu_names(self) -> list[str]:
        return list(self._names)

    def snapshot(self) -> dict[str, float]:
        """Mean of each metric since the last snapshot, keyed "gpu/{index}/{util,mem_mb,power_w,temp_c}".

        If no sample was taken since then (snapshots more often than the sampling interval), one is taken now.
        """
        with self._lock:
            empty = not self._counts
        if empty and self.active:
            self._sample()
        with self._lock:
            means = {key: self._sums[key] / count for key, count in self._counts.items()}
            self._sums.clear()
            self._counts.clear()
        return means

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def _sample(self) -> None:
        nvml = self._nvml
        readers = {
            "util": lambda handle: nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            "mem_mb": lambda handle: nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20,
            "power_w": lambda handle: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # NVML reports mW
            "temp_c": lambda handle: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
        }
        sample = {}
        for index, handle in enumerate(self._handles):
            for metric, read in readers.items():
                try:
                    sample[f"gpu/{index}/{metric}"] = float(read(handle))
                except nvml.NVMLError:
                    continue  # not supported on this GPU, or not permitted
        with self._lock:
            for key, value in sample.items():
                self._sums[key] += value
                self._counts[key] += 1


def _as_str(name: str | bytes) -> str:
    # nvidia-ml-py < 11.515 returned bytes.
    return name.decode() if isinstance(name, bytes) else name
