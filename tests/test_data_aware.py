"""Data-aware methods (fisher, regmean, pleas) and the statistics store, against references built here.

The references are independent of the library's code path: Fisher information worked out by hand for a
softmax classifier (numpy, float64), least squares on the union of the data (numpy.linalg.lstsq), the
Gram matrix as X^T X of the rows picked by hand, permutations applied to checkpoints by this file's own
code and checked against transformers' BertModel.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from sefusion.engine import merge_tensors_with_stats
from sefusion.errors import RecipeError, SefusionError
from sefusion.methods.pleas import OUTPUT, encoder_activation_keys, merge_encoders, merge_mlp
from sefusion.registry import METHODS
from sefusion.stats import (
    FisherAccumulator,
    GramAccumulator,
    LinearInputRecorder,
    Statistics,
    StatisticsError,
    StatsContext,
    StatsMeta,
    StatsStore,
    TensorStats,
    cache_key,
    required_statistics,
)

FAST = settings(max_examples=25, deadline=None)


def fn(name):
    return METHODS.get(name).fn


def ctx_with(stats, name="w", tasks=("a", "b")):
    return StatsContext(name=name, task_names=tuple(tasks), stats=tuple(stats))


# --------------------------------------------------------------------------- Fisher by hand


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def exact_fisher_ref(w: np.ndarray, b: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
    """p = softmax(W x + b); d log p_y / dW[c, j] = (1[y = c] - p_c) x_j, d/db[c] = 1[y = c] - p_c;
    F = mean_x sum_y p_y (grad)^2, written out entry by entry."""
    fw, fb = np.zeros_like(w), np.zeros_like(b)
    for xi in x:
        p = softmax(w @ xi + b)
        for y in range(len(p)):
            for c in range(len(p)):
                d = (1.0 if y == c else 0.0) - p[c]
                fb[c] += p[y] * d * d
                for j in range(len(xi)):
                    fw[c, j] += p[y] * (d * xi[j]) ** 2
    return {"weight": fw / len(x), "bias": fb / len(x)}


def empirical_fisher_ref(w, b, x, labels):
    fw, fb = np.zeros_like(w), np.zeros_like(b)
    for xi, y in zip(x, labels, strict=True):
        p = softmax(w @ xi + b)
        d = -((np.arange(len(p)) == y) - p)  # d(-log p_y)/dz
        fw += np.outer(d, xi) ** 2
        fb += d**2
    return {"weight": fw / len(x), "bias": fb / len(x)}


def classifier(seed: int, classes: int = 3) -> torch.nn.Linear:
    torch.manual_seed(seed)
    model = torch.nn.Linear(2, classes).double()
    with torch.no_grad():
        model.weight.mul_(3)
    return model.eval()


def np_params(model):
    return model.weight.detach().numpy(), model.bias.detach().numpy()


@pytest.mark.parametrize("classes", [2, 3])
def test_exact_fisher_of_a_softmax_classifier_by_hand(classes):
    model = classifier(0, classes)
    x = torch.randn(13, 2, dtype=torch.float64)
    acc = FisherAccumulator.from_module(model)
    assert acc.add_classification(model, x[:5]) == 5
    acc.add_classification(model, x[5:])  # batches add up
    got = acc.fisher()
    want = exact_fisher_ref(*np_params(model), x.numpy())
    assert acc.examples == 13 and acc.kind == "exact"
    for k in ("weight", "bias"):
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-6, atol=1e-12)
    assert model.weight.grad is None  # .grad fields untouched


def test_empirical_fisher_by_hand():
    model = classifier(1)
    x = torch.randn(9, 2, dtype=torch.float64)
    labels = torch.randint(0, 3, (9,))
    acc = FisherAccumulator.from_module(model, rename={"weight": "head.weight", "bias": "head.bias"})
    losses = torch.nn.functional.cross_entropy(model(x), labels, reduction="none")  # (B,) one graph
    acc.add_empirical(losses)
    got = acc.fisher()
    want = empirical_fisher_ref(*np_params(model), x.numpy(), labels.numpy())
    np.testing.assert_allclose(got["head.weight"].numpy(), want["weight"], rtol=1e-6)
    np.testing.assert_allclose(got["head.bias"].numpy(), want["bias"], rtol=1e-6)
    with pytest.raises(StatisticsError, match="mix"):
        acc.add_classification(model, x)


def test_fisher_merge_of_two_classifiers_is_the_hand_weighted_average(tmp_path):
    models = [classifier(10), classifier(11)]
    data = [torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64) + 1.0]
    stores = []
    for task, model, x in zip(("a", "b"), models, data, strict=True):
        acc = FisherAccumulator.from_module(model)
        acc.add_classification(model, x)
        st_ = Statistics.collect(examples=8, fisher=acc, task=task, kind="classification")
        stores.append(StatsStore(st_.save(tmp_path / task)))  # through the disk format
    experts = [{k: v.detach().float() for k, v in m.state_dict().items()} for m in models]
    weights = [0.3, 0.7]
    fishers = [exact_fisher_ref(*np_params(m), x.numpy()) for m, x in zip(models, data, strict=True)]
    params = [dict(zip(("weight", "bias"), np_params(m), strict=True)) for m in models]
    for normalize, floor in ((True, 1e-6), (False, 1e-6), (True, 0.05)):
        norms = [
            np.sqrt(sum((f[k].astype(np.float32).astype(np.float64) ** 2).sum() for k in f)) for f in fishers
        ]
        got = merge_tensors_with_stats(
            "fisher", experts, stores, weights, examples=8, normalize=normalize, floor=floor
        )
        for k in ("weight", "bias"):
            c = [w / n if normalize else w for w, n in zip(weights, norms, strict=True)]
            fs = [np.maximum(f[k], floor) for f in fishers]
            want = sum(ci * f * p[k] for ci, f, p in zip(c, fs, params, strict=True)) / sum(
                ci * f for ci, f in zip(c, fs, strict=True)
            )
            np.testing.assert_allclose(got[k].numpy(), want, rtol=2e-5, atol=1e-6)
    for s in stores:
        s.close()


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(2, 4), st.integers(1, 30))
def test_fisher_with_equal_information_is_linear_averaging(seed, n_experts, size):
    rng = np.random.default_rng(seed)
    experts = [torch.from_numpy(rng.normal(size=size).astype(np.float32)) for _ in range(n_experts)]
    weights = [float(w) for w in rng.uniform(0.2, 2.0, n_experts)]
    f = torch.from_numpy(rng.uniform(0, 3, size).astype(np.float32))
    stats = [TensorStats(label=str(i), examples=4, fisher=f, fisher_norm=2.5) for i in range(n_experts)]
    got = fn("fisher")(None, experts, weights, examples=4, ctx=ctx_with(stats, tasks=()))
    want = sum(w * e.double().numpy() for w, e in zip(weights, experts, strict=True)) / sum(weights)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_fisher_floor_zero_falls_back_to_the_average_where_nobody_has_information():
    experts = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    stats = [
        TensorStats("a", 1, torch.tensor([0.0, 1.0]), 1.0),
        TensorStats("b", 1, torch.tensor([0.0, 3.0]), 1.0),
    ]
    got = fn("fisher")(None, experts, [1.0, 1.0], examples=1, floor=0.0, normalize=False, ctx=ctx_with(stats))
    np.testing.assert_allclose(got.numpy(), [2.0, (2.0 + 18.0) / 4.0])


# --------------------------------------------------------------------------- Gram and RegMean


def test_gram_accumulator_sums_xtx_over_unmasked_tokens():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with GramAccumulator(net, rename=lambda n: f"body.{n}") as acc, torch.no_grad(), acc.masked(mask):
        net(x)
        acc.add_examples(2)
    hidden = torch.relu(x @ net[0].weight.T + net[0].bias)
    rows0 = np.concatenate([x[0, :3].numpy(), x[1].numpy()]).astype(np.float64)
    rows2 = np.concatenate([hidden[0, :3].detach().numpy(), hidden[1].detach().numpy()]).astype(np.float64)
    grams = acc.grams()
    assert sorted(grams) == ["body.0.weight", "body.2.weight"] and acc.rows["body.0.weight"] == 8
    np.testing.assert_allclose(grams["body.0.weight"].numpy(), rows0.T @ rows0, rtol=1e-12)
    np.testing.assert_allclose(grams["body.2.weight"].numpy(), rows2.T @ rows2, rtol=1e-6)
    assert grams["body.0.weight"].dtype == torch.float64
    net(x)  # hooks removed on exit
    assert acc.rows["body.0.weight"] == 8


def regression_task(rng, n, w_true, noise=0.3):
    x = rng.normal(size=(n, w_true.shape[1]))
    y = x @ w_true.T + noise * rng.normal(size=(n, w_true.shape[0]))
    return x, y


def test_regmean_of_regressions_on_disjoint_data_is_least_squares_on_the_union(tmp_path):
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(3, 5))  # nn.Linear convention: (out, in), y = x W^T
    tasks = [regression_task(rng, n, w_true + rng.normal(scale=0.5, size=w_true.shape)) for n in (40, 55, 70)]
    experts, stores = [], []
    for i, (x, y) in enumerate(tasks):
        w_t = np.linalg.lstsq(x, y, rcond=None)[0].T  # each expert: least squares on its own data
        layer = torch.nn.Linear(5, 3, bias=False).double()
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w_t))
        with GramAccumulator(layer) as acc, torch.no_grad():
            layer(torch.from_numpy(x))
            acc.add_examples(len(x))
        stats = Statistics.collect(examples=len(x), gram=acc, task=f"t{i}", kind="regression")
        stores.append(StatsStore(stats.save(tmp_path / f"t{i}")))
        experts.append({"weight": torch.from_numpy(w_t).float()})
    x_all = np.concatenate([x for x, _ in tasks])
    y_all = np.concatenate([y for _, y in tasks])
    want = np.linalg.lstsq(x_all, y_all, rcond=None)[0].T
    # float32 experts in, float64 solve; compare with the float32-rounded experts' exact optimum
    w32 = [e["weight"].double().numpy() for e in experts]
    want32 = np.linalg.solve(
        x_all.T @ x_all, sum(x.T @ x @ w.T for (x, _), w in zip(tasks, w32, strict=True))
    ).T
    per_expert = [{"examples": n} for n in (40, 55, 70)]
    got = merge_tensors_with_stats("regmean", experts, stores, alpha=1.0, per_expert=per_expert)
    np.testing.assert_allclose(got["weight"].double().numpy(), want32, atol=1e-6)
    np.testing.assert_allclose(got["weight"].double().numpy(), want, atol=1e-5)
    # the method itself in float64 end to end: exactly the union's least squares
    stats = [TensorStats(f"t{i}", len(x), gram=torch.from_numpy(x.T @ x)) for i, (x, _) in enumerate(tasks)]
    f64 = fn("regmean")(
        None,
        [torch.from_numpy(np.linalg.lstsq(x, y, rcond=None)[0].T) for x, y in tasks],
        [1.0, 1.0, 1.0],
        alpha=1.0,
        examples=[40, 55, 70],
        ctx=ctx_with(stats, tasks=("t0", "t1", "t2")),
    )
    np.testing.assert_allclose(f64.double().numpy(), want, atol=1e-6)
    for s in stores:
        s.close()


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(2, 4))
def test_regmean_alpha_zero_is_a_per_input_weighted_average(seed, n_experts):
    rng = np.random.default_rng(seed)
    out_f, in_f = rng.integers(1, 6), rng.integers(1, 6)
    experts = [rng.normal(size=(out_f, in_f)) for _ in range(n_experts)]
    weights = [float(w) for w in rng.uniform(0.2, 2.0, n_experts)]
    grams = [rng.normal(size=(in_f, in_f)) for _ in range(n_experts)]
    grams = [g @ g.T + np.diag(rng.uniform(0.1, 2.0, in_f)) for g in grams]
    stats = [TensorStats(str(i), 3, gram=torch.from_numpy(g)) for i, g in enumerate(grams)]
    got = fn("regmean")(
        None,
        [torch.from_numpy(e).float() for e in experts],
        weights,
        alpha=0.0,
        examples=3,
        ctx=ctx_with(stats, tasks=()),
    )
    e32 = [torch.from_numpy(e).float().double().numpy() for e in experts]
    num = sum(w * np.diag(g)[None, :] * e for w, g, e in zip(weights, grams, e32, strict=True))
    den = sum(w * np.diag(g)[None, :] for w, g in zip(weights, grams, strict=True))
    np.testing.assert_allclose(got.numpy(), num / den, rtol=1e-5, atol=1e-6)


@FAST
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_regmean_with_equal_grams_is_linear_averaging(seed, alpha):
    rng = np.random.default_rng(seed)
    experts = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]
    g = rng.normal(size=(4, 4))
    g = g @ g.T + np.eye(4)
    stats = [TensorStats(str(i), 3, gram=torch.from_numpy(g)) for i in range(3)]
    got = fn("regmean")(
        None,
        [torch.from_numpy(e) for e in experts],
        [1.0, 2.0, 1.0],
        alpha=alpha,
        examples=3,
        ctx=ctx_with(stats, tasks=()),
    )
    want = (experts[0] + 2 * experts[1] + experts[2]) / 4
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_regmean_other_tensors_are_linear_and_dead_inputs_are_averaged():
    experts = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
    stats = [TensorStats("a", 2), TensorStats("b", 2)]  # a bias: no Gram anywhere
    got = fn("regmean")(None, experts, [1.0, 3.0], examples=2, ctx=ctx_with(stats))
    np.testing.assert_allclose(got.numpy(), [2.5, 3.5])
    # input 1 is zero in everybody's data: its column is the weighted average, input 0 is solved
    w = [torch.tensor([[1.0, 5.0]]), torch.tensor([[3.0, 9.0]])]
    g = [
        torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64),
        torch.tensor([[6.0, 0.0], [0.0, 0.0]], dtype=torch.float64),
    ]
    stats = [TensorStats("a", 2, gram=g[0]), TensorStats("b", 2, gram=g[1])]
    got = fn("regmean")(None, w, [1.0, 1.0], examples=2, alpha=1.0, ctx=ctx_with(stats))
    np.testing.assert_allclose(got.numpy(), [[(2 * 1 + 6 * 3) / 8, 7.0]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_data_aware_methods_on_cuda_match_cpu():
    g = torch.Generator().manual_seed(0)
    experts = [torch.randn(4, 3, generator=g) for _ in range(2)]
    grams = [(lambda m: m @ m.T + torch.eye(3))(torch.randn(3, 3, generator=g)).double() for _ in range(2)]
    fishers = [torch.rand(4, 3, generator=g) for _ in range(2)]
    stats = [
        TensorStats(x, 8, fisher=f, fisher_norm=2.0, gram=gm)
        for x, f, gm in zip("ab", fishers, grams, strict=True)
    ]
    for name in ("fisher", "regmean"):
        cpu = fn(name)(None, experts, [1.0, 2.0], examples=8, ctx=ctx_with(stats))
        gpu = fn(name)(None, [e.cuda() for e in experts], [1.0, 2.0], examples=8, ctx=ctx_with(stats))
        np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the store


def test_store_round_trip_and_metadata(tmp_path):
    fisher = {"a.weight": torch.rand(3, 2), "a.bias": torch.rand(3)}
    gram = {"a.weight": torch.eye(2, dtype=torch.float64) * 4}
    meta = StatsMeta(examples=5, task="defect-python", data="defect-python", kind="classification",
                     fisher_type="exact", expert_path="/x/expert", expert_sha256="ab" * 32)  # fmt: skip
    mem = Statistics(meta, fisher=fisher, gram=gram, gram_rows={"a.weight": 40})
    folder = mem.save(tmp_path / "stats")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    doc = json.loads((folder / "stats.json").read_text())
    assert doc["examples"] == 5 and doc["task"] == "defect-python" and doc["kind"] == "classification"
    assert doc["expert"]["sha256"] == "ab" * 32 and doc["gram"]["a.weight"]["rows"] == 40
    with StatsStore(folder) as store:
        assert store.examples == 5 and store.label == "defect-python"
        assert torch.equal(store.fisher("a.bias"), fisher["a.bias"])
        assert store.gram("a.weight").dtype == torch.float64 and torch.equal(
            store.gram("a.weight"), gram["a.weight"]
        )
        assert store.fisher_norm() == pytest.approx(mem.fisher_norm(), rel=1e-15)
        want = float(torch.cat([t.double().flatten() for t in fisher.values()]).norm())
        assert store.fisher_norm() == pytest.approx(want, rel=1e-12)
        assert store.fisher_norm(["a.bias"]) == pytest.approx(
            float(fisher["a.bias"].double().norm()), rel=1e-12
        )
        ts = store.tensor_stats("a.weight", ("gram",))
        assert ts.fisher is None and ts.gram is not None and ts.examples == 5
    with pytest.raises(SefusionError, match="exists"):
        mem.save(tmp_path / "stats")
    assert required_statistics(fn("fisher")) == {"fisher"} and required_statistics(fn("regmean")) == {"gram"}
    assert required_statistics(fn("ties")) == frozenset()
    k1 = cache_key(expert_sha256="ab", task="t", data="t", examples=5, kinds=["gram"])
    assert k1 != cache_key(expert_sha256="ab", task="t", data="t", examples=6, kinds=["gram"])


def test_damaged_or_missing_store_is_refused(tmp_path):
    with pytest.raises(StatisticsError, match="does not exist"):
        StatsStore(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StatisticsError, match="stats.json"):
        StatsStore(tmp_path / "empty")
    folder = Statistics(StatsMeta(examples=1), fisher={"w": torch.ones(2)}).save(tmp_path / "s")
    doc = json.loads((folder / "stats.json").read_text())
    doc["fisher"]["ghost"] = {"sq_norm": 1.0}
    (folder / "stats.json").write_text(json.dumps(doc))
    with pytest.raises(StatisticsError, match="ghost"):
        StatsStore(folder)


# --------------------------------------------------------------------------- PLeaS: MLPs


def mlp(seed, dims):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(dims[i + 1], dims[i], generator=g), torch.randn(dims[i + 1], generator=g))
        for i in range(len(dims) - 1)
    ]


def forward(layers, x, act=torch.tanh):
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = act(x)
    return x


def permuted_copy(layers, perms):
    """Hidden layer i's units reordered by perms[i]: rows of layer i, columns of layer i + 1."""
    out = [list(layer) for layer in layers]
    for i, p in enumerate(perms):
        out[i][0], out[i][1] = out[i][0][p], out[i][1][p]
        out[i + 1][0] = out[i + 1][0][:, p]
    return [tuple(layer) for layer in out]


