"""Welch's t-test, its confidence interval and detectable effect, and Holm's correction: the
statistics of the evidence page (``benchmarks/evidence_report.py``), in plain Python so the page
regenerates anywhere without scipy.

Student's t distribution through the regularized incomplete beta function (Lentz's continued
fraction), ``I_x(a, b)`` with ``x = df / (df + t^2)``, ``a = df / 2``, ``b = 1 / 2``; quantiles by
bisection on the CDF.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

ALPHA = 0.05  # two-sided level of every comparison (family-wise, after Holm's correction)
POWER = 0.8  # the power at which the smallest detectable effect is stated


def _betacf(a: float, b: float, x: float) -> float:
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (``df`` may be fractional)."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (bisection on :func:`t_cdf`)."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Welch:
    """``a - b`` with Welch's unequal-variance t-test."""

    diff: float  # mean(a) - mean(b)
    low: float  # the (1 - ALPHA) confidence interval of diff
    high: float
    p: float  # two-sided
    df: float
    se: float  # the standard error of diff

    def detectable(self, alpha: float = ALPHA) -> float:
        """The smallest |diff| a two-sided test at level ``alpha`` detects with ``POWER`` at these
        variances and seeds: ``(t_{1-alpha/2} + t_POWER) * se`` at ``df``. A Holm-corrected page's
        comparisons face a level between alpha / m and alpha."""
        if self.se == 0.0:
            return 0.0
        return (t_ppf(1 - alpha / 2, self.df) + t_ppf(POWER, self.df)) * self.se

    @property
    def mde(self) -> float:
        """The smallest |diff| detectable at ``ALPHA`` with ``POWER``: ``detectable()``."""
        return self.detectable()

    def fmt(self, digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
        s = scale
        return (f"{self.diff * s:+.{digits}g}{unit} [{self.low * s:+.{digits}g}, {self.high * s:+.{digits}g}], "
                f"p {self.p:.2g}")


def welch(a: Sequence[float], b: Sequence[float]) -> Welch | None:
    """Welch's test of ``mean(a) - mean(b)``; None with fewer than 2 values on a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    diff = ma - mb
    if se == 0.0:  # identical runs on both sides: only an exact difference is significant
        return Welch(diff, diff, diff, 1.0 if diff == 0 else 0.0, math.inf, 0.0)  # se 0: nothing to detect
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = diff / se
    crit = t_ppf(1 - ALPHA / 2, df)
    p = 2.0 * (1.0 - t_cdf(abs(t), df))
    return Welch(diff, diff - crit * se, diff + crit * se, p, df, se)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error rate), in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
