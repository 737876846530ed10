"""Fine-tune experts (one task), multitask models (several tasks) and head-only probes of an encoder.

One loop serves all three. Step ``s`` trains on a batch of task ``s % T`` (round robin over the T
tasks, so a multitask model takes ``config.steps * T`` steps: the sum of its experts' steps, each task
seeing exactly the batches its expert sees). Batches come from a seeded, stateless stream: batch ``k``
of a task is positions ``k*B .. k*B+B-1`` of the concatenation of per-epoch permutations, so resuming
needs only the step number. The loss is cross-entropy on the task's head (classify) or the in-batch
contrastive loss (retrieval, see `heads`). AdamW, linear warm-up then linear decay to 0, gradient
clipping; dropout as in the base's config.

Results are cached: the output folder's name holds a key over the base's weight bytes (sha256), the
tasks' training data (names, labels, every train example), their head specs and the TrainConfig. A
run checkpoints the model, heads, optimizer, scheduler, step, losses and torch RNG into
``CACHE/models/.work-KEY/`` every `checkpoint_seconds`; after an interrupt the next call resumes there
and ends with the same weights as an uninterrupted run. The output folder
``CACHE/models/{expert|multitask|pretrained}-TASKS-KEY`` appears atomically: ``model.safetensors``
(the body under the base checkpoint's names, tensors the encoder does not use copied from the base,
and ``head.{task}.weight/bias``), config and tokenizer files copied from the base, and ``train.json``
(key, config, losses, seconds).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import SefusionError
from .config import BUDGETS, Budget, TrainConfig, get_budget
from .encoder import Encoder, _check_base
from .heads import CLASSIFY, RETRIEVAL, classify_logits, contrastive_loss, head_kind, head_names, init_head

if TYPE_CHECKING:
    from ..tasks.base import TaskData, TaskSpec

__all__ = [
    "BUDGETS",
    "Budget",
    "TrainConfig",
    "TrainingStopped",
    "base_sha256",
    "finetune",
    "get_budget",
    "head_only",
    "read_train_info",
    "task_fingerprint",
]

FORMAT = 1  # bump when the training loop changes what a key produces
TRAIN_JSON = "train.json"
CHECKPOINT = "checkpoint.pt"


class TrainingStopped(SefusionError):
    """A run stopped on purpose before its last step (``max_steps_this_run``); its checkpoint resumes it."""


# --- keys ------------------------------------------------------------------------------------------
def base_sha256(base: str | Path) -> str:
    """sha256 of the base's weight files (memoized per process on their paths, sizes and mtimes)."""
    from ..io import open_model, weights_sha256

    with open_model(base) as r:
        return weights_sha256(r.weight_files())


