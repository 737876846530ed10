"""What the task builders need to know about one function's code: its tokens, the names it binds, where
it uses them, its calls, its `return NAME` statements, and which of its names can be renamed safely.

Two analysers fill one `Analysis`: Python through `ast` (exact scopes and positions), the other five
languages through a small lexer plus per-language declaration patterns (parameters, `let/const/var`,
`:=`, `Type name =`, `$vars`, Ruby assignments and block parameters). The token analysis is
approximate on purpose: it only has to find sites where a rewrite *certainly* changes what the code
means (defect) or *certainly* keeps it (clone); when a name is ambiguous (a JavaScript object key, a
Ruby symbol or keyword argument, a name inside a string or interpolation) it is left alone.

All positions are character offsets into the code string; a `Span` is (start, end).
"""

from __future__ import annotations

import ast
import builtins
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

Span = tuple[int, int]

# ------------------------------------------------------------------------------------------------ lexer

_STRING = (
    r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\''  # Python triple quotes
    r'|"(?:\\[\s\S]|[^"\\\n])*"|\'(?:\\[\s\S]|[^\'\\\n])*\'|`(?:\\[\s\S]|[^`\\])*`'
)
_PY_PREFIX = r"(?:[rRbBuUfF]{1,2}(?=[\"']))?"  # Python string prefixes: f"...", rb'...'

_OPS = (
    r"===|!==|\*\*=|//=|<<=|>>=|\.\.\.|<=>|->|::|=>|:=|==|!=|<=|>=|&&|\|\||\+\+|--|\+=|-=|\*=|/=|%="
    r"|&=|\|=|\^=|\*\*|\?\?|\?\.|\S"
)
_COMMENT = {
    "python": r"#[^\n]*",
    "ruby": r"#[^\n]*|^=begin[\s\S]*?^=end",
    "php": r"(?://|#(?!\[))[^\n]*|/\*[\s\S]*?\*/",
}
_NAME = {
    "javascript": r"[A-Za-z_$][\w$]*",
    "php": r"\$?[A-Za-z_]\w*",
    "ruby": r"[A-Za-z_]\w*(?:[?!](?![=~\w]))?",
}
_DEFAULT_COMMENT = r"//[^\n]*|/\*[\s\S]*?\*/"
_DEFAULT_NAME = r"[A-Za-z_]\w*"


def _lexer(lang: str) -> re.Pattern[str]:
    comment, name = _COMMENT.get(lang, _DEFAULT_COMMENT), _NAME.get(lang, _DEFAULT_NAME)
    return re.compile(
        f"(?P<comment>{comment})|(?P<string>{_PY_PREFIX if lang == 'python' else ''}(?:{_STRING}))"
        + f"|(?P<name>{name})"
        + r"|(?P<number>\d[\w.]*)"
        + f"|(?P<op>{_OPS})",
        re.MULTILINE,
    )


_LEXERS = {lang: _lexer(lang) for lang in ("go", "java", "javascript", "php", "python", "ruby")}


@dataclass(frozen=True)
class Token:
    kind: str  # comment | string | name | number | op
    text: str
    start: int
    end: int


def lex(code: str, lang: str) -> list[Token]:
    """Tokens of `code` (whitespace dropped; positions kept). Strings and comments are single tokens."""
    return [Token(m.lastgroup or "op", m.group(), m.start(), m.end()) for m in _LEXERS[lang].finditer(code)]


def replace_spans(code: str, edits: Iterable[tuple[int, int, str]]) -> str:
    """Apply non-overlapping (start, end, text) replacements."""
    out, pos = [], 0
    for start, end, text in sorted(edits):
        if start < pos:
            raise ValueError(f"overlapping edits at {start}")
        out += [code[pos:start], text]
        pos = end
    out.append(code[pos:])
    return "".join(out)


