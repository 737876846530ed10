"""sefusion.io: readers (safetensors, sharded, .bin, PEFT LoRA) and the atomic sharded writer."""

from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sefusion.errors import CheckpointError, OutputExistsError, SefusionError
from sefusion.io import (
    ModelReader,
    ModelWriter,
    atomic_dir,
    check_finite,
    file_sha256,
    open_model,
    parse_size,
)

transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    # peft mistakes lora_B's bias (lora_bias=True) for an ungathered ZeRO-3 shard
    pytest.mark.filterwarnings("ignore:.*invalid shape:UserWarning"),
]


def tiny_bert_config():
    return transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )


def state(reader: ModelReader) -> dict[str, torch.Tensor]:
    return {n: reader.get(n) for n in reader.names()}


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> dict:
    """A tiny BertModel and a BertForSequenceClassification, saved single-file, sharded and as .bin."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bert")
    model = transformers.BertModel(tiny_bert_config()).eval()
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    # transformers 5 ignores safe_serialization=False, so the .bin folders are written by hand.
    (root / "bin").mkdir()
    torch.save(sd, root / "bin" / "pytorch_model.bin")
    (root / "bin" / "config.json").write_text((root / "single" / "config.json").read_text())
    (root / "binsharded").mkdir()
    names = sorted(sd)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for fname, part in halves.items():
        torch.save({n: sd[n] for n in part}, root / "binsharded" / fname)
    wm = {n: f for f, part in halves.items() for n in part}
    (root / "binsharded" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    (root / "binsharded" / "config.json").write_text((root / "single" / "config.json").read_text())
    cls = transformers.BertForSequenceClassification(tiny_bert_config()).eval()
    cls.save_pretrained(root / "cls")
    return {"root": root, "model": model, "sd": sd, "cls": cls}


# -- readers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("folder", "kind"), [("single", "safetensors"), ("sharded", "safetensors"), ("bin", "bin"), ("binsharded", "bin")])  # fmt: skip
def test_readers_agree_with_the_model(bert, folder, kind):
    with open_model(bert["root"] / folder) as r:
        assert r.kind == kind
        assert r.names() == sorted(bert["sd"])
        for name, want in bert["sd"].items():
            assert name in r
            assert r.shape(name) == tuple(want.shape)
            assert r.dtype(name) == want.dtype
            assert torch.equal(r.get(name), want)
            assert r.file_of(name).parent == bert["root"] / folder
        assert "nope" not in r
        assert [f.name for f in r.aux_files()] == ["config.json"]
    if folder == "sharded":
        assert len(r.weight_files()) > 2
        with pytest.raises(CheckpointError, match="no tensor 'nope'"):
            r.shape("nope")


def test_single_file_and_loose_safetensors(tmp_path):
    a, b = {"x": torch.randn(3, 2)}, {"y": torch.arange(4)}
    save_file(a, str(tmp_path / "part-a.safetensors"))
    save_file(b, str(tmp_path / "part-b.safetensors"))
    r = open_model(tmp_path)
    assert r.names() == ["x", "y"] and torch.equal(r.get("y"), b["y"])
    assert r.dtype("y") == torch.int64 and r.shape("x") == (3, 2)
    one = open_model(tmp_path / "part-a.safetensors")
    assert one.names() == ["x"] and torch.equal(one.get("x"), a["x"])


def test_get_returns_a_fresh_tensor(bert):
    for folder in ("single", "bin"):
        r = open_model(bert["root"] / folder)
        name = "pooler.dense.bias"
        r.get(name).add_(1.0)
        assert torch.equal(r.get(name), bert["sd"][name])


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no model weights in .*empty.*model\.safetensors"):
        open_model(tmp_path / "empty")


def test_truncated_safetensors_fails_at_open(bert, tmp_path):
    data = (bert["root"] / "single" / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated: tensor '.*'"):
        open_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data + b"\0" * 8)
    with pytest.raises(CheckpointError, match="header covers"):
        open_model(tmp_path)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"abc", "only 3 bytes"),
        (struct.pack("<Q", 10**12) + b"{}", "header claims"),
        (struct.pack("<Q", 5) + b"{oops", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ],
)
def test_garbage_header(tmp_path, blob, match):
    (tmp_path / "model.safetensors").write_bytes(blob)
    with pytest.raises(CheckpointError, match=match) as info:
        open_model(tmp_path)
    assert "model.safetensors" in str(info.value)


def test_bad_header_entry(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match="tensor 'w' .* spans 8 bytes, expected 16"):
        open_model(tmp_path)


def test_duplicate_tensor_across_files(tmp_path):
    save_file({"x": torch.zeros(2), "a": torch.zeros(1)}, str(tmp_path / "one.safetensors"))
    save_file({"x": torch.ones(2)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'x' is in two files: .*one\.safetensors and .*two"):
        open_model(tmp_path)


def test_index_with_missing_or_wrong_shard(bert, tmp_path):
    import shutil

    folder = shutil.copytree(bert["root"] / "sharded", tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (folder / victim).rename(tmp_path / victim)
    with pytest.raises(CheckpointError, match=f"shards but 1 are missing: {victim}"):
        open_model(folder)
    (tmp_path / victim).rename(folder / victim)
    name, fname = next(iter(index["weight_map"].items()))
    index["weight_map"][name] = victim if fname != victim else sorted(set(index["weight_map"].values()))[0]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"maps tensor '{name}'"):
        open_model(folder)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid index"):
        open_model(folder)


def test_corrupt_bin(bert, tmp_path):
    data = (bert["root"] / "bin" / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*pytorch_model\.bin"):
        open_model(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        open_model(tmp_path)
    torch.save({"step": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="flat state dict"):
        open_model(tmp_path)


def test_legacy_bin_without_mmap(tmp_path):
    sd = {"a": torch.randn(3, 2), "b": torch.arange(5)}
    torch.save(sd, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    r = open_model(tmp_path)
    assert r.names() == ["a", "b"] and torch.equal(r.get("a"), sd["a"]) and r.dtype("b") == torch.int64


def test_aux_files(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    keep = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.txt", "merges.txt", "vocab.json", "added_tokens.json",
            "spiece.model", "chat_template.jinja"]  # fmt: skip
    drop = ["README.md", "pytorch_model.bin.index.json", "training_args.bin", "notes.txt"]
    for n in keep + drop:
        (tmp_path / n).write_text("x")
    assert [p.name for p in open_model(tmp_path).aux_files()] == sorted(keep)


# -- LoRA ----------------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")


def make_adapter(model, folder: Path, seed: int = 1, **lora_kwargs) -> dict[str, torch.Tensor]:
    """Wrap a copy of `model` with LoRA, give B (and saved modules) random values, save the adapter and
    return peft's own merge_and_unload() state dict, the reference."""
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**lora_kwargs))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.5)
    pm.save_pretrained(folder)
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def assert_matches(reader: ModelReader, want: dict[str, torch.Tensor], rename=lambda n: n) -> None:
    for name, w in want.items():
        got = reader.get(rename(name))
        assert got.dtype == w.dtype and got.shape == w.shape, name
        torch.testing.assert_close(got, w, atol=1e-5, rtol=0, msg=name)


