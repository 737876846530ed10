"""One registry of merge methods.

A method is a plain function whose keyword-only parameters are its configuration::

    @register("ties", paper="https://arxiv.org/abs/2306.01708")
    def ties(base, experts, weights, *, density: Density = 0.2, lambda_: float = 1.0, ...,
             ctx: TensorContext = DEFAULT_CTX) -> Tensor: ...

* Positional parameters: ``base`` (float32 tensor or None), ``experts`` (list of tensors in their stored
  floating dtype, e.g. bf16: a method reads them into float32 as it goes, so the engine never holds T
  float32 copies), ``weights`` (list of floats, one per expert). The result is float32.
* Keyword-only parameters are the recipe's ``params``. A trailing underscore is dropped from the public
  name (``lambda_`` is ``lambda`` in a recipe). Annotations may carry pydantic constraints
  (``Annotated[float, Field(gt=0, le=1)]``); values are validated against them before any tensor is read.
* ``ctx`` (a :class:`TensorContext`) is not a parameter: the engine fills it per tensor.
* ``per_expert`` names the parameters that a recipe may set per model (``models[].params``); the
  function then receives a list with one value per expert.

Every other fact about a method is an argument of :func:`register` and lives in its :class:`MethodSpec`:
its kind (``merge``: one model; ``bundle``: one artefact serving every task; ``whole_model``: a procedure
over whole models that the tensor-by-tensor engine cannot run), the statistics it reads of each expert,
whether it merges exactly two models, the hooks the engine calls (``bind_tasks`` before any tensor is
read, ``prepass`` for a quantity over the whole model), its study grid (:class:`StudyGrid`) and how
mergekit writes it (:class:`MergekitForm`). The engine, the recipe checks, the mergekit reader and the
study read these fields; none of them names a method.

This module does not import torch, so ``sefusion methods`` and ``--help`` stay fast.
"""

from __future__ import annotations

import inspect
import itertools
import math
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, TypeVar

from pydantic import TypeAdapter, ValidationError

from .errors import RecipeError

S = TypeVar("S")

Kind = Literal["merge", "bundle", "whole_model"]
STATISTICS_KINDS = ("fisher", "gram")  # what a statistics pass can compute (sefusion.stats)

_CONTEXT_PARAMS = {"ctx"}


def public_name(param: str) -> str:
    """`lambda_` -> `lambda`: Python keywords get a trailing underscore in signatures."""
    return param[:-1] if param.endswith("_") else param


@dataclass(frozen=True)
class Param:
    name: str  # public (recipe) name
    arg: str  # the function's argument name
    default: Any
    annotation: Any
    per_expert: bool

    def validate(self, value: Any, where: str) -> Any:
        try:
            out = TypeAdapter(self.annotation).validate_python(value)
        except ValidationError as exc:
            reason = "; ".join(e["msg"] for e in exc.errors())
            raise RecipeError(f"{where}: parameter '{self.name}' = {value!r} is invalid: {reason}") from None
        problem = _not_a_number(value, out)
        if problem:
            raise RecipeError(f"{where}: parameter '{self.name}' = {value!r} is invalid: {problem}")
        return out


def _not_a_number(given: Any, parsed: Any) -> str | None:
    """Numbers must be finite, and a boolean is not a number (`density: yes` is not 1): what is wrong with
    `given` once validated as `parsed`, or None."""
    if isinstance(given, bool) and not isinstance(parsed, bool):
        return "a boolean (true/false, yes/no) is not a number"
    if isinstance(parsed, float) and not math.isfinite(parsed):
        return "numbers must be finite"
    if isinstance(given, (list, tuple)) and isinstance(parsed, (list, tuple)) and len(given) == len(parsed):
        return next(filter(None, (_not_a_number(g, p) for g, p in zip(given, parsed, strict=True))), None)
    if isinstance(given, Mapping) and isinstance(parsed, Mapping):
        return next(filter(None, (_not_a_number(v, parsed.get(k)) for k, v in given.items())), None)
    return None


Candidates = tuple[dict[str, Any], ...]


def product(**axes: Sequence[Any]) -> Candidates:
    """Every combination of the axes' values, the first axis outermost: product(a=(1, 2), b=(3,)).
    Axes are named as the function's arguments (`lambda_`); candidates hold the public names."""
    names = [public_name(a) for a in axes]
    return tuple(dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values()))


