import pytest
import torch

from snunet_cbam.metrics import ChangeMetrics, confusion_counts
from snunet_cbam.thresholds import HIGHEST, LOWEST, ProbabilityHistogram


def _scores(seed: int = 0, n: int = 20_000):
    """Logits of a model that ranks change higher, imperfectly, with the best cut off 0.5."""
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, generator=g) < 0.1).float()
    logits = torch.randn(n, generator=g) * 1.5 + target * 2.5 - 2.0
    return logits.view(1, 1, 100, -1), target.view(1, 1, 100, -1)


def test_counts_at_a_threshold_match_the_confusion_counts():
    logits, target = _scores()
    histogram = ProbabilityHistogram()
    histogram.update(logits, target)
    for threshold in (0.1, 0.3, 0.5, 0.77):
        assert histogram.counts_at(threshold) == ChangeMetrics.from_counts(confusion_counts(logits, target, threshold))


def test_the_tuned_threshold_is_the_best_one_a_brute_force_search_finds():
    logits, target = _scores()
    histogram = ProbabilityHistogram()
    for lg, tg in zip(logits.chunk(4, dim=-1), target.chunk(4, dim=-1)):  # accumulates over batches
        histogram.update(lg, tg)
    tuned = histogram.best()
    brute = max((ChangeMetrics.from_counts(confusion_counts(logits, target, k / 1000)).f1, k / 1000)
                for k in range(20, 981))
    assert tuned.metrics.f1 == pytest.approx(brute[0], abs=1e-9)
    assert tuned.threshold != 0.5  # this model's best cut is elsewhere: tuning matters
    assert tuned.metrics.f1 > ChangeMetrics.from_counts(confusion_counts(logits, target, 0.5)).f1


def test_a_perfect_separation_keeps_the_threshold_inside_the_allowed_range():
    target = torch.zeros(1, 1, 10, 10)
    target[..., :3, :] = 1
    logits = torch.where(target > 0, torch.tensor(20.0), torch.tensor(-20.0))
    histogram = ProbabilityHistogram()
    histogram.update(logits, target)
    tuned = histogram.best()
    assert LOWEST <= tuned.threshold <= HIGHEST
    assert tuned.metrics.f1 == 1.0
    assert abs(tuned.threshold - 0.5) < 1e-9  # every cut is perfect: the one nearest 0.5
