"""The recipe: which experts to merge, with which method and parameters; and a reader of mergekit's YAML.

A recipe (YAML or a dict) looks like this (docs/methods.md describes every method's parameters)::

    method: ties
    base: path/to/base
    models:
      - {path: path/to/expert-a, name: defect-python, weight: 1.0}
      - {path: path/to/expert-b, name: search-python, params: {density: 0.3}}
    params: {density: 0.2, lambda: 1.0}
    exclude: ["classifier.*"]
    dtype: bfloat16
    seed: 0

The data-aware methods (`fisher`, `regmean`, `pleas`) read statistics or activations of each expert on
its own data: a model entry then gives `data:` (a task name such as `defect-python`, or a .jsonl file)
and optionally `examples:`, or `stats:` (a statistics folder written by sefusion.stats, used as is).

Unknown keys are refused with their name, and `load_recipe` checks the method's parameters against its
signature (sefusion.registry), so a typo or a bad value fails before any tensor is read. A mergekit recipe
(it has `merge_method:`) is converted by `from_mergekit` for the methods both tools have; what cannot be
reproduced is refused with the reason, and what differs in a small documented way is kept in
`Recipe.notes`. This module does not import torch.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .errors import RecipeError
from .registry import METHODS, MergekitForm, MethodSpec

__all__ = [
    "DType",
    "ModelEntry",
    "Recipe",
    "check_data",
    "from_mergekit",
    "is_data_path",
    "load_recipe",
    "resolve_params",
]

DType = Literal["float32", "float16", "bfloat16"]

_DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def _canonical_dtype(value: Any) -> Any:
    """'fp16', 'half', 'torch.float16' -> 'float16'; anything else is left for the Literal to refuse."""
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        return _DTYPE_ALIASES.get(key, value)
    return value


class ModelEntry(BaseModel):
    """One expert: its folder, its task name (default: the folder's name), weight and per-expert params;
    for the data-aware methods, its data (`data:`, `examples:`) or precomputed statistics (`stats:`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)] | None = None
    weight: Annotated[float, Field(allow_inf_nan=False)] = 1.0
    params: dict[str, Any] = Field(default_factory=dict)
    data: Annotated[str, Field(min_length=1)] | None = None  # a task name, or a .jsonl file
    examples: Annotated[int, Field(ge=1, strict=True)] | None = None
    stats: Annotated[str, Field(min_length=1)] | None = None  # a sefusion.stats folder

    @field_validator("weight", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("a boolean (true/false, yes/no) is not a number")
        return v

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        # Task names become folder names and bundle keys (tasks/<name>/...).
        if v is not None and ("/" in v or "\\" in v or v.strip() != v or v in (".", "..")):
            raise ValueError(f"a task name is a plain word (no slashes or surrounding spaces), got {v!r}")
        return v

    @property
    def task_name(self) -> str:
        if self.name is not None:
            return self.name
        return Path(self.path).name or Path(self.path).absolute().name

    @property
    def data_is_file(self) -> bool:
        """Whether `data:` names a file (a .jsonl path) rather than a task."""
        return self.data is not None and is_data_path(self.data)


def is_data_path(data: str) -> bool:
    """`data:` is a file when it looks like a path (a .jsonl name, a slash, `~` or `.` first); else a task
    name such as `defect-python` (task names hold no slashes and no .jsonl suffix)."""
    return data.lower().endswith(".jsonl") or "/" in data or "\\" in data or data.startswith(("~", "."))


class Recipe(BaseModel):
    """A merge recipe. Frozen; unknown keys are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Annotated[str, Field(min_length=1)]
    base: Annotated[str, Field(min_length=1)] | None = None
    models: Annotated[list[ModelEntry], Field(min_length=1)]
    params: dict[str, Any] = Field(default_factory=dict)
    exclude: list[str] = Field(default_factory=list)
    dtype: DType | None = None
    seed: Annotated[int, Field(ge=0)] = 0

    # Conversion notes (from a mergekit recipe): what differs from mergekit, shown to the user.
    _notes: tuple[str, ...] = PrivateAttr(default=())

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: Any) -> Any:
        return _canonical_dtype(v)

    @field_validator("seed", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("a boolean (true/false, yes/no) is not a number")
        return v

    @field_validator("exclude", mode="before")
    @classmethod
    def _one_glob(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @property
    def notes(self) -> tuple[str, ...]:
        return self._notes

    @property
    def task_names(self) -> list[str]:
        """One name per model: `name`, else the model folder's name. Duplicates raise RecipeError."""
        names = [m.task_name for m in self.models]
        seen: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            seen.setdefault(n, []).append(i)
        dups = {n: idx for n, idx in seen.items() if len(idx) > 1}
        if dups:
            detail = "; ".join(
                f"'{n}' is used by " + ", ".join(f"models[{i}]" for i in idx) for n, idx in dups.items()
            )
            raise RecipeError(f"task names must be unique: {detail}; give those models distinct `name:`s")
        return names

    def resolved(self, root: str | Path) -> Recipe:
        """A copy whose relative paths (base, models[].path, models[].stats, a file `data:`) are made
        absolute against `root` (the recipe file's folder). `~` is expanded; absolute paths are kept as
        they are; a task name in `data:` is left alone."""
        root = Path(root).expanduser().absolute()

        def fix(p: str) -> str:
            q = Path(p).expanduser()
            return str(q if q.is_absolute() else root / q)

        def fix_entry(m: ModelEntry) -> ModelEntry:
            update: dict[str, Any] = {"path": fix(m.path)}
            if m.stats is not None:
                update["stats"] = fix(m.stats)
            if m.data_is_file:
                update["data"] = fix(m.data)  # type: ignore[arg-type]
            return m.model_copy(update=update)

        models = [fix_entry(m) for m in self.models]
        base = fix(self.base) if self.base is not None else None
        return self.model_copy(update={"base": base, "models": models})

    def input_paths(self) -> list[str]:
        """Every file or folder the recipe reads (base, experts or adapters, statistics, data files):
        an output must stay apart from all of them."""
        paths = [self.base] if self.base is not None else []
        for m in self.models:
            paths += [m.path, m.stats, m.data if m.data_is_file else None]
        return [p for p in paths if p is not None]

    def entry_examples(self, index: int) -> int | None:
        """How many examples models[index]'s statistics come from, as the recipe says: its `examples:`,
        else its `params.examples`, else the recipe's `params.examples`; None where none is set."""
        m = self.models[index]
        for value in (m.examples, m.params.get("examples"), self.params.get("examples")):
            if value is not None:
                return int(value)
        return None

    def is_excluded(self, tensor_name: str) -> bool:
        """Whether a tensor name matches one of the `exclude` globs (fnmatch, case-sensitive)."""
        return any(fnmatch.fnmatchcase(tensor_name, pat) for pat in self.exclude)

    def to_yaml(self) -> str:
        """The recipe in sefusion's schema (for the model card); notes come first as comments."""
        data = self.model_dump(mode="json", exclude_none=True)
        for m in data["models"]:
            if not m["params"]:
                del m["params"]
        for key in ("params", "exclude"):
            if not data[key]:
                del data[key]
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)
        comments = "".join(f"# note: {n}\n" for n in self.notes)
        return comments + text

    def with_notes(self, notes: tuple[str, ...] | list[str]) -> Recipe:
        """A copy carrying `notes` (conversion notes are not part of the schema)."""
        out = self.model_copy()
        out._notes = tuple(notes)
        return out


