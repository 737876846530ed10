"""A Hugging Face encoder (BERT-like, any folder) with mean pooling, addressed by checkpoint tensor names.

The fusable *body* is every floating tensor of the checkpoint file that the encoder uses, under the
name it has in the file (``encoder.layer.0.attention.self.query.weight`` for all-MiniLM;
``roberta.encoder...`` for a checkpoint saved from a task model). So a body fine-tuned here, the base
read from disk and a merged dict all share one naming, and a merged dict loads straight back.

Pooling is the attention-masked mean over tokens (what all-MiniLM-L6-v2 was trained with):
``pooled = sum_t mask_t h_t / sum_t mask_t``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError, SefusionError
from .config import default_base

__all__ = ["Encoder", "configure_threads", "default_base"]

# Renames transformers applies when loading old checkpoints (TF-style LayerNorm names).
_LEGACY_SUFFIXES = ((".gamma", ".weight"), (".beta", ".bias"))


def configure_threads() -> int:
    """Use every CPU this process may run on, unless the user chose (OMP/MKL_NUM_THREADS or torch)."""
    if not any(os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "SEFUSION_THREADS")):
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            n = os.cpu_count() or 1
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    elif os.environ.get("SEFUSION_THREADS"):
        torch.set_num_threads(int(os.environ["SEFUSION_THREADS"]))
    return torch.get_num_threads()


def _check_base(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"base model folder {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"base model {path} is not a folder (expected a Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"base model folder {path} has no config.json")
    return path


def _map_names(ckpt_names: Sequence[str], model_keys: set[str], prefix: str) -> dict[str, str]:
    """checkpoint name -> model state_dict key, for the checkpoint tensors the model uses."""
    out: dict[str, str] = {}
    for n in ckpt_names:
        cands = [n]
        if prefix and n.startswith(prefix + "."):
            cands.append(n[len(prefix) + 1 :])
        for old, new in _LEGACY_SUFFIXES:
            cands += [c[: -len(old)] + new for c in list(cands) if c.endswith(old)]
        hit = next((c for c in cands if c in model_keys), None)
        if hit is not None:
            out[n] = hit
    return out


class Encoder:
    """An encoder model + tokenizer; the body is exposed under the checkpoint file's tensor names.

    Build with :meth:`from_pretrained`. ``body_state()`` / ``load_body_state()`` move the fusable
    tensors in and out; ``encode()`` embeds texts (or text pairs, as one joint sequence).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        path: Path,
        name_map: dict[str, str],
        passthrough: list[str],
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.device = torch.device(device)
        self._map = name_map  # checkpoint name -> model key (body tensors, in file order)
        self.passthrough = passthrough  # checkpoint tensors the encoder does not use (copied as is)
        self._params = dict(model.named_parameters())
        self._buffers = dict(model.named_buffers())
        self.hidden_size = int(model.config.hidden_size)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", *, intermediate_size: int | None = None
    ) -> Encoder:
        """Load any Hugging Face encoder folder (config.json + weights + tokenizer files).

        `intermediate_size`: build the folder's architecture with a wider (or narrower) FFN instead, its
        weights left for `load_body_state` (PLeaS with budget < 1 keeps both models' least-matched units).
        """
        import transformers
        from transformers import AutoModel, AutoTokenizer

        from ..io import open_model

        path = _check_base(Path(path))
        configure_threads()
        with open_model(path) as reader:
            ckpt = [(n, reader.dtype(n)) for n in reader.names()]
        prev = transformers.logging.get_verbosity()
        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.logging.set_verbosity_error()  # "some weights were not used" is expected for *ForX files
        transformers.utils.logging.disable_progress_bar()  # one bar per load is noise in a study
        try:
            if intermediate_size is None:
                model = AutoModel.from_pretrained(str(path), dtype=torch.float32)
            else:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(str(path))
                if not hasattr(config, "intermediate_size"):
                    raise ValueError(f"{type(config).__name__} has no intermediate_size to change")
                config.intermediate_size = int(intermediate_size)
                # from_config leaves the model in training mode (dropout on); from_pretrained does not
                model = AutoModel.from_config(config, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot load the encoder in {path}: {exc}") from None
        finally:
            transformers.logging.set_verbosity(prev)
            if bars:
                transformers.utils.logging.enable_progress_bar()
        model.to(device)
        keys = set(model.state_dict())
        float_names = [n for n, dt in ckpt if dt.is_floating_point]
        name_map = _map_names(float_names, keys, getattr(model, "base_model_prefix", "") or "")
        if not name_map:
            raise CheckpointError(
                f"no tensor of {path} matches the parameters of {type(model).__name__}; "
                f"first names in the file: {[n for n, _ in ckpt[:3]]}"
            )
        passthrough = [n for n, _ in ckpt if n not in name_map]
        return cls(model, tokenizer, path, name_map, passthrough, device)

    # --- body tensors -------------------------------------------------------------------------
    @property
    def body_names(self) -> list[str]:
        """The fusable tensor names, as in the checkpoint file, in file order."""
        return list(self._map)

    @property
    def name_map(self) -> dict[str, str]:
        """{checkpoint name: model key} of the body tensors (the statistics pass renames hooks with it)."""
        return dict(self._map)

    def _tensor(self, key: str) -> Tensor:
        t = self._params.get(key)
        return t if t is not None else self._buffers[key]

    def body_state(self) -> dict[str, Tensor]:
        """The fusable tensors (copies, float32, on CPU) named exactly as in the checkpoint file."""
        return {n: self._tensor(k).detach().to("cpu", copy=True) for n, k in self._map.items()}

    def load_body_state(self, state: Mapping[str, Tensor]) -> None:
        """Copy a body (e.g. a merged dict) into the model.

        Every body name must be present; ``head.*`` entries and tensors the encoder does not use
        (``passthrough``) are ignored; any other name is an error, as is a shape mismatch.
        """
        missing = [n for n in self._map if n not in state]
        if missing:
            raise CheckpointError(
                f"body state is missing {len(missing)} tensors of {self.path.name}, e.g. {missing[:3]}"
            )
        ignored = set(self.passthrough)
        unknown = [n for n in state if n not in self._map and n not in ignored and not n.startswith("head.")]
        if unknown:
            raise CheckpointError(
                f"body state has {len(unknown)} tensors the encoder of {self.path.name} does not have, "
                f"e.g. {unknown[:3]}"
            )
        with torch.no_grad():
            for n, k in self._map.items():
                dst, src = self._tensor(k), state[n]
                if tuple(src.shape) != tuple(dst.shape):
                    raise CheckpointError(
                        f"tensor '{n}' has shape {tuple(src.shape)} in the body state but "
                        f"{tuple(dst.shape)} in {self.path.name}"
                    )
                dst.copy_(src)

    def body_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """(model key, parameter) of the trainable body tensors."""
        keys = set(self._map.values())
        for k, p in self._params.items():
            if k in keys:
                yield k, p

    # --- tokenizing and pooling ---------------------------------------------------------------
    def tokenize(
        self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, *, max_length: int = 128
    ) -> list[dict[str, list[int]]]:
        """Token ids of each text (or pair, as one sequence), truncated to `max_length`, unpadded."""
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise SefusionError(f"{len(texts)} texts but {len(text_pairs)} text pairs")
        enc = self.tokenizer(
            list(texts),
            list(text_pairs) if text_pairs is not None else None,
            truncation=True,
            max_length=max_length,
            padding=False,
        )
        names = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
        return [{k: enc[k][i] for k in names} for i in range(len(texts))]

    def collate(self, items: Sequence[Mapping[str, list[int]]]) -> dict[str, Tensor]:
        """Pad a batch to its longest member (dynamic padding)."""
        width = max(len(it["input_ids"]) for it in items)
        pad_id = self.tokenizer.pad_token_id or 0
        out: dict[str, Tensor] = {}
        for k in items[0]:
            fill = pad_id if k == "input_ids" else 0
            rows = [list(it[k]) + [fill] * (width - len(it[k])) for it in items]
            out[k] = torch.tensor(rows, dtype=torch.long, device=self.device)
        if "attention_mask" not in out:
            out["attention_mask"] = (out["input_ids"] != pad_id).long()
        return out

    def pool(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Mean-pooled embeddings (B, hidden) of a collated batch (with autograd when enabled)."""
        hidden = self.model(**batch).last_hidden_state.float()  # (B, L, H); pooled in f32 under autocast
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def encode_items(
        self,
        items: Sequence[Mapping[str, list[int]]],
        batch_size: int = 64,
        *,
        progress: str | None = None,
        precision: str = "fp32",
    ) -> Tensor:
        """Embed pre-tokenized items in eval mode, longest first (less padding); returns (N, hidden).

        `progress`: a description to show a progress bar with (None: no bar). `precision`: "fp32", or
        "bf16" to run the body under bf16 autocast (the pooled embeddings are returned in float32).
        """
        if batch_size < 1:
            raise SefusionError(f"batch_size must be >= 1, got {batch_size}")
        if precision not in ("fp32", "bf16"):
            raise SefusionError(f"precision must be fp32 or bf16, got '{precision}'")
        n = len(items)
        out = torch.empty(n, self.hidden_size)
        if n == 0:
            return out
        order = sorted(range(n), key=lambda i: -len(items[i]["input_ids"]))
        was_training = self.model.training
        self.model.eval()
        try:
            from tqdm.auto import tqdm

            starts = tqdm(
                range(0, n, batch_size), desc=progress, disable=progress is None, unit="batch", leave=False
            )
            autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
            with torch.inference_mode(), autocast:
                for s in starts:
                    idx = order[s : s + batch_size]
                    out[idx] = self.pool(self.collate([items[i] for i in idx])).float().cpu()
        finally:
            self.model.train(was_training)
        return out

    def encode(
        self,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None = None,
        batch_size: int = 64,
        *,
        max_length: int = 128,
        precision: str = "fp32",
    ) -> Tensor:
        """Embeddings (N, hidden) of texts, or of (text, pair) joint sequences, mean-pooled, in input order."""
        items = self.tokenize(texts, text_pairs, max_length=max_length)
        return self.encode_items(items, batch_size, precision=precision)