def test_lora_equals_peft_merge(bert, tmp_path):
    ref = make_adapter(bert["model"], tmp_path / "ad", r=4, lora_alpha=8, target_modules=["query", "value"])
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 4
    base = open_model(bert["root"] / "single")
    with open_model(tmp_path / "ad", base=base) as r:
        assert r.kind == "lora" and r.names() == base.names()
        assert_matches(r, ref)
        q = "encoder.layer.0.attention.self.query.weight"
        assert not torch.equal(r.get(q), base.get(q))  # the delta is really there
        assert r.file_of(q).name == "adapter_model.safetensors"
        assert r.file_of("pooler.dense.weight") == base.file_of("pooler.dense.weight")
        assert r.shape(q) == base.shape(q) and r.dtype(q) == base.dtype(q)
        assert [f.name for f in r.aux_files()] == ["config.json"]
        assert r.weight_files()[0].name == "adapter_model.safetensors"


def test_lora_onto_bf16_base_computes_in_float32(bert, tmp_path):
    ref = make_adapter(bert["model"], tmp_path / "ad", r=4, lora_alpha=8, target_modules=["query"])
    save_file({k: v.to(torch.bfloat16) for k, v in bert["sd"].items()}, str(tmp_path / "half.safetensors"))
    base = open_model(tmp_path / "half.safetensors")
    r = open_model(tmp_path / "ad", base=base)
    name = "encoder.layer.0.attention.self.query.weight"
    got = r.get(name)
    assert got.dtype == torch.bfloat16 and r.dtype(name) == torch.bfloat16
    want = (base.get(name).float() + (ref[name] - bert["sd"][name])).to(torch.bfloat16)
    torch.testing.assert_close(got, want, atol=1e-2, rtol=0)


