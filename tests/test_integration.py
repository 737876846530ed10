"""Tiny real transformers models on disk (BERT- and Llama-shaped, a PEFT LoRA adapter), merged through
the CLI, loaded back with transformers, and compared with the in-memory API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import read_folder, write_recipe
from sefusion import merge_tensors
from sefusion.cli import main

transformers = pytest.importorskip("transformers")


def bert_config(num_labels: int = 2):
    return transformers.BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=num_labels,
    )  # fmt: skip


def llama_config():
    return transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip


def perturbed(model, seed: int, scale: float = 0.02, density: float | None = None, skip: str = "classifier"):
    """A copy of `model`'s weights plus seeded noise (optionally on a random support)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if not v.is_floating_point() or k.startswith(skip):
            sd[k] = v.clone()
            continue
        noise = torch.randn(v.shape, generator=g) * scale
        if density is not None:
            noise = noise * (torch.rand(v.shape, generator=g) < density)
        sd[k] = (v.float() + noise).to(v.dtype)
    return sd


def save_like(model, sd: dict, path: Path) -> Path:
    model.load_state_dict(sd)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    base = transformers.BertModel(bert_config()).eval()
    base.save_pretrained(root / "base")
    paths = {"base": root / "base"}
    for i in range(3):
        m = transformers.BertModel(bert_config())
        paths[f"x{i}"] = save_like(m, perturbed(base, 100 + i), root / f"x{i}")
    return paths


def cli_merge(tmp_path: Path, recipe: dict, *extra: str) -> Path:
    r = write_recipe(tmp_path / "recipe.yaml", **recipe)
    out = tmp_path / "out"
    assert main(["merge", str(r), str(out), "-q", *extra]) == 0
    return out


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("linear", {}),
        ("task_arithmetic", {"lambda": 0.7}),
        ("ties", {"density": 0.3}),
        ("ties", {"density": 0.3, "density_scope": "model"}),
        ("dare_linear", {"density": 0.5}),
        ("dare_ties", {"density": 0.5}),
        ("consensus", {"k": 2}),
        ("cabs", {"n": 2, "m": 8}),
    ],
)
def test_bert_merge_loads_and_matches_api(bert_models, tmp_path, method, params):
    p = bert_models
    experts = ["x0", "x1", "x2"]
    recipe = {
        "method": method,
        "base": str(p["base"]),
        "models": [{"path": str(p[e]), "name": e} for e in experts],
        "params": params,
        "seed": 7,
    }
    out = cli_merge(tmp_path, recipe, "--shard-size", "60KB")
    assert (out / "model.safetensors.index.json").is_file()  # sharded
    model = transformers.AutoModel.from_pretrained(out)
    merged = {k: v for k, v in model.state_dict().items()}
    base_sd = read_folder(p["base"])
    ex_sd = [read_folder(p[e]) for e in experts]
    floats = [k for k, v in base_sd.items() if v.is_floating_point()]
    ref = merge_tensors(
        method,
        {k: base_sd[k] for k in floats},
        [{k: sd[k] for k in floats} for sd in ex_sd],
        task_names=experts,
        seed=7,
        **params,
    )
    for k in floats:
        torch.testing.assert_close(merged[k], ref[k], rtol=0, atol=0, msg=k)
    x = torch.randint(0, 120, (2, 9))
    assert torch.isfinite(model(input_ids=x).last_hidden_state).all()


def test_llama_bf16_merge_loads_and_runs(tmp_path):
    torch.manual_seed(1)
    base = transformers.LlamaForCausalLM(llama_config()).to(torch.bfloat16).eval()
    base.save_pretrained(tmp_path / "base")
    paths = []
    for i in range(2):
        m = transformers.LlamaForCausalLM(llama_config()).to(torch.bfloat16)
        paths.append(save_like(m, perturbed(base, 200 + i, skip="@none"), tmp_path / f"e{i}"))
    recipe = {
        "method": "ties",
        "base": str(tmp_path / "base"),
        "models": [{"path": str(q)} for q in paths],
        "params": {"density": 0.2},
    }
    out = cli_merge(tmp_path, recipe)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    sd = model.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in sd.values() if v.is_floating_point())
    base_sd = read_folder(tmp_path / "base")
    ex = [read_folder(q) for q in paths]
    ref = merge_tensors("ties", base_sd, ex, density=0.2)
    for k in base_sd:
        torch.testing.assert_close(sd[k], ref[k], rtol=0, atol=0, msg=k)
    logits = model(input_ids=torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, 96) and torch.isfinite(logits.float()).all()


