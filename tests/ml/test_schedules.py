import pytest
import torch

from snunet_cbam.schedules import ScheduleAnchor, build_scheduler, lr_factor

COMMON = dict(base_lr=1e-3, min_lr=0.0, poly_power=1.0)


def test_the_scheduler_follows_lr_factor():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = build_scheduler(optimizer, kind="poly", total_steps=50, warmup_ratio=0.1, steps_per_epoch=10,
                                step_size_epochs=3, step_gamma=0.1, **COMMON)
    for step in range(50):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(
            1e-3 * lr_factor(step, kind="poly", total_steps=50, warmup_steps=5, **COMMON))
        optimizer.step()
        scheduler.step()


def test_warmup_then_poly_decay_to_the_floor():
    lrs = [lr_factor(s, kind="poly", total_steps=100, warmup_steps=10, **COMMON) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] < 0.02


@pytest.mark.parametrize("kind", ["poly", "cosine"])
def test_a_longer_resumed_run_decays_on_without_a_jump(kind):
    # 100 steps planned, stopped at 60, resumed with 200 steps in all.
    first = [lr_factor(s, kind=kind, total_steps=100, warmup_steps=10, **COMMON) for s in range(61)]
    anchor = ScheduleAnchor(step=60, factor=first[60])
    after = [lr_factor(s, kind=kind, total_steps=200, warmup_steps=20, anchor=anchor, **COMMON)
             for s in range(60, 200)]
    before = [lr_factor(s, kind=kind, total_steps=200, warmup_steps=20, anchor=anchor, **COMMON) for s in range(60)]
    assert after[0] == pytest.approx(first[60])  # no jump where the run was resumed
    assert all(a >= b for a, b in zip(after, after[1:]))  # decays monotonically ...
    assert after[-1] < 0.02  # ... to the floor at the new end
    assert after[1] > first[60] - (first[59] - first[60])  # and more slowly than the shorter plan
    assert len(before) == 60  # steps before the anchor keep the new plan's shape (never replayed)


def test_without_an_anchor_the_longer_schedule_would_have_jumped():
    # What the anchor prevents: recomputing the decay over the new length at step 60.
    assert lr_factor(60, kind="poly", total_steps=200, warmup_steps=10, **COMMON) > \
        1.5 * lr_factor(60, kind="poly", total_steps=100, warmup_steps=10, **COMMON)


def test_step_and_constant_schedules_do_not_depend_on_the_length():
    for kind in ("step", "constant"):
        short = [lr_factor(s, kind=kind, total_steps=100, warmup_steps=0, step_every=30, **COMMON) for s in range(90)]
        long = [lr_factor(s, kind=kind, total_steps=300, warmup_steps=0, step_every=30, **COMMON) for s in range(90)]
        assert short == long