def test_lora_needs_a_base(bert, tmp_path):
    make_adapter(bert["model"], tmp_path / "ad", r=2, lora_alpha=4, target_modules=["query"])
    with pytest.raises(CheckpointError, match="is a LoRA adapter; it needs the base model"):
        open_model(tmp_path / "ad")


def test_rslora_with_patterns(bert, tmp_path):
    ref = make_adapter(
        bert["model"], tmp_path / "ad", r=4, lora_alpha=8, use_rslora=True, target_modules=["query", "value", "dense"],
        rank_pattern={"layer.1.attention.self.value": 2}, alpha_pattern={r"layer\.0\..*query": 3},
    )  # fmt: skip
    r = open_model(tmp_path / "ad", base=open_model(bert["root"] / "sharded"))
    assert r._deltas["encoder.layer.1.attention.self.value.weight"].scale == pytest.approx(8 / math.sqrt(2))
    assert r._deltas["encoder.layer.0.attention.self.query.weight"].scale == pytest.approx(3 / 2)
    assert_matches(r, ref)


def test_lora_on_classifier_over_headless_base(bert, tmp_path):
    """Adapter trained on BertForSequenceClassification (keys `bert.…` plus a saved classifier),
    base folder holds a BertModel (no prefix): deltas land by suffix, the head is added."""
    ref = make_adapter(
        bert["cls"],
        tmp_path / "ad",
        r=4,
        lora_alpha=16,
        target_modules=["query", "value"],
        task_type="SEQ_CLS",
    )
    base = open_model(bert["root"] / "single")
    r = open_model(tmp_path / "ad", base=base)
    assert set(r.names()) == set(base.names()) | {"classifier.weight", "classifier.bias"}
    # The base here is `model`, not `cls`'s encoder, so compare deltas, not weights.
    base_cls = bert["cls"].state_dict()
    for name in base.names():
        want_delta = ref["bert." + name] - base_cls["bert." + name]
        torch.testing.assert_close(r.get(name) - base.get(name), want_delta, atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(r.get("classifier.weight"), ref["classifier.weight"])
    assert r.file_of("classifier.weight").name == "adapter_model.safetensors"


def test_lora_without_prefix_over_prefixed_base(bert, tmp_path):
    ref = make_adapter(bert["model"], tmp_path / "ad", r=4, lora_alpha=8, target_modules=["key"])
    base = open_model(bert["root"] / "cls")
    r = open_model(tmp_path / "ad", base=base)
    assert r.names() == base.names()
    name = "encoder.layer.1.attention.self.key.weight"
    want = base.get("bert." + name) + (ref[name] - bert["sd"][name])
    torch.testing.assert_close(r.get("bert." + name), want, atol=1e-5, rtol=0)


def test_embedding_lora(bert, tmp_path):
    ref = make_adapter(
        bert["model"], tmp_path / "ad", r=4, lora_alpha=8, target_modules=["word_embeddings", "query"]
    )
    r = open_model(tmp_path / "ad", base=open_model(bert["root"] / "bin"))
    assert r._deltas["embeddings.word_embeddings.weight"].kind == "embedding"
    assert_matches(r, ref)


def test_fan_in_fan_out_gpt2(tmp_path):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=16)
    model = transformers.GPT2Model(cfg).eval()
    model.save_pretrained(tmp_path / "base")
    ref = make_adapter(
        model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True
    )
    r = open_model(tmp_path / "ad", base=open_model(tmp_path / "base"))
    assert r.shape("h.0.attn.c_attn.weight") == (32, 96)  # Conv1D stores (in, out)
    assert r._deltas["h.0.attn.c_attn.weight"].transpose
    assert_matches(r, {k: v for k, v in ref.items() if k in r})


def test_lora_bias(bert, tmp_path):
    ref = make_adapter(
        bert["model"], tmp_path / "ad", r=2, lora_alpha=4, target_modules=["value"], lora_bias=True
    )
    r = open_model(tmp_path / "ad", base=open_model(bert["root"] / "single"))
    assert "encoder.layer.0.attention.self.value.bias" in r._deltas
    assert_matches(r, ref)