# the study's lambda axes: ten values at `full`, five at `quick`, two at the tests' tiny budgets
LAMBDA_FULL = tuple(round(0.1 * i, 1) for i in range(1, 11))
LAMBDA_QUICK = (0.2, 0.4, 0.6, 0.8, 1.0)
LAMBDA_SMALL = (0.5, 1.0)
MASK_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)  # TALL-Masks / Scaling-Masks lambda_t, picked per task


@dataclass(frozen=True)
class StudyGrid:
    """A method's candidates in the study: `full`, `quick` (demo time) and `small` (the tests' tiny
    budgets; None: as quick; quick None: as full). `rank` orders the study's rows. `per_task`: the
    parameter each task picks for itself on validation (a bundle's mask of task t reads only its own
    value); `curve`: a parameter and extra values scored beside the row as a size/score curve."""

    rank: int
    full: Candidates
    quick: Candidates | None = None
    small: Candidates | None = None
    per_task: str | None = None
    curve: tuple[str, tuple[float, ...]] | None = None

    def candidates(self, budget: str) -> list[dict[str, Any]]:
        """Fresh copies of the candidates at `budget` (full, quick; anything else is small)."""
        quick = self.quick if self.quick is not None else self.full
        chosen = self.full if budget == "full" else quick if budget == "quick" else self.small or quick
        return [dict(c) for c in chosen]


BindTasks = Callable[[dict[str, Any], list[str]], None]
# prepass(kwargs, task_vectors, names, n_experts) -> each tensor's model-wide context, or None: nothing
# to do for these kwargs. task_vectors(desc) yields (name, task vectors of a chunk) over every tensor.
Prepass = Callable[[Mapping[str, Any], Callable[[str], Iterator[tuple[str, Any]]], Sequence[str], int], Any]


# params(glob, entries, models, where, notes) -> the sefusion params of a mergekit recipe: `glob` its
# top-level parameters, `entries` the models kept ({path, own, place}), `models` the recipe's model
# entries (their weights may be rescaled in place); notes collects what differs from mergekit.
MergekitParams = Callable[
    [dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], str, list[str]], dict[str, Any]
]
TASK_VECTOR_PARAMETERS = ("normalize", "rescale", "lambda", "int8_mask", "weight", "density")


