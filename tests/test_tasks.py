"""Task builders, mutations, registry, cache and metrics on a synthetic six-language corpus (fast, no model).

The corpus is generated here: per language, files holding a helper `combine(first, second)`, a caller
`process(items, limit)` that passes its locals `first, second` to it, and (where the language has
exceptions) `check(value)` raising one type. Python functions are executed, so "a mutation changes
behaviour" and "a clone rewrite keeps it" are checked by running the code, not only by reading tokens.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from sefusion.errors import SefusionError
from sefusion.tasks import base as tasks
from sefusion.tasks._code import analyze, lex
from sefusion.tasks._mutate import BUG_KINDS, Vocabulary, mask_exception, mutate, reformat
from sefusion.tasks.base import (
    Example,
    Sizes,
    TaskError,
    build_task,
    example_clusters,
    first_sentence,
    get_task,
    gold_ranks,
    mrr,
    mrr_chance,
    score,
    task_names,
)
from sefusion.tasks.clone import rewrite
from sefusion.tasks.corpus import Function, normalized_key
from sefusion.tasks.corpus_extract import LANGUAGES, extract
from sefusion.tasks.search import identifier_words, mask_name

WORDS = [
    "apple", "bread", "cloud", "delta", "eagle", "fable", "grape", "house", "igloo", "joker", "kiwi", "lemon",
    "mango", "night", "ocean", "piano", "quilt", "robin", "salt", "tiger", "umber", "violet", "wagon", "xenon",
    "yacht", "zebra", "amber", "birch", "cedar", "daisy", "ember", "flint", "gecko", "hazel",
]  # fmt: skip
EXC = {
    "python": ("ValueError", "TypeError", "KeyError"),
    "java": ("IllegalArgumentException", "IllegalStateException", "NullPointerException"),
    "php": ("InvalidArgumentException", "RuntimeException", "LogicException"),
    "javascript": ("TypeError", "RangeError", "Error"),
    "ruby": ("ArgumentError", "TypeError", "KeyError"),
}
EXT = {"python": "py", "go": "go", "java": "java", "javascript": "js", "php": "php", "ruby": "rb"}

TEMPLATES = {
    "python": '''
def combine_{w}(first, second):
    """Combine two values into one result for case {i}."""
    total = first + second * {k}
    if total > {i}:
        total = total - 1
    return total


def process_{w}(items, limit):
    """Process the items up to a limit and add them up."""
    first = len(items)
    second = limit + {i}
    result = combine_{w}(first, second)
    return result


def check_{w}(value):
    """Check that the value is valid for case {i}."""
    if value < {i}:
        raise {exc}("value too small: %d" % value)
    return value * {k}
''',
    "go": """package p{i}

// combine{W} adds the two values up for case {i}.
func combine{W}(first int, second int) int {{
\ttotal := first + second*{k}
\tif total > {i} {{
\t\ttotal = total - 1
\t}}
\treturn total
}}

// process{W} processes the items up to a limit.
func process{W}(items []int, limit int) int {{
\tfirst := len(items)
\tsecond := limit + {i}
\tresult := combine{W}(first, second)
\treturn result
}}
""",
    "java": """class C{i} {{
    /** Combine the two values for case {i}. */
    int combine{W}(int first, int second) {{
        int total = first + second * {k};
        if (total > {i}) {{
            total = total - 1;
        }}
        return total;
    }}

    /** Process the items up to a limit. */
    int process{W}(String items, int limit) {{
        int first = Math.max(items.length(), {i});
        int second = limit + {i};
        int result = combine{W}(first, second);
        return result;
    }}

    /** Check that the value is valid for case {i}. */
    int check{W}(int value) {{
        if (value < {i}) {{
            throw new {exc}("value too small");
        }}
        return value * {k};
    }}
}}
""",
    "javascript": """/** Combine the two values for case {i}. */
function combine{W}(first, second) {{
  let total = first + second * {k};
  if (total > {i}) {{
    total = total - 1;
  }}
  return total;
}}

/** Process the items up to a limit. */
function process{W}(items, limit) {{
  const first = Math.max(items.length, {i});
  const second = limit + {i};
  const result = combine{W}(first, second);
  return result;
}}

/** Check that the value is valid for case {i}. */
function check{W}(value) {{
  if (value < {i}) {{
    throw new {exc}("value too small");
  }}
  return value * {k};
}}
""",
    "php": """<?php