def test_lora_adapter_as_expert(bert_models, tmp_path):
    peft = pytest.importorskip("peft")
    p = bert_models
    model = transformers.BertModel.from_pretrained(p["base"])
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    lora.save_pretrained(tmp_path / "adapter")
    expected = {k: v.clone() for k, v in lora.merge_and_unload().state_dict().items()}
    recipe = {
        "method": "task_arithmetic",
        "base": str(p["base"]),
        "models": [{"path": str(tmp_path / "adapter"), "name": "lora"}],
        "params": {"lambda": 1.0},
    }
    out = cli_merge(tmp_path, recipe)
    merged = transformers.AutoModel.from_pretrained(out).state_dict()
    changed = 0
    for k, v in expected.items():
        if not v.is_floating_point():
            continue
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6, msg=k)
        changed += int(not torch.equal(v, read_folder(p["base"])[k]))
    assert changed == 4  # query and value of two layers


@pytest.mark.parametrize("method", ["tall_masks", "scaling_masks"])
def test_bundle_with_heads_rebuilds_disjoint_experts(tmp_path, method):
    """Experts with disjoint supports (and heads of different sizes) are rebuilt exactly from a bundle."""
    torch.manual_seed(2)
    cfg = bert_config()
    base = transformers.BertForSequenceClassification(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    base_sd = base.state_dict()
    g = torch.Generator().manual_seed(5)
    owner = {k: torch.randint(0, 3, v.shape, generator=g) for k, v in base_sd.items()}
    tasks = {"defect": 3, "search": 2, "clone": 4}
    scales = {"defect": 0.05, "search": 0.01, "clone": 0.0005}  # one strong, one weak, one very weak
    expert_sd = {}
    for i, (task, labels) in enumerate(tasks.items()):
        m = transformers.BertForSequenceClassification(bert_config(labels))
        sd = m.state_dict()
        for k, v in base_sd.items():
            if k.startswith("classifier") or not v.is_floating_point():
                continue
            delta = torch.randn(v.shape, generator=g) * scales[task] * (owner[k] == i)
            sd[k] = v + delta
        expert_sd[task] = sd
        save_like(m, sd, tmp_path / task)
    recipe = {
        "method": method,
        "base": str(tmp_path / "base"),
        "models": [{"path": str(tmp_path / t), "name": t} for t in tasks],
        "exclude": ["classifier.*"],
        "params": {"lambdas": {"defect": 0.4, "search": 0.3, "clone": 0.5}},
    }
    bundle = cli_merge(tmp_path, recipe)
    assert (bundle / "bundle.json").is_file()
    for task, labels in tasks.items():
        dest = tmp_path / f"task-{task}"
        assert main(["extract", str(bundle), task, str(dest), "-q"]) == 0
        model = transformers.AutoModelForSequenceClassification.from_pretrained(dest)
        assert model.config.num_labels == labels
        got = model.state_dict()
        for k, v in expert_sd[task].items():
            if not v.is_floating_point():
                continue
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=f"{task}:{k}")
    from sefusion.bundle import Bundle

    b = Bundle(bundle)
    st = b.storage()
    b.close()
    # float32 vector + 3 bits per parameter + three heads, against three float32 checkpoints
    assert st["bundle_bytes"] < 0.45 * st["separate_bytes"]


def test_inspect_model_and_bundle(bert_models, tmp_path, capsys):
    assert main(["inspect", str(bert_models["base"]), "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "embeddings.LayerNorm.bias" in out and "22,080 parameters" in out and "36 more" in out
    recipe = {
        "method": "tall_masks",
        "base": str(bert_models["base"]),
        "models": [{"path": str(bert_models[e])} for e in ("x0", "x1")],
    }
    bundle = cli_merge(tmp_path, recipe)
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "tall_masks" in out and "separate checkpoints" in out


def test_folder_of_plain_safetensors_without_config(tmp_path):
    """Any folder of safetensors files merges, even with no known architecture."""
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(4, 4, generator=g), "b": torch.randn(3, generator=g)}
    (tmp_path / "base").mkdir()
    save_file({"a": base["a"]}, str(tmp_path / "base" / "part1.safetensors"))
    save_file({"b": base["b"]}, str(tmp_path / "base" / "part2.safetensors"))
    ex = {k: v + 0.1 for k, v in base.items()}
    (tmp_path / "ex").mkdir()
    save_file(ex, str(tmp_path / "ex" / "weights.safetensors"))
    recipe = {
        "method": "task_arithmetic",
        "base": str(tmp_path / "base"),
        "models": [{"path": str(tmp_path / "ex")}],
    }
    out = cli_merge(tmp_path, recipe)
    got = read_folder(out)
    torch.testing.assert_close(got["a"], ex["a"])
    torch.testing.assert_close(got["b"], ex["b"])