def test_lora_bin_adapter_and_adapter_name_in_keys(bert, tmp_path):
    from safetensors.torch import load_file

    ref = make_adapter(bert["model"], tmp_path / "ad", r=4, lora_alpha=8, target_modules=["query"])
    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    (tmp_path / "ad" / "adapter_model.safetensors").unlink()
    torch.save({k.replace("lora_A.", "lora_A.default.").replace("lora_B.", "lora_B.default."): v for k, v in sd.items()},
               tmp_path / "ad" / "adapter_model.bin")  # fmt: skip
    r = open_model(tmp_path / "ad", base=open_model(bert["root"] / "single"))
    assert_matches(r, ref)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "IA3 adapter; only LoRA"),
        ({"r": 8}, "has rank 4 but adapter_config.json says r=8"),
    ],
)
def test_lora_refusals(bert, tmp_path, edit, match):
    make_adapter(bert["model"], tmp_path / "ad", r=4, lora_alpha=8, target_modules=["query"])
    f = tmp_path / "ad" / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **edit}))
    with pytest.raises(CheckpointError, match=match):
        open_model(tmp_path / "ad", base=open_model(bert["root"] / "single"))


def test_lora_key_without_base_tensor_or_ambiguous(bert, tmp_path):
    make_adapter(bert["model"], tmp_path / "ad", r=4, lora_alpha=8, target_modules=["query"])
    t = {
        "x.query.weight": torch.zeros(4, 4),
        "y.query.weight": torch.zeros(4, 4),
        "z.k.weight": torch.zeros(4, 4),
    }
    save_file(t, str(tmp_path / "odd.safetensors"))
    odd = open_model(tmp_path / "odd.safetensors")
    with pytest.raises(
        CheckpointError, match=r"adapter key '.*layer\.0.*query\.lora_A\.weight' .* does not hold"
    ):
        open_model(tmp_path / "ad", base=odd)
    sd = {
        "base_model.model.query.lora_A.weight": torch.zeros(2, 4),
        "base_model.model.query.lora_B.weight": torch.zeros(4, 2),
    }
    save_file(sd, str(tmp_path / "ad" / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 2}))
    with pytest.raises(
        CheckpointError, match=r"'base_model\.model\.query\.lora_A\.weight' .* matches several"
    ):
        open_model(tmp_path / "ad", base=odd)


# -- writer --------------------------------------------------------------------------------------------


def test_writer_shards_and_transformers_loads_it(bert, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = open_model(bert["root"] / "single")
    out = tmp_path / "deep" / "out"
    with ModelWriter(out, shard_size=parse_size("20KB"), aux_from=src, model_card="# merged\n") as w:
        for name in src.names():
            w.add(name, src.get(name))
        (w.tmp_path / "extra.json").write_text("{}")
        w.commit()
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"config.json", "README.md", "extra.json", "model.safetensors.index.json"} <= set(files)
    assert (out / "README.md").read_text() == "# merged\n"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == src.names()
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in bert["sd"].values())
    loaded = transformers.AutoModel.from_pretrained(out)
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, bert["sd"][name]), name
    from safetensors import safe_open

    with safe_open(str(out / shards[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert not leftovers(tmp_path)


def test_writer_single_shard_big_tensor_and_views(tmp_path):
    big = torch.randn(100, 100)
    with ModelWriter(tmp_path / "one") as w:
        w.add("a", big[:10])  # a view: must be stored compactly
        w.add("b", big.T)  # non-contiguous
        w.add("c", big)  # shares storage with "a"
        w.commit()
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]
    r = open_model(tmp_path / "one")
    assert (
        torch.equal(r.get("a"), big[:10]) and torch.equal(r.get("b"), big.T) and torch.equal(r.get("c"), big)
    )
    with ModelWriter(tmp_path / "many", shard_size=1000) as w:
        w.add("small1", torch.zeros(10))
        w.add("huge", torch.zeros(1000))  # bigger than a shard: its own file
        w.add("small2", torch.zeros(10))
        w.commit()
    r = open_model(tmp_path / "many")
    assert len({r.file_of(n) for n in r.names()}) == 3
    with ModelWriter(tmp_path / "dup") as w:
        w.add("x", torch.zeros(1))
        with pytest.raises(ValueError, match="added twice"):
            w.add("x", torch.zeros(1))


def test_writer_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match=f"output folder {out} exists; pass --overwrite"):
        ModelWriter(out).__enter__()
    assert (out / "old.txt").exists()
    with ModelWriter(out, overwrite=True) as w:
        w.add("x", torch.ones(2))
        w.commit()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_writer_failure_leaves_nothing(tmp_path, exc):
    with pytest.raises(exc), ModelWriter(tmp_path / "out", shard_size=8) as w:
        for i in range(4):
            w.add(f"t{i}", torch.zeros(4))
        raise exc("boom")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    # an existing output survives a failed overwrite
    (tmp_path / "keep").mkdir()
    with pytest.raises(exc), ModelWriter(tmp_path / "keep", overwrite=True) as w:
        w.add("x", torch.zeros(1))
        raise exc("boom")
    assert (tmp_path / "keep").is_dir() and not leftovers(tmp_path)


def test_writer_without_commit_leaves_nothing(tmp_path):
    with ModelWriter(tmp_path / "out") as w:
        w.add("x", torch.zeros(1))
    assert list(tmp_path.iterdir()) == []


def test_writer_disk_full(tmp_path, monkeypatch):
    import errno

    import sefusion.io.writer as writer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "save_file", full)
    match = "disk full while writing .*out; nothing was written"
    with pytest.raises(SefusionError, match=match), ModelWriter(tmp_path / "out") as w:
        w.add("x", torch.zeros(1))
        w.commit()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir(tmp_path):
    with atomic_dir(tmp_path / "a") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.tmp-")
        (tmp / "f").write_text("1")
    assert (tmp_path / "a" / "f").read_text() == "1"
    with pytest.raises(OutputExistsError):
        atomic_dir(tmp_path / "a").__enter__()
    with pytest.raises(ValueError), atomic_dir(tmp_path / "a", overwrite=True) as tmp:
        raise ValueError
    assert (tmp_path / "a" / "f").exists() and not leftovers(tmp_path)
    with atomic_dir(tmp_path / "a", overwrite=True) as tmp:
        (tmp / "g").write_text("2")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["g"] and not leftovers(tmp_path)