/** Combine the two values for case {i}. */
function combine{W}($first, $second) {{
    $total = $first + $second * {k};
    if ($total > {i}) {{
        $total = $total - 1;
    }}
    return $total;
}}

/** Process the items up to a limit. */
function process{W}($items, $limit) {{
    $first = count($items);
    $second = $limit + {i};
    $result = combine{W}($first, $second);
    return $result;
}}

/** Check that the value is valid for case {i}. */
function check{W}($value) {{
    if ($value < {i}) {{
        throw new {exc}("value too small");
    }}
    return $value * {k};
}}
""",
    "ruby": """# Combine the two values for case {i}.
def combine_{w}(first, second)
  total = first + second * {k}
  if total > {i}
    total = total - 1
  end
  return total
end

# Process the items up to a limit.
def process_{w}(items, limit)
  first = items.length
  second = limit + {i}
  result = combine_{w}(first, second)
  return result
end

# Check that the value is valid for case {i}.
def check_{w}(value)
  raise {exc}, "value too small" if value < {i}
  value * {k}
end
""",
}

N_FILES = 40


def source_files(lang: str, n: int = N_FILES) -> dict[str, str]:
    """path -> file text of the synthetic corpus of `lang`."""
    out = {}
    for i in range(n):
        w = f"{WORDS[i % len(WORDS)]}{i}"
        text = TEMPLATES[lang].format(
            i=i + 1, k=i + 2, w=w, W=w.capitalize(), exc=EXC.get(lang, ("Error",) * 3)[i % 3]
        )
        out[f"pkg{i % 4}/mod_{w}.{EXT[lang]}"] = textwrap.dedent(text).lstrip("\n")
    return out


def corpus(lang: str, n: int = N_FILES) -> list[Function]:
    return [
        f
        for path, text in source_files(lang, n).items()
        for f in extract(lang, text, path, f"synthetic-{lang}")
    ]


ALL = {lang: corpus(lang) for lang in LANGUAGES}
SMALL = Sizes(train=40, validation=8, test=8, pool=8)


def build(name: str, *, sizes: Sizes = SMALL, seed: int = 0, **options):
    spec, lang = get_task(name)
    return spec.build_from(ALL, lang, sizes=sizes, seed=seed, options=options or None)


def paths(examples) -> set[str]:
    return {ex.meta["path"] for ex in examples}


def idents(code: str, lang: str) -> list[str]:
    return [t.text for t in lex(code, lang) if t.kind == "name"]


def test_synthetic_corpus_extracts():
    for lang in LANGUAGES:
        names = Counter(f.name.lower()[:7] for f in ALL[lang])
        assert names["combine"] == names["process"] == N_FILES, (lang, names)


# ------------------------------------------------------------------------------------------ registry


def test_task_names_and_get_task():
    names = task_names()
    for kind in ("search", "defect", "clone", "consistency"):
        for lang in LANGUAGES:
            assert f"{kind}-{lang}" in names
    assert "langid-multi" in names and "exception-python" in names and "exception-go" not in names
    spec, lang = get_task("defect-py")
    assert (spec.kind, lang, spec.head, spec.metric, spec.labels, spec.chance) == (
        "defect", "python", "classify", "accuracy", ["clean", "buggy"], 0.5
    )  # fmt: skip
    spec, lang = get_task("search-go")
    assert (spec.head, spec.metric, spec.labels) == ("retrieval", "mrr", [])
    assert spec.chance == pytest.approx(mrr_chance(1000))
    spec, lang = get_task("exception-java")
    assert len(spec.labels) == 8 and spec.chance == pytest.approx(1 / 8)
    spec, lang = get_task("langid-multi")
    assert lang == "multi" and spec.labels == list(LANGUAGES)


@pytest.mark.parametrize("bad", ["defekt-python", "defect-cobol", "exception-go", "langid-python", "nothing"])
def test_unknown_task_names_list_the_available_ones(bad):
    with pytest.raises(TaskError, match=r"unknown task .*available: .*clone-go.*defect-python") as err:
        get_task(bad)
    assert isinstance(err.value, SefusionError)


def test_task_without_language_says_which_exist():
    with pytest.raises(TaskError, match=r"needs a language: defect-go, .*defect-python"):
        get_task("defect")


def test_unknown_options_and_bug_kinds_are_refused():
    with pytest.raises(TaskError, match=r"no option\(s\) colour; its options: .*kinds"):
        build("defect-python", colour="red")
    with pytest.raises(TaskError, match=r"unknown bug kind.*off_by_one.*available: unbound_name"):
        build("defect-python", kinds=["off_by_one"])


def test_sizes_of():
    assert Sizes.of(None) == Sizes()
    assert Sizes.of({"train": 10, "test": 3}) == Sizes(train=10, test=3)
    assert Sizes.of(lambda: {"pool": 5}).pool == 5
    with pytest.raises(TaskError, match="unknown field.*trian"):
        Sizes.of({"trian": 10})
    with pytest.raises(TaskError, match="train must be a non-negative integer"):
        Sizes(train=-1)


# ------------------------------------------------------------------------------------------- metrics


def test_accuracy_and_per_kind_by_hand():
    spec, _ = get_task("defect-python")
    exs = [
        Example("a", label=0, meta={"kind": "unbound_name"}),
        Example("b", label=1, meta={"kind": "unbound_name"}),
        Example("c", label=0, meta={"kind": "wrong_return"}),
        Example("d", label=1, meta={"kind": "wrong_return"}),
        Example("e", label=1, meta={"kind": "wrong_return"}),
    ]
    got = score(spec, [0, 1, 1, 1, 0], exs)
    assert got["score"] == pytest.approx(3 / 5) and got["n"] == 5
    assert got["per_kind"] == {"unbound_name": 1.0, "wrong_return": pytest.approx(1 / 3)}
    assert got["per_example"] == [1, 1, 0, 1, 0]
    paths = [Example("x", meta={"path": "a.py"}), Example("y"), Example("z", meta={"path": "a.py"})]
    assert example_clusters(paths) == ["a.py", "#example1", "a.py"]
    logits = [[2.0, -1.0], [0.0, 3.0], [0.1, 0.2], [0.0, 1.0], [5.0, 4.0]]  # argmax = the labels above
    assert score(spec, logits, exs) == got
    with pytest.raises(TaskError, match="4 predictions for 5 examples"):
        score(spec, [0, 1, 1, 1], exs)


def test_mrr_by_hand_with_ties():
    sim = [
        [0.9, 0.1, 0.3],  # gold 0 ranked 1st -> 1
        [0.5, 0.2, 0.8],  # gold 1 ranked 3rd -> 1/3
        [0.4, 0.4, 0.4],  # gold 2 tied with all: counted at the worst rank 3 -> 1/3
        [0.7, 0.7, 0.1],  # gold 0 tied with candidate 1: rank 2 -> 1/2
    ]
    assert mrr(sim, [0, 1, 2, 0]) == pytest.approx((1 + 1 / 3 + 1 / 3 + 1 / 2) / 4)
    import torch

    assert mrr(torch.tensor(sim), [0, 1, 2, 0]) == pytest.approx((1 + 1 / 3 + 1 / 3 + 1 / 2) / 4)
    assert mrr(torch.eye(4), [0, 1, 2, 3]) == 1.0
    assert mrr(torch.zeros(4, 4), [0, 1, 2, 3]) == pytest.approx(1 / 4)  # a collapsed model gets 1/P
    spec, _ = get_task("search-python")
    res = score(spec, sim, [Example("q", "c", g) for g in (0, 1, 2, 0)])
    assert res["score"] == pytest.approx((1 + 1 / 3 + 1 / 3 + 1 / 2) / 4)
    assert res["per_example"] == [1.0, 1 / 3, 1 / 3, 1 / 2]
    assert gold_ranks(sim, [0, 1, 2, 0]).tolist() == [1, 3, 3, 2]
    with pytest.raises(TaskError, match="gold indices must be in"):
        mrr(sim, [0, 1, 2, 3])
    with pytest.raises(TaskError, match="4 queries but 3 gold"):
        mrr(sim, [0, 1, 2])
    with pytest.raises(TaskError, match="NaN"):
        mrr([[float("nan")]], [0])


def test_mrr_chance_is_the_harmonic_mean_rank():
    assert mrr_chance(1) == 1.0
    assert mrr_chance(2) == pytest.approx(0.75)
    assert mrr_chance(1000) == pytest.approx(0.0074855, rel=1e-4)


def test_first_sentence():
    assert first_sentence("Return the sum. Raises if empty.") == "Return the sum."
    assert first_sentence("Use e.g. this one. Then more.") == "Use e.g. this one."
    assert first_sentence("Version 1.5 is out. Yes.") == "Version 1.5 is out."
    assert first_sentence("No period here") == "No period here"


# ----------------------------------------------------------------------------------------- mutations


def _module(lang: str, path: str) -> str:
    """The file's functions as the corpus holds them (doc comments cut out)."""
    return "\n\n\n".join(g.code for g in ALL[lang] if g.path == path) + "\n"


