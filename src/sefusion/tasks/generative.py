"""Generative tasks for causal code LMs: a prompt (plain instruction text with the code in a fenced
block) -> the text the model must emit. Names are `KIND-LANG` like the encoder tasks, and they are built
the same way: the corpus of the language (standard library for Python by default), deduplicated and
split by source file, sampled with a seeded random source, cached under CACHE/tasks/.

- `generate-python`: signature + docstring -> the body. Test metric: pass@1, executed: the test-split
  functions whose docstring carries doctest examples (meta "tests") run those doctests against the
  generated body (or a fenced reply's own def of the function, `generated_function`) in the sandbox;
  a problem whose reference body fails its own doctests there is left out. The test split lists those
  functions first. Validation: target loss (no execution needed).
- `summarize-LANG`: code (doc comment already cut out) -> the first sentence of its doc comment;
  smoothed BLEU-4 (CodeXGLUE) and ROUGE-L.
- `repair-LANG`: the function with one injected bug (the `defect` bug kinds) -> the original function;
  exact match, and whether the output parses (`ast` for Python, tree-sitter for the others).
- `complete-LANG`: a function's first lines -> its next line; exact match and edit similarity.
- `translate`: pairs from a user's JSONL (`build_translate`); BLEU-4 and exact match.

Lengths are bounded in characters (no tokenizer is needed to build a task): a function whose prompt or
target is longer than `max_prompt_chars` / `max_target_chars` (1,500 / 768) is dropped. Qwen2.5-Coder's
tokenizer reads the standard-library tasks at 4.1-4.3 characters per token, so prompts stay within
about 512 tokens and targets within about 256 (a handful of the ~3,000 examples per task go over).
Every example's meta holds "file" (its source file, the cluster of a clustered bootstrap), "language"
and what scoring needs.
"""

from __future__ import annotations

import ast
import hashlib
import math
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import textmetrics
from ._code import parse_def
from ._mutate import BUG_KINDS, Vocabulary
from .base import (
    GENERATIVE_TASKS,
    SPLITS,
    BuildContext,
    Built,
    Example,
    Sizes,
    TaskData,
    TaskError,
    TaskSpec,
    build_spec,
    first_sentence,
    register_task,
    take,
)
from .corpus import Function

GENERATIVE_KINDS = ("generate", "summarize", "repair", "complete")
LANG_NAMES = {
    "go": "Go", "java": "Java", "javascript": "JavaScript", "php": "PHP", "python": "Python", "ruby": "Ruby",
}  # fmt: skip
# test metrics per kind; the first is the headline one
KIND_METRICS = {
    "generate": ("pass@1", "parses"),
    "summarize": ("bleu4", "rouge_l"),
    "repair": ("exact_match", "parses"),
    "complete": ("exact_match", "edit_similarity"),
    "translate": ("bleu4", "exact_match"),
}
LIMITS = {"max_prompt_chars": 1500, "max_target_chars": 768}
# where generation may stop: builders drop a function whose target holds one, so a reply cut there
# loses nothing it needs
STOP_STRINGS = {
    "generate": ("\n```", "\ndef ", "\nclass ", "\nif __name__"),
    "summarize": ("\n\n",),
    "repair": ("\n```",),
    "complete": ("\n```",),  # a fenced line closes; scoring reads the first line of a longer reply
    "translate": ("\n```",),
}


@dataclass(frozen=True)
class GenExample:
    """One prompt and the text the model must emit; meta: "file", "language" and what scoring needs."""

    prompt: str
    target: str
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenSplits:
    """A built generative task: examples per split, provenance and a content fingerprint."""

    task: str
    train: list[GenExample]
    validation: list[GenExample]
    test: list[GenExample]
    provenance: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""

    def split(self, name: str) -> list[GenExample]:
        return getattr(self, name)

    @classmethod
    def of(cls, data: TaskData) -> GenSplits:
        parts = {s: [GenExample(e.text, e.text_pair or "", e.meta) for e in data.splits[s]] for s in SPLITS}
        return cls(data.task, **parts, provenance=data.provenance, fingerprint=data.fingerprint)


