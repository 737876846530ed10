"""The model layer: encoder naming, heads, fine-tuning (learning, cache, resume, multitask), evaluation.

Fast tests use a random 2-layer BERT (hidden 32) written to tmp with the real all-MiniLM tokenizer
files; task data is built by hand (tasks.base records; a stand-in spec with head, metric, labels).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sefusion.errors import CheckpointError, SefusionError
from sefusion.models import BUDGETS, TrainConfig, default_base, get_budget
from sefusion.models.encoder import Encoder
from sefusion.models.evaluation import evaluate, load_model, mrr
from sefusion.models.heads import contrastive_loss, cosine_matrix, head_names
from sefusion.models.train import TrainingStopped, finetune, head_only, read_train_info
from sefusion.tasks.base import Example as Ex
from sefusion.tasks.base import TaskData

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_data(task: str, splits: dict[str, list[Ex]], labels: list[str] | None = None) -> TaskData:
    """A TaskData built by hand."""
    return TaskData(task, splits, {"sources": []}, labels or [])


@dataclass(frozen=True)
class Spec:
    kind: str
    head: str
    metric: str
    labels: list[str]
    chance: float = 0.5


CLS2 = Spec("toy", "classify", "accuracy", ["a", "b"])
CLS3 = Spec("toy3", "classify", "accuracy", ["x", "y", "z"])
RET = Spec("search", "retrieval", "mrr", [], chance=0.1)

WORDS = [
    ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"],
    ["river", "mountain", "forest", "desert", "ocean", "valley", "island", "canyon"],
    ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"],
]


def toy_classify(name: str, n_labels: int = 2, n: int = 96, seed: int = 0) -> TaskData:
    """Label = which word family the text is drawn from: separable from bag-of-words alone."""
    rng = random.Random(seed)

    def make(k: int) -> list[Ex]:
        out = []
        for i in range(k):
            y = i % n_labels
            words = " ".join(rng.choice(WORDS[y]) for _ in range(6))
            out.append(Ex(f"def f{i}(): return {words}", label=y, meta={"kind": f"kind{y}"}))
        return out

    return make_data(name, {"train": make(n), "validation": make(48), "test": make(48)})


def toy_retrieval(name: str = "search-toy", n: int = 32) -> TaskData:
    rng = random.Random(1)

    def make(k: int) -> list[Ex]:
        out = []
        for i in range(k):
            w = [rng.choice(WORDS[i % 3]) for _ in range(3)]
            out.append(Ex(" ".join(w), text_pair=f"def g{i}(x): return {' '.join(w)}", label=i))
        return out

    return make_data(name, {"train": make(n), "validation": make(16), "test": make(16)})


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny models gain nothing from threads, and 2 threads on a busy 2-core machine crawl (OMP spin)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEFUSION_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT (hidden 32) with the real all-MiniLM tokenizer files."""
    from transformers import BertConfig, BertModel

    src = default_base()
    out = tmp_path_factory.mktemp("tiny") / "bert"
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    BertModel(cfg).save_pretrained(out)
    for f in TOKENIZER_FILES:
        shutil.copy(src / f, out / f)
    return out


