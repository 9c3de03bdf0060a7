"""Statistics over seeds: never draw a conclusion from one run.

    stats = over_seeds(lambda seed: final_val_loss(lr=3e-3, seed=seed), seeds=(0, 1, 2))
    stats.mean, stats.std, stats.ci95        # sample mean, sample std (n - 1), Student-t interval

Two training runs that differ only in their seed (initial weights, batch order, dropout masks) end
at different losses; a difference between two configurations means something only when it is large
against that spread (the NanoGPT speedrun, modded-nanogpt, judges its records the same way: over
several runs of the same script, not one). Here every configuration is run over a few
seeds and summarised by its mean, sample standard deviation and a 95% confidence interval for the
mean from Student's t distribution (Student 1908; e.g. NIST/SEMATECH e-Handbook of Statistical
Methods §1.3.5.2, "Confidence limits for the mean"): mean ± t(0.975, n-1) · s / sqrt(n).

The t quantile is computed here (no SciPy in the course's dependencies): the t density integrated
with Simpson's rule and inverted by bisection; tests check it against the printed table
(NIST e-Handbook §1.3.6.7.2).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Iterable


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with df degrees of freedom (Simpson's rule on the density, 2000 panels)."""
    _check_df(df)
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = lambda t: math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))
    n = 2000  # even; the density is smooth, so the error is far below the 1e-3 of printed tables
    h = x / n
    total = pdf(0.0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
    return 0.5 + total * h / 3


def t_quantile(p: float, df: int) -> float:
    """x with P(T <= x) = p, by bisection on t_cdf (p in (0.5, 1))."""
    _check_df(df)
    if not (isinstance(p, float) and 0.5 < p < 1.0):
        raise ValueError(f"p must be a float in (0.5, 1), got {p!r}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def _check_df(df):
    if not isinstance(df, int) or isinstance(df, bool) or df < 1:
        raise ValueError(f"df (degrees of freedom) must be an integer >= 1, got {df!r}")


@dataclass(frozen=True)
class SeedStats:
    """One metric of one configuration over n seeds."""
    values: tuple[float, ...]
    seeds: tuple[int, ...]
    confidence: float = 0.95

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation (divides by n - 1); nan for one seed or a non-finite value (a diverged run)."""
        if self.n < 2 or not all(math.isfinite(v) for v in self.values):
            return math.nan
        return statistics.stdev(self.values)

    @property
    def half_width(self) -> float:
        """t(1 - (1 - confidence)/2, n - 1) · std / sqrt(n): the confidence interval is mean ± this."""
        if self.n < 2:
            return math.nan
        return t_quantile(1 - (1 - self.confidence) / 2, self.n - 1) * self.std / math.sqrt(self.n)

    @property
    def ci(self) -> tuple[float, float]:
        return self.mean - self.half_width, self.mean + self.half_width

    def __str__(self):
        return f"{self.mean:.3f} ± {self.half_width:.3f} (std {self.std:.3f}, n={self.n})"

    def __repr__(self):
        return f"SeedStats({self})"


def over_seeds(run: Callable[[int], float | dict], seeds: Iterable[int] = (0, 1, 2),
               confidence: float = 0.95) -> SeedStats | dict[str, SeedStats]:
    """Call run(seed) for each seed. run returns a number (-> SeedStats) or a dict of numbers (-> a dict
    of SeedStats, one per key). A non-finite result (a diverged run) is kept: its mean is then nan."""
    seeds = tuple(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct (a repeated seed repeats the same run), got {seeds!r}")
    if not (isinstance(confidence, float) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be a float in (0, 1), got {confidence!r}")
    results = [run(seed) for seed in seeds]
    if all(isinstance(r, dict) for r in results):
        keys = results[0].keys()
        return {k: SeedStats(tuple(float(r[k]) for r in results), seeds, confidence) for k in keys}
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in results):
        raise ValueError(f"run(seed) must return a number or a dict of numbers, got {results[0]!r}")
    return SeedStats(tuple(float(r) for r in results), seeds, confidence)


def compare(configs: dict[str, Callable[[int], float | dict]], seeds: Iterable[int] = (0, 1, 2),
            confidence: float = 0.95, progress: bool = False) -> dict:
    """over_seeds for each named configuration: {name: SeedStats or {metric: SeedStats}}."""
    from ..progress import progress_bar
    if not configs:
        raise ValueError("compare needs at least one configuration")
    out = {}
    for name in progress_bar(configs, desc="configurations", enabled=progress):
        out[name] = over_seeds(configs[name], seeds, confidence)
    return out


def separated(a: SeedStats, b: SeedStats) -> bool:
    """True when the two confidence intervals do not overlap (a conservative test of a difference)."""
    return a.ci[1] < b.ci[0] or b.ci[1] < a.ci[0]
