"""`defect-LANG`: is this function the original (0) or a copy with one injected bug (1)?

Every kept function gives two examples in the same split, its clean version and one mutant, so labels
are balanced and no function's two versions straddle a split. The bugs break consistency *inside* the
function, which a small encoder can learn (there are no single-token operator swaps: a small encoder
stays at chance on them, docs/calibration.md):

- `unbound_name`: one read of a variable is replaced by a name the function never binds (a near miss
  such as `items` for `item`, or another parameter name from the corpus) and that no function of its
  file shows;
- `swapped_arguments`: two name arguments of a call swapped where the names fix the order (they equal
  the callee's parameter names, the callee being defined in the corpus, or they are the caller's own
  parameters passed on in the caller's order);
- `wrong_return`: `return x` -> `return y`, y another variable of the function bound before;
- `undefined_call`: a well-known library call renamed to a plausible name that does not exist
  (`len` -> `length`, `strings.HasPrefix` -> `strings.StartsWith`, `.equals` -> `.isEqual`).

The kinds are balanced as far as the corpus allows (they take turns, the rarest first). The edit starts within the first `visible_chars` characters (about 100-130 word pieces of code), so a model
reading 128 tokens sees the bug. The data comes from the corpus the task names only; `site_packages=True`
adds this environment's installed packages to Python's train split for whoever asks (the splits then
depend on what is installed).
`score` reports accuracy per kind, each kind with its clean originals (chance 0.5 per kind).
"""

from __future__ import annotations

import ast
import math
import random
from collections import Counter
from collections.abc import Sequence

from ._code import analyze
from ._mutate import BUG_KINDS, Mutation, Vocabulary, mutate
from .base import SPLITS, BuildContext, Built, Example, TaskError, register_task
from .corpus import Function


def _check_kinds(kinds: Sequence[str]) -> list[str]:
    if isinstance(kinds, str):
        kinds = [kinds]
    bad = [k for k in kinds if k not in BUG_KINDS]
    if bad or not kinds:
        raise TaskError(
            f"defect: unknown bug kind(s) {bad or '(none given)'}; available: {', '.join(BUG_KINDS)}"
        )
    return list(dict.fromkeys(kinds))


def mutations_of(
    f: Function, kinds: Sequence[str], rng: random.Random, vocab: Vocabulary, visible: int
) -> dict[str, Mutation]:
    """One candidate mutation of `f` per kind that finds a site (Python mutants must still parse)."""
    a = analyze(f.code, f.language, f.params, f.name)
    if a is None:
        return {}
    out = {}
    for kind in kinds:
        m = mutate(f, a, kind, rng, vocab, visible)
        if m is None:
            continue
        if f.language == "python":
            try:
                ast.parse(m.code)
            except SyntaxError:
                continue
        out[kind] = m
    return out


def _pairs(
    functions: Sequence[Function],
    want: int,
    kinds: Sequence[str],
    rng: random.Random,
    vocab: Vocabulary,
    visible: int,
) -> list[tuple[Function, Mutation]]:
    """Up to `want` (function, mutation) pairs, the kinds as balanced as the functions allow.

    Functions are read in a seeded random order until every kind has twice its share of candidates
    (or the functions run out). Then the kinds take turns, rarest first, each taking the next free
    function that admits it, preferring functions that admit few kinds, so a function that could serve
    a rare kind is not spent on a common one.
    """
    order = list(functions)
    rng.shuffle(order)
    share = math.ceil(want / max(len(kinds), 1))
    found: list[tuple[Function, dict[str, Mutation]]] = []
    avail: Counter = Counter()
    for f in order:
        if want == 0 or (len(found) >= want and all(avail[k] >= 2 * share for k in kinds)):
            break
        muts = mutations_of(f, kinds, rng, vocab, visible)
        if muts:
            found.append((f, muts))
            avail.update(muts.keys())
    pools = {
        k: sorted((i for i, (_, m) in enumerate(found) if k in m), key=lambda i: (len(found[i][1]), i))
        for k in kinds
    }
    next_free = dict.fromkeys(kinds, 0)
    taken: set[int] = set()
    out: list[tuple[Function, Mutation]] = []
    active = sorted(kinds, key=lambda k: (avail[k], k))
    while len(out) < want and active:
        for kind in list(active):
            pool = pools[kind]
            while next_free[kind] < len(pool) and pool[next_free[kind]] in taken:
                next_free[kind] += 1
            if next_free[kind] == len(pool):
                active.remove(kind)
                continue
            i = pool[next_free[kind]]
            taken.add(i)
            out.append((found[i][0], found[i][1][kind]))
            if len(out) >= want:
                break
    return out


@register_task(
    "defect",
    head="classify",
    metric="accuracy",
    labels=["clean", "buggy"],
    defaults={"kinds": list(BUG_KINDS), "visible_chars": 300, "site_packages": False},
)
def build_defect(ctx: BuildContext) -> Built:
    """Original function (0) vs the same function with one injected consistency-breaking bug (1)."""
    kinds = _check_kinds(ctx.options["kinds"])
    visible = int(ctx.options["visible_chars"])
    site = ctx.options["site_packages"]
    if site not in (True, False):
        raise TaskError(f"defect: site_packages must be true or false, got {site!r}")
    splits = ctx.splits()
    everything = [f for s in SPLITS for f in splits[s]]
    vocab = Vocabulary.of(ctx.lang, everything)
    out: dict[str, list[Example]] = {}
    kind_counts: dict[str, dict[str, int]] = {}
    available: dict[str, int] = {}
    extra_used = 0
    for split in SPLITS:
        want = ctx.sizes.split(split) // 2
        rng = ctx.rng("defect", ctx.lang, split)
        own = splits[split]
        if split == "train" and ctx.lang == "python" and site is True:
            extra = ctx.extra_train(ctx.lang)
            pairs = _pairs(
                own + extra, want, kinds, rng, Vocabulary.of(ctx.lang, everything + extra), visible
            )
        else:
            pairs = _pairs(own, want, kinds, rng, vocab, visible)
        if split == "train":
            extra_used = sum(1 for f, _ in pairs if f.source.startswith("site-packages:"))
        used = Counter(m.kind for _, m in pairs)
        available[split] = len(splits[split])
        kind_counts[split] = dict(sorted(used.items()))
        examples = []
        for i, (f, m) in enumerate(pairs):
            # both versions carry the bug kind under "kind" (score groups a kind with its originals,
            # chance 0.5 per group); the label says which one is the mutant
            meta = {"kind": m.kind, "path": f.path, "function": f.name, "pair": i}
            examples.append(Example(f.code, None, 0, meta))
            examples.append(
                Example(m.code, None, 1, {**meta, "site": m.site, "before": m.before, "after": m.after})
            )
        rng.shuffle(examples)
        out[split] = examples
    info = {
        "bug_kinds": kinds,
        "per_kind": kind_counts,
        "functions_available": available,
        "site_packages_functions": extra_used,
        "visible_chars": visible,
    }
    return Built(out, info=info)