def identifiers(code: str, lang: str) -> set[str]:
    """Every name token (and, for PHP, the name without its `$`), strings and comments included as words,
    so a fresh name picked outside this set collides with nothing the reader can see."""
    names = {t.text for t in lex(code, lang) if t.kind == "name"}
    names |= set(re.findall(r"[A-Za-z_$][\w$]*", code))
    return names | {n.lstrip("$") for n in names} | {"$" + n for n in names if not n.startswith("$")}


# --------------------------------------------------------------------------------------------- analysis


def word_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


KEYWORDS: dict[str, frozenset[str]] = {
    "python": frozenset({"self", "cls", "True", "False", "None"}),
    "go": word_set(
        "break case chan const continue default defer else fallthrough for func go goto if import interface "
        "map package range return select struct switch type var nil true false iota"
    ),
    "java": word_set(
        "abstract assert boolean break byte case catch char class const continue default do double else enum "
        "extends final finally float for goto if implements import instanceof int interface long native new "
        "null package private protected public return short static strictfp super switch synchronized this "
        "throw throws transient try void volatile while true false var yield record"
    ),
    "javascript": word_set(
        "async await break case catch class const continue debugger default delete do else export extends "
        "false finally for function if import in instanceof let new null return super switch this throw "
        "true try typeof undefined var void while with yield of arguments static get set"
    ),
    "php": word_set(
        "abstract and array as break callable case catch class clone const continue declare default do echo "
        "else elseif empty enddeclare endfor endforeach endif endswitch endwhile extends final finally fn "
        "for foreach function global goto if implements include instanceof insteadof interface isset list "
        "match namespace new null or print private protected public readonly require return static switch "
        "throw trait try unset use var while xor yield true false self parent $this int float string bool "
        "void mixed object iterable never"
    ),
    "ruby": word_set(
        "alias and begin break case class def defined? do else elsif end ensure false for if in module next "
        "nil not or redo rescue retry return self super then true undef unless until when while yield "
        "__method__ block_given? raise loop lambda proc puts require attr_reader"
    ),
}
_JAVA_PRIMITIVES = word_set("int long short byte char boolean float double var")
_MEMBER_OPS = {".", "->", "::", "?.", "@", "@@"}
_ASSIGN_OPS = {"=", "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "**=", "//=", "<<=", ">>=", "??=", ":="}


@dataclass(frozen=True)
class Call:
    """A call site: `callee` is the called name (last component), `qual` the dotted/`::` prefix text
    (`os.path`, `Math`) or "" for a plain call, `member` True when called on an object (`x.f()`)."""

    callee: str
    span: Span  # the callee name's span
    qual: str
    member: bool
    args: tuple[tuple[Span, str | None], ...]  # (span, the name when the argument is a single name)


@dataclass
class Analysis:
    """What one function binds and uses. Sets hold names as spelled (PHP with `$`)."""

    lang: str
    code: str
    params: tuple[str, ...]
    bound: set[str] = field(default_factory=set)  # params + local bindings (any nested scope)
    scope_bound: dict[str, int] = field(default_factory=dict)  # function scope: name -> first binding pos
    uses: list[tuple[Span, str]] = field(default_factory=list)  # reads of bound names, after the signature
    returns: list[tuple[Span, str]] = field(default_factory=list)  # `return NAME`
    calls: list[Call] = field(default_factory=list)
    occurrences: dict[str, list[Span]] = field(default_factory=dict)  # every renamable occurrence per name
    unsafe: set[str] = field(default_factory=set)  # bound names that must not be renamed
    name_span: Span | None = None  # the function's own name in its declaration
    self_calls: list[Span] = field(default_factory=list)  # plain calls of the function's own name
    is_method: bool = False
    names: set[str] = field(default_factory=set)  # every identifier the code shows (see `identifiers`)

    def renamable(self) -> list[str]:
        """Bound names that can be renamed consistently, in order of first appearance."""
        keep = [n for n in self.bound if n not in self.unsafe and self.occurrences.get(n)]
        return sorted(keep, key=lambda n: self.occurrences[n][0][0])


def analyze(code: str, lang: str, params: Iterable[str] = (), name: str = "") -> Analysis | None:
    """The `Analysis` of one function, or None when the code cannot be read (Python that does not parse)."""
    if lang == "python":
        return _analyze_python(code, tuple(params), name)
    return _analyze_tokens(code, lang, tuple(params), name)


# ------------------------------------------------------------------------------------------- Python


class _Offsets:
    """(lineno, UTF-8 byte column) from `ast` -> character offset in the code."""

    def __init__(self, code: str) -> None:
        self.lines = code.split("\n")
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line) + 1)

    def __call__(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1]
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:col].decode("utf-8", "replace"))


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _walk_scoped(node: ast.AST, inner: bool = False):
    """(node, inside_a_nested_scope) for every node below `node`."""
    for child in ast.iter_child_nodes(node):
        nested = inner or isinstance(child, (*_SCOPES, *_COMPREHENSIONS))
        yield child, inner
        yield from _walk_scoped(child, nested)


