"""Statistics of a comparison over seeds: mean and standard deviation, and paired tests of one rule against another.

Runs of two optimizers with the same seed share the data split, the new head's
initialisation and the batch order (only the directions differ with the rule), so
they are compared in pairs: per seed, the difference of the final metrics. Over
the paired seeds ``paired_comparison`` reports the wins, ties and losses, the mean
difference, a two-sided paired t-test and a two-sided Wilcoxon signed-rank test
(scipy). With 5 seeds the smallest Wilcoxon p-value possible is 1/16 = 0.0625,
so only the t-test can reach 0.05 there; both are reported, and ``verdict``
reads the t-test.
"""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

SIGNIFICANCE = 0.05


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of the values; std 0 for one value, (nan, nan) for none."""
    clean = [v for v in values if v is not None and not math.isnan(v)]
    if not clean:
        return math.nan, math.nan
    return statistics.fmean(clean), statistics.stdev(clean) if len(clean) > 1 else 0.0


@dataclass(frozen=True)
class PairedResult:
    """One rule (a) against another (b) over the seeds both finished."""

    n: int                     # seeds with a value for both
    wins: int                  # seeds where a > b
    ties: int
    losses: int
    mean_difference: float     # mean of a - b over the paired seeds (nan when n = 0)
    t_p: Optional[float]       # two-sided paired t-test; None when undefined (n < 2, all differences equal)
    wilcoxon_p: Optional[float]  # two-sided Wilcoxon signed-rank; None when undefined (n < 2, all differences 0)

    def verdict(self, a: str, b: str) -> str:
        """"a better", "b better" (paired t-test p < 0.05) or "not significant"."""
        if self.t_p is None or self.t_p >= SIGNIFICANCE:
            return "not significant"
        return f"{a} better" if self.mean_difference > 0 else f"{b} better"


def paired_comparison(a: Mapping[int, Optional[float]], b: Mapping[int, Optional[float]]) -> PairedResult:
    """Compare the metric of rule a with rule b seed by seed (higher is better).

    Args:
        a, b: seed -> final metric (None or nan for a failed run, which leaves the pairing).

    Returns:
        Wins, ties, losses, mean difference and the two p-values over the paired seeds.
    """
    from scipy import stats

    seeds = sorted(s for s in set(a) & set(b) if _ok(a[s]) and _ok(b[s]))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]  # type: ignore[arg-type]
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    mean = statistics.fmean(diffs) if diffs else math.nan
    t_p = w_p = None
    if len(diffs) >= 2 and len(set(diffs)) > 1:  # equal differences: zero variance, t undefined
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on small samples; the p-value is what we report
            t_p = float(stats.ttest_rel([float(a[s]) for s in seeds], [float(b[s]) for s in seeds]).pvalue)
    if len(diffs) >= 2 and any(d != 0 for d in diffs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w_p = float(stats.wilcoxon(diffs).pvalue)
    return PairedResult(len(diffs), wins, len(diffs) - wins - losses, losses, mean,
                        None if t_p is None or math.isnan(t_p) else t_p,
                        None if w_p is None or math.isnan(w_p) else w_p)


def _ok(value: Optional[float]) -> bool:
    return value is not None and not math.isnan(value)