def _run(src: str, call: str):
    ns: dict = {}
    exec(compile(src, "<synthetic>", "exec"), ns)  # noqa: S102 - our own generated code
    try:
        return ("ok", eval(call, ns))  # noqa: S307
    except Exception as exc:  # noqa: BLE001 - any failure is a behaviour change
        return ("error", type(exc).__name__)


def _calls_for(f: Function, name: str | None = None) -> list[str]:
    """Calls that run every branch of the synthetic function `f` (under `name` when renamed)."""
    name = name or f.name
    if f.name.startswith("combine"):
        return [f"{name}(3, 11)", f"{name}(0, 0)"]
    if f.name.startswith("process"):
        return [f"{name}([1, 2, 3], 5)"]
    return [f"{name}(100)", f"{name}(0)"]


def _behaviour(src: str, calls: list[str]) -> list:
    return [_run(src, c) for c in calls]


@pytest.mark.parametrize("kind", BUG_KINDS)
def test_python_mutations_change_behaviour(kind):
    """Run the original and the mutant: every mutant raises or returns something else."""
    import random

    vocab = Vocabulary.of("python", ALL["python"])
    done = 0
    for f in ALL["python"]:
        a = analyze(f.code, "python", f.params, f.name)
        m = mutate(f, a, kind, random.Random(f.name), vocab, 300)
        if m is None:
            continue
        assert m.kind == kind and m.code != f.code
        ast.parse(m.code)  # still valid Python
        module = _module("python", f.path)
        assert f.code in module
        before = _behaviour(module, _calls_for(f))
        after = _behaviour(module.replace(f.code, m.code), _calls_for(f))
        assert before[0][0] == "ok" and after != before, (f.name, m)
        done += 1
    assert done >= 10, f"{kind}: too few sites in the synthetic corpus"


