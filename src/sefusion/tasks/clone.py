"""`clone-LANG`: is the second function a rewrite of the first (1) or a different function (0)?

A positive pairs a function with a semantics-preserving rewrite of itself: the function and most of its
local variables and parameters renamed consistently (names drawn from the corpus, never shown elsewhere
in the code), then one to three layout changes (indentation unit, spaces after commas, blank lines,
brace placement). A negative pairs it with the same kind of rewrite of *another* function of similar
length from the same split (a neighbour in length order, with another name), so the second segment
looks alike in both classes and only its meaning tells them apart. Half of each split is each class.
Names that a rename could change the meaning of (object keys, keyword arguments, symbols, names inside
strings or interpolations, globals) are left alone.
"""

from __future__ import annotations

import random

from ._code import analyze
from ._mutate import Vocabulary, reformat, rename
from .base import SPLITS, BuildContext, Built, Example, balanced, register_task
from .corpus import Function


def rewrite(f: Function, rng: random.Random, vocab: Vocabulary) -> str | None:
    """Renamed + reformatted code of `f`, or None when nothing could be changed."""
    a = analyze(f.code, f.language, f.params, f.name)
    if a is None:
        return None
    code, _ = rename(f, a, rng, vocab)
    code = reformat(code, f.language, rng)
    if f.language == "python":
        import ast

        try:
            ast.parse(code)
        except SyntaxError:
            return None
    return code if code != f.code else None


@register_task("clone", head="classify", metric="accuracy", labels=["different", "clone"], pair=True)
def build_clone(ctx: BuildContext) -> Built:
    """Function + a renamed, reformatted copy of itself (1) or of another function of similar length (0)."""
    splits = ctx.splits()
    vocab = Vocabulary.of(ctx.lang, [f for s in SPLITS for f in splits[s]])
    out: dict[str, list[Example]] = {}
    for split in SPLITS:
        rng = ctx.rng("clone", ctx.lang, split)
        functions = splits[split]
        by_length = sorted(range(len(functions)), key=lambda i: (len(functions[i].code), i))
        rank = {i: r for r, i in enumerate(by_length)}
        order = list(range(len(functions)))
        rng.shuffle(order)
        half = min(ctx.sizes.split(split), len(functions)) // 2

        def positive(i: int, functions=functions, rng=rng) -> Example | None:
            f = functions[i]
            code = rewrite(f, rng, vocab)
            meta = {"path": f.path, "function": f.name, "kind": "clone"}
            return Example(f.code, code, 1, meta) if code is not None else None

        def negative(i: int, functions=functions, rng=rng, rank=rank, by_length=by_length) -> Example | None:
            f = functions[i]
            r = rank[i]
            window = [by_length[k] for k in range(max(0, r - 8), min(len(functions), r + 9)) if k != r]
            window = [j for j in window if functions[j].name != f.name and functions[j].code != f.code]
            if not window:
                return None
            other = functions[rng.choice(window)]
            code = rewrite(other, rng, vocab)
            meta = {"path": f.path, "function": f.name, "kind": "different", "other": other.name}
            return Example(f.code, code, 0, meta) if code is not None else None

        examples = balanced(order, half, rng, positive, negative)
        out[split] = examples
    return Built(out)
