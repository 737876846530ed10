"""Statistics of each expert on its own data, for the data-aware methods (`fisher`, `regmean`).

A statistics pass runs each expert once over `examples` examples of its task and keeps, per tensor:

* ``fisher/<tensor name>``: the diagonal Fisher F (same shape as the parameter, float32), for `fisher`;
* ``gram/<linear weight name>``: G = X^T X (in, in), the sum over every row (token) of that nn.Linear's
  inputs, for `regmean`. Stored in **float64**: it is a sum over tens of thousands of rows, and RegMean
  solves (sum_t G~_t) W^T = sum_t G~_t W_t^T with it. A solve amplifies relative errors in G by up to
  its condition number, which reaches 1e6 and more for transformer activations (outlier features), so
  float32 rounding (6e-8 per entry, more once accumulated over the rows) could cost percents of W; in
  float64 it stays far below the float32 output's own rounding. The cost is in^2 * 8 bytes per linear
  layer (18 MiB for a 1536-wide input), independent of the number of examples.

On disk, one folder per expert (written atomically: a temporary folder renamed when complete)::

    stats.json          {"format": "sefusion-stats", "version": 1, "examples", "task", "data", "kind",
                         "fisher_type", "expert": {"path", "sha256"}, "sefusion",
                         "fisher": {name: {"sq_norm": sum F^2}}, "gram": {name: {"rows": n}}}
    stats.safetensors   fisher/<name> (float32), gram/<name> (float64)

`stats.json` holds each Fisher tensor's squared L2 norm, so `fisher`'s `normalize` (divide F_t by its
*model-wide* L2 norm) stays a streaming per-tensor merge: the norm over the merged tensors is
sqrt(sum of their sq_norm), known before any tensor is read. :class:`StatsStore` reads one tensor at a
time (positional reads, like the checkpoint readers); :class:`Statistics` is the same thing in memory.

Accumulators that a model hook feeds:

* :class:`FisherAccumulator`: squared per-example gradients. :meth:`~FisherAccumulator.add_classification`
  computes the exact expectation over classes, E_x sum_y p(y|x) (d log p(y|x) / d theta)^2;
  :meth:`~FisherAccumulator.add_empirical` the empirical Fisher of per-example losses (reference tokens of a
  language model, a contrastive loss).
* :class:`GramAccumulator`: forward pre-hooks on every nn.Linear summing X^T X over all (unmasked) tokens,
  keyed by the weight's state-dict (or checkpoint) name.
* :class:`LinearInputRecorder`: the same hooks keeping the rows themselves (PLeaS matches on them).

Methods receive the statistics of the tensor being merged through :class:`StatsContext` (a
:class:`~sefusion.methods.TensorContext` with a ``stats`` field, one :class:`TensorStats` per expert).

torch, safetensors and the io package are imported lazily, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._lazy import torch
from .methods._data import (
    FISHER,
    GRAM,
    KINDS,
    StatisticsError,
    StatsContext,
    TensorStats,
    check_examples,
    expert_stats,
    required_statistics,
)

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = [
    "FISHER",
    "GRAM",
    "KINDS",
    "FisherAccumulator",
    "GramAccumulator",
    "LinearInputRecorder",
    "Statistics",
    "StatisticsError",
    "StatsContext",
    "StatsMeta",
    "StatsStore",
    "TensorStats",
    "cache_key",
    "check_kinds",
    "check_examples",
    "expert_stats",
    "open_stats",
    "required_statistics",
]

STATS_JSON = "stats.json"
STATS_FILE = "stats.safetensors"
FORMAT = "sefusion-stats"
VERSION = 1


# --------------------------------------------------------------------------- stores


@dataclass
class StatsMeta:
    """What stats.json records besides the per-tensor entries."""

    examples: int
    task: str | None = None  # a study task name such as defect-python
    data: str | None = None  # the data's name or path
    kind: str | None = None  # classification | retrieval | lm | regression | ...
    fisher_type: str | None = None  # exact | empirical
    expert_path: str | None = None
    expert_sha256: str | None = None


class _StatsSource:
    """What the stores share: the per-tensor reads and the model-wide Fisher norm."""

    meta: StatsMeta
    _fisher_sq: dict[str, float]
    _gram_rows: dict[str, int]

    @property
    def examples(self) -> int:
        return self.meta.examples

    @property
    def label(self) -> str:
        return self.meta.task or self.meta.expert_path or "?"

    def fisher_names(self) -> list[str]:
        return list(self._fisher_sq)

    def gram_names(self) -> list[str]:
        return list(self._gram_rows)

    def has_fisher(self, name: str) -> bool:
        return name in self._fisher_sq

    def has_gram(self, name: str) -> bool:
        return name in self._gram_rows

    def gram_rows(self, name: str) -> int:
        return self._gram_rows[name]

    def fisher(self, name: str) -> Tensor:
        raise NotImplementedError

    def gram(self, name: str) -> Tensor:
        raise NotImplementedError

    def fisher_norm(self, names: Iterable[str] | None = None) -> float:
        """sqrt(sum over `names` (default: every tensor held) of sum F^2), in float64.

        A name without a Fisher is an error: the norm would silently leave it out.
        """
        names = self.fisher_names() if names is None else list(names)
        missing = [n for n in names if n not in self._fisher_sq]
        if missing:
            raise StatisticsError(
                f"statistics of expert '{self.label}' hold no Fisher for tensor '{missing[0]}'"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        return math.sqrt(math.fsum(self._fisher_sq[n] for n in names))

    def tensor_stats(
        self, name: str, kinds: Iterable[str] = KINDS, *, fisher_norm: float | None = None
    ) -> TensorStats:
        """This expert's statistics for tensor `name`: the kinds asked for that the store holds."""
        kinds = set(kinds)
        return TensorStats(
            label=self.label,
            examples=self.examples,
            fisher=self.fisher(name) if FISHER in kinds and self.has_fisher(name) else None,
            fisher_norm=fisher_norm,
            gram=self.gram(name) if GRAM in kinds and self.has_gram(name) else None,
        )