NATURAL = re.compile(r"\$?[A-Za-z][A-Za-z0-9_]*[?!]?")


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_bug_kind_applies_to_every_language_and_changes_names(lang):
    import random

    vocab = Vocabulary.of(lang, ALL[lang])
    kinds = Counter()
    for f in ALL[lang]:
        a = analyze(f.code, lang, f.params, f.name)
        for kind in BUG_KINDS:
            m = mutate(f, a, kind, random.Random(f"{f.name}{kind}"), vocab, 300)
            if m is None:
                continue
            kinds[kind] += 1
            old, new = idents(f.code, lang), idents(m.code, lang)
            assert old != new, "a mutation changes the name tokens (not layout, strings or comments)"
            if kind != "undefined_call":  # the key renames plain call names too, so it cannot see that one
                assert normalized_key(f) != normalized_key(Function(**{**f.__dict__, "code": m.code}))
            assert NATURAL.fullmatch(m.after) and not m.after.lstrip("$").startswith("_")
            assert not re.search(r"(?i)undefined|mutant|bug|placeholder", m.after)
            if kind == "unbound_name":
                assert m.after not in set(old), "the new name appears nowhere in the original"
                assert new.count(m.after) == 1
            elif kind == "swapped_arguments":
                assert Counter(old) == Counter(new), "same names, another order"
            elif kind == "wrong_return":
                assert m.after in set(old) and m.after != m.before
            else:
                assert m.after not in set(old)
    assert set(kinds) == set(BUG_KINDS), (lang, kinds)


def test_unbound_name_is_really_unbound_in_python():
    import random

    vocab = Vocabulary.of("python", ALL["python"])
    for f in ALL["python"][:30]:
        a = analyze(f.code, "python", f.params, f.name)
        m = mutate(f, a, "unbound_name", random.Random(0), vocab, 300)
        if m is None:
            continue
        tree = ast.parse(m.code)
        stores = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        params = {x.arg for x in ast.walk(tree) if isinstance(x, ast.arg)}
        loads = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert m.after in loads and m.after not in stores | params


def test_mutation_sites_stay_within_the_visible_prefix():
    import random

    vocab = Vocabulary.of("java", ALL["java"])
    for f in ALL["java"]:
        a = analyze(f.code, "java", f.params, f.name)
        for kind in BUG_KINDS:
            m = mutate(f, a, kind, random.Random(1), vocab, 60)
            assert m is None or m.site < 60


# ---------------------------------------------------------------------------------------------- clone