def parse_def(code: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The function `code` starts with (a Python def), or None when it does not parse or is no def."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    if not tree.body or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    return tree.body[0]


def _analyze_python(code: str, params: tuple[str, ...], name: str) -> Analysis | None:
    fn = parse_def(code)
    if fn is None:
        return None
    off = _Offsets(code)
    a = Analysis("python", code, params, names=identifiers(code, "python"))
    a.is_method = bool(params) and params[0] in ("self", "cls")
    m = re.match(r"(?:async\s+)?def\s+([A-Za-z_]\w*)", code)
    if m:
        a.name_span = m.span(1)
    nonlocal_names: set[str] = set()
    in_fstring: set[int] = set()
    for node in ast.walk(fn):
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            nonlocal_names.update(node.names)
        if isinstance(node, ast.JoinedStr):
            in_fstring.update(id(n) for n in ast.walk(node))
    keyword_names = {k.arg for k in ast.walk(fn) if isinstance(k, ast.keyword) and k.arg}

    def add_occ(n: str, span: Span) -> None:
        a.occurrences.setdefault(n, []).append(span)

    def bind(n: str, pos: int, inner: bool) -> None:
        if n in nonlocal_names:
            return
        a.bound.add(n)
        if not inner and n not in a.scope_bound:
            a.scope_bound[n] = pos

    body_start = off(fn.body[0].lineno, fn.body[0].col_offset)
    for arg in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs, fn.args.vararg, fn.args.kwarg]:
        if arg is not None:
            start = off(arg.lineno, arg.col_offset)
            bind(arg.arg, start, False)
            add_occ(arg.arg, (start, start + len(arg.arg)))
    for node, inner in _walk_scoped(fn):
        if isinstance(node, ast.arg):
            start = off(node.lineno, node.col_offset)
            bind(node.arg, start, True)
            add_occ(node.arg, (start, start + len(node.arg)))
        elif isinstance(node, ast.Name):
            start = off(node.lineno, node.col_offset)
            span = (start, start + len(node.id))
            if code[span[0] : span[1]] != node.id:
                a.unsafe.add(node.id)  # position does not match the text (f-string on old Pythons)
                continue
            if id(node) in in_fstring:
                a.unsafe.add(node.id)
                continue
            if isinstance(node.ctx, (ast.Store, ast.Del)):
                bind(node.id, start, inner)
            add_occ(node.id, span)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            start = off(node.lineno, node.col_offset)
            m2 = re.compile(rf"\bas\s+({re.escape(node.name)})\b").search(code, start)
            if m2:
                bind(node.name, m2.start(1), inner)
                add_occ(node.name, m2.span(1))
            else:
                a.unsafe.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound_name = alias.asname or alias.name.split(".")[0]
                bind(bound_name, off(node.lineno, node.col_offset), inner)
                a.unsafe.add(bound_name)  # a module name: renaming it is legal but reads oddly
        elif isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.MatchAs, ast.MatchStar)
        ):
            if node.name:  # nested definitions and match captures: bound, left as they are
                bind(node.name, off(node.lineno, node.col_offset), inner)
                a.unsafe.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            bind(node.rest, off(node.lineno, node.col_offset), inner)
            a.unsafe.add(node.rest)
    a.occurrences = {n: sorted(set(spans)) for n, spans in a.occurrences.items()}  # fn.args are seen twice
    a.unsafe |= {"self", "cls"} | (a.bound & keyword_names) | nonlocal_names
    # reads of bound names (after the signature), returns, calls
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and id(node) not in in_fstring:
            start = off(node.lineno, node.col_offset)
            if node.id in a.bound and start >= body_start and code[start : start + len(node.id)] == node.id:
                a.uses.append(((start, start + len(node.id)), node.id))
            elif node.id == name and not a.is_method and start >= body_start:
                a.self_calls.append((start, start + len(node.id)))
        elif isinstance(node, ast.Return) and isinstance(node.value, ast.Name):
            v = node.value
            start = off(v.lineno, v.col_offset)
            if v.id in a.bound and code[start : start + len(v.id)] == v.id:
                a.returns.append(((start, start + len(v.id)), v.id))
        elif isinstance(node, ast.Call) and node.end_lineno is not None:
            call = _python_call(node, code, off)
            if call is not None:
                a.calls.append(call)
    a.uses.sort()
    a.returns.sort()
    a.calls.sort(key=lambda c: c.span)
    return a


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def _python_call(node: ast.Call, code: str, off: _Offsets) -> Call | None:
    func = node.func
    if isinstance(func, ast.Name):
        start = off(func.lineno, func.col_offset)
        callee, qual, member = func.id, "", False
    elif isinstance(func, ast.Attribute) and func.end_lineno is not None and func.end_col_offset is not None:
        end = off(func.end_lineno, func.end_col_offset)
        start = end - len(func.attr)
        callee, qual, member = func.attr, _dotted(func.value) or "", True
    else:
        return None
    if code[start : start + len(callee)] != callee:
        return None
    args: list[tuple[Span, str | None]] = []
    for arg in node.args:
        if arg.end_lineno is None or arg.end_col_offset is None:
            return None
        span = (off(arg.lineno, arg.col_offset), off(arg.end_lineno, arg.end_col_offset))
        args.append((span, arg.id if isinstance(arg, ast.Name) else None))
    return Call(callee, (start, start + len(callee)), qual, member, tuple(args))