@dataclass(frozen=True)
class MergekitForm:
    """How mergekit 0.1.5 writes the method (same name): the top-level `parameters` and per-model
    parameters it reads, whether it works on task vectors (a base listed among the models is skipped;
    otherwise base_model is averaged as one more model), its normalize/rescale defaults, the translation
    of its parameters (`params`) and `rank`, its place in the list of mergekit methods sefusion reads."""

    rank: int
    params: MergekitParams
    parameters: tuple[str, ...] = TASK_VECTOR_PARAMETERS
    per_model: tuple[str, ...] = ("weight", "density")
    task_vectors: bool = True
    normalize: bool = False
    rescale: bool = False


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., Any]
    paper: str
    kind: Kind
    needs_base: bool
    summary: str
    params: dict[str, Param] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], None] | None = None
    stream: bool = False  # may run on chunks of a tensor's flat range (see sefusion.stream)
    chunk_align: str | None = None  # the parameter whose value chunk starts must be a multiple of
    statistics: frozenset[str] = frozenset()  # what it reads of each expert's statistics
    pair_only: bool = False  # merges exactly two models
    bind_tasks: BindTasks | None = None  # checks/rewrites task-keyed params against the task names
    prepass: Prepass | None = None  # a model-wide quantity found before the merge pass
    study: StudyGrid | None = None  # its study grid (None: not a study row)
    whole_model: Callable[..., Any] | None = None  # the whole-model procedure (kind whole_model)
    study_fuse: str | None = None  # the models-API function the study runs it with (kind whole_model)
    mergekit: MergekitForm | None = None  # how mergekit writes it (None: mergekit has no equivalent)

    @property
    def data_use(self) -> str | None:
        """What it reads of each expert's data: "statistics", "activations" (whole-model), or None."""
        if self.kind == "whole_model":
            return "activations"
        return "statistics" if self.statistics else None

    def check_count(self, count: int) -> None:
        """A pair-only method refuses any other number of models."""
        if self.pair_only and count != 2:
            raise RecipeError(f"{self.name} merges exactly two models, got {count}")

    def bind(self, kwargs: dict[str, Any], task_names: Sequence[str]) -> None:
        """Run `bind_tasks` on resolved kwargs before any tensor is read (ValueError -> RecipeError)."""
        if self.bind_tasks is None:
            return
        try:
            self.bind_tasks(kwargs, list(task_names))
        except ValueError as exc:
            raise RecipeError(f"method '{self.name}': {exc}") from None

    def alignment(self, kwargs: Mapping[str, Any]) -> int:
        """Chunk starts must be multiples of this (1: any): CABS works in blocks of m entries."""
        if self.chunk_align is None:
            return 1
        return int(kwargs[self.params[self.chunk_align].arg])

    def resolve(
        self,
        params: Mapping[str, Any],
        per_model: list[Mapping[str, Any]] | None = None,
        where: str = "recipe",
    ) -> dict[str, Any]:
        """Validate recipe params (+ per-model overrides) and return keyword arguments for `fn`.

        Unknown names are refused with the list of what exists. A per-expert parameter that any model
        overrides becomes a list with one value per expert. `check` (cross-parameter rules such as
        n <= m) runs on the resolved values.
        """
        known = ", ".join(self.params) or "(none)"
        for key in params:
            if key not in self.params:
                raise RecipeError(
                    f"{where}: method '{self.name}' has no parameter '{key}'; its parameters: {known}"
                )
        per_model = list(per_model or [])
        for i, overrides in enumerate(per_model):
            for key in overrides:
                if key not in self.params:
                    raise RecipeError(
                        f"{where}: models[{i}].params: method '{self.name}' has no parameter '{key}'; "
                        f"its parameters: {known}"
                    )
                if not self.params[key].per_expert:
                    per = ", ".join(p.name for p in self.params.values() if p.per_expert) or "(none)"
                    raise RecipeError(
                        f"{where}: models[{i}].params: '{key}' of method '{self.name}' cannot be set per "
                        f"model; per-model parameters: {per}"
                    )
        kwargs: dict[str, Any] = {}
        public: dict[str, Any] = {}
        for p in self.params.values():
            value = p.validate(params[p.name], where) if p.name in params else p.default
            if p.per_expert and any(p.name in o for o in per_model):
                values = [
                    p.validate(o[p.name], f"{where}: models[{i}]") if p.name in o else value
                    for i, o in enumerate(per_model)
                ]
                kwargs[p.arg] = values
                public[p.name] = values
            else:
                kwargs[p.arg] = value
                public[p.name] = value
        if self.check is not None:
            try:
                self.check(public)
            except ValueError as exc:
                raise RecipeError(f"{where}: method '{self.name}': {exc}") from None
        return kwargs

    def describe_params(self) -> list[tuple[str, str, str]]:
        """(name, type, default) rows for `sefusion methods`."""
        return [
            (p.name + (" [per model]" if p.per_expert else ""), _type_name(p.annotation), repr(p.default))
            for p in self.params.values()
        ]


def _type_name(ann: Any) -> str:
    """`Annotated[float, Gt(gt=0)]` -> 'float Gt(gt=0)'; `Literal['a', 'b']` -> "'a' | 'b'"."""
    args = typing.get_args(ann)
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        return " ".join([_type_name(args[0]), *(str(m) for m in ann.__metadata__)])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(ann, type) and not args:
        return "None" if ann is type(None) else ann.__name__
    return str(ann).replace("typing.", "")


class Registry(Generic[S]):
    """Key -> spec, filled by decorators as the built-in modules import. Duplicate keys raise; an unknown
    key is an `error` that lists what exists ("unknown method 'tiess'; available: linear, ...")."""

    def __init__(
        self,
        what: str = "method",
        key: Callable[[S], str] = lambda spec: spec.name,  # type: ignore[attr-defined]
        error: type[Exception] = RecipeError,
        load: Callable[[], None] | None = None,
    ) -> None:
        self._specs: dict[str, S] = {}
        self._what, self._key, self._error = what, key, error
        self._load = load or (lambda: _load_builtin_methods())

    def add(self, spec: S) -> None:
        k = self._key(spec)
        if k in self._specs:
            raise ValueError(f"{self._what} '{k}' is already registered")
        self._specs[k] = spec

    def get(self, key: str) -> S:
        self._load()
        try:
            return self._specs[key]
        except KeyError:
            raise self._error(f"unknown {self._what} '{key}'; available: {', '.join(self.keys())}") from None

    def keys(self) -> list[str]:
        self._load()
        return list(self._specs)

    def names(self) -> list[str]:
        return self.keys()

    def __iter__(self) -> Iterator[S]:
        self._load()
        return iter(list(self._specs.values()))

    def __contains__(self, key: str) -> bool:
        self._load()
        return key in self._specs


