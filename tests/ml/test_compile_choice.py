"""``compile: auto`` compiles only where and when it pays (snunet_cbam/runtime.py)."""

from __future__ import annotations

import pytest
import torch

from snunet_cbam.runtime import COMPILE_PAYS_AFTER_STEPS, should_compile

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize(("device", "steps", "expected"), [
    (CUDA, COMPILE_PAYS_AFTER_STEPS, True),  # long enough to earn the compile back
    (CUDA, COMPILE_PAYS_AFTER_STEPS - 1, False),  # a short run starts training at once
    (CUDA, 20, False),
    (CPU, 10 * COMPILE_PAYS_AFTER_STEPS, False),  # never on the CPU: no speed-up in fp32, NaN in bf16
])
def test_auto_compiles_on_cuda_runs_long_enough_to_pay_for_it(device: torch.device, steps: int, expected: bool) -> None:
    assert should_compile("auto", device, steps) is expected


@pytest.mark.parametrize("device", [CUDA, CPU])
def test_an_explicit_setting_wins_whatever_the_run_length(device: torch.device) -> None:
    assert should_compile(True, device, 1) is True
    assert should_compile(False, device, 10**9) is False
