"""Code corpora: documented functions of Go, Java, JavaScript, PHP, Python and Ruby, split by source file.

Sources: the running interpreter's standard library (the Python default), installed site-packages, any
source tree (`from_tree`), Debian source packages fetched into the cache (`corpus_debian.fetch`), and
CodeSearchNet / CodeXGLUE-defect JSONL (`corpus_jsonl`). `load_corpus` puts one language together,
removes near-identical functions and records package, version and licence per source;
`split_by_file` makes train/validation/test splits in which every source file sits in exactly one split.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import gzip
import hashlib
import json
import os
import platform
import random
import re
import sys
import sysconfig
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .corpus_cli import add_corpus_parser, run_corpus
from .corpus_extract import EXTENSIONS, ExtractOptions, canonical_language, extract, skip_reason
from .corpus_split import SPLITS, dedupe, drop_leaks, normalized_key, split_by_file
from .corpus_types import Corpus, CorpusError, Function

__all__ = [
    "SPLITS", "Corpus", "CorpusError", "ExtractOptions", "Function", "add_corpus_parser", "dedupe",
    "default_cache_dir", "drop_leaks", "from_tree", "load_corpus", "normalized_key", "python_site_packages",
    "python_stdlib", "run_corpus", "split_by_file",
]  # fmt: skip


def default_cache_dir() -> Path:
    """`$SEFUSION_CACHE`, else `~/.cache/sefusion`."""
    return Path(os.environ.get("SEFUSION_CACHE") or Path.home() / ".cache" / "sefusion").expanduser()


# ------------------------------------------------------------------------------------------ sources


def _licence_of_tree(root: Path) -> str:
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "COPYING", "COPYING.txt"):
        f = root / name
        if f.is_file():
            first = next((ln.strip() for ln in f.read_text(errors="replace").splitlines() if ln.strip()), "")
            return f"{first[:80]} ({name})" if first else name
    return "unknown"


def _files(root: Path, lang: str, exclude: Iterable[str] = ()) -> list[Path]:
    exts, skip = EXTENSIONS[lang], set(exclude)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".")
            and d != "__pycache__"
            and not any(fnmatch.fnmatchcase(f"{rel}/{d}" if rel != "." else d, pat) for pat in skip)
        )
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(exts))
    return out


def _read_files(
    lang: str, root: Path, files: Iterable[Path], source: str, options: ExtractOptions, progress: bool
) -> tuple[list[Function], int, Counter]:
    functions: list[Function] = []
    skipped: Counter = Counter()
    read = 0
    files = list(files)
    bar = None
    if progress and len(files) > 200:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc=f"{source}", unit="file", leave=False, file=sys.stderr)
    for path in files:
        if bar is not None:
            bar.update()
        rel = path.relative_to(root).as_posix()
        try:
            data = path.read_bytes()
        except OSError:
            skipped["unreadable"] += 1
            continue
        why = skip_reason(rel, data, options)
        if why:
            skipped[why] += 1
            continue
        read += 1
        functions.extend(extract(lang, data, rel, source, options))
    if bar is not None:
        bar.close()
    return functions, read, skipped


def from_tree(
    lang: str,
    root: str | Path,
    *,
    source: str | None = None,
    options: ExtractOptions | None = None,
    exclude: Iterable[str] = (),
    package: str | None = None,
    version: str | None = None,
    licence: str | None = None,
    progress: bool = False,
) -> Corpus:
    """Documented functions of every `lang` file under `root` (`exclude`: folders relative to root)."""
    lang = canonical_language(lang)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CorpusError(f"source tree {str(root)!r} for {lang} is not a folder")
    source = source or f"dir:{root.resolve()}"
    options = options or ExtractOptions()
    functions, read, skipped = _read_files(lang, root, _files(root, lang, exclude), source, options, progress)
    prov = {
        "source": source,
        "package": package or root.resolve().name,
        "version": version,
        "licence": licence or _licence_of_tree(root),
        "files": read,
        "skipped_files": dict(skipped),
        "extracted": len(functions),
        "functions": len(functions),
    }
    return Corpus(lang, functions, [prov])


# Not library code, or not a library that documents itself: tests, the IDE, demos, generated data.
_STDLIB_EXCLUDE = (
    "test", "idlelib", "turtledemo", "tkinter/test", "lib2to3/tests", "ensurepip", "pydoc_data",
    "site-packages", "dist-packages", "lib-dynload", "encodings", "unittest/test", "ctypes/test",
    "distutils/tests", "sqlite3/test", "config-*",
)  # fmt: skip


def python_stdlib(options: ExtractOptions | None = None, *, progress: bool = False) -> Corpus:
    """The running interpreter's standard library (tests, idlelib, turtledemo, site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return from_tree(
        "python",
        root,
        source="python-stdlib",
        options=options,
        exclude=_STDLIB_EXCLUDE,
        package="python",
        version=platform.python_version(),
        licence="PSF-2.0",
        progress=progress,
    )


def _dist_licence(meta: Any) -> str:
    expr = meta.get("License-Expression")
    if expr:
        return expr
    lic = (meta.get("License") or "").strip()
    if lic and "\n" not in lic and len(lic) <= 60 and lic.upper() != "UNKNOWN":
        return lic
    classifiers = [
        c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License")
    ]
    return "; ".join(classifiers) or (lic.splitlines()[0][:60] if lic else "unknown")


