"""The statistics pass over a real (tiny) encoder: Gram matrices equal X^T X of the hidden states the model
computes, the exact and empirical Fisher equal a per-example reference computed on a separately loaded
model, results are cached, bad data is refused by name, and PLeaS of a model with itself gives it back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_base
from sefusion.models.statistics import (
    StatsData,
    collect_statistics,
    expert_statistics,
    load_stats_data,
    pleas_fuse,
    statistics_for,
)
from sefusion.stats import StatisticsError
from sefusion.tasks.base import Example, TaskData

CLS = "consistency-python"  # a classification task (pairs); search-python: retrieval
TEXTS = [
    ("Return the sum of two numbers.", "def add(a, b):\n    return a + b"),
    ("Open a file and read it.", "def read(path):\n    with open(path) as f:\n        return f.read()"),
    ("Sort a list in place.", "def srt(xs):\n    xs.sort()"),
    ("Count the words of a line.", "def words(line):\n    return len(line.split())"),
    ("Check that a number is even.", "def even(n):\n    return n % 2 == 0"),
    ("Join strings with commas.", "def join(parts):\n    return ', '.join(parts)"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    base = tiny_base(root / "base")
    state = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    expert = root / "expert"
    expert.mkdir()
    for f in base.iterdir():
        if f.name != "model.safetensors":
            (expert / f.name).write_bytes(f.read_bytes())
    body = {k: (v + 0.02 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
            for k, v in state.items()}  # fmt: skip
    body[f"head.{CLS}.weight"] = torch.randn(2, 32, generator=g)
    body[f"head.{CLS}.bias"] = torch.randn(2, generator=g)
    save_file(body, str(expert / "model.safetensors"))
    return root, base, expert


def _data(task=CLS, n=6) -> TaskData:
    ex = [Example(q, c, i % 2) for i, (q, c) in enumerate(TEXTS[:n])]
    return TaskData(task=task, splits={"train": ex, "validation": ex[:2], "test": ex[:2]}, provenance={})


def _hf(folder: Path):
    from transformers import BertModel

    model = BertModel.from_pretrained(str(folder)).eval()
    return model


def _tokens(folder: Path, text: str, pair: str | None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    return tok(text, pair, truncation=True, max_length=64, return_tensors="pt")


def _pool(model, batch):
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def _collect(tiny, kinds, data=None, **kw):
    from sefusion.models.evaluation import get_encoder, load_model

    _, base, expert = tiny
    body, heads = load_model(expert)
    enc = get_encoder(base)
    enc.load_body_state(body)
    sd = load_stats_data(data or _data(), len(TEXTS), heads=heads)
    return collect_statistics(enc, heads, sd, kinds, max_length=64, quiet=True, **kw), sd


def test_gram_is_xtx_of_the_hidden_states(tiny):
    stats, sd = _collect(tiny, ["gram"])
    model = _hf(tiny[2])
    ref = [torch.zeros(32, 32, dtype=torch.float64) for _ in range(2)]
    tokens = 0
    with torch.no_grad():
        for ex in sd.examples:
            hs = model(**_tokens(tiny[2], ex.text, ex.text_pair), output_hidden_states=True).hidden_states
            tokens += hs[0].shape[1]
            for i in range(2):  # layer i's query reads hidden state i
                x = hs[i][0].double()
                ref[i] += x.T @ x
    for i in range(2):
        name = f"encoder.layer.{i}.attention.self.query.weight"
        assert stats.gram_rows(name) == tokens
        torch.testing.assert_close(stats.gram(name), ref[i], rtol=1e-9, atol=1e-6)
    assert "encoder.layer.1.intermediate.dense.weight" in stats.gram_names()
    assert not any(n.startswith("head.") for n in stats.gram_names())


def test_exact_fisher_matches_a_per_example_reference(tiny):
    stats, sd = _collect(tiny, ["fisher"])
    assert stats.meta.fisher_type == "exact" and stats.examples == len(TEXTS)
    model = _hf(tiny[2])
    expert = load_file(str(tiny[2] / "model.safetensors"))
    w, b = expert[f"head.{CLS}.weight"], expert[f"head.{CLS}.bias"]
    params = dict(model.named_parameters())
    names = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.1.output.dense.bias",
             "embeddings.LayerNorm.weight"]  # fmt: skip
    ref = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    for ex in sd.examples:
        logp = torch.log_softmax(
            (_pool(model, _tokens(tiny[2], ex.text, ex.text_pair)) @ w.T + b)[0].double(), -1
        )
        for y in range(2):
            grads = torch.autograd.grad(logp[y], [params[n] for n in names], retain_graph=True)
            for n, g in zip(names, grads, strict=True):
                ref[n] += float(logp[y].detach().exp()) * g.double() ** 2
    for n in names:
        torch.testing.assert_close(stats.fisher(n).double(), ref[n] / len(sd.examples), rtol=1e-4, atol=1e-12)
    # every body tensor has a Fisher (the pooler gets none from mean pooling: zero, not missing)
    assert "pooler.dense.weight" in stats.fisher_names()
    assert float(stats.fisher("pooler.dense.weight").abs().sum()) == 0.0


def test_retrieval_fisher_is_the_empirical_fisher_of_the_contrastive_loss(tiny):
    data = _data("search-python")
    stats, sd = _collect(tiny, ["fisher", "gram"], data=data, batch_size=3, temperature=0.05)
    assert stats.meta.fisher_type == "empirical" and sd.kind == "retrieval"
    model = _hf(tiny[2])
    name = "encoder.layer.1.attention.self.value.weight"
    p = dict(model.named_parameters())[name]
    ref = torch.zeros_like(p, dtype=torch.float64)
    for s in range(0, len(sd.examples), 3):
        chunk = sd.examples[s : s + 3]
        q = torch.cat([_pool(model, _tokens(tiny[2], ex.text, None)) for ex in chunk])
        c = torch.cat([_pool(model, _tokens(tiny[2], ex.text_pair, None)) for ex in chunk])
        sim = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(c, dim=-1).T / 0.05
        losses = -torch.log_softmax(sim.double(), -1).diagonal()
        for i in range(len(chunk)):
            (g,) = torch.autograd.grad(losses[i], [p], retain_graph=True)
            ref += g.double() ** 2
    torch.testing.assert_close(stats.fisher(name).double(), ref / len(sd.examples), rtol=1e-4, atol=1e-12)


def test_statistics_are_cached_and_reopened(tiny, tmp_path, monkeypatch):
    _, base, expert = tiny
    kw = dict(data=_data(), examples=4, kinds=["fisher", "gram"], base=base, cache=tmp_path, quiet=True)
    folder = statistics_for(expert, **kw)
    assert (folder / "stats.json").is_file() and folder.parent == tmp_path / "stats"
    import sefusion.models.statistics as st

    monkeypatch.setattr(st, "collect_statistics", lambda *a, **k: pytest.fail("recomputed"))
    assert statistics_for(expert, **kw) == folder
    store = expert_statistics(expert, **kw)
    assert store.examples == 4 and store.has_gram("encoder.layer.0.output.dense.weight")
    assert json.loads((folder / "stats.json").read_text())["task"] == CLS
    # another example count is another key
    monkeypatch.undo()
    assert statistics_for(expert, **{**kw, "examples": 3}) != folder


def test_bad_data_is_refused_by_name(tiny, tmp_path):
    _, base, expert = tiny
    kw = dict(kinds=["gram"], base=base, cache=tmp_path, quiet=True)
    with pytest.raises(StatisticsError, match="too few examples.*6 available, 50 asked"):
        statistics_for(expert, data=_data(), examples=50, **kw)
    with pytest.raises(StatisticsError, match="no head for task 'clone-python'"):
        statistics_for(expert, data=_data("clone-python"), examples=2, **kw)
    with pytest.raises(Exception, match="available"):
        statistics_for(expert, data="nosuchtask-python", examples=2, **kw)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n{"code": 1}\n')
    with pytest.raises(StatisticsError, match=r"bad.jsonl:2: each line needs a string 'text'"):
        statistics_for(expert, data=bad, examples=1, **kw)
    with pytest.raises(StatisticsError, match="does not exist"):
        statistics_for(expert, data=tmp_path / "none.jsonl", examples=1, **kw)
    with pytest.raises(StatisticsError, match="does not exist"):
        statistics_for(tmp_path / "no-expert", data=_data(), examples=1, **kw)


def test_jsonl_data_uses_the_experts_only_head(tiny, tmp_path):
    _, base, expert = tiny
    good = tmp_path / "pairs.jsonl"
    good.write_text("".join(json.dumps({"text": q, "text_pair": c}) + "\n" for q, c in TEXTS))
    store = expert_statistics(
        expert, data=good, examples=5, kinds=["fisher"], base=base, cache=tmp_path, quiet=True
    )
    assert store.meta.task == CLS and store.meta.data == str(good) and store.examples == 5


def test_pleas_of_a_model_with_itself_gives_it_back(tiny):
    from sefusion.models.evaluation import load_model

    _, base, expert = tiny
    body, heads = load_model(expert)
    data = _data()
    merged, out_heads = pleas_fuse(
        base, [body, body], [heads, heads], [data, data], examples=6, max_length=64
    )
    from sefusion.models.evaluation import get_encoder

    enc = get_encoder(base)
    texts = [q for q, _ in TEXTS]
    enc.load_body_state(body)
    want = enc.encode(texts, max_length=64)
    enc.load_body_state(merged)
    # the outputs, not every weight: the key bias is not determined by the data (q.k ignores a shift)
    torch.testing.assert_close(enc.encode(texts, max_length=64), want, rtol=1e-3, atol=1e-4)
    # (weights read from LayerNorm outputs are determined up to the direction the data never spans)
    for h in out_heads:
        for k, v in heads.items():
            torch.testing.assert_close(h[k], v)


def test_pleas_budget_below_one_widens_the_ffn_and_keeps_the_outputs(tiny):
    """budget 0.5 keeps both models' least-matched half of each FFN: a wider FFN, which the evaluation
    builds an encoder for (`encoder_for`), and which still computes the model's embeddings."""
    import math

    from sefusion.errors import RecipeError
    from sefusion.models.evaluation import encoder_for, evaluate, get_encoder, load_model
    from sefusion.tasks.base import get_task

    _, base, expert = tiny
    body, heads = load_model(expert)
    data = _data()
    merged, out_heads = pleas_fuse(
        base, [body, body], [heads, heads], [data, data], examples=6, max_length=64, budget=0.5
    )
    ffn = [n for n in body if n.endswith("intermediate.dense.weight")]
    assert ffn
    for n in ffn:
        width, k = body[n].shape[0], math.ceil(0.5 * body[n].shape[0])
        assert merged[n].shape == (k + 2 * (width - k), body[n].shape[1])
        out = n.replace("intermediate.dense", "output.dense")
        assert merged[out].shape == (body[out].shape[0], k + 2 * (width - k))
    wide = encoder_for(base, merged)
    assert not wide.model.training and not get_encoder(base).model.training  # same mode either way
    assert wide is not get_encoder(base) and wide is encoder_for(base, merged)  # built once, then reused
    assert encoder_for(base, body) is get_encoder(base)
    texts = [q for q, _ in TEXTS]
    narrow = get_encoder(base)
    narrow.load_body_state(body)
    want = narrow.encode(texts, max_length=64)
    wide.load_body_state(merged)
    torch.testing.assert_close(wide.encode(texts, max_length=64), want, rtol=1e-3, atol=1e-4)
    spec = get_task(CLS)[0]
    assert evaluate(merged, out_heads[0], data, "test", spec, base=base) == evaluate(
        body, heads, data, "test", spec, base=base
    )
    with pytest.raises(RecipeError, match="budget must be in"):
        pleas_fuse(base, [body, body], [heads, heads], [data, data], examples=6, budget=0.0)


def test_stats_data_sample_is_seeded_and_sorted():
    heads = {f"head.{CLS}.weight": torch.zeros(2, 4), f"head.{CLS}.bias": torch.zeros(2)}
    a = load_stats_data(_data(), 3, heads=heads, seed=0)
    b = load_stats_data(_data(), 3, heads=heads, seed=0)
    assert isinstance(a, StatsData) and a.examples == b.examples and a.fingerprint == b.fingerprint
    assert [TEXTS.index((e.text, e.text_pair)) for e in a.examples] == sorted(
        TEXTS.index((e.text, e.text_pair)) for e in a.examples
    )