@pytest.mark.parametrize("lang", LANGUAGES)
def test_clone_rewrite_renames_consistently_and_reformats(lang):
    """Consistent renaming + layout keep the corpus's normalized key (names renamed in order of
    appearance, layout and comments dropped) while the text changes."""
    import random

    vocab = Vocabulary.of(lang, ALL[lang])
    changed_names = 0
    for f in ALL[lang]:
        code = rewrite(f, random.Random(f.name), vocab)
        assert code is not None and code != f.code
        g = Function(**{**f.__dict__, "code": code})
        assert normalized_key(g) == normalized_key(f), (f.code, code)
        changed_names += idents(code, lang) != idents(f.code, lang)
    assert changed_names >= len(ALL[lang]) * 0.8


def test_python_clone_rewrite_keeps_behaviour():
    import random

    vocab = Vocabulary.of("python", ALL["python"])
    for f in ALL["python"]:
        code = rewrite(f, random.Random(f.name), vocab)
        new_name = ast.parse(code).body[0].name
        module = _module("python", f.path)
        before = _behaviour(module, _calls_for(f))
        after = _behaviour(module + "\n\n" + code + "\n", _calls_for(f, new_name))
        assert before == after and before[0][0] == "ok"


def test_reformat_leaves_strings_alone():
    import random

    code = 'def f(a,b):\n    s = "x, y,z"\n    t = """\n  keep,this\n"""\n    return (a, b, s, t)\n'
    for seed in range(20):
        out = reformat(code, "python", random.Random(seed))
        ns: dict = {}
        exec(out, ns)  # noqa: S102
        assert ns["f"](1, 2) == (1, 2, "x, y,z", "\n  keep,this\n")


# ----------------------------------------------------------------------------------------- exception


def test_exception_masking_uses_one_placeholder_for_every_type():
    src = 'def f(x):\n    if x:\n        raise ValueError("bad")\n    try:\n        g()\n    except ValueError:\n        raise\n'
    masked, typ = mask_exception(src, "python", "Error")
    assert typ == "ValueError" and "ValueError" not in masked and masked.count("Error") == 2
    two = 'def f(x):\n    if x:\n        raise ValueError("a")\n    raise TypeError("b")\n'
    assert mask_exception(two, "python", "Error") is None, "two types: ambiguous, dropped"
    java = 'void f(int x) {\n    throw new java.lang.IllegalStateException("no");\n}'
    assert mask_exception(java, "java", "Error") == (
        'void f(int x) {\n    throw new Error("no");\n}',
        "IllegalStateException",
    )
    php = 'function f() {\n    throw new \\Foo\\BarException( "x" );\n}'
    assert mask_exception(php, "php", "Error")[1] == "BarException"
    ruby = 'def f(x)\n  raise ArgumentError, "x" if x\nend'
    assert mask_exception(ruby, "ruby", "Error") == (
        'def f(x)\n  raise Error, "x" if x\nend',
        "ArgumentError",
    )
    assert mask_exception('def f():\n    s = "raise KeyError"\n    return s\n', "python", "Error") is None


@pytest.mark.parametrize("name", ["exception-python", "exception-java", "exception-php"])
def test_exception_task_masks_the_type_and_labels_it(name):
    data = build(name, sizes=Sizes(train=60, validation=10, test=10, pool=10))
    lang = name.split("-")[1]
    labels = data.labels
    assert labels == list(get_task(name)[0].labels)
    seen = Counter()
    for exs in data.splits.values():
        for ex in exs:
            typ = labels[ex.label]
            assert ex.meta["kind"] == typ and typ in EXC[lang]
            assert typ not in ex.text and re.search(r"\bError\b", ex.text)
            seen[typ] += 1
    assert set(seen) == set(EXC[lang])
    assert not (paths(data.splits["train"]) & paths(data.splits["test"]))


# ------------------------------------------------------------------------------------------- builders


def _check_split_files_disjoint(data):
    p = {s: paths(v) for s, v in data.splits.items()}
    assert (
        not (p["train"] & p["validation"])
        and not (p["train"] & p["test"])
        and not (p["validation"] & p["test"])
    )