def _sq_norm(t: Tensor) -> float:
    return float(t.double().square().sum())


class Statistics(_StatsSource):
    """One expert's statistics in memory: fisher {name: float32 tensor}, gram {name: float64 (in, in)}."""

    def __init__(
        self,
        meta: StatsMeta,
        *,
        fisher: Mapping[str, Tensor] | None = None,
        gram: Mapping[str, Tensor] | None = None,
        gram_rows: Mapping[str, int] | None = None,
    ) -> None:
        if meta.examples < 1:
            raise StatisticsError(f"statistics need at least one example, got {meta.examples}")
        self.meta = meta
        self._fisher = {n: t.detach().float().cpu() for n, t in (fisher or {}).items()}
        self._gram = {n: t.detach().double().cpu() for n, t in (gram or {}).items()}
        for n, g in self._gram.items():
            if g.dim() != 2 or g.shape[0] != g.shape[1]:
                raise StatisticsError(f"Gram matrix of '{n}' must be square (in, in), got {tuple(g.shape)}")
        self._fisher_sq = {n: _sq_norm(t) for n, t in self._fisher.items()}
        rows = dict(gram_rows or {})
        self._gram_rows = {n: int(rows.get(n, 0)) for n in self._gram}

    @classmethod
    def collect(
        cls,
        *,
        examples: int,
        fisher: FisherAccumulator | None = None,
        gram: GramAccumulator | None = None,
        **meta: Any,
    ) -> Statistics:
        """Statistics from accumulators that saw exactly `examples` examples (else "too few examples")."""
        if fisher is None and gram is None:
            raise StatisticsError("no accumulator given: nothing to collect")
        what = meta.get("task") or meta.get("data") or "this expert"
        if fisher is not None:
            check_examples(fisher.examples, examples, f"the Fisher of {what}")
            meta.setdefault("fisher_type", fisher.kind)
        if gram is not None:
            check_examples(gram.examples, examples, f"the Gram matrices of {what}")
        return cls(
            StatsMeta(examples=examples, **meta),
            fisher=fisher.fisher() if fisher is not None else None,
            gram=gram.grams() if gram is not None else None,
            gram_rows=gram.rows if gram is not None else None,
        )

    def fisher(self, name: str) -> Tensor:
        try:
            return self._fisher[name]
        except KeyError:
            raise StatisticsError(
                f"statistics of expert '{self.label}' hold no Fisher for '{name}'"
            ) from None

    def gram(self, name: str) -> Tensor:
        try:
            return self._gram[name]
        except KeyError:
            raise StatisticsError(
                f"statistics of expert '{self.label}' hold no Gram matrix for '{name}'"
            ) from None

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write the store folder (stats.json + stats.safetensors) atomically; returns its path."""
        from safetensors.torch import save_file

        from ._version import __version__
        from .io import atomic_dir

        folder = Path(folder)
        tensors = {f"{FISHER}/{n}": t.contiguous() for n, t in self._fisher.items()}
        tensors.update({f"{GRAM}/{n}": t.contiguous() for n, t in self._gram.items()})
        doc = {
            "format": FORMAT,
            "version": VERSION,
            **{k: v for k, v in asdict(self.meta).items() if not k.startswith("expert_")},
            "expert": {"path": self.meta.expert_path, "sha256": self.meta.expert_sha256},
            "sefusion": __version__,
            FISHER: {n: {"sq_norm": self._fisher_sq[n]} for n in self._fisher},
            GRAM: {n: {"rows": self._gram_rows[n]} for n in self._gram},
        }
        with atomic_dir(folder, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp / STATS_FILE), metadata={"format": FORMAT})
            (tmp / STATS_JSON).write_text(json.dumps(doc, indent=1) + "\n")
        return folder


class StatsStore(_StatsSource):
    """An expert's statistics folder, read one tensor at a time. Use as a context manager or close()."""

    def __init__(self, folder: str | Path) -> None:
        from .io import SafetensorsReader

        self.path = Path(folder)
        if not self.path.is_dir():
            raise StatisticsError(f"statistics folder {self.path} does not exist")
        doc_path = self.path / STATS_JSON
        try:
            doc = json.loads(doc_path.read_text())
        except FileNotFoundError:
            raise StatisticsError(f"{doc_path} is missing: {self.path} is not a statistics folder") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise StatisticsError(f"cannot read {doc_path}: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise StatisticsError(f"{doc_path} is not a sefusion statistics file (format {FORMAT!r})")
        if doc.get("version") != VERSION:
            raise StatisticsError(
                f"{doc_path} has version {doc.get('version')}; this sefusion reads {VERSION}"
            )
        expert = doc.get("expert") or {}
        try:
            self.meta = StatsMeta(
                examples=int(doc["examples"]),
                task=doc.get("task"),
                data=doc.get("data"),
                kind=doc.get("kind"),
                fisher_type=doc.get("fisher_type"),
                expert_path=expert.get("path"),
                expert_sha256=expert.get("sha256"),
            )
            self._fisher_sq = {n: float(v["sq_norm"]) for n, v in (doc.get(FISHER) or {}).items()}
            self._gram_rows = {n: int(v["rows"]) for n, v in (doc.get(GRAM) or {}).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise StatisticsError(f"{doc_path} is malformed: {exc!r}") from None
        data = self.path / STATS_FILE
        if not data.is_file():
            raise StatisticsError(f"{data} is missing")
        self._reader = SafetensorsReader(self.path, [data])
        for kind, names in ((FISHER, self._fisher_sq), (GRAM, self._gram_rows)):
            for n in names:
                if f"{kind}/{n}" not in self._reader:
                    raise StatisticsError(f"{data} lacks '{kind}/{n}' that {STATS_JSON} lists")

    def fisher(self, name: str) -> Tensor:
        if name not in self._fisher_sq:
            raise StatisticsError(f"statistics {self.path} hold no Fisher for '{name}'")
        return self._reader.get(f"{FISHER}/{name}").float()

    def gram(self, name: str) -> Tensor:
        if name not in self._gram_rows:
            raise StatisticsError(f"statistics {self.path} hold no Gram matrix for '{name}'")
        return self._reader.get(f"{GRAM}/{name}").double()

    def close(self) -> None:
        self._reader.close()

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """Pickled as its folder, opened again where it is unpickled (a study's piece on a Ray worker)."""
        return (StatsStore, (str(self.path),))

    def __enter__(self) -> StatsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_stats(folder: str | Path) -> StatsStore:
    return StatsStore(folder)


def check_kinds(kinds: Iterable[str]) -> list[str]:
    """The statistics kinds asked for, sorted; none or an unknown one is refused."""
    chosen = sorted(set(kinds))
    if not chosen or set(chosen) - set(KINDS):
        raise StatisticsError(f"statistics kinds must be some of {', '.join(KINDS)}, got {chosen}")
    return chosen


def cache_key(
    *, expert_sha256: str, task: str, data: str, examples: int, kinds: Iterable[str], **extra: Any
) -> str:
    """The key of a statistics folder in the cache: expert hash + task + data + examples + kinds (+ extra)."""
    doc = {
        "expert": expert_sha256,
        "task": task,
        "data": data,
        "examples": int(examples),
        "kinds": sorted(set(kinds)),
        "version": VERSION,
        **extra,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------- accumulators


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise StatisticsError("cannot tell the batch size: the batch holds no tensor with a batch dimension")


def _example(batch: Any, i: int, n: int) -> Any:
    """Example i of a batch (a tensor, a mapping or a sequence of tensors), keeping a batch dim of 1."""

    def take(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            return v[i : i + 1]
        return v

    if isinstance(batch, torch.Tensor):
        return take(batch)
    if isinstance(batch, Mapping):
        return {k: take(v) for k, v in batch.items()}
    return type(batch)(take(v) for v in batch)


def _call(model: Callable[..., Any], example: Any) -> Tensor:
    if isinstance(example, Mapping):
        out = model(**example)
    elif isinstance(example, (tuple, list)):
        out = model(*example)
    else:
        out = model(example)
    if not isinstance(out, torch.Tensor):
        logits = getattr(out, "logits", None)
        if logits is None:
            raise StatisticsError(f"the model returned {type(out).__name__}, not a tensor of logits")
        out = logits
    return out


class FisherAccumulator:
    """Sum of squared per-example gradients, per parameter (keyed by checkpoint name), in float64.

    fisher() = (1/N) sum_i  sum_y p(y|x_i) (d log p(y|x_i)/d theta)^2      (exact, add_classification)
             = (1/N) sum_i  (d loss_i/d theta)^2                           (empirical, add_empirical)
    Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging", https://arxiv.org/abs/2111.09832
    Gradients come from torch.autograd.grad, so the parameters' .grad fields are left alone.
    """

    def __init__(self, params: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> None:
        items = list(params.items() if isinstance(params, Mapping) else params)
        if not items:
            raise StatisticsError("FisherAccumulator needs at least one parameter")
        for n, p in items:
            if not p.requires_grad:
                raise StatisticsError(f"parameter '{n}' does not require grad: its Fisher cannot be computed")
        self.names = [n for n, _ in items]
        self.tensors = [p for _, p in items]
        self.sums = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in items}
        self.examples = 0
        self.kind: str | None = None

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        rename: Mapping[str, str] | Callable[[str], str | None] | None = None,
    ) -> FisherAccumulator:
        """Every parameter of `module` that requires grad, under rename(state-dict name) (None: skipped)."""
        return cls(
            (key, p)
            for n, p in module.named_parameters()
            if p.requires_grad and (key := _renamed(rename, n)) is not None
        )

    def _set_kind(self, kind: str) -> None:
        if self.kind not in (None, kind):
            raise StatisticsError(f"cannot mix {self.kind} and {kind} Fisher in one accumulator")
        self.kind = kind

    def add_squared_grads(self, grads: Sequence[Tensor | None], weight: float | Tensor = 1.0) -> None:
        """sums += weight * g^2 for one example's gradients (in `self.names` order; None: no gradient)."""
        for n, g in zip(self.names, grads, strict=True):
            if g is not None:
                self.sums[n].add_(g.detach().double().square().mul_(weight))

    def add_classification(self, model: Callable[..., Any], batch: Any) -> int:
        """Exact Fisher of a classifier over one batch, example by example; returns the examples added.

        model(example) (or model(**example) for a mapping) returns the logits (1, C) of one example;
        F += sum_y p(y|x) (d log p(y|x)/d theta)^2 with p from the model itself (no labels used).
        Cost per example: one forward pass and C backward passes (retain_graph between classes), so
        N * (1 + C) passes of batch size 1 in all; exact, where sampling y would add Monte-Carlo noise.
        """
        self._check_eval(model)
        self._set_kind("exact")
        n = _batch_size(batch)
        for i in range(n):
            logits = _call(model, _example(batch, i, n))
            if logits.dim() == 1:
                logits = logits[None]
            if logits.dim() != 2 or logits.shape[0] != 1:
                raise StatisticsError(
                    f"the model returned logits of shape {tuple(logits.shape)} for one example; "
                    "expected (1, classes)"
                )
            logp = torch.log_softmax(logits[0].double(), dim=-1)  # (C,)
            p = logp.detach().exp()
            classes = logp.shape[0]
            for y in range(classes):
                grads = torch.autograd.grad(
                    logp[y], self.tensors, retain_graph=y + 1 < classes, allow_unused=True
                )
                self.add_squared_grads(grads, float(p[y]))
            self.examples += 1
        return n

    def add_empirical(self, losses: Tensor) -> int:
        """Empirical Fisher: one example per entry of `losses` (B,), each -log p(y_i | x_i) of example i.

        For a language model, losses[i] is the summed NLL of sequence i's reference tokens; for in-batch
        contrastive retrieval, -log softmax(sim(q_i, .) / tau)[i]. The entries may share one graph (one
        batched forward): each gets its own backward (retain_graph), so the cost is B backward passes.
        """
        if losses.dim() != 1:
            raise StatisticsError(
                f"add_empirical takes per-example losses (B,), got shape {tuple(losses.shape)}"
            )
        self._set_kind("empirical")
        b = losses.shape[0]
        for i in range(b):
            grads = torch.autograd.grad(losses[i], self.tensors, retain_graph=i + 1 < b, allow_unused=True)
            self.add_squared_grads(grads)
        self.examples += b
        return b

    @staticmethod
    def _check_eval(model: Any) -> None:
        if isinstance(model, torch.nn.Module) and model.training:
            raise StatisticsError(
                "put the model in eval mode (model.eval()): dropout would make the Fisher noisy"
            )

    def fisher(self) -> dict[str, Tensor]:
        """The diagonal Fisher (float32, on the CPU): the sums divided by the number of examples."""
        if self.examples == 0:
            raise StatisticsError("no examples were added: the Fisher is undefined")
        return {n: (s / self.examples).float().cpu() for n, s in self.sums.items()}


def _renamed(rename: Mapping[str, str] | Callable[[str], str | None] | None, name: str) -> str | None:
    if rename is None:
        return name
    if isinstance(rename, Mapping):
        return rename.get(name, name)
    return rename(name)


class _LinearHooks:
    """Forward pre-hooks on every nn.Linear of a module, keyed by the weight's (renamed) state-dict name.

    `masked(mask)` restricts the rows to the tokens where mask (B, L) is true, for inputs shaped (B, L, in).
    """

    def __init__(
        self, module: nn.Module, *, rename: Mapping[str, str] | Callable[[str], str | None] | None = None
    ) -> None:
        self._handles: list[Any] = []
        self._mask: Tensor | None = None
        self.keys: list[str] = []
        self.examples = 0
        for mod_name, mod in module.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            key = _renamed(rename, f"{mod_name}.weight" if mod_name else "weight")
            if key is None:
                continue
            self.keys.append(key)
            self._handles.append(mod.register_forward_pre_hook(self._hook(key, mod.in_features)))
        if not self.keys:
            raise StatisticsError(f"{type(module).__name__} has no nn.Linear layer to record")

    def _hook(self, key: str, in_features: int) -> Callable[..., None]:
        def hook(_mod: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            mask = self._mask
            if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                rows = x[mask.to(device=x.device, dtype=torch.bool)]  # (n, in)
            else:
                rows = x.reshape(-1, in_features)  # (n, in)
            self._on_rows(key, rows)

        return hook

    def _on_rows(self, key: str, rows: Tensor) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def masked(self, mask: Tensor | None) -> Iterator[None]:
        """Within the block, inputs shaped like mask + (in,) keep only the rows where mask is true."""
        old, self._mask = self._mask, mask
        try:
            yield
        finally:
            self._mask = old

    def add_examples(self, n: int) -> None:
        """Count examples (the statistics pass calls this once per batch it runs)."""
        self.examples += int(n)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> _LinearHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GramAccumulator(_LinearHooks):
    """G = sum over every input row x (token) of x x^T, per nn.Linear: the RegMean statistics.

    For y = x W^T + b with W (out, in), G is (in, in) and keyed by the weight's name. Accumulated in
    `dtype` (float64 by default: see the module docstring); each forward pass's own product X^T X is
    computed in `product_dtype` (default: `dtype`) before it is added.
    Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models" (RegMean),
    https://arxiv.org/abs/2212.09849
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        rename: Mapping[str, str] | Callable[[str], str | None] | None = None,
        dtype: Any = None,
        product_dtype: Any = None,
    ) -> None:
        self.dtype = dtype if dtype is not None else torch.float64
        self.product_dtype = product_dtype if product_dtype is not None else self.dtype
        self._grams: dict[str, Tensor] = {}
        self.rows: dict[str, int] = {}
        super().__init__(module, rename=rename)

    def _on_rows(self, key: str, rows: Tensor) -> None:
        x = rows.to(self.product_dtype)  # (n, in)
        g = (x.T @ x).to(self.dtype)  # (in, in)
        if key in self._grams:
            self._grams[key].add_(g)
        else:
            self._grams[key] = g
        self.rows[key] = self.rows.get(key, 0) + int(rows.shape[0])

    def grams(self) -> dict[str, Tensor]:
        """{weight name: G (in, in)} on the CPU, float64."""
        missing = [k for k in self.keys if k not in self._grams]
        if missing:
            raise StatisticsError(
                f"no input reached linear layer '{missing[0]}' (and {len(missing) - 1} more): "
                "the forward passes did not use it"
            )
        return {k: g.double().cpu() for k, g in self._grams.items()}


class LinearInputRecorder(_LinearHooks):
    """The input rows of every nn.Linear, kept (float32, CPU) and concatenated: PLeaS's activations.

    activations() = {weight name: X (rows, in)}; `add(key, rows)` records anything else (the last
    hidden state under "last_hidden_state", say). Both models must see the same inputs in the same order.
    """

    def __init__(
        self, module: nn.Module, *, rename: Mapping[str, str] | Callable[[str], str | None] | None = None
    ) -> None:
        self._rows: dict[str, list[Tensor]] = {}
        super().__init__(module, rename=rename)

    def _on_rows(self, key: str, rows: Tensor) -> None:
        self._rows.setdefault(key, []).append(rows.float().cpu())

    def add(self, key: str, rows: Tensor) -> None:
        """Record extra rows (n, d) (mask them yourself)."""
        self._on_rows(key, rows.detach().reshape(-1, rows.shape[-1]))

    def activations(self) -> dict[str, Tensor]:
        return {k: torch.cat(v) for k, v in self._rows.items()}
