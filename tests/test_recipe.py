"""The recipe schema, its error messages, and the mergekit 0.1.5 reader (fast: no tensor is read)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Annotated, Literal

import pytest
import yaml
from pydantic import Field, ValidationError

from sefusion import recipe as recipe_mod
from sefusion import registry
from sefusion.errors import RecipeError
from sefusion.recipe import ModelEntry, Recipe, from_mergekit, load_recipe

Density = Annotated[float, Field(gt=0, le=1)]


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(data: dict, **kw) -> Recipe:
    return load_recipe(data, validate_params=kw.pop("validate_params", False), **kw)


def refused(src, *words: str, validate_params: bool = False) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(src, validate_params=validate_params)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
    return msg


@pytest.fixture
def fake_methods(monkeypatch):
    """A fresh Registry holding stand-ins with the signatures of docs/methods.md (the real methods may not be
    importable yet) and the real methods' mergekit forms; `load_recipe` validates against it."""
    forms = {spec.name: spec.mergekit for spec in registry.METHODS}  # before the registry is replaced
    reg = registry.Registry()
    monkeypatch.setattr(registry, "METHODS", reg)
    monkeypatch.setattr(registry, "_loaded", True)
    monkeypatch.setattr(recipe_mod, "METHODS", reg)
    register = registry.register

    @register("linear", paper="https://arxiv.org/abs/2203.05482", needs_base=False, mergekit=forms["linear"])
    def linear(base, experts, weights, *, normalize: bool = True): ...

    @register("task_arithmetic", paper="https://arxiv.org/abs/2212.04089", mergekit=forms["task_arithmetic"])
    def task_arithmetic(base, experts, weights, *, lambda_: float = 1.0): ...

    @register(
        "ties", paper="https://arxiv.org/abs/2306.01708", per_expert=["density"], mergekit=forms["ties"]
    )
    def ties(
        base,
        experts,
        weights,
        *,
        density: Density = 0.2,
        lambda_: float = 1.0,
        merge: Literal["mean", "sum"] = "mean",
        density_scope: Literal["tensor", "model"] = "tensor",
    ): ...

    @register(
        "dare_linear",
        paper="https://arxiv.org/abs/2311.03099",
        per_expert=["density"],
        mergekit=forms["dare_linear"],
    )
    def dare_linear(
        base, experts, weights, *, density: Density = 0.5, lambda_: float = 1.0, rescale: bool = True
    ): ...

    @register(
        "dare_ties",
        paper="https://arxiv.org/abs/2311.03099",
        per_expert=["density"],
        mergekit=forms["dare_ties"],
    )
    def dare_ties(
        base,
        experts,
        weights,
        *,
        density: Density = 0.5,
        lambda_: float = 1.0,
        merge: Literal["mean", "sum"] = "mean",
    ): ...

    return reg


# --- sefusion's schema ---------------------------------------------------------------------------------


GOOD = """\
    method: ties
    base: base
    models:
      - {path: experts/defect, name: defect-python, weight: 0.7}
      - path: experts/search
        params: {density: 0.3}
    params: {density: 0.2, lambda: 1.0}
    exclude: ["classifier.*"]
    dtype: bf16
    seed: 7
"""


def test_valid_recipe_from_file_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, GOOD), validate_params=False)
    assert r.method == "ties" and r.dtype == "bfloat16" and r.seed == 7
    assert r.base == str(tmp_path / "base")
    assert [m.path for m in r.models] == [str(tmp_path / "experts/defect"), str(tmp_path / "experts/search")]
    assert r.task_names == ["defect-python", "search"]
    assert r.models[1].params == {"density": 0.3} and r.models[1].weight == 1.0
    assert r.notes == ()
    again = load(yaml.safe_load(r.to_yaml()))
    assert again == r
    assert again.model_dump() == r.model_dump()


def test_recipe_is_frozen_and_notes_are_not_a_key():
    r = load({"method": "linear", "models": [{"path": "a"}]})
    with pytest.raises(ValidationError):
        r.method = "ties"
    assert "notes" not in r.model_dump()
    refused({"method": "linear", "models": [{"path": "a"}], "notes": ["x"]}, "unknown key 'notes'")