def task_fingerprint(data: TaskData) -> str:
    """sha256 over the task name and every train example (text, text_pair, label): what training reads."""
    h = hashlib.sha256(data.task.encode())
    for ex in data.splits.get("train", []):
        h.update(json.dumps([ex.text, ex.text_pair, int(ex.label)], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _cache_key(
    base_sha: str, tasks: Sequence[TaskData], kinds: Sequence[str], specs: Sequence[Any], cfg: TrainConfig
) -> str:
    payload = {
        "format": FORMAT,
        "base_sha256": base_sha,
        "tasks": [
            {
                "task": d.task,
                "data": task_fingerprint(d),
                "head": k,
                "labels": _labels(d, s),
            }
            for d, k, s in zip(tasks, kinds, specs, strict=True)
        ],
        "config": cfg.to_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_train_info(folder: str | Path) -> dict[str, Any]:
    """The train.json of a model folder written by `finetune` / `head_only`."""
    p = Path(folder) / TRAIN_JSON
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise SefusionError(
            f"{folder} has no {TRAIN_JSON}; it was not written by sefusion's fine-tuning"
        ) from None
    except json.JSONDecodeError as exc:
        raise SefusionError(f"{p} is not valid JSON: {exc}") from None


def _cached(out: Path, key: str) -> bool:
    if not (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").is_file():
        return False
    try:
        return json.loads((out / TRAIN_JSON).read_text()).get("key") == key
    except (OSError, json.JSONDecodeError):
        return False


def _labels(data: Any, spec: Any) -> list[str]:
    """Class names: the built data's (they may depend on the corpus), else the spec's."""
    return [str(x) for x in (getattr(data, "labels", None) or getattr(spec, "labels", None) or [])]


def _n_labels(data: Any, spec: Any) -> int:
    return len(_labels(data, spec))


# --- data ------------------------------------------------------------------------------------------
def _stream_seed(seed: int, task: str, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{task}:{epoch}".encode()).digest()[:7], "little")


@dataclass
class _TaskRun:
    name: str
    kind: str
    items: list[dict[str, list[int]]]  # classify: text (+ pair); retrieval: queries
    cands: list[dict[str, list[int]]] | None  # retrieval: candidate code
    labels: Tensor | None
    n_labels: int
    _perms: dict[int, list[int]]

    def batch(self, k: int, size: int, seed: int) -> list[int]:
        """Indices of this task's k-th batch in the seeded epoch-permutation stream."""
        n = len(self.items)
        out = []
        for pos in range(k * size, k * size + size):
            epoch, i = divmod(pos, n)
            perm = self._perms.get(epoch)
            if perm is None:
                g = torch.Generator().manual_seed(_stream_seed(seed, self.name, epoch))
                perm = self._perms[epoch] = torch.randperm(n, generator=g).tolist()
                self._perms.pop(epoch - 2, None)
            out.append(perm[i])
        return out


def _prepare(enc: Encoder, data: TaskData, spec: Any, kind: str, cfg: TrainConfig) -> _TaskRun:
    train = list(data.splits.get("train", []))
    if not train:
        raise SefusionError(f"task '{data.task}' has no training examples (split 'train' is empty)")
    texts = [ex.text for ex in train]
    pairs = [ex.text_pair for ex in train]
    if kind == RETRIEVAL:
        if len(train) < 2:
            raise SefusionError(f"retrieval task '{data.task}' needs at least 2 training examples")
        missing = [i for i, p in enumerate(pairs) if p is None]
        if missing:
            raise SefusionError(f"retrieval task '{data.task}': train example {missing[0]} has no text_pair")
        return _TaskRun(
            data.task,
            kind,
            enc.tokenize(texts, max_length=cfg.max_length),
            enc.tokenize([str(p) for p in pairs], max_length=cfg.max_length),
            None,
            0,
            {},
        )
    n_labels = _n_labels(data, spec)
    labels = [int(ex.label) for ex in train]
    bad = [i for i, y in enumerate(labels) if not 0 <= y < n_labels]
    if bad:
        raise SefusionError(
            f"task '{data.task}': train example {bad[0]} has label {labels[bad[0]]}, outside 0..{n_labels - 1}"
        )
    has_pair = [p is not None for p in pairs]
    if any(has_pair) and not all(has_pair):
        raise SefusionError(f"task '{data.task}': some train examples have a text_pair and some do not")
    items = enc.tokenize(texts, [str(p) for p in pairs] if all(has_pair) else None, max_length=cfg.max_length)
    return _TaskRun(data.task, kind, items, None, torch.tensor(labels), n_labels, {})


# --- the loop --------------------------------------------------------------------------------------
def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a torn or foreign file: start over rather than fail
        return None
    return state if isinstance(state, dict) and state.get("key") == key else None


def _normalize_specs(tasks: Sequence[TaskData], specs: Any) -> list[Any]:
    if isinstance(specs, Mapping):
        missing = [d.task for d in tasks if d.task not in specs]
        if missing:
            raise SefusionError(
                f"no task spec for {', '.join(missing)} (specs given for: {', '.join(specs)})"
            )
        return [specs[d.task] for d in tasks]
    if not isinstance(specs, Sequence):
        specs = [specs]
    specs = list(specs)
    if len(specs) != len(tasks):
        raise SefusionError(f"{len(tasks)} tasks but {len(specs)} task specs")
    return specs


def finetune(
    base: str | Path,
    tasks: Sequence[TaskData] | TaskData,
    specs: Sequence[TaskSpec] | Mapping[str, TaskSpec] | TaskSpec,
    config: TrainConfig,
    cache: str | Path,
    quiet: bool = False,
    *,
    checkpoint_seconds: float = 60.0,
    max_steps_this_run: int | None = None,
    callback: Callable[[int, int, float], None] | None = None,
    device: str = "cpu",
) -> Path:
    """Fine-tune `base` on one task (an expert) or several (multitask, per-task heads); returns its folder.

    `config.steps` is per task: T tasks train for ``steps * T`` steps, round robin. A cached folder
    with the same key is returned at once; an interrupted run resumes from its last checkpoint
    (written every `checkpoint_seconds`, and when `max_steps_this_run` steps of this call are done,
    which then raises TrainingStopped). `callback(step, total, loss)` runs after every step.
    """
    base = _check_base(Path(base))
    task_list = [tasks] if not isinstance(tasks, Sequence) else list(tasks)
    if not task_list:
        raise SefusionError("finetune needs at least one task")
    names = [d.task for d in task_list]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SefusionError(f"task {dup[0]} is given more than once")
    spec_list = _normalize_specs(task_list, specs)
    kinds = [head_kind(s, d.task, _n_labels(d, s)) for d, s in zip(task_list, spec_list, strict=True)]
    if not config.train_body and all(k == RETRIEVAL for k in kinds):
        config = config.replace(steps=0)  # nothing trains: the frozen base is the model
    key = _cache_key(base_sha256(base), task_list, kinds, spec_list, config)
    cache = Path(cache) / "models"
    if not config.train_body:
        label = f"pretrained-{'+'.join(names)}"
    elif len(names) == 1:
        label = f"expert-{names[0]}"
    else:
        label = f"multitask-{'+'.join(names)}"
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", label)[:100]
    out = cache / f"{safe}-{key[:12]}"
    if _cached(out, key):
        return out
    if max_steps_this_run is not None and max_steps_this_run < 1:
        raise SefusionError(f"max_steps_this_run must be >= 1, got {max_steps_this_run}")
    return _train(
        base, task_list, spec_list, kinds, config, key, out, cache / f".work-{key[:16]}",
        quiet=quiet, checkpoint_seconds=checkpoint_seconds, max_steps_this_run=max_steps_this_run,
        callback=callback, device=device, label=label,
    )  # fmt: skip


def head_only(
    base: str | Path,
    task: TaskData,
    spec: TaskSpec,
    config: TrainConfig,
    cache: str | Path,
    quiet: bool = False,
) -> Path:
    """The `pretrained` row: the base body frozen, only the task's head trained (none for retrieval).

    The head's learning rate is ``config.head_lr``, or 1e-3 when it is None (what a linear probe needs).
    Without dropout the frozen body's embeddings are computed once and the head trains on them.
    """
    cfg = config.replace(train_body=False, head_lr=config.head_lr or 1e-3)
    return finetune(base, [task], [spec], cfg, cache, quiet)


def _seed_of(seed: int, task: str) -> int:
    return int.from_bytes(hashlib.sha256(f"head:{seed}:{task}".encode()).digest()[:7], "little")


@dataclass
class _Training:
    """One training run's state: the encoder, its heads, the task runs, the optimizer, the progress."""

    enc: Encoder
    runs: list[_TaskRun]
    heads: dict[str, torch.nn.Parameter]
    body: dict[str, Any]
    feats: dict[str, Any]
    groups: list[dict[str, Any]]
    opt: Any
    sched: Any
    total: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    start: int = 0
    resumed_from: list[int] = field(default_factory=list)


def _train(
    base: Path,
    tasks: list[Any],
    specs: list[Any],
    kinds: list[str],
    cfg: TrainConfig,
    key: str,
    out: Path,
    work: Path,
    *,
    quiet: bool,
    checkpoint_seconds: float,
    max_steps_this_run: int | None,
    callback: Callable[[int, int, float], None] | None,
    device: str,
    label: str,
) -> Path:
    """Set up, resume from a checkpoint if one matches `key`, run the steps, write the folder."""
    tr = _setup(base, tasks, specs, kinds, cfg, quiet=quiet, device=device)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / CHECKPOINT
    with torch.random.fork_rng(devices=[]):  # the caller's RNG is left as it was
        torch.manual_seed(cfg.seed)
        state = _load_checkpoint(ckpt_path, key) if tr.total else None
        if state is not None:
            _resume(tr, state)
        run_seconds = _run_steps(
            tr, cfg, key, ckpt_path, quiet=quiet, checkpoint_seconds=checkpoint_seconds,
            max_steps_this_run=max_steps_this_run, callback=callback, label=label,
        )  # fmt: skip
    tr.seconds += run_seconds
    final_body = {n: t for n, t in tr.enc.body_state().items()}
    final_heads = {n: p.detach().cpu() for n, p in tr.heads.items()}
    info = _train_info(tr, base, tasks, specs, kinds, cfg, key, label, run_seconds)
    _write_folder(base, tr.enc, final_body, final_heads, info, out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _setup(
    base: Path,
    tasks: list[Any],
    specs: list[Any],
    kinds: list[str],
    cfg: TrainConfig,
    *,
    quiet: bool,
    device: str,
) -> _Training:
    """The encoder, each classification task's head (own seed), frozen-body features when only heads
    train, and the optimizer."""
    enc = Encoder.from_pretrained(base, device=device)
    runs = [_prepare(enc, d, s, k, cfg) for d, s, k in zip(tasks, specs, kinds, strict=True)]
    heads: dict[str, torch.nn.Parameter] = {}
    for r in runs:
        if r.kind == CLASSIFY:
            init = init_head(r.name, enc.hidden_size, r.n_labels, seed=_seed_of(cfg.seed, r.name))
            heads.update({n: torch.nn.Parameter(t.to(enc.device)) for n, t in init.items()})
    body = dict(enc.body_parameters())
    if not cfg.train_body:
        for p in enc.model.parameters():
            p.requires_grad_(False)
        enc.model.eval()
        feats = {
            r.name: enc.encode_items(r.items, progress=None if quiet else f"embed {r.name}")
            for r in runs
            if r.kind == CLASSIFY
        }
    else:
        enc.model.train()
        feats = {}
    groups, opt, sched, total = _optimizer(body, heads, cfg, len(runs))
    return _Training(enc, runs, heads, body, feats, groups, opt, sched, total)


def _optimizer(
    body: Mapping[str, Any], heads: Mapping[str, Any], cfg: TrainConfig, n_runs: int
) -> tuple[list[dict[str, Any]], Any, Any, int]:
    """AdamW parameter groups (no weight decay on biases and LayerNorms; heads at head_lr), the
    optimizer, its warmup-then-linear schedule and the total number of steps (0: nothing trains)."""
    plain = [p for k, p in body.items() if k.endswith("bias") or "LayerNorm" in k or "layer_norm" in k]
    decay = [p for k, p in body.items() if not (k.endswith("bias") or "LayerNorm" in k or "layer_norm" in k)]
    head_lr = cfg.head_lr or cfg.lr
    groups: list[dict[str, Any]] = []
    if cfg.train_body:
        groups += [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": plain, "weight_decay": 0.0},
        ]
    head_w = [p for n, p in heads.items() if n.endswith(".weight")]
    head_b = [p for n, p in heads.items() if n.endswith(".bias")]
    if heads:
        groups += [
            {"params": head_w, "weight_decay": cfg.weight_decay, "lr": head_lr},
            {"params": head_b, "weight_decay": 0.0, "lr": head_lr},
        ]
    total = cfg.steps * n_runs if groups else 0
    warmup = int(cfg.warmup * total)
    opt = torch.optim.AdamW(groups, lr=cfg.lr) if groups else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warmup)) if opt else None
    return groups, opt, sched, total


def _resume(tr: _Training, state: dict[str, Any]) -> None:
    """Weights, optimizer, schedule, RNG and progress restored from a checkpoint."""
    with torch.no_grad():
        for k, t in state["body"].items():
            tr.body[k].copy_(t)
        for n, t in state["heads"].items():
            tr.heads[n].copy_(t)
    assert tr.opt is not None and tr.sched is not None
    tr.opt.load_state_dict(state["optimizer"])
    tr.sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    tr.start, tr.losses, tr.seconds = state["step"], list(state["losses"]), float(state["seconds"])
    tr.resumed_from = [*state["resumed_from"], tr.start]


def _checkpoint(tr: _Training, cfg: TrainConfig, key: str, path: Path, step: int, elapsed: float) -> None:
    assert tr.opt is not None and tr.sched is not None
    _save_checkpoint(
        path,
        {
            "key": key,
            "step": step,
            "body": {k: p.detach().clone() for k, p in tr.body.items()} if cfg.train_body else {},
            "heads": {n: p.detach().clone() for n, p in tr.heads.items()},
            "optimizer": tr.opt.state_dict(),
            "scheduler": tr.sched.state_dict(),
            "rng": torch.get_rng_state(),
            "losses": tr.losses,
            "seconds": tr.seconds + elapsed,
            "resumed_from": tr.resumed_from,
        },
    )


def _run_steps(
    tr: _Training,
    cfg: TrainConfig,
    key: str,
    ckpt_path: Path,
    *,
    quiet: bool,
    checkpoint_seconds: float,
    max_steps_this_run: int | None,
    callback: Callable[[int, int, float], None] | None,
    label: str,
) -> float:
    """The steps from tr.start to tr.total, checkpointed every `checkpoint_seconds` (and where a run
    stops early); the seconds this run took."""
    params = [p for g in tr.groups for p in g["params"]]
    t0 = time.perf_counter()
    last_ckpt = t0
    bar = _bar(tr, label, quiet)
    try:
        for step in range(tr.start, tr.total):
            _one_step(tr, cfg, step, params, label)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(tr.losses[-10:]) / len(tr.losses[-10:]):.3f}", refresh=False)
            if callback is not None:
                callback(step + 1, tr.total, tr.losses[-1])
            done = step + 1
            if done < tr.total:
                now = time.perf_counter()
                stop = max_steps_this_run is not None and done - tr.start >= max_steps_this_run
                if stop or now - last_ckpt >= checkpoint_seconds:
                    _checkpoint(tr, cfg, key, ckpt_path, done, time.perf_counter() - t0)
                    last_ckpt = time.perf_counter()
                if stop:
                    raise TrainingStopped(
                        f"training of {label} stopped after {done} of {tr.total} steps "
                        f"(max_steps_this_run={max_steps_this_run}); run again to resume from {ckpt_path}"
                    )
    finally:
        bar.close()
    return time.perf_counter() - t0


def _bar(tr: _Training, label: str, quiet: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=tr.total, initial=tr.start, desc=f"train {label}"[:60], unit="step",
        disable=quiet or tr.total == 0, dynamic_ncols=True, leave=False,
    )  # fmt: skip


def _one_step(tr: _Training, cfg: TrainConfig, step: int, params: list[Any], label: str) -> None:
    """One optimizer step on the batch of task step % T (tasks take turns); a non-finite loss stops."""
    r = tr.runs[step % len(tr.runs)]
    idx = r.batch(step // len(tr.runs), cfg.batch_size, cfg.seed)
    loss = _step_loss(tr.enc, r, idx, tr.heads, tr.feats, cfg)
    loss.backward()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise SefusionError(
            f"training of {label}: the loss is {value} at step {step + 1} (task {r.name}); try a lower lr "
            f"than {cfg.lr}"
        )
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    assert tr.opt is not None and tr.sched is not None
    tr.opt.step()
    tr.sched.step()
    tr.opt.zero_grad(set_to_none=True)
    tr.losses.append(value)


def _train_info(
    tr: _Training,
    base: Path,
    tasks: list[Any],
    specs: list[Any],
    kinds: list[str],
    cfg: TrainConfig,
    key: str,
    label: str,
    run_seconds: float,
) -> dict[str, Any]:
    """train.json: what was trained, on what, how, and how long."""
    return {
        "key": key,
        "format": FORMAT,
        "mode": label.split("-", 1)[0],
        "base": str(base),
        "base_sha256": base_sha256(base),
        "tasks": [
            {
                "task": d.task,
                "head": k,
                "labels": _labels(d, s),
                "data": task_fingerprint(d),
                "train_examples": len(d.splits.get("train", [])),
            }
            for d, s, k in zip(tasks, specs, kinds, strict=True)
        ],  # fmt: skip
        "config": cfg.to_dict(),
        "total_steps": tr.total,
        "losses": tr.losses,
        "loss_tasks": [tr.runs[s % len(tr.runs)].name for s in range(tr.total)],
        "seconds": round(tr.seconds, 3),
        "seconds_per_step_last_run": round(run_seconds / max(1, tr.total - tr.start), 4),
        "resumed_from": tr.resumed_from,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
    }


def _step_loss(
    enc: Encoder,
    r: _TaskRun,
    idx: list[int],
    heads: Mapping[str, Tensor],
    feats: Mapping[str, Tensor],
    cfg: TrainConfig,
) -> Tensor:
    # bf16: the body runs under autocast; the pooled embeddings, the head and the loss stay float32
    autocast = torch.autocast(enc.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    def pool(items: Sequence[Mapping[str, list[int]]]) -> Tensor:
        with autocast:
            out = enc.pool(enc.collate(items))
        return out.float()

    if r.kind == RETRIEVAL:
        assert r.cands is not None
        q = pool([r.items[i] for i in idx])
        c = pool([r.cands[i] for i in idx])
        return contrastive_loss(q, c, cfg.temperature)
    pooled = feats[r.name][idx].to(enc.device) if r.name in feats else pool([r.items[i] for i in idx])
    w_name, b_name = head_names(r.name)
    logits = classify_logits(pooled, heads[w_name], heads[b_name])
    assert r.labels is not None
    return torch.nn.functional.cross_entropy(logits, r.labels[idx].to(enc.device))


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


def _write_folder(
    base: Path,
    enc: Encoder,
    body: dict[str, Tensor],
    heads: dict[str, Tensor],
    info: dict[str, Any],
    out: Path,
) -> None:
    from ..io import ModelWriter, open_model

    with open_model(base) as reader, ModelWriter(out, overwrite=True, aux_from=base) as w:
        for name in reader.names():
            w.add(name, body[name] if name in body else reader.get(name))
        for name in sorted(heads):
            w.add(name, heads[name])
        assert w.tmp_path is not None
        (w.tmp_path / TRAIN_JSON).write_text(json.dumps(info, indent=1) + "\n")
        w.commit()


def budget_config(budget: str | Budget, **changes: Any) -> TrainConfig:
    """The TrainConfig of a budget by name (``quick`` / ``full``) or object, with `changes` applied."""
    b = get_budget(budget) if isinstance(budget, str) else budget
    return b.train(**changes)