def get_generative(name: str) -> tuple[TaskSpec, str]:
    """`summarize-go` -> (its spec, "go"); an encoder task or an unknown name raises a TaskError."""
    from .base import TASKS

    text = name.strip().lower()
    kind, sep, lang = text.rpartition("-")
    available = ", ".join(generative_task_names())
    if not sep or kind not in GENERATIVE_TASKS:
        if kind in TASKS:
            raise TaskError(
                f"task '{name}' is an encoder task (classification/retrieval); generative tasks: {available}"
            )
        if text == "translate":
            raise TaskError("task 'translate' reads a user's JSONL: use build_translate(path, src, tgt)")
        raise TaskError(f"unknown generative task '{name}'; available: {available}")
    spec = GENERATIVE_TASKS.get(kind)
    try:
        return spec, spec._check_language(lang)
    except TaskError:
        raise TaskError(f"unknown generative task '{name}'; available: {available}") from None


def generative_task_names() -> list[str]:
    return GENERATIVE_TASKS.names()


def build_generative(
    task: str,
    *,
    sizes: Sizes | Mapping[str, int] | None = None,
    seed: int = 0,
    cache: str | Path | None = None,
    dirs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    corpus_cache: str | Path | None = None,
    refresh: bool = False,
) -> GenSplits:
    """Build (or read back from the cache) generative task `task`; arguments as `build_task`'s."""
    spec, lang = get_generative(task)
    data = build_spec(spec, lang, sizes=sizes, seed=seed, cache=cache, dirs=dirs, options=options,
                      corpus_cache=corpus_cache, refresh=refresh)  # fmt: skip
    return GenSplits.of(data)


def build_generative_from(
    task: str, functions: Sequence[Function], *, sizes: Any = None, seed: int = 0, options: Any = None
) -> GenSplits:
    """Build from functions in memory (tests, a corpus already loaded), split by file; not cached."""
    spec, lang = get_generative(task)
    return GenSplits.of(spec.build_from(functions, lang, sizes=sizes, seed=seed, options=options))


# ------------------------------------------------------------------------------------------- helpers


def fenced(code: str, lang: str) -> str:
    return f"```{lang}\n{code}\n```"


def _meta(f: Function, **more: Any) -> dict[str, Any]:
    return {"file": f.path, "source": f.source, "function": f.name, "language": f.language, **more}


def _fits(ctx: BuildContext, kind: str, prompt: str, target: str) -> bool:
    """Within the length limits, and no stop string in the target (a reply cut there would lose it)."""
    o = ctx.options
    if any(stop in target for stop in STOP_STRINGS[kind]):
        return False
    return len(prompt) <= o["max_prompt_chars"] and len(target) <= o["max_target_chars"]


Maker = Callable[[Function], "GenExample | None"]


def _made(ctx: BuildContext, kind: str, split: str, make: Maker) -> list[GenExample]:
    """The examples `make` gives for a split's functions (None skips one) that `_fits` keeps."""
    made = (make(f) for f in ctx.splits()[split])
    return [ex for ex in made if ex is not None and _fits(ctx, kind, ex.prompt, ex.target)]


def _records(examples: Sequence[GenExample]) -> list[Example]:
    return [Example(ex.prompt, ex.target, 0, ex.meta) for ex in examples]


def _examples(ctx: BuildContext, kind: str, make: Maker) -> Built:
    """Per split: a seeded sample of the split's size."""
    out: dict[str, list[Example]] = {}
    for split in SPLITS:
        made, n = _made(ctx, kind, split, make), ctx.sizes.split(split)
        out[split] = _records(take(made, n, ctx.rng(kind, ctx.lang, split)))
    return Built(out, info={"limits": {k: ctx.options[k] for k in LIMITS}})


# ----------------------------------------------------------------------------------------- summarize