@pytest.mark.parametrize("lang", LANGUAGES)
def test_defect_pairs_balanced_same_split_every_kind(lang):
    data = build(f"defect-{lang}")
    _check_split_files_disjoint(data)
    for split, exs in data.splits.items():
        assert exs, split
        labels = Counter(ex.label for ex in exs)
        assert labels[0] == labels[1], (split, labels)
        pairs = Counter(ex.meta["pair"] for ex in exs)
        assert set(pairs.values()) == {2}, "clean and mutant of one function sit in the same split"
        by_pair = {}
        for ex in exs:
            by_pair.setdefault(ex.meta["pair"], {})[ex.label] = ex
        for both in by_pair.values():
            assert both[0].meta["path"] == both[1].meta["path"] and both[0].text != both[1].text
            assert both[1].meta["kind"] == both[0].meta["kind"] and "after" in both[1].meta
            assert "bug" not in both[0].meta and "after" not in both[0].meta
    kinds = Counter(ex.meta["kind"] for ex in data.splits["train"] if ex.label == 1)
    assert set(kinds) == set(BUG_KINDS) and max(kinds.values()) - min(kinds.values()) <= 2, kinds
    assert data.chance == 0.5 and data.provenance["per_kind"]["train"] == dict(sorted(kinds.items()))


def test_defect_kinds_option_restricts_the_kinds():
    data = build("defect-go", kinds=["wrong_return", "undefined_call"])
    assert {ex.meta["kind"] for s in data.splits.values() for ex in s} == {"wrong_return", "undefined_call"}


@pytest.mark.parametrize("name", ["defect-python", "exception-python"])
def test_site_packages_only_when_asked(name):
    """A task depends only on the corpus it names: installed packages (the stand-in `extra_train`) change
    nothing unless `site_packages=True` asks for them; the old "auto" is refused."""
    spec, _ = get_task(name)
    extra = corpus("python", 60)[len(ALL["python"]) :]  # files 40..59: a stand-in for site-packages
    sizes = Sizes(train=200, validation=8, test=8)  # more than ALL yields: "auto" used to add them
    plain = spec.build_from(ALL, "python", sizes=sizes)
    with_extra = spec.build_from(ALL, "python", sizes=sizes, extra_train=extra)
    assert with_extra.splits == plain.splits and with_extra.fingerprint == plain.fingerprint
    asked = spec.build_from(ALL, "python", sizes=sizes, extra_train=extra, options={"site_packages": True})
    assert asked.fingerprint != plain.fingerprint
    with pytest.raises(TaskError, match="site_packages must be true or false, got 'auto'"):
        spec.build_from(ALL, "python", sizes=sizes, options={"site_packages": "auto"})


def test_defect_site_packages_go_to_train_only():
    spec, _ = get_task("defect-python")
    extra = corpus("python", 60)[len(ALL["python"]) :]
    opts = {"site_packages": True}
    short = spec.build_from(ALL, "python", sizes=Sizes(train=200, validation=8, test=8), extra_train=extra,
                            options=opts)  # fmt: skip
    assert short.provenance["site_packages_functions"] > 0
    extra_paths = {f.path for f in extra}
    assert not any(ex.meta["path"] in extra_paths for s in ("validation", "test") for ex in short.splits[s])


@pytest.mark.parametrize("lang", LANGUAGES)
def test_clone_and_consistency_are_balanced_pairs(lang):
    for kind in ("clone", "consistency"):
        data = build(f"{kind}-{lang}")
        _check_split_files_disjoint(data)
        for split, exs in data.splits.items():
            labels = Counter(ex.label for ex in exs)
            assert labels[0] == labels[1] > 0, (kind, split, labels)
            for ex in exs:
                assert ex.text_pair
                if kind == "consistency":
                    own = next(
                        f for f in ALL[lang] if f.path == ex.meta["path"] and f.name == ex.meta["function"]
                    )
                    assert ex.text_pair == own.code and own.docstring not in ex.text_pair
                    assert (ex.text == own.docstring) == (ex.label == 1)
                else:
                    assert ex.text != ex.text_pair