def test_unknown_top_level_key_is_named(tmp_path):
    msg = refused(write(tmp_path, GOOD + "    bogus: 1\n"), "recipe.yaml", "unknown key 'bogus'")
    assert "method, base, models" in msg  # what is allowed


def test_unknown_key_in_models_is_named_with_a_suggestion():
    msg = refused(
        {"method": "ties", "models": [{"path": "a", "wieght": 2.0}]},
        "unknown key 'wieght' in models[0]",
        "did you mean 'weight'",
    )
    assert "Extra inputs" not in msg


def test_several_problems_are_all_listed():
    refused(
        {"method": "ties", "models": [{"name": "x"}, {"path": "b", "weight": "heavy"}], "seed": -1},
        "missing key 'path' in models[0]",
        "models[1].weight",
        "'heavy'",
        "seed",
    )


def test_models_must_not_be_empty():
    refused({"method": "ties", "models": []}, "at least one model")
    refused({"method": "ties"}, "missing key 'models'")


def test_duplicate_task_names_are_named():
    data = {"method": "linear", "models": [{"path": "x/expert"}, {"path": "y/other"}, {"path": "z/expert/"}]}
    refused(data, "'expert'", "models[0]", "models[2]", "name:")
    data["models"][2]["name"] = "expert-z"
    assert load(data).task_names == ["expert", "other", "expert-z"]


def test_task_name_must_be_plain():
    refused({"method": "linear", "models": [{"path": "a", "name": "x/y"}]}, "models[0].name", "x/y")


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = f"""\
        method: task_arithmetic
        base: ../models/base
        models:
          - {{path: ./a}}
          - {{path: {tmp_path / "abs" / "b"}}}
    """
    r = load_recipe(write(folder, text), validate_params=False)
    assert r.base == str(folder / "../models/base")
    assert Path(r.base).resolve() == (tmp_path / "models/base").resolve()
    assert r.models[0].path == str(folder / "a")
    assert r.models[1].path == str(tmp_path / "abs" / "b")  # absolute: kept
    # relative path given as str: resolved against the file's folder, not the working directory
    r2 = load_recipe(str(Path("..") / "recipes" / "recipe.yaml"), validate_params=False)
    assert Path(r2.models[0].path).resolve() == (folder / "a").resolve()
    # a dict has no folder: paths stay as given; resolved() does it on request
    d = load({"method": "linear", "models": [{"path": "a"}]})
    assert d.models[0].path == "a"
    assert d.resolved(tmp_path).models[0].path == str(tmp_path / "a")


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("float32", "float32"),
        ("fp32", "float32"),
        ("float", "float32"),
        ("float16", "float16"),
        ("fp16", "float16"),
        ("half", "float16"),
        ("bfloat16", "bfloat16"),
        ("bf16", "bfloat16"),
        ("BF16", "bfloat16"),
        (None, None),
    ],
)
def test_dtype_aliases(given, canonical):
    assert load({"method": "linear", "models": [{"path": "a"}], "dtype": given}).dtype == canonical


def test_bad_dtype_is_refused():
    refused({"method": "linear", "models": [{"path": "a"}], "dtype": "fp8"}, "dtype", "'fp8'", "bfloat16")


def test_is_excluded_globs():
    r = load({"method": "linear", "models": [{"path": "a"}], "exclude": ["classifier.*", "*.lm_head.weight"]})
    assert r.is_excluded("classifier.dense.weight")
    assert r.is_excluded("model.lm_head.weight")
    assert not r.is_excluded("encoder.layer.0.weight")
    assert not r.is_excluded("Classifier.bias")  # case-sensitive
    assert load({"method": "linear", "models": [{"path": "a"}], "exclude": "cls.*"}).exclude == ["cls.*"]


def test_missing_file_is_named(tmp_path):
    refused(tmp_path / "nope.yaml", "nope.yaml", "does not exist")
    refused(tmp_path, "is a folder")


