"""Fine-tuning causal LMs on (prompt, target) pairs: LoRA, QLoRA or full, single- or multi-task.

The loss is the mean cross-entropy over target tokens only (prompt and padding positions are masked),
and the vocabulary head runs only at the positions that predict a target token: on a 150k-260k entry
vocabulary the head over every position is a large share of a step. Micro-batches are padded to their
longest item and run under bf16 autocast by default; gradients accumulate to the batch, each micro-batch
weighted by its share of the batch's target tokens, so the result does not depend on `micro_batch`.

A run checkpoints into its cache folder and resumes from it; the output folder (a PEFT adapter, or a
full model) is written to a temporary folder renamed when complete, with `sefusion-train.json` beside
the weights: base sha256, configuration, data, hardware, precision and library versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError, SefusionError
from ..io.lora import TRAIN_RECORD, check_adapter_base

log = logging.getLogger("sefusion")

__all__ = [
    "META_FILE",
    "CausalTrainConfig",
    "Pair",
    "check_adapter_base",
    "encode_pair",
    "hardware_info",
    "mix_schedule",
    "target_loss",
    "train_causal",
]

Pair = tuple[str, str]
MODES = ("lora", "qlora", "full")
META_FILE = TRAIN_RECORD  # the run record beside the adapter (io checks its base_sha256)
IGNORE = -100


@dataclass(frozen=True)
class CausalTrainConfig:
    """How one causal model is fine-tuned. `steps` counts optimizer steps per task: a multi-task run on T
    tasks takes `steps * T` steps, the sum of its single-task runs, over the same examples mixed."""

    mode: str = "lora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"  # every linear projection (not the vocabulary head)
    lr: float | None = None  # None: 2e-4 for (Q)LoRA, 2e-5 for full fine-tuning
    steps: int = 100
    batch: int = 8
    micro_batch: int = 4
    max_len: int = 512
    precision: str = "bf16"  # "bf16": forward/backward under autocast (weights, optimizer in fp32)
    seed: int = 0
    warmup: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    chat: bool = False  # wrap prompts in the tokenizer's chat template (as generate(chat=True) does)
    head_at_targets: bool = True  # False: the vocabulary head over every position (for benchmarks)
    gradient_checkpointing: bool = False
    save_every: int = 25  # steps between resumable checkpoints

    def __post_init__(self) -> None:
        checks = [
            (self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got '{self.mode}'"),
            (self.precision in ("fp32", "bf16"), f"precision must be fp32 or bf16, got '{self.precision}'"),
            (
                self.r >= 1 and self.alpha > 0,
                f"r must be >= 1 and alpha > 0, got r={self.r} alpha={self.alpha}",
            ),
            (self.steps >= 0, f"steps must be >= 0, got {self.steps}"),
            (
                1 <= self.micro_batch <= self.batch,
                f"need 1 <= micro_batch <= batch, got {self.micro_batch}, {self.batch}",
            ),
            (self.max_len >= 8, f"max_len must be >= 8, got {self.max_len}"),
            (self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.warmup < 1, f"warmup must be in [0, 1), got {self.warmup}"),
            (self.save_every >= 1, f"save_every must be >= 1, got {self.save_every}"),
        ]
        for ok, what in checks:
            if not ok:
                raise SefusionError(f"CausalTrainConfig: {what}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-5 if self.mode == "full" else 2e-4)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["learning_rate"] = self.learning_rate
        return d


# ---------------------------------------------------------------- data


def encode_pair(
    tokenizer: Any, prompt: str, target: str, max_len: int, chat: bool = False
) -> tuple[list[int], int]:
    """(token ids, number of prompt tokens): the prompt as generation sees it, then the target and EOS.

    Too long a pair keeps the prompt's end (the signature sits there) and at least half of `max_len` for
    the target.
    """
    from .causal import _encode_prompts

    p = _encode_prompts(tokenizer, [prompt], chat)[0]
    t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    t = t[: max(max_len - len(p), max_len // 2)]
    p = p[len(p) - (max_len - len(t)) :] if len(p) + len(t) > max_len else p
    return p + t, len(p)


def _task_stream(n: int, count: int, seed: int) -> list[int]:
    """`count` example indices of a task of `n`: successive seeded permutations (epochs)."""
    import torch

    out: list[int] = []
    epoch = 0
    while len(out) < count:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out += torch.randperm(n, generator=g).tolist()
        epoch += 1
    return out[:count]


def mix_schedule(sizes: Mapping[str, int], steps: int, batch: int, seed: int) -> list[list[tuple[str, int]]]:
    """Batches of (task, example index) for `steps` steps per task.

    One task: its seeded stream in order. Several: each task contributes exactly the examples its own
    single-task run would see (steps * batch), shuffled together into steps * T batches.
    """
    import torch

    items = [(task, i) for task, n in sizes.items() for i in _task_stream(n, steps * batch, seed)]
    if len(sizes) > 1:
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
        items = [items[j] for j in perm]
    return [items[k : k + batch] for k in range(0, len(items), batch)]


def _as_tasks(data: Sequence[Pair] | Mapping[str, Sequence[Pair]]) -> dict[str, list[Pair]]:
    tasks = {str(k): list(v) for k, v in data.items()} if isinstance(data, Mapping) else {"task": list(data)}
    for name, pairs in tasks.items():
        if not pairs:
            raise SefusionError(f"task '{name}' has no training pairs")
        bad = next(
            (i for i, p in enumerate(pairs) if len(p) != 2 or not all(isinstance(x, str) for x in p)), None
        )
        if bad is not None:
            raise SefusionError(f"task '{name}': pair {bad} is not (prompt: str, target: str)")
    return tasks


def pairs_fingerprint(tasks: Mapping[str, Sequence[Pair]]) -> str:
    """The sha256 of {task: (prompt, target) pairs}: what names a run's (or a statistics pass's) data."""
    h = hashlib.sha256()
    for name in sorted(tasks):
        h.update(name.encode() + b"\x00")
        for p, t in tasks[name]:
            h.update(json.dumps([p, t], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def collate(encoded: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, Any]:
    """Right-padded input_ids, attention_mask and labels (-100 on prompt and padding) for one micro-batch."""
    import torch

    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    for row, (seq, n_prompt) in enumerate(encoded):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------- loss


def _head_logits(model: Any, hidden: Any) -> Any:
    """The vocabulary head on `hidden`, with the final soft-capping some models (Gemma 2) apply."""
    import torch

    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def target_loss(model: Any, batch: Mapping[str, Any], *, head_at_targets: bool = True) -> tuple[Any, int]:
    """(sum of cross-entropy over target tokens, number of target tokens) for one micro-batch.

    With `head_at_targets`, the decoder's hidden states are gathered at the positions that predict a
    target token and only those rows go through the vocabulary head; otherwise the head runs everywhere
    (what `model(labels=...)` does). Both give the same value and gradients.
    """
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    nxt = labels[:, 1:]  # position t predicts token t+1
    keep = nxt != IGNORE
    n = int(keep.sum())
    if head_at_targets:
        core = model.get_decoder()
        hidden = core(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)[
            0
        ]
        logits = _head_logits(model, hidden[:, :-1][keep])
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = out.logits[:, :-1][keep]
    # in float32 at least: bf16 log-softmax over 150k entries loses the small probabilities
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits, nxt[keep], reduction="sum")
    return loss, n


# ---------------------------------------------------------------- model setup


def _unwrap(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (whose LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _check_qlora(device: str) -> Any:
    """A BitsAndBytesConfig for NF4, or one clear error where bitsandbytes cannot run."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SefusionError(
            "QLoRA needs bitsandbytes, which is not installed (pip install bitsandbytes; it quantizes on CUDA, "
            "and on the CPU only where its CPU backend supports 4-bit); use --mode lora or full"
        ) from None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if device != "cpu" else torch.float32,
    )


