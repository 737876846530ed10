"""Fuzz the readers of untrusted files: any input loads, or raises sefusion's own error (SefusionError),
never another exception and never a hang (bounded examples, each with a deadline).

Readers: the safetensors header, the sharded index, the LoRA adapter, the bundle, the recipe YAML.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import toy_tensors, write_folder
from sefusion.errors import SefusionError

EXAMPLES = {"header": 200, "index": 150, "lora": 150, "bundle": 100, "recipe": 200}


def fuzz(n: int):  # noqa: ANN201 - a decorator
    return settings(
        max_examples=n,
        deadline=timedelta(seconds=5),  # a hang guard on a busy machine, not a speed claim
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@contextmanager
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)


@contextmanager
def loads_or_refuses() -> Iterator[None]:
    """The only outcomes allowed: it loads, or it raises SefusionError (counted: --hypothesis-show-statistics)."""
    try:
        yield
    except SefusionError:
        event("refused with SefusionError")
    else:
        event("loaded")


def read_every_tensor(reader) -> None:
    for name in reader.names():
        t = reader.get(name)
        assert tuple(t.shape) == tuple(reader.shape(name)) and t.dtype == reader.dtype(name)


# -- safetensors header ---------------------------------------------------------------------------

entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "X9"]) | scalars,
        "shape": st.lists(st.integers(-3, 6), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-8, 300), min_size=0, max_size=3) | json_values,
    }
)
headers = st.dictionaries(st.text(max_size=8), entries | json_values, max_size=4)


SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F64": 8}


@st.composite
def valid_header(draw) -> tuple[dict, int]:
    """A consistent header (offsets tiling the data) and its data length."""
    header: dict = {"__metadata__": {"format": "pt"}} if draw(st.booleans()) else {}
    pos = 0
    for name in draw(st.lists(st.text(min_size=1, max_size=6), max_size=4, unique=True)):
        code = draw(st.sampled_from(sorted(SIZES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        n = SIZES[code] * (1 if not shape else __import__("math").prod(shape))
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    return header, pos


@st.composite
def safetensors_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "random", "valid", "mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "random":
        raw = json.dumps(draw(headers)).encode()
        data_len = draw(st.integers(0, 300))
    else:
        header, data_len = draw(valid_header())
        if kind == "mutated" and header:
            path = draw(st.sampled_from(json_paths(header)))
            header = edit(header, path, draw(json_values), delete=bool(path) and draw(st.booleans()))
        raw = json.dumps(header).encode()
        data_len += draw(st.sampled_from([0, 0, 0, 1, -1])) if data_len else 0
    if draw(st.booleans()) and raw:  # a damaged byte inside the JSON
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1 :]
    n = draw(st.sampled_from([len(raw)] * 4) | st.integers(0, 2**64 - 1))
    return struct.pack("<Q", n) + raw + draw(st.binary(min_size=max(data_len, 0), max_size=max(data_len, 0)))


@fuzz(EXAMPLES["header"])
@given(data=safetensors_bytes())
def test_fuzz_safetensors_header(data):
    from sefusion.io import SafetensorsReader

    with folder() as d:
        f = d / "model.safetensors"
        f.write_bytes(data)
        with loads_or_refuses():
            reader = SafetensorsReader(f, [f])
            read_every_tensor(reader)
            reader.close()


# -- sharded index ------------------------------------------------------------------------------

SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
shard_names = st.sampled_from(
    [*SHARDS, "../outside.safetensors", "/etc/passwd", "", ".", "sub/../../x", "C:evil", "nope.safetensors",
     "model.safetensors.index.json", "a\\..\\..\\b"]
) | st.text(max_size=12)  # fmt: skip
weight_maps = st.dictionaries(st.sampled_from(["a", "b", "c", "d"]) | st.text(max_size=6), shard_names | scalars,
                              max_size=5)  # fmt: skip
VALID_MAP = {"a": SHARDS[0], "b": SHARDS[0], "c": SHARDS[1]}


@st.composite
def indexes(draw):
    kind = draw(st.sampled_from(["valid", "edited", "random", "junk"]))
    if kind == "junk":
        return draw(json_values)
    if kind == "random":
        return {"weight_map": draw(weight_maps)}
    wm = dict(VALID_MAP)
    if kind == "edited":
        for key in draw(st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), min_size=1, max_size=3)):
            if draw(st.booleans()):
                wm.pop(key, None)
            else:
                wm[key] = draw(shard_names)
    return {"metadata": {"total_size": 56}, "weight_map": wm}


@fuzz(EXAMPLES["index"])
@given(index=indexes())
def test_fuzz_sharded_index(index):
    from sefusion.io import open_model

    with folder() as d:
        m = d / "m"
        m.mkdir()
        save_file({"a": torch.ones(2, 3), "b": torch.zeros(4)}, str(m / SHARDS[0]))
        save_file({"c": torch.ones(5)}, str(m / SHARDS[1]))
        (d / "outside.safetensors").write_bytes(b"\xff" * 16)  # never to be read
        (m / "model.safetensors.index.json").write_text(json.dumps(index))
        with loads_or_refuses(), open_model(m) as reader:
            read_every_tensor(reader)
            assert all(f.resolve().parent == m.resolve() for f in reader.weight_files())


# -- LoRA adapter -------------------------------------------------------------------------------

P = "base_model.model."
adapter_keys = st.sampled_from(
    [P + "layer.q.lora_A.weight", P + "layer.q.lora_B.weight", P + "layer.q.lora_B.bias", P + "layer.q.lora_A.bias",
     P + "emb.lora_embedding_A", P + "emb.lora_embedding_B", P + "layer.q.lora_A.default.weight",
     P + "layer.q.lora_B.default.weight", P + "head.weight", P + "layer.modules_to_save.default.weight",
     P + "layer.q.lora_magnitude_vector", "layer.q.weight", P + "q.lora_A.weight", P + "q.lora_B.weight"]
) | st.text(max_size=10)  # fmt: skip
adapter_tensors = st.dictionaries(adapter_keys, st.lists(st.integers(0, 6), max_size=3), max_size=5)
configs = (
    st.fixed_dictionaries(
        {},
        optional={
            "r": st.sampled_from([1, 2, 4]) | scalars,
            "lora_alpha": st.sampled_from([1, 8, 16.0]) | scalars,
            "use_rslora": st.booleans() | scalars,
            "fan_in_fan_out": st.booleans(),
            "rank_pattern": st.dictionaries(
                st.sampled_from(["q", "layer.q", "(", "*", "emb"]), scalars, max_size=2
            )
            | json_values,
            "alpha_pattern": st.dictionaries(st.sampled_from(["q", "[", "emb"]), scalars, max_size=2)
            | json_values,
            "peft_type": st.sampled_from(["LORA", "IA3"]) | scalars,
            "use_dora": st.booleans(),
        },
    )
    | json_values
)


@st.composite
def adapters(draw):
    """A valid adapter (rank r on layer.q, maybe an embedding LoRA and a saved head), then maybe damaged."""
    r = draw(st.sampled_from([1, 2, 4]))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": draw(st.sampled_from([1, 8, 16.0])),
           "use_rslora": draw(st.booleans()), "rank_pattern": {}, "alpha_pattern": {}}  # fmt: skip
    tensors = {P + "layer.q.lora_A.weight": [r, 6], P + "layer.q.lora_B.weight": [4, r]}
    if draw(st.booleans()):
        tensors |= {P + "emb.lora_embedding_A": [r, 10], P + "emb.lora_embedding_B": [4, r]}
    if draw(st.booleans()):
        tensors[P + "layer.q.lora_B.bias"] = [4]
    if draw(st.booleans()):
        tensors[P + "head.weight"] = [3, 4]
    if draw(st.booleans()):  # damage the config
        cfg = edit(cfg, draw(st.sampled_from(json_paths(cfg)[1:])), draw(json_values | configs), delete=False)
    if draw(st.booleans()):  # damage the tensors
        tensors = {**tensors, **draw(adapter_tensors)}
    return draw(st.sampled_from([cfg]) | configs), tensors


@fuzz(EXAMPLES["lora"])
@given(adapter=adapters())
def test_fuzz_lora_adapter(adapter):
    from sefusion.io import open_model

    cfg, tensors = adapter
    with folder() as d:
        base = write_folder(d / "base", {"layer.q.weight": torch.ones(4, 6), "layer.q.bias": torch.ones(4),
                                         "emb.weight": torch.ones(10, 4)})  # fmt: skip
        a = d / "adapter"
        a.mkdir()
        (a / "adapter_config.json").write_text(json.dumps(cfg))
        save_file({k: torch.ones(s) for k, s in tensors.items()}, str(a / "adapter_model.safetensors"))
        with loads_or_refuses(), open_model(base) as b, open_model(a, base=b) as reader:
            read_every_tensor(reader)


# -- bundle -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory) -> Path:
    from sefusion.engine import merge

    root = tmp_path_factory.mktemp("bundle")
    base = toy_tensors(0)
    paths = {"base": write_folder(root / "base", base)}
    for i in range(2):
        paths[f"e{i}"] = write_folder(root / f"e{i}", toy_tensors(10 + i, scale=0.1, base=base))
    recipe = {"method": "tall_masks", "base": str(paths["base"]),
              "models": [{"path": str(paths["e0"]), "name": "e0"}, {"path": str(paths["e1"]), "name": "e1"}]}  # fmt: skip
    merge(recipe, root / "bundle")
    return root / "bundle"


def json_paths(value, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += json_paths(v, (*prefix, i))
    return out


def edit(doc, path: tuple, value, delete: bool):
    if not path:
        return value
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


@st.composite
def bundle_damage(draw, manifest: dict):
    doc = copy.deepcopy(manifest)
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        paths = json_paths(doc)
        path = draw(st.sampled_from(paths))
        doc = edit(doc, path, draw(json_values), delete=bool(path) and draw(st.booleans()))
        if not isinstance(doc, dict):
            break
    flip = draw(st.sampled_from([None, None]) | st.integers(0, 10**6))
    return doc, flip


@fuzz(EXAMPLES["bundle"])
@given(data=st.data())
def test_fuzz_bundle(good_bundle, data):
    from sefusion.bundle import Bundle, extract

    manifest = json.loads((good_bundle / "bundle.json").read_text())
    doc, flip = data.draw(bundle_damage(manifest))
    with folder() as d:
        b = d / "bundle"
        shutil.copytree(good_bundle, b)
        (b / "bundle.json").write_text(json.dumps(doc))
        if flip is not None:
            f = b / "model.safetensors"
            raw = bytearray(f.read_bytes())
            raw[flip % len(raw)] ^= 1 + flip % 255
            f.write_bytes(bytes(raw))
        task = data.draw(st.sampled_from(["e0", "e1", "e1", "nope"]))
        with loads_or_refuses():
            try:
                Bundle(b, verify=True).close()
                extract(b, task, d / "out")
            finally:
                assert (d / "out").exists() == (d / "out" / "model.safetensors").is_file()


# -- recipe YAML --------------------------------------------------------------------------------

yaml_text = st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"#%@`,?\n  01.e~\t")), max_size=200)
KEYS = ["method", "base", "models", "params", "exclude", "dtype", "seed", "path", "name", "weight", "data",
        "examples", "stats", "density", "lambda", "merge_method", "base_model", "parameters", "model"]  # fmt: skip
recipe_like = st.recursive(
    scalars | st.sampled_from(["ties", "linear", "task_arithmetic", "tall_masks", "fisher", "fp16", "x"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=5),
    max_leaves=20,
)


params = st.dictionaries(
    st.sampled_from(["density", "lambda", "merge", "normalize", "rescale", "k", "n", "m", "lambdas"]),
    st.sampled_from([0.2, 1, 0.5, 0.5, "mean", "sum", True]) | st.sampled_from([0.3]) | scalars,
    max_size=3,
)
recipes = st.fixed_dictionaries(
    {"method": st.sampled_from(["ties", "linear", "task_arithmetic", "tall_masks", "dare_ties", "cabs"]),
     "base": st.sampled_from(["base", "~/b"]),
     "models": st.lists(st.fixed_dictionaries({"path": st.sampled_from(["e0", "e1", "../e2"])},
                                              optional={"weight": st.sampled_from([1, 0.5, -1, 2]) | scalars,
                                                        "name": st.sampled_from(["a", "b", "c"]) | st.text(max_size=5),
                                                        "params": params}),
                        min_size=1, max_size=3)},
    optional={"params": params, "dtype": st.sampled_from(["fp16", "bf16", "x"]),
              "seed": st.integers(-1, 3) | scalars, "exclude": st.lists(st.text(max_size=4), max_size=2)},
)  # fmt: skip
mergekit = st.fixed_dictionaries(
    {"merge_method": st.sampled_from(["linear", "ties", "dare_ties", "slerp"]),
     "models": st.lists(st.fixed_dictionaries({"model": st.sampled_from(["a", "b", "a+lora"])},
                                              optional={"parameters": params}), max_size=3)},
    optional={"base_model": st.sampled_from(["a", "base"]), "parameters": params, "dtype": st.sampled_from(["float16", "x"])},
)  # fmt: skip


@fuzz(EXAMPLES["recipe"])
@given(
    text=yaml_text | (recipes | mergekit | recipe_like).map(lambda v: yaml.safe_dump(v, allow_unicode=True))
)
def test_fuzz_recipe_loader(text):
    from sefusion.recipe import load_recipe

    with folder() as d:
        f = d / "r.yaml"
        f.write_text(text, encoding="utf-8")
        with loads_or_refuses():
            load_recipe(f)
