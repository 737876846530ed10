"""Each expert's statistics for a data-aware method: opened in one place (a recipe's `stats:` folders,
or `data:` through a compute function), checked against the merged tensors, fed tensor by tensor.

Fisher's model-wide norm is taken up front over the merged tensors, so the merge stays one streaming
pass; tensors of a method that reads statistics are never chunked (RegMean solves with the whole weight).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SefusionError
from ..methods._data import FISHER, GRAM, StatisticsError, TensorStats
from ..recipe import ModelEntry, Recipe
from ..registry import MethodSpec

if TYPE_CHECKING:
    from ..stats import _StatsSource

# compute(entry, examples, kinds, names) -> the folder of a statistics store over at least `names` (None:
# the tensors its own model changes)
ComputeStats = Callable[[ModelEntry, int, frozenset[str], "Sequence[str] | None"], "str | Path"]


def recipe_statistics(
    recipe: Recipe,
    spec: MethodSpec,
    *,
    compute: ComputeStats | None = None,
    names: Sequence[str] | None = None,
) -> list[_StatsSource]:
    """One statistics source per model of the recipe, in its order, for a data-aware method.

    `stats:` is opened as it is; `data:` goes through compute(entry, examples, kinds, names), which returns
    the folder of a statistics store covering `names`, the merged tensors (None: each model's own; `sefusion
    merge` passes one);
    `examples` is the model's `examples:` (else the method's `examples` parameter). A model with neither,
    or with `data:` and no `compute`, is a StatisticsError naming it. The caller closes what is returned.
    """
    from ..stats import open_stats

    kinds = spec.statistics
    default = spec.params["examples"].default  # the registry gives every statistics reader `examples`
    out: list[_StatsSource] = []
    try:
        for i, (task, m) in enumerate(zip(recipe.task_names, recipe.models, strict=True)):
            who = f"expert '{task}' (models[{i}])"
            if m.stats is None and m.data is None:
                raise StatisticsError(
                    f"method '{spec.name}' needs the statistics of {who}: give it `data:` (a task name or "
                    "a .jsonl file) or `stats:` (a statistics folder) in the recipe"
                )
            if m.stats is None and compute is None:
                raise StatisticsError(
                    f"the statistics of {who} on `data: {m.data}` are not computed here: `sefusion merge` "
                    "computes them, or pass merge(..., stats=[...]) "
                    "(sefusion.models.statistics.statistics_for, sefusion.stats.open_stats)"
                )
            try:
                if m.stats is not None:
                    folder: str | Path = m.stats
                else:
                    examples = recipe.entry_examples(i) or default
                    folder = compute(m, examples, kinds, names)  # type: ignore[misc]
                out.append(open_stats(folder))
            except SefusionError as exc:
                raise StatisticsError(f"statistics of {who}: {exc}") from None
    except BaseException:
        close_statistics(out)
        raise
    return out


def close_statistics(sources: Sequence[Any]) -> None:
    """Close the statistics stores among `sources` (in-memory Statistics have nothing to close)."""
    for s in sources:
        close = getattr(s, "close", None)
        if close is not None:
            close()


class StatsFeed:
    """Each expert's statistics of one tensor at a time, for a data-aware method: what a StatsContext
    carries. Checked when built, before any tensor is read: one source per expert, a Fisher for every
    merged tensor (`fisher`), Gram matrices for some merged tensor (`regmean`: stores for another model
    would silently turn it into `linear`). Fisher's model-wide norm is taken over `names`, the merged
    tensors (excluded ones do not count), as `fisher`'s normalize defines it."""

    def __init__(
        self,
        spec: MethodSpec,
        sources: Sequence[_StatsSource | None],
        names: Sequence[str],
        task_names: Sequence[str],
    ) -> None:
        self.kinds = spec.statistics
        self.task_names = tuple(task_names)
        if len(sources) != len(task_names):
            raise StatisticsError(
                f"method '{spec.name}': statistics for {len(sources)} experts, but the recipe has "
                f"{len(task_names)} ({', '.join(self.task_names)})"
            )
        checked: list[_StatsSource] = []
        for i, (task, src) in enumerate(zip(task_names, sources, strict=True)):
            who = f"expert '{task}' (models[{i}])"
            if src is None:
                raise StatisticsError(
                    f"method '{spec.name}': missing statistics for {who}; give it `data:` or `stats:` in the "
                    "recipe, or pass them (sefusion.stats)"
                )
            where = f" ({getattr(src, 'path', None)})" if getattr(src, "path", None) is not None else ""
            if FISHER in self.kinds:
                missing = [n for n in names if not src.has_fisher(n)]
                if missing:
                    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                    raise StatisticsError(
                        f"the statistics of {who}{where} hold no Fisher for tensor '{missing[0]}'{more}; "
                        f"method '{spec.name}' needs one for every merged tensor: recompute them for this "
                        "model, or `exclude` the tensor"
                    )
            if GRAM in self.kinds and names and not any(src.has_gram(n) for n in names):
                held = src.gram_names()
                example = f" (it holds {len(held)}, e.g. '{held[0]}')" if held else " (it holds none)"
                raise StatisticsError(
                    f"the statistics of {who}{where} hold a Gram matrix for none of the merged tensors"
                    f"{example}; were they computed for this model?"
                )
            checked.append(src)
        self.sources = checked
        names = list(names)
        self.norms = [s.fisher_norm(names) if FISHER in self.kinds else None for s in checked]

    def tensor(self, name: str) -> tuple[TensorStats, ...]:
        """Each expert's statistics of tensor `name`, labelled with the recipe's task names."""
        return tuple(
            replace(s.tensor_stats(name, self.kinds, fisher_norm=norm), label=task)
            for s, norm, task in zip(self.sources, self.norms, self.task_names, strict=True)
        )

    def examples(self, kwargs: dict[str, Any], spec: MethodSpec, recipe: Recipe) -> None:
        """Where the recipe sets no `examples` for a model, its statistics' own count is the one expected
        (a `stats:` folder is used as it is); where it does, the method checks the count."""
        arg = spec.params["examples"].arg
        given = kwargs[arg] if isinstance(kwargs[arg], list) else [kwargs[arg]] * len(self.sources)
        kwargs[arg] = [
            v if recipe.entry_examples(i) is not None else s.examples
            for i, (v, s) in enumerate(zip(given, self.sources, strict=True))
        ]


def open_statistics(
    recipe: Recipe,
    spec: MethodSpec,
    stats: Sequence[Any] | None,
    compute: ComputeStats | None,
    names: Sequence[str],
) -> tuple[Sequence[Any] | None, list[Any]]:
    """(the sources to read, the ones opened here that the caller closes): `stats` as given, else the
    recipe's (`stats:` folders, `data:` through `compute` over `names`, the merged tensors); nothing for a
    method that reads none."""
    if not spec.statistics or stats is not None:
        return stats, []
    opened = recipe_statistics(recipe, spec, compute=compute, names=names)
    return opened, opened
