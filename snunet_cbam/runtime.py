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


def should_compile(setting: str | bool, device: torch.device) -> bool:
    """``auto`` compiles on CUDA only: a cold CPU compile costs minutes, worth it only for long runs."""
    if setting == "auto":
        return device.type == "cuda"
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


def resolve_num_workers(setting: int | str) -> int:
    """DataLoader workers: an int as is; ``auto`` = usable cores - 1 (one left for the training
    loop), between 0 and 8. More workers than cores only adds contention: 4 workers on 2 cores
    warn and slow down."""
    if setting == "auto":
        return max(0, min(MAX_AUTO_WORKERS, usable_cpu_count() - 1))
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