def test_yaml_syntax_error_gives_file_and_line(tmp_path):
    path = write(tmp_path, "method: ties\nmodels:\n  - {path: a\n  - {path: b}\n")
    msg = refused(path, "recipe.yaml", "line ", "invalid YAML")
    assert "Traceback" not in msg


def test_yaml_duplicate_key_is_refused(tmp_path):
    path = write(tmp_path, "method: ties\nmodels: [{path: a}]\nparams: {density: 0.2}\nparams: {lambda: 2}\n")
    refused(path, "recipe.yaml, line 4", "duplicate key 'params'")


@pytest.mark.parametrize(("text", "word"), [("", "empty file"), ("- a\n- b\n", "list")])
def test_yaml_must_be_a_mapping(tmp_path, text, word):
    refused(write(tmp_path, text), "recipe.yaml", "mapping", word)


def test_to_yaml_lists_notes_as_comments():
    r = from_mergekit({"merge_method": "dare_linear", "base_model": "b", "models": [{"model": "a"}]})
    text = r.to_yaml()
    assert text.startswith("# note: ")
    assert "method: dare_linear" in text
    assert load(yaml.safe_load(text)).model_dump() == r.model_dump()


# --- parameters, validated against the method's signature ----------------------------------------------


def recipe_with(method="ties", params=None, base="b", models=None):
    data = {"method": method, "models": models or [{"path": "x/a"}, {"path": "x/b"}], "params": params or {}}
    if base is not None:
        data["base"] = base
    return data


@pytest.mark.parametrize(
    ("method", "params", "words"),
    [
        ("ties", {"density": 1.5}, ["density", "1.5"]),
        ("ties", {"density": 0}, ["density"]),
        ("dare_ties", {"density": -0.1}, ["density"]),
        ("ties", {"densty": 0.2}, ["densty", "density"]),
        ("ties", {"merge": "median"}, ["merge", "median"]),
        ("linear", {"lambda": 2.0}, ["lambda", "normalize"]),
    ],
)
def test_bad_params_are_refused_before_reading_tensors(fake_methods, method, params, words):
    refused(recipe_with(method, params), *words, validate_params=True)


def test_bad_params_name_the_file(fake_methods, tmp_path):
    path = write(tmp_path, "method: ties\nbase: b\nmodels: [{path: a}]\nparams: {density: 2}\n")
    refused(path, "recipe.yaml", "density", validate_params=True)


def test_per_model_bad_density_names_the_model(fake_methods):
    models = [{"path": "x/a", "params": {"density": 2.0}}, {"path": "x/b"}]
    refused(recipe_with(models=models), "models[0]", "density", validate_params=True)
    models = [{"path": "x/a", "params": {"merge": "sum"}}, {"path": "x/b"}]
    refused(recipe_with(models=models), "models[0]", "merge", "per model", validate_params=True)


def test_unknown_method_lists_available(fake_methods):
    refused(recipe_with("tiess"), "tiess", "ties", "task_arithmetic", "linear", validate_params=True)


def test_needs_base(fake_methods):
    refused(recipe_with("ties", base=None), "ties", "base", validate_params=True)
    load(recipe_with("linear", base=None), validate_params=True)  # linear does not


def test_good_params_pass(fake_methods):
    models = [{"path": "x/a", "params": {"density": 0.5}}, {"path": "x/b"}]
    r = load(
        recipe_with("ties", {"density": 0.2, "lambda": 1.2, "merge": "sum"}, models=models),
        validate_params=True,
    )
    assert r.params["lambda"] == 1.2


def test_mergekit_conversions_validate_against_the_registry(fake_methods):
    for text in (MK_TIES, MK_DARE_TIES, MK_TASK_ARITHMETIC, MK_LINEAR, MK_DARE_LINEAR, MK_LINEAR_WITH_BASE):
        load(yaml.safe_load(text), validate_params=True)
    bad = yaml.safe_load(MK_TIES)
    bad["models"][1]["parameters"]["density"] = 1.5
    refused(bad, "models[0]", "density", "1.5", validate_params=True)


