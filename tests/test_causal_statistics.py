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
        same, chosen = causal_stats_folder(tmp_path, "rev", got.meta.expert_sha256, base_sha256(base), data,
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
    assert first not in others and len(others) == 3
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
