"""`sefusion corpus fetch | stats`.

Wire it into the main parser with `add_corpus_parser(sub, [common])` and dispatch `corpus` to
`run_corpus(args)`. Imports of the corpus machinery happen inside `run_corpus`, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

FETCH_LANGS = "go,java,javascript,php,ruby"


def add_corpus_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "corpus",
        help="code corpora: fetch Debian sources, count documented functions",
        description="Documented functions of Go, Java, JavaScript, PHP, Python and Ruby for the SE tasks. "
        "Python's default corpus is the standard library; `fetch` gets the others from Debian packages.",
    )
    # -q/-v sit on the leaves only: a parent parser's value would be overwritten by the leaf's default
    p.set_defaults(quiet=False, verbose=False, corpus_command=None)
    sub = p.add_subparsers(dest="corpus_command", metavar="ACTION")
    cache_help = "cache folder (default: $SEFUSION_CACHE or ~/.cache/sefusion)"

    f = sub.add_parser(
        "fetch",
        parents=parents,
        help="download the Debian source packages of each language into the cache (needs apt-get)",
        description="Download Debian packages with `apt-get download` and unpack them with `dpkg-deb -x` "
        "(nothing is installed). Packages already in the cache are skipped.",
    )
    f.add_argument("--langs", default=FETCH_LANGS, help=f"comma-separated languages (default {FETCH_LANGS})")
    f.add_argument("--cache", type=Path, default=None, help=cache_help)

    s = sub.add_parser(
        "stats",
        parents=parents,
        help="count documented functions, files and split sizes per language and source",
        description="Extract each language's corpus and print where it comes from (package, version, "
        "licence), files read, functions found, functions kept after removing near-duplicates, and "
        "the train/validation/test split by file.",
    )
    s.add_argument(
        "--dir",
        action="append",
        default=[],
        dest="dirs",
        metavar="LANG=PATH",
        help="a source tree, or CodeSearchNet / CodeXGLUE-defect JSONL, for LANG (repeatable); "
        "replaces LANG's default sources",
    )
    s.add_argument("--langs", default=None, help="languages (default: those of --dir, else python + fetched)")
    s.add_argument("--cache", type=Path, default=None, help=cache_help)
    s.add_argument("--site-packages", action="store_true", help="add this environment's packages to Python")
    s.add_argument("--min-lines", type=int, default=3, help="fewest code lines a function may have (3)")
    s.add_argument("--max-lines", type=int, default=60, help="most code lines a function may have (60)")
    s.add_argument("--seed", type=int, default=0, help="seed of the split by file (0)")
    s.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    return p


def _parse_dirs(items: list[str]) -> dict[str, list[str]]:
    from .corpus_extract import canonical_language
    from .corpus_types import CorpusError

    out: dict[str, list[str]] = {}
    for item in items:
        lang, sep, path = item.partition("=")
        if not sep or not lang or not path:
            raise CorpusError(f"--dir takes LANG=PATH, got {item!r}")
        lang = "c" if lang.strip().lower() == "c" else canonical_language(lang)
        out.setdefault(lang, []).append(path)
    return out


def _fetch(args: argparse.Namespace) -> int:
    from .corpus_debian import fetch

    langs = [x for x in args.langs.split(",") if x.strip()]
    start = time.monotonic()
    records = fetch(langs, args.cache, quiet=args.quiet)
    if not args.quiet:
        for r in records:
            print(f"{r['language']:<11} {r['package']} {r['version']}  licence: {r['licence']}")
        print(f"done in {time.monotonic() - start:.0f} s; count functions with `sefusion corpus stats`")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from .corpus import default_cache_dir, load_corpus, split_by_file
    from .corpus_debian import FETCH_LANGUAGES, fetched
    from .corpus_extract import ExtractOptions, canonical_language

    dirs = _parse_dirs(args.dirs)
    cache = args.cache or default_cache_dir()
    if args.langs:
        langs = [canonical_language(x) for x in args.langs.split(",") if x.strip()]
    elif dirs:
        langs = list(dirs)
    else:
        langs = ["python"] + [lang for lang in FETCH_LANGUAGES if fetched(lang, cache)]
    options = ExtractOptions(min_lines=args.min_lines, max_lines=args.max_lines)
    report: list[dict[str, Any]] = []
    for lang in langs:
        start = time.monotonic()
        corpus = load_corpus(
            lang,
            cache_dir=cache,
            dirs=dirs.get(lang),
            site_packages=args.site_packages,
            options=options,
            seed=args.seed,
            progress=not args.quiet,
        )
        splits = split_by_file(corpus.functions, seed=args.seed)
        seconds = time.monotonic() - start
        entry = {
            "language": lang,
            "files": sum(p.get("files", 0) for p in corpus.provenance),
            "extracted": sum(p.get("extracted", 0) for p in corpus.provenance),
            "functions": len(corpus.functions),
            "splits": {k: len(v) for k, v in splits.items()},
            "split_files": {k: len({f.path for f in v}) for k, v in splits.items()},
            "seconds": round(seconds, 1),
            "provenance": corpus.provenance,
        }
        report.append(entry)
        sp = entry["splits"]
        print(
            f"{lang}: {entry['functions']} functions kept of {entry['extracted']} documented in "
            f"{entry['files']} files; train/validation/test {sp['train']}/{sp['validation']}/{sp['test']} "
            f"({seconds:.0f} s)"
        )
        shown = sorted(corpus.provenance, key=lambda p: -p["functions"])
        for p in shown[:15]:
            version = f" {p['version']}" if p.get("version") else ""
            print(
                f"  {p['package']}{version}  [{p['licence']}]  files {p.get('files', 0)}, "
                f"documented {p.get('extracted', 0)}, kept {p['functions']}"
            )
        if len(shown) > 15:
            rest = shown[15:]
            print(f"  ... {len(rest)} more sources, kept {sum(p['functions'] for p in rest)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def run_corpus(args: argparse.Namespace) -> int:
    if args.corpus_command == "fetch":
        return _fetch(args)
    if args.corpus_command == "stats":
        return _stats(args)
    print("sefusion corpus: choose an action: fetch or stats (see `sefusion corpus --help`)", file=sys.stderr)
    return 2
