"""What the task-vector methods share when reading a mergekit 0.1.5 recipe (each method's file declares
its own `MergekitForm`; sefusion.recipe reads the rest of the recipe)."""

from __future__ import annotations

from typing import Any


def task_vector_params(
    glob: dict[str, Any], entries: list[dict[str, Any]], models: list[dict[str, Any]], notes: list[str],
    *, normalize: bool, density: bool, sign_election: bool,
) -> dict[str, Any]:  # fmt: skip
    """density (if the method sparsifies), lambda and merge with mergekit's defaults made explicit;
    without sign election, `normalize` divides `models`' weights by their sum as mergekit does."""
    params: dict[str, Any] = {}
    if density:
        params["density"] = glob.get("density", 1.0)
        if "density" not in glob and any("density" not in e["own"] for e in entries):
            notes.append(
                "density defaults to 1.0 (no sparsification) as in mergekit; sefusion's default differs"
            )
    params["lambda"] = glob.get("lambda", 1.0)
    if sign_election:
        params["merge"] = "mean" if normalize else "sum"
    elif normalize:
        # mergekit divides the weighted sum of task vectors by the sum of the weights (left as is where that
        # sum is ~0); dividing each weight by that sum is the same.
        total = sum(m["weight"] for m in models)
        if abs(total) >= 1e-8:
            for m in models:
                m["weight"] = m["weight"] / total
            notes.append(f"normalize: true: each weight divided by the sum of the weights ({total:g})")
    if glob.get("int8_mask"):
        notes.append("int8_mask only saves memory in mergekit; ignored")
    return params


def dare_rescale_note(notes: list[str]) -> None:
    notes.append(
        "DARE rescale: sefusion divides the kept entries by density (as the DARE paper does); "
        "mergekit rescales them to match the task vector's L1 norm"
    )
