"""`naming-LANG`: does the function's name fit its body (an inconsistent method name)?

Each function gives one example: its code as written, labelled 1, or its code with the declared name
(and the plain calls of itself, so recursion stays consistent) replaced by another function's name from
the same split, labelled 0; half of each split is each. Inconsistent method names are a defect studied on
their own (Liu et al., "Learning to Spot and Refactor Inconsistent Method Names", ICSE 2019); unlike the
injected bugs of `defect`, they are decided by what the whole body says, which a small encoder learns
(as it learns doc-comment consistency). Functions whose name is special (`__init__`, Java constructors)
or also appears elsewhere in their code (a string, a member, a symbol) are left out, so the renamed
declaration is the only change and nothing else in the code points to the old name.
"""

from __future__ import annotations

import re

from ._code import analyze, replace_spans
from .base import SPLITS, BuildContext, Built, Example, balanced, register_task
from .corpus import Function


def renamable(f: Function) -> list[tuple[int, int]] | None:
    """The spans of `f`'s own name (declaration + plain self-calls), or None when it must not be renamed."""
    if f.name.startswith("__") or (f.language == "java" and f.name[:1].isupper()):
        return None
    a = analyze(f.code, f.language, f.params, f.name)
    if a is None or a.name_span is None:
        return None
    uses = len(re.findall(rf"(?<![\w$]){re.escape(f.name)}(?![\w$])", f.code))
    if uses != 1 + len(a.self_calls):  # mentioned as something else too: a rename would leave a trace
        return None
    return [a.name_span, *a.self_calls]


@register_task("naming", head="classify", metric="accuracy", labels=["inconsistent", "consistent"])
def build_naming(ctx: BuildContext) -> Built:
    """Code with its own name (1) or with another function's name (0)."""
    splits = ctx.splits()
    out: dict[str, list[Example]] = {}
    for split in SPLITS:
        rng = ctx.rng("naming", ctx.lang, split)
        functions = splits[split]
        order = list(range(len(functions)))
        rng.shuffle(order)
        half = min(ctx.sizes.split(split), len(functions)) // 2
        names = sorted({f.name for f in functions})
        spans: dict[int, list[tuple[int, int]] | None] = {}

        def eligible(i: int, functions=functions, spans=spans) -> bool:
            spans[i] = renamable(functions[i])
            return spans[i] is not None

        def positive(i: int, functions=functions) -> Example | None:
            f = functions[i]
            return Example(f.code, None, 1, {"path": f.path, "function": f.name, "kind": "consistent"})

        def negative(i: int, functions=functions, rng=rng, names=names, spans=spans) -> Example | None:
            f = functions[i]
            for _ in range(100):
                other = names[rng.randrange(len(names))]
                # another name the code does not show anywhere, in the same style (capitalized or not)
                if other != f.name and other[:1].isupper() == f.name[:1].isupper() and other not in f.code:
                    break
            else:
                return None
            code = replace_spans(f.code, [(s, e, other) for s, e in spans[i] or []])
            meta = {"path": f.path, "function": f.name, "kind": "inconsistent", "name_of": other}
            return Example(code, None, 0, meta)

        examples = balanced(order, half, rng, positive, negative, eligible)
        out[split] = examples
    return Built(out)