@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_pleas_recovers_a_permuted_mlp(budget):
    dims = [6, 10, 12, 3]
    a = mlp(0, dims)
    g = torch.Generator().manual_seed(1)
    perms = [torch.randperm(10, generator=g), torch.randperm(12, generator=g)]
    b = permuted_copy(a, perms)
    x = torch.randn(300, 6, generator=g)
    merged = merge_mlp([a, b], x, activation=torch.tanh, budget=budget)
    for m, p in zip(merged.matchings, perms, strict=True):
        assert torch.equal(p[m.perm], torch.arange(len(p)))  # B's unit perm[i] is A's unit i
    fresh = torch.randn(100, 6, generator=g)
    np.testing.assert_allclose(forward(merged.layers, fresh).numpy(), forward(a, fresh).numpy(), atol=1e-5)
    if budget == 1.0:
        assert merged.widths == [10, 12]
        for (wm, bm), (wa, ba) in zip(merged.layers, a, strict=True):
            np.testing.assert_allclose(wm.numpy(), wa.numpy(), atol=1e-5)
            np.testing.assert_allclose(bm.numpy(), ba.numpy(), atol=1e-5)
    else:
        assert merged.widths == [15, 18]  # k = 5, 6 merged + both models' 5, 6 others


def test_pleas_steps_match_scipy_and_least_squares_on_two_different_mlps():
    """Two unrelated MLPs: the matching is scipy's assignment on the correlation, and each layer is the
    group-constrained least-squares fit to the combined features (numpy reference)."""
    dims = [5, 8, 2]
    a, b = mlp(3, dims), mlp(4, dims)
    x = torch.randn(400, 5, generator=torch.Generator().manual_seed(5)).double()
    merged = merge_mlp([a, b], x, activation=torch.relu, budget=0.75)
    ha = torch.relu(x @ a[0][0].double().T + a[0][1].double()).numpy()
    hb = torch.relu(x @ b[0][0].double().T + b[0][1].double()).numpy()
    corr = np.corrcoef(ha.T, hb.T)[:8, 8:]
    _, cols = linear_sum_assignment(corr, maximize=True)
    (m,) = merged.matchings
    np.testing.assert_array_equal(m.perm.numpy(), cols)
    score = corr[np.arange(8), cols]
    best = sorted(sorted(range(8), key=lambda i: -score[i])[:6])  # ceil(0.75 * 8) = 6 merged pairs
    rest = [i for i in range(8) if i not in best]
    np.testing.assert_array_equal(m.merged_a.numpy(), best)
    # layer 0: targets [avg of merged pairs' pre-activations | A's rest | B's rest], inputs: the data
    xd = np.concatenate([x.numpy(), np.ones((400, 1))], 1)
    pa = x.numpy() @ a[0][0].double().numpy().T + a[0][1].double().numpy()
    pb = x.numpy() @ b[0][0].double().numpy().T + b[0][1].double().numpy()
    target = np.concatenate([(pa[:, best] + pb[:, cols[best]]) / 2, pa[:, rest], pb[:, cols[rest]]], 1)
    sol = np.linalg.lstsq(xd, target, rcond=None)[0]
    np.testing.assert_allclose(merged.layers[0][0].numpy(), sol[:-1].T, atol=1e-5)
    np.testing.assert_allclose(merged.layers[0][1].numpy(), sol[-1], atol=1e-5)
    # layer 1: output = average of both models' outputs, from every combined feature
    z = np.concatenate([(ha[:, best] + hb[:, cols[best]]) / 2, ha[:, rest], hb[:, cols[rest]]], 1)
    ya = ha @ a[1][0].double().numpy().T + a[1][1].double().numpy()
    yb = hb @ b[1][0].double().numpy().T + b[1][1].double().numpy()
    sol = np.linalg.lstsq(np.concatenate([z, np.ones((400, 1))], 1), (ya + yb) / 2, rcond=None)[0]
    np.testing.assert_allclose(merged.layers[1][0].numpy(), sol[:-1].T, atol=1e-4)
    np.testing.assert_allclose(merged.layers[1][1].numpy(), sol[-1], atol=1e-4)


