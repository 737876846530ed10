"""The task interface the models and the study use: records (`Example`, `TaskData`), the task registry
(`TASKS`, `register_task`, `get_task`), cached building (`build_task`) and the metrics (`score`, `mrr`).

A task kind (`defect`, `search`, ...) is a builder function registered with its head, metric, labels and
chance level; a task *name* is `KIND-LANG` (`defect-python`; `langid-multi` for language identification).
A builder receives a `BuildContext` (the corpus of its language split by source file, sizes, a seeded
random source, its options) and returns the examples per split. `build_task` caches what a builder
returns under CACHE/tasks/ as JSONL.gz, keyed by the task, sizes, seed, options and a fingerprint of the
corpus sources, so the second build of the same data is a file read.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import random
import sys
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from dataclasses import replace as _replace
from pathlib import Path
from typing import Any, Literal

from ..errors import SefusionError
from ..registry import Registry
from .corpus import SPLITS, Corpus, CorpusError, Function, default_cache_dir, load_corpus, split_by_file
from .corpus_extract import EXTENSIONS, LANGUAGES, canonical_language

TASKS_VERSION = 1  # part of every cache key: bump when a builder changes what it yields


class TaskError(SefusionError, ValueError):
    """A task cannot be found or built as asked: unknown name, bad sizes or options, too little data."""


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Sizes:
    """Examples per split, and the retrieval pool (the `search` validation/test splits are pools of at most
    `pool` functions each, query i's gold being function i). For `defect` both versions of a function
    count as examples."""

    train: int = 2400
    validation: int = 500
    test: int = 1000
    pool: int = 1000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TaskError(f"sizes: {f.name} must be a non-negative integer, got {value!r}")

    @classmethod
    def of(cls, value: Sizes | Mapping[str, int] | Callable[[], Any] | None) -> Sizes:
        """A Sizes from a Sizes, a mapping with some of its fields, a callable returning either, or None
        (the defaults, which are the `full` budget's)."""
        if value is None:
            return cls()
        if isinstance(value, Sizes):
            return value
        if callable(value) and not isinstance(value, Mapping):
            return cls.of(value())
        if not isinstance(value, Mapping):
            raise TaskError(f"sizes must be a Sizes or a mapping, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise TaskError(
                f"sizes: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**{k: value[k] for k in known if k in value})

    def split(self, name: str) -> int:
        return getattr(self, name)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Example:
    """One input. Classification: `text` (and `text_pair` for pair tasks) -> `label`. Retrieval: `text`
    is the query, `text_pair` the code; in the validation/test pools `label` is the index of the
    example's own code in the split (always its own position). `meta` says where it came from and, under
    "kind", which group `score` reports it in (a bug kind, a language, an exception type)."""

    text: str
    text_pair: str | None = None
    label: int = 0
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskData:
    """A built task: examples per split, class names, the chance level of its metric on its test split,
    where the data came from (`provenance`: sources with package, version and licence; counts), and a
    fingerprint of the content (`data_fingerprint`: sha256 of its canonical serialization)."""

    task: str
    splits: dict[str, list[Example]]
    provenance: dict[str, Any]
    labels: list[str] = field(default_factory=list)
    chance: float | None = None
    fingerprint: str = ""


@dataclass
class Built:
    """What a builder returns: examples per split, the class names, and notes for the provenance."""

    splits: dict[str, list[Example]]
    labels: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- build context

Loader = Callable[[str, bool], Corpus]  # (language, with site-packages) -> Corpus


class BuildContext:
    """Everything a builder may use: the language, sizes, seed, resolved options, and the corpus of any
    language split by source file (`splits(lang)`), loaded once. `rng(*parts)` gives a random source that
    depends only on the seed and `parts`, so every builder is deterministic."""

    def __init__(
        self, lang: str, sizes: Sizes, seed: int, options: Mapping[str, Any], loader: Loader
    ) -> None:
        self.lang = lang
        self.sizes = sizes
        self.seed = seed
        self.options = dict(options)
        self._loader = loader
        self._splits: dict[str, dict[str, list[Function]]] = {}
        self._extra: dict[str, list[Function]] = {}
        self.sources: list[dict[str, Any]] = []

    def rng(self, *parts: Any) -> random.Random:
        return random.Random("\0".join(map(str, (self.seed, *parts))))

    def _record(self, corpus: Corpus) -> None:
        for p in corpus.provenance:
            entry = {k: p.get(k) for k in ("source", "package", "version", "licence", "functions")}
            entry["language"] = corpus.language
            if entry not in self.sources:
                self.sources.append(entry)

    def splits(self, lang: str | None = None) -> dict[str, list[Function]]:
        """`lang`'s functions split by file (train/validation/test, no file in two splits)."""
        lang = lang or self.lang
        if lang not in self._splits:
            corpus = self._loader(lang, False)
            self._record(corpus)
            self._splits[lang] = split_by_file(corpus.functions, seed=self.seed)
        return self._splits[lang]

    def extra_train(self, lang: str) -> list[Function]:
        """More training functions: installed site-packages for Python (near-duplicates of the standard
        library removed; the standard library's own split is unchanged), nothing for other languages."""
        if lang != "python":
            return []
        if lang not in self._extra:
            corpus = self._loader(lang, True)
            extra = [f for f in corpus.functions if f.source.startswith("site-packages:")]
            self._record(
                Corpus(lang, extra, [p for p in corpus.provenance if p["source"].startswith("site-")])
            )
            self._extra[lang] = extra
        return self._extra[lang]


def take(items: Sequence[Any], n: int, rng: random.Random) -> list[Any]:
    """A seeded random sample of at most n items, in random order."""
    items = list(items)
    rng.shuffle(items)
    return items[:n]


def balanced(
    order: Sequence[int],
    half: int,
    rng: random.Random,
    positive: Callable[[int], Example | None],
    negative: Callable[[int], Example | None],
    eligible: Callable[[int], bool] = lambda i: True,
) -> list[Example]:
    """Up to `half` positives and as many negatives, walking `order`: each eligible item becomes a
    positive or a negative by a fair coin (the one side once the other is full); a builder that returns
    None skips the item. Both sides are cut to the shorter, then shuffled together."""
    pos: list[Example] = []
    neg: list[Example] = []
    for i in order:
        if len(pos) >= half and len(neg) >= half:
            break
        if not eligible(i):
            continue
        want_pos = len(pos) < half and (len(neg) >= half or rng.random() < 0.5)
        ex = positive(i) if want_pos else negative(i)
        if ex is not None:
            (pos if want_pos else neg).append(ex)
    n = min(len(pos), len(neg))
    examples = pos[:n] + neg[:n]
    rng.shuffle(examples)
    return examples


# ------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TaskSpec:
    """A registered task kind: its builder, head (`classify`: text or text pair -> one of `labels`;
    `retrieval`: bi-encoder, no head), metric (`accuracy` or `mrr`) and its chance level (balanced
    classes: 1/len(labels); MRR: that of a random ranking of the full pool)."""

    kind: str
    head: Literal["classify", "retrieval", "generate"]
    metric: Literal["accuracy", "mrr", "text"]
    labels: list[str]
    chance: float
    languages: tuple[str, ...]
    builder: Callable[[BuildContext], Built]
    summary: str = ""
    pair: bool = False  # classify inputs are (text, text_pair)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # builder options and their defaults
    labels_by_language: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def task_name(self, lang: str) -> str:
        return f"{self.kind}-{lang}"

    def for_language(self, lang: str) -> TaskSpec:
        """This spec with the class names of `lang` when they differ per language (exception types)."""
        labels = self.labels_by_language.get(lang)
        if not labels:
            return self
        return _replace(self, labels=list(labels), chance=1 / len(labels))

    def options(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "(none)"
            raise TaskError(f"task '{self.kind}' has no option(s) {', '.join(unknown)}; its options: {known}")
        return {**self.defaults, **given}

    def build(
        self,
        lang: str,
        *,
        sizes: Sizes | Mapping[str, int] | None = None,
        seed: int = 0,
        cache: str | Path | None = None,
        dirs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> TaskData:
        """Build from the corpora (not cached; see `build_task`). `cache` is the corpus cache folder
        (where `sefusion corpus fetch` put the sources; default $SEFUSION_CACHE or ~/.cache/sefusion);
        `dirs` maps a language to source trees or JSONL files that replace its default corpus."""
        lang = self._check_language(lang)
        corpus_cache = Path(cache).expanduser() if cache is not None else default_cache_dir()
        dirs = _normalize_dirs(dirs)

        def loader(language: str, site_packages: bool) -> Corpus:
            paths = dirs.get(language)
            return load_corpus(
                language,
                cache_dir=corpus_cache,
                dirs=paths,
                seed=seed,
                site_packages=site_packages and not paths,
            )

        return self._run(lang, Sizes.of(sizes), seed, options, loader)

    def build_from(
        self,
        functions: Mapping[str, Sequence[Function]] | Sequence[Function],
        lang: str,
        *,
        sizes: Sizes | Mapping[str, int] | None = None,
        seed: int = 0,
        options: Mapping[str, Any] | None = None,
        extra_train: Sequence[Function] = (),
    ) -> TaskData:
        """Build from functions in memory (a list for one language, or language -> list), split by file.
        `extra_train` stands in for site-packages (functions only the train split may use)."""
        lang = self._check_language(lang)
        by_lang = dict(functions) if isinstance(functions, Mapping) else {lang: list(functions)}

        def loader(language: str, site_packages: bool) -> Corpus:
            if language not in by_lang:
                raise TaskError(f"task {self.task_name(lang)}: no {language} functions were given")
            own = list(by_lang[language])
            extra = [_as_site(f) for f in extra_train] if site_packages else []
            prov = [{"source": "memory", "package": "memory", "version": None, "licence": None}]
            if extra:
                prov.append({"source": "site-packages:memory", "package": "memory", "version": None})
            return Corpus(language, own + extra, prov)

        return self._run(lang, Sizes.of(sizes), seed, options, loader)

    def _check_language(self, lang: str) -> str:
        if lang == "multi" and self.languages == ("multi",):
            return lang
        try:
            lang = canonical_language(lang)
        except CorpusError:
            lang = lang.strip().lower()
        if lang not in self.languages:
            raise TaskError(
                f"task '{self.kind}' has no language {lang!r}; available: "
                + ", ".join(self.task_name(x) for x in self.languages)
            )
        return lang

    def _run(self, lang: str, sizes: Sizes, seed: int, options: Any, loader: Loader) -> TaskData:
        opts = self.options(options)
        ctx = BuildContext(lang, sizes, seed, opts, loader)
        built = self.builder(ctx)
        spec = self.for_language(lang)
        labels = built.labels or list(spec.labels)
        counts = {s: len(built.splits.get(s, [])) for s in SPLITS}
        if counts["train"] == 0 or (counts["test"] == 0 and sizes.test > 0):
            raise TaskError(
                f"task {self.task_name(lang)}: the corpus yields too few examples "
                f"(train {counts['train']}, validation {counts['validation']}, test {counts['test']}); "
                "use a larger corpus (--dir LANG=PATH) or `sefusion corpus fetch`"
            )
        test = built.splits.get("test", [])
        chance: float | None = None  # a generative task (prompt -> text) has no chance level
        if self.metric == "mrr":
            chance = mrr_chance(len(test)) if test else None
        elif self.head != "generate":
            chance = _accuracy_chance(test, len(labels))
        provenance = {
            "task": self.task_name(lang),
            "kind": self.kind,
            "language": lang,
            "seed": seed,
            "sizes": sizes.as_dict(),
            "options": opts,
            "counts": counts,
            "sources": ctx.sources,
            **built.info,
        }
        splits = {s: list(built.splits.get(s, [])) for s in SPLITS}
        data = TaskData(self.task_name(lang), splits, provenance, labels, chance)
        provenance["fingerprint"] = fingerprint = data_fingerprint(data)  # recorded with the data
        return _replace(data, fingerprint=fingerprint)


def _as_site(f: Function) -> Function:
    src = f.source if f.source.startswith("site-packages:") else f"site-packages:{f.source}"
    return _replace(f, source=src, path=f"site-packages/{f.path}")


def _accuracy_chance(test: Sequence[Example], num_labels: int) -> float | None:
    """The best constant guess's accuracy on the test split (1/num_labels when the classes are balanced)."""
    if not test:
        return 1 / num_labels if num_labels else None
    counts: dict[int, int] = {}
    for ex in test:
        counts[ex.label] = counts.get(ex.label, 0) + 1
    return max(counts.values()) / len(test)


class TaskRegistry(Registry[TaskSpec]):
    """Kind -> TaskSpec (the generic registry), plus the task names KIND-LANG that exist."""

    def __init__(self, what: str = "task kind", load: Callable[[], None] | None = None) -> None:
        super().__init__(what, lambda spec: spec.kind, TaskError, load or (lambda: _load_builtin_tasks()))

    def kinds(self) -> list[str]:
        return self.keys()

    def names(self) -> list[str]:
        """Every task name: KIND-LANG for each kind and language it supports."""
        return [s.task_name(lang) for s in self for lang in s.languages]


TASKS = TaskRegistry()  # the encoder tasks (classification and retrieval heads)
# prompt -> text tasks for causal code LMs (sefusion.tasks.generative): a registry of their own, so that
# nothing built for encoders (the study, data-aware merging) can pick one up by accident
GENERATIVE_TASKS = TaskRegistry("generative task kind", lambda: _load_generative_tasks())


def register_task(
    kind: str,
    *,
    head: Literal["classify", "retrieval", "generate"],
    metric: Literal["accuracy", "mrr", "text"],
    labels: Sequence[str] = (),
    chance: float | None = None,
    languages: Sequence[str] = LANGUAGES,
    pair: bool = False,
    defaults: Mapping[str, Any] | None = None,
    labels_by_language: Mapping[str, Sequence[str]] | None = None,
    registry: TaskRegistry | None = None,
) -> Callable[[Callable[[BuildContext], Built]], Callable[[BuildContext], Built]]:
    """Register a builder as task kind `kind` (in `registry`, default TASKS); its docstring's first line
    is the task's summary."""

    def deco(fn: Callable[[BuildContext], Built]) -> Callable[[BuildContext], Built]:
        doc = (fn.__doc__ or "").strip()
        level = chance if chance is not None else (1 / len(labels) if labels else 0.0)
        spec = TaskSpec(
            kind,
            head,
            metric,
            list(labels),
            level,
            tuple(languages),
            fn,
            doc.splitlines()[0] if doc else "",
            pair,
            dict(defaults or {}),
            {k: tuple(v) for k, v in (labels_by_language or {}).items()},
        )
        (TASKS if registry is None else registry).add(spec)
        fn.spec = spec  # type: ignore[attr-defined]
        return fn

    return deco


_loaded = False


def _load_builtin_tasks() -> None:
    """Import the task modules once; importing one registers its kind."""
    global _loaded
    if not _loaded:
        _loaded = True
        from . import clone, consistency, defect, exception, langid, naming, search  # noqa: F401


def _load_generative_tasks() -> None:
    from . import generative  # noqa: F401


def task_names() -> list[str]:
    """All task names (`clone-go`, ..., `langid-multi`, ...)."""
    return TASKS.names()


def get_task(name: str) -> tuple[TaskSpec, str]:
    """`defect-python` -> (the defect spec with Python's labels, "python"). Language aliases work
    (`defect-py`); an unknown name raises TaskError listing the names that exist."""
    text = name.strip().lower()
    kind, sep, lang = text.rpartition("-")
    available = ", ".join(task_names())
    if not sep:
        if text in TASKS:
            spec = TASKS.get(text)
            raise TaskError(
                f"task '{name}' needs a language: " + ", ".join(spec.task_name(x) for x in spec.languages)
            )
        raise TaskError(f"unknown task '{name}'; available: {available}")
    if kind not in TASKS:
        if kind in GENERATIVE_TASKS or text in GENERATIVE_TASKS:
            raise TaskError(
                f"task '{name}' is a generative task (prompt -> text, for causal code LMs); this takes "
                f"the encoder tasks: {available}"
            )
        raise TaskError(f"unknown task '{name}'; available: {available}")
    spec = TASKS.get(kind)
    try:
        lang = spec._check_language(lang)
    except TaskError:
        raise TaskError(f"unknown task '{name}'; available: {available}") from None
    return spec.for_language(lang), lang


# ------------------------------------------------------------------------------------ cached building


def _normalize_dirs(dirs: Mapping[str, Any] | None) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for lang, paths in (dirs or {}).items():
        key = "c" if lang.strip().lower() == "c" else canonical_language(lang)
        items = [paths] if isinstance(paths, (str, Path)) else list(paths)
        out[key] = [Path(p).expanduser() for p in items]
    return out


def _tree_stamp(path: Path, lang: str) -> Any:
    """What identifies a source tree's content cheaply: (file, size, mtime) of its `lang` files."""
    if path.is_file():
        st = path.stat()
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]
    if not path.is_dir():
        return [str(path), "missing"]
    h = hashlib.blake2b(digest_size=12)
    exts = EXTENSIONS.get(lang, ())
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(exts):
                st = os.stat(os.path.join(dirpath, name))
                h.update(f"{os.path.join(dirpath, name)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return [str(path.resolve()), h.hexdigest()]


def corpus_key(lang: str, dirs: Mapping[str, list[Path]], cache: Path, site_packages: bool) -> Any:
    """A cheap fingerprint of the sources `load_corpus(lang, ...)` would read (no extraction)."""
    from .corpus import EXTRACTOR_VERSION, _site_packages_key
    from .corpus_debian import fetched

    if dirs.get(lang):
        return [EXTRACTOR_VERSION, lang, [_tree_stamp(p, lang) for p in dirs[lang]]]
    if lang == "python":
        key: list[Any] = [
            EXTRACTOR_VERSION,
            "python-stdlib",
            platform.python_version(),
            sysconfig.get_paths()["stdlib"],
        ]
        if site_packages:
            key += ["site-packages", sys.prefix, _site_packages_key()]
        return key
    return [
        EXTRACTOR_VERSION,
        lang,
        sorted([p["source"], str(p.get("version"))] for _, p in fetched(lang, cache)),
    ]


def code_version(spec: TaskSpec) -> str:
    """Hash of the source of the task machinery and of `spec`'s builder module: a builder edited since
    the data was cached builds the data again, without anyone bumping a version number."""
    import inspect

    h = hashlib.blake2b(str(TASKS_VERSION).encode(), digest_size=8)
    here = Path(__file__).parent
    files = [here / "base.py", here / "_code.py", here / "_mutate.py"]
    module = inspect.getsourcefile(spec.builder)
    if module:
        files.append(Path(module))
    for f in files:
        try:
            h.update(f.read_bytes())
        except OSError:
            h.update(f.name.encode())
    return h.hexdigest()


def _task_languages(spec: TaskSpec, lang: str) -> list[str]:
    return list(LANGUAGES) if lang == "multi" else [lang]


def build_task(
    name: str,
    *,
    sizes: Sizes | Mapping[str, int] | Callable[[], Any] | None = None,
    seed: int = 0,
    cache: str | Path | None = None,
    dirs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    corpus_cache: str | Path | None = None,
    refresh: bool = False,
) -> TaskData:
    """Build task `name` (e.g. `defect-python`), or read it back from CACHE/tasks/ when the same task,
    sizes, seed, options and corpus sources were built before.

    `cache`: where built tasks are kept (default $SEFUSION_CACHE or ~/.cache/sefusion); `corpus_cache`:
    where the corpora live (same default); `dirs`: language -> source tree(s) or JSONL file(s) replacing
    that language's default corpus; `refresh`: build again and overwrite the cached copy.
    """
    spec, lang = get_task(name)
    return build_spec(spec, lang, sizes=sizes, seed=seed, cache=cache, dirs=dirs, options=options,
                      corpus_cache=corpus_cache, refresh=refresh)  # fmt: skip


def build_spec(
    spec: TaskSpec,
    lang: str,
    *,
    sizes: Sizes | Mapping[str, int] | Callable[[], Any] | None = None,
    seed: int = 0,
    cache: str | Path | None = None,
    dirs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    corpus_cache: str | Path | None = None,
    refresh: bool = False,
) -> TaskData:
    """`build_task` for a spec already looked up (an encoder or a generative task)."""
    sz = Sizes.of(sizes)
    opts = spec.options(options)
    store = Path(cache).expanduser() if cache is not None else default_cache_dir()
    corpora = Path(corpus_cache).expanduser() if corpus_cache is not None else default_cache_dir()
    norm_dirs = _normalize_dirs(dirs)
    site = bool(opts.get("site_packages"))
    key = {
        "v": TASKS_VERSION,
        "code": code_version(spec),
        "task": spec.task_name(lang),
        "sizes": sz.as_dict(),
        "seed": seed,
        "options": opts,
        "corpus": [corpus_key(x, norm_dirs, corpora, site) for x in _task_languages(spec, lang)],
    }
    digest = hashlib.blake2b(
        json.dumps(key, sort_keys=True, default=str).encode(), digest_size=10
    ).hexdigest()
    path = store / "tasks" / f"{spec.task_name(lang)}-{digest}.jsonl.gz"
    if path.is_file() and not refresh:
        data = read_task_data(path)
        if data is not None:
            return data
    data = spec.build(lang, sizes=sz, seed=seed, cache=corpora, dirs=norm_dirs, options=opts)
    data.provenance["cache_key"] = digest
    write_task_data(data, path)
    return data


def write_task_data(data: TaskData, path: Path) -> None:
    """JSONL.gz: a header line (task, labels, chance, fingerprint, provenance), then one line per example."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with gzip.open(tmp, "wt", encoding="utf-8") as fh:
            head = {
                "task": data.task,
                "labels": data.labels,
                "chance": data.chance,
                "fingerprint": data.fingerprint,
                "provenance": data.provenance,
            }
            fh.write(json.dumps(head, default=str) + "\n")
            for split in SPLITS:
                for ex in data.splits.get(split, []):
                    rec = {"s": split, "t": ex.text, "p": ex.text_pair, "l": ex.label, "m": dict(ex.meta)}
                    fh.write(json.dumps(rec) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_task_data(path: Path) -> TaskData | None:
    """A TaskData written by `write_task_data`, or None when the file cannot be read."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            head = json.loads(fh.readline())
            splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
            for line in fh:
                r = json.loads(line)
                splits[r["s"]].append(Example(r["t"], r["p"], r["l"], r["m"]))
        return TaskData(
            head["task"], splits, head["provenance"], head["labels"], head["chance"], head["fingerprint"]
        )
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None


def canonical_lines(data: TaskData):
    """The canonical serialization of a task's data: a header (task, labels), then each example of
    train, validation, test in order as one line of JSON with sorted keys and no spaces."""

    def line(obj: Any) -> bytes:
        return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    yield line({"task": data.task, "labels": list(data.labels)})
    for split in SPLITS:
        for ex in data.splits.get(split, []):
            yield line({"split": split, "text": ex.text, "pair": ex.text_pair, "label": int(ex.label),
                        "meta": dict(ex.meta or {})})  # fmt: skip


def data_fingerprint(data: TaskData) -> str:
    """sha256 of the canonical serialization of the task's splits (`canonical_lines`): equal exactly when
    two builds yield the same examples, labels and metadata in the same order."""
    h = hashlib.sha256()
    for chunk in canonical_lines(data):
        h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- metrics


def mrr_chance(n: int) -> float:
    """Expected MRR of a random ranking of n candidates with one gold each: H_n / n."""
    if n < 1:
        raise TaskError(f"a retrieval pool needs at least one candidate, got {n}")
    return sum(1 / k for k in range(1, n + 1)) / n


def mrr(similarity: Any, gold: Sequence[int]) -> float:
    """Mean reciprocal rank of each query's gold candidate.

    `similarity` (Q, P): query i's score for candidate j (a tensor, array or nested lists); `gold[i]`:
    the index of query i's right candidate. Ties count against the query (the gold's rank is the number
    of candidates scoring at least as high, itself included), so a model that scores everything the
    same gets 1/P, not a lucky rank. MRR = mean_i 1 / rank_i (CodeSearchNet, Husain et al. 2019).
    """
    return float((1.0 / gold_ranks(similarity, gold)).mean())


def gold_ranks(similarity: Any, gold: Sequence[int]) -> Any:
    """Rank of each query's gold candidate (1 = first; ties count against the query), as in `mrr`."""
    import numpy as np

    if hasattr(similarity, "detach"):
        similarity = similarity.detach().cpu().double().numpy()
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2:
        raise TaskError(f"mrr: similarity must be a (queries, candidates) matrix, got shape {s.shape}")
    q, p = s.shape
    if len(gold) != q:
        raise TaskError(f"mrr: {q} queries but {len(gold)} gold indices")
    if q == 0:
        raise TaskError("mrr: no queries")
    g = np.asarray(gold, dtype=np.int64)
    if g.min() < 0 or g.max() >= p:
        raise TaskError(f"mrr: gold indices must be in [0, {p}), got {int(g.min())}..{int(g.max())}")
    if not np.isfinite(s).all():
        raise TaskError("mrr: the similarity matrix holds NaN or infinite values")
    right = s[np.arange(q), g][:, None]  # (Q, 1)
    return (s >= right).sum(axis=1)  # (Q,)


def _as_labels(predictions: Any) -> list[int]:
    """Class indices from a list of ints or from (N, C) scores/logits (argmax)."""
    import numpy as np

    if hasattr(predictions, "detach"):
        predictions = predictions.detach().cpu().numpy()
    arr = np.asarray(predictions)
    if arr.ndim == 2:
        arr = arr.argmax(axis=1)
    if arr.ndim != 1:
        raise TaskError(f"predictions must be N labels or (N, classes) scores, got shape {arr.shape}")
    return [int(x) for x in arr.tolist()]


def score(spec: TaskSpec, predictions: Any, examples: Sequence[Example]) -> dict[str, Any]:
    """The task's metric on `examples`: {"score", "n", "per_kind"}.

    Classification: `predictions` are class indices (or (N, classes) logits); score = accuracy, and
    `per_kind` the accuracy within each group named by the examples' meta "kind" (defect: a bug kind
    with its clean originals, so each group is balanced and its chance level is 0.5; langid: a language;
    exception: a type). Retrieval: `predictions` is the (queries, candidates) similarity matrix of the
    pool; score = MRR with gold = each example's label; `per_kind` is empty. `per_example`: each
    example's own score (0/1 correctness, or its reciprocal rank), whose mean is `score`.
    """
    if spec.metric == "mrr":
        ranks = gold_ranks(predictions, [ex.label for ex in examples])
        rr = [1.0 / int(r) for r in ranks]
        return {"score": sum(rr) / len(rr), "n": len(rr), "per_kind": {}, "per_example": rr}
    labels = _as_labels(predictions)
    if len(labels) != len(examples):
        raise TaskError(f"{len(labels)} predictions for {len(examples)} examples")
    if not examples:
        raise TaskError("no examples to score")
    right = [int(p == ex.label) for p, ex in zip(labels, examples, strict=True)]
    groups: dict[str, list[int]] = {}
    for r, ex in zip(right, examples, strict=True):
        kind = ex.meta.get("kind") if ex.meta else None
        if kind is not None:
            groups.setdefault(str(kind), []).append(r)
    per_kind = {k: sum(v) / len(v) for k, v in sorted(groups.items())}
    return {"score": sum(right) / len(right), "n": len(right), "per_kind": per_kind, "per_example": right}


def example_clusters(examples: Sequence[Example]) -> list[str]:
    """The source file of each example (meta "path"), the unit a cluster bootstrap resamples: examples
    of one file are not independent. An example without a path is its own cluster."""
    return [
        str(ex.meta["path"]) if ex.meta and "path" in ex.meta else f"#example{i}"
        for i, ex in enumerate(examples)
    ]


def first_sentence(text: str) -> str:
    """The first sentence of a doc paragraph (up to a period, ! or ? followed by a space)."""
    for i, ch in enumerate(text):
        if ch in ".!?" and (i + 1 == len(text) or text[i + 1] == " "):
            prev = text[max(0, i - 4) : i].lower()
            if ch == "." and (
                prev.endswith(("e.g", "i.e", "etc", "vs")) or (i > 0 and text[i - 1].isdigit())
            ):
                continue
            return text[: i + 1].strip()
    return text.strip()


__all__ = [
    "GENERATIVE_TASKS", "SPLITS", "TASKS", "BuildContext", "Built", "Example", "Sizes", "TaskData",
    "TaskError", "TaskSpec", "build_spec", "build_task", "canonical_lines", "data_fingerprint",
    "example_clusters", "first_sentence", "get_task", "gold_ranks", "mrr", "mrr_chance", "read_task_data",
    "register_task", "score", "take", "task_names", "write_task_data",
]  # fmt: skip
