"""Where and how the model runs: device choice, mixed precision, seeding and RNG snapshots."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch


def select_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU."""
    if requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device '{requested}' was requested but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError("device 'mps' was requested but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """bf16 autocast pays off on CPUs with AMX or AVX-512 BF16; elsewhere it is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@dataclass(frozen=True)
class Precision:
    """The autocast dtype (None = full fp32) and whether a gradient scaler is needed (fp16)."""

    dtype: torch.dtype | None
    use_scaler: bool

    @classmethod
    def choose(cls, device: torch.device, amp: bool) -> "Precision":
        if not amp:
            return cls(None, False)
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return cls(torch.bfloat16, False)
            return cls(torch.float16, True)
        if device.type == "cpu" and cpu_has_native_bf16():
            return cls(torch.bfloat16, False)
        return cls(None, False)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


# ``compile: auto`` compiles a CUDA run of at least this many optimiser steps. A cold compile of
# the model costs 1.5-2 min on a GPU worker (docs/deploy.md); at the GPU goal (900 pairs/s, batch 8:
# about 9 ms a step) compile saves at most a few ms a step, so it pays only past about 20k steps.
# Shorter runs (tests, smoke runs, small datasets) start training at once.
COMPILE_PAYS_AFTER_STEPS = 20_000


def should_compile(setting: str | bool, device: torch.device, planned_steps: int) -> bool:
    """``auto``: on CUDA, for runs long enough to pay for the compile; never on the CPU, where
    compiling bought memory, not speed, in fp32, and turned bf16 losses into NaN
    (docs/benchmarks.md). ``True``/``False`` force it."""
    if setting == "auto":
        return device.type == "cuda" and planned_steps >= COMPILE_PAYS_AFTER_STEPS
    return bool(setting)


def use_channels_last(setting: str | bool, device: torch.device, precision: Precision) -> bool:
    """``auto``: NHWC where it pays, on CUDA and with bf16 on CPU; fp32 CPU convolutions (oneDNN,
    AVX2) measured 5% slower in NHWC (docs/benchmarks.md)."""
    if setting == "auto":
        return device.type == "cuda" or precision.dtype is not None
    return bool(setting)


MAX_AUTO_WORKERS = 8


def usable_cpu_count() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's cpuset), else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_num_workers(setting: int | str, processes: int = 1) -> int:
    """DataLoader workers of one training process: an int as is; ``auto`` = usable cores - 1 (one
    left for the training loop), between 0 and 8. More workers than cores only adds contention: 4
    workers on 2 cores warn and slow down. With ``processes`` training processes (data parallel)
    each gets its share of the cores: cores // processes - 1."""
    if setting == "auto":
        return max(0, min(MAX_AUTO_WORKERS, usable_cpu_count() // processes - 1))
    return int(setting)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
