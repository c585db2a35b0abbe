"""Data parallel inside one run (``gpus: N``): two CPU processes with gloo against one process.

Measured here (2 epochs of 5 steps, width 4, 64² synthetic tiles): the two-process run's epoch
losses matched the one-process run's with the same global batch within 4e-7 (relative; the test
loss within 4e-6) and every confusion count (training, validation, test) was identical; gradients
of one step matched within 3e-6 (relative norm). The asserted tolerances (1e-4 for losses and
gradients, 0.1% of the pixels for counts) leave room for other CPUs' float rounding. Without BatchNorm and Dice over the global
batch (plain BatchNorm per process, Dice per process) one step's gradients differed by up to 73%
(relative norm) and a BatchNorm running variance by 0.19: the gradient test below would fail.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from schemas.training import ConfigError, TrainConfig
from snunet_cbam.data.dataset import EpochShuffleSampler
from snunet_cbam.distributed import DeviceUnavailableError, Session, global_sum
from snunet_cbam.hooks import TrainerHooks
from snunet_cbam.losses import HybridLoss
from snunet_cbam.model import SNUNetCBAM
from snunet_cbam.synthetic import make_synthetic_dataset
from snunet_cbam.trainer import Trainer, _Progress

from .conftest import REPO, tiny_config

pytestmark = pytest.mark.slow

LOSS_RTOL = 1e-4
COUNT_TOL = 1e-3  # of the pixels scored


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # 11 training pairs x 2 crops = 22 samples: 5 global batches of 4 (2 per process), 2 left out.
    return make_synthetic_dataset(tmp_path_factory.mktemp("ddp-data"), pairs=16, size=64, seed=3).root


def config(**overrides) -> TrainConfig:
    # threshold 0.1: the tiny model's scores cross it after a few steps, so the counts are not all
    # "no change" (an all-zero comparison would prove nothing).
    values = dict(train_split="train", val_split="val", test_split="test", crops_per_image=2, window_size=None,
                  window_overlap=0, threshold=0.1, log_every_steps=1)
    values.update(overrides)
    return tiny_config(**values)


class Recorder(TrainerHooks):
    def __init__(self, cancel_at_step: int | None = None, cancel: threading.Event | None = None) -> None:
        self.events: list[tuple] = []
        self.cancel_at_step, self.cancel = cancel_at_step, cancel

    def on_run_start(self, info):
        self.events.append(("start", info.start_step))

    def on_step_end(self, info):
        self.events.append(("step", info.global_step))
        if info.global_step == self.cancel_at_step:
            self.cancel.set()

    def on_checkpoint_saved(self, info):
        self.events.append(("checkpoint", info.kind, info.global_step))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """One process with batch 4, and two processes with batch 2 each (the same global batch)."""
    out = tmp_path_factory.mktemp("ddp-runs")
    one = Trainer(config(batch_size=4), data, out / "one").fit()
    recorder = Recorder()
    two = Trainer(config(batch_size=2, gpus=2), data, out / "two", hooks=[recorder]).fit()
    return out, one, two, recorder


def _counts(metrics: dict) -> list[int]:
    return [metrics[k] for k in ("tp", "fp", "fn", "tn")]


def _assert_same_counts(a: dict, b: dict) -> None:
    pixels = sum(_counts(a))
    assert all(abs(x - y) <= COUNT_TOL * pixels for x, y in zip(_counts(a), _counts(b))), (a, b)


def test_two_processes_train_as_one_process_with_the_global_batch(runs):
    _, one, two, _ = runs
    assert one.status == two.status == "completed"
    assert len(one.history) == len(two.history) == 2
    for a, b in zip(one.history, two.history):
        assert b["train"]["loss"] == pytest.approx(a["train"]["loss"], rel=LOSS_RTOL)
        assert b["val"]["loss"] == pytest.approx(a["val"]["loss"], rel=LOSS_RTOL)
        _assert_same_counts(a["val"], b["val"])
        for key in ("f1", "iou", "accuracy"):  # from the all-reduced training counts
            assert b["train"][key] == pytest.approx(a["train"][key], abs=COUNT_TOL)
    assert one.history[-1]["train"]["f1"] > 0 or one.history[-1]["val"]["fp"] > 0  # counts that say something
    # Whole-image test scoring on rank 0: the single-process figures, at the same tuned threshold.
    assert two.threshold == pytest.approx(one.threshold, abs=2e-3)
    _assert_same_counts(one.test, two.test)


def test_only_rank_0_reports_and_writes(runs, tmp_path):
    out, one, two, recorder = runs
    assert sorted(p.name for p in (out / "two").iterdir()) == sorted(p.name for p in (out / "one").iterdir())
    assert [e for e in recorder.events if e[0] == "start"] == [("start", 0)]
    # Every global step reported once (10 steps of the global batch), in order.
    assert [e[1] for e in recorder.events if e[0] == "step"] == list(range(1, 11))
    # A rank other than 0 writes nothing (its checkpoints and metrics.json are rank 0's).
    trainer = Trainer(config(gpus=2), tmp_path, tmp_path / "rank1")
    trainer.dist = Session(rank=1, world_size=2)
    trainer._write_metrics(_Progress(), None, None)
    trainer._save(None, "last", {})  # type: ignore[arg-type]
    assert not (tmp_path / "rank1").exists()


def test_a_two_process_run_cancelled_inside_an_epoch_resumes_where_it_stopped(runs, data, tmp_path):
    _, _, straight, _ = runs
    cancel = threading.Event()
    recorder = Recorder(cancel_at_step=7, cancel=cancel)  # inside the second epoch (5 steps each)
    cfg = config(batch_size=2, gpus=2)
    first = Trainer(cfg, data, tmp_path, hooks=[recorder], cancel=cancel).fit()
    # Rank 0 decided, both ranks stopped at the same step: the checkpoint holds 7 steps.
    assert first.status == "cancelled"
    assert ("checkpoint", "last", 7) in recorder.events
    resumed_recorder = Recorder()
    resumed = Trainer(cfg, data, tmp_path, hooks=[resumed_recorder]).fit(resume=True)
    assert resumed.status == "completed"
    assert resumed_recorder.events[0] == ("start", 7)
    assert [e[1] for e in resumed_recorder.events if e[0] == "step"] == [8, 9, 10]
    # Each rank continued its own shard: the epochs end as the uninterrupted run's did.
    for a, b in zip(straight.history, resumed.history):
        assert b["train"]["loss"] == pytest.approx(a["train"]["loss"], rel=LOSS_RTOL)
        assert b["val"]["loss"] == pytest.approx(a["val"]["loss"], rel=LOSS_RTOL)
        _assert_same_counts(a["val"], b["val"])


def test_each_rank_gets_a_disjoint_shard_of_the_shared_permutation():
    whole = EpochShuffleSampler(23, seed=5)
    whole.set_epoch(3)
    order = [index for _, index in whole]
    for world in (2, 3):
        shards = []
        for rank in range(world):
            sampler = EpochShuffleSampler(23, seed=5, rank=rank, world_size=world)
            sampler.set_epoch(3)
            shards.append([index for _, index in sampler])
            assert len(sampler) == sampler.shard_length == 23 // world
        flat = [i for shard in shards for i in shard]
        assert len(set(flat)) == len(flat)  # disjoint
        assert set(flat) == set(order[:23 // world * world])  # covers the epoch, less the remainder
        # Step k of the ranks together is the single-process batch k of batch_size x world.
        batch = 2
        for k in range(len(shards[0]) // batch):
            together = {i for shard in shards for i in shard[k * batch:(k + 1) * batch]}
            assert together == set(order[k * batch * world:(k + 1) * batch * world])
    # Resuming inside an epoch: the rank's shard from the position reached.
    sampler = EpochShuffleSampler(23, seed=5, rank=1, world_size=2)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start=4)
    assert list(sampler) == full[4:]


def _one_step(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        session = Session(rank, 2, torch.device("cpu"))
        model = session.prepare_model(_model())
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        loss_fn = HybridLoss()
        loss_fn.batch_sum = global_sum
        a, b, y = _batch()
        mine = slice(rank, None, 2)
        loss_fn(ddp(a[mine], b[mine]), y[mine]).backward()
        if rank == 0:
            torch.save({"grads": {n: p.grad for n, p in model.named_parameters()},
                        "buffers": dict(model.named_buffers())}, out)
    finally:
        dist.destroy_process_group()


def _rank_1(index: int, port: int, out: str) -> None:
    _one_step(1, port, out)


def _model() -> SNUNetCBAM:
    torch.manual_seed(0)
    return SNUNetCBAM(in_channels=3, base_channel=4)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g),
            (torch.rand(4, 1, 32, 32, generator=g) > 0.8).float())


def test_one_ddp_step_has_the_gradient_of_the_global_batch(tmp_path):
    """BatchNorm statistics and Dice sums over the global batch, DDP's gradient average: the
    gradient and the BatchNorm running statistics of one batch of 4 split over two processes."""
    model = _model()
    a, b, y = _batch()
    HybridLoss()(model(a, b), y).backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    other = mp.start_processes(_rank_1, args=(port, ""), nprocs=1, join=False, start_method="spawn")
    _one_step(0, port, str(tmp_path / "r0.pt"))  # rank 0 in this process: one interpreter less to start
    other.join()
    rank0 = torch.load(tmp_path / "r0.pt")
    for name, p in model.named_parameters():
        if p.grad.norm() > 1e-6:  # conv biases before a BatchNorm get rounding noise only
            diff = (p.grad - rank0["grads"][name]).norm() / p.grad.norm()
            assert diff < LOSS_RTOL, name
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(rank0["buffers"][name], buffer, rtol=1e-4, atol=1e-5)


TORCHRUN_SCRIPT = """
import json, os, sys
from pathlib import Path
from snunet_cbam.hooks import TrainerHooks
from snunet_cbam.trainer import Trainer
from schemas.training import TrainConfig

