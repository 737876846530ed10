"""`langid-multi`: which of the six languages is this function written in?

Functions come from all six corpora (each split by file on its own), the same number per language in
every split, so the classes are balanced and chance is 1/6. Doc comments are not part of the code.
"""

from __future__ import annotations

from .base import SPLITS, BuildContext, Built, Example, register_task, take
from .corpus_extract import LANGUAGES


@register_task("langid", head="classify", metric="accuracy", labels=list(LANGUAGES), languages=("multi",))
def build_langid(ctx: BuildContext) -> Built:
    """Code -> its language, one of go, java, javascript, php, python, ruby (balanced)."""
    corpora = {lang: ctx.splits(lang) for lang in LANGUAGES}
    out: dict[str, list[Example]] = {}
    for split in SPLITS:
        rng = ctx.rng("langid", split)
        per = min([ctx.sizes.split(split) // len(LANGUAGES)] + [len(c[split]) for c in corpora.values()])
        examples = []
        for label, lang in enumerate(LANGUAGES):
            for f in take(corpora[lang][split], per, rng):
                examples.append(
                    Example(f.code, None, label, {"kind": lang, "path": f.path, "function": f.name})
                )
        rng.shuffle(examples)
        out[split] = examples
    return Built(out)