def test_pleas_keeps_a_models_own_units_apart_from_the_others():
    """budget < 1 on a 3-layer MLP: units kept from A never read units kept from B, and vice versa."""
    a, b = mlp(7, [4, 6, 6, 2]), mlp(8, [4, 6, 6, 2])
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(9))
    merged = merge_mlp([a, b], x, budget=0.5)
    m_in, m_out = merged.matchings
    w = merged.layers[1][0]  # (width_out, width_in)
    _, in_a, in_b = m_in.groups()
    _, out_a, out_b = m_out.groups()
    assert torch.all(w[out_a, in_b] == 0) and torch.all(w[out_b, in_a] == 0)
    assert torch.any(w[out_a, in_a] != 0) and torch.any(w[out_b, in_b] != 0)


# --------------------------------------------------------------------------- PLeaS: BERT-style encoders

H, HEADS, DH, INTER, LAYERS, VOCAB = 16, 4, 4, 32, 2, 40


def bert_config(inter=INTER):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=inter, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip


def bert(sd=None, inter=INTER):
    from transformers import BertModel

    model = BertModel(bert_config(inter)).eval()
    if sd is not None:
        model.load_state_dict(sd)
    return model


def random_bert_state(seed):
    torch.manual_seed(seed)
    model = bert()
    with torch.no_grad():  # random LayerNorms and biases too: nothing left at a symmetric value
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if n.endswith("LayerNorm.weight") else 0.0))
    return {k: v.clone() for k, v in model.state_dict().items()}


