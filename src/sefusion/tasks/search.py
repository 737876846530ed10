"""`search-LANG`: natural-language code search, CodeSearchNet style (Husain et al. 2019).

Query: the first sentence of the function's doc comment. Candidate: the function's code, which already
comes without its doc comment (the corpus cuts it out), so the answer is not in the candidate verbatim.
Train examples are (query, code) pairs for an in-batch contrastive loss. The validation and test
splits are pools: at most `Sizes.pool` functions each (fewer when a language has fewer), query i's gold
is candidate i; the metric is MRR over the whole pool (chance H_n/n: 0.0075 for a pool of 1,000).
Functions whose query repeats another one's in the same split are dropped, so every query has one gold.
"""

from __future__ import annotations

import re

from .base import SPLITS, BuildContext, Built, Example, first_sentence, mrr_chance, register_task, take


def query_of(docstring: str) -> str:
    return first_sentence(docstring)


def _key(query: str) -> str:
    return re.sub(r"\W+", " ", query.lower()).strip()


@register_task("search", head="retrieval", metric="mrr", chance=mrr_chance(1000), pair=True)
def build_search(ctx: BuildContext) -> Built:
    """Docstring first sentence -> the function's code, ranked among a pool of up to 1,000 candidates."""
    splits = ctx.splits()
    out: dict[str, list[Example]] = {}
    pools: dict[str, int] = {}
    for split in SPLITS:
        seen: set[str] = set()
        unique = []
        for f in splits[split]:
            q = query_of(f.docstring)
            k = _key(q)
            if len(k.split()) < 3 or k in seen:
                continue
            seen.add(k)
            unique.append((q, f))
        n = ctx.sizes.split(split)
        if split != "train":
            n = min(n, ctx.sizes.pool)
        chosen = take(unique, n, ctx.rng("search", ctx.lang, split))
        out[split] = [
            Example(q, f.code, i, {"path": f.path, "function": f.name}) for i, (q, f) in enumerate(chosen)
        ]
        pools[split] = len(out[split])
    return Built(out, info={"pool": {s: pools[s] for s in ("validation", "test")}})