# -- helpers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("1.5GiB", int(1.5 * 2**30)), ("1000", 1000), ("20kb", 20_000),
     (" 2 MiB ", 2 * 2**20), (77, 77)],
)  # fmt: skip
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("junk", ["", "GB", "5XB", "-1GB", "0", "1.2.3GB", "five"])
def test_parse_size_junk(junk):
    with pytest.raises(ValueError):
        parse_size(junk)


def test_check_finite():
    check_finite("w", torch.ones(3), "f.safetensors")
    check_finite("i", torch.arange(3), "f.safetensors")
    t = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")], dtype=torch.bfloat16)
    with pytest.raises(
        CheckpointError, match=r"tensor 'w' in f\.safetensors has non-finite values \(3 NaN/Inf\)"
    ):
        check_finite("w", t, "f.safetensors")


def test_file_sha256(tmp_path):
    import hashlib

    (tmp_path / "a").write_bytes(b"hello ")
    (tmp_path / "b").write_bytes(b"world")
    assert file_sha256([tmp_path / "a", tmp_path / "b"]) == hashlib.sha256(b"hello world").hexdigest()
    assert file_sha256(tmp_path / "b") == hashlib.sha256(b"world").hexdigest()
    assert file_sha256([tmp_path / "a", tmp_path / "b"], chunk=2) == file_sha256(
        [tmp_path / "a", tmp_path / "b"]
    )


def test_writer_with_layout_streams_in_any_order(tmp_path):
    """With a planned layout tensors go straight to disk, in any order, and read back exactly."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(33, 17, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(5, generator=g),
        "c.scalar": torch.tensor(3.5),
        "d.mask": torch.randint(0, 255, (3, 11), generator=g, dtype=torch.uint8),
        "e.empty": torch.zeros(0, 4),
    }
    layout = [(n, t.shape, t.dtype) for n, t in tensors.items()]
    out = tmp_path / "out"
    with ModelWriter(out, shard_size=1000, layout=layout) as w:
        for name in reversed(list(tensors)):
            w.add(name, tensors[name])
        w.commit()
    assert (out / "model.safetensors.index.json").is_file()
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    reader = open_model(out)
    assert torch.equal(reader.get("a.weight"), tensors["a.weight"])


def test_writer_with_layout_refuses_surprises(tmp_path):
    layout = [("x", (2, 3), torch.float32), ("y", (4,), torch.float32)]
    with pytest.raises(ValueError, match="'x'"), ModelWriter(tmp_path / "o1", layout=layout) as w:
        w.add("x", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="'z'"), ModelWriter(tmp_path / "o2", layout=layout) as w:
        w.add("z", torch.zeros(4))
    with pytest.raises(ValueError, match="never added"), ModelWriter(tmp_path / "o3", layout=layout) as w:
        w.add("x", torch.zeros(2, 3))
        w.commit()
    assert not any(p.name.startswith(("o", ".o")) for p in tmp_path.iterdir())