def test_real_methods_validate(tmp_path):
    from sefusion.registry import METHODS

    for name in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "consensus", "cabs"):
        assert name in METHODS
    refused(recipe_with("ties", {"density": 1.5}), "density", "1.5", validate_params=True)
    refused(recipe_with("ties", {"merge": "median"}), "merge", "median", validate_params=True)
    per = [{"path": "x/a", "params": {"density": 2.0}}, {"path": "x/b"}]
    refused(recipe_with("ties", models=per), "models[0]", "density", validate_params=True)
    refused(recipe_with("ties", base=None), "base", validate_params=True)
    for text in (MK_TIES, MK_DARE_TIES, MK_TASK_ARITHMETIC, MK_LINEAR, MK_DARE_LINEAR, MK_LINEAR_WITH_BASE):
        load(yaml.safe_load(text), validate_params=True)


# --- mergekit 0.1.5 ------------------------------------------------------------------------------------

MK_TIES = """\
models:
  - model: /models/Llama-3-8B
    # no parameters necessary for base model
  - model: /models/llama-code-defects
    parameters:
      density: 0.5
      weight: 0.5
  - model: /models/llama-code-search
    parameters:
      density: 0.3
      weight: 0.3
merge_method: ties
base_model: /models/Llama-3-8B
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

MK_DARE_TIES = """\
merge_method: dare_ties
base_model: base
models:
  - model: experts/a
  - model: experts/b
    parameters:
      weight: 0.4
parameters:
  density: 0.53
  weight: 0.6
random_seed: 42
dtype: bfloat16
tokenizer_source: base
"""

MK_TASK_ARITHMETIC = """\
merge_method: task_arithmetic
base_model: base
models:
  - model: a
    parameters: {weight: 1.0}
  - model: b
    parameters: {weight: 3.0}
parameters:
  lambda: 0.8
  normalize: true
"""

MK_LINEAR = """\
merge_method: linear
models:
  - model: a
    parameters: {weight: 1.0}
  - model: b
    parameters: {weight: 0.5}
parameters:
  normalize: false
dtype: float32
"""

MK_DARE_LINEAR = """\
merge_method: dare_linear
base_model: base
models:
  - model: a
    parameters: {weight: 0.5, density: 0.7}
  - model: b
    parameters: {weight: 0.5}
parameters:
  rescale: false
  density: 0.9
dtype: float32
out_dtype: bfloat16
"""

MK_LINEAR_WITH_BASE = """\
merge_method: linear
base_model: base
models:
  - model: a
  - model: b
parameters:
  weight: 1.0