class Mark(TrainerHooks):
    def on_run_start(self, info):
        (Path(sys.argv[2]) / f"hook-rank{os.environ['RANK']}").write_text("")

config = TrainConfig.model_validate_json(sys.argv[3])
result = Trainer(config, sys.argv[1], sys.argv[2], hooks=[Mark()]).fit()
(Path(sys.argv[4]) / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"status": result.status, "history": result.history}))
"""


def test_processes_started_by_torchrun_join_their_group(data, tmp_path):
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process: each joins that group (no
    spawning); rank 0 alone has hooks and writes, and every rank ends with the same figures."""
    script, out, results = tmp_path / "train.py", tmp_path / "out", tmp_path / "results"
    script.write_text(TORCHRUN_SCRIPT)
    out.mkdir()
    results.mkdir()
    cfg = config(batch_size=2, gpus=2, epochs=1, test_split=None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         str(data), str(out), cfg.model_dump_json(), str(results)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (json.loads((results / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["status"] == rank1["status"] == "completed"
    # The same figures on both ranks (each rank times its own epochs).
    assert [{**h, "seconds": 0} for h in rank0["history"]] == [{**h, "seconds": 0} for h in rank1["history"]]
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "hook-rank0", "last.pt", "metrics.json"]


def test_asking_for_more_gpus_than_the_machine_has_fails_at_start(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceUnavailableError, match=r"gpus: 2 asks for 2 CUDA device\(s\) .* but it has 1"):
        Trainer(config(gpus=2, device="auto"), tmp_path, tmp_path / "out").fit()
    assert not (tmp_path / "out").exists()  # refused before anything started


def test_gpus_is_validated():
    with pytest.raises(ConfigError, match="gpus"):
        TrainConfig.from_mapping({"gpus": 0})
    with pytest.raises(ConfigError, match="gpus > 1 needs device"):
        TrainConfig.from_mapping({"gpus": 2, "device": "cuda:1"})
    assert TrainConfig.from_mapping({"gpus": 2, "device": "cpu"}).gpus == 2