# ---------------------------------------------------------------------------------------------------
# Reading


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently), and
    reads dates as plain strings (a recipe holds no timestamps)."""


_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        if isinstance(key, (str, int, float, bool)):
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# Plain data only: a tag such as !!python/object, !!binary or !!set has no place in a recipe.
_PLAIN_TAGS = frozenset(
    f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq", "merge")
)
# Nodes a recipe may expand to once aliases are followed: recipes have tens; an alias bomb has billions.
MAX_YAML_NODES = 100_000
_MAX_YAML_DEPTH = 100


class _YamlRefused(Exception):
    def __init__(self, message: str, node: yaml.Node) -> None:
        super().__init__(message)
        self.node = node


def _check_nodes(root: yaml.Node) -> None:
    """Refuse non-plain tags, deep nesting and alias expansion past MAX_YAML_NODES, before anything is
    built. Aliases share nodes, so each node's expanded size is computed once (memoised by identity)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 0, False)]
    active: set[int] = set()  # nodes being expanded: meeting one again is a recursive alias
    while stack:
        node, depth, done = stack.pop()
        if done:
            kids = _children(node)
            sizes[id(node)] = 1 + sum(sizes[id(k)] for k in kids)
            active.discard(id(node))
            if sizes[id(node)] > MAX_YAML_NODES:
                raise _YamlRefused(f"it expands to more than {MAX_YAML_NODES} values (an alias bomb?)", node)
            continue
        if id(node) in sizes:
            continue
        if id(node) in active:
            raise _YamlRefused("a recursive alias", node)
        if node.tag not in _PLAIN_TAGS:
            raise _YamlRefused(f"tag {node.tag} is not plain data (strings, numbers, lists, mappings)", node)
        if depth > _MAX_YAML_DEPTH:
            raise _YamlRefused(f"it nests deeper than {_MAX_YAML_DEPTH} levels", node)
        active.add(id(node))
        stack.append((node, depth, True))
        stack.extend((k, depth + 1, False) for k in _children(node) if id(k) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _yaml_error(path: Path, problem: str, mark: Any, context: str | None = None) -> RecipeError:
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    return RecipeError(f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else ""))


