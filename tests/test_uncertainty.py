"""Bootstrap intervals against independent references: hand-worked resample distributions, the binomial
standard error, scipy.stats.bootstrap, and invariants (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from sefusion.study import uncertainty as U


def test_two_examples_hand_worked():
    # scores (0, 1): a resample holds 0, 1 or 2 ones with probability 1/4, 1/2, 1/4 -> means 0, .5, 1
    w = U.resample_weights(2, b=20000, seed=3)
    reps = U.replicates(w, np.array([0.0, 1.0]))
    freq = {v: float(np.mean(reps == v)) for v in (0.0, 0.5, 1.0)}
    assert freq[0.0] == pytest.approx(0.25, abs=0.01)
    assert freq[0.5] == pytest.approx(0.5, abs=0.01)
    assert freq[1.0] == pytest.approx(0.25, abs=0.01)
    iv = U.interval([0, 1], b=20000)
    assert (iv.estimate, iv.low, iv.high) == (0.5, 0.0, 1.0)


def test_two_clusters_hand_worked():
    # file A holds two right answers, file B one wrong: draws AA, AB/BA, BB -> means 1, 2/3, 0
    w = U.resample_weights(3, ["A", "A", "B"], b=20000, seed=1)
    assert np.array_equal(w[:, 0], w[:, 1]) and np.all(w.sum(1) >= 2)
    reps = U.replicates(w, np.array([1.0, 1.0, 0.0]))
    assert set(np.round(reps, 9)) == {1.0, round(2 / 3, 9), 0.0}
    assert np.mean(reps == 1.0) == pytest.approx(0.25, abs=0.01)
    assert np.mean(np.isclose(reps, 2 / 3)) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("p,n", [(0.3, 400), (0.7, 1000), (0.5, 150)])
def test_iid_sd_matches_binomial_standard_error(p, n):
    rng = np.random.default_rng(7)
    x = (rng.random(n) < p).astype(float)
    reps = U.replicates(U.resample_weights(n, b=4000, seed=2), x)
    ph = x.mean()
    assert reps.std() == pytest.approx(math.sqrt(ph * (1 - ph) / n), rel=0.05)


def test_iid_interval_matches_scipy_percentile():
    rng = np.random.default_rng(11)
    x = (rng.random(300) < 0.6).astype(float)
    ours = U.interval(x, b=4000, seed=5)
    ref = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", rng=1).confidence_interval
    assert ours.low == pytest.approx(ref.low, abs=0.012)
    assert ours.high == pytest.approx(ref.high, abs=0.012)


def test_reciprocal_rank_interval_matches_scipy():
    rng = np.random.default_rng(2)
    rr = 1.0 / rng.integers(1, 20, size=250)
    ours = U.interval(rr, b=4000)
    ref = stats.bootstrap((rr,), np.mean, n_resamples=4000, method="percentile", rng=3).confidence_interval
    assert ours.low == pytest.approx(ref.low, abs=0.01)
    assert ours.high == pytest.approx(ref.high, abs=0.01)


def test_clusters_widen_the_interval():
    # 20 files of 10 examples each, all right or all wrong within a file: the effective n is 20, not 200
    x = np.repeat((np.arange(20) % 2).astype(float), 10)
    files = np.repeat(np.arange(20), 10).tolist()
    iid, clustered = U.interval(x), U.interval(x, files)
    assert clustered.high - clustered.low > 2.5 * (iid.high - iid.low)
    # against the analytic cluster standard error: sd of file means / sqrt(files)
    reps = U.replicates(U.resample_weights(200, files, b=4000), x)
    assert reps.std() == pytest.approx(0.5 / math.sqrt(20), rel=0.06)


def test_statistic_over_indices_equals_the_mean_path():
    rng = np.random.default_rng(0)
    x = rng.random(60)
    files = rng.integers(0, 12, size=60).tolist()
    fast = U.interval(x, files, b=300)
    slow = U.interval(statistic=lambda idx: float(x[idx].mean()), n=60, clusters=files, b=300)
    assert (slow.estimate, slow.low, slow.high) == pytest.approx((fast.estimate, fast.low, fast.high))


def test_corpus_level_statistic():
    # a ratio of sums (like corpus BLEU's precision): not a mean of per-example values
    hits, total = np.array([3, 0, 5, 2, 4.0]), np.array([4, 2, 5, 3, 6.0])
    iv = U.interval(statistic=lambda i: hits[i].sum() / total[i].sum(), n=5, b=500)
    assert iv.estimate == pytest.approx(14 / 20) and iv.low <= iv.estimate <= iv.high


def test_paired_difference_sees_what_unpaired_misses():
    # b is a everywhere except 8 of 400 examples: the paired interval is narrow and excludes 0
    rng = np.random.default_rng(4)
    a = (rng.random(400) < 0.6).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 1)[:8]] = 0
    d = U.paired_difference(a, b)
    assert d.estimate == pytest.approx(8 / 400) and d.significant and d.low > 0


def test_ratio_intervals_use_the_same_resamples():
    f = np.array([1, 0, 1, 1, 0, 1, 1, 0] * 25, dtype=float)
    e = np.ones_like(f)
    p = np.zeros_like(f)
    n = U.normalized(f, e)
    g = U.gain_kept(f, e, p)
    # expert all right, pretrained all wrong: normalized = gain kept = accuracy of the fused row
    acc = U.interval(f)
    assert (n.estimate, n.low, n.high) == pytest.approx((acc.estimate, acc.low, acc.high))
    assert (g.estimate, g.low, g.high) == pytest.approx((acc.estimate, acc.low, acc.high))


def test_gain_kept_unbounded_when_expert_does_not_beat_pretrained():
    rng = np.random.default_rng(1)
    e = (rng.random(100) < 0.5).astype(float)
    g = U.gain_kept(e, e, e[::-1].copy())
    assert not g.bounded and not g.significant
    assert "unbounded" in U.format_interval(g)


def test_over_seeds():
    s = U.over_seeds([0.80, 0.82, 0.84])
    assert s["mean"] == pytest.approx(0.82) and s["sd"] == pytest.approx(0.02) and s["n"] == 3
    assert U.format_over_seeds(s) == "0.820 ± 0.020"
    assert U.over_seeds([0.5])["sd"] is None


def test_compare_rows_and_errors():
    rows = {"fused": [1, 0, 1, 1], "expert": [1, 1, 1, 1]}
    out = U.compare_rows(rows, [("fused", "expert")])
    assert set(out) == {"fused", "expert", "fused - expert"}
    assert out["fused - expert"]["estimate"] == pytest.approx(-0.25)
    with pytest.raises(U.UncertaintyError, match="row 'multitask'"):
        U.compare_rows(rows, [("fused", "multitask")])
    with pytest.raises(U.UncertaintyError, match="3 entries but the other row has 4"):
        U.paired_difference([1, 0, 1, 1], [1, 0, 1])
    with pytest.raises(U.UncertaintyError, match="2 cluster labels for 4"):
        U.interval([1, 0, 1, 1], ["a", "b"])
    with pytest.raises(U.UncertaintyError, match="NaN"):
        U.interval([1.0, math.nan])


def test_deterministic():
    x = np.random.default_rng(9).random(50)
    assert U.interval(x, seed=4) == U.interval(x, seed=4)
    assert U.interval(x, seed=4) != U.interval(x, seed=5)


scores = st.lists(st.sampled_from([0.0, 1.0, 0.5, 0.25]), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None)
@given(scores)
def test_paired_with_itself_is_zero(x):
    d = U.paired_difference(x, x, b=200)
    assert (d.estimate, d.low, d.high) == (0.0, 0.0, 0.0) and not d.significant


@settings(max_examples=40, deadline=None)
@given(scores, st.randoms(use_true_random=False))
def test_one_example_per_cluster_is_iid(x, rnd):
    names = [f"file{i}" for i in range(len(x))]
    rnd.shuffle(names)
    assert U.interval(x, names, b=200, seed=1) == U.interval(x, b=200, seed=1)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(0, 30))
def test_symmetric_scores_interval_contains_estimate(k, extra):
    # k ones and k zeros (plus padding halves): a symmetric replicate distribution around the mean
    x = [1.0] * k + [0.0] * k + [0.5] * extra
    iv = U.interval(x, b=300)
    assert iv.estimate == pytest.approx(0.5) and iv.low <= iv.estimate <= iv.high


@settings(max_examples=30, deadline=None)
@given(scores, st.lists(st.integers(0, 5), min_size=40, max_size=40))
def test_cluster_weights_constant_within_a_cluster(x, labels):
    files = labels[: len(x)]
    w = U.resample_weights(len(x), files, b=50)
    for f in set(files):
        cols = w[:, [i for i, c in enumerate(files) if c == f]]
        assert np.all(cols == cols[:, :1])
    reps = U.replicates(w, np.asarray(x))
    assert np.all(reps >= min(x) - 1e-12) and np.all(reps <= max(x) + 1e-12)
