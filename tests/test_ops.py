"""The shared building blocks of sefusion.methods._ops."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import reference as ref
from sefusion.methods import ModelThreshold, _ops
from sefusion.methods._ops import (
    ModelTopK,
    balanced_mask,
    dare,
    dare_seed,
    disjoint_merge,
    elect_sign,
    keep_count,
    model_thresholds,
    per_expert,
    quantile_abs,
    resolve_order,
    resolve_per_task,
    tall_mask,
    topk_mask,
    trim,
    trim_model_scope,
)


@pytest.mark.parametrize(
    ("density", "n", "k"),
    [
        (0.2, 1024, 205),
        (0.07, 100, 7),
        (0.55, 100, 55),
        (0.3, 10, 3),
        (0.1, 30, 3),
        (1.0, 17, 17),
        (1e-9, 5, 1),
        (0.5, 1, 1),
        (0.5, 0, 0),
    ],
)
def test_keep_count_is_the_decimal_ceil(density, n, k):
    assert keep_count(density, n) == k == ref.keep_count(density, n)


def test_topk_mask_exact_k_ties_by_index_zeros_never():
    x = torch.tensor([0.0, -2.0, 1.0, 2.0, -1.0, 1.0, 0.0, 1.0])
    assert topk_mask(x, 1).nonzero().flatten().tolist() == [1]
    assert topk_mask(x, 3).nonzero().flatten().tolist() == [1, 2, 3]
    assert topk_mask(x, 4).nonzero().flatten().tolist() == [1, 2, 3, 4]
    assert topk_mask(x, 7).nonzero().flatten().tolist() == [1, 2, 3, 4, 5, 7]  # only 6 non-zero
    assert topk_mask(x, 0).sum() == 0
    assert topk_mask(torch.tensor(-3.0), 1).tolist() is True
    assert topk_mask(torch.zeros(5), 2).sum() == 0  # k-th largest is 0: zeros are never kept


@pytest.mark.parametrize("seed", range(5))
def test_trim_matches_reference_on_rounded_data(seed):
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(size=(17, 23)) * 4) / 4  # few distinct magnitudes: many ties
    for density in (0.01, 0.2, 0.5, 0.9, 1.0):
        got = trim(torch.from_numpy(x.astype(np.float32)), density).numpy()
        np.testing.assert_array_equal(got, ref.trim(x, density))


def test_elect_and_disjoint_merge():
    trimmed = torch.tensor([[1.0, -2.0, 0.0, 1.0], [3.0, 1.0, 0.0, -1.0]])
    sign = elect_sign(trimmed, [1.0, 1.0])
    assert sign.tolist() == [1, -1, 0, 0]
    assert disjoint_merge(trimmed, [1.0, 1.0], sign, "mean").tolist() == [2.0, -2.0, 0.0, 0.0]
    assert disjoint_merge(trimmed, [1.0, 3.0], sign, "sum").tolist() == [10.0, -2.0, 0.0, 0.0]
    # weights move the election: 1 * 1 + 3 * (-1) < 0 at the last entry
    sign = elect_sign(trimmed, [1.0, 3.0])
    assert sign.tolist() == [1, 1, 0, -1]
    assert disjoint_merge(trimmed, [1.0, 3.0], sign, "mean").tolist() == [2.5, 1.0, 0.0, -1.0]


def test_dare_seed_and_mask():
    s = dare_seed(0, "layers.0.w", 1)
    assert s == dare_seed(0, "layers.0.w", 1) and 0 <= s < 2**63
    assert (
        len({s, dare_seed(1, "layers.0.w", 1), dare_seed(0, "layers.0.v", 1), dare_seed(0, "layers.0.w", 0)})
        == 4
    )
    x = torch.arange(1.0, 101.0)
    assert torch.equal(dare(x, 1.0, True, s), x)
    kept = dare(x, 0.3, False, s)
    assert torch.equal(kept != 0, dare(x, 0.3, True, s) != 0)
    np.testing.assert_allclose(dare(x, 0.3, True, s)[kept != 0], x[kept != 0] / 0.3, rtol=1e-6)
    with pytest.raises(ValueError, match="density must be in"):
        dare(x, 0.0, True, s)


def test_tall_mask_is_strict():
    tau = torch.tensor([1.0, 1.0, 0.0])
    mtl = torch.tensor([3.0, 3.5, 0.0])
    # |tau| > .5 |mtl - tau| = [1, 1.25, 0]
    assert tall_mask(tau, mtl, 0.5).tolist() == [False, False, False]


def test_balanced_mask_blocks_tail_taken():
    x = torch.tensor([0.1, 0.4, 0.4, 0.3, 0.9, 0.0, 0.2, 0.1, 0.5, 0.6])
    # 2:4 -> block [.1 .4 .4 .3]: 1, 2; block [.9 0 .2 .1]: 4, 6; tail of 2 keeps ceil(2*2/4) = 1: 9
    assert balanced_mask(x, 2, 4).nonzero().flatten().tolist() == [1, 2, 4, 6, 9]
    taken = torch.zeros(10, dtype=torch.bool)
    taken[[1, 2, 3, 4, 9]] = True
    # block 0 has one free position (0): it takes it; block 1 free 5 (zero), 6, 7
    assert balanced_mask(x, 2, 4, taken).nonzero().flatten().tolist() == [0, 6, 7, 8]
    assert balanced_mask(x, 4, 4).sum() == 9  # n == m keeps every non-zero
    with pytest.raises(ValueError, match=r"n \(5\) must be <= m \(4\)"):
        balanced_mask(x, 5, 4)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
@pytest.mark.parametrize("q", [0.0001, 0.25, 0.5, 0.99, 1.0])
def test_quantile_matches_numpy_linear(n, q):
    x = np.random.default_rng(n).normal(size=n).astype(np.float32)
    got = quantile_abs(torch.from_numpy(x), q)
    np.testing.assert_allclose(got, np.quantile(np.abs(x.astype(np.float64)), q), rtol=1e-6)


def test_quantile_above_torch_quantile_limit():
    x = torch.zeros(2**24 + 3)
    x[-5:] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert quantile_abs(x, 1.0) == 5.0
    assert quantile_abs(x, 0.5) == 0.0


def test_resolve_per_task():
    names = ("defect", "search")
    assert resolve_per_task(0.3, names, "lambdas") == [0.3, 0.3]
    assert resolve_per_task([0.2, 0.5], names, "lambdas") == [0.2, 0.5]
    assert resolve_per_task({"search": 0.6}, names, "lambdas", default=0.4) == [0.4, 0.6]
    with pytest.raises(ValueError, match=r"lambdas: unknown task name\(s\) 'serch'; tasks: defect, search"):
        resolve_per_task({"serch": 0.6}, names, "lambdas", default=0.4)
    with pytest.raises(ValueError, match=r"no value for task\(s\) 'defect'"):
        resolve_per_task({"search": 0.6}, names, "lambdas")
    with pytest.raises(ValueError, match="3 values for 2 tasks"):
        resolve_per_task([1, 2, 3], names, "lambdas")


def test_resolve_order_and_per_expert():
    names = ("a", "b", "c")
    assert resolve_order(None, names) == [0, 1, 2]
    assert resolve_order(["c", "a", "b"], names) == [2, 0, 1]
    with pytest.raises(ValueError, match="every task exactly once"):
        resolve_order(["c", "a"], names)
    with pytest.raises(ValueError, match=r"unknown task name\(s\) 'd'"):
        resolve_order(["a", "b", "d"], names)
    assert per_expert(0.2, 3, "density") == [0.2] * 3
    assert per_expert([0.1, 0.2], 2, "density") == [0.1, 0.2]
    with pytest.raises(ValueError, match="density: 1 values for 2 experts"):
        per_expert([0.1], 2, "density")


def _model(seed: int, shapes, n_experts: int, levels: int):
    rng = np.random.default_rng(seed)
    return [
        [np.asarray(rng.integers(-levels, levels + 1, size=s) / 8, dtype=np.float32) for s in shapes]
        for _ in range(n_experts)
    ]


@pytest.mark.parametrize("levels", [3, 1000])
def test_model_thresholds_exact(levels):
    shapes = [(10, 10), (3,), (), (40, 7)]
    experts = _model(levels, shapes, 3, levels)  # experts[t][i]: tensor i of expert t
    densities = [0.05, 0.3, 1.0]
    by_tensor = [[torch.from_numpy(experts[t][i]) for t in range(3)] for i in range(len(shapes))]
    thresholds = model_thresholds(lambda: iter(by_tensor), 3, densities)
    for t in range(3):
        assert thresholds[t].value == ref.model_kth_largest(experts[t], densities[t])
    # trimming tensor by tensor in order keeps exactly the reference's model-wide top-k
    want = [ref.model_topk_masks(experts[t], densities[t]) for t in range(3)]
    for i, taus in enumerate(by_tensor):
        kept = trim_model_scope(torch.stack([tau.reshape(-1) for tau in taus]), thresholds) != 0
        for t in range(3):
            np.testing.assert_array_equal(kept[t].numpy(), want[t][i].reshape(-1))
    assert all(th.equal_left == 0 for th in thresholds)


def test_model_topk_chunking_and_misuse():
    x = torch.tensor([0.5, -0.5, 0.25, 0.5, 0.0, 1.0, 0.5, 0.125])
    finder = ModelTopK(1, 0.5)  # k = 4: 1.0, then three of the four 0.5
    with pytest.raises(ValueError, match="2 passes needed, 0 done"):
        finder.thresholds()
    for _ in range(ModelTopK.PASSES):
        for chunk in (x[:3], x[3:5], x[5:]):
            finder.update([chunk])
        finder.end_pass()
    assert finder.thresholds() == [ModelThreshold(0.5, 3)]
    with pytest.raises(ValueError, match="both passes are done"):
        finder.update([x])
    with pytest.raises(ValueError, match="2 task vectors for 1 experts"):
        ModelTopK(1, 0.5).update([x, x])
    # fewer non-zero entries than k: keep every non-zero one
    assert model_thresholds(lambda: iter([[torch.tensor([0.0, 2.0, 0.0])]]), 1, 0.9) == [
        ModelThreshold(0.0, 0)
    ]
    # denormals and huge values keep their order
    y = torch.tensor([1, 3, 0x7F000000, 100, 2], dtype=torch.int32).view(torch.float32)
    value = model_thresholds(lambda: iter([[y]]), 1, 0.6)[0].value  # k = 3: huge, 100 ulp, 3 ulp
    assert value == torch.tensor(3, dtype=torch.int32).view(torch.float32).item() > 0


@pytest.mark.parametrize(
    "case", ["normal", "bf16_ties", "mostly_zero", "constant", "two_values", "heavy_tail"]
)
@pytest.mark.parametrize("density", [1e-6, 0.01, 0.2, 0.5, 0.97, 1.0])
def test_kth_largest_matches_kthvalue_on_large_inputs(case, density):
    """The sampled bracket gives exactly kthvalue's answer, including where it must fall back."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{case}{density}".encode()))
    n = 300_007
    if case == "normal":
        a = torch.randn(n, generator=g).abs()
    elif case == "bf16_ties":
        a = (torch.randn(n, generator=g) * 1e-3).to(torch.bfloat16).float().abs()
    elif case == "mostly_zero":
        a = torch.randn(n, generator=g).abs() * (torch.rand(n, generator=g) < 0.05)
    elif case == "constant":
        a = torch.full((n,), 0.25)
    elif case == "two_values":
        a = torch.where(torch.rand(n, generator=g) < 0.3, 1.0, 2.0)
    else:
        a = torch.randn(n, generator=g).abs() ** 8
    k = max(1, min(n, _ops.keep_count(density, n)))
    assert float(_ops.kth_largest(a, k)) == float(torch.kthvalue(a, n - k + 1).values)
    mask = _ops.topk_mask(a, k)
    assert int(mask.sum()) == min(k, int((a != 0).sum()))