def _read_yaml(path: Path) -> Any:
    if not path.exists():
        raise RecipeError(f"recipe file {path} does not exist")
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a folder; give the recipe's YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from None
    return parse_yaml(text, path)


def parse_yaml(text: str, path: Path) -> Any:
    """A recipe's YAML as plain data; RecipeError (naming `path`, line and column) for anything else."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node)
        return loader.construct_document(node)
    except _YamlRefused as exc:
        raise _yaml_error(path, str(exc), exc.node.start_mark) from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise _yaml_error(
            path, problem, getattr(exc, "problem_mark", None), getattr(exc, "context", None)
        ) from None
    except (RecursionError, ValueError, OverflowError) as exc:  # nesting too deep to parse; odd scalars
        raise _yaml_error(path, f"cannot read it ({type(exc).__name__}: {exc})", None) from None
    finally:
        loader.dispose()


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    model = ModelEntry if loc[:1] == ("models",) and len(loc) == 2 else Recipe
    return list(model.model_fields)


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc, kind = tuple(e["loc"]), e["type"]
        if kind == "extra_forbidden":
            key, parent = str(loc[-1]), loc[:-1]
            known = _known_keys(parent)
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            place = f" in {_loc(parent)}" if parent else " at the top level"
            parts.append(f"unknown key '{key}'{place}{hint}; known keys: {', '.join(known)}")
        elif kind == "missing":
            place = f" in {_loc(loc[:-1])}" if len(loc) > 1 else ""
            parts.append(f"missing key '{loc[-1]}'{place}")
        elif kind == "too_short" and loc == ("models",):
            parts.append("models: list at least one model to merge")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            value = e.get("input")
            got = f" (got {value!r})" if isinstance(value, (str, int, float, bool)) or value is None else ""
            parts.append(f"{_loc(loc) or 'recipe'}: {msg}{got}")
    return "; ".join(parts)


def _validate(data: Mapping[str, Any], where: str) -> Recipe:
    try:
        return Recipe.model_validate(dict(data))
    except ValidationError as exc:
        raise RecipeError(f"{where}: invalid recipe: {_format_errors(exc)}") from None


def resolve_params(recipe: Recipe, spec: MethodSpec, where: str = "recipe") -> dict[str, Any]:
    """The method's keyword arguments from the recipe's `params` and each model's `params`; a model's
    `examples:` is its value of the method's per-expert `examples` parameter (fisher, regmean, pleas)."""
    per_model: list[dict[str, Any]] = []
    takes_examples = "examples" in spec.params and spec.params["examples"].per_expert
    for i, m in enumerate(recipe.models):
        own = dict(m.params)
        if m.examples is not None and takes_examples:
            if own.get("examples", m.examples) != m.examples:
                raise RecipeError(
                    f"{where}: models[{i}] sets `examples: {m.examples}` and `params: {{examples: "
                    f"{own['examples']}}}`; give one of them"
                )
            own["examples"] = m.examples
        per_model.append(own)
    return spec.resolve(recipe.params, per_model, where=where)