METHODS: Registry[MethodSpec] = Registry(
    "method", lambda spec: spec.name, RecipeError, lambda: _load_builtin_methods()
)


def register(
    name: str,
    *,
    paper: str,
    kind: Kind = "merge",
    needs_base: bool = True,
    per_expert: Iterable[str] = (),
    check: Callable[[dict[str, Any]], None] | None = None,
    stream: bool = False,
    chunk_align: str | None = None,
    statistics: Iterable[str] = (),
    pair_only: bool = False,
    bind_tasks: BindTasks | None = None,
    prepass: Prepass | None = None,
    study: StudyGrid | None = None,
    whole_model: Callable[..., Any] | None = None,
    study_fuse: str | None = None,
    mergekit: MergekitForm | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a method function under `name`; its keyword-only parameters become its config.

    `stream`: the function gives the same bits on consecutive chunks of a tensor's flat range as on the
    whole tensor (whole-tensor quantities through ctx.whole_tensor), so the engine may stream it;
    `chunk_align` names the parameter that chunk starts must be multiples of. `statistics`: the kinds
    it reads (it then has a per-expert `examples` parameter: how many examples they come from). A
    `whole_model` method registers a function that only declares its parameters: its `fn` becomes one
    that validates a direct call and explains where the method runs.
    """
    per_expert = set(per_expert)
    kinds = frozenset(statistics)
    if kinds - set(STATISTICS_KINDS):
        raise TypeError(f"method '{name}': unknown statistics kinds {sorted(kinds - set(STATISTICS_KINDS))}")
    if (kind == "whole_model") != (whole_model is not None):
        raise TypeError(f"method '{name}': a whole_model procedure goes with kind 'whole_model' only")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        # Only the keyword-only annotations are evaluated: `Tensor` in the positional ones lives under
        # TYPE_CHECKING so that listing methods does not import torch.
        sig = inspect.signature(fn)
        params: dict[str, Param] = {}
        for arg, p in sig.parameters.items():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or arg in _CONTEXT_PARAMS:
                continue
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"method '{name}': parameter '{arg}' needs a default")
            ann = p.annotation
            if isinstance(ann, str):
                ann = eval(ann, fn.__globals__)  # noqa: S307 - our own annotation strings
            pub = public_name(arg)
            params[pub] = Param(pub, arg, p.default, ann, pub in per_expert)
        unknown = per_expert - set(params)
        if unknown:
            raise TypeError(f"method '{name}': per_expert names unknown parameters {sorted(unknown)}")
        doc = inspect.getdoc(fn) or ""
        summary = doc.splitlines()[0] if doc else ""
        if chunk_align is not None and chunk_align not in params:
            raise TypeError(f"method '{name}': chunk_align names unknown parameter '{chunk_align}'")
        if kinds and not (params.get("examples") and params["examples"].per_expert):
            raise TypeError(f"method '{name}': reading statistics needs a per-expert `examples` parameter")
        spec = MethodSpec(
            name, fn, paper, kind, needs_base, summary, params, check, stream, chunk_align, kinds,
            pair_only, bind_tasks, prepass, study, whole_model, study_fuse, mergekit,
        )  # fmt: skip
        if kind == "whole_model":
            spec = replace(spec, fn=_refusal(spec))
        METHODS.add(spec)
        fn.spec = spec  # type: ignore[attr-defined]
        return fn

    return deco


def _refusal(spec: MethodSpec) -> Callable[..., Any]:
    """A whole-model method called on one tensor: its arguments checked, then where it runs explained."""

    def refuse(base: Any, experts: list[Any], weights: list[float], **params: Any) -> Any:
        params.pop("ctx", None)
        spec.check_count(len(experts))
        spec.resolve({public_name(k): v for k, v in params.items()}, where="call")
        raise RecipeError(
            f"{spec.name} is a whole-model method (it ties tensors together), so it cannot run tensor by "
            f"tensor: run its whole-model procedure ({spec.whole_model.__module__}."  # type: ignore[union-attr]
            f"{spec.whole_model.__qualname__})"  # type: ignore[union-attr]
        )

    refuse.__doc__ = spec.fn.__doc__
    return refuse


_loaded = False


def _load_builtin_methods() -> None:
    """Import sefusion.methods once, which registers the built-in methods (and imports torch)."""
    global _loaded
    if not _loaded:
        _loaded = True
        import sefusion.methods  # noqa: F401
