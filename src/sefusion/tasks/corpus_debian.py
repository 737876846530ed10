"""Go, Java, JavaScript, PHP and Ruby sources from Debian packages, fetched without installing them.

`fetch` runs `apt-get download PKG` in a temporary folder and `dpkg-deb -x` into
`CACHE/LANG/PKG-VERSION/`; Java's `src.zip` is unpacked there too. Next to each folder,
`CACHE/LANG/PKG-VERSION.json` records package, version, licence (the first `License:` line of
`usr/share/doc/PKG/copyright`), the source root and when it was fetched; it is written last, so a folder
without it is an interrupted fetch and is redone. `CACHE/provenance.json` lists every fetched package.

Default packages (Debian 12; the newest golang-*-src / openjdk-*-source / librubyX.Y when the preferred
one is gone): Go `golang-1.19-src` (the Go tree), Java `openjdk-17-source` (the JDK's src.zip), Ruby
`libruby3.1` (the standard library and bundled gems), JavaScript `mediawiki` + `eslint` + `node-lodash`
(JSDoc-documented plain JavaScript), PHP `mediawiki` (PHPDoc-documented PHP). A package that serves two
languages is downloaded once; the second language's folder links to the first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from .corpus_extract import EXTENSIONS, LANGUAGES, canonical_language
from .corpus_types import CorpusError

# Per language: packages to fetch; a "re:" entry stands for the newest package whose name matches,
# used when the name before it is not in apt's lists.
DEFAULT_PACKAGES: dict[str, tuple[str, ...]] = {
    "go": ("golang-1.19-src", r"re:^golang-(\d+)\.(\d+)-src$"),
    "java": ("openjdk-17-source", r"re:^openjdk-(\d+)-source$"),
    "ruby": ("libruby3.1", r"re:^libruby(\d+)\.(\d+)$"),
    "javascript": ("mediawiki", "eslint", "node-lodash"),
    "php": ("mediawiki",),
}
FETCH_LANGUAGES = tuple(DEFAULT_PACKAGES)

# Licences of packages whose doc folder is a link into another package (not in the .deb we read).
KNOWN_LICENCES = {
    "openjdk-": "GPL-2.0 WITH Classpath-exception-2.0 (OpenJDK; copyright file in openjdk-*-jre-headless)",
}


def _tools() -> dict[str, str]:
    found = {t: shutil.which(t) for t in ("apt-get", "apt-cache", "dpkg-deb")}
    missing = [t for t, p in found.items() if p is None]
    if missing:
        raise CorpusError(
            f"`sefusion corpus fetch` downloads Debian packages and needs apt-get, apt-cache and dpkg-deb; "
            f"{', '.join(missing)} not found on PATH (not a Debian-based system?). Pass source trees "
            f"instead: `sefusion corpus stats --dir go=PATH` or load_corpus(..., dirs=[PATH])"
        )
    return found  # type: ignore[return-value]


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise CorpusError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {' / '.join(tail)}")
    return proc.stdout


def _candidate(tools: dict[str, str], package: str) -> tuple[str, int] | None:
    """(version, download size) apt would fetch, or None when apt's lists do not have the package."""
    proc = subprocess.run(
        [tools["apt-cache"], "show", "--no-all-versions", package], capture_output=True, text=True
    )
    fields = dict(re.findall(r"^(Version|Size): (.+)$", proc.stdout, re.M))
    if proc.returncode != 0 or "Version" not in fields:
        return None
    return fields["Version"], int(fields.get("Size", 0))


def _newest(tools: dict[str, str], pattern: str) -> str | None:
    rx = re.compile(pattern)
    prefix = re.match(r"\^?([A-Za-z0-9.+-]*)", pattern).group(1)  # apt-cache pkgnames takes a prefix
    names = _run([tools["apt-cache"], "pkgnames", prefix]).split()
    hits = [(tuple(int(g) for g in m.groups()), n) for n in names if (m := rx.match(n))]
    return max(hits)[1] if hits else None