def check_params(recipe: Recipe, where: str = "recipe") -> None:
    """Validate the recipe's method and parameters against the method's signature (no tensor is read)."""
    try:
        spec = METHODS.get(recipe.method)
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    kwargs = resolve_params(recipe, spec, where)
    weights = [m.weight for m in recipe.models]
    if spec.name == "linear" and kwargs.get("normalize") and sum(weights) == 0:
        raise RecipeError(
            f"{where}: method 'linear' divides by the sum of the models' weights, which is 0 "
            f"({', '.join(f'{w:g}' for w in weights)}); change a weight or set `params: {{normalize: false}}`"
        )
    if spec.needs_base and recipe.base is None:
        raise RecipeError(f"{where}: method '{spec.name}' needs a base model: set `base:` in the recipe")


def _check_data_ref(data: str, place: str, where: str) -> None:
    """`data:` is an existing .jsonl file or a registered task name (sefusion.tasks; a generative one for
    a causal LM's LoRA expert)."""
    if is_data_path(data):
        p = Path(data).expanduser()
        if not p.exists():
            raise RecipeError(
                f"{where}: {place}: data file {p} does not exist (`data:` is a .jsonl file or a task name)"
            )
        if not p.is_file() or p.suffix.lower() != ".jsonl":
            raise RecipeError(f"{where}: {place}: `data: {data}` is not a .jsonl file or a task name")
        return
    from .tasks.base import TaskError, get_task
    from .tasks.generative import generative_task_names

    if data in generative_task_names():  # a causal LoRA expert's data (sefusion.models.causal_statistics)
        return
    try:
        get_task(data)
    except TaskError as exc:
        raise RecipeError(
            f"{where}: {place}: `data: {data}` is neither a .jsonl file nor a task: {exc}"
        ) from None


def check_data(recipe: Recipe, where: str = "recipe", *, require: bool = True) -> list[str]:
    """Check each model's `data:`, `examples:` and `stats:` against the method; returns notes (what a
    data-free method leaves unused).

    `data:` must be an existing .jsonl file or a known task, `stats:` an existing folder, not both on one
    model. With `require`, a data-aware method needs `data:` or `stats:` on every model (`pleas`, which
    matches activations, needs `data:`); without it (statistics passed to the engine directly) only what
    is given is checked.
    """
    try:
        spec = METHODS.get(recipe.method)
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    use = spec.data_use
    notes: list[str] = []
    for i, m in enumerate(recipe.models):
        place = f"models[{i}] ('{m.task_name}')"
        if m.data is not None and m.stats is not None:
            raise RecipeError(
                f"{where}: {place} gives both `data:` and `stats:`; give one: `stats:` is a statistics folder "
                "used as is, `data:` the data to compute them on"
            )
        if m.data is not None:
            _check_data_ref(m.data, place, where)
        if m.stats is not None and not Path(m.stats).expanduser().is_dir():
            raise RecipeError(f"{where}: {place}: statistics folder {m.stats} (`stats:`) does not exist")
        if use is None:
            unused = [f"`{k}:`" for k in ("data", "examples", "stats") if getattr(m, k) is not None]
            if unused:
                notes.append(f"{place}: {', '.join(unused)} unused: method '{spec.name}' reads no data")
        elif use == "activations":
            if m.stats is not None:
                raise RecipeError(
                    f"{where}: {place}: method '{spec.name}' matches the models' activations, which a "
                    "statistics folder does not hold: replace `stats:` by `data:`"
                )
            if require and m.data is None:
                raise RecipeError(
                    f"{where}: model '{m.task_name}' (models[{i}]) needs `data:` (a task name such as "
                    f"defect-python, or a .jsonl file) for method {spec.name}"
                )
        elif require and m.data is None and m.stats is None:
            raise RecipeError(
                f"{where}: model '{m.task_name}' (models[{i}]) needs `data:` (a task name such as "
                f"defect-python, or a .jsonl file) or `stats:` (a statistics folder) for method {spec.name}"
            )
    return notes


