"""Do two merged models agree? And, for linear / task_arithmetic, does each equal a float64 reference?

    python benchmarks/compare.py METHOD OUT_A OUT_B --base BASE --experts E1 E2 ... [--lambda 1.0]

Reads both outputs tensor by tensor with `safetensors` (not through sefusion's readers) and prints one
JSON object. Distances are counted in steps of the output dtype: the number of representable bfloat16
values between two numbers (0: equal bits; 1: neighbours), computed exactly on the bit patterns.

- `a_vs_b`: every tensor of OUT_A against OUT_B: largest step distance, share of elements that differ at
  all and by more than one step, and the relative L2 size of the difference against A's change from the
  base, ||A − B|| / ||A − θ0||, which says how far apart the two merges are on the scale of the merge.
- `reference` (linear, task_arithmetic only): the method's formula evaluated in float64 from the inputs
  (linear: the mean of the experts; task_arithmetic: θ0 + λ Σ_t τ_t, unit weights), rounded once to the
  output dtype; each output's step distance from it. "Within one step" is the issue's criterion.

Memory stays at a few copies of the largest tensor: one tensor name at a time across all models.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REFERENCE_METHODS = ("linear", "task_arithmetic")


class Folder:
    """name -> file over every *.safetensors file of a folder (sharded or not), read lazily."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        self.handles = [safe_open(str(f), "pt") for f in sorted(path.rglob("*.safetensors"))]
        if not self.handles:
            raise SystemExit(f"no *.safetensors under {path}")
        self.where = {name: h for h in self.handles for name in h.keys()}  # noqa: SIM118 - safe_open has no __iter__

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str):
        return self.where[name].get_tensor(name)


def _ordered(bits):
    """bfloat16 bit patterns (as int16) -> integers whose order and differences follow the values."""
    import torch

    x = bits.to(torch.int32)
    # sign-magnitude -> two's complement: negative values count down from 0 (-0 and +0 coincide)
    return torch.where(x < 0, -(x & 0x7FFF), x)


def steps(a, b):
    """Number of bfloat16 steps between a and b, elementwise (int32)."""
    import torch

    a = a.to(torch.bfloat16).view(torch.int16)
    b = b.to(torch.bfloat16).view(torch.int16)
    return (_ordered(a) - _ordered(b)).abs()


class Stats:
    def __init__(self) -> None:
        self.n = 0
        self.max_steps = 0
        self.differ = 0
        self.over_one = 0
        self.worst = ""
        self.max_abs = 0.0

    def add(self, name: str, d, abs_diff: float = 0.0) -> None:
        self.max_abs = max(self.max_abs, abs_diff)
        self.n += d.numel()
        m = int(d.max()) if d.numel() else 0
        if m > self.max_steps:
            self.max_steps, self.worst = m, name
        self.differ += int((d > 0).sum())
        self.over_one += int((d > 1).sum())

    def as_dict(self) -> dict:
        return {
            "elements": self.n,
            "max_steps": self.max_steps,
            "worst_tensor": self.worst,
            "share_differ": self.differ / self.n if self.n else 0.0,
            "share_over_one_step": self.over_one / self.n if self.n else 0.0,
            "within_one_step": self.max_steps <= 1,
            "max_abs_diff": self.max_abs,
        }


def reference(method: str, name: str, base: Folder, experts: list[Folder], lam: float):
    import torch

    if method == "linear":
        acc = torch.zeros(experts[0].get(name).shape, dtype=torch.float64)
        for e in experts:
            acc += e.get(name).to(torch.float64)
        return acc / len(experts)
    b = base.get(name).to(torch.float64)
    acc = torch.zeros_like(b)
    for e in experts:
        acc += e.get(name).to(torch.float64) - b
    return b + lam * acc


def compare(method: str, a: Folder, b: Folder, base: Folder, experts: list[Folder], lam: float) -> dict:
    import torch

    if a.names() != b.names():
        only_a, only_b = sorted(a.names() - b.names()), sorted(b.names() - a.names())
        return {"error": f"tensor names differ: only in A {only_a[:5]}, only in B {only_b[:5]}"}
    ab, ref_a, ref_b = Stats(), Stats(), Stats()
    diff2 = change2 = 0.0
    for name in sorted(a.names()):
        ta, tb = a.get(name), b.get(name)
        if ta.shape != tb.shape:
            return {"error": f"{name}: shape {tuple(ta.shape)} vs {tuple(tb.shape)}"}
        if ta.dtype != torch.bfloat16 or tb.dtype != torch.bfloat16:
            return {"error": f"{name}: dtypes {ta.dtype} and {tb.dtype}, expected bfloat16"}
        fa, fb = ta.to(torch.float64), tb.to(torch.float64)
        ab.add(name, steps(ta, tb), float((fa - fb).abs().max()) if fa.numel() else 0.0)
        diff2 += float((fa - fb).square().sum())
        if name in base.names():
            change2 += float((fa - base.get(name).to(torch.float64)).square().sum())
        if method in REFERENCE_METHODS:
            r = reference(method, name, base, experts, lam)
            ref_a.add(name, steps(ta, r), float((fa - r).abs().max()) if r.numel() else 0.0)
            ref_b.add(name, steps(tb, r), float((fb - r).abs().max()) if r.numel() else 0.0)
    out: dict = {
        "tensors": len(a.names()),
        "a_vs_b": {**ab.as_dict(), "rel_l2_vs_change": (diff2**0.5) / (change2**0.5) if change2 else None},
    }
    if method in REFERENCE_METHODS:
        out["reference"] = {"a": ref_a.as_dict(), "b": ref_b.as_dict()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("method")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--experts", type=Path, nargs="+", required=True)
    p.add_argument("--lambda", dest="lam", type=float, default=1.0)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    with torch.no_grad():
        result = compare(
            a.method, Folder(a.a), Folder(a.b), Folder(a.base), [Folder(e) for e in a.experts], a.lam
        )
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
