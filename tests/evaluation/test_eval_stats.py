"""Statistics functions checked against reference values from scikit-learn, scipy and lifelines."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from napari_protodiff.core.evaluation import metrics as M
from napari_protodiff.core.evaluation import stats as S


def _binary(n=80, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.clip(0.3 * y + rng.normal(0.35, 0.25, n), 0, 1)
    return y, s


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    y, s = _binary()
    assert M.auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert M.balanced_accuracy(y, s) == pytest.approx(balanced_accuracy_score(y, s > 0.5))
    assert M.f1_macro(y, s) == pytest.approx(f1_score(y, s > 0.5, average="macro"))
    rng = np.random.default_rng(1)
    y3 = rng.integers(0, 3, 90)
    p3 = rng.dirichlet([1, 1, 1], 90)
    p3[np.arange(90), y3] += 0.4
    p3 /= p3.sum(1, keepdims=True)
    assert M.auc(y3, p3) == pytest.approx(roc_auc_score(y3, p3, multi_class="ovr", average="macro"))
    assert M.f1_macro(y3, p3) == pytest.approx(f1_score(y3, p3.argmax(1), average="macro"))
    assert np.isnan(M.auc(np.zeros(5, int), np.linspace(0, 1, 5)))


def test_c_index_matches_brute_force_harrell():
    rng = np.random.default_rng(2)
    n = 60
    t = rng.exponential(10, n).round(1)  # some ties
    e = rng.random(n) < 0.7
    r = -t + rng.normal(0, 5, n)
    num = den = 0.0
    for i in range(n):
        for j in range(n):
            if e[i] and t[i] < t[j]:
                den += 1
                num += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
    assert M.c_index(t, e, r) == pytest.approx(num / den, abs=0.01)  # lifelines also counts tied-time pairs
    assert np.isnan(M.c_index(t, np.zeros(n), r))


def test_bootstrap_ci_matches_scipy_percentile():
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 2.0, 200)
    ci = M.bootstrap(lambda i: x[i].mean(), len(x), n_boot=4000, seed=0)
    ref = sps.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=1).confidence_interval
    assert ci.value == pytest.approx(x.mean())
    assert ci.low == pytest.approx(ref.low, abs=0.05)
    assert ci.high == pytest.approx(ref.high, abs=0.05)


def test_grouped_bootstrap_is_wider_for_clustered_data():
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(20), 10)
    x = rng.normal(0, 1, 20)[groups] + rng.normal(0, 0.1, 200)
    flat = M.bootstrap(lambda i: x[i].mean(), 200, n_boot=1000)
    grouped = M.bootstrap(lambda i: x[i].mean(), 200, groups=groups, n_boot=1000)
    assert (grouped.high - grouped.low) > 2 * (flat.high - flat.low)


def test_exact_paired_permutation_matches_scipy():
    rng = np.random.default_rng(5)
    a = rng.normal(0.3, 1, 10)
    b = rng.normal(0.0, 1, 10)
    mean = lambda pred, idx: pred[idx].mean()  # noqa: E731
    p = S.paired_permutation(mean, a, b, n_perm=5000)
    ref = sps.permutation_test((a, b), lambda x, y: np.mean(x) - np.mean(y), permutation_type="samples",
                               n_resamples=np.inf, alternative="two-sided").pvalue
    assert p == pytest.approx(ref)


def test_paired_permutation_of_auc_matches_scipy():
    y, _ = _binary(10, seed=6)
    rng = np.random.default_rng(7)
    a = 0.5 * y + rng.random(10)
    b = rng.random(10)
    aucm = lambda pred, idx: M.auc(y[idx], pred[idx])  # noqa: E731
    p = S.paired_permutation(aucm, a, b, n_perm=5000)
    ref = sps.permutation_test((a, b), lambda x, z: M.auc(y, x) - M.auc(y, z), permutation_type="samples",
                               n_resamples=np.inf, vectorized=False).pvalue
    assert p == pytest.approx(ref)


def test_compare_verdicts():
    y, _ = _binary(150, seed=8)
    rng = np.random.default_rng(9)
    good = y + rng.normal(0, 0.5, 150)
    bad = rng.normal(0, 1, 150)
    aucm = lambda pred, idx: M.auc(y[idx], pred[idx])  # noqa: E731
    c = S.compare("auc", aucm, good, bad, n_boot=500, n_perm=300)
    assert c.verdict == "wins" and c.p_value < 0.01 and c.diff > 0.3
    assert S.compare("auc", aucm, bad, good, n_boot=500).verdict == "loses"
    same = S.compare("auc", aucm, good, good + rng.normal(0, 1e-3, 150), n_boot=500, n_perm=200)
    assert same.verdict == "ties" and same.p_value > 0.05


def test_kaplan_meier_matches_product_limit():
    t = np.array([2, 3, 3, 5, 7, 8, 8, 11, 12, 15.0])
    e = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 0])
    km = S.kaplan_meier(t, e)
    s, ref = 1.0, {}
    for u in np.unique(t[e == 1]):
        s *= 1 - ((t == u) & (e == 1)).sum() / (t >= u).sum()
        ref[u] = s
    for u, v in ref.items():
        assert km.survival[km.time == u][0] == pytest.approx(v)


def test_logrank_matches_manual_chi_square():
    rng = np.random.default_rng(10)
    t = np.concatenate([rng.exponential(5, 40), rng.exponential(9, 40)])
    e = rng.random(80) < 0.8
    g = np.repeat([0, 1], 40)
    o_minus_e = var = 0.0
    for u in np.unique(t[e]):
        at = t >= u
        n, n1 = at.sum(), (at & (g == 1)).sum()
        d = ((t == u) & e).sum()
        d1 = ((t == u) & e & (g == 1)).sum()
        o_minus_e += d1 - d * n1 / n
        if n > 1:
            var += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
    chi2 = o_minus_e**2 / var
    stat, p = S.logrank(t, e, g)
    assert stat == pytest.approx(chi2, rel=1e-6)
    assert p == pytest.approx(sps.chi2.sf(chi2, 1), rel=1e-6)
    assert set(S.risk_groups(np.arange(10.0))) == {0, 1}