def load_recipe(
    src: str | Path | Mapping[str, Any] | Recipe, *, validate_params: bool = True, require_data: bool = True
) -> Recipe:
    """Read a recipe from a YAML file or a dict (sefusion's schema, or mergekit's for the methods both have).

    From a file, relative paths are resolved against the file's folder; from a dict they are kept as given.
    With `validate_params`, the method must exist, its params (and per-model params) must be valid, and
    each model's `data:` / `stats:` must fit the method (`check_data`; `require_data`: a data-aware method
    needs them on every model). Every mistake raises RecipeError naming the file and the key.
    """
    root: Path | None = None
    if isinstance(src, Recipe):
        recipe, where = src, "recipe"
    else:
        if isinstance(src, Mapping):
            data: Any = src
            where = "recipe"
        elif isinstance(src, (str, os.PathLike)):
            path = Path(src)
            where, root = str(path), path.parent
            data = _read_yaml(path)
        else:
            raise RecipeError(f"a recipe is a YAML file path or a mapping, got {type(src).__name__}")
        if not isinstance(data, Mapping):
            got = "an empty file" if data is None else f"a {type(data).__name__}"
            raise RecipeError(
                f"{where}: a recipe is a YAML mapping with `method:` and `models:` (or mergekit's "
                f"`merge_method:`), got {got}"
            )
        recipe = from_mergekit(data, where=where) if "merge_method" in data else _validate(data, where)
        if root is not None:
            recipe = recipe.resolved(root)
    try:
        recipe.task_names  # noqa: B018 - raises on duplicates
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    if validate_params:
        check_params(recipe, where)
        notes = check_data(recipe, where, require=require_data)
        if notes:
            recipe = recipe.with_notes(tuple(dict.fromkeys((*recipe.notes, *notes))))
    return recipe


# ---------------------------------------------------------------------------------------------------
# mergekit 0.1.5


_MK_TOP_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "random_seed",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "slices",
    "modules",
)
_BOOL_PARAMS = ("normalize", "rescale", "int8_mask")


def _mk_scalar(value: Any, key: str, place: str, where: str) -> Any:
    """mergekit settings may be gradients or filter conditions; sefusion takes one value per recipe."""
    if isinstance(value, Mapping) or (isinstance(value, list) and any(isinstance(v, Mapping) for v in value)):
        kind = (
            "a list of {filter, value} conditions"
            if isinstance(value, list)
            else "a {filter, value} condition"
        )
    elif isinstance(value, list):
        kind = "a gradient (a list interpolated across layers)"
    else:
        kind = None
    if kind is not None:
        raise RecipeError(
            f"{where}: mergekit {place} '{key}' is {kind}: {value!r}; sefusion applies one value to every "
            "tensor, so give a plain value"
        )
    if key in _BOOL_PARAMS:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: mergekit {place} '{key}' must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"{where}: mergekit {place} '{key}' must be a number, got {value!r}")
    return float(value)


def _mk_model_ref(value: Any, place: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where}: mergekit {place} must be a model path, got {value!r}")
    if "+" in value:
        raise RecipeError(
            f"{where}: mergekit {place} '{value}' is the 'model+LoRA' form; sefusion does not apply a LoRA "
            "inside a recipe: merge the adapter into its model first (peft merge_and_unload) and give that folder"
        )
    return value


def _same_model(a: str, b: str | None) -> bool:
    return b is not None and (a == b or os.path.normpath(a) == os.path.normpath(b))