@register_task("summarize", head="generate", metric="text", defaults=LIMITS, registry=GENERATIVE_TASKS)
def build_summarize(ctx: BuildContext) -> Built:
    """Code (its doc comment cut out) -> the first sentence of its doc comment."""
    name = LANG_NAMES[ctx.lang]

    def make(f: Function) -> GenExample | None:
        target = first_sentence(f.docstring)
        if sum(1 for w in target.split() if any(c.isalpha() for c in w)) < 3:
            return None
        prompt = f"Summarize this {name} function in one sentence:\n{fenced(f.code, ctx.lang)}"
        return GenExample(prompt, target, _meta(f))

    return _examples(ctx, "summarize", make)


# ------------------------------------------------------------------------------------------ complete


def _completion_line(f: Function, rng: Any, budget: int) -> int | None:
    """A seeded choice of the line to predict: not the first, with two word characters or more, its
    prefix within `budget` characters."""
    lines = f.code.split("\n")
    ok, size = [], len(lines[0])
    for i in range(1, len(lines)):
        if size > budget:
            break
        if len(re.findall(r"\w", lines[i])) >= 2:
            ok.append(i)
        size += len(lines[i]) + 1
    return rng.choice(ok) if ok else None


@register_task("complete", head="generate", metric="text", defaults=LIMITS, registry=GENERATIVE_TASKS)
def build_complete(ctx: BuildContext) -> Built:
    """A function's first lines -> its next line."""
    name = LANG_NAMES[ctx.lang]
    head = f"Write the next line of this {name} function. Reply with that line only.\n"
    budget = ctx.options["max_prompt_chars"] - len(head) - 20

    def make(f: Function) -> GenExample | None:
        i = _completion_line(f, ctx.rng("complete", f.path, f.lineno, f.name), budget)
        if i is None:
            return None
        lines = f.code.split("\n")
        prompt = head + fenced("\n".join(lines[:i]), ctx.lang)
        return GenExample(prompt, lines[i].strip(), _meta(f, line=i))

    return _examples(ctx, "complete", make)


# -------------------------------------------------------------------------------------------- repair


@register_task(
    "repair",
    head="generate",
    metric="text",
    defaults={**LIMITS, "kinds": list(BUG_KINDS)},
    registry=GENERATIVE_TASKS,
)
def build_repair(ctx: BuildContext) -> Built:
    """A function with one injected bug (the `defect` kinds) -> the function as written."""
    from .defect import _check_kinds, _pairs  # the defect task's bug balancing, shared

    kinds = _check_kinds(ctx.options["kinds"])
    limit = min(ctx.options["max_target_chars"], ctx.options["max_prompt_chars"] - 100)
    splits = ctx.splits()
    vocab = Vocabulary.of(ctx.lang, [f for s in SPLITS for f in splits[s]])
    head = f"Fix the bug in this {LANG_NAMES[ctx.lang]} function. Reply with the fixed function only.\n"
    out: dict[str, list[Example]] = {}
    for split in SPLITS:
        own = [f for f in splits[split] if len(f.code) <= limit and _fits(ctx, "repair", "", f.code)]
        rng = ctx.rng("repair", ctx.lang, split)
        pairs = _pairs(own, ctx.sizes.split(split), kinds, rng, vocab, limit)
        out[split] = [
            Example(
                head + fenced(m.code, ctx.lang),
                f.code,
                0,
                _meta(f, kind=m.kind, site=m.site, before=m.before, after=m.after),
            )
            for f, m in pairs
        ]
    return Built(out, info={"bug_kinds": kinds, "limits": {k: ctx.options[k] for k in LIMITS}})


# ------------------------------------------------------------------------------------------ generate


def split_function(code: str) -> tuple[str, str] | None:
    """(signature lines, body lines) of a Python def whose docstring was cut out; None if it does not
    parse. Comment lines between the signature and the first statement go with the body."""
    fn = parse_def(code)
    if fn is None:
        return None
    lines = code.split("\n")
    end = fn.body[0].lineno - 1  # index of the first statement's line
    while end > 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1
    return "\n".join(lines[:end]), "\n".join(lines[end:])


