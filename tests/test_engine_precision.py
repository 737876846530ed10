"""The streaming engine on bf16 checkpoints: equal to the in-memory path bit for bit, and within one
bf16 step of the float64 reference (tests/reference.py) for every data-free merge method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference as ref
from conftest import read_folder, write_folder
from sefusion import merge, merge_tensors
from sefusion.methods._ops import dare_seed

SHAPES = {
    "embed.weight": (96, 40),
    "layers.0.q.weight": (40, 40),
    "layers.0.norm.weight": (40,),
    "head.bias": (7,),
}
NAMES = sorted(SHAPES)


def models(tmp_path, n_experts: int = 4):
    g = torch.Generator().manual_seed(11)
    base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in SHAPES.items()}
    experts = [
        {
            k: (v.float() + torch.randn(v.shape, generator=g) * 1e-3).to(torch.bfloat16)
            for k, v in base.items()
        }
        for _ in range(n_experts)
    ]
    paths = [write_folder(tmp_path / "base", base)]
    paths += [write_folder(tmp_path / f"e{i}", e) for i, e in enumerate(experts)]
    return base, experts, paths


def bf16_step(x: np.ndarray) -> np.ndarray:
    """Spacing of bfloat16 numbers at |x| (8 significant bits)."""
    mag = np.maximum(np.abs(x), np.finfo(np.float32).tiny)
    return np.exp2(np.floor(np.log2(mag)) - 7)


def within_one_step(got: torch.Tensor, want: np.ndarray, name: str) -> None:
    g = got.float().numpy().astype(np.float64)
    err = np.abs(g - want)
    bad = err > bf16_step(want) * (1 + 1e-9)
    assert not bad.any(), f"{name}: {int(bad.sum())} entries off by more than one bf16 step (max {err.max()})"


def dare_keeps(seed: int, name: str, n_experts: int, density: float) -> list[np.ndarray]:
    out = []
    for t in range(n_experts):
        gen = torch.Generator().manual_seed(dare_seed(seed, name, t))
        out.append((torch.rand(SHAPES[name], generator=gen) < density).numpy())
    return out


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("linear", {}),
        ("task_arithmetic", {"lambda": 0.8}),
        ("ties", {"density": 0.2}),
        ("ties", {"density": 0.3, "merge": "sum"}),
        ("dare_linear", {"density": 0.5}),
        ("dare_ties", {"density": 0.5}),
        ("consensus", {"k": 2}),
        ("cabs", {"n": 2, "m": 8}),
    ],
)
def test_engine_bf16_matches_memory_path_and_float64(tmp_path, method, params):
    base, experts, paths = models(tmp_path)
    w = [1.0, 0.5, 1.5, 1.0]
    recipe = {
        "method": method,
        "base": str(paths[0]),
        "models": [{"path": str(p), "name": f"e{i}", "weight": w[i]} for i, p in enumerate(paths[1:])],
        "params": params,
        "seed": 3,
    }
    merge(recipe, tmp_path / "out")
    got = read_folder(tmp_path / "out")
    memory = merge_tensors(method, base, experts, w, task_names=[f"e{i}" for i in range(4)], seed=3, **params)
    for name in NAMES:
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], memory[name]), name
        b, xs = base[name].float(), [e[name].float() for e in experts]
        if method == "linear":
            want = ref.linear(xs, w)
        elif method == "task_arithmetic":
            want = ref.task_arithmetic(b, xs, w, params["lambda"])
        elif method == "ties":
            want = ref.ties(b, xs, w, [params["density"]] * 4, 1.0, params.get("merge", "mean"))
        elif method == "dare_linear":
            want = ref.dare_linear(b, xs, w, [0.5] * 4, 1.0, True, dare_keeps(3, name, 4, 0.5))
        elif method == "dare_ties":
            want = ref.dare_ties(b, xs, w, [0.5] * 4, 1.0, "mean", dare_keeps(3, name, 4, 0.5))
        elif method == "consensus":
            want = ref.consensus(b, xs, w, [0.4] * 4, k=2)
        else:
            want = ref.cabs(b, xs, w, 2, 8)
        within_one_step(got[name], np.asarray(want, dtype=np.float64).reshape(SHAPES[name]), name)


@pytest.mark.parametrize("method", ["tall_masks", "scaling_masks"])
def test_bundle_extract_bf16_within_one_step(tmp_path, method):
    from sefusion.bundle import extract

    base, experts, paths = models(tmp_path, 3)
    recipe = {
        "method": method,
        "base": str(paths[0]),
        "models": [{"path": str(p), "name": f"e{i}"} for i, p in enumerate(paths[1:])],
        "params": {"lambdas": [0.3, 0.4, 0.5]},
    }
    merge(recipe, tmp_path / "bundle")
    for t in range(3):
        extract(tmp_path / "bundle", f"e{t}", tmp_path / f"t{t}")
        got = read_folder(tmp_path / f"t{t}")
        for name in NAMES:
            xs = [e[name].float() for e in experts]
            if method == "tall_masks":
                vec, masks = ref.tall(base[name].float(), xs, [1.0] * 3, [0.3, 0.4, 0.5])
                scale = 1.0
            else:
                vec, masks, scales = ref.scaling(base[name].float(), xs, [1.0] * 3, [0.3, 0.4, 0.5])
                scale = scales[t]
            want = ref.f64(base[name].float()) + np.where(masks[t], vec, 0.0) / scale
            assert got[name].dtype == torch.bfloat16
            within_one_step(got[name], np.asarray(want, dtype=np.float64).reshape(SHAPES[name]), name)