def permute_bert(sd, seed):
    """A functionally identical BERT: residual stream, heads, q/k and v/o dims within heads, FFN units."""
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    res = torch.randperm(H, generator=g)

    def rows(n, p):
        out[n] = out[n][p]

    def cols(n, p):
        out[n] = out[n][:, p]

    for n in sd:
        if n.startswith("embeddings.") and n.endswith("_embeddings.weight"):
            cols(n, res)
        if "LayerNorm" in n:
            rows(n, res)
    for i in range(LAYERS):
        pre = f"encoder.layer.{i}."
        heads = torch.randperm(HEADS, generator=g)
        qk = torch.cat([heads[h] * DH + torch.randperm(DH, generator=g) for h in range(HEADS)])
        vo = torch.cat([heads[h] * DH + torch.randperm(DH, generator=g) for h in range(HEADS)])
        ffn = torch.randperm(INTER, generator=g)
        for part, p in (
            ("attention.self.query", qk),
            ("attention.self.key", qk),
            ("attention.self.value", vo),
        ):
            rows(pre + part + ".weight", p), rows(pre + part + ".bias", p), cols(pre + part + ".weight", res)
        cols(pre + "attention.output.dense.weight", vo)
        rows(pre + "attention.output.dense.weight", res), rows(pre + "attention.output.dense.bias", res)
        rows(pre + "intermediate.dense.weight", ffn), rows(pre + "intermediate.dense.bias", ffn)
        cols(pre + "intermediate.dense.weight", res)
        (
            cols(pre + "output.dense.weight", ffn),
            rows(pre + "output.dense.weight", res),
            rows(pre + "output.dense.bias", res),
        )
    cols("pooler.dense.weight", res)
    return out, res