def _build_model(base: Path, cfg: CausalTrainConfig, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if cfg.mode == "qlora":
        kwargs["quantization_config"] = _check_qlora(device)
        kwargs["device_map"] = {"": device}
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except (RuntimeError, ValueError, ImportError) as exc:
        if cfg.mode != "qlora":
            raise
        raise SefusionError(f"QLoRA: bitsandbytes cannot quantize the base on {device}: {exc}") from None
    if cfg.mode != "qlora":
        model = model.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.mode == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.mode == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        task_type="CAUSAL_LM",
        target_modules=list(cfg.target_modules)
        if isinstance(cfg.target_modules, tuple)
        else cfg.target_modules,
    )
    return get_peft_model(model, lora)


def _optimizer(model: Any, cfg: CausalTrainConfig, total: int) -> tuple[Any, Any]:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup * total))

    def factor(step: int) -> float:  # linear warm-up, then linear decay to 0
        return (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _train_step(model: Any, micro: Sequence[dict[str, Any]], cfg: CausalTrainConfig, device: str) -> float:
    """One optimizer step's gradients over its micro-batches: the batch's mean target-token loss."""
    import torch

    core = _unwrap(model)
    total = sum(int((m["labels"][:, 1:] != IGNORE).sum()) for m in micro)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    value = 0.0
    for m in micro:
        m = {k: v.to(device) for k, v in m.items()}
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=cfg.precision == "bf16"):
            loss, _ = target_loss(core, m, head_at_targets=cfg.head_at_targets)
        (loss / max(total, 1)).backward()
        value += float(loss.detach()) / max(total, 1)
    return value


