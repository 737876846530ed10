"""`search-LANG`: natural-language code search, CodeSearchNet style (Husain et al. 2019).

Query: the first sentence of the function's doc comment. Candidate: the function's code, which already
comes without its doc comment (the corpus cuts it out), so the answer is not in the candidate verbatim.
Train examples are (query, code) pairs for an in-batch contrastive loss. The validation and test
splits are pools: at most `Sizes.pool` functions each (fewer when a language has fewer), query i's gold
is candidate i; the metric is MRR over the whole pool (chance H_n/n: 0.0075 for a pool of 1,000).
Functions whose query repeats another one's in the same split are dropped, so every query has one gold.

No shortcut: doc comments often begin with the function's own name (Go's convention: 910 of 1,000 Go
test queries), and the candidate code names the function too, so matching the name alone ranks the gold
first. By default (`mask_name=True`) the query loses the function's name and each of its identifier
words of three letters or more (`readFile`, `read_file` -> `read`, `file`), as whole words in any case,
in every language; a query left with fewer than three words is dropped like any other.
`mask_name=False` keeps the names.
"""

from __future__ import annotations

import re

from .base import (
    SPLITS,
    BuildContext,
    Built,
    Example,
    TaskError,
    first_sentence,
    mrr_chance,
    register_task,
    take,
)

_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")


def identifier_words(name: str) -> list[str]:
    """The words of an identifier, split at underscores, camelCase and digits, lower-cased
    (`HTTPServer_v2` -> `http`, `server`, `v`, `2`)."""
    return [w.lower() for w in _WORD.findall(name)]


def mask_name(query: str, name: str) -> str:
    """`query` without the whole-word occurrences (any case) of `name` and of its identifier words of
    three letters or more; spaces collapsed."""
    words = {w for w in identifier_words(name) if len(w) > 2}  # "is", "to", "in": no clue to the name
    names = [re.escape(name)] + [re.escape(w) for w in sorted(words, key=len, reverse=True)]
    pattern = re.compile(r"(?<![\w$])(?:" + "|".join(names) + r")(?![\w$])", re.IGNORECASE)
    return re.sub(r"\s+", " ", pattern.sub(" ", query)).strip()


def query_of(docstring: str, name: str | None = None) -> str:
    """The query of a function: its doc comment's first sentence, without `name` when one is given."""
    q = first_sentence(docstring)
    return mask_name(q, name) if name else q


def _key(query: str) -> str:
    return re.sub(r"\W+", " ", query.lower()).strip()


@register_task(
    "search", head="retrieval", metric="mrr", chance=mrr_chance(1000), pair=True, defaults={"mask_name": True}
)
def build_search(ctx: BuildContext) -> Built:
    """Docstring first sentence -> the function's code, ranked among a pool of up to 1,000 candidates."""
    masked = ctx.options["mask_name"]
    if masked not in (True, False):
        raise TaskError(f"search: mask_name must be true or false, got {masked!r}")
    splits = ctx.splits()
    out: dict[str, list[Example]] = {}
    pools: dict[str, int] = {}
    for split in SPLITS:
        seen: set[str] = set()
        unique = []
        for f in splits[split]:
            q = query_of(f.docstring, f.name if masked else None)
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
    return Built(out, info={"pool": {s: pools[s] for s in ("validation", "test")}, "mask_name": masked})