"""


def expected(method, models, params, base=None, dtype=None, seed=0):
    return {
        "method": method,
        "base": base,
        "models": [
            {
                "path": p,
                "name": None,
                "weight": w,
                "params": pp,
                "data": None,
                "examples": None,
                "stats": None,
            }
            for p, w, pp in models
        ],
        "params": params,
        "exclude": [],
        "dtype": dtype,
        "seed": seed,
    }


@pytest.mark.parametrize(
    ("text", "want", "note_words"),
    [
        (
            MK_TIES,
            expected(
                "ties",
                [
                    ("/models/llama-code-defects", 0.5, {"density": 0.5}),
                    ("/models/llama-code-search", 0.3, {"density": 0.3}),
                ],
                {"density": 1.0, "lambda": 1.0, "merge": "mean"},
                base="/models/Llama-3-8B",
                dtype="float16",
            ),
            ["int8_mask", "ceil(density*n)", "computes in float16"],
        ),
        (
            MK_DARE_TIES,
            expected(
                "dare_ties",
                [("experts/a", 0.6, {}), ("experts/b", 0.4, {})],
                {"density": 0.53, "lambda": 1.0, "merge": "sum"},  # mergekit: normalize false for dare_ties
                base="base",
                dtype="bfloat16",
                seed=42,
            ),
            ["divides the kept entries by density", "L1 norm"],
        ),
        (
            MK_TASK_ARITHMETIC,
            expected("task_arithmetic", [("a", 0.25, {}), ("b", 0.75, {})], {"lambda": 0.8}, base="base"),
            ["normalize: true", "sum of the weights (4)"],
        ),
        (
            MK_LINEAR,
            expected("linear", [("a", 1.0, {}), ("b", 0.5, {})], {"normalize": False}, dtype="float32"),
            [],
        ),
        (
            MK_DARE_LINEAR,
            expected(
                "dare_linear",
                [("a", 0.5, {"density": 0.7}), ("b", 0.5, {})],
                {"density": 0.9, "lambda": 1.0, "rescale": False},
                base="base",
                dtype="bfloat16",
            ),
            [],
        ),
        (
            MK_LINEAR_WITH_BASE,
            expected(
                "linear",
                [("a", 1.0, {}), ("b", 1.0, {}), ("base", 1.0, {})],
                {"normalize": True},
                base="base",
            ),
            ["base_model is averaged"],
        ),
    ],
    ids=["ties", "dare_ties", "task_arithmetic", "linear", "dare_linear", "linear_with_base"],
)
def test_mergekit_examples_convert(tmp_path, text, want, note_words):
    r = from_mergekit(yaml.safe_load(text))
    assert r.model_dump() == want
    notes = " | ".join(r.notes)
    for w in note_words:
        assert w in notes, (w, notes)
    if not note_words:
        assert r.notes == ()
    # through load_recipe from a file: the same, with paths made absolute against the file's folder
    r2 = load_recipe(write(tmp_path, text, "mergekit.yml"), validate_params=False)
    assert r2.model_dump() == r.resolved(tmp_path).model_dump()
    assert r2.notes == r.notes


def test_mergekit_ties_defaults_density_to_one_like_mergekit():
    r = from_mergekit({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}, {"model": "c"}]})
    assert r.params == {"density": 1.0, "lambda": 1.0, "merge": "mean"}
    assert any("density defaults to 1.0" in n for n in r.notes)
    assert any("no weight" in n for n in r.notes)


def test_mergekit_ties_normalize_false_is_sum():
    r = from_mergekit(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [{"model": "a"}],
            "parameters": {"normalize": False},
        }
    )
    assert r.params["merge"] == "sum"


def mk(method="ties", parameters=None, models=None, **top):
    data = {
        "merge_method": method,
        "base_model": "base",
        "models": models or [{"model": "a"}, {"model": "c"}],
    }
    if parameters is not None:
        data["parameters"] = parameters
    return {**data, **top}


@pytest.mark.parametrize(
    "method",
    [
        "slerp",
        "nuslerp",
        "breadcrumbs",
        "breadcrumbs_ties",
        "model_stock",
        "della",
        "passthrough",
        "consensus",
    ],
)
def test_mergekit_unsupported_methods(method):
    refused(mk(method), f"'{method}'", "no sefusion equivalent", "dare_ties")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (
            {"merge_method": "ties", "slices": [{"sources": [{"model": "a", "layer_range": [0, 32]}]}]},
            ["`slices`", "whole models"],
        ),
        (mk(modules={"text": {"models": [{"model": "a"}]}}), ["`modules`"]),
        (mk(tokenizer_source="union"), ["tokenizer_source: union", "tokenizer"]),
        (mk(tokenizer_source="/models/other"), ["tokenizer_source", "/models/other"]),
        (mk(tokenizer={"source": "base", "tokens": {"<|im_start|>": {"source": "a"}}}), ["`tokenizer`"]),
        (mk(chat_template="chatml"), ["chat_template"]),
        (mk(bogus=1), ["unknown mergekit key 'bogus'"]),
        (
            mk(parameters={"density": [{"filter": "self_attn", "value": 0.5}, {"value": 0.3}]}),
            ["'density'", "filter"],
        ),
        (mk(parameters={"lambda": [0.5, 1.0]}), ["'lambda'", "gradient"]),
        (mk(parameters={"weight": {"filter": "mlp", "value": 0.2}}), ["'weight'", "filter"]),
        (
            mk(models=[{"model": "a", "parameters": {"weight": [0, 0.5, 1]}}]),
            ["models[0].parameters", "'weight'", "gradient"],
        ),
        (mk("della", parameters={"epsilon": 0.1}), ["della"]),
        (mk(parameters={"epsilon": 0.1}), ["'epsilon'", "cannot honour"]),
        (mk(parameters={"gamma": 0.01}), ["'gamma'"]),
        (mk("linear", parameters={"density": 0.5}), ["linear", "'density'"]),
        (mk(models=[{"model": "a", "parameters": {"normalize": True}}]), ["models[0]", "'normalize'"]),
        (mk(models=[{"model": "a", "tokenizer": "x"}]), ["'tokenizer'", "models[0]"]),
        (mk(models=[{"model": "base+loras/adapter"}]), ["LoRA", "base+loras/adapter"]),
        (mk(parameters={"rescale": True}), ["ties", "rescale", "L1"]),
        (mk("dare_ties", parameters={"rescale": False}), ["dare_ties", "rescale: false"]),
        (mk(parameters={"normalize": "yes"}), ["'normalize'", "true or false"]),
        (mk(parameters={"density": "half"}), ["'density'", "number"]),
        (mk(random_seed=-3), ["random_seed"]),
        (mk(dtype="int8"), ["dtype: int8"]),
        (mk("linear", base_model=None) | {"base_model": "base"}, ["base_model", "weight"]),
        ({"merge_method": "ties", "base_model": "b"}, ["`models`"]),
    ],
)
def test_mergekit_unsupported_keys_are_refused_with_reason(data, words):
    refused(data, *words)


def test_mergekit_task_arithmetic_density_is_a_noted_no_op():
    r = from_mergekit(mk("task_arithmetic", {"density": 0.5, "weight": 1.0}))
    assert r.params == {"lambda": 1.0}
    assert all(m.params == {} for m in r.models)
    assert any("no effect" in n and "density" in n for n in r.notes)


def test_mergekit_base_listed_with_parameters_is_noted():
    models = [{"model": "base", "parameters": {"weight": 0.2}}, {"model": "a", "parameters": {"weight": 1.0}}]
    r = from_mergekit(mk("task_arithmetic", models=models))
    assert [m.path for m in r.models] == ["a"]
    assert any("models[0] is the base model" in n for n in r.notes)


def test_mergekit_recipe_without_models_besides_base():
    refused(mk("ties", models=[{"model": "base"}]), "models", "at least one model")


def test_model_entry_defaults():
    m = ModelEntry(path="x/expert")
    assert (m.name, m.weight, m.params, m.task_name) == (None, 1.0, {}, "expert")


def test_mergekit_reader_reads_a_method_from_its_registration_alone(fake_methods):
    """Adding a mergekit method is one registration: the reader names no method."""

    def params(glob, entries, models, where, notes):
        notes.append(f"halved from {glob.get('lambda', 1.0):g}")
        return {"lambda": glob.get("lambda", 1.0) / 2}

    form = registry.MergekitForm(
        rank=9, params=params, parameters=("lambda", "weight"), per_model=("weight",)
    )

    @registry.register("half_sum", paper="https://example.org", mergekit=form)
    def half_sum(base, experts, weights, *, lambda_: float = 1.0): ...

    data = mk(
        "half_sum", {"lambda": 0.8}, models=[{"model": "base"}, {"model": "a", "parameters": {"weight": 2}}]
    )
    r = from_mergekit(data)
    # the base listed among the models is skipped (a task-vector form), the hook's params and note kept
    assert [(m.path, m.weight) for m in r.models] == [("a", 2.0)]
    assert r.params == {"lambda": 0.4} and "halved from 0.8" in r.notes
    refused(mk("half_sum", {"density": 0.5}), "half_sum has no parameter 'density'", "lambda, weight")
    refused(mk("slerp"), "sefusion reads: linear, task_arithmetic, ties, dare_linear, dare_ties, half_sum (")


def test_mergekit_methods_are_listed_in_mergekit_order():
    """The real methods register in file-name order (dare first); the refusal lists them by rank."""
    refused(mk("slerp"), "sefusion reads: linear, task_arithmetic, ties, dare_linear, dare_ties (")