def _micro_batches(
    batch: Sequence[tuple[str, int]],
    encoded: Mapping[str, Sequence[tuple[list[int], int]]],
    cfg: CausalTrainConfig,
    pad_id: int,
) -> list[dict[str, Any]]:
    items = [encoded[t][i] for t, i in batch]
    return [collate(items[k : k + cfg.micro_batch], pad_id) for k in range(0, len(items), cfg.micro_batch)]


def train_causal(
    base: str | Path,
    data: Sequence[Pair] | Mapping[str, Sequence[Pair]],
    config: CausalTrainConfig,
    out: str | Path,
    *,
    cache: Path | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Fine-tune `base` on `data` (a list of pairs, or {task: pairs} for a multi-task run); write `out`.

    `out` becomes a PEFT adapter folder (lora, qlora) or a full model folder (full), with its tokenizer
    and `sefusion-train.json`. Checkpoints go to `cache` (default: `<out>.ckpt` beside it) every
    `save_every` steps; a run started again with the same inputs resumes from there.
    """
    import torch

    from .causal import check_causal_folder, load_tokenizer, offline_base_name, pick_device
    from .encoder import configure_threads
    from .train import base_sha256

    base, out = Path(base), Path(out)
    check_causal_folder(base)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {out} exists (pass --overwrite to replace it)")
    tasks = _as_tasks(data)
    configure_threads()
    device = pick_device(device)
    torch.manual_seed(config.seed)
    tok = load_tokenizer(base)
    sizes = {k: len(v) for k, v in tasks.items()}
    run = {
        "base_sha256": base_sha256(base),
        "config": config.to_json(),
        "data_sha256": pairs_fingerprint(tasks),
        "tasks": sizes,
    }
    encoded = {
        k: [encode_pair(tok, p, t, config.max_len, config.chat) for p, t in v] for k, v in tasks.items()
    }
    schedule = mix_schedule(sizes, config.steps, config.batch, config.seed)
    model = _build_model(base, config, device)
    model.train()
    opt, sched = _optimizer(model, config, len(schedule))
    ckpt = Path(cache) if cache else out.with_name(out.name + ".ckpt")
    start, losses = _resume(ckpt, run, model, opt, sched)
    t0 = time.time()
    _loop(
        model,
        opt,
        sched,
        schedule,
        encoded,
        config,
        device,
        tok.pad_token_id,
        start,
        losses,
        ckpt,
        run,
        progress,
    )
    meta = {
        **run,
        "base": str(base),
        "base_name": offline_base_name(base),
        "mode": config.mode,
        "steps": len(schedule),
        "losses": losses,
        "train_seconds": round(time.time() - t0, 1),
        "resumed_at_step": start,
        "device": device,
        "precision": config.precision,
        "hardware": hardware_info(device),
        "versions": versions(),
    }
    _save(model, tok, meta, out, overwrite)
    shutil.rmtree(ckpt, ignore_errors=True)
    return out


def _loop(
    model: Any,
    opt: Any,
    sched: Any,
    schedule: Sequence[Any],
    encoded: Any,
    cfg: CausalTrainConfig,
    device: str,
    pad_id: int,
    start: int,
    losses: list[float],
    ckpt: Path,
    run: Mapping[str, Any],
    progress: bool,
) -> None:
    import torch
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(
        total=len(schedule), initial=start, desc=f"train {cfg.mode}", disable=not progress, unit="step"
    )
    for step in range(start, len(schedule)):
        opt.zero_grad(set_to_none=True)
        loss = _train_step(model, _micro_batches(schedule[step], encoded, cfg, pad_id), cfg, device)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(round(loss, 5))
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)
        if (step + 1) % cfg.save_every == 0 and step + 1 < len(schedule):
            _checkpoint(ckpt, run, model, opt, sched, step + 1, losses)
    bar.close()


# ---------------------------------------------------------------- checkpoints and output


def _trainable_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _checkpoint(
    ckpt: Path, run: Mapping[str, Any], model: Any, opt: Any, sched: Any, step: int, losses: list[float]
) -> None:
    """Trainable weights, optimizer, schedule and RNG state after `step` steps, replaced atomically."""
    import torch

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {
        "weights": _trainable_state(model),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": torch.get_rng_state(),
        "step": step,
        "losses": losses,
    }
    torch.save(state, tmp / "state.pt")
    (tmp / "run.json").write_text(json.dumps(run, sort_keys=True))
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)


def _resume(ckpt: Path, run: Mapping[str, Any], model: Any, opt: Any, sched: Any) -> tuple[int, list[float]]:
    """(first step to run, losses so far): from the checkpoint if it belongs to this same run."""
    import torch

    if not (ckpt / "state.pt").is_file():
        return 0, []
    if json.loads((ckpt / "run.json").read_text()) != json.loads(json.dumps(run, sort_keys=True)):
        log.warning(
            "checkpoint %s is from another run (base, data or configuration differ): starting over", ckpt
        )
        return 0, []
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["weights"].items():
            params[name].copy_(value)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    log.info("resuming from %s at step %d", ckpt, state["step"])
    return int(state["step"]), list(state["losses"])


def _save(model: Any, tok: Any, meta: Mapping[str, Any], out: Path, overwrite: bool) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "peft_config"):
        model.peft_config["default"].base_model_name_or_path = str(meta["base"])
    model.save_pretrained(tmp, safe_serialization=True)
    tok.padding_side = "right"  # what training used; load_causal sets left padding for generation
    tok.save_pretrained(tmp)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    if out.exists() and overwrite:
        shutil.rmtree(out)
    tmp.rename(out)


def cpu_kind() -> dict[str, str]:
    """The CPU's model name and the instruction sets torch's kernels choose by ("cpu", "cpu_isa"): greedy
    bf16 generation on another kind of CPU rounds apart and may pick other tokens."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    isa = [torch.backends.cpu.get_cpu_capability()]
    for name, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx", "_is_amx_tile_supported")):
        has = getattr(torch.cpu, probe, None)  # private, and named otherwise before torch 2.5
        if has is not None and has():
            isa.append(name)
    return {"cpu": cpu, "cpu_isa": " ".join(isa)}


def hardware_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores, memory and the CUDA device, for the record of a run."""
    import torch

    info: dict[str, Any] = {
        **cpu_kind(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    with contextlib.suppress(ValueError, OSError, AttributeError):  # sysconf names are POSIX-only
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("sefusion", "torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out