def bert_activations(ids):
    def run(sd):
        model = bert(sd)
        keys = set(encoder_activation_keys(list(sd)))
        with LinearInputRecorder(model, rename=lambda n: n if n in keys else None) as rec, torch.no_grad():
            out = model(input_ids=ids)
            rec.add(OUTPUT, out.last_hidden_state)
        return rec.activations()

    return run


@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_pleas_recovers_a_permuted_bert_encoder(budget):
    a = random_bert_state(0)
    b, res = permute_bert(a, 1)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (16, 12), generator=g)
    fresh = torch.randint(0, VOCAB, (4, 10), generator=g)
    with torch.no_grad():
        out_a, out_b = bert(a)(input_ids=fresh), bert(b)(input_ids=fresh)
    # the copy really is the same function, its residual stream permuted
    np.testing.assert_allclose(
        out_b.last_hidden_state.numpy(), out_a.last_hidden_state[..., res].numpy(), atol=1e-5
    )
    merged = merge_encoders([a, b], bert_activations(ids), num_heads=HEADS, budget=budget)
    assert torch.equal(res[merged.residual.perm], torch.arange(H))
    assert merged.intermediate_size == (INTER if budget == 1.0 else 48)
    assert set(merged.state_dict) == set(a)
    with torch.no_grad():
        out_m = bert(merged.state_dict, merged.intermediate_size)(input_ids=fresh)
    np.testing.assert_allclose(out_m.last_hidden_state.numpy(), out_a.last_hidden_state.numpy(), atol=1e-5)
    np.testing.assert_allclose(out_m.pooler_output.numpy(), out_a.pooler_output.numpy(), atol=1e-5)
    head_b = torch.randn(3, H)[:, res]  # a task head trained on B's residual order
    assert torch.equal(merged.head_input(head_b, 1), head_b[:, merged.residual.perm])


