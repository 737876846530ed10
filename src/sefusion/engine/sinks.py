"""Where merged tensors go, behind one interface: `write(name, start, stop, result)` for each chunk of a
merged tensor, `done(name)` when it is complete, `copies()` for the tensors copied as they are, and
`commit()` once everything is written. A model folder, a bundle folder, or a dict in memory."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .._lazy import torch
from .._version import __version__
from ..errors import SefusionError
from ..recipe import Recipe
from ..registry import MethodSpec
from .plan import Plan, target_dtype

if TYPE_CHECKING:
    from torch import Tensor

    from ..io import ModelReader
    from .stream import Streamer

log = logging.getLogger("sefusion")

# (reader, tensor name, output dtype, write(start, chunk)) of a tensor copied chunk by chunk
Copy = tuple["ModelReader", str, Any, Callable[[int, "Tensor"], None]]


class Sink(Protocol):
    def write(self, name: str, start: int, stop: int, result: Any) -> None: ...
    def done(self, name: str) -> None: ...
    def copies(self) -> list[Copy]: ...
    def commit(self) -> None: ...


def model_card(recipe: Recipe, spec: MethodSpec, extra: str = "") -> str:
    return (
        "---\nlibrary_name: transformers\ntags: [sefusion, merge]\n---\n"
        f"# Merged with sefusion {__version__}\n\n"
        f"Method: `{spec.name}` ({spec.paper}). Tasks: {', '.join(recipe.task_names)}.\n\n"
        f"{extra}"
        "## Recipe\n\n```yaml\n" + recipe.to_yaml() + "```\n"
    )


class ModelSink:
    """A model folder: merged tensors cast to their output dtype, the rest copied from the base."""

    def __init__(self, writer: Any, recipe: Recipe, plan: Plan, streamer: Streamer) -> None:
        self.w, self.recipe, self.plan, self.s = writer, recipe, plan, streamer

    @staticmethod
    def open(
        out: Path,
        recipe: Recipe,
        spec: MethodSpec,
        plan: Plan,
        streamer: Streamer,
        size: int,
        overwrite: bool,
    ) -> Any:
        """The ModelWriter of OUT, laid out for every tensor of the reference model."""
        from ..io import ModelWriter

        ref = streamer.ref
        only_in_experts = [n for n in plan.per_task if n not in ref]
        if only_in_experts:
            log.warning(
                "excluded tensors held only by the experts are left out of the merged model (a bundle "
                "method keeps them per task): %s",
                ", ".join(only_in_experts[:8]) + (" ..." if len(only_in_experts) > 8 else ""),
            )
        layout = sorted(
            (name, ref.shape(name), target_dtype(recipe, ref.dtype(name)))
            for name in plan.merged + plan.from_base
        )
        card = model_card(recipe, spec)
        return ModelWriter(
            out, overwrite=overwrite, shard_size=size, aux_from=ref, model_card=card, layout=layout,
            allow_nonfinite=streamer.allow_nonfinite,
        )  # fmt: skip

    def write(self, name: str, start: int, stop: int, result: Any) -> None:
        dtype = target_dtype(self.recipe, self.s.ref.dtype(name))
        cast = self.s.scratch.get("out", stop - start, dtype, self.s.chunk)
        self.w.write_range(name, start, cast.copy_(result.reshape(-1)))

    def done(self, name: str) -> None:
        pass

    def copies(self) -> list[Copy]:
        ref = self.s.ref
        return [
            (ref, n, target_dtype(self.recipe, ref.dtype(n)), partial(self.w.write_range, n))
            for n in self.plan.from_base
        ]

    def commit(self) -> None:
        self.w.commit()


class BundleSink:
    """A bundle folder: each merged tensor's vector, its task masks packed 8 per byte and its scales;
    each task's own copy of the per-task tensors; bundle.json (sefusion.bundle holds the format)."""

    def __init__(
        self,
        writer: Any,
        recipe: Recipe,
        spec: MethodSpec,
        kwargs: Mapping[str, Any],
        plan: Plan,
        streamer: Streamer,
    ) -> None:
        self.w, self.recipe, self.spec, self.kwargs, self.plan, self.s = (
            writer,
            recipe,
            spec,
            kwargs,
            plan,
            streamer,
        )
        self.n_tasks = len(recipe.task_names)
        self.scales: dict[str, list[float]] = {}

    @staticmethod
    def open(
        out: Path,
        recipe: Recipe,
        spec: MethodSpec,
        plan: Plan,
        streamer: Streamer,
        size: int,
        overwrite: bool,
    ) -> Any:
        from .. import bundle
        from ..io import ModelWriter

        if streamer.base is None:
            raise SefusionError(f"bundle method '{spec.name}' needs a base model")
        dtype_of = partial(target_dtype, recipe)
        layout = bundle.layout(plan, recipe, streamer.base, streamer.experts, dtype_of)
        card = bundle.card(out, recipe, spec)
        return ModelWriter(
            out, overwrite=overwrite, shard_size=size, model_card=card, layout=layout,
            allow_nonfinite=streamer.allow_nonfinite,
        )  # fmt: skip

    def write(self, name: str, start: int, stop: int, result: Any) -> None:
        import numpy as np

        w, n_tasks = self.w, self.n_tasks
        row_bytes = (math.prod(self.s.ref.shape(name)) + 7) // 8
        w.write_range(f"vector/{name}", start, result.vector.reshape(-1).float().cpu())
        # chunk starts are multiples of 8: each task's bits are whole bytes of its packed row
        bits = result.masks.reshape(n_tasks, -1).cpu().numpy()
        packed = torch.from_numpy(np.packbits(bits, axis=1, bitorder="little"))
        for t in range(n_tasks):
            w.write_range(f"masks/{name}", t * row_bytes + start // 8, packed[t])
        if result.scales is not None:  # kept as floats: a small tensor held on would pin the C heap
            self.scales[name] = result.scales.tolist()

    def done(self, name: str) -> None:
        # TALL-Masks stores s_t = 1 so that every bundle has one format
        scales = self.scales.pop(name, None) or [1.0] * self.n_tasks
        self.w.add(f"scales/{name}", torch.tensor(scales, dtype=torch.float32))

    def copies(self) -> list[Copy]:
        out: list[Copy] = []
        for task, ex in zip(self.recipe.task_names, self.s.experts, strict=True):
            for name in self.plan.per_task:
                key = f"tasks/{task}/{name}"
                out.append(
                    (ex, name, target_dtype(self.recipe, ex.dtype(name)), partial(self.w.write_range, key))
                )
        return out

    def commit(self) -> None:
        from .. import bundle

        base = self.s.base
        assert base is not None  # checked by open()
        dtype_of = partial(target_dtype, self.recipe)
        bundle.finish(
            self.w.tmp_path, self.recipe, self.spec, self.kwargs, self.plan, base, self.s.experts, dtype_of
        )
        self.w.commit()


class MemorySink:
    """A dict in memory: {name: tensor} in the experts' dtype, or {name: BundleTensor} for a bundle method."""

    def __init__(
        self, spec: MethodSpec, experts: Sequence[Mapping[str, Tensor]], names: Sequence[str]
    ) -> None:
        self.bundle = spec.kind == "bundle"
        self.count = len(experts)
        self.shapes = {k: tuple(experts[0][k].shape) for k in names}
        self.out: dict[str, Any] = {}
        for k in names:
            n = math.prod(self.shapes[k])
            if self.bundle:
                self.out[k] = [
                    torch.empty(n, dtype=torch.float32),
                    torch.empty((self.count, n), dtype=torch.bool),
                    None,
                ]
            else:
                self.out[k] = torch.empty(n, dtype=experts[0][k].dtype)

    def write(self, name: str, start: int, stop: int, result: Any) -> None:
        if not self.bundle:
            self.out[name][start:stop] = result.reshape(-1)
            return
        vector, masks, _ = self.out[name]
        vector[start:stop] = result.vector.reshape(-1)
        masks[:, start:stop] = result.masks.reshape(self.count, -1)
        self.out[name][2] = result.scales

    def done(self, name: str) -> None:
        from ..methods import BundleTensor

        shape = self.shapes[name]
        if self.bundle:
            vector, masks, scales = self.out[name]
            self.out[name] = BundleTensor(vector.reshape(shape), masks.reshape(self.count, *shape), scales)
        else:
            self.out[name] = self.out[name].reshape(shape)

    def copies(self) -> list[Copy]:
        return []

    def commit(self) -> None:
        pass
