"""The statistics pass of a causal LoRA expert (sefusion.models.causal_statistics) against a reference
computed another way: the expert merged by PEFT (not base + LoraReader's updates), the vocabulary head
run at every position (not only at the targets), each pair's gradient taken with torch.autograd on the
summed target NLL, and each linear layer's inputs taken by forward hooks in float64."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from sefusion.errors import CheckpointError
from sefusion.io.lora import TRAIN_RECORD
from sefusion.models.causal import load_causal
from sefusion.models.causal_statistics import causal_statistics_for, causal_stats_folder
from sefusion.models.causal_train import encode_pair
from sefusion.models.train import base_sha256
from sefusion.stats import StatisticsError, open_stats
from tiny_causal import make_causal, pairs, random_adapter

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
ADAPTED = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def expert(tmp_path_factory):
    root = tmp_path_factory.mktemp("cstats")
    base = make_causal(root / "base")
    return base, random_adapter(base, root / "adapter", r=4, alpha=8, seed=3)


def reference(base, adapter, chosen, max_len=64):
    """{name: Fisher}, {name: Gram} of the PEFT-merged expert over `chosen`, in float64 where summed."""
    lm, tok = load_causal(adapter, base=base, dtype=torch.float32)
    names = [n for n, _ in lm.named_parameters() if n.endswith(".weight") and n.split(".")[-2] in ADAPTED]
    params = dict(lm.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    fisher = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    gram: dict[str, torch.Tensor] = {}
    hooks = []
    for mod_name, mod in lm.named_modules():
        if f"{mod_name}.weight" in fisher:

            def hook(_m, args, _out, key=f"{mod_name}.weight"):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                gram[key] = gram.get(key, 0) + x.T @ x

            hooks.append(mod.register_forward_hook(hook))
    for prompt, target in chosen:
        ids, n_prompt = encode_pair(tok, prompt, target, max_len)
        x = torch.tensor([ids])
        logits = lm(input_ids=x).logits[0].double()  # (L, V): every position
        logp = torch.log_softmax(logits[:-1], dim=-1)
        nll = -logp[torch.arange(n_prompt - 1, len(ids) - 1), x[0, n_prompt:]].sum()
        grads = torch.autograd.grad(nll, [params[n] for n in names])
        for n, g in zip(names, grads, strict=True):
            fisher[n] += g.double() ** 2
    for h in hooks:
        h.remove()
    return {n: f / len(chosen) for n, f in fisher.items()}, gram


def test_fisher_and_gram_match_the_reference(expert, tmp_path):
    base, adapter = expert
    data = pairs(12, seed=5)
    folder = causal_statistics_for(base, adapter, data, task="rev", examples=5, max_len=64, cache=tmp_path)
    with open_stats(folder) as got:
        chosen_fisher = got.fisher_names()
        assert sorted(chosen_fisher) == sorted(got.gram_names())
        assert len(chosen_fisher) == 2 * len(ADAPTED)  # two layers; only the adapted weights
        assert got.examples == 5 and got.meta.fisher_type == "empirical"
        same, chosen = causal_stats_folder(tmp_path, "rev", adapter, base_sha256(base), data,
                                           examples=5, kinds=("fisher", "gram"), max_len=64)  # fmt: skip
        assert same == folder and len(chosen) == 5
        ref_f, ref_g = reference(base, adapter, chosen)
        assert sorted(ref_f) == sorted(chosen_fisher)
        for n in chosen_fisher:
            torch.testing.assert_close(got.fisher(n).double(), ref_f[n], rtol=2e-4, atol=1e-9)
            # float32 products: each entry within float32 rounding of the matrix's scale
            scale = float(ref_g[n].abs().max())
            torch.testing.assert_close(got.gram(n), ref_g[n], rtol=1e-5, atol=1e-6 * scale)
            assert got.gram_rows(n) == sum(len(encode_pair(load_tok(base), p, t, 64)[0]) for p, t in chosen)


def load_tok(base):
    from sefusion.models.causal import load_tokenizer

    return load_tokenizer(base)


def test_statistics_are_computed_once_and_keyed_by_what_makes_them(expert, tmp_path):
    base, adapter = expert
    data = pairs(8, seed=1)
    kw = dict(task="rev", max_len=64, cache=tmp_path, kinds=("gram",))
    first = causal_statistics_for(base, adapter, data, examples=3, **kw)
    stamp = os.stat(first / "stats.safetensors").st_mtime_ns
    assert causal_statistics_for(base, adapter, data, examples=3, **kw) == first
    assert os.stat(first / "stats.safetensors").st_mtime_ns == stamp  # read, not recomputed
    others = {
        causal_statistics_for(base, adapter, data, examples=4, **kw),
        causal_statistics_for(base, adapter, data, examples=3, seed=1, **kw),
        causal_statistics_for(base, adapter, pairs(8, seed=2), examples=3, **kw),
    }
    rescaled = tmp_path / "rescaled"  # the same weights, another lora_alpha: every update scaled
    shutil.copytree(adapter, rescaled)
    cfg = json.loads((rescaled / "adapter_config.json").read_text())
    (rescaled / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 2 * cfg["lora_alpha"]}))
    others.add(causal_statistics_for(base, rescaled, data, examples=3, **kw))
    assert first not in others and len(others) == 4
    with open_stats(first) as only_gram:
        assert only_gram.fisher_names() == [] and only_gram.gram_names()


def test_bad_requests_are_one_clear_error(expert, tmp_path):
    base, adapter = expert
    with pytest.raises(StatisticsError, match="too few examples"):
        causal_statistics_for(base, adapter, pairs(2), task="rev", examples=3, cache=tmp_path)
    with pytest.raises(StatisticsError, match="kinds must be"):
        causal_statistics_for(
            base, adapter, pairs(4), task="rev", examples=2, kinds=("hessian",), cache=tmp_path
        )
    other = make_causal(tmp_path / "other", seed=1)
    recorded = tmp_path / "recorded"
    shutil.copytree(adapter, recorded)
    (recorded / TRAIN_RECORD).write_text(json.dumps({"base_sha256": base_sha256(base)}))
    with pytest.raises(CheckpointError, match="trained on another base"):
        causal_statistics_for(other, recorded, pairs(4), task="rev", examples=2, cache=tmp_path)


def test_a_failed_pass_leaves_the_model_as_it_was(expert):
    """requires_grad and train mode come back on every path (here: no tensor to take a Fisher of)."""
    from sefusion.models.causal_statistics import causal_statistics

    base, _ = expert
    lm, tok = load_causal(base, dtype=torch.float32)
    lm.train()
    before = {n: p.requires_grad for n, p in lm.named_parameters()}
    with pytest.raises(StatisticsError):
        causal_statistics(lm, tok, pairs(2), ("fisher", "gram"), [], max_len=64)
    assert {n: p.requires_grad for n, p in lm.named_parameters()} == before and lm.training


def _merged_reference(method, base, adapters, stats, names):
    """The merged `names` by METHODS.md's formulas in float64 (fisher: floor 1e-6, normalized; regmean:
    alpha 0.95), from each expert as PEFT merges it (not LoraReader's updates) and its statistics."""
    thetas = []
    for a in adapters:
        sd = dict(load_causal(a, base=base, dtype=torch.float32)[0].named_parameters())
        thetas.append({n: sd[n].detach().double() for n in names})
    out = {}
    if method == "fisher":
        f = [{n: s.fisher(n).double() for n in names} for s in stats]
        norms = [torch.sqrt(sum((fi[n] ** 2).sum() for n in names)) for fi in f]
        for n in names:
            w = [fi[n].clamp_min(1e-6) / norm for fi, norm in zip(f, norms, strict=True)]
            out[n] = sum(wi * t[n] for wi, t in zip(w, thetas, strict=True)) / sum(w)
        return out
    for n in names:
        g = [s.gram(n).double() for s in stats]
        g = [0.95 * gi + 0.05 * torch.diag(torch.diag(gi)) for gi in g]
        rhs = sum(gi @ t[n].T for gi, t in zip(g, thetas, strict=True))
        out[n] = torch.linalg.solve(sum(g), rhs).T
    return out


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_merge_computes_lora_experts_statistics_from_data_and_copies_what_no_adapter_changes(
    method, expert, tmp_path, monkeypatch
):
    """Two adapters on different tensors (q, v, down; q, up): each one's statistics cover both's."""
    from safetensors.torch import load_file

    from sefusion.cli import main
    from sefusion.io.lora import dense_updates

    base, first = expert
    second = random_adapter(base, tmp_path / "second", r=4, alpha=8, seed=5, targets=("q_proj", "up_proj"))
    monkeypatch.setenv("SEFUSION_CACHE", str(tmp_path / "cache"))
    models = []
    for i, a in enumerate((first, second)):
        data = tmp_path / f"d{i}.jsonl"
        data.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in pairs(6, seed=i)))
        models.append({"path": str(a), "name": f"t{i}", "data": str(data), "examples": 4})
    (tmp_path / "r.yaml").write_text(json.dumps({"method": method, "base": str(base), "models": models}))
    assert main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "-q"]) == 0

    names = sorted({*dense_updates(first, base), *dense_updates(second, base)})
    assert any("up_proj" in n for n in names) and any("down_proj" in n for n in names)
    kind = "fisher" if method == "fisher" else "gram"
    stats = [
        open_stats(causal_statistics_for(base, a, pairs(6, seed=i), task=f"t{i}", examples=4, kinds=[kind],
                                         names=names))
        for i, a in enumerate((first, second))
    ]  # fmt: skip
    assert len(list((tmp_path / "cache" / "stats").iterdir())) == 2  # the very folders the merge wrote
    merged, held = load_file(tmp_path / "out" / "model.safetensors"), load_file(base / "model.safetensors")
    for n, v in _merged_reference(method, base, (first, second), stats, names).items():
        torch.testing.assert_close(merged[n].double(), v, rtol=1e-5, atol=1e-6, msg=n)
    untouched = [n for n in held if n not in names]
    assert untouched and all(torch.equal(merged[n], held[n]) for n in untouched)  # copied, bit for bit


def test_a_lora_expert_given_an_encoder_task_as_data_is_one_clear_error(expert, tmp_path, capsys):
    from sefusion.cli import main

    base, adapter = expert
    models = [{"path": str(adapter), "name": "t0", "data": "defect-python"}]
    (tmp_path / "r.yaml").write_text(json.dumps({"method": "fisher", "base": str(base), "models": models}))
    assert main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "-q"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expert 't0'" in err[0] and "defect-python" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_data_free_merge_of_lora_experts_still_merges_every_tensor(expert, tmp_path):
    """linear without normalizing is the weighted sum, not an average: a tensor no adapter changes is then
    not the base's, so only the data-aware methods copy such tensors."""
    from safetensors.torch import load_file

    from sefusion.cli import main

    base, first = expert
    models = [{"path": str(first), "name": "a"}, {"path": str(first), "name": "b"}]
    recipe = {"method": "linear", "base": str(base), "models": models, "params": {"normalize": False}}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    assert main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "-q"]) == 0
    merged, held = load_file(tmp_path / "out" / "model.safetensors"), load_file(base / "model.safetensors")
    norm = next(n for n in held if n.endswith("norm.weight"))
    torch.testing.assert_close(merged[norm], 2 * held[norm])