# --------------------------------------------------------------------------- bad input


def test_missing_statistics_are_refused_naming_the_expert_and_tensor():
    one = torch.ones(2, 2)
    with pytest.raises(StatisticsError, match=r"fisher.*Fisher.*tensor 'w'"):
        fn("fisher")(None, [one, one], [1.0, 1.0], ctx=StatsContext(name="w"))
    with pytest.raises(StatisticsError, match="tensor 'w'"):
        fn("regmean")(None, [one, one], [1.0, 1.0], ctx=StatsContext(name="w"))
    stats = [TensorStats("a", 256, fisher=torch.ones(2, 2), fisher_norm=1.0), None]
    with pytest.raises(StatisticsError, match="missing statistics for expert 'b'"):
        fn("fisher")(None, [one, one], [1.0, 1.0], ctx=ctx_with(stats))
    stats = [TensorStats("a", 256, fisher=torch.ones(2, 2), fisher_norm=1.0), TensorStats("b", 256)]
    with pytest.raises(StatisticsError, match="expert 'b' hold no Fisher for tensor 'w'"):
        fn("fisher")(None, [one, one], [1.0, 1.0], ctx=ctx_with(stats))
    with pytest.raises(StatisticsError, match="no Fisher for tensor 'zz'"):
        Statistics(StatsMeta(examples=1), fisher={"w": one}).fisher_norm(["w", "zz"])


