"""The search shortcut, measured: the frozen base and the no-training baseline (name match + TF-IDF) on
search-LANG's test pool with the function's name kept in the query and masked (the default), each with its
95% cluster-bootstrap interval (resampling source files) and the paired interval of base - baseline.

    PYTHONPATH=src python benchmarks/search_shortcut.py BASE_MODEL_FOLDER go python

Sizes are the `full` budget's (train 2400, validation 200, test pool 1000). Not a speed benchmark: it
prints scores, about 2-5 minutes per language on two CPU cores.
"""

from __future__ import annotations

import sys
import time

from sefusion.models.evaluation import evaluate, load_model
from sefusion.study import uncertainty as U
from sefusion.study.uncertainty import format_interval as F
from sefusion.tasks.base import build_task, get_task
from sefusion.tasks.baselines import no_training_baseline

SIZES = {"train": 2400, "validation": 200, "test": 1000}


def main(base: str, langs: list[str]) -> None:
    body, _ = load_model(base)
    for lang in langs:
        for mask in (False, True):
            t0 = time.time()
            name = f"search-{lang}"
            spec, _ = get_task(name)
            data = build_task(name, sizes=SIZES, options={"mask_name": mask})
            frozen = evaluate(body, {}, data, "test", spec, base=base)
            baseline = no_training_baseline(data, spec)
            files = frozen["clusters"]
            diff = U.paired_difference(frozen["per_example"], baseline["per_example"], files)
            print(
                f"{name} mask_name={mask} n={frozen['n']} files={len(set(files))}: "
                f"frozen base MRR {F(U.interval(frozen['per_example'], files))} "
                f"(iid {F(U.interval(frozen['per_example']))}); "
                f"baseline {F(U.interval(baseline['per_example'], files))}; "
                f"base - baseline {F(diff)} significant={diff.significant} ({time.time() - t0:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: search_shortcut.py BASE_MODEL_FOLDER LANG [LANG ...]")
    main(sys.argv[1], sys.argv[2:])