def _markers(lang: str, cache: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted((cache / lang).glob("*.json")) if (cache / lang).is_dir() else []:
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return [m for m in out if (cache / lang / m.get("dir", "")).is_dir()]


def fetched(lang: str, cache_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """(source root, provenance) of every package fetched for `lang` into `cache_dir`."""
    cache = Path(cache_dir)
    lang = canonical_language(lang)
    return [(cache / lang / m["dir"] / m["root"], m) for m in _markers(lang, cache)]


def _licence(tree: Path, package: str) -> tuple[str, str]:
    """(licence, where it was read) from the package's copyright file."""
    doc = tree / "usr/share/doc" / package
    copyright_file = doc / "copyright"
    if copyright_file.is_file() and not doc.is_symlink():
        for line in copyright_file.read_text(errors="replace").splitlines():
            if line.startswith("License:") and line[8:].strip():
                return line[8:].strip(), f"usr/share/doc/{package}/copyright"
        return "see copyright file", f"usr/share/doc/{package}/copyright"
    for prefix, licence in KNOWN_LICENCES.items():
        if package.startswith(prefix):
            return licence, "sefusion's table of known licences"
    target = os.readlink(doc) if doc.is_symlink() else None
    where = f"usr/share/doc/{package} links to {target}" if target else "no copyright file"
    return "unknown", where


def _unpack_src_zips(tree: Path, exts: tuple[str, ...]) -> None:
    """Java ships its sources as src.zip: unpack the source files next to it, drop the zip."""
    for z in list(tree.rglob("src.zip")):
        with zipfile.ZipFile(z) as zf:
            for info in zf.infolist():
                name = Path(info.filename)
                if (
                    info.is_dir()
                    or name.is_absolute()
                    or ".." in name.parts
                    or not info.filename.endswith(exts)
                ):
                    continue
                zf.extract(info, z.parent / "src")
        z.unlink()


def _source_root(tree: Path, exts: tuple[str, ...]) -> str:
    """The deepest folder holding every source file of the language (relative to the package tree)."""
    files = [p for p in tree.rglob("*") if p.suffix in exts and p.is_file()]
    if not files:
        return "."
    common = os.path.commonpath([str(p.parent) for p in files])
    return Path(common).relative_to(tree).as_posix()


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _write_provenance(cache: Path) -> None:
    everything = {lang: _markers(lang, cache) for lang in FETCH_LANGUAGES}
    tmp = cache / "provenance.json.tmp"
    tmp.write_text(json.dumps({k: v for k, v in everything.items() if v}, indent=2) + "\n")
    tmp.replace(cache / "provenance.json")


def fetch(
    langs: list[str] | tuple[str, ...] | None = None,
    cache_dir: str | Path | None = None,
    *,
    packages: dict[str, tuple[str, ...]] | None = None,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Fetch the packages of `langs` (default: go, java, javascript, php, ruby) into `cache_dir`.

    Packages already there are left alone without calling apt. Returns the provenance records of the
    languages asked for. Raises CorpusError off Debian (no apt-get / apt-cache / dpkg-deb) and when a
    package is not in apt's lists.
    """
    from .corpus import default_cache_dir

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    langs = [canonical_language(x) for x in (langs or FETCH_LANGUAGES)]
    if "python" in langs:
        raise CorpusError("Python needs no fetch: its corpus is the standard library (and site-packages)")
    wanted = {lang: (packages or {}).get(lang, DEFAULT_PACKAGES[lang]) for lang in langs}
    tools: dict[str, str] | None = None
    records: list[dict[str, Any]] = []
    changed = False
    for lang, specs in wanted.items():
        have = _markers(lang, cache)
        for spec in specs:
            rx = re.compile(spec[3:]) if spec.startswith("re:") else None
            done = [m for m in have if (rx.match(m["package"]) if rx else m["package"] == spec)]
            if rx and any(m["package"] in specs for m in have):
                continue  # the preferred package is there: no fallback needed
            if done:
                _say(quiet, f"{lang}: {done[0]['package']} {done[0]['version']} already in {cache / lang}")
                records += done
                continue
            tools = tools or _tools()
            name = _newest(tools, spec[3:]) if rx else spec
            info = _candidate(tools, name) if name else None
            if info is None:
                if not rx and any(s.startswith("re:") for s in specs):
                    continue  # try the pattern after it
                hint = "; run `apt-get update` first?" if not rx else ""
                raise CorpusError(f"no Debian package {name or spec[3:]!r} for {lang} in apt's lists{hint}")
            records.append(_fetch_one(tools, cache, lang, name, *info, quiet=quiet))
            have = _markers(lang, cache)
            changed = True
    if changed:
        _write_provenance(cache)
    return records


def _fetch_one(
    tools: dict[str, str], cache: Path, lang: str, package: str, version: str, size: int, *, quiet: bool
) -> dict[str, Any]:
    dirname = re.sub(r"[^A-Za-z0-9.+~-]", "_", f"{package}-{version}")
    target = cache / lang / dirname
    target.parent.mkdir(parents=True, exist_ok=True)
    exts = EXTENSIONS[lang]
    start = time.monotonic()
    other = next(
        (cache / o / dirname for o in LANGUAGES if o != lang and (cache / o / f"{dirname}.json").is_file()),
        None,
    )
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():  # left by an interrupted fetch (its marker is missing)
        shutil.rmtree(target)
    if other is not None:  # the same package was fetched for another language: link, do not download
        _say(quiet, f"{lang}: {package} {version} (already unpacked for {other.parent.name})")
        target.symlink_to(os.path.relpath(other, target.parent))
    else:
        _say(
            quiet, f"{lang}: fetching Debian package {package} {version} ({size / 1e6:.1f} MB) into {target}"
        )
        with tempfile.TemporaryDirectory(prefix="fetch-", dir=cache) as tmp:
            _run([tools["apt-get"], "download", package], cwd=Path(tmp))
            debs = sorted(Path(tmp).glob("*.deb"))
            if not debs:
                raise CorpusError(f"`apt-get download {package}` left no .deb file")
            tree = Path(tmp) / "tree"
            _run([tools["dpkg-deb"], "-x", str(debs[0]), str(tree)])
            _unpack_src_zips(tree, exts)
            tree.rename(target)
    licence, licence_from = _licence(target, package)
    record = {
        "source": f"debian:{package} {version}",
        "language": lang,
        "package": package,
        "version": version,
        "licence": licence,
        "licence_from": licence_from,
        "dir": dirname,
        "root": _source_root(target, exts),
        "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - start, 1),
    }
    marker = cache / lang / f"{dirname}.json"
    marker.with_suffix(".tmp").write_text(json.dumps(record, indent=2) + "\n")
    marker.with_suffix(".tmp").replace(marker)
    return record
