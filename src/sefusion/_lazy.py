"""A module proxy that imports on first attribute access: keeps torch out of `sefusion --help`."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_module"] = None

    def _load(self) -> ModuleType:
        mod = self.__dict__["_module"]
        if mod is None:
            mod = importlib.import_module(self.__name__)
            self.__dict__["_module"] = mod
        return mod

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._load(), attr)
        self.__dict__[attr] = value  # found directly next time: torch.* sits in the engine's inner loop
        return value


torch: Any = LazyModule("torch")
