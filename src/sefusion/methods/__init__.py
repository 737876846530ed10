"""Built-in merge methods. Importing this package registers them (see sefusion.registry): every module
here whose name does not start with an underscore is one method's file, imported in name order, so
adding a method is adding its file."""

import importlib
import pkgutil

from ._ops import BundleTensor, ModelThreshold, TensorContext

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BundleTensor", "ModelThreshold", "TensorContext"]