def _mk_top_level(data: Mapping[str, Any], where: str) -> None:
    """Refuse the top-level keys sefusion cannot honour, each with its reason."""
    for key in data:
        if key not in _MK_TOP_KEYS:
            raise RecipeError(
                f"{where}: unknown mergekit key '{key}'; the mergekit keys sefusion reads: "
                "merge_method, base_model, models, parameters, dtype, out_dtype, random_seed, "
                "tokenizer_source: base"
            )
    if data.get("slices") is not None or data.get("modules") is not None:
        key = "slices" if data.get("slices") is not None else "modules"
        raise RecipeError(
            f"{where}: mergekit `{key}` (stitching layer ranges or modules of several models) cannot be "
            "expressed: sefusion merges whole models tensor by tensor; list the models under `models:`"
        )
    if data.get("chat_template") is not None:
        raise RecipeError(
            f"{where}: mergekit `chat_template` is not supported: sefusion copies the base's config and "
            "tokenizer files as they are; remove the key and edit tokenizer_config.json of the output"
        )
    source = data.get("tokenizer_source")
    tok = data.get("tokenizer")
    if tok is not None:
        if not isinstance(tok, Mapping) or set(tok) - {"source", "tokens"} or tok.get("tokens"):
            raise RecipeError(
                f"{where}: mergekit `tokenizer` {tok!r} is not supported: sefusion copies the base's tokenizer "
                "and does not add or rebuild tokens"
            )
        source = tok.get("source", source)
    if source is not None and source != "base":
        raise RecipeError(
            f"{where}: mergekit `tokenizer_source: {source}` is not supported: sefusion copies the base's "
            "tokenizer files and does not build a merged ('union') vocabulary or permute embeddings; "
            "use `tokenizer_source: base` or remove the key"
        )


def _mk_method(method: Any, where: str) -> tuple[MethodSpec, MergekitForm]:
    """The method that declares a mergekit form under mergekit's `merge_method` (the names are the same)."""
    forms = sorted(((s, s.mergekit) for s in METHODS if s.mergekit is not None), key=lambda sf: sf[1].rank)
    for spec, form in forms:
        if spec.name == method:
            return spec, form
    raise RecipeError(
        f"{where}: mergekit merge_method {method!r} has no sefusion equivalent; the mergekit methods "
        f"sefusion reads: {', '.join(s.name for s, _ in forms)} (sefusion's own methods need a sefusion "
        "recipe: `method:`, `models:`)"
    )


def _mk_global(data: Mapping[str, Any], method: str, form: MergekitForm, where: str) -> dict[str, Any]:
    """Top-level `parameters`: the method's own, plus defaults for every model's weight and density."""
    raw = data.get("parameters") or {}
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{where}: mergekit `parameters` must be a mapping, got {raw!r}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in form.parameters:
            raise RecipeError(
                f"{where}: mergekit's {method} has no parameter '{key}' (in `parameters`), so sefusion cannot "
                f"honour it; {method} reads: {', '.join(form.parameters)}"
            )
        out[key] = _mk_scalar(value, key, "parameter", where)
    return out


def _mk_models(
    data: Mapping[str, Any], method: str, form: MergekitForm, base: str | None, glob: dict[str, Any],
    where: str, notes: list[str],
) -> list[dict[str, Any]]:  # fmt: skip
    """`models:` -> [{path, own (its own parameters), place}], with the base handled as mergekit does."""
    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise RecipeError(f"{where}: mergekit `models` must list the models to merge, got {raw_models!r}")
    entries: list[dict[str, Any]] = []
    for i, item in enumerate(raw_models):
        place = f"models[{i}]"
        if not isinstance(item, Mapping) or "model" not in item:
            raise RecipeError(f"{where}: mergekit {place} must be a mapping with `model:`, got {item!r}")
        for key in item:
            if key not in ("model", "parameters"):
                raise RecipeError(
                    f"{where}: unknown mergekit key '{key}' in {place}; known keys: model, parameters"
                )
        path = _mk_model_ref(item["model"], f"{place}.model", where)
        raw = item.get("parameters") or {}
        if not isinstance(raw, Mapping):
            raise RecipeError(f"{where}: mergekit {place}.parameters must be a mapping, got {raw!r}")
        own: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in form.per_model:
                raise RecipeError(
                    f"{where}: mergekit's {method} has no per-model parameter '{key}' (in {place}.parameters), "
                    f"so sefusion cannot honour it; per-model parameters: {', '.join(form.per_model)}"
                )
            own[key] = _mk_scalar(value, key, f"{place}.parameters", where)
        if form.task_vectors and _same_model(path, base):
            # Task-vector methods skip the base when it is listed among the models, as mergekit does.
            if own:
                notes.append(f"{place} is the base model; its parameters {own} are ignored, as in mergekit")
            continue
        entries.append({"path": path, "own": own, "place": place})

    if not form.task_vectors and base is not None and not any(_same_model(e["path"], base) for e in entries):
        # mergekit adds base_model to the averaged models, with the global weight (it fails without one).
        if "weight" not in glob:
            raise RecipeError(
                f"{where}: mergekit's {method} also averages base_model, which then needs a weight: list it "
                "under `models` with a weight, or remove `base_model`"
            )
        entries.append({"path": base, "own": {}, "place": "base_model"})
        notes.append(
            f"base_model is averaged as one more model with weight {glob['weight']:g}, as in mergekit"
        )
    return entries