@pytest.mark.parametrize("lang", LANGUAGES)
def test_naming_renames_only_the_declaration_and_self_calls(lang):
    data = build(f"naming-{lang}")
    _check_split_files_disjoint(data)
    for split, exs in data.splits.items():
        labels = Counter(ex.label for ex in exs)
        assert labels[0] == labels[1] > 0, (split, labels)
        for ex in exs:
            own = next(f for f in ALL[lang] if f.path == ex.meta["path"] and f.name == ex.meta["function"])
            assert ex.text_pair is None
            if ex.label == 1:
                assert ex.text == own.code
                continue
            other = ex.meta["name_of"]
            assert other != own.name and other not in own.code
            # the same tokens but the function's own name, which is gone everywhere
            want = [other if t == own.name else t for t in idents(own.code, lang)]
            assert idents(ex.text, lang) == want and own.name not in idents(ex.text, lang)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_search_pool_is_the_split_and_gold_is_the_own_index(lang):
    data = build(f"search-{lang}", sizes=Sizes(train=30, validation=50, test=50, pool=6))
    _check_split_files_disjoint(data)
    # masked names can make two synthetic queries equal (one is dropped): pools of at most 6
    n_val, n_test = len(data.splits["validation"]), len(data.splits["test"])
    assert 4 <= n_test <= 6 and 4 <= n_val <= 6
    assert data.provenance["pool"] == {"validation": n_val, "test": n_test}
    assert data.chance == pytest.approx(mrr_chance(n_test))
    for exs in data.splits.values():
        assert [ex.label for ex in exs] == list(range(len(exs)))
        assert len({ex.text for ex in exs}) == len(exs), "one gold per query"
        for ex in exs:
            own = next(f for f in ALL[lang] if f.path == ex.meta["path"] and f.name == ex.meta["function"])
            assert ex.text == mask_name(first_sentence(own.docstring), own.name) and ex.text_pair == own.code
            assert ex.text not in ex.text_pair
            assert not re.search(rf"(?i)\b{re.escape(own.name)}\b", ex.text)
    kept = build(f"search-{lang}", sizes=Sizes(train=30, validation=50, test=50, pool=6), mask_name=False)
    for ex in kept.splits["test"]:
        own = next(f for f in ALL[lang] if f.path == ex.meta["path"] and f.name == ex.meta["function"])
        assert ex.text == first_sentence(own.docstring)
    assert kept.provenance["mask_name"] is False and data.provenance["mask_name"] is True
    assert kept.provenance["pool"] == {"validation": 6, "test": 6}


def test_mask_name_by_hand():
    assert identifier_words("HTTPServer_v2") == ["http", "server", "v", "2"]
    assert mask_name("ReadFile reads the named file and returns the contents.", "ReadFile") == (
        "reads the named and returns the contents."
    )
    assert mask_name("Read and return up to n bytes.", "read") == "and return up to n bytes."
    assert mask_name("os.ReadFile() wraps readFile, not Reader.", "readFile") == "os. () wraps , not Reader."
    # words of three letters or more only: "is" stays
    assert mask_name("Reports whether the list is empty", "isEmptyList") == "Reports whether the is"
    assert mask_name("Returns true if empty? holds", "empty?") == "Returns true if holds"
    with pytest.raises(TaskError, match="mask_name must be true or false"):
        build("search-go", mask_name="yes")


def test_langid_is_balanced_over_six_languages():
    data = build("langid-multi", sizes=Sizes(train=60, validation=12, test=12))
    for split, exs in data.splits.items():
        counts = Counter(ex.label for ex in exs)
        assert sorted(counts) == list(range(6)) and len(set(counts.values())) == 1, (split, counts)
        for ex in exs:
            assert ex.meta["kind"] == LANGUAGES[ex.label]
    assert data.chance == pytest.approx(1 / 6)


@pytest.mark.parametrize(
    "name",
    [
        "defect-python",
        "clone-go",
        "consistency-ruby",
        "naming-java",
        "search-java",
        "exception-php",
        "langid-multi",
    ],
)
def test_builders_are_deterministic_per_seed(name):
    a, b = build(name), build(name)
    assert a.fingerprint == b.fingerprint and a.splits == b.splits
    c = build(name, seed=1)
    assert c.fingerprint != a.fingerprint
    assert a.provenance["fingerprint"] == a.fingerprint


