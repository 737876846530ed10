"""Synthetic Llama-shaped checkpoints for the benchmarks: a random base and experts = base + small noise.

Tensor names, shapes and config.json are those of transformers' `LlamaForCausalLM`, so sefusion, mergekit
and transformers all accept the folders. Values: base ~ N(0, 0.02) (RMSNorm weights 1 + N(0, 0.02), so a
forward pass stays sane), expert j = base + N(0, 1e-3), computed in float32 and stored as bfloat16.
Every tensor has its own generator seeded from (seed, model, tensor name), so any expert can be made
without the others and expert j is the same whichever number of experts is asked for.

Files are written tensor by tensor (the safetensors header is planned up front from the shapes), so
memory stays at one float32 tensor whatever the model size, and sharded the way `save_pretrained` does
(`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`) so readers take the sharded path.
A finished folder carries `.complete`; it is reused, keyed by size and seed.

    python benchmarks/checkpoints.py --size 0.2b --experts 4      # -> benchmarks/.data/llama-0.2b-s0/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).resolve().parent / ".data"
BASE_STD = 0.02
NOISE_STD = 1e-3
BYTES_PER_PARAM = 2  # bfloat16


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    shard_bytes: int  # largest shard; chosen so that every size is written as several shards

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in `LlamaForCausalLM.state_dict()` order."""
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def params(self) -> int:
        return sum(_numel(s) for _, s in self.tensors())

    @property
    def model_bytes(self) -> int:
        return self.params * BYTES_PER_PARAM

    @property
    def largest_tensor_bytes(self) -> int:
        return max(_numel(s) for _, s in self.tensors()) * BYTES_PER_PARAM

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "initializer_range": BASE_STD,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "use_cache": True,
            "torch_dtype": "bfloat16",
        }


MB = 1000**2
SIZES: dict[str, Size] = {
    s.name: s
    for s in [
        # for tests: a few hundred thousand parameters
        Size(
            "tiny", hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, vocab=512, shard_bytes=300_000
        ),
        # --quick: ~56M parameters
        Size(
            "0.05b",
            hidden=512,
            intermediate=1408,
            layers=8,
            heads=8,
            kv_heads=4,
            vocab=32000,
            shard_bytes=50 * MB,
        ),
        # ~212M parameters (TinyLlama's shape, narrower and shallower)
        Size(
            "0.2b",
            hidden=1024,
            intermediate=2816,
            layers=13,
            heads=16,
            kv_heads=4,
            vocab=32000,
            shard_bytes=200 * MB,
        ),
        # ~1.1B parameters: TinyLlama-1.1B's shape
        Size(
            "1b",
            hidden=2048,
            intermediate=5632,
            layers=22,
            heads=32,
            kv_heads=4,
            vocab=32000,
            shard_bytes=1000 * MB,
        ),
    ]
}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def model_dir(size: str, seed: int, model: str, root: Path = DATA) -> Path:
    """`model` is "base" or "expert-<j>"."""
    return root / f"llama-{size}-s{seed}" / model


def model_names(n_experts: int) -> list[str]:
    return ["base"] + [f"expert-{j}" for j in range(n_experts)]


def _generator_seed(seed: int, model: str, tensor: str) -> int:
    digest = hashlib.sha256(f"{seed}/{model}/{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _plan_shards(size: Size) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy in state-dict order, as `save_pretrained` splits: a new shard when the next tensor would overflow."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in size.tensors():
        nbytes = _numel(shape) * BYTES_PER_PARAM
        if shards[-1] and used + nbytes > size.shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    return shards


def _header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = _numel(shape) * BYTES_PER_PARAM
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def required_bytes(size: str, seed: int, n_experts: int, root: Path = DATA) -> int:
    """Bytes still to write to have the base and `n_experts` experts on disk."""
    missing = [
        m for m in model_names(n_experts) if not (model_dir(size, seed, m, root) / ".complete").is_file()
    ]
    return len(missing) * SIZES[size].model_bytes


def check_disk(path: Path, need: int, margin: int = 2 * 1024**3) -> None:
    """Fail clearly before writing anything when the disk cannot hold `need` bytes plus a margin."""
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if need + margin > free:
        raise SystemExit(
            f"not enough disk space under {path}: need {need / 1e9:.1f} GB (+{margin / 1e9:.0f} GB margin), "
            f"{free / 1e9:.1f} GB free; remove old data (rm -rf {DATA}) or run fewer sizes/experts"
        )


def ensure(size: str, seed: int, n_experts: int, root: Path = DATA, log=print) -> list[Path]:
    """The base and experts 0..n_experts-1 of `size`, written if not already on disk. Returns their folders."""
    import torch

    spec = SIZES[size]
    models = model_names(n_experts)
    dirs = [model_dir(size, seed, m, root) for m in models]
    todo = [(m, d) for m, d in zip(models, dirs, strict=True) if not (d / ".complete").is_file()]
    if not todo:
        return dirs
    check_disk(root, len(todo) * spec.model_bytes)
    log(
        f"writing {len(todo)} synthetic {size} checkpoint(s) ({spec.params / 1e6:.0f}M params, "
        f"{spec.model_bytes / 1e9:.2f} GB each) under {dirs[0].parent}"
    )
    shards = _plan_shards(spec)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    tmps = {}
    for m, d in todo:
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tmps[m] = tmp
        (tmp / "config.json").write_text(json.dumps(spec.config(), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
        weight_map = {name: names[k] for k, shard in enumerate(shards) for name, _ in shard}
        index = {"metadata": {"total_size": spec.model_bytes}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    # One pass over the tensors writes every missing model: the base tensor is drawn once per tensor.
    for k, shard in enumerate(shards):
        files = {m: open(tmps[m] / names[k], "wb") for m in tmps}  # noqa: SIM115 - closed below
        try:
            header = _header(shard)
            for f in files.values():
                f.write(header)
            for name, shape in shard:
                g = torch.Generator().manual_seed(_generator_seed(seed, "base", name))
                base = torch.randn(shape, generator=g).mul_(BASE_STD)
                if name.endswith("norm.weight"):
                    base.add_(1.0)
                for m, f in files.items():
                    if m == "base":
                        out = base.to(torch.bfloat16)
                    else:
                        g = torch.Generator().manual_seed(_generator_seed(seed, m, name))
                        noise = torch.randn(shape, generator=g).mul_(NOISE_STD)
                        out = noise.add_(base).to(torch.bfloat16)
                    out.view(torch.int16).numpy().tofile(f)
        finally:
            for f in files.values():
                f.close()
    for m, d in todo:
        (tmps[m] / ".complete").write_text(json.dumps({"size": size, "seed": seed, "model": m}) + "\n")
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmps[m], d)
    return dirs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="0.2b")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", type=Path, default=DATA)
    a = p.parse_args(argv)
    ensure(a.size, a.seed, a.experts, a.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