def test_a_linear_weight_without_its_gram_is_refused():
    w = torch.ones(3, 2)
    stats = [TensorStats("a", 256, gram=torch.eye(2, dtype=torch.float64)), TensorStats("b", 256)]
    with pytest.raises(StatisticsError, match=r"tensor 'layer.weight' has a Gram matrix.*'a'.*none.*'b'"):
        fn("regmean")(None, [w, w], [1.0, 1.0], ctx=ctx_with(stats, name="layer.weight"))
    stats = [TensorStats(x, 256, gram=torch.eye(3, dtype=torch.float64)) for x in "ab"]
    with pytest.raises(StatisticsError, match=r"Gram matrix of expert 'a'.*\(3, 3\).*needs \(2, 2\)"):
        fn("regmean")(None, [w, w], [1.0, 1.0], ctx=ctx_with(stats, name="layer.weight"))
    stats = [TensorStats(x, 256, gram=torch.zeros(2, 2, dtype=torch.float64)) for x in "ab"]
    stats[0] = TensorStats("a", 256, gram=torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64))
    with pytest.raises(StatisticsError, match="singular"):
        fn("regmean")(None, [w, w], [1.0, 1.0], alpha=1.0, ctx=ctx_with(stats, name="layer.weight"))


def test_too_few_examples_are_refused():
    model = classifier(0)
    acc = FisherAccumulator.from_module(model)
    acc.add_classification(model, torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(StatisticsError, match=r"too few examples.*defect-python.*4 available, 10 asked"):
        Statistics.collect(examples=10, fisher=acc, task="defect-python")
    one = torch.ones(2)
    stats = [TensorStats(x, 100, fisher=one, fisher_norm=1.0) for x in "ab"]
    with pytest.raises(StatisticsError, match=r"too few examples for expert 'a': 100 available, 256 asked"):
        fn("fisher")(None, [one, one], [1.0, 1.0], ctx=ctx_with(stats))
    x = torch.randn(10, 4)  # fewer rows than the widest fan-in + 1
    with pytest.raises(StatisticsError, match="too few examples for layer"):
        merge_mlp([mlp(0, [4, 12, 2]), mlp(1, [4, 12, 2])], x)
    with pytest.raises(StatisticsError, match="no examples"):
        FisherAccumulator.from_module(classifier(0)).fisher()


def test_pleas_needs_exactly_two_models_and_a_budget_in_0_1():
    a = mlp(0, [3, 4, 2])
    x = torch.randn(50, 3)
    for models in ([a], [a, a, a]):
        with pytest.raises(RecipeError, match=f"exactly two models, got {len(models)}"):
            merge_mlp(models, x)
    with pytest.raises(RecipeError, match="exactly two models, got 3"):
        merge_encoders([{}, {}, {}], lambda sd: {}, num_heads=2)
    one = torch.ones(2)
    with pytest.raises(RecipeError, match="exactly two models, got 1"):
        fn("pleas")(None, [one], [1.0])
    with pytest.raises(RecipeError, match="whole-model"):
        fn("pleas")(None, [one, one], [1.0, 1.0])
    for budget in (0.0, -0.5, 1.5):
        with pytest.raises(RecipeError, match=rf"budget must be in \(0, 1\], got {budget}"):
            merge_mlp([a, a], x, budget=budget)
        with pytest.raises(RecipeError, match="'budget'"):
            METHODS.get("pleas").resolve({"budget": budget})
    with pytest.raises(RecipeError, match="'examples'"):
        METHODS.get("fisher").resolve({"examples": 0})


def test_pleas_refuses_mismatched_or_unknown_tensors():
    a = random_bert_state(0)
    b = dict(a)
    b["encoder.layer.0.intermediate.dense.bias"] = torch.zeros(INTER + 1)
    with pytest.raises(
        RecipeError,
        match=r"'encoder.layer.0.intermediate.dense.bias' has shape \(32,\) in model A but \(33,\)",
    ):
        merge_encoders([a, b], lambda sd: {}, num_heads=HEADS)
    extra = {**a, "classifier.weight": torch.ones(2, H)}
    ids = torch.randint(0, VOCAB, (8, 12))
    with pytest.raises(RecipeError, match="classifier.weight"):
        merge_encoders([extra, extra], bert_activations(ids), num_heads=HEADS)
    with pytest.raises(StatisticsError, match="lack 'last_hidden_state'"):
        merge_encoders(
            [a, a],
            lambda sd: {k: v for k, v in bert_activations(ids)(sd).items() if k != OUTPUT},
            num_heads=HEADS,
        )
    with pytest.raises(RecipeError, match="num_heads 3 does not divide"):
        merge_encoders([a, a], bert_activations(ids), num_heads=3)
