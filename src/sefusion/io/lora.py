"""A PEFT LoRA adapter seen as a full model: base weights with ΔW = scale·B·A added on read.

LoRA (Hu et al. 2021, arXiv 2106.09685): W' = W + (α/r)·B·A, A: (r, in), B: (out, r); rsLoRA
(Kalajdzievski 2023, arXiv 2312.03732) uses α/√r. Embedding layers store A: (r, vocab),
B: (dim, r) and ΔW = scale·(B·A)ᵀ; `fan_in_fan_out` layers (GPT-2's Conv1D) store Wᵀ, so ΔWᵀ is added.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .reader import ADAPTER_CONFIG, BinReader, ModelReader, SafetensorsReader, find_aux_files, open_model
from .util import weights_sha256

_PEFT_PREFIX = "base_model.model."
_LINEAR = ("lora_A", "lora_B")
_EMBED = ("lora_embedding_A", "lora_embedding_B")
# Config switches whose adapters do not merge as W + scale·B·A.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "use_bdlora",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}

# sefusion train's run record beside what it trained; `base_sha256` there is the base's weights_sha256
TRAIN_RECORD = "sefusion-train.json"


def adapter_sha256(folder: str | Path) -> str:
    """The sha256 of an adapter folder's weight files (adapter_model.*): what names a trained expert."""
    return weights_sha256(sorted(Path(folder).glob("adapter_model.*")))


def train_record(adapter: str | Path) -> dict[str, Any]:
    """The run record `sefusion train` left beside `adapter` ({} for an adapter trained elsewhere)."""
    record = Path(adapter) / TRAIN_RECORD
    if not record.is_file():
        return {}
    try:
        doc = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {record}: {exc}") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"cannot read {record}: not a JSON object")
    return doc


def check_adapter_base(adapter: str | Path, base: str | Path | ModelReader) -> None:
    """Raise if `adapter` records a base whose weights (sha256) differ from `base`'s; an adapter trained
    elsewhere records no base hash and passes."""
    want = train_record(adapter).get("base_sha256")
    if not want:
        return
    where = base.path if isinstance(base, ModelReader) else base
    if isinstance(base, ModelReader):
        have = weights_sha256(base.weight_files())
    else:
        with open_model(base) as reader:
            have = weights_sha256(reader.weight_files())
    if want != have:
        raise CheckpointError(
            f"adapter {adapter} was trained on another base (sha256 {str(want)[:16]}...), not on {where} "
            f"(sha256 {have[:16]}...)"
        )


@dataclass(frozen=True)
class _Delta:
    """What to add to one base tensor: scale·B·A (kind linear/embedding) or scale·b (kind bias)."""

    kind: str  # "linear" | "embedding" | "bias"
    a: str | None  # adapter key of A (None for bias)
    b: str  # adapter key of B (or of lora_B's bias)
    scale: float
    transpose: bool