PYTHON_BUILTINS = frozenset(dir(builtins))


# ------------------------------------------------------------------------------------ other languages


def _matching(tokens: list[Token], i: int) -> int:
    """Index of the bracket closing tokens[i] (or len(tokens) when unbalanced)."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    opener, closer, depth = tokens[i].text, pairs[tokens[i].text], 0
    for j in range(i, len(tokens)):
        if tokens[j].kind != "op":
            continue
        if tokens[j].text == opener:
            depth += 1
        elif tokens[j].text == closer:
            depth -= 1
            if depth == 0:
                return j
    return len(tokens)


def _body_start(tokens: list[Token], lang: str, code: str) -> int:
    """Index of the first token of the body (after the signature)."""
    n = len(tokens)
    if lang == "ruby":
        i = next((k for k, t in enumerate(tokens) if t.kind == "name" and t.text == "def"), None)
        if i is None:
            return 0
        j = i + 2  # def NAME
        if j + 1 < n and tokens[j].text == ".":
            j += 2  # def self.name
        if j < n and tokens[j].text == "=" and tokens[j].start == tokens[j - 1].end:
            j += 1  # def name=(value)
        if j < n and tokens[j].text == "(":
            return _matching(tokens, j) + 1
        while j < n and "\n" not in code[tokens[j - 1].end : tokens[j].start]:
            j += 1  # parameters without parentheses end with the line
        return j
    # brace languages: after the parameter list, the first `{` at depth 0 that opens a block, or `=>`
    i = next((k for k, t in enumerate(tokens) if t.text == "("), None)
    if i is None:
        arrow = next((k for k, t in enumerate(tokens) if t.text == "=>"), 0)
        return arrow + 1 if arrow else 0
    j = _matching(tokens, i) + 1
    if lang == "go" and tokens and tokens[0].text == "func" and i == 1:
        # a method: `func (r *T) Name(params)`; the first parentheses hold the receiver
        k = next((k for k in range(j, n) if tokens[k].text == "("), None)
        if k is not None:
            j = _matching(tokens, k) + 1
    depth = 0
    for k in range(j, n):
        t = tokens[k]
        if t.text in ("(", "["):
            depth += 1
        elif t.text in (")", "]"):
            depth -= 1
        elif depth == 0 and t.text == "=>":
            return k + 1
        elif depth == 0 and t.text == "{":
            if k + 2 < n and tokens[k + 1].text == "}":
                continue  # `interface{}` in a Go signature
            return k + 1
    return min(j, n)


def _is_member(tokens: list[Token], i: int, lang: str) -> bool:
    """tokens[i] is a member, key or symbol, not a variable: `x.name`, `$this->name`, `A::name`, `@name`,
    Ruby `:name`."""
    if i == 0:
        return False
    prev = tokens[i - 1]
    if prev.kind == "op" and prev.text in _MEMBER_OPS and prev.end == tokens[i].start:
        return True
    if prev.kind == "op" and prev.text in (".", "->", "?.", "::"):
        return True  # `x.\n  name` chains
    return lang == "ruby" and prev.text == ":" and prev.end == tokens[i].start


def _ambiguous(tokens: list[Token], i: int, lang: str) -> bool:
    """A name whose role a rename could change: an object key / keyword argument / label (`name:`),
    JS shorthand properties (`{name}`), Ruby symbols, PHP named arguments, Go struct keys."""
    nxt = tokens[i + 1] if i + 1 < len(tokens) else None
    if nxt is not None and nxt.text == ":" and lang in ("javascript", "ruby", "go", "php"):
        return True
    if lang == "javascript" and 0 < i < len(tokens) - 1:
        prev = tokens[i - 1].text
        if prev in ("{", ",") and nxt is not None and nxt.text in ("}", ",", "="):
            return _in_object_literal(tokens, i)  # `{a, b}` shorthand or destructuring
    return False


def _in_object_literal(tokens: list[Token], i: int) -> bool:
    """The innermost bracket around tokens[i] is a `{` that opens an object literal or pattern (it follows
    `=`, `(`, `,`, `:`, `[`, `return`, ...), not a block."""
    depth = 0
    for j in range(i - 1, -1, -1):
        t = tokens[j].text
        if t in (")", "]", "}"):
            depth += 1
        elif t in ("(", "[", "{"):
            if depth:
                depth -= 1
                continue
            if t != "{":
                return False
            before = tokens[j - 1].text if j else ""
            return before in ("=", "(", ",", ":", "[", "?", "return", "||", "&&", "let", "const", "var", "")
    return False


def _declared_at(tokens: list[Token], i: int, lang: str) -> bool:
    """tokens[i] (a name) is declared or assigned here."""
    t = tokens[i]
    prev = tokens[i - 1] if i > 0 else None
    nxt = tokens[i + 1] if i + 1 < len(tokens) else None
    if lang == "javascript":
        if prev is not None and prev.text in ("let", "const", "var"):
            return True
        if prev is not None and prev.text == "," and _in_declaration_list(tokens, i):
            return True
        return prev is not None and prev.text == "(" and i > 1 and tokens[i - 2].text == "catch"
    if lang == "go":
        if prev is not None and prev.text == "var":
            return True
        j = i
        while j + 2 < len(tokens) and tokens[j + 1].text == "," and tokens[j + 2].kind == "name":
            j += 2  # `a, b := ...`
        return j + 1 < len(tokens) and tokens[j + 1].text == ":=" and (prev is None or prev.text != ".")
    if lang == "java":
        if nxt is None or nxt.text not in ("=", ";", ":", ","):
            return False
        if prev is None or prev.kind != "name" and prev.text not in (">", "]"):
            return False
        if prev.text == ">" and not (
            i > 1 and (tokens[i - 2].text[:1].isupper() or tokens[i - 2].text in ">?")
        ):
            return False  # `a > b;` is a comparison, `List<T> b;` a declaration
        return prev.text not in KEYWORDS["java"] or prev.text in _JAVA_PRIMITIVES
    if lang == "php":
        if not t.text.startswith("$") or t.text == "$this":
            return False
        if nxt is not None and nxt.text == "=" or prev is not None and prev.text in ("as", "=>"):
            return True
        return prev is not None and prev.text in ("global", "static")
    if lang == "ruby":
        if t.text[:1].isupper() or t.text.endswith(("?", "!")):
            return False
        if nxt is not None and nxt.text in ("=", "+=", "-=", "*=", "/="):
            return True
        if nxt is not None and nxt.text in ("||", "&&") and i + 2 < len(tokens) and tokens[i + 2].text == "=":
            return True  # x ||= default
        if prev is not None and prev.text in ("|", ",") and _in_block_params(tokens, i):
            return True
        return prev is not None and prev.text == "for"
    return False


def _in_declaration_list(tokens: list[Token], i: int) -> bool:
    depth = 0
    for j in range(i - 1, -1, -1):
        t = tokens[j].text
        if t in (")", "]", "}"):
            depth += 1
        elif t in ("(", "[", "{"):
            if depth == 0:
                return False
            depth -= 1
        elif depth == 0 and t in ("let", "const", "var"):
            return True
        elif depth == 0 and t == ";":
            return False
    return False


def _in_block_params(tokens: list[Token], i: int) -> bool:
    """`do |a, b|` / `{ |a, b|`: tokens[i] sits between the two pipes."""
    j = i - 1
    while j >= 0 and (tokens[j].kind == "name" or tokens[j].text in (",", "*", "&", "(", ")")):
        j -= 1
    return j >= 1 and tokens[j].text == "|" and tokens[j - 1].text in ("do", "{")


def _lambda_params(tokens: list[Token]) -> set[int]:
    """Token indices of lambda parameters: `x => ...`, `(a, b) => ...` (JavaScript), `x -> ...` (Java)."""
    out: set[int] = set()
    for k, t in enumerate(tokens):
        if t.kind != "op" or t.text not in ("=>", "->") or k == 0:
            continue
        prev = tokens[k - 1]
        if prev.kind == "name":
            out.add(k - 1)
        elif prev.text == ")":
            depth = 0
            for j in range(k - 1, -1, -1):
                if tokens[j].text == ")":
                    depth += 1
                elif tokens[j].text == "(":
                    depth -= 1
                    if depth == 0:
                        break
                elif depth == 1 and tokens[j].kind == "name" and tokens[j + 1].text in (",", ")", "="):
                    out.add(j)
    return out


_SUPERGLOBALS = word_set("$GLOBALS $_SERVER $_GET $_POST $_FILES $_COOKIE $_SESSION $_REQUEST $_ENV")


def _analyze_tokens(code: str, lang: str, params: tuple[str, ...], name: str) -> Analysis:
    tokens = [t for t in lex(code, lang) if t.kind != "comment"]
    a = Analysis(lang, code, params, names=identifiers(code, lang))
    keywords = KEYWORDS[lang]
    body = _body_start(tokens, lang, code)
    sig_end = tokens[body - 1].end if 0 < body <= len(tokens) else 0
    strings = " ".join(t.text for t in tokens if t.kind == "string")
    words_in_strings = set(re.findall(r"\$?[A-Za-z_]\w*", strings))

    # the declaration's own name: the first occurrence of `name` (for JS `key: function` it is the key)
    for i, t in enumerate(tokens):
        ruby_self = lang == "ruby" and i >= 2 and tokens[i - 2].text == "self" and t.start < sig_end
        if t.kind == "name" and t.text == name and (ruby_self or not _is_member(tokens, i, lang)):
            a.name_span = (t.start, t.end)
            name_index = i
            break
    else:
        name_index = -1

    param_set = set(params)
    for i, t in enumerate(tokens[:body]):
        if t.kind == "name" and t.text in param_set and not _is_member(tokens, i, lang):
            a.bound.add(t.text)
            a.scope_bound.setdefault(t.text, t.start)
    lambdas = _lambda_params(tokens) if lang in ("javascript", "java") else set()
    for i, t in enumerate(tokens):
        if t.kind != "name" or t.text in keywords or _is_member(tokens, i, lang):
            continue
        php_var = lang == "php" and t.text.startswith("$") and t.text not in _SUPERGLOBALS
        if i in lambdas or php_var:
            a.bound.add(t.text)  # PHP has no implicit globals: every $variable a function reads is its own
        if i >= body and _declared_at(tokens, i, lang):
            a.bound.add(t.text)
            a.scope_bound.setdefault(t.text, t.start)
    a.bound -= keywords | {"_"}
    for i, t in enumerate(tokens):
        if t.kind != "name" or t.text not in a.bound or _is_member(tokens, i, lang):
            continue
        if _ambiguous(tokens, i, lang):
            a.unsafe.add(t.text)
            continue
        if i == name_index:
            a.unsafe.add(t.text)  # the parameter shares the function's name
            continue
        a.occurrences.setdefault(t.text, []).append((t.start, t.end))
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        assigned = nxt is not None and nxt.text in _ASSIGN_OPS
        if i >= body and not assigned and not _declared_at(tokens, i, lang):
            a.uses.append(((t.start, t.end), t.text))
    # names inside strings may be interpolated (`#{x}`, `${x}`, "$x", f"{x}"): renaming them is unsafe
    a.unsafe |= {n for n in a.bound if n in words_in_strings or n.lstrip("$") in words_in_strings}
    a.unsafe |= {n for n in a.bound if n == name}
    if lang == "ruby":
        # a Ruby name read before its first assignment is a method call, not the variable
        a.unsafe |= {n for n in a.bound if n not in param_set and a.occurrences.get(n)
                     and a.occurrences[n][0][0] < a.scope_bound.get(n, 0)}  # fmt: skip

    # returns: `return NAME` ending the statement
    for i, t in enumerate(tokens[:-1]):
        if t.text != "return" or t.kind != "name":
            continue
        v = tokens[i + 1]
        after = tokens[i + 2] if i + 2 < len(tokens) else None
        ends = after is None or after.text in (";", "}") or "\n" in code[v.end : after.start]
        if lang == "go" and after is not None and after.text == ",":
            ends = True
        if v.kind == "name" and v.text in a.bound and ends and v.start >= sig_end:
            a.returns.append(((v.start, v.end), v.text))

    # calls: NAME ( args )  (Ruby member calls without parentheses are found by the defect table)
    for i, t in enumerate(tokens[:-1]):
        if t.kind != "name" or tokens[i + 1].text != "(" or t.start < sig_end and i != name_index:
            continue
        if t.text in keywords and t.text not in ("isset", "empty", "print"):
            continue
        member = _is_member(tokens, i, lang)
        qual = ""
        if member and i >= 2 and tokens[i - 2].kind == "name":
            qual = tokens[i - 2].text
        close = _matching(tokens, i + 1)
        args: list[tuple[Span, str | None]] = []
        start_k, depth = i + 2, 0
        for k in range(i + 2, close + 1):
            tk = tokens[k] if k < len(tokens) else None
            if tk is None:
                break
            if tk.text in ("(", "[", "{"):
                depth += 1
            elif tk.text in (")", "]", "}") and k != close:
                depth -= 1
            if (k == close or (depth == 0 and tk.text == ",")) and k > start_k:
                part = tokens[start_k:k]
                span = (part[0].start, part[-1].end)
                single = part[0].text if len(part) == 1 and part[0].kind == "name" else None
                args.append((span, single))
                start_k = k + 1
        if i == name_index:
            continue
        call = Call(t.text, (t.start, t.end), qual, member, tuple(args))
        a.calls.append(call)
        if t.text == name and not member:
            a.self_calls.append((t.start, t.end))
    a.uses.sort()
    return a
