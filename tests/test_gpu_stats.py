import threading
import time
from types import SimpleNamespace

import pynvml
import pytest

from train.gpu_stats import GpuStatsSampler


class FakeNvml:
    """Stands in for the NVML library (not for the sampler): two GPUs whose readings rise with every call."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def __init__(self, power_supported_on=(0, 1)):
        self.power_supported_on = power_supported_on
        self.returned = {}  # "gpu/i/metric" -> values handed out
        self.lock = threading.Lock()
        self.initialised = False
        self.shutdowns = 0

    def _reading(self, handle, metric, value):
        with self.lock:
            values = self.returned.setdefault(f"gpu/{handle}/{metric}", [])
            value = value + len(values)
            values.append(value)
            return value

    def nvmlInit(self):
        self.initialised = True

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3" if handle == 0 else "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=self._reading(handle, "util", 50 + handle), memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=self._reading(handle, "mem_bytes", 1000 * 2**20), total=80 * 2**30)

    def nvmlDeviceGetPowerUsage(self, handle):
        if handle not in self.power_supported_on:
            raise pynvml.NVMLError_NotSupported()
        return self._reading(handle, "power_mw", 300_000)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._reading(handle, "temp_c", 60)


def _wait_for_samples(nvml, count, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while len(nvml.returned.get("gpu/1/util", [])) < count:
        assert time.monotonic() < deadline, "sampler thread took no samples"
        time.sleep(0.005)


def _mean(values):
    return sum(values) / len(values)


def test_snapshot_is_the_mean_of_background_samples():
    nvml = FakeNvml()
    sampler = GpuStatsSampler(interval_s=0.005, nvml=nvml).start()
    assert sampler.active and sampler.gpu_names() == ["NVIDIA H100 80GB HBM3"] * 2
    _wait_for_samples(nvml, 4)
    sampler.stop()  # joined: every value NVML handed out is in the snapshot

    snapshot = sampler.snapshot()

    returned = nvml.returned
    assert len(returned["gpu/0/util"]) >= 4
    assert snapshot["gpu/0/util"] == pytest.approx(_mean(returned["gpu/0/util"]))
    assert snapshot["gpu/1/util"] == pytest.approx(_mean(returned["gpu/1/util"]))
    assert snapshot["gpu/0/mem_mb"] == pytest.approx(_mean(returned["gpu/0/mem_bytes"]) / 2**20)
    assert snapshot["gpu/1/power_w"] == pytest.approx(_mean(returned["gpu/1/power_mw"]) / 1000)
    assert snapshot["gpu/0/temp_c"] == pytest.approx(_mean(returned["gpu/0/temp_c"]))
    assert len(snapshot) == 8
    assert nvml.shutdowns == 1
    assert sampler.snapshot() == {}  # stopped and drained


def test_each_snapshot_covers_only_samples_since_the_last():
    nvml = FakeNvml()
    with GpuStatsSampler(interval_s=0.005, nvml=nvml) as sampler:
        _wait_for_samples(nvml, 3)
        first = sampler.snapshot()
        _wait_for_samples(nvml, len(nvml.returned["gpu/1/util"]) + 3)
    second = sampler.snapshot()
    temps = nvml.returned["gpu/0/temp_c"]  # 60, 61, 62, ...: the first snapshot took a prefix of them
    taken_first = round(2 * (first["gpu/0/temp_c"] - 60) + 1)
    assert first["gpu/0/temp_c"] == pytest.approx(_mean(temps[:taken_first]))
    assert second["gpu/0/temp_c"] == pytest.approx(_mean(temps[taken_first:]))


def test_snapshot_samples_now_when_called_before_the_next_tick():
    nvml = FakeNvml()
    with GpuStatsSampler(interval_s=60.0, nvml=nvml) as sampler:
        _wait_for_samples(nvml, 1)
        sampler.snapshot()
        assert sampler.snapshot()["gpu/1/util"] == 52.0  # the second reading, taken by snapshot() itself


def test_unsupported_metric_is_left_out():
    nvml = FakeNvml(power_supported_on=(0,))
    with GpuStatsSampler(interval_s=0.005, nvml=nvml) as sampler:
        _wait_for_samples(nvml, 2)
    snapshot = sampler.snapshot()
    assert "gpu/0/power_w" in snapshot and "gpu/1/power_w" not in snapshot
    assert "gpu/1/util" in snapshot and "gpu/1/temp_c" in snapshot


def test_without_nvidia_driver_the_sampler_is_inactive():
    # This machine has no NVIDIA driver: the real pynvml fails to load libnvidia-ml.
    with pytest.raises(pynvml.NVMLError):
        pynvml.nvmlInit()
    sampler = GpuStatsSampler(interval_s=0.01).start()
    time.sleep(0.03)
    assert not sampler.active
    assert sampler.snapshot() == {}
    assert sampler.gpu_names() == []
    sampler.stop()
