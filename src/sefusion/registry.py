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

This module does not import torch, so ``sefusion methods`` and ``--help`` stay fast.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from pydantic import TypeAdapter, ValidationError

from .errors import RecipeError

S = TypeVar("S")

Kind = Literal["merge", "bundle"]

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
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a method function under `name`; its keyword-only parameters become its config.

    `stream`: the function gives the same bits on consecutive chunks of a tensor's flat range as on the
    whole tensor (whole-tensor quantities through ctx.whole_tensor), so the engine may stream it;
    `chunk_align` names the parameter that chunk starts must be multiples of.
    """
    per_expert = set(per_expert)

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
        METHODS.add(
            MethodSpec(name, fn, paper, kind, needs_base, summary, params, check, stream, chunk_align)
        )
        fn.spec = METHODS._specs[name]  # type: ignore[attr-defined]
        return fn

    return deco


_loaded = False


def _load_builtin_methods() -> None:
    """Import sefusion.methods once, which registers the built-in methods (and imports torch)."""
    global _loaded
    if not _loaded:
        _loaded = True
        import sefusion.methods  # noqa: F401
