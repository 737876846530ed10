"""LoRA experts as dense updates, and the LoRA-native merges of the generative study.

- `dense_updates` (io.lora): each adapted tensor's ΔW = scale·B·A in float32;
- `combine`: PEFT's `add_weighted_adapter` on the experts' factors, saved as one adapter folder:
  `cat` concatenates them (rank summed; ΔW = Σ_t ΔW_t exactly), `linear` sums the factors scaled by
  √(w·scale_t) (cross terms B_s·A_t included: not the sum of the updates).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .scenarios import StudyError

COMBINATIONS = ("cat", "linear")


def adapted_sizes(adapters: Sequence[Path], base: Path) -> dict[str, int]:
    """{base tensor name: its number of elements} of every tensor one of `adapters` changes."""
    from ..io import open_model
    from ..io.lora import LoraReader

    out: dict[str, int] = {}
    with open_model(base) as base_reader:
        for adapter in adapters:
            reader = LoraReader(Path(adapter), base_reader)
            try:
                out.update({n: math.prod(base_reader.shape(n)) for n in reader.adapted()})
            finally:
                reader.close()
    return out


def adapter_bytes(folder: Path) -> int:
    """Bytes of an adapter's weights (what serving one more task costs)."""
    return sum(f.stat().st_size for f in Path(folder).glob("adapter_model.*"))


def combine(
    base: Path, adapters: Sequence[Path], combination: str, out: Path, weights: Sequence[float] | None = None
) -> Path:
    """One adapter folder `out` made by PEFT's add_weighted_adapter from `adapters` (weights default 1)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if combination not in COMBINATIONS:
        raise StudyError(f"unknown LoRA combination '{combination}'; available: {', '.join(COMBINATIONS)}")
    names = [f"t{i}" for i in range(len(adapters))]
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, folder in zip(names[1:], adapters[1:], strict=True):
        model.load_adapter(folder, adapter_name=name)
    model.add_weighted_adapter(
        names, list(weights or [1.0] * len(adapters)), "merged", combination_type=combination
    )
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, selected_adapters=["merged"], safe_serialization=True)
    saved = tmp / "merged" if (tmp / "merged").is_dir() else tmp
    record = {
        "combination": combination,
        "adapters": [str(a) for a in adapters],
        "weights": list(weights or []),
    }
    base_sha = _record_value(adapters[0], "base_sha256")
    if base_sha:
        record["base_sha256"] = base_sha  # the merged adapter is refused on another base as its inputs are
    from ..io.lora import TRAIN_RECORD

    (saved / TRAIN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    saved.rename(out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _record_value(adapter: Path, key: str) -> Any:
    from ..io.lora import TRAIN_RECORD

    f = Path(adapter) / TRAIN_RECORD
    return json.loads(f.read_text()).get(key) if f.is_file() else None


def scaled(delta: Mapping[str, Any], factor: float) -> dict[str, Any]:
    return {k: v * factor for k, v in delta.items()}
