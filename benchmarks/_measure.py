"""Timing and peak-memory helpers shared by the benchmark suites, and the default run's
VQGAN configuration they build their models on.

Ratios are taken in one run: the benchmark times its subject with pytest-benchmark and the
alternatives with `median_time` in the same process, interleaved, on the same inputs.
"""

import ctypes
import ctypes.util
import os
import statistics
import time

import torch

try:  # glibc: hand freed heap pages back to the OS, so reusing them shows in the RSS again
    _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
except (OSError, AttributeError):  # another libc: peaks served from freed memory are missed
    _malloc_trim = None


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, *, rounds: int = 5, warmup: int = 1, device="cpu") -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(*fns, rounds: int = 7, warmup: int = 1, device="cpu") -> list[float]:
    """Median wall time of each fn, run in turns (a, b, a, b, ...) so that drift in the
    machine's speed during the run falls on all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times, strict=True):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_extra_bytes(fn, device="cpu") -> int:
    """Peak memory one call of fn() needs beyond what was held before it.

    CUDA: torch's allocator peak. CPU: the process's peak resident set (VmHWM), reset
    before the call through /proc/self/clear_refs after malloc_trim has released the freed
    heap (else memory reused from earlier calls would not show); page granular.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if _malloc_trim is not None:
        _malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _proc_status("VmRSS")
    fn()
    return max(0, _proc_status("VmHWM") - base)


def mib(nbytes: int) -> float:
    return round(nbytes / 2**20, 1)


def default_vqgan_config():
    """VQGANConfig of the default run's tokenizer (the file muse_shapes.yaml names as
    model.tokenizer_config): the generation and training benchmarks time the vocabulary and
    grid the default run models."""
    from t2i.models.vqgan import VQGANConfig
    from t2i.training.config import from_dict, load_config

    repo = os.path.join(os.path.dirname(__file__), "..")
    muse = load_config(os.path.join(repo, "training", "configs", "muse_shapes.yaml"))[0]
    model = load_config(os.path.join(repo, muse.model["tokenizer_config"]))[0].model
    keys = {k: v for k, v in model.items() if k not in ("family", "stage")}
    return from_dict(VQGANConfig, keys, "model")  # checked and typed, as train.py builds it