def test_data_fingerprint_is_sha256_of_the_canonical_splits():
    data = build("naming-java")
    h = hashlib.sha256(b'{"labels":' + json.dumps(data.labels).replace(", ", ",").encode()
                       + b',"task":"naming-java"}\n')  # fmt: skip
    for split in ("train", "validation", "test"):
        for ex in data.splits[split]:
            rec = {
                "label": ex.label,
                "meta": dict(ex.meta),
                "pair": ex.text_pair,
                "split": split,
                "text": ex.text,
            }
            h.update(
                json.dumps(rec, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
            )
    assert data.fingerprint == h.hexdigest() == tasks.data_fingerprint(data)
    moved = {**data.splits, "train": data.splits["train"][1:] + data.splits["train"][:1]}
    assert tasks.data_fingerprint(tasks.TaskData(data.task, moved, {}, data.labels)) != data.fingerprint


def test_determinism_does_not_depend_on_hash_randomization(tmp_path):
    """Two interpreters with different PYTHONHASHSEED build the same data."""
    files = source_files("python", 20)
    for path, text in files.items():
        (tmp_path / "src" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / path).write_text(text)
    script = (
        "from sefusion.tasks.base import get_task\n"
        "from sefusion.tasks.corpus import from_tree\n"
        f"fs = from_tree('python', {str(tmp_path / 'src')!r}).functions\n"
        "out = []\n"
        "for n in ('defect-python', 'clone-python', 'consistency-python', 'search-python'):\n"
        "    spec, lang = get_task(n)\n"
        "    out.append(spec.build_from(fs, lang, sizes={'train': 20, 'validation': 4, 'test': 4}).fingerprint)\n"
        "print(' '.join(out))\n"
    )
    prints = []
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        res = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        prints.append(res.stdout.strip())
    assert prints[0] == prints[1]


def test_too_few_examples_is_a_clear_error():
    spec, _ = get_task("defect-go")
    with pytest.raises(TaskError, match="defect-go: the corpus yields too few examples"):
        spec.build_from(ALL["go"][:2], "go", sizes=SMALL)


# ----------------------------------------------------------------------------------------- cache


def _write_tree(root: Path, lang: str) -> Path:
    for path, text in source_files(lang).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def test_build_task_caches_on_disk_and_reads_it_back(tmp_path, monkeypatch):
    src = _write_tree(tmp_path / "src", "python")
    cache = tmp_path / "cache"
    first = build_task("defect-python", sizes=SMALL, cache=cache, dirs={"python": src})
    files = list((cache / "tasks").glob("defect-python-*.jsonl.gz"))
    assert len(files) == 1
    assert first.provenance["sources"][0]["source"].startswith("dir:")

    def boom(*args, **kwargs):
        raise AssertionError("a cache hit must not read the corpus")

    monkeypatch.setattr(tasks, "load_corpus", boom)
    second = build_task("defect-python", sizes=SMALL, cache=cache, dirs={"python": src})
    assert second == first
    with pytest.raises(AssertionError, match="must not read the corpus"):
        build_task("defect-python", sizes=SMALL, seed=3, cache=cache, dirs={"python": src})
    with pytest.raises(AssertionError, match="must not read the corpus"):
        build_task(
            "defect-python",
            sizes=SMALL,
            cache=cache,
            dirs={"python": src},
            options={"kinds": ["wrong_return"]},
        )
    # an edited source tree is another corpus
    monkeypatch.undo()
    (src / "pkg0" / "extra.py").write_text(
        source_files("python", 41)[next(reversed(source_files("python", 41)))]
    )
    third = build_task("defect-python", sizes=SMALL, cache=cache, dirs={"python": src})
    assert len(list((cache / "tasks").glob("defect-python-*.jsonl.gz"))) == 2
    assert (
        third.fingerprint != first.fingerprint
        or third.provenance["cache_key"] != first.provenance["cache_key"]
    )


def test_a_corrupt_cache_file_is_rebuilt(tmp_path):
    src = _write_tree(tmp_path / "src", "go")
    cache = tmp_path / "cache"
    first = build_task("consistency-go", sizes=SMALL, cache=cache, dirs={"go": src})
    (path,) = (cache / "tasks").glob("*.jsonl.gz")
    path.write_bytes(b"not gzip")
    again = build_task("consistency-go", sizes=SMALL, cache=cache, dirs={"go": src})
    assert again == first


def test_balanced_takes_equal_sides_and_skips_what_builders_refuse():
    import random

    from sefusion.tasks.base import balanced

    def pos(i):
        return Example(f"p{i}", None, 1)

    def neg(i):
        return Example(f"n{i}", None, 0) if i % 2 == 0 else None  # odd items cannot be negatives

    out = balanced(list(range(40)), 5, random.Random(0), pos, neg, eligible=lambda i: i != 3)
    labels = Counter(ex.label for ex in out)
    assert labels[0] == labels[1] == 5
    assert all(int(ex.text[1:]) % 2 == 0 for ex in out if ex.label == 0)
    assert "p3" not in {ex.text for ex in out} and "n3" not in {ex.text for ex in out}
    # the shorter side bounds both: no negatives at all gives nothing
    assert balanced(list(range(10)), 3, random.Random(0), pos, lambda i: None) == []