def _indent_of(body: str) -> str:
    first = next((ln for ln in body.split("\n") if ln.strip()), "")
    return first[: len(first) - len(first.lstrip())]


def _docstring_block(doc: str, indent: str) -> str:
    lines = doc.replace('"""', r"\"\"\"").split("\n")
    return textwrap.indent('"""' + "\n".join(lines) + ('\n"""' if len(lines) > 1 else '"""'), indent)


def doctest_source(doc: str) -> str | None:
    """`doc` when it holds doctest examples, else None."""
    import doctest

    try:
        return doc if doctest.DocTestParser().get_examples(doc) else None
    except ValueError:  # malformed examples (inconsistent indentation)
        return None


def module_of(f: Function) -> tuple[str, list[str]] | None:
    """(importable module name, sys.path entries it needs) for a function mined from a source tree."""
    if not f.path.endswith(".py") or f.source in ("memory",) or f.source.startswith("jsonl"):
        return None
    parts = f.path[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts or not all(p.isidentifier() for p in parts):
        return None
    roots = [f.source[4:]] if f.source.startswith("dir:") else []
    if not roots and f.source != "python-stdlib" and not f.source.startswith("site-packages:"):
        return None
    return ".".join(parts), roots


def _tests_meta(f: Function) -> dict[str, Any]:
    """What executing the function's doctests needs, or {} when it has none or cannot be reached."""
    tests = doctest_source(f.doc_full)
    where = module_of(f)
    if not tests or where is None or not f.qualname or "<locals>" in f.qualname:
        return {}
    module, roots = where
    return {"tests": tests, "module": module, "paths": roots, "qualname": f.qualname}


GENERATE_HEAD = "Complete this Python function. Reply with its body only.\n"


def generate_example(f: Function) -> GenExample | None:
    """The `generate-python` example of one function: signature + docstring -> body; None when it does
    not parse or has no body below its docstring."""
    parts = split_function(f.code)
    if parts is None or not parts[1].strip():
        return None
    signature, body = parts
    indent = _indent_of(body)
    shown = f"{signature}\n{_docstring_block(f.doc_full or f.docstring, indent)}"
    meta = _meta(f, indent=indent, signature=signature, **_tests_meta(f))
    return GenExample(GENERATE_HEAD + fenced(shown, "python"), body, meta)


@register_task(
    "generate", head="generate", metric="text", languages=("python",),
    defaults={**LIMITS, "doctests_from": "held-out"}, registry=GENERATIVE_TASKS,
)  # fmt: skip
def build_generate(ctx: BuildContext) -> Built:
    """Signature + docstring -> the function's body (pass@1 on the doctests of held-out functions).

    `doctests_from`: "held-out", the default (the validation files' functions with doctests join the test
    files' ones and leave validation, so selection never sees them; their files then sit in two splits:
    the standard library has 19 such functions whose doctests run here, 2 in the test files alone), or
    "test" (the test files' functions only)."""
    where = ctx.options["doctests_from"]
    if where not in ("test", "held-out"):
        raise TaskError(f"generate: doctests_from must be 'test' or 'held-out', got {where!r}")
    made = {s: _made(ctx, "generate", s, generate_example) for s in SPLITS}
    if where == "held-out":
        made["test"] += [ex for ex in made["validation"] if "tests" in ex.meta]
        made["validation"] = [ex for ex in made["validation"] if "tests" not in ex.meta]
    out: dict[str, list[Example]] = {}
    for split in SPLITS:
        n, rng = ctx.sizes.split(split), ctx.rng("generate", ctx.lang, split)
        chosen = take(made[split], n, rng)
        if split == "test":  # the executed problems first, then a sample of the others
            problems = [ex for ex in made[split] if "tests" in ex.meta]
            chosen = (problems + take([ex for ex in made[split] if "tests" not in ex.meta], n, rng))[:n]
        out[split] = _records(chosen)
    counts = {s: sum(1 for ex in out[s] if "tests" in ex.meta) for s in SPLITS}
    return Built(out, info={"limits": {k: ctx.options[k] for k in LIMITS}, "doctest_functions": counts})


# ------------------------------------------------------------------------------------------ outputs

_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(output: str) -> str:
    """The code of a model's reply: the first fenced block when there is one, else the reply."""
    m = _FENCE.search(output)
    return m.group(1).rstrip("\n") if m else output.strip("\n")


def generated_function(example: GenExample, output: str) -> str:
    """The whole function a `generate-python` reply stands for: a fenced reply's own def of the function
    when it writes one (`_own_def`: a model answering in the prompt's form); a bare reply that starts
    with the def, the reply; else the prompt's signature over the reply as the body (re-indented)."""
    code, name = textwrap.dedent(extract_code(output)), example.meta.get("function", "")
    if _FENCE.search(output):
        own = _own_def(code, name)
        if own is not None:
            return own
    elif re.match(rf"(?:@.*\n)*(?:async\s+)?def\s+{re.escape(name)}\b", code):
        return code
    indent = example.meta.get("indent") or "    "
    body = textwrap.indent(code, indent, lambda line: True) if code.strip() else ""
    return f"{example.meta['signature']}\n{body}"  # an empty reply leaves a def without a body


def _own_def(code: str, name: str) -> str | None:
    """A reply that writes the whole function (a model answering in the prompt's form): its def of `name`
    (the shallowest one: top level, else in a class; decorators included, dedented) after the reply's
    top-level imports. Other statements (a usage example) are left out: the def runs with its module's
    names as globals (`doctest_program`), where the reply's own helpers would not be seen anyway.
    None when the reply parses to no such def."""
    code = code.replace("\r\n", "\n").replace("\r", "\n")  # the line breaks ast counts
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    defs = (ast.FunctionDef, ast.AsyncFunctionDef)
    fn = next((n for n in ast.walk(tree) if isinstance(n, defs) and n.name == name), None)
    if fn is None:
        return None
    imports = [_segment(code, n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    return "\n".join([*imports, _segment(code, fn)])


def _segment(code: str, node: ast.stmt) -> str:
    """A statement's source, decorators included, dedented; re-written from its tree when dedenting cannot
    make it parse alone (a method whose body holds a string at column 0)."""
    lines = code.split("\n")
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    text = textwrap.dedent("\n".join(lines[first - 1 : node.end_lineno]))
    try:
        ast.parse(text)
    except SyntaxError:
        return ast.unparse(node)
    return text


def _source_of(example: GenExample) -> str:
    """The reference function of a `generate-python` example: its signature over its target body."""
    return f"{example.meta['signature']}\n{example.target}"


_PROGRAM = """\
import doctest, importlib, sys
sys.path[:0] = {paths!r}
ok = False
try:  # a SystemExit from the generated code (`sys.exit(0)` at its top level) is a failure, not a pass
    module = importlib.import_module({module!r})
    owner = module
    for part in {owner!r}:
        owner = getattr(owner, part)
    space = {{}}
    exec(compile({code!r}, "<generated>", "exec"), vars(module), space)
    new, old = space[{name!r}], vars(owner).get({name!r})
    for kind in (staticmethod, classmethod):
        if isinstance(old, kind) and not isinstance(new, kind):
            new = kind(new)
    if isinstance(old, property) and not isinstance(new, property):
        new = property(new, old.fset, old.fdel, old.__doc__)
    setattr(owner, {name!r}, new)
    test = doctest.DocTestParser().get_doctest({tests!r}, dict(vars(module)), {qualname!r}, "<doctest>", 0)
    result = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(test, out=sys.stderr.write)
    ok = result.attempted > 0 and not result.failed
except BaseException as exc:
    print(f"{{type(exc).__name__}}: {{exc}}", file=sys.stderr)
sys.exit(0 if ok else 1)
"""


def doctest_program(example: GenExample, function_code: str) -> str:
    """A Python program that puts `function_code` in place of the function in its module (or class) and
    runs the function's doctests against it; exit 0 = every example passed."""
    m = example.meta
    owner = m["qualname"].split(".")[:-1]
    return _PROGRAM.format(paths=list(m.get("paths", [])), module=m["module"], owner=owner,
                           code=function_code, name=m["function"], tests=m["tests"],
                           qualname=m["qualname"])  # fmt: skip


def parses(code: str, lang: str) -> bool:
    """Whether `code` is a syntactically valid function (Python: `ast`; others: tree-sitter finds no
    error in it as a file, or wrapped in a class, as corpus extraction reads it)."""
    if lang == "python":
        try:
            ast.parse(textwrap.dedent(code))
        except (SyntaxError, ValueError):
            return False
        return True
    from .corpus_extract import _WRAPS, _ts

    parser, _ = _ts(lang)
    plain = ("<?php\n" + code) if lang == "php" else code
    wrapped = _WRAPS[lang][0] + code + _WRAPS[lang][1]
    return any(not parser.parse(text.encode()).root_node.has_error for text in (plain, wrapped))


# ------------------------------------------------------------------------------------------ scoring

Runner = Callable[..., Sequence[Any]]  # sefusion.sandbox.run_all: programs -> outcomes with `.passed`


def _runner(runner: Runner | None) -> Runner:
    if runner is not None:
        return runner
    try:
        from ..sandbox import run_all  # imported only when something is executed
    except ImportError as exc:
        raise TaskError(
            f"pass@1 runs code in sefusion.sandbox, which cannot be imported here ({exc})"
        ) from None
    return run_all


def pass_at_1(
    examples: Sequence[GenExample], outputs: Sequence[str], runner: Runner | None = None
) -> list[float]:
    """Per example: 1.0 / 0.0 when its doctests pass / fail with the function the output stands for
    (`generated_function`: the output as the body, or a fenced reply's own def); NaN when it has
    no doctests or when its reference body fails them in this environment (not a scorable problem)."""
    idx = [i for i, ex in enumerate(examples) if "tests" in ex.meta]
    run = _runner(runner)
    refs = [doctest_program(examples[i], _source_of(examples[i])) for i in idx]
    gens = [doctest_program(examples[i], generated_function(examples[i], outputs[i])) for i in idx]
    outcomes = list(run(refs + gens, desc="doctests")) if idx else []
    scores = [math.nan] * len(examples)
    for k, i in enumerate(idx):
        if outcomes[k].passed:
            scores[i] = float(outcomes[len(idx) + k].passed)
    return scores


def per_example_scores(
    task: str, examples: Sequence[GenExample], outputs: Sequence[str], metric: str | None = None,
    runner: Runner | None = None,
) -> list[float]:  # fmt: skip
    """One score per example for `metric` (default: the task's headline metric), for bootstrap
    intervals; NaN marks an example the metric does not apply to (pass@1 without doctests)."""
    kind = _kind(task)
    metric = metric or KIND_METRICS[kind][0]
    if metric not in KIND_METRICS[kind]:
        raise TaskError(f"task {task} has no metric {metric!r}; its metrics: {', '.join(KIND_METRICS[kind])}")
    if len(outputs) != len(examples):
        raise TaskError(f"{len(outputs)} outputs for {len(examples)} examples of {task}")
    if metric == "pass@1":
        return pass_at_1(examples, outputs, runner)
    if metric == "parses":
        return [float(parses(_parse_target(kind, ex, o), ex.meta.get("language", "python")))
                for ex, o in zip(examples, outputs, strict=True)]  # fmt: skip
    refs = [ex.target for ex in examples]
    return textmetrics.per_example(metric, refs, [reply_text(kind, o) for o in outputs])


def reply_text(kind: str, output: str) -> str:
    """What a reply is scored as: the code of a fenced reply (repair, translate), the first non-empty
    line (summarize; complete, after unfencing), the reply itself (generate: see `generated_function`)."""
    if kind in ("repair", "translate"):
        return extract_code(output)
    if kind in ("summarize", "complete"):
        text = extract_code(output) if kind == "complete" else output
        return next((line.strip() for line in text.split("\n") if line.strip()), "")
    return output


def _parse_target(kind: str, example: GenExample, output: str) -> str:
    return generated_function(example, output) if kind == "generate" else extract_code(output)


def _kind(task: str) -> str:
    if task.strip().lower().startswith("translate"):
        return "translate"
    return get_generative(task)[0].kind


def score_generative(
    task: str, examples: Sequence[GenExample], outputs: Sequence[str], runner: Runner | None = None
) -> dict[str, float]:
    """The task's test metrics (means over the examples each applies to) and "n" (examples)."""
    out: dict[str, float] = {"n": float(len(examples))}
    for metric in KIND_METRICS[_kind(task)]:
        scores = [x for x in per_example_scores(task, examples, outputs, metric, runner) if not math.isnan(x)]
        out[metric] = math.fsum(scores) / len(scores) if scores else math.nan
        if metric == "pass@1":
            out["problems"] = float(len(scores))
    return out


# ----------------------------------------------------------------------------------------- translate


def _pair_of(path: Path, line: int, rec: dict[str, Any], langs: tuple[str, str]) -> tuple[str, str]:
    for key in ("source", "target"):
        if not isinstance(rec.get(key), str) or not rec[key].strip():
            raise TaskError(f"{path}:{line}: translation pair without a non-empty string '{key}' field")
    for key, want in zip(("source_lang", "target_lang"), langs, strict=True):
        if key in rec and str(rec[key]).strip().lower() != want:
            raise TaskError(
                f"{path}:{line}: '{key}' is {rec[key]!r}, but this task translates to/from {want}"
            )
    return rec["source"], rec["target"]


def build_translate(
    path: str | Path, source_lang: str, target_lang: str, *, sizes: Any = None, seed: int = 0
) -> GenSplits:
    """`translate` from a user's JSONL: one {"source": ..., "target": ...} object a line (optional
    "source_lang" / "target_lang" must match the languages given). Pairs with the same source (up to
    whitespace) stay in one split; exact duplicates count once; long pairs are dropped."""
    from .corpus_jsonl import jsonl_records
    from .corpus_split import split_by_file
    from .corpus_types import CorpusError

    path, sz = Path(path).expanduser(), Sizes.of(sizes)
    langs = (source_lang.strip().lower(), target_lang.strip().lower())
    head = (
        f"Translate this {LANG_NAMES.get(langs[0], langs[0])} code to {LANG_NAMES.get(langs[1], langs[1])}."
    )
    head += " Reply with the translation only.\n"
    seen, functions = set(), []
    try:
        for line, rec in jsonl_records(path):
            src, tgt = _pair_of(path, line, rec, langs)
            key = textmetrics.normalize_ws(src)
            if (key, tgt) not in seen and len(head) + len(src) <= LIMITS["max_prompt_chars"] - 20:
                seen.add((key, tgt))
                if len(tgt) <= LIMITS["max_target_chars"]:
                    functions.append(Function(langs[0], f"line {line}", src, tgt, key, f"{path}:{line}"))
    except CorpusError as exc:
        raise TaskError(str(exc)) from None
    if not functions:
        raise TaskError(f"{path}: no translation pairs")
    splits = split_by_file(functions, seed=seed)
    out: dict[str, list[GenExample]] = {}
    for split in SPLITS:
        chosen = take(splits[split], sz.split(split), _rng(seed, "translate", split))
        out[split] = [GenExample(head + fenced(f.code, langs[0]), f.docstring,
                                 {"file": f.source, "language": langs[1], "source_language": langs[0]})
                      for f in chosen]  # fmt: skip
    name = f"translate-{langs[0]}-{langs[1]}"
    h = hashlib.sha256(repr([(s, e.prompt, e.target) for s in SPLITS for e in out[s]]).encode()).hexdigest()
    prov = {"task": name, "file": str(path), "seed": seed, "counts": {s: len(out[s]) for s in SPLITS}}
    return GenSplits(name, **out, provenance=prov, fingerprint=h[:20])


def _rng(seed: int, *parts: Any) -> Any:
    import random

    return random.Random("\0".join(map(str, (seed, *parts))))