@pytest.fixture(scope="module")
def dropout_base(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """The tiny base with dropout on: resume must restore the RNG to reproduce the dropout masks."""
    out = tmp_path_factory.mktemp("tinydrop") / "bert"
    shutil.copytree(tiny_base, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["hidden_dropout_prob"] = cfg["attention_probs_dropout_prob"] = 0.1
    (out / "config.json").write_text(json.dumps(cfg))
    return out


FAST = TrainConfig(steps=30, batch_size=8, lr=2e-3, max_length=32, warmup=0.1)


def file_names(folder: Path) -> list[str]:
    return list(load_file(str(folder / "model.safetensors")))


# --- encoder -------------------------------------------------------------------------------------
def test_body_state_uses_the_checkpoint_names(tiny_base: Path) -> None:
    enc = Encoder.from_pretrained(tiny_base)
    body = enc.body_state()
    stored = load_file(str(tiny_base / "model.safetensors"))
    floats = [n for n, t in stored.items() if t.is_floating_point()]
    assert sorted(body) == sorted(floats)
    assert not any(n.startswith("head.") for n in body)
    for n in floats:
        torch.testing.assert_close(body[n], stored[n], rtol=0, atol=0)


def test_body_state_names_of_minilm() -> None:
    base = default_base()
    enc = Encoder.from_pretrained(base)
    stored = load_file(str(base / "model.safetensors"))
    assert sorted(enc.body_state()) == sorted(n for n, t in stored.items() if t.is_floating_point())
    # the int64 position_ids buffer is not fusable: it is passed through, never in the body
    assert "embeddings.position_ids" in enc.passthrough


def test_prefixed_checkpoint_maps_back(tiny_base: Path, tmp_path: Path) -> None:
    """A checkpoint saved from a task model (`bert.` prefix) keeps its names in body_state."""
    folder = shutil.copytree(tiny_base, tmp_path / "prefixed")
    stored = load_file(str(folder / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({f"bert.{n}": t for n, t in stored.items()}, str(folder / "model.safetensors"))
    enc = Encoder.from_pretrained(folder)
    body = enc.body_state()
    assert all(n.startswith("bert.") for n in body) and len(body) == len(stored)
    torch.testing.assert_close(body["bert.pooler.dense.weight"], stored["pooler.dense.weight"])


def test_load_body_state_round_trip_and_errors(tiny_base: Path) -> None:
    enc = Encoder.from_pretrained(tiny_base)
    body = enc.body_state()
    x = enc.encode(["def f(): return 1"], max_length=16)
    shifted = {n: t + 0.01 for n, t in body.items()}
    enc.load_body_state({**shifted, "head.t.weight": torch.zeros(2, 32)})  # heads are ignored
    assert not torch.equal(enc.encode(["def f(): return 1"], max_length=16), x)
    enc.load_body_state(body)
    torch.testing.assert_close(enc.encode(["def f(): return 1"], max_length=16), x, rtol=0, atol=0)
    missing = dict(body)
    missing.pop(next(iter(missing)))
    with pytest.raises(CheckpointError, match="missing 1 tensors"):
        enc.load_body_state(missing)
    with pytest.raises(CheckpointError, match="does not have"):
        enc.load_body_state({**body, "nonsense.weight": torch.zeros(1)})
    name = "encoder.layer.0.output.dense.weight"
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        enc.load_body_state({**body, name: torch.zeros(3, 3)})


def test_encode_is_order_independent_and_pads_dynamically(tiny_base: Path) -> None:
    enc = Encoder.from_pretrained(tiny_base)
    texts = ["a", "def f(x): return x + 1 if x else 2", "b c d"]
    together = enc.encode(texts, batch_size=2)
    alone = torch.cat([enc.encode([t]) for t in texts])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    batch = enc.collate(enc.tokenize(texts[:1] + texts[2:], max_length=16))
    assert batch["input_ids"].shape[1] == 5  # [CLS] b c d [SEP]: padded to the longest, not to 16
    pairs = enc.encode(["doc"], ["code"])
    assert pairs.shape == (1, 32)


def test_bf16_scoring_stays_close_to_fp32(tiny_base: Path) -> None:
    """bf16 autocast changes the embeddings by bf16 rounding only (8-bit mantissa), never their shape/dtype."""
    enc = Encoder.from_pretrained(tiny_base)
    texts = ["def add(a, b): return a + b", "a docstring", "x = [i * i for i in range(10)]"] * 3
    fp32 = enc.encode(texts, batch_size=4)
    bf16 = enc.encode(texts, batch_size=4, precision="bf16")
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert not torch.equal(bf16, fp32)  # autocast did run
    cos = torch.nn.functional.cosine_similarity(bf16, fp32, dim=-1)
    assert float(cos.min()) > 0.999
    with pytest.raises(SefusionError, match="precision must be fp32 or bf16"):
        enc.encode(texts, precision="fp16")


def test_missing_base_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nowhere"):
        Encoder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="does not exist"):
        finetune(tmp_path / "nowhere", toy_classify("t"), CLS2, FAST, tmp_path / "cache", quiet=True)


# --- heads and metrics ---------------------------------------------------------------------------
def test_mrr_hand_worked() -> None:
    # query 0: gold 0 ranked 1st; query 1: gold 1 ranked 2nd (0.9 > 0.5); query 2: gold 2 ranked 3rd
    sim = torch.tensor([[0.9, 0.1, 0.2], [0.9, 0.5, 0.1], [0.8, 0.7, 0.6]])
    assert mrr(sim, [0, 1, 2]) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    # ties count against the query (the task layer's definition)
    assert mrr(torch.ones(2, 2), [0, 1]) == 0.5


def test_cosine_retrieval_known_embeddings() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    c = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # gold of q1 (c1) is orthogonal to it
    sim = cosine_matrix(q, c)
    torch.testing.assert_close(sim[2], torch.tensor([2**-0.5, 2**-0.5, 2**-0.5]))
    # q0: c0 and c1 tie at 1 -> rank 2; q1: c2 = 1 beats c1 = 0, c0 ties at 0 -> rank 3;
    # q2: all three tie -> rank 3
    assert mrr(sim, [0, 1, 2]) == pytest.approx((1 / 2 + 1 / 3 + 1 / 3) / 3)


def test_contrastive_loss_hand_worked() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = contrastive_loss(q, q.clone(), temperature=0.5)
    # logits per row: [2, 0]; CE = log(1 + e^-2)
    assert float(loss) == pytest.approx(float(torch.log1p(torch.exp(torch.tensor(-2.0)))))


def test_evaluate_hand_made_head(tiny_base: Path) -> None:
    """A head with zero weights and bias favouring class 1 predicts 1 everywhere."""
    data = toy_classify("toy")
    body, _ = load_model(tiny_base)
    w, b = head_names("toy")
    heads = {w: torch.zeros(2, 32), b: torch.tensor([0.0, 1.0])}
    r = evaluate(body, heads, data, "validation", CLS2, base=tiny_base)
    assert r["n"] == 48 and r["score"] == 0.5
    assert r["per_kind"] == {"kind0": 0.0, "kind1": 1.0}
    # class 1 everywhere: each example is right exactly when its label is 1; no paths: own clusters
    assert r["per_example"] == [float(ex.label == 1) for ex in data.splits["validation"]]
    assert r["clusters"] == [f"#example{i}" for i in range(48)]
    with pytest.raises(SefusionError, match="no head for task 'other'"):
        evaluate(body, heads, toy_classify("other"), "validation", CLS2, base=tiny_base)
    with pytest.raises(SefusionError, match="no split 'dev'"):
        evaluate(body, heads, data, "dev", CLS2, base=tiny_base)
    with pytest.raises(SefusionError, match="task 'toy' has no usable head spec"):
        evaluate(body, heads, data, "validation", Spec("toy", "regress", "mse", []), base=tiny_base)


# --- fine-tuning ---------------------------------------------------------------------------------
def test_expert_learns_and_is_cached(tiny_base: Path, tmp_path: Path) -> None:
    data = toy_classify("toy")
    body0, _ = load_model(tiny_base)
    before = evaluate(
        body0,
        {n: torch.zeros_like(t) for n, t in _heads(2).items()},
        data,
        "validation",
        CLS2,
        base=tiny_base,
    )
    t0 = time.perf_counter()
    out = finetune(tiny_base, [data], [CLS2], FAST, tmp_path, quiet=True)
    train_s = time.perf_counter() - t0
    info = read_train_info(out)
    losses = info["losses"]
    assert len(losses) == FAST.steps and info["config"]["steps"] == FAST.steps
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    body, heads = load_model(out)
    assert set(heads) == set(head_names("toy"))
    # the file holds the base's names (body + passthrough) and the heads
    assert sorted(file_names(out)) == sorted([*file_names(tiny_base), *head_names("toy")])
    for f in ("config.json", "vocab.txt", "tokenizer.json"):
        assert (out / f).is_file()
    after = evaluate(body, heads, data, "validation", CLS2, base=tiny_base)
    assert before["score"] == 0.5 and after["score"] >= 0.9
    assert out.parent == tmp_path / "models"
    assert not list(out.parent.glob(".work-*")) and not list(out.parent.glob(".*tmp-*"))
    # cache hit: same folder, no training, train.json untouched
    stamp = (out / "train.json").stat().st_mtime_ns
    text = (out / "train.json").read_text()
    import sefusion.models.train as train_mod

    def no_training(*a: Any, **k: Any) -> None:
        raise AssertionError("a cache hit must not train")

    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "_train", no_training)
        again = finetune(tiny_base, [data], [CLS2], FAST, tmp_path, quiet=True)
    hit_s = time.perf_counter() - t0
    assert again == out and (out / "train.json").stat().st_mtime_ns == stamp
    assert (out / "train.json").read_text() == text
    assert hit_s < max(0.5, train_s / 2)
    # another seed is another key
    other = finetune(tiny_base, [data], [CLS2], FAST.replace(steps=2, seed=1), tmp_path, quiet=True)
    assert other != out


def test_bf16_training_learns_runs_under_autocast_and_is_keyed_apart(tiny_base: Path, tmp_path: Path) -> None:
    data = toy_classify("toy")
    bf16 = FAST.replace(precision="bf16")
    seen: list[torch.dtype] = []
    import sefusion.models.encoder as enc_mod

    real_pool = enc_mod.Encoder.pool

    def spy(self: Any, batch: Any) -> torch.Tensor:
        # the dtype a matmul gets inside the pool call: bf16 only under an active CPU autocast
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return real_pool(self, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(enc_mod.Encoder, "pool", spy)
        out = finetune(tiny_base, [data], [CLS2], bf16, tmp_path, quiet=True)
    assert seen and set(seen) == {torch.bfloat16}
    info = read_train_info(out)
    assert info["config"]["precision"] == "bf16"
    losses = info["losses"]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    body, heads = load_model(out)
    assert all(t.dtype == torch.float32 for t in body.values())  # master weights stay float32
    assert evaluate(body, heads, data, "validation", CLS2, base=tiny_base)["score"] >= 0.9
    fp32 = finetune(tiny_base, [data], [CLS2], FAST, tmp_path, quiet=True)
    assert fp32 != out and "precision" not in read_train_info(fp32)["config"]  # fp32 keys as before
    with pytest.raises(SefusionError, match="precision must be one of fp32, bf16, got 'fp16'"):
        FAST.replace(precision="fp16")


def _heads(n: int) -> dict[str, torch.Tensor]:
    w, b = head_names("toy")
    return {w: torch.zeros(n, 32), b: torch.zeros(n)}


def test_resume_gives_the_same_weights(dropout_base: Path, tmp_path: Path) -> None:
    data = toy_classify("toy")
    cfg = FAST.replace(steps=8)
    whole = finetune(dropout_base, [data], [CLS2], cfg, tmp_path / "a", quiet=True)
    with pytest.raises(TrainingStopped, match="after 3 of 8 steps"):
        finetune(dropout_base, [data], [CLS2], cfg, tmp_path / "b", quiet=True, max_steps_this_run=3)
    assert list((tmp_path / "b" / "models").glob(".work-*/checkpoint.pt"))
    steps: list[int] = []

    def boom(step: int, total: int, loss: float) -> None:
        steps.append(step)
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # an interrupt between checkpoints loses only those steps
        finetune(
            dropout_base, [data], [CLS2], cfg, tmp_path / "b", quiet=True, callback=boom, checkpoint_seconds=0
        )
    assert steps == [4, 5, 6]
    resumed = finetune(dropout_base, [data], [CLS2], cfg, tmp_path / "b", quiet=True)
    info = read_train_info(resumed)
    assert info["resumed_from"] == [3, 5]
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6, msg=n)
    assert info["losses"] == pytest.approx(read_train_info(whole)["losses"], abs=1e-6)
    # the weights did move (dropout on, so the RNG had to be restored to match)
    base = load_file(str(dropout_base / "model.safetensors"))
    assert not torch.equal(
        a["encoder.layer.0.output.dense.weight"], base["encoder.layer.0.output.dense.weight"]
    )


def test_multitask_shares_the_body_with_one_head_per_task(tiny_base: Path, tmp_path: Path) -> None:
    tasks = [toy_classify("t2"), toy_classify("t3", n_labels=3, seed=2), toy_retrieval()]
    specs = {"t2": CLS2, "t3": CLS3, "search-toy": RET}
    cfg = FAST.replace(steps=4)
    out = finetune(tiny_base, tasks, specs, cfg, tmp_path, quiet=True)
    info = read_train_info(out)
    assert info["mode"] == "multitask" and info["total_steps"] == 12
    assert info["loss_tasks"][:4] == ["t2", "t3", "search-toy", "t2"]
    body, heads = load_model(out)
    assert sorted(heads) == sorted([*head_names("t2"), *head_names("t3")])  # search has none
    assert heads["head.t3.weight"].shape == (3, 32)
    assert sorted(body) == sorted(load_model(tiny_base)[0])
    for t, s in zip(tasks, specs.values(), strict=True):
        r = evaluate(body, heads, t, "test", s, base=tiny_base)
        assert 0 <= r["score"] <= 1


def test_retrieval_expert_improves_mrr(tiny_base: Path, tmp_path: Path) -> None:
    data = toy_retrieval(n=48)
    body0, _ = load_model(tiny_base)
    before = evaluate(body0, {}, data, "validation", RET, base=tiny_base)["score"]
    out = finetune(tiny_base, [data], [RET], FAST.replace(steps=25), tmp_path, quiet=True)
    body, heads = load_model(out)
    assert heads == {}
    after = evaluate(body, heads, data, "validation", RET, base=tiny_base)["score"]
    assert after > before


def test_merged_body_evaluates_from_memory(tiny_base: Path, tmp_path: Path) -> None:
    """An in-memory merge (here: the mean of base and expert) is scored without any file."""
    data = toy_classify("toy")
    out = finetune(tiny_base, [data], [CLS2], FAST.replace(steps=6), tmp_path, quiet=True)
    base_body, _ = load_model(tiny_base)
    body, heads = load_model(out)
    merged = {n: (base_body[n] + body[n]) / 2 for n in body}
    r = evaluate(merged, heads, data, "test", CLS2, base=tiny_base)
    assert r["n"] == 48


def test_head_only_keeps_the_base_body(tiny_base: Path, tmp_path: Path) -> None:
    data = toy_classify("toy")
    out = head_only(tiny_base, data, CLS2, FAST.replace(steps=30, head_lr=0.05), tmp_path)
    info = read_train_info(out)
    assert info["mode"] == "pretrained" and info["config"]["train_body"] is False
    assert info["config"]["head_lr"] == 0.05
    body, heads = load_model(out)
    base_body, _ = load_model(tiny_base)
    for n in base_body:
        assert torch.equal(body[n], base_body[n]), n
    assert set(heads) == set(head_names("toy"))
    assert sum(info["losses"][-5:]) < sum(info["losses"][:5])
    ret = head_only(tiny_base, toy_retrieval(), RET, FAST, tmp_path)
    ret_info = read_train_info(ret)
    assert ret_info["total_steps"] == 0 and load_model(ret)[1] == {}
    assert ret_info["config"]["head_lr"] == 1e-3  # the default probe rate


def test_labels_of_the_built_data_size_the_head(tiny_base: Path, tmp_path: Path) -> None:
    """Tasks whose classes come from the corpus (exception types) carry them on the TaskData."""
    data = toy_classify("exc", n_labels=3, seed=4)
    data = make_data("exc", data.splits, labels=["ValueError", "KeyError", "TypeError"])
    spec = Spec("exception", "classify", "accuracy", [])
    out = finetune(tiny_base, [data], [spec], FAST.replace(steps=2), tmp_path, quiet=True)
    body, heads = load_model(out)
    assert heads["head.exc.weight"].shape == (3, 32)
    assert read_train_info(out)["tasks"][0]["labels"] == ["ValueError", "KeyError", "TypeError"]
    assert evaluate(body, heads, data, "test", spec, base=tiny_base)["n"] == 48


def test_bad_task_input_is_named(tiny_base: Path, tmp_path: Path) -> None:
    data = toy_classify("toy")
    with pytest.raises(SefusionError, match="task 'toy' has no usable head spec"):
        finetune(tiny_base, [data], [Spec("toy", "none", "x", [])], FAST, tmp_path, quiet=True)
    with pytest.raises(SefusionError, match="no task spec for toy"):
        finetune(tiny_base, [data], {"other": CLS2}, FAST, tmp_path, quiet=True)
    bad = make_data("bad", {"train": [Ex("x", label=5)]})
    with pytest.raises(SefusionError, match="task 'bad': train example 0 has label 5"):
        finetune(tiny_base, [bad], [CLS2], FAST, tmp_path, quiet=True)
    with pytest.raises(SefusionError, match="task 'empty' has no training examples"):
        finetune(tiny_base, [make_data("empty", {"train": []})], [CLS2], FAST, tmp_path, quiet=True)
    with pytest.raises(SefusionError, match="steps must be >= 0"):
        TrainConfig(steps=-1)


def test_budgets() -> None:
    assert set(BUDGETS) == {"quick", "full"}
    q, f = BUDGETS["quick"], BUDGETS["full"]
    assert q.steps < f.steps and q.train().steps == q.steps and f.sizes["pool"] == 1000
    assert q.train(seed=3).seed == 3 and q.train(seed=3).lr == q.lr
    with pytest.raises(SefusionError, match="unknown budget 'fast'; available: quick, full"):
        get_budget("fast")
    assert q.eval_precision == "fp32" and f.eval_precision == "bf16"
    assert q.train().precision == "fp32" and f.train().precision == "bf16"
    with pytest.raises(SefusionError, match="train_precision must be one of fp32, bf16"):
        BUDGETS["quick"].__class__(**{**q.__dict__, "train_precision": "fp16"})
    with pytest.raises(SefusionError, match="eval_precision must be one of fp32, bf16"):
        BUDGETS["quick"].__class__(**{**q.__dict__, "eval_precision": "int8"})


def test_package_names_are_the_functions_not_submodules() -> None:
    """`sefusion.models.evaluate` is the function, even after every submodule has been imported."""
    import importlib
    import types

    import sefusion.models as m

    for sub in ("config", "encoder", "heads", "evaluation", "train"):
        importlib.import_module(f"sefusion.models.{sub}")
    for name in m.__all__:
        assert not isinstance(getattr(m, name), types.ModuleType), name
    assert callable(m.evaluate) and callable(m.finetune) and callable(m.head_only)


# --- the real base (slow) ------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_expert_few_steps(tmp_path: Path) -> None:
    data = toy_classify("toy", n=64)
    out = finetune(
        default_base(),
        [data],
        [CLS2],
        TrainConfig(steps=8, batch_size=8, lr=1e-4, max_length=32),
        tmp_path,
        quiet=True,
    )
    body, heads = load_model(out)
    assert sorted(body) == sorted(Encoder.from_pretrained(default_base()).body_state())
    r = evaluate(body, heads, data, "validation", CLS2, base=default_base())
    assert r["score"] > 0.5
