"""Merging in chunks gives the bits of the whole-tensor computation, and those of sefusion 0.1.0's
float32 code (tests/float32_oracle.py), for every method the engine streams."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import float32_oracle as oracle
import sefusion.engine.stream as engine
from conftest import read_folder, write_folder
from sefusion import merge, merge_tensors
from sefusion.methods import BundleTensor
from sefusion.methods._ops import model_thresholds
from sefusion.registry import METHODS

# Sizes around the forced chunk of 64 entries: 0-d, tiny, exactly one chunk, not a multiple of it.
SHAPES = {"scalar": (), "bias": (7,), "one_chunk": (64,), "w": (37, 29), "emb": (96, 40)}
NAMES = list(SHAPES)
TASKS = ["a", "b", "c"]

CASES = [
    ("linear", {}),
    ("linear", {"normalize": False}),
    ("task_arithmetic", {"lambda": 0.7}),
    ("ties", {"density": 0.2}),
    ("ties", {"density": [0.05, 0.5, 1.0], "merge": "sum", "lambda": 1.3}),
    ("ties", {"density": 0.3, "density_scope": "model"}),
    ("dare_linear", {"density": 0.4}),
    ("dare_linear", {"density": [0.3, 1.0, 0.7], "rescale": False}),
    ("dare_ties", {"density": 0.5}),
    ("consensus", {"k": 2}),
    ("consensus", {"k": 1, "alpha": 0.8, "base_merge": "ties", "lambdas": [0.3, 0.5, 0.2]}),
    ("cabs", {"n": 3, "m": 8}),
    ("cabs", {"n": 5, "m": 12, "order": ["c", "a", "b"]}),  # chunks start at multiples of lcm(8, 12)
    ("tall_masks", {"lambdas": [0.3, 0.4, 0.6]}),
    ("tall_masks", {"base_merge": "ties"}),
    ("scaling_masks", {}),
    ("scaling_masks", {"stat": "quantile", "q": 0.9, "base_merge": "ties", "rho": 0.8}),
]


def models(seed: int, kind: str):
    """Base and three experts in float32. bf16: values on the bf16 grid (many equal |tau|); zeros: exact
    zeros and signed zeros in the base and the task vectors."""
    g = torch.Generator().manual_seed(seed)
    base, experts = {}, [{}, {}, {}]
    for name, shape in SHAPES.items():
        b = torch.randn(shape, generator=g) * 0.05
        taus = [torch.randn(shape, generator=g) * 2e-3 * (t + 1) for t in range(3)]
        if kind == "bf16":
            b = b.bfloat16().float()
            xs = [(b + tau).bfloat16().float() for tau in taus]
        else:
            zero = torch.rand(shape, generator=g) < 0.3
            b = torch.where(torch.rand(shape, generator=g) < 0.1, torch.tensor(-0.0), b)
            xs = [torch.where(zero | (torch.rand(shape, generator=g) < 0.2), b, b + tau) for tau in taus]
            xs[1] = torch.where(b == 0, torch.tensor(-0.0), xs[1])  # -0 - (+0) and -0 - (-0)
        base[name] = b
        for t in range(3):
            experts[t][name] = xs[t]
    return base, experts


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def same(got, want, what: str) -> None:
    if isinstance(want, BundleTensor):
        assert isinstance(got, BundleTensor)
        same(got.vector, want.vector, f"{what} vector")
        assert torch.equal(got.masks, want.masks), f"{what} masks"
        assert (got.scales is None) == (want.scales is None), f"{what} scales"
        if want.scales is not None:
            same(got.scales, want.scales, f"{what} scales")
        return
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(bits(got), bits(want)), (
        f"{what}: {int((bits(got) != bits(want)).sum())} entries differ"
    )


def run(monkeypatch, method, params, base, experts, weights, chunk):
    monkeypatch.setattr(engine, "CHUNK", chunk)
    shared = {k: v for k, v in params.items() if not (k == "density" and isinstance(v, list))}
    per_expert = (
        [{"density": d} for d in params["density"]] if isinstance(params.get("density"), list) else None
    )
    return merge_tensors(
        method, base, experts, weights, task_names=TASKS, seed=5, per_expert=per_expert, **shared
    )


def oracle_merge(method, params, base, experts, weights):
    spec = METHODS.get(method)
    shared = {k: v for k, v in params.items() if k != "density_scope" and not isinstance(v, list)}
    kwargs = spec.resolve(shared)
    kwargs.update({k: v for k, v in params.items() if isinstance(v, list)})
    kwargs.setdefault("lambdas", [0.4] * 3)
    if isinstance(kwargs["lambdas"], float):
        kwargs["lambdas"] = [kwargs["lambdas"]] * 3
    thresholds = None
    if params.get("density_scope") == "model":
        taus = [[experts[t][k] - base[k] for t in range(3)] for k in NAMES]
        thresholds = model_thresholds(lambda: iter(taus), 3, kwargs["density"])
    out = {}
    for k in sorted(NAMES):  # model-scope tie budgets run across tensors in name order
        fn = oracle.METHODS[method]
        out[k] = fn(
            base[k], [e[k] for e in experts], weights,
            **kwargs, seed=5, name=k, task_names=TASKS, thresholds=thresholds,
        )  # fmt: skip
        if not isinstance(out[k], BundleTensor):
            out[k] = out[k].reshape(SHAPES[k])
    return out


@pytest.mark.parametrize("kind", ["bf16", "zeros"])
@pytest.mark.parametrize(("method", "params"), CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_chunks_equal_whole_tensor_and_the_float32_oracle(monkeypatch, method, params, kind):
    base, experts = models(7, kind)
    weights = [1.0, 0.5, 1.5]
    whole = run(monkeypatch, method, params, base, experts, weights, chunk=1 << 30)
    chunked = run(monkeypatch, method, params, base, experts, weights, chunk=64)
    want = oracle_merge(method, params, base, experts, weights)
    for k in NAMES:
        same(chunked[k], whole[k], f"{method} {k} chunked vs whole")
        same(whole[k], want[k], f"{method} {k} vs the float32 oracle")


@pytest.mark.parametrize("merge_kind", ["mean", "sum"])
def test_ties_with_a_negative_weight(monkeypatch, merge_kind):
    """Weights that can cancel (den == 0 with members) take the torch.where path and still match."""
    base, experts = models(3, "bf16")
    weights = [1.0, -1.0, 0.5]
    params = {"density": 0.4, "merge": merge_kind}
    chunked = run(monkeypatch, "ties", params, base, experts, weights, chunk=64)
    want = oracle_merge("ties", params, base, experts, weights)
    for k in NAMES:
        same(chunked[k], want[k], k)


def test_engine_from_files_in_chunks_and_threads(monkeypatch, tmp_path):
    """bf16 files, 64-entry chunks, two worker threads, an excluded tensor copied chunk by chunk: the
    same bits as the in-memory path on whole tensors."""
    base, experts = models(11, "bf16")
    base = {k: v.bfloat16() for k, v in base.items()}
    experts = [{k: v.bfloat16() for k, v in e.items()} for e in experts]
    base["lm_head.weight"] = torch.randn(50, 9).bfloat16()
    for e in experts:
        e["lm_head.weight"] = torch.randn(50, 9).bfloat16()
    paths = [write_folder(tmp_path / "base", base)] + [
        write_folder(tmp_path / t, e) for t, e in zip(TASKS, experts, strict=True)
    ]
    weights = [1.0, 0.5, 1.5]
    for method, params in [
        ("ties", {"density": 0.25}),
        ("ties", {"density": 0.3, "density_scope": "model"}),
        ("dare_ties", {}),
        ("cabs", {"n": 2, "m": 12}),
        ("scaling_masks", {"stat": "quantile", "base_merge": "ties"}),
    ]:
        recipe = {
            "method": method,
            "base": str(paths[0]),
            "models": [
                {"path": str(p), "name": t, "weight": w}
                for p, t, w in zip(paths[1:], TASKS, weights, strict=True)
            ],
            "params": params,
            "exclude": ["lm_head.*"],
            "seed": 5,
        }
        monkeypatch.setattr(engine, "CHUNK", 64)
        monkeypatch.setattr(engine, "WORKERS", 2)
        out = tmp_path / f"{method}-{len(params)}"
        merge(recipe, out)
        monkeypatch.setattr(engine, "CHUNK", 1 << 30)
        memory = merge_tensors(
            method, {k: base[k] for k in NAMES}, [{k: e[k] for k in NAMES} for e in experts], weights,
            task_names=TASKS, seed=5, **params,
        )  # fmt: skip
        got = read_folder(out)
        if method == "scaling_masks":
            manifest = json.loads((out / "bundle.json").read_text())
            assert list(manifest["tensors"]) == sorted(NAMES)
            for k in NAMES:
                n = int(np.prod(SHAPES[k], dtype=np.int64))
                packed = got[f"masks/{k}"].numpy()
                masks = np.unpackbits(packed, axis=1, count=n, bitorder="little").astype(bool)
                same(got[f"vector/{k}"].reshape(-1), memory[k].vector.reshape(-1), k)
                assert np.array_equal(masks, memory[k].masks.reshape(3, -1).numpy()), k
                same(got[f"scales/{k}"], memory[k].scales, k)
                for t, e in zip(TASKS, experts, strict=True):
                    assert torch.equal(got[f"tasks/{t}/lm_head.weight"], e["lm_head.weight"])
        else:
            assert torch.equal(got["lm_head.weight"], base["lm_head.weight"])
            for k in NAMES:
                assert torch.equal(got[k].view(torch.int16), memory[k].view(torch.int16)), f"{method} {k}"


def test_dare_stream_continues_across_chunks():
    """torch.rand on a CPU generator draws one value per entry in flat order, so chunks drawn in turn
    from one generator are the whole tensor's draws (what streaming DARE relies on)."""
    whole = torch.rand(100_003, generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    parts = [torch.rand(n, generator=gen) for n in (1, 15, 16, 17, 4096, 65536)]
    parts.append(torch.rand(100_003 - sum(p.numel() for p in parts), generator=gen))
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("how", ["band_overflow", "bracket_miss"])
def test_top_k_falls_back_to_radix_selection(monkeypatch, how):
    """Where the sampled bracket cannot give the k-th largest (its band outgrew the cap, or the sampled
    chunks do not represent the tensor) the radix passes still give the same bits."""
    import sefusion.methods._select as ops

    base, experts = models(5, "bf16")
    if how == "band_overflow":
        monkeypatch.setattr(ops, "_BAND_CAP", 16)
    else:  # large task vectors only in the chunks the sample pass reads (0, 15, 30, 45 of 60)
        for t, e in enumerate(experts):
            tau = e["emb"] - base["emb"]
            flat = tau.reshape(-1).clone()
            for c in range(0, 60, 15):
                flat[c * 64 : (c + 1) * 64] *= 50.0 * (t + 1)
            e["emb"] = base["emb"] + flat.reshape(tau.shape)
    selects = []
    real = ops.TensorTopK.end_pass

    def end_pass(self):
        real(self)
        selects.append(self._radix is not None)

    monkeypatch.setattr(ops.TensorTopK, "end_pass", end_pass)
    weights = [1.0, 0.5, 1.5]
    params = {"density": 0.2}
    chunked = run(monkeypatch, "ties", params, base, experts, weights, chunk=64)
    assert any(selects), "no radix fallback happened"
    want = oracle_merge("ties", params, base, experts, weights)
    for k in NAMES:
        same(chunked[k], want[k], k)


def test_model_scope_tie_budgets_follow_names_not_thread_order():
    """Each tensor gets its share of the model-wide tie budget in name order, whatever order the tensors
    are counted or merged in (worker threads finish in any order)."""
    from sefusion.methods._ops import ModelThreshold, tensor_thresholds

    v = 0.5
    taus = {
        "b": [torch.tensor([v, -v, 0.1, v]), torch.tensor([0.0, 0.0, 0.0, 0.0])],
        "a": [torch.tensor([v, 0.2, 0.0, 0.0]), torch.tensor([0.3, 0.3, 0.0, 0.0])],
        "c": [torch.tensor([-v, v, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 0.0])],
    }
    found = [ModelThreshold(v, 3), ModelThreshold(0.3, 2)]
    for order in (["b", "a", "c"], ["c", "b", "a"]):
        got = tensor_thresholds(found, order, lambda order=order: ((k, taus[k]) for k in order))
        # expert 0: a has 1 tie, b 3, c 2 -> a 1, b 2, c 0; expert 1: a has both of its 2
        assert [got[k][0].equal_left for k in "abc"] == [1, 2, 0]
        assert [got[k][1].equal_left for k in "abc"] == [2, 0, 0]
        assert all(got[k][0].value == v for k in "abc")
    assert found[0].equal_left == 3  # the model-wide thresholds are not consumed


def _count_reads(monkeypatch):
    counts = []
    real = engine.stream_tensor

    def counting(call, ctx, ranges, read, emit, cancelled=lambda: False, **kw):
        n = [0]

        def counted(start, stop):
            n[0] += 1
            return read(start, stop)

        real(call, ctx, ranges, counted, emit, cancelled, **kw)
        counts.append((len(ranges), n[0]))

    monkeypatch.setattr(engine, "stream_tensor", counting)
    return counts


def test_ties_top_k_falls_back_to_radix_when_the_bracket_misses(monkeypatch):
    """The sampled chunks hold only tiny task vectors, so the bracket misses the k-th largest: radix
    selection finds the threshold in two more passes, then the merge pass; the whole tensor's bits."""
    c_size = 4096
    n = c_size * 20
    g = torch.Generator().manual_seed(3)
    b = torch.randn(n, generator=g) * 0.05
    scale = torch.ones(n)
    for c in (0, 5, 10, 15):  # the chunks the sample pass reads (stride 5 of 20)
        scale[c * c_size : (c + 1) * c_size] = 1e-4
    base = {"v": b}
    experts = [{"v": b + torch.randn(n, generator=g) * 1e-2 * scale} for _ in range(3)]
    counts = _count_reads(monkeypatch)
    chunked = run(monkeypatch, "ties", {"density": 0.2}, base, experts, [1.0, 1.0, 1.0], chunk=c_size)
    assert counts[-1] == (20, 4 + 20 + 2 * 20 + 20)  # sample, band (missed), radix x2, merge
    whole = run(monkeypatch, "ties", {"density": 0.2}, base, experts, [1.0, 1.0, 1.0], chunk=1 << 30)
    same(chunked["v"], whole["v"], "v")
