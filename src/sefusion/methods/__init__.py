"""Built-in merge methods. Importing this package registers them (see sefusion.registry)."""

from . import (  # noqa: F401  (imported for their registration)
    cabs,
    consensus,
    dare,
    fisher,
    linear,
    pleas,
    regmean,
    scaling_masks,
    tall_masks,
    task_arithmetic,
    ties,
)
from ._ops import BundleTensor, ModelThreshold, TensorContext

__all__ = ["BundleTensor", "ModelThreshold", "TensorContext"]