def python_site_packages(
    options: ExtractOptions | None = None,
    *,
    paths: Sequence[str | Path] | None = None,
    progress: bool = False,
) -> Corpus:
    """The installed distributions of this environment, one provenance entry (name, version, licence) each."""
    from importlib import metadata

    options = options or ExtractOptions()
    roots = [
        Path(p).resolve()
        for p in (paths or {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    ]
    corpus, seen = Corpus("python"), set()
    dists = sorted(
        metadata.distributions(path=[str(r) for r in roots]), key=lambda d: d.metadata["Name"].lower()
    )
    for dist in dists:
        name, version = dist.metadata["Name"], dist.version
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        files = []
        for f in dist.files or ():
            if f.suffix == ".py":
                full = Path(dist.locate_file(f)).resolve()
                root = next((r for r in roots if full.is_relative_to(r)), None)
                if root is not None and full.is_file():
                    files.append((root, full))
        if not files:
            continue
        source = f"site-packages:{name} {version}"
        functions, read, skipped = [], 0, Counter()
        for root, full in files:
            got, n, why = _read_files("python", root, [full], source, options, False)
            functions += got
            read += n
            skipped += why
        corpus.functions += functions
        corpus.provenance.append(
            {
                "source": source,
                "package": name,
                "version": version,
                "licence": _dist_licence(dist.metadata),
                "files": read,
                "skipped_files": dict(skipped),
                "extracted": len(functions),
                "functions": len(functions),
            }
        )
    return corpus


# ------------------------------------------------------------------------------------------- corpus

EXTRACTOR_VERSION = 2  # part of the extraction cache key: bump when extraction changes what it yields


def _cached(cache: Path | None, key: Any, options: ExtractOptions, build: Callable[[], Corpus]) -> Corpus:
    """`build()`, remembered in CACHE/functions/ under (key, options, EXTRACTOR_VERSION)."""
    if cache is None:
        return build()
    blob = json.dumps([EXTRACTOR_VERSION, key, dataclasses.asdict(options)], sort_keys=True)
    digest = hashlib.blake2b(blob.encode(), digest_size=10).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", str(key if isinstance(key, str) else key[0]))[:60]
    path = cache / "functions" / f"{slug}-{digest}.jsonl.gz"
    if path.is_file():
        try:
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                head = json.loads(fh.readline())
                functions = [Function.from_json(json.loads(line)) for line in fh]
            return Corpus(head["language"], functions, head["provenance"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: build it again
    corpus = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"language": corpus.language, "provenance": corpus.provenance}) + "\n")
        for f in corpus.functions:
            fh.write(json.dumps(f.to_json()) + "\n")
    tmp.replace(path)
    return corpus


def _site_packages_key() -> list[str]:
    from importlib import metadata

    return sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions())


def _from_path(lang: str, path: Path, options: ExtractOptions, progress: bool) -> Corpus:
    from .corpus_jsonl import read_jsonl

    if path.is_file() and path.name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        return read_jsonl(path, language=lang)
    if not path.exists():
        raise CorpusError(f"{lang} source {str(path)!r} does not exist")
    if lang == "c":
        raise CorpusError(f"no extractor for C source trees ({path}); pass CodeXGLUE defect JSONL instead")
    return from_tree(lang, path, options=options, progress=progress)


def load_corpus(
    lang: str,
    *,
    cache_dir: str | Path | None = None,
    dirs: Sequence[str | Path] | None = None,
    max_functions: int | None = None,
    seed: int = 0,
    site_packages: bool = False,
    options: ExtractOptions | None = None,
    dedupe_functions: bool = True,
    use_cache: bool = True,
    progress: bool = False,
) -> Corpus:
    """One language's corpus.

    Sources: `dirs` when given (source trees, or CodeSearchNet / CodeXGLUE JSONL files); otherwise the
    standard library for Python (plus installed site-packages with `site_packages=True`) and the Debian
    packages `corpus fetch` put in `cache_dir` for the other languages. Near-identical functions are
    removed (first kept) unless `dedupe_functions=False`; `max_functions` keeps a seeded random sample.
    What the stdlib, site-packages and fetched packages yield is cached in `cache_dir`/functions/
    (`use_cache=False`: extract again, write nothing).
    """
    lang = lang.strip().lower()
    if lang != "c":  # C comes only from CodeXGLUE defect JSONL
        lang = canonical_language(lang)
    elif not dirs:
        raise CorpusError("C functions come only from CodeXGLUE defect JSONL; pass --dir c=FILE.jsonl")
    options = options or ExtractOptions()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    store = cache if use_cache else None
    corpus = Corpus(lang)
    if dirs:
        for d in dirs:
            corpus.extend(_from_path(lang, Path(d).expanduser(), options, progress))
    elif lang == "python":
        key = f"python-stdlib {platform.python_version()} {sysconfig.get_paths()['stdlib']}"
        corpus.extend(_cached(store, key, options, lambda: python_stdlib(options, progress=progress)))
        if site_packages:
            key = ["site-packages", sys.prefix, *_site_packages_key()]
            corpus.extend(
                _cached(store, key, options, lambda: python_site_packages(options, progress=progress))
            )
    else:
        from .corpus_debian import fetched

        packages = fetched(lang, cache)
        if not packages:
            raise CorpusError(
                f"no {lang} corpus in {cache}; run `sefusion corpus fetch --langs {lang}` "
                f"or pass a source tree with --dir {lang}=PATH"
            )
        for root, prov in packages:

            def build(root: Path = root, prov: dict = prov) -> Corpus:
                part = from_tree(lang, root, source=prov["source"], options=options, progress=progress)
                part.provenance[0].update({k: prov[k] for k in ("package", "version", "licence")})
                return part

            corpus.extend(_cached(store, [prov["source"], lang, str(root)], options, build))
    if dedupe_functions:
        corpus.functions = dedupe(corpus.functions)
    if max_functions is not None and len(corpus.functions) > max_functions:
        rng = random.Random(seed)
        keep = set(rng.sample(range(len(corpus.functions)), max_functions))
        corpus.functions = [f for i, f in enumerate(corpus.functions) if i in keep]
    corpus.recount()
    return corpus