def _is_rank(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_patterns(f: Path, key: str, patterns: Any, valid: Any, what: str) -> None:
    """`rank_pattern` / `alpha_pattern`: {module regex: value}, or absent."""
    if not patterns:
        return
    if not isinstance(patterns, dict) or not all(valid(v) for v in patterns.values()):
        raise CheckpointError(f"{f}: '{key}' must map module patterns to {what}, got {patterns!r}")
    for k in patterns:
        try:
            re.compile(k)
        except (re.error, RecursionError, OverflowError):
            raise CheckpointError(f"{f}: '{key}' has an invalid pattern {k!r}") from None


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # peft's rule (utils/other.py get_pattern_key): the first key k with re.match(rf"(.*\.)?({k})$", module).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraReader(ModelReader):
    """The base model's tensors, with every adapted weight replaced by W + ΔW (computed in float32, cast
    back to W's dtype) and every full tensor the adapter saved (`modules_to_save`, trained biases)
    replacing the base's, or added when the base has no such tensor (a task head)."""

    kind = "lora"

    def __init__(self, path: Path, base: ModelReader) -> None:
        self.path = Path(path)
        self.base = base
        cfg = self._read_config(self.path / ADAPTER_CONFIG)
        check_adapter_base(self.path, base)
        self._cfg = cfg
        st, pt = self.path / "adapter_model.safetensors", self.path / "adapter_model.bin"
        if st.is_file():
            self._adapter: ModelReader = SafetensorsReader(self.path, [st])
        elif pt.is_file():
            self._adapter = BinReader(self.path, [pt])
        else:
            raise CheckpointError(
                f"LoRA adapter {self.path} has no adapter_model.safetensors or adapter_model.bin"
            )
        self._suffixes: dict[str, list[str]] = {}
        for name in base.names():
            parts = name.split(".")
            for i in range(1, len(parts)):
                self._suffixes.setdefault(".".join(parts[i:]), []).append(name)
        self._deltas: dict[str, _Delta] = {}
        self._full: dict[str, str] = {}  # our tensor name -> adapter key
        self._build()
        self._names = sorted(set(base.names()) | set(self._full))

    # -- config and key parsing ------------------------------------------------------------------

    def _read_config(self, f: Path) -> dict[str, Any]:
        try:
            cfg = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointError(f"cannot read {f}: {exc}") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{f} is not a JSON object")
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise CheckpointError(f"{self.path} is a {peft_type} adapter; only LoRA adapters are supported")
        for key, label in _UNSUPPORTED.items():
            if cfg.get(key):
                raise CheckpointError(f"LoRA adapter {self.path} uses {label}, which is not supported")
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if not _is_rank(r) or not _is_number(alpha):
            raise CheckpointError(
                f"{f} needs a positive integer 'r' and a number 'lora_alpha' (got {r!r}, {alpha!r})"
            )
        for key, valid, what in (
            ("rank_pattern", _is_rank, "positive integers"),
            ("alpha_pattern", _is_number, "numbers"),
        ):
            _check_patterns(f, key, cfg.get(key), valid, what)
        return cfg

    def _scale(self, module: str, rank: int, key: str) -> float:
        cfg = self._cfg
        r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        if r != rank:
            raise CheckpointError(
                f"adapter key '{key}' in {self.path} has rank {rank} but adapter_config.json says r={r}"
            )
        return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

    def _resolve(self, name: str, key: str) -> str | None:
        """The base tensor an adapter-side name refers to: exact, else a unique match on a dotted suffix
        (the adapter and the base may differ by a wrapper prefix such as `bert.`)."""
        if name in self.base:
            return name
        parts = name.split(".")
        found = set(self._suffixes.get(name, []))  # base names = <prefix>.<name>
        found |= {s for s in (".".join(parts[i:]) for i in range(1, len(parts))) if s in self.base}
        if len(found) > 1:
            raise CheckpointError(
                f"adapter key '{key}' in {self.path} matches several tensors of the base "
                f"({self.base.path}): {', '.join(sorted(found))}"
            )
        return found.pop() if found else None

    def _build(self) -> None:
        ad = self._adapter
        modules: dict[tuple[str, str], dict[str, str]] = {}  # (module, linear|embedding) -> part -> key
        adapter_names: set[str] = set()
        for key in ad.names():
            parts = key.removeprefix(_PEFT_PREFIX).split(".")
            lora_at = next((i for i, p in enumerate(parts) if p.startswith("lora_")), None)
            if lora_at is None:
                self._add_full(key, parts)
                continue
            module, part, rest = ".".join(parts[:lora_at]), parts[lora_at], parts[lora_at + 1 :]
            if part in _LINEAR and rest and rest[-1] in ("weight", "bias") and len(rest) <= 2:
                adapter_names.update(rest[:-1])
                slot = part if rest[-1] == "weight" else "lora_B.bias"
                if part == "lora_A" and rest[-1] == "bias":
                    raise CheckpointError(f"adapter key '{key}' in {self.path}: lora_A has no bias in LoRA")
                modules.setdefault((module, "linear"), {})[slot] = key
            elif part in _EMBED and len(rest) <= 1:
                adapter_names.update(rest)
                modules.setdefault((module, "embedding"), {})[part.replace("_embedding", "")] = key
            else:
                raise CheckpointError(
                    f"adapter key '{key}' in {self.path} is not a LoRA A/B weight "
                    f"({part}); this adapter type is not supported"
                )
        if len(adapter_names) > 1:
            raise CheckpointError(
                f"{self.path} holds several adapters ({', '.join(sorted(adapter_names))}); save one per folder"
            )
        fan_in_fan_out = bool(self._cfg.get("fan_in_fan_out"))
        for (module, kind), slots in sorted(modules.items()):
            if "lora_A" not in slots or "lora_B" not in slots:
                have = next(iter(slots.values()))
                raise CheckpointError(
                    f"adapter {self.path} has '{have}' but not its "
                    f"{'lora_B' if 'lora_A' in slots else 'lora_A'} partner"
                )
            a, b = slots["lora_A"], slots["lora_B"]
            sa, sb = ad.shape(a), ad.shape(b)
            if len(sa) != 2 or len(sb) != 2:
                raise CheckpointError(
                    f"adapter key '{a}' in {self.path} has shape {sa}: only 2-D LoRA (linear, embedding) is "
                    "supported, not convolution LoRA"
                )
            if sa[0] != sb[1]:
                raise CheckpointError(f"adapter {self.path}: '{a}' {sa} and '{b}' {sb} do not multiply")
            scale = self._scale(module, sa[0], a)
            transpose = kind == "embedding" or fan_in_fan_out
            delta_shape = (sa[1], sb[0]) if transpose else (sb[0], sa[1])
            target = self._target(module + ".weight", a)
            if tuple(self.base.shape(target)) != delta_shape:
                raise CheckpointError(
                    f"adapter key '{a}' in {self.path} gives a {delta_shape} update but base tensor "
                    f"'{target}' ({self.base.file_of(target)}) has shape {tuple(self.base.shape(target))}"
                )
            self._put_delta(target, _Delta(kind, a, b, scale, transpose), a)
            if "lora_B.bias" in slots:
                bkey = slots["lora_B.bias"]
                btarget = self._target(module + ".bias", bkey)
                if tuple(self.base.shape(btarget)) != tuple(ad.shape(bkey)):
                    raise CheckpointError(
                        f"adapter key '{bkey}' in {self.path} has shape {ad.shape(bkey)} but base tensor "
                        f"'{btarget}' has shape {tuple(self.base.shape(btarget))}"
                    )
                self._put_delta(btarget, _Delta("bias", None, bkey, scale, False), bkey)

    def _target(self, name: str, key: str) -> str:
        target = self._resolve(name, key)
        if target is None:
            raise CheckpointError(
                f"adapter key '{key}' in {self.path} adapts '{name}', which the base model ({self.base.path}) "
                "does not hold (under any prefix; a tied weight stored once under another name?)"
            )
        return target

    def _put_delta(self, target: str, delta: _Delta, key: str) -> None:
        if target in self._deltas or target in self._full:
            raise CheckpointError(f"adapter {self.path} changes base tensor '{target}' twice (key '{key}')")
        self._deltas[target] = delta

    def _add_full(self, key: str, parts: list[str]) -> None:
        # modules_to_save copies: older peft saved `<m>.modules_to_save.<adapter>.weight`, newer `<m>.weight`.
        if "modules_to_save" in parts:
            i = parts.index("modules_to_save")
            parts = parts[:i] + parts[i + 2 :]
        if "original_module" in parts:  # an untouched copy of the base module: nothing to change
            return
        name = ".".join(parts)
        target = self._resolve(name, key) or name
        if target in self._full or target in self._deltas:
            raise CheckpointError(f"adapter {self.path} changes base tensor '{target}' twice (key '{key}')")
        if target in self.base and tuple(self.base.shape(target)) != tuple(self._adapter.shape(key)):
            raise CheckpointError(
                f"adapter key '{key}' in {self.path} has shape {self._adapter.shape(key)} but base tensor "
                f"'{target}' has shape {tuple(self.base.shape(target))}"
            )
        self._full[target] = key

    # -- ModelReader -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._full or name in self.base

    def _check(self, name: str) -> None:
        if name not in self:
            raise self._missing(name)

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        if name in self._full:
            return tuple(self._adapter.shape(self._full[name]))
        return tuple(self.base.shape(name))

    def dtype(self, name: str) -> torch.dtype:
        self._check(name)
        if name in self._full:
            return self._adapter.dtype(self._full[name])
        return self.base.dtype(name)

    def file_of(self, name: str) -> Path:
        self._check(name)
        if name in self._full:
            return self._adapter.file_of(self._full[name])
        if name in self._deltas:
            return self._adapter.file_of(self._deltas[name].b)
        return self.base.file_of(name)

    def get(self, name: str) -> torch.Tensor:
        self._check(name)
        if name in self._full:
            return self._adapter.get(self._full[name])
        w = self.base.get(name)
        delta = self.delta(name)
        return w if delta is None else (w.float() + delta).to(w.dtype)

    def adapted(self) -> list[str]:
        """The base tensors this adapter changes by a low-rank update (or a bias), sorted."""
        return sorted(self._deltas)

    def saved(self) -> list[str]:
        """The tensors the adapter saved whole (replacing the base's, or added to it), sorted."""
        return sorted(self._full)

    def leaves_alone(self, name: str) -> bool:
        """Whether base tensor `name` is read unchanged (no update, no saved copy): the base's, exactly."""
        return name in self.base and name not in self._deltas and name not in self._full

    def delta(self, name: str) -> torch.Tensor | None:
        """ΔW of tensor `name` in float32 (scale included), None where the adapter leaves it alone."""
        d = self._deltas.get(name)
        if d is None:
            return None
        b = self._adapter.get(d.b).float()
        if d.a is None:
            return d.scale * b  # (out,)
        delta = b @ self._adapter.get(d.a).float()  # (out, r) @ (r, in) -> (out, in)
        return d.scale * (delta.T if d.transpose else delta)

    def weight_files(self) -> list[Path]:
        return self._adapter.weight_files() + self.base.weight_files()

    def aux_files(self) -> list[Path]:
        # The base's config and tokenizer, except files the adapter folder brings itself (a tokenizer).
        mine = {f.name: f for f in find_aux_files(self.path)}
        return [mine.pop(f.name, f) for f in self.base.aux_files()] + list(mine.values())

    def close(self) -> None:
        self._adapter.close()  # the base belongs to whoever opened it


@contextmanager
def _opened(adapter: str | Path, base: str | Path) -> Iterator[LoraReader]:
    with open_model(Path(base)) as base_reader:
        reader = LoraReader(Path(adapter), base_reader)
        try:
            yield reader
        finally:
            reader.close()


def _updates(reader: LoraReader) -> dict[str, torch.Tensor]:
    return {n: d for n in reader.adapted() if (d := reader.delta(n)) is not None}


def dense_updates(adapter: str | Path, base: str | Path) -> dict[str, torch.Tensor]:
    """{base tensor name: ΔW (float32)} of every tensor a LoRA adapter folder changes on `base` (an adapter
    of another base is refused)."""
    with _opened(adapter, base) as reader:
        return _updates(reader)


def adapter_changes(
    adapter: str | Path, base: str | Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(`dense_updates`, {tensor name: its copy (float32)} of every whole tensor the adapter saved
    (`modules_to_save`, trained biases), which replaces the base's): the adapter opened once."""
    with _opened(adapter, base) as reader:
        return _updates(reader), {n: reader.get(n).float() for n in reader.saved()}
