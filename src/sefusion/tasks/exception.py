"""`exception-LANG`: which exception type does this function raise? (CuBERT's exception task, Kanade et
al. 2020, on raise/throw sites instead of except clauses.)

A function qualifies when its `raise T` / `throw new T(...)` statements name exactly one type T. Every
occurrence of T in the code (the raise sites, an `except T`, a comment) is replaced by one neutral
placeholder word, `Error` by default, the same for every type and every function, so no token tells
the classes apart; the model has to read what the function checks. The message text stays.

Labels are the k most frequent types in the train split of the default corpora (seed 0), fixed in
`EXCEPTION_TYPES` so the head's size does not depend on the data (`types="train"` recounts them on the
corpus at hand). For Python only built-in exception types count (as CuBERT), which keeps project-specific
classes out. Functions raising another type are dropped. No class may fill more than 1/k of a split's asked size
(so ValueError does not swamp Python, at the cost of fewer examples); the chance level reported with
the data is the test split's majority share. The data comes from the corpus the task names and nothing
else (Python: the standard library, or the trees given with --dir), so the same command builds the same
splits on every machine; `site_packages=True` adds this environment's installed packages to all three
splits (split by file with the standard library) for whoever asks for them, at the cost of that
reproducibility. Languages: Python, Java, PHP (JavaScript code throws `Error` almost always; Ruby's corpus
has too few raising functions); Go has no exceptions.
"""

from __future__ import annotations

import builtins
import math
from collections import Counter

from ._mutate import mask_exception
from .base import SPLITS, BuildContext, Built, Example, TaskError, register_task, take
from .corpus import split_by_file

# Measured on the corpora (train split, seed 0; Python: standard library + the site-packages of the
# environment then, kept so the heads keep their classes; `types="train"` recounts).
EXCEPTION_TYPES: dict[str, tuple[str, ...]] = {
    "python": (
        "ValueError", "AssertionError", "TypeError", "RuntimeError", "NotImplementedError", "ImportError",
        "KeyError", "AttributeError",
    ),
    "java": (
        "IllegalArgumentException", "NullPointerException", "UnsupportedOperationException", "IOException",
        "IllegalStateException", "SQLException", "RuntimeException", "SQLFeatureNotSupportedException",
    ),
    "php": (
        "InvalidArgumentException", "MWException", "RuntimeException", "LogicException", "Exception",
        "UnexpectedValueException", "Scribunto_LuaError", "ShellboxError",
    ),
}  # fmt: skip

BUILTIN_EXCEPTIONS = frozenset(
    n
    for n in dir(builtins)
    if isinstance(getattr(builtins, n), type) and issubclass(getattr(builtins, n), BaseException)
)


def top_types(types: Counter, lang: str, k: int) -> list[str]:
    """The k most frequent types (ties by name); Python: built-in exceptions only."""
    ranked = sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))
    if lang == "python":
        ranked = [(t, n) for t, n in ranked if t in BUILTIN_EXCEPTIONS]
    return [t for t, _ in ranked[:k]]


def _capped(items: list, n: int, k: int, label_of, rng) -> list:
    """At most n items and at most ceil(n / k) of any one label (so no type fills more than 1/k)."""
    by_label: dict[int, list] = {}
    for it in take(items, len(items), rng):
        by_label.setdefault(label_of(it), []).append(it)
    cap = math.ceil(n / max(k, 1))
    return take([it for v in by_label.values() for it in v[:cap]], n, rng)


@register_task(
    "exception",
    head="classify",
    metric="accuracy",
    languages=("python", "java", "php"),
    defaults={"k": 8, "placeholder": "Error", "types": "fixed", "site_packages": False},
    labels_by_language=EXCEPTION_TYPES,
)
def build_exception(ctx: BuildContext) -> Built:
    """Code with its raised exception type masked -> that type (one of the k most frequent)."""
    k, placeholder, mode = int(ctx.options["k"]), str(ctx.options["placeholder"]), ctx.options["types"]
    site = ctx.options["site_packages"]
    if mode not in ("fixed", "train"):
        raise TaskError(f"exception: types must be 'fixed' or 'train', got {mode!r}")
    if site not in (True, False):
        raise TaskError(f"exception: site_packages must be true or false, got {site!r}")

    def masked(splits):
        out = {}
        for s in SPLITS:
            out[s] = []
            for f in splits[s]:
                m = mask_exception(f.code, ctx.lang, placeholder)
                if m is not None:
                    out[s].append((f, m[0], m[1]))
        return out

    splits = ctx.splits()
    use_site = ctx.lang == "python" and site is True
    if use_site:
        extra = ctx.extra_train(ctx.lang)
        splits = split_by_file([f for s in SPLITS for f in splits[s]] + extra, seed=ctx.seed)
    cands = masked(splits)
    fixed = EXCEPTION_TYPES.get(ctx.lang, ())
    if mode == "fixed" and fixed:
        labels = list(fixed[:k])
    else:
        labels = top_types(Counter(t for _, _, t in cands["train"]), ctx.lang, k)
    index = {t: i for i, t in enumerate(labels)}
    out = {}
    counts = {}
    for s in SPLITS:
        rng = ctx.rng("exception", ctx.lang, s)
        kept = [(f, code, t) for f, code, t in cands[s] if t in index]
        chosen = _capped(kept, ctx.sizes.split(s), len(labels), lambda it: index[it[2]], rng)
        out[s] = [
            Example(code, None, index[t], {"kind": t, "path": f.path, "function": f.name})
            for f, code, t in chosen
        ]
        counts[s] = dict(Counter(t for _, _, t in chosen).most_common())
    info = {"placeholder": placeholder, "per_type": counts, "site_packages": use_site}
    return Built(out, labels=labels, info=info)
