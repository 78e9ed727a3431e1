"""The evidence page's statistics against printed tables and, where installed, scipy."""

import math

import pytest

from benchmarks import stats

# two-sided 5% critical values of Student's t (any statistics table)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 8: 2.306, 30: 2.042}


@pytest.mark.parametrize("df,crit", sorted(T_975.items()))
def test_t_quantiles_match_the_table(df, crit):
    assert stats.t_ppf(0.975, df) == pytest.approx(crit, abs=1e-3)
    assert stats.t_cdf(crit, df) == pytest.approx(0.975, abs=1e-4)
    assert stats.t_cdf(-crit, df) == pytest.approx(0.025, abs=1e-4)


def test_t_and_welch_against_scipy():
    sp = pytest.importorskip("scipy.stats")
    for df in (1.3, 2.0, 4.7, 11.0, 80.0):
        for t in (-3.1, -0.4, 0.0, 1.7, 6.0):
            assert stats.t_cdf(t, df) == pytest.approx(sp.t.cdf(t, df), abs=1e-10)
        assert stats.t_ppf(0.8, df) == pytest.approx(sp.t.ppf(0.8, df), abs=1e-8)
        # the far quantile a Holm-corrected page's strictest step needs (21 comparisons)
        assert stats.t_ppf(1 - 0.05 / 42, df) == pytest.approx(sp.t.ppf(1 - 0.05 / 42, df), rel=1e-8)
    a, b = [0.71, 0.69, 0.73, 0.70], [0.64, 0.66, 0.61]
    ours, ref = stats.welch(a, b), sp.ttest_ind(a, b, equal_var=False)
    assert ours.p == pytest.approx(ref.pvalue, rel=1e-8)
    ci = ref.confidence_interval(0.95)
    assert (ours.low, ours.high) == (pytest.approx(ci.low, rel=1e-7), pytest.approx(ci.high, rel=1e-7))


def test_welch_by_hand_and_its_detectable_effect():
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]
    w = stats.welch(a, b)
    va, vb = 1.0 / 3, 4.0 / 3
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    assert w.diff == -2.0 and w.df == pytest.approx(df)
    se = math.sqrt(va + vb)
    assert w.mde == pytest.approx((stats.t_ppf(0.975, df) + stats.t_ppf(0.8, df)) * se)
    assert w.detectable() == pytest.approx(w.mde)
    # at Holm's strictest step over 20 comparisons (alpha / 20) the same seeds need a larger effect
    assert w.detectable(0.05 / 20) == pytest.approx((stats.t_ppf(1 - 0.05 / 40, df) + stats.t_ppf(0.8, df)) * se)
    assert w.detectable(0.05 / 20) > 1.5 * w.mde
    assert stats.welch([1.0], b) is None
    same = stats.welch([0.5, 0.5], [0.5, 0.5])
    assert same.p == 1.0 and same.diff == 0.0


def test_holm_adjusts_step_down_and_keeps_the_order():
    # p = (0.01, 0.04, 0.03, 0.2): sorted 0.01*4, 0.03*3, 0.04*2, 0.2*1 -> 0.04, 0.09, 0.09 (monotone), 0.2
    assert stats.holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0]
    assert stats.holm([]) == []
