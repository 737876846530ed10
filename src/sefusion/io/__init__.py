"""Read checkpoints tensor by tensor (safetensors, .bin, PEFT LoRA) and write model folders atomically."""

from __future__ import annotations

from .lora import LoraReader, check_adapter_base
from .reader import BinReader, ModelReader, SafetensorsReader, find_aux_files, open_model
from .util import check_finite, file_sha256, parse_size, weights_sha256
from .writer import ModelWriter, atomic_dir

__all__ = [
    "BinReader",
    "LoraReader",
    "ModelReader",
    "ModelWriter",
    "SafetensorsReader",
    "atomic_dir",
    "check_adapter_base",
    "check_finite",
    "file_sha256",
    "find_aux_files",
    "open_model",
    "parse_size",
    "weights_sha256",
]
