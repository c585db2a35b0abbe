"""num_workers: auto = usable cores - 1, between 0 and 8; an int is taken as is."""

import os

import pytest

from snunet_cbam import runtime
from snunet_cbam.runtime import resolve_num_workers


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 1), (4, 3), (9, 8), (64, 8)])
def test_auto_leaves_one_core_to_the_training_loop_and_caps_at_8(monkeypatch, cores, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)  # the affinity mask wins over the machine's count
    assert resolve_num_workers("auto") == workers


def test_without_affinity_the_cpu_count_is_used(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert resolve_num_workers("auto") == 3
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: no workers
    assert resolve_num_workers("auto") == 0


def test_an_int_is_taken_as_is(monkeypatch):
    monkeypatch.setattr(runtime, "usable_cpu_count", lambda: 2)
    assert resolve_num_workers(0) == 0
    assert resolve_num_workers(4) == 4  # explicit: more than the cores, but asked for