def from_mergekit(data: Mapping[str, Any], *, where: str = "recipe") -> Recipe:
    """Convert a mergekit 0.1.5 recipe to sefusion's, for linear, task_arithmetic, ties, dare_linear and
    dare_ties, with mergekit 0.1.5's defaults and weighting conventions.

    mergekit's defaults are made explicit (density 1.0; normalize and rescale per method), so the converted
    recipe computes what mergekit computes up to the documented differences (top-k count and tie breaking,
    DARE's rescale), which `Recipe.notes` lists. A method, key or parameter value sefusion cannot honour
    raises RecipeError with the reason; nothing is dropped silently.
    """
    method = data.get("merge_method")
    spec, form = _mk_method(method, where)
    _mk_top_level(data, where)
    notes: list[str] = []
    glob = _mk_global(data, method, form, where)
    base = data.get("base_model")
    base = _mk_model_ref(base, "base_model", where) if base is not None else None
    entries = _mk_models(data, method, form, base, glob, where, notes)

    # Per-model values win over the top-level ones, as in mergekit's ConfigReader.
    models: list[dict[str, Any]] = []
    unweighted = []
    for e in entries:
        weight = e["own"].get("weight", glob.get("weight"))
        if weight is None:
            unweighted.append(e["place"])
            weight = 1.0
        entry: dict[str, Any] = {"path": e["path"], "weight": weight}
        # per-model parameters the sefusion method takes per expert (density) go to its models[].params
        own = {k: v for k, v in e["own"].items() if k in spec.params and spec.params[k].per_expert}
        if own:
            entry["params"] = own
        models.append(entry)
    if unweighted:
        notes.append(f"{', '.join(unweighted)}: no weight (mergekit requires one); used 1.0")
    params = form.params(glob, entries, models, where, notes)

    # mergekit's `dtype` is the dtype it computes in (and writes, unless `out_dtype` is given).
    dtype_key = "out_dtype" if data.get("out_dtype") is not None else "dtype"
    dtype = data.get(dtype_key)
    if dtype is not None and _canonical_dtype(dtype) not in _DTYPE_ALIASES.values():
        raise RecipeError(
            f"{where}: mergekit `{dtype_key}: {dtype}` is not one sefusion writes: float32, float16, bfloat16"
        )
    compute = data.get("dtype")
    if compute is not None and _canonical_dtype(compute) != "float32":
        notes.append(f"mergekit computes in {compute}; sefusion computes in float32 and writes {dtype}")
    seed = data.get("random_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise RecipeError(f"{where}: mergekit `random_seed` must be a non-negative integer, got {seed!r}")

    recipe: dict[str, Any] = {"method": method, "models": models, "params": params}
    if base is not None:
        recipe["base"] = base
    if dtype is not None:
        recipe["dtype"] = dtype
    if seed is not None:
        recipe["seed"] = seed
    return _validate(recipe, where).with_notes(notes)
