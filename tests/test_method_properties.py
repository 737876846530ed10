"""Invariants of the methods (hypothesis). Statistical properties run derandomized: no flaky CI."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from sefusion.methods import TensorContext
from sefusion.methods._ops import (
    dare,
    dare_seed,
    keep_count,
    model_thresholds,
    topk_mask,
    trim,
    trim_model_scope,
)
from sefusion.registry import METHODS

FAST = settings(max_examples=40, deadline=None)
STATS = settings(max_examples=15, deadline=None, derandomize=True)

# bf16-representable magnitudes, few of them: plenty of exact ties
BF16_LEVELS = [0.0, 2.0**-7, 3 * 2.0**-8, 2.0**-6, 0.0078125 * 5, 0.5]


def fn(name):
    return METHODS.get(name).fn


def t32(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float32))


@st.composite
def models(draw, min_tasks=2, max_tasks=4, max_size=40):
    """(base, taus, experts): base in [1, 2), theta_t - theta0 exact in float32."""
    n_tasks = draw(st.integers(min_tasks, max_tasks))
    size = draw(st.integers(1, max_size))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = rng.uniform(1, 2, size).astype(np.float32)
    taus = rng.uniform(-0.5, 0.5, (n_tasks, size)) * (rng.random((n_tasks, size)) > 0.3)
    experts = [(base + t).astype(np.float32) for t in taus]
    taus = [e - base for e in experts]  # exact (Sterbenz)
    return base, taus, experts


@FAST
@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=60))
def test_density_one_is_the_identity(values):
    x = t32(values)
    assert torch.equal(trim(x, 1.0), x)
    assert torch.equal(dare(x, 1.0, True, 3), x)


@FAST
@given(
    st.lists(st.sampled_from(BF16_LEVELS), min_size=1, max_size=300),
    st.lists(st.booleans(), min_size=300, max_size=300),
    st.floats(0.001, 1.0),
)
def test_exact_k_on_bf16_ties(levels, signs, density):
    x = np.array([v if s else -v for v, s in zip(levels, signs, strict=False)], dtype=np.float32)
    mask = topk_mask(t32(x), keep_count(density, x.size)).numpy()
    assert mask.sum() == min(ref.keep_count(density, x.size), np.count_nonzero(x))
    np.testing.assert_array_equal(mask, ref.topk_mask(x, ref.keep_count(density, x.size)))


@FAST
@given(
    st.lists(st.integers(0, 30), min_size=1, max_size=4),
    st.tuples(st.floats(0.01, 1.0), st.floats(0.01, 1.0)),
    st.integers(0, 2**32 - 1),
)
def test_model_scope_threshold_is_the_sorted_reference(sizes, densities, seed):
    rng = np.random.default_rng(seed)
    # experts[t][i]: tensor i of expert t, drawn from few levels so that ties cross tensors
    experts = [[rng.choice(BF16_LEVELS, i) * rng.choice([-1, 1], i) for i in sizes] for _ in range(2)]
    by_tensor = [[t32(experts[t][i]) for t in range(2)] for i in range(len(sizes))]
    thresholds = model_thresholds(lambda: iter(by_tensor), 2, list(densities))
    for t in range(2):
        assert thresholds[t].value == ref.model_kth_largest(experts[t], densities[t])
    want = [ref.model_topk_masks(experts[t], densities[t]) for t in range(2)]
    for i, taus in enumerate(by_tensor):
        kept = trim_model_scope(torch.stack(taus), thresholds) != 0
        for t in range(2):
            np.testing.assert_array_equal(kept[t].numpy(), want[t][i])
    assert [th.equal_left for th in thresholds] == [0, 0]


@st.composite
def disjoint_models(draw):
    n_tasks = draw(st.integers(2, 4))
    size = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    owner = rng.integers(-1, n_tasks, size)  # -1: no task changes this entry
    base = rng.uniform(1, 2, size).astype(np.float32)
    scale = rng.choice([1e-3, 1e-2, 0.3], n_tasks)  # weak and strong tasks
    experts = [
        np.where(
            owner == t, base + rng.uniform(0.1, 1, size) * scale[t] * rng.choice([-1, 1], size), base
        ).astype(np.float32)
        for t in range(n_tasks)
    ]
    lambdas = [float(x) for x in rng.uniform(0, 2, n_tasks)]
    return base, experts, lambdas


@FAST
@given(disjoint_models())
def test_disjoint_experts_are_rebuilt(model):
    base, experts, lambdas = model
    ones = [1.0] * len(experts)
    b = t32(base)
    out = fn("tall_masks")(b, [t32(e) for e in experts], ones, lambdas=lambdas)
    for t, e in enumerate(experts):
        np.testing.assert_array_equal((b + out.masks[t] * out.vector).numpy(), e)  # exact
    out = fn("scaling_masks")(b, [t32(e) for e in experts], ones, lambdas=lambdas)
    for t, e in enumerate(experts):
        rebuilt = b + (out.masks[t] * out.vector) / out.scales[t]
        # s * tau / s may round by one float32 ulp of tau: that, and nothing else, is allowed
        np.testing.assert_allclose(rebuilt.numpy(), e, rtol=2**-22, atol=0)
        np.testing.assert_array_equal(out.masks[t].numpy(), e != base)


@FAST
@given(models(), st.sampled_from(["task_arithmetic", "ties"]), st.floats(0.0, 1.0))
def test_scaling_masks_equals_tall_with_equal_ranges(model, base_merge, lam):
    _, taus, _ = model
    radius = np.float32(0.25)
    taus = [np.clip(t, -radius, radius) for t in taus]
    for t in taus:
        t[0] = radius  # every task's absmax is exactly `radius`
    base = torch.zeros(taus[0].shape)  # theta_t = tau_t exactly
    experts = [t32(t) for t in taus]
    kw = {"lambdas": lam, "base_merge": base_merge}
    ones = [1.0] * len(taus)
    scaled = fn("scaling_masks")(base, experts, ones, **kw)
    tall = fn("tall_masks")(base, experts, ones, **kw)
    assert scaled.scales.tolist() == ones
    assert torch.equal(scaled.vector, tall.vector) and torch.equal(scaled.masks, tall.masks)


@FAST
@given(models(max_tasks=3), st.integers(0, 2), st.floats(0.1, 10.0), st.floats(0.0, 1.0))
def test_scaling_a_task_leaves_scaling_masks_unchanged(model, which, c, lam):
    _, taus, _ = model
    which = which % len(taus)
    zero = np.zeros_like(taus[0])
    # s_max out of reach: a clipped scale is not proportional any more, and then the masks may change
    # (hypothesis found one: a 5e-5 task's scale 6.4e3 became 2.6e4 > s_max 1e4 when the strongest task grew 4x)
    kw = {"lambdas": lam, "s_max": 1e30}
    original = fn("scaling_masks")(t32(zero), [t32(t) for t in taus], [1.0] * len(taus), **kw)
    taus2 = [t * np.float32(c) if i == which else t for i, t in enumerate(taus)]
    changed = fn("scaling_masks")(t32(zero), [t32(t) for t in taus2], [1.0] * len(taus), **kw)
    margin, size = ref.tall_margins(
        zero, taus, [1.0] * len(taus), [lam] * len(taus), scales=original.scales.numpy()
    )
    differ = (original.masks != changed.masks).numpy()
    assert not (differ & (np.abs(margin) > 1e-5 * size)).any()  # only float32 near-ties may flip


@FAST
@given(models(), st.sampled_from(["task_arithmetic", "ties"]))
def test_consensus_extremes(model, base_merge):
    base, _, experts = model
    b = t32(base)
    ex = [t32(e) for e in experts]
    weights = [1.0 + 0.5 * i for i in range(len(ex))]
    vec = fn("tall_masks")(b, ex, weights, base_merge=base_merge).vector
    assert torch.equal(fn("consensus")(b, ex, weights, k=0, base_merge=base_merge), b + vec)
    assert torch.equal(fn("consensus")(b, ex, weights, k=len(ex) + 1, base_merge=base_merge), b)


@STATS
@given(st.floats(0.05, 0.95), st.integers(0, 2**31), st.text(min_size=1, max_size=20))
def test_dare_keeps_a_density_share(density, seed, name):
    n = 4096
    x = torch.linspace(1.0, 2.0, n)
    kept = int((dare(x, density, True, dare_seed(seed, name, 0)) != 0).sum())
    assert abs(kept - n * density) <= 4 * math.sqrt(n * density * (1 - density))


@STATS
@given(st.floats(0.1, 0.9), st.integers(0, 2**31))
def test_dare_is_unbiased(density, seed):
    tau = torch.from_numpy(np.random.default_rng(seed).normal(size=64).astype(np.float32))
    draws = 2000
    mean = sum(dare(tau, density, True, dare_seed(seed, f"w{i}", 0)) for i in range(draws)) / draws
    sigma = tau.abs() * math.sqrt((1 - density) / (density * draws))  # std of the mean of `draws` draws
    z = (mean - tau) / sigma
    assert z.abs().max() <= 5
    assert abs(float(z.sum())) / math.sqrt(tau.numel()) <= 4


@FAST
@given(st.integers(0, 2**31), st.text(min_size=1, max_size=10))
def test_dare_is_deterministic_per_seed_name_index(seed, name):
    base = torch.ones(256)
    experts = [base + torch.linspace(0.1, 0.2, 256)] * 2  # two identical experts
    ctx = TensorContext(name=name, seed=seed)
    one = fn("dare_linear")(base, experts, [1.0, 1.0], density=0.5, ctx=ctx)
    torch.manual_seed(seed + 1)  # the global generator plays no part
    assert torch.equal(one, fn("dare_linear")(base, experts, [1.0, 1.0], density=0.5, ctx=ctx))
    other = fn("dare_linear")(
        base, experts, [1.0, 1.0], density=0.5, ctx=TensorContext(name=name + "x", seed=seed)
    )
    assert not torch.equal(one, other)
    # the two identical experts are dropped independently (the index enters the seed)
    masks = [dare(experts[0] - base, 0.5, True, dare_seed(seed, name, i)) != 0 for i in range(2)]
    assert not torch.equal(masks[0], masks[1])
