"""The documentation stays true to the code: docs/methods.md names every registered method with its
paper and every parameter with its default, and the repository's docs link only inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sefusion.registry import METHODS

REPO = Path(__file__).resolve().parents[1]
METHODS_MD = REPO / "docs" / "methods.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")  # markdown link targets
PARAM = re.compile(r"`(\w+)` \(")  # "`density` (in (0, 1], default 0.2, per expert)"
DEFAULT = re.compile(r"default:? (`?)([^,;)\s`]+)\1")


def _sections() -> dict[str, str]:
    """'### heading' -> its text, one key per word of the heading ("dare_linear and dare_ties")."""
    out: dict[str, str] = {}
    for block in METHODS_MD.read_text(encoding="utf-8").split("\n### ")[1:]:
        heading, _, body = block.partition("\n")
        for word in heading.split():
            out[word] = body.split("\n## ")[0]
    return out


def _parameters(section: str, method: str) -> str:
    """The paragraph that lists `method`'s parameters, on one line."""
    for para in (p.strip() for p in section.split("\n\n")):
        if para.startswith("Parameters:") or para.startswith(f"`{method}`: parameters"):
            return " ".join(para.split())
    raise AssertionError(f"docs/methods.md: no parameter paragraph for {method}")


def _documented(value: str, default: object) -> bool:
    if isinstance(default, bool):
        return value == str(default).lower()
    if isinstance(default, (int, float)):
        try:
            return float(value) == float(default)
        except ValueError:
            return False
    return value == str(default)


@pytest.mark.parametrize("spec", list(METHODS), ids=lambda s: s.name)
def test_methods_md_documents_method(spec) -> None:
    sections = _sections()
    assert spec.name in sections, f"docs/methods.md has no '### {spec.name}' section"
    section = sections[spec.name]
    assert spec.paper in section, f"{spec.name}: paper {spec.paper} not cited"
    para = _parameters(section, spec.name)
    starts = {m.group(1): m.start() for m in PARAM.finditer(para)}
    assert set(starts) == set(spec.params), (
        f"{spec.name}: documented {sorted(starts)}, code {sorted(spec.params)}"
    )
    ends = sorted(starts.values())[1:] + [len(para)]
    for (name, start), end in zip(sorted(starts.items(), key=lambda kv: kv[1]), ends, strict=True):
        chunk, p = para[start:end], spec.params[name]
        assert ("per expert" in chunk) == p.per_expert, f"{spec.name}.{name}: per-expert flag in the docs"
        if p.default is None:
            continue
        found = DEFAULT.search(chunk)
        assert found and _documented(found.group(2), p.default), (
            f"{spec.name}.{name}: docs say {found.group(0) if found else 'no default'}, code {p.default!r}"
        )


DOCS = [
    "README.md",
    "BENCHMARKS.md",
    "results/README.md",
    *(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")),
]


@pytest.mark.parametrize("doc", DOCS)
def test_docs_link_inside_the_repository(doc: str) -> None:
    path = REPO / doc
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor
        resolved = (path.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(REPO), f"{doc} links outside the repository: {target}"


@pytest.mark.parametrize("doc", ["docs/methods.md", "docs/calibration.md"])
def test_docs_links_resolve(doc: str) -> None:
    path = REPO / doc
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        assert (path.parent / target.split("#")[0]).exists(), f"{doc}: broken link {target}"
