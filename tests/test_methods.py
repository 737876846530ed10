"""Every registered data-free method against the float64 reference (tests/reference.py) and by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference as ref
from sefusion.methods import BundleTensor, ModelThreshold, TensorContext
from sefusion.methods._ops import dare_seed, model_thresholds
from sefusion.registry import METHODS

SHAPES = [(), (1,), (7,), (65,), (5, 13), (3, 4, 5)]
DATA_FREE = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "consensus", "cabs"]
DATA_FREE += ["tall_masks", "scaling_masks"]


def bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.asarray(x, np.float32)).to(torch.bfloat16).float().numpy()


def make_models(seed: int, shape: tuple, n_experts: int, *, rounded: bool = False):
    """Base in +-[1, 2), |tau| <= 0.5, a share of exact zeros: theta_t - theta0 is exact in float32
    (Sterbenz), so both implementations see identical task vectors. `rounded`: bf16 checkpoints, whose
    task vectors are multiples of 2**-8 with many equal magnitudes."""
    rng = np.random.default_rng(seed)
    sign = rng.choice([-1.0, 1.0], size=shape)
    base = (rng.uniform(1, 2, size=shape) * sign).astype(np.float32)
    taus = rng.normal(0, 0.1, size=(n_experts, *shape)).clip(-0.5, 0.5)
    taus *= rng.random(size=taus.shape) > 0.2
    experts = [(base + t).astype(np.float32) for t in taus]
    if rounded:
        base = bf16(base)
        experts = [bf16(base + t) for t in taus]
    weights = [float(w) for w in rng.uniform(0.3, 2.0, size=n_experts)]
    return base, experts, weights, rng


def call(name: str, base, experts, weights, ctx=None, **params):
    fn = METHODS.get(name).fn
    kwargs = dict(params)
    if ctx is not None:
        kwargs["ctx"] = ctx
    base_t = None if base is None else torch.from_numpy(np.asarray(base, np.float32))
    out = fn(base_t, [torch.from_numpy(np.asarray(e, np.float32)) for e in experts], weights, **kwargs)
    if isinstance(out, BundleTensor):
        assert out.vector.dtype == torch.float32 and out.masks.dtype == torch.bool
        return out
    assert out.dtype == torch.float32 and tuple(out.shape) == np.shape(experts[0])
    return out.numpy()


def close(got, want) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def masks_agree(got, want, margin, size) -> None:
    """Masks must match except where the float64 margin is within float32 rounding of zero."""
    differ = np.asarray(got) != np.asarray(want)
    near_tie = np.abs(margin) <= 1e-5 * size
    assert not (differ & ~near_tie).any(), f"{int((differ & ~near_tie).sum())} mask entries differ"


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("shape", SHAPES)
def test_linear_and_task_arithmetic(shape):
    base, experts, weights, _ = make_models(1, shape, 3)
    close(call("linear", None, experts, weights), ref.linear(experts, weights))
    close(call("linear", base, experts, weights, normalize=False), ref.linear(experts, weights, False))
    close(
        call("task_arithmetic", base, experts, weights, lambda_=0.7),
        ref.task_arithmetic(base, experts, weights, 0.7),
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rounded", [False, True])
@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_ties(shape, rounded, merge):
    base, experts, weights, rng = make_models(2, shape, 3, rounded=rounded)
    densities = [0.3, float(rng.uniform(0.05, 1)), 1.0]
    got = call("ties", base, experts, weights, density=densities, lambda_=0.9, merge=merge)
    close(got, ref.ties(base, experts, weights, densities, 0.9, merge))
    got = call("ties", base, experts, weights, density=0.2, merge=merge)
    close(got, ref.ties(base, experts, weights, [0.2] * 3, 1.0, merge))


@pytest.mark.parametrize("rounded", [False, True])
def test_ties_model_scope_across_tensors(rounded):
    """Three tensors merged in order with the model-wide thresholds == top-k of their concatenation."""
    shapes = [(4, 9), (1,), (50,)]
    models = [make_models(10 + i, s, 2, rounded=rounded) for i, s in enumerate(shapes)]
    weights = [1.0, 1.5]
    densities = [0.1, 0.35]
    taus = [[torch.from_numpy(e - b) for e in experts] for b, experts, _, _ in models]
    thresholds = model_thresholds(lambda: iter(taus), 2, densities)
    keeps = [
        ref.model_topk_masks([ref.task_vectors(b, ex)[t] for b, ex, _, _ in models], densities[t])
        for t in range(2)
    ]
    for i, (base, experts, _, _) in enumerate(models):
        ctx = TensorContext(name=f"w{i}", model_thresholds=thresholds)
        got = call("ties", base, experts, weights, ctx=ctx, density_scope="model", merge="mean")
        trimmed = [np.where(keeps[t][i], tau, 0.0) for t, tau in enumerate(ref.task_vectors(base, experts))]
        close(got, ref.f64(base) + ref.ties_merge(trimmed, weights, "mean"))
    assert [th.equal_left for th in thresholds] == [0, 0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_linear(shape, rescale):
    base, experts, weights, _ = make_models(3, shape, 3)
    densities = [0.5, 0.9, 1.0]
    ctx = TensorContext(name="model.layers.0.mlp.up_proj.weight", seed=7)
    got = call(
        "dare_linear", base, experts, weights, ctx=ctx, density=densities, lambda_=0.8, rescale=rescale
    )
    keeps = dare_keeps(ctx, shape, densities)
    close(got, ref.dare_linear(base, experts, weights, densities, 0.8, rescale, keeps))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_dare_ties(shape, merge):
    base, experts, weights, _ = make_models(4, shape, 3, rounded=True)
    ctx = TensorContext(name="embed", seed=1)
    got = call("dare_ties", base, experts, weights, ctx=ctx, density=0.4, merge=merge, lambda_=1.2)
    keeps = dare_keeps(ctx, shape, [0.4] * 3)
    close(got, ref.dare_ties(base, experts, weights, [0.4] * 3, 1.2, merge, keeps))


def dare_keeps(ctx, shape, densities):
    """The Bernoulli masks the library documents: CPU generator seeded with dare_seed(seed, name, t)."""
    gens = [torch.Generator().manual_seed(dare_seed(ctx.seed, ctx.name, t)) for t in range(len(densities))]
    return [(torch.rand(shape, generator=g) < d).numpy() for g, d in zip(gens, densities, strict=True)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("base_merge", ["task_arithmetic", "ties"])
def test_tall_masks_and_consensus(shape, base_merge):
    base, experts, weights, _ = make_models(5, shape, 4)
    names = ("defect", "search", "summarize", "clone")
    lambdas = {"defect": 0.2, "clone": 0.6}  # the others take 0.4
    lam = [0.2, 0.4, 0.4, 0.6]
    ctx = TensorContext(name="w", task_names=names)
    out = call("tall_masks", base, experts, weights, ctx=ctx, lambdas=lambdas, base_merge=base_merge)
    vec, masks = ref.tall(base, experts, weights, lam, base_merge)
    assert out.scales is None and tuple(out.masks.shape) == (4, *shape)
    close(out.vector.numpy(), vec)
    masks_agree(out.masks.numpy(), masks, *ref.tall_margins(base, experts, weights, lam, base_merge))
    for k in (0, 1, 2, 4, 5):
        got = call(
            "consensus",
            base,
            experts,
            weights,
            ctx=ctx,
            lambdas=lambdas,
            k=k,
            alpha=0.8,
            base_merge=base_merge,
        )
        close(got, ref.consensus(base, experts, weights, lam, k, 0.8, base_merge))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"stat": "quantile", "q": 0.9},
        {"stat": "quantile", "q": 1.0, "rho": 0.5},
        {"rho": 0.8, "s_max": 3.0},
        {"base_merge": "ties", "lambdas": [0.3, 0.5, 0.2]},
    ],
)
def test_scaling_masks(shape, params):
    base, experts, weights, _ = make_models(6, shape, 3)
    experts[2] = (base + (experts[2] - base) * np.float32(0.05)).astype(np.float32)  # one weak task
    p = {"lambdas": 0.4, **params}
    lam = p["lambdas"] if isinstance(p["lambdas"], list) else [p["lambdas"]] * 3
    out = call("scaling_masks", base, experts, weights, **p)
    refp = {k: v for k, v in p.items() if k != "lambdas"}
    vec, masks, scales = ref.scaling(base, experts, weights, lam, **refp)
    close(out.scales.numpy(), scales)
    close(out.vector.numpy(), vec)
    margins = ref.tall_margins(base, experts, weights, lam, p.get("base_merge", "task_arithmetic"), scales)
    masks_agree(out.masks.numpy(), masks, *margins)


@pytest.mark.parametrize("shape", [(), (1,), (7,), (65,), (5, 13), (3, 4, 5), (100,)])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 8), (3, 7), (5, 5), (16, 64)])
def test_cabs(shape, n, m):
    base, experts, weights, _ = make_models(7, shape, 3, rounded=True)
    names = ("a", "b", "c")
    ctx = TensorContext(task_names=names)
    close(call("cabs", base, experts, weights, ctx=ctx, n=n, m=m), ref.cabs(base, experts, weights, n, m))
    got = call("cabs", base, experts, weights, ctx=ctx, n=n, m=m, lambda_=0.5, order=["c", "a", "b"])
    close(got, ref.cabs(base, experts, weights, n, m, 0.5, [2, 0, 1]))


def test_empty_tensor():
    base = torch.zeros(0, 3)
    for name in DATA_FREE:
        out = METHODS.get(name).fn(base, [base, base], [1.0, 1.0])
        shape = out.vector.shape if isinstance(out, BundleTensor) else out.shape
        assert tuple(shape) == (0, 3), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    base, experts, weights, _ = make_models(9, (33, 65), 3, rounded=True)
    ctx = TensorContext(name="w", seed=3, task_names=("a", "b", "c"))
    for name in DATA_FREE:
        fn = METHODS.get(name).fn
        cpu = fn(torch.from_numpy(base), [torch.from_numpy(e) for e in experts], weights, ctx=ctx)
        gpu = fn(
            torch.from_numpy(base).cuda(), [torch.from_numpy(e).cuda() for e in experts], weights, ctx=ctx
        )
        if isinstance(cpu, BundleTensor):
            close(gpu.vector.cpu().numpy(), cpu.vector.numpy())
            assert torch.equal(gpu.masks.cpu(), cpu.masks), name
        else:
            close(gpu.cpu().numpy(), cpu.numpy())


# --------------------------------------------------------------------------- hand-worked


def test_ties_by_hand():
    # tau1 = [.5, -.25, .125, -.375, .25, 0]      density .5 -> k = 3: .5, .375, then .25 at index 1 (tie
    # tau2 = [-.125, -.375, .25, .625, -.25, .125]   with index 4); tau2: .625, .375, then .25 at index 2
    # trimmed1 = [.5, -.25, 0, -.375, 0, 0]  trimmed2 = [0, -.375, .25, .625, 0, 0]
    # w = (1, 2): sum = [.5, -1, .5, .875, 0, 0] -> gamma = [+, -, +, +, 0, 0]
    base = np.ones(6, np.float32)
    t1 = np.array([0.5, -0.25, 0.125, -0.375, 0.25, 0.0])
    t2 = np.array([-0.125, -0.375, 0.25, 0.625, -0.25, 0.125])
    experts = [base + t1, base + t2]
    mean = call("ties", base, experts, [1.0, 2.0], density=0.5)
    np.testing.assert_allclose(mean, 1 + np.array([0.5, -1 / 3, 0.25, 0.625, 0, 0]), rtol=1e-7)
    total = call("ties", base, experts, [1.0, 2.0], density=0.5, merge="sum", lambda_=0.5)
    np.testing.assert_array_equal(total, 1 + 0.5 * np.array([0.5, -1.0, 0.5, 1.25, 0, 0]))


def test_ties_keeps_exact_k_of_equal_bf16_magnitudes():
    # a bf16 layer-norm delta: every non-zero entry is +-2**-7; density .2 of 1024 asks for 205
    rng = np.random.default_rng(0)
    tau = (rng.choice([-1.0, 0.0, 1.0], size=1024, p=[0.45, 0.1, 0.45]) * 2.0**-7).astype(np.float32)
    base = np.ones(1024, np.float32)
    got = call("ties", base, [base + tau], [1.0], density=0.2) - base
    kept = np.flatnonzero(got)
    assert kept.size == 205
    np.testing.assert_array_equal(kept, np.flatnonzero(tau)[:205])  # lowest indices win the tie
    np.testing.assert_array_equal(got[kept], tau[kept])


def test_cabs_by_hand():
    # 2:4 on 8 entries. a first: block 0 -> .4 (0), .3 (2); block 1 -> .5 (4) only, zeros are not taken.
    # b: block 0 has only 1, 3 free -> both; block 1 free 5, 6, 7 -> .4 (7), .2 (6).
    base = np.zeros(8, np.float32)
    a = np.array([0.4, 0.1, 0.3, 0.2, 0.5, 0, 0, 0], np.float32)
    b = np.array([0.6, 0.2, -0.7, 0.2, 0.3, 0.1, -0.2, 0.4], np.float32)
    ctx = TensorContext(task_names=("a", "b"))
    got = call("cabs", base, [a, b], [1.0, 1.0], ctx=ctx, n=2, m=4)
    np.testing.assert_array_equal(got, np.array([0.4, 0.2, 0.3, 0.2, 0.5, 0, -0.2, 0.4], np.float32))
    # b first: block 0 -> .7 (2), .6 (0); block 1 -> .4 (7), .3 (4). a: block 0 free 1, 3; block 1 only zeros.
    got = call("cabs", base, [a, b], [1.0, 1.0], ctx=ctx, n=2, m=4, order=["b", "a"])
    np.testing.assert_array_equal(got, np.array([0.6, 0.1, -0.7, 0.2, 0.3, 0, 0, 0.4], np.float32))
    # 6 entries, 2:4: the trailing block of 2 keeps ceil(2*2/4) = 1; ties (.5, .5) go to the lower index
    c = np.array([0.5, 0.1, 0.5, 0.2, 0.3, 0.3], np.float32)
    got = call("cabs", np.zeros(6, np.float32), [c], [2.0], n=2, m=4)
    np.testing.assert_array_equal(got, np.array([1.0, 0, 1.0, 0, 0.6, 0], np.float32))


def test_tall_and_consensus_by_hand():
    # tau1 = [1, .5, 0, -.25], tau2 = [.25, -.5, .75, .5]; tau_MTL = [1.25, 0, .75, .25]
    # m1: |tau1| > .4 |tau2| = [.1, .2, .3, .2]  -> [1, 1, 0, 1]
    # m2: |tau2| > .4 |tau1| = [.4, .2, 0, .1]   -> [0, 1, 1, 1];  with lambda 2: > [2, 1, 0, .5] -> [0, 0, 1, 0]
    base = np.full(4, 2.0, np.float32)
    t1 = np.array([1, 0.5, 0, -0.25], np.float32)
    t2 = np.array([0.25, -0.5, 0.75, 0.5], np.float32)
    experts = [base + t1, base + t2]
    ctx = TensorContext(task_names=("x", "y"))
    out = call("tall_masks", base, experts, [1.0, 1.0], ctx=ctx)
    np.testing.assert_array_equal(out.vector.numpy(), [1.25, 0, 0.75, 0.25])
    np.testing.assert_array_equal(out.masks.numpy(), [[1, 1, 0, 1], [0, 1, 1, 1]])
    out = call("tall_masks", base, experts, [1.0, 1.0], ctx=ctx, lambdas={"y": 2.0})
    np.testing.assert_array_equal(out.masks.numpy(), [[1, 1, 0, 1], [0, 0, 1, 0]])  # .5 > .5 is false
    # consensus k=2: votes [1, 2, 1, 2] -> keep entries 1 and 3 of tau_MTL
    got = call("consensus", base, experts, [1.0, 1.0], ctx=ctx)
    np.testing.assert_array_equal(got, [2, 2, 2, 2.25])
    got = call("consensus", base, experts, [1.0, 1.0], ctx=ctx, k=1, alpha=2.0)
    np.testing.assert_array_equal(got, [4.5, 2, 3.5, 2.5])


def test_scaling_masks_by_hand():
    # tau1 = [1, .5], tau2 = [.125, .25]: r = (1, .25) -> s = (1, 4); tau'2 = [.5, 1]; tau' = [1.5, 1.5]
    # m1: [1 > .2, .5 > .4] = [1, 1];  m2: [.5 > .4, 1 > .2] = [1, 1]
    # TALL alone loses the weak task's first entry: m2 = [.125 > .4, .25 > .2] = [0, 1]
    base = np.zeros(2, np.float32)
    experts = [np.array([1, 0.5], np.float32), np.array([0.125, 0.25], np.float32)]
    out = call("scaling_masks", base, experts, [1.0, 1.0])
    np.testing.assert_array_equal(out.scales.numpy(), [1, 4])
    np.testing.assert_array_equal(out.vector.numpy(), [1.5, 1.5])
    np.testing.assert_array_equal(out.masks.numpy(), [[1, 1], [1, 1]])
    np.testing.assert_array_equal(
        call("tall_masks", base, experts, [1.0, 1.0]).masks.numpy(), [[1, 1], [0, 1]]
    )
    # rho .2 or .25: r2 = .25 is not < rho * 1, so task 2 is not scaled; s_max caps the scale
    assert call("scaling_masks", base, experts, [1.0, 1.0], rho=0.2).scales.tolist() == [1, 1]
    assert call("scaling_masks", base, experts, [1.0, 1.0], rho=0.25).scales.tolist() == [1, 1]  # strict <
    assert call("scaling_masks", base, experts, [1.0, 1.0], rho=0.26).scales.tolist() == [1, 4]
    assert call("scaling_masks", base, experts, [1.0, 1.0], s_max=2.5).scales.tolist() == [1, 2.5]
    # weights scale the task vectors before the ranges are measured
    assert call("scaling_masks", base, experts, [1.0, 2.0]).scales.tolist() == [1, 2]


def test_linear_by_hand():
    experts = [np.array([1.0, 2.0], np.float32), np.array([3.0, 6.0], np.float32)]
    np.testing.assert_array_equal(call("linear", None, experts, [1.0, 3.0]), [2.5, 5.0])
    np.testing.assert_array_equal(call("linear", None, experts, [1.0, 3.0], normalize=False), [10.0, 20.0])


# --------------------------------------------------------------------------- errors


def test_errors_name_the_problem():
    one = torch.ones(3)
    with pytest.raises(ValueError, match="needs a base"):
        METHODS.get("ties").fn(None, [one], [1.0])
    with pytest.raises(ValueError, match="model-wide thresholds"):
        METHODS.get("ties").fn(one, [one], [1.0], density_scope="model")
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 1.5"):
        METHODS.get("ties").fn(one, [one], [1.0], density=1.5)
    with pytest.raises(ValueError, match="density: 1 values for 2 experts"):
        METHODS.get("dare_linear").fn(one, [one, one], [1.0, 1.0], density=[0.5])
    with pytest.raises(ValueError, match=r"n \(5\) must be <= m \(4\)"):
        METHODS.get("cabs").fn(one, [one], [1.0], n=5, m=4)
    with pytest.raises(ValueError, match="unknown task name"):
        METHODS.get("cabs").fn(one, [one], [1.0], order=["nope"])
    with pytest.raises(ValueError, match=r"unknown task name\(s\) 'zz'; tasks: a, b"):
        ctx = TensorContext(task_names=("a", "b"))
        METHODS.get("tall_masks").fn(one, [one, one], [1.0, 1.0], lambdas={"zz": 0.3}, ctx=ctx)
    with pytest.raises(ValueError, match="weights sum to 0"):
        METHODS.get("linear").fn(None, [one, one], [1.0, -1.0])
    with pytest.raises(ValueError, match="expert 1 has shape"):
        METHODS.get("task_arithmetic").fn(one, [one, torch.ones(4)], [1.0, 1.0])
    with pytest.raises(ValueError, match="merge must be one of"):
        METHODS.get("ties").fn(one, [one], [1.0], merge="max")


def test_registry_resolves_per_expert_density_and_checks():
    spec = METHODS.get("ties")
    kwargs = spec.resolve({"density": 0.3, "lambda": 0.5}, [{"density": 0.1}, {}])
    assert kwargs == {"density": [0.1, 0.3], "lambda_": 0.5, "merge": "mean", "density_scope": "tensor"}
    with pytest.raises(ValueError, match=r"n \(8\) must be <= m \(4\)"):
        METHODS.get("cabs").resolve({"n": 8, "m": 4})
    assert METHODS.get("linear").needs_base is False
    assert set(METHODS.names()) >= set(DATA_FREE)
    assert [n for n in DATA_FREE if METHODS.get(n).kind == "bundle"] == ["tall_masks", "scaling_masks"]


def test_model_threshold_object():
    th = ModelThreshold(0.5, 3)
    assert th.take_equal(2) == 2 and th.take_equal(5) == 1 and th.take_equal(1) == 0 and th.equal_left == 0
