"""Code corpora: extractors on hand-written files, split by file, dedupe, JSONL readers, fetch refusals.

Fast and offline: no network, no apt; the fixtures are in tests/fixtures/corpus/LANG/.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import pytest

from sefusion.errors import SefusionError
from sefusion.tasks import corpus_debian
from sefusion.tasks.corpus import (
    Corpus,
    CorpusError,
    ExtractOptions,
    Function,
    add_corpus_parser,
    dedupe,
    drop_leaks,
    from_tree,
    load_corpus,
    normalized_key,
    run_corpus,
    split_by_file,
)
from sefusion.tasks.corpus import _cached as cached_corpus
from sefusion.tasks.corpus_extract import clean_block_doc, extract, params_of, skip_reason
from sefusion.tasks.corpus_jsonl import read_codesearchnet, read_codexglue_defect, read_jsonl

FIXTURES = Path(__file__).parent / "fixtures" / "corpus"

# (name, params, docstring) of every function each fixture folder must yield, in file order
EXPECTED = {
    "python": [
        ("scale", ("point", "factor", "origin"), "Scale a point away from an origin by a constant factor."),
        ("area", ("self",), "Return the area of the box in square units."),
    ],
    "go": [
        ("Push", ("v",), "Push adds a value on top of the stack and returns the new depth."),
        ("Sum", ("values", "skipNegative", "extra"), "Sum adds up all values, skipping the negative ones when asked."),
    ],
    "java": [
        ("Account", ("opening",), "Creates an account with an opening balance."),
        ("transfer", ("target", "amount", "notes"), "Moves amount from this account to another one."),
    ],
    "javascript": [
        ("clamp", ("value", "low", "rest"), "Clamp a number between two bounds."),
        ("joinPath", ("head",), "Join the parts of a path with slashes."),
        ("pop", (), "Remove and return the oldest item."),
        ("greet", ("name",), "Format a greeting for the given name."),
    ],
    "php": [
        ("total", ("$items", "$tax"), "Sum the prices of all items."),
        ("add", ("$sku", "$count", "$options"), "Add an item to the cart, merging duplicates."),
    ],
    "ruby": [
        ("add", ("name", "count", "tags", "reason", "opts", "block"), "Add stock for an item and return the new level."),
        ("from_hash", ("levels",), "Build an inventory from a hash of levels."),
    ],
}  # fmt: skip


# ------------------------------------------------------------------------------------------ extractors


@pytest.mark.parametrize("lang", sorted(EXPECTED))
def test_extractor_finds_documented_functions_with_names_params_and_first_paragraph(lang):
    corpus = from_tree(lang, FIXTURES / lang, source=f"fixture-{lang}")
    got = [(f.name, f.params, f.docstring) for f in corpus.functions]
    assert got == EXPECTED[lang]
    for f in corpus.functions:
        assert f.language == lang and f.source == f"fixture-{lang}"
        assert "/" not in f.path or not f.path.startswith("/"), "paths are relative to the corpus root"
        assert f.lines == f.code.count("\n") + 1 and 3 <= f.lines <= 60
        assert f.docstring not in f.code, "the doc comment is cut out of the code"
    prov = corpus.provenance[0]
    assert prov["source"] == f"fixture-{lang}" and prov["extracted"] == len(EXPECTED[lang])


@pytest.mark.parametrize(
    "lang,skipped",
    [
        ("python", ["undocumented", "tersely_documented", "short", "test_scale"]),
        ("go", ["undocumented", "TestPush"]),
        ("java", ["audit", "record"]),
        ("javascript", ["noDoc"]),
        ("php", ["clear", "load"]),
        ("ruby", ["undocumented", "hidden"]),
    ],
)
def test_functions_without_a_useful_doc_comment_or_in_test_files_are_skipped(lang, skipped):
    names = {f.name for f in from_tree(lang, FIXTURES / lang).functions}
    assert not names & set(skipped)


def test_python_code_is_the_def_without_its_docstring_dedented():
    (area,) = [f for f in from_tree("python", FIXTURES / "python").functions if f.name == "area"]
    assert area.code == "def area(self):\n    w = self.width\n    h = self.height\n    return w * h"
    assert area.path == "geometry.py" and area.lineno == 28


def test_go_doc_drops_directives_and_methods_keep_their_receiver_in_code():
    fns = {f.name: f for f in from_tree("go", FIXTURES / "go").functions}
    assert fns["Push"].code.startswith("func (s *Stack) Push(v int) int {")
    assert "go:noinline" not in fns["Sum"].docstring


def test_java_code_keeps_annotations_and_javadoc_markup_is_cleaned():
    fns = {f.name: f for f in from_tree("java", FIXTURES / "java").functions}
    assert fns["transfer"].code.startswith("@Deprecated\npublic long transfer(")
    assert clean_block_doc("/** Uses {@link Map#get(Object) get} and &lt;T&gt;.\n * @return x */") == (
        "Uses get and <T>."
    )
    assert clean_block_doc("/** {@inheritDoc} */") == ""


def test_javascript_code_of_a_const_arrow_is_the_declaration():
    fns = {f.name: f for f in from_tree("javascript", FIXTURES / "javascript").functions}
    assert fns["joinPath"].code.startswith("const joinPath = (head, { sep }) => {")
    assert fns["greet"].code.startswith("Greeter.prototype.greet = function (name) {")


def test_line_limits_are_configurable():
    opts = ExtractOptions(min_lines=6, max_lines=60)
    assert [f.name for f in from_tree("go", FIXTURES / "go", options=opts).functions] == ["Sum"]
    with pytest.raises(ValueError, match="min_lines"):
        ExtractOptions(min_lines=5, max_lines=4)


def test_a_blank_line_between_comment_and_function_breaks_the_link():
    src = (
        "package p\n\n// Adds one to the value given.\n\nfunc Inc(x int) int {\n\ty := x + 1\n\treturn y\n}\n"
    )
    assert extract("go", src, "p.go", "t") == []
    assert [f.name for f in extract("go", src.replace(".\n\nfunc", ".\nfunc"), "p.go", "t")] == ["Inc"]


def test_skip_reason_names_tests_generated_minified_and_large_files():
    opts = ExtractOptions(max_file_bytes=1000)
    assert skip_reason("pkg/tests/util.py", b"x = 1\n", opts) == "test"
    assert skip_reason("net/http_test.go", b"package http\n", opts) == "test"
    assert skip_reason("lib/a_spec.rb", b"", opts) == "test"
    assert (
        skip_reason("gen.go", b"// Code generated by stringer; DO NOT EDIT.\npackage p\n", opts)
        == "generated"
    )
    assert skip_reason("app.min.js", b"var a=1;", opts) == "minified"
    assert skip_reason("app.js", b"var a=1;" * 200, ExtractOptions()) == "minified"
    assert skip_reason("big.py", b"x = 1\n" * 500, opts) == "too large"
    assert skip_reason("lib/unittest/case.py", b"x = 1\n", opts) is None


def test_unknown_language_is_named():
    with pytest.raises(CorpusError, match="unknown language 'cobol'; available: go, java"):
        from_tree("cobol", FIXTURES)
    with pytest.raises(SefusionError, match="not a folder"):
        from_tree("go", FIXTURES / "missing")


def test_params_of_a_snippet():
    assert params_of("java", "public int f(int a, String b) { return a; }") == ("a", "b")
    assert params_of("php", "public function f($a, $b = 2) { return $a; }") == ("$a", "$b")
    assert params_of("go", "func F(a, b int) int { return a }") == ("a", "b")
    assert params_of("python", "    def f(self, x, *args, y=1, **kw):\n        return x") == (
        "self", "x", "args", "y", "kw",
    )  # fmt: skip


# ------------------------------------------------------------------------------------- split, dedupe


def _fn(path: str, name: str = "f", code: str | None = None, lang: str = "python") -> Function:
    code = code or f"def {name}(a):\n    b = a + {len(path)}\n    return b  # {path}"
    return Function(lang, name, code, "Does a thing well.", path, "t", ("a",), code.count("\n") + 1)


def test_split_by_file_puts_every_file_in_one_split_deterministically():
    functions = [_fn(f"pkg/mod{i // 3}.py", f"f{i}") for i in range(600)]  # 200 files of 3
    splits = split_by_file(functions, seed=7)
    files = {name: {f.path for f in fs} for name, fs in splits.items()}
    assert not files["train"] & files["validation"]
    assert not files["train"] & files["test"]
    assert not files["validation"] & files["test"]
    assert sum(map(len, splits.values())) == 600
    assert abs(len(splits["train"]) - 480) <= 3 and abs(len(splits["test"]) - 60) <= 3
    assert split_by_file(functions, seed=7) == splits
    assert split_by_file(list(reversed(functions)), seed=7)["test"] == list(reversed(splits["test"]))
    assert split_by_file(functions, seed=8) != splits


def test_split_fractions_are_checked():
    with pytest.raises(CorpusError, match="summing to 1"):
        split_by_file([_fn("a.py")], fractions=(0.5, 0.1, 0.1))
    assert split_by_file([], seed=0) == {"train": [], "validation": [], "test": []}


def test_dedupe_catches_renamed_and_reformatted_copies_but_not_different_code():
    original = _fn("a.py", "scale", "def scale(p, k):\n    x, y = p  # unpack\n    return (x * k, y * k)")
    renamed = _fn(
        "b.py", "grow", "def grow(point,factor):\n    u,   v = point\n\n    return (u*factor, v*factor)"
    )
    different = _fn("c.py", "shift", "def shift(p, k):\n    x, y = p\n    return (x + k, y + k)")
    assert normalized_key(original) == normalized_key(renamed) != normalized_key(different)
    assert dedupe([original, renamed, different]) == [original, different]
    java = "int add(int a, int b) {\n  // sum\n  return a + b;\n}"
    java2 = "int plus(int x, int y) { /* sum */ return x + y; }"
    assert dedupe([_fn("A.java", code=java, lang="java"), _fn("B.java", code=java2, lang="java")]) == [
        _fn("A.java", code=java, lang="java")
    ]


def test_dedupe_keeps_getters_of_different_fields():
    a = _fn("a.js", "getKey", "Model.prototype.getKey = function () {\n  return this.key;\n};", "javascript")
    b = _fn(
        "a.js", "getGroup", "Model.prototype.getGroup = function () {\n  return this.group;\n};", "javascript"
    )
    assert dedupe([a, b]) == [a, b]


def test_drop_leaks_removes_test_functions_that_duplicate_train_ones():
    a = _fn("a.py", "scale", "def scale(p, k):\n    x = p\n    return x * k")
    b = _fn("b.py", "grow", "def grow(q, m):\n    y = q\n    return y * m")
    c = _fn("c.py", "other", "def other(q):\n    y = q\n    return -y")
    out = drop_leaks({"train": [a], "validation": [c], "test": [b, c]})
    assert out == {"train": [a], "validation": [c], "test": []}


def test_load_corpus_from_dirs_dedupes_samples_and_counts_provenance(tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "geometry.py").write_text((FIXTURES / "python" / "geometry.py").read_text())
    corpus = load_corpus("py", dirs=[FIXTURES / "python", copy], cache_dir=tmp_path)
    assert isinstance(corpus, Corpus) and corpus.language == "python"
    assert [f.name for f in corpus.functions] == ["scale", "area"]  # the copy's functions are duplicates
    assert [p["functions"] for p in corpus.provenance] == [2, 0]
    assert [p["extracted"] for p in corpus.provenance] == [2, 2]
    one = load_corpus("python", dirs=[FIXTURES / "python"], max_functions=1, seed=3, cache_dir=tmp_path)
    assert len(one) == 1 and one.provenance[0]["functions"] == 1


def test_load_corpus_without_fetched_packages_says_what_to_run(tmp_path):
    with pytest.raises(CorpusError, match="corpus fetch --langs go"):
        load_corpus("go", cache_dir=tmp_path)
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus("ruby", dirs=[tmp_path / "nope"])


def test_extraction_cache_builds_once(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return Corpus("python", [_fn("a.py")], [{"source": "t", "functions": 1}])

    first = cached_corpus(tmp_path, "key", ExtractOptions(), build)
    again = cached_corpus(tmp_path, "key", ExtractOptions(), build)
    assert len(calls) == 1 and again.functions == first.functions and again.provenance == first.provenance
    cached_corpus(tmp_path, "key", ExtractOptions(max_lines=10), build)
    assert len(calls) == 2, "other options, other cache entry"


# ------------------------------------------------------------------------------------------- JSONL


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def test_codesearchnet_reader(tmp_path):
    py = 'def add(a, b):\n    """Add two numbers.\n\n    More."""\n    c = a + b\n    return c\n'
    path = _write_jsonl(
        tmp_path / "csn.jsonl.gz",
        [
            {"repo": "o/r", "path": "m.py", "func_name": "Calc.add", "language": "python", "code": py,
             "docstring": "Add two numbers.\n\nMore."},
            {"repo": "o/j", "path": "A.java", "func_name": "A.get", "language": "java",
             "code": "public int get(int i) {\n  return xs[i];\n}", "docstring": "Returns the item.\n@param i index"},
        ],
    )  # fmt: skip
    corpus = read_codesearchnet(path)
    add, get = corpus.functions
    assert (add.name, add.params, add.docstring, add.path) == (
        "add",
        ("a", "b"),
        "Add two numbers.",
        "o/r/m.py",
    )
    assert add.code == "def add(a, b):\n    c = a + b\n    return c"
    assert (get.language, get.name, get.params, get.docstring) == ("java", "get", ("i",), "Returns the item.")
    assert [f.name for f in read_codesearchnet(path, language="java").functions] == ["get"]
    assert corpus.provenance[0]["package"] == "CodeSearchNet"


def test_codexglue_defect_reader_keeps_target_as_label(tmp_path):
    func = "static int copy_buf(char *dst, const char *src, int n)\n{\n    memcpy(dst, src, n);\n    return n;\n}"
    path = _write_jsonl(
        tmp_path / "train.jsonl",
        [{"project": "FFmpeg", "commit_id": "abc", "target": 1, "func": func, "idx": 0},
         {"target": 0, "func": "void f(void) {\n  g();\n}", "idx": 1}],
    )  # fmt: skip
    a, b = read_codexglue_defect(path).functions
    assert (a.language, a.name, a.params, a.label, a.path) == (
        "c",
        "copy_buf",
        ("dst", "src", "n"),
        1,
        "FFmpeg/abc",
    )
    assert (b.name, b.params, b.label, b.docstring) == ("f", (), 0, "")
    assert read_jsonl(path).functions == [a, b]
    corpus = load_corpus("c", dirs=[path])
    assert len(corpus) == 2 and corpus.language == "c"


def test_jsonl_errors_name_the_line_and_the_fields(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"code": "x", "language": "go"}\nnot json\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: not a JSON line"):
        read_jsonl(bad)
    nolang = _write_jsonl(tmp_path / "n.jsonl", [{"code": "x"}])
    with pytest.raises(CorpusError, match="n.jsonl:1: record without a 'language' field"):
        read_jsonl(nolang)
    assert read_jsonl(nolang, language="go").functions[0].language == "go"
    other = _write_jsonl(tmp_path / "o.jsonl", [{"text": "x"}])
    with pytest.raises(CorpusError, match="neither CodeSearchNet fields"):
        read_jsonl(other)
    with pytest.raises(CorpusError, match="C functions come only from CodeXGLUE"):
        load_corpus("c")


# ------------------------------------------------------------------------------------------- fetch


def test_fetch_refuses_clearly_without_apt(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_debian.shutil, "which", lambda name: None)
    with pytest.raises(SefusionError, match=r"needs apt-get, apt-cache and dpkg-deb.*--dir go=PATH"):
        corpus_debian.fetch(["go"], tmp_path, quiet=True)
    with pytest.raises(CorpusError, match="Python needs no fetch"):
        corpus_debian.fetch(["python"], tmp_path, quiet=True)


def test_fetch_leaves_cached_packages_alone_without_calling_apt(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpus_debian.shutil, "which", lambda name: None)  # any apt call would raise
    tree = tmp_path / "ruby" / "libruby3.1-3.1.7-1"
    (tree / "usr/lib/ruby").mkdir(parents=True)
    (tree / "usr/lib/ruby/inventory.rb").write_text((FIXTURES / "ruby" / "inventory.rb").read_text())
    marker = {"source": "debian:libruby3.1 3.1.7-1", "language": "ruby", "package": "libruby3.1",
              "version": "3.1.7-1", "licence": "BSD-2-clause or Ruby", "dir": tree.name, "root": "usr/lib/ruby"}  # fmt: skip
    (tmp_path / "ruby" / f"{tree.name}.json").write_text(json.dumps(marker))
    assert corpus_debian.fetch(["rb"], tmp_path) == [marker]
    assert "already in" in capsys.readouterr().err
    corpus = load_corpus("ruby", cache_dir=tmp_path, use_cache=False)
    assert [f.name for f in corpus.functions] == ["add", "from_hash"]
    assert corpus.functions[0].source == "debian:libruby3.1 3.1.7-1"
    assert corpus.functions[0].path == "inventory.rb"
    (prov,) = corpus.provenance
    assert (prov["package"], prov["version"], prov["licence"], prov["files"]) == (
        "libruby3.1", "3.1.7-1", "BSD-2-clause or Ruby", 1,
    )  # fmt: skip


def test_fetch_reads_the_licence_from_the_copyright_file(tmp_path):
    doc = tmp_path / "usr/share/doc/node-x"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("Format: dep5\n\nFiles: *\nCopyright: me\nLicense: Expat\n")
    assert corpus_debian._licence(tmp_path, "node-x") == ("Expat", "usr/share/doc/node-x/copyright")
    assert corpus_debian._licence(tmp_path, "node-y")[0] == "unknown"


# --------------------------------------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sefusion")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true")
    common.add_argument("-v", "--verbose", action="store_true")
    add_corpus_parser(parser.add_subparsers(dest="command"), [common])
    return run_corpus(parser.parse_args(argv))


def test_cli_stats_on_a_source_tree(tmp_path, capsys):
    out = tmp_path / "stats.json"
    rc = _cli(
        [
            "corpus",
            "stats",
            "-q",
            "--dir",
            f"go={FIXTURES / 'go'}",
            "--cache",
            str(tmp_path),
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    assert "go: 2 functions kept of 2 documented in 1 files" in capsys.readouterr().out
    (entry,) = json.loads(out.read_text())
    assert entry["language"] == "go" and sum(entry["splits"].values()) == 2


def test_cli_errors(tmp_path):
    with pytest.raises(CorpusError, match="LANG=PATH"):
        _cli(["corpus", "stats", "--dir", "go"])
    assert _cli(["corpus"]) == 2
