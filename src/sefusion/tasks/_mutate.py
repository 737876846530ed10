"""Rewrites of one function's code, for all six languages: the four injected bugs of `defect`, the
semantics-preserving rewrite of `clone` (consistent renaming + reformatting), and the masking of the
raised exception type of `exception`.

Every rewrite works on the token positions `_code.analyze` finds, so strings and comments are never
edited by accident, and every one returns None when the function offers no site for it (the builders
then skip the function). Fresh identifiers come from the corpus itself (other functions' parameter and
function names), so a mutant carries no marker token that gives the answer away.
"""

from __future__ import annotations

import builtins
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ._code import KEYWORDS, PYTHON_BUILTINS, Analysis, lex, replace_spans, word_set
from .corpus_types import Function

_WORD = re.compile(r"\$?[A-Za-z_][\w$]*")
BUG_KINDS = ("unbound_name", "swapped_arguments", "wrong_return", "undefined_call")
NOT_VARIABLES = frozenset({"self", "cls", "$this", "this", "_", "__"})

# Calls whose arguments commute: swapping them changes nothing.
SYMMETRIC_CALLS = word_set(
    "min max equals isEqual hypot gcd lcm union intersection merge array_merge concat sum zip isclose "
    "allclose assertEqual assertNotEqual eq ne same Equal DeepEqual EqualFold deepEqual areEqual"
)

# Well-known library calls -> plausible names that do not exist. Keys: "name" (a plain call),
# "Qual.name" (a call through a module/class), ".name" (a method on any object).
UNDEFINED_CALLS: dict[str, dict[str, tuple[str, ...]]] = {
    "python": {
        "len": ("length", "size"), "isinstance": ("is_instance",), "issubclass": ("is_subclass",),
        "getattr": ("get_attr",), "setattr": ("set_attr",), "hasattr": ("has_attr",), "sorted": ("sort",),
        "enumerate": ("enumerated",), "range": ("xrange",), "str": ("string",), "int": ("integer",),
        "float": ("double",), "list": ("to_list",), "dict": ("to_dict",), "tuple": ("to_tuple",),
        "set": ("to_set",), "min": ("minimum",), "max": ("maximum",), "sum": ("sum_of",),
        "repr": ("to_repr",), "print": ("println",), "zip": ("zipped",), "map": ("imap",),
        "filter": ("filtered",), "any": ("any_of",), "all": ("all_of",), "open": ("fopen",),
        "iter": ("iterate",), "next": ("next_item",), "abs": ("absolute",), "round": ("rounded",),
        "type": ("typeof",), "bool": ("boolean",), "callable": ("is_callable",),
        "os.path.join": ("concat",), "os.path.exists": ("exist",), "os.path.isfile": ("is_file",),
        "os.path.isdir": ("is_dir",), "os.path.basename": ("base_name",), "os.path.dirname": ("dir_name",),
        "os.path.abspath": ("absolute",), "os.path.splitext": ("split_ext",), "os.getcwd": ("cwd",),
        "os.listdir": ("list_dir",), "os.makedirs": ("make_dirs",), "os.remove": ("delete",),
        "re.compile": ("build",), "re.match": ("matches",), "re.sub": ("replace",), "re.search": ("find",),
        "sys.exit": ("quit",), "time.time": ("now",), "json.dumps": ("encode",), "json.loads": ("decode",),
        ".append": ("push",), ".startswith": ("starts_with",), ".endswith": ("ends_with",),
        ".strip": ("trim",), ".lower": ("to_lower",), ".upper": ("to_upper",), ".keys": ("get_keys",),
        ".extend": ("push_all",), ".setdefault": ("set_default",), ".items": ("entries",),
        ".values": ("get_values",), ".isdigit": ("is_digit",), ".split": ("explode",),
    },
    "go": {
        "len": ("length",), "append": ("push",), "make": ("alloc",), "cap": ("capacity",),
        "copy": ("copySlice",), "panic": ("throw",), "delete": ("remove",),
        "fmt.Sprintf": ("Format",), "fmt.Errorf": ("NewError",), "fmt.Printf": ("Writef",),
        "fmt.Println": ("PrintLine",), "fmt.Fprintf": ("Fwritef",), "errors.New": ("Create",),
        "strings.Contains": ("Includes",), "strings.HasPrefix": ("StartsWith",),
        "strings.HasSuffix": ("EndsWith",), "strings.Split": ("SplitBy",), "strings.Join": ("Concat",),
        "strings.TrimSpace": ("Strip",), "strings.Index": ("Find",), "strings.ToLower": ("Lower",),
        "strings.ToUpper": ("Upper",), "strings.Replace": ("Substitute",), "strconv.Itoa": ("IntToStr",),
        "strconv.Atoi": ("StrToInt",), "strconv.Quote": ("Escape",), "strconv.FormatInt": ("IntToString",),
        "bytes.Equal": ("Equals",), "bytes.NewBuffer": ("NewBuf",), "sort.Slice": ("SortSlice",),
        "sort.Strings": ("SortStrings",), "math.Max": ("Maximum",), "math.Min": ("Minimum",),
        "math.Abs": ("Absolute",), "time.Now": ("Current",), "time.Since": ("Elapsed",),
        "os.Getenv": ("GetEnv",), "filepath.Join": ("Concat",), "reflect.TypeOf": ("GetType",),
        "reflect.ValueOf": ("GetValue",), "utf8.RuneLen": ("RuneSize",),
        ".Lock": ("Acquire",), ".Unlock": ("Release",), ".String": ("ToString",), ".Len": ("Length",),
    },
    "java": {
        "Math.max": ("maximum",), "Math.min": ("minimum",), "Math.abs": ("absolute",),
        "Math.sqrt": ("squareRoot",), "String.valueOf": ("of",), "String.format": ("sprintf",),
        "Integer.parseInt": ("parseInteger",), "Integer.valueOf": ("of",), "Long.parseLong": ("parse",),
        "Objects.requireNonNull": ("requireNotNull",), "Objects.equals": ("isEqual",),
        "Objects.hash": ("hashOf",), "Arrays.copyOf": ("copy",), "Arrays.asList": ("toList",),
        "Arrays.fill": ("fillAll",), "Arrays.sort": ("sorted",), "Collections.sort": ("sorted",),
        "Collections.unmodifiableList": ("readOnlyList",), "System.arraycopy": ("copyArray",),
        "System.currentTimeMillis": ("currentMillis",), "System.getProperty": ("property",),
        "System.nanoTime": ("nanos",), "Thread.currentThread": ("current",),
        "Character.isDigit": ("isNumber",), "Character.isWhitespace": ("isBlank",),
        "Boolean.parseBoolean": ("parse",), "Double.parseDouble": ("parse",),
        "Integer.compare": ("compareValues",), "Double.compare": ("compareValues",),
        ".equals": ("isEqual",), ".hashCode": ("hash",), ".toString": ("asString",),
        ".getClass": ("getType",), ".isEmpty": ("empty",), ".charAt": ("charAtIndex",),
        ".substring": ("subString",), ".startsWith": ("startWith",), ".endsWith": ("endWith",),
        ".indexOf": ("findIndex",), ".toLowerCase": ("lowerCase",), ".toUpperCase": ("upperCase",),
        ".containsKey": ("hasKey",), ".trim": ("trimmed",),
    },
    "javascript": {
        "Math.max": ("maximum",), "Math.min": ("minimum",), "Math.floor": ("floorInt",),
        "Math.round": ("rounded",), "Math.abs": ("absolute",), "Math.random": ("rand",),
        "Array.isArray": ("isList",), "Array.from": ("fromList",), "Object.keys": ("getKeys",),
        "Object.assign": ("merge",), "Object.create": ("make",), "Object.freeze": ("lock",),
        "JSON.stringify": ("encode",), "JSON.parse": ("decode",), "console.log": ("print",),
        "Number.isNaN": ("isNan",), "String.fromCharCode": ("fromCode",), "Promise.resolve": ("resolved",),
        "document.getElementById": ("getById",), "document.createElement": ("newElement",),
        "parseInt": ("parseInteger",), "parseFloat": ("parseDouble",), "setTimeout": ("setDelay",),
        "clearTimeout": ("clearDelay",), "isNaN": ("isNan",), "encodeURIComponent": ("encodeUriComponent",),
        ".push": ("append",), ".indexOf": ("index",), ".forEach": ("forAll",),
        ".hasOwnProperty": ("hasProperty",), ".toLowerCase": ("toLower",), ".toUpperCase": ("toUpper",),
        ".charAt": ("charAtIndex",), ".substring": ("subString",), ".startsWith": ("beginsWith",),
        ".join": ("implode",), ".split": ("explode",), ".trim": ("strip",),
        ".preventDefault": ("stopDefault",), ".addEventListener": ("attachEventListener",),
        ".appendChild": ("addChild",), ".getAttribute": ("getAttr",), ".setAttribute": ("setAttr",),
    },
    "php": {
        "count": ("length",), "strlen": ("str_length",), "in_array": ("array_contains",),
        "array_key_exists": ("array_has_key",), "is_array": ("is_arr",), "str_replace": ("string_replace",),
        "implode": ("array_join",), "explode": ("str_explode",), "array_keys": ("array_get_keys",),
        "array_merge": ("array_concat",), "sprintf": ("str_format",), "trim": ("strip",),
        "substr": ("substring",), "strpos": ("str_index",), "strtolower": ("str_lower",),
        "strtoupper": ("str_upper",), "array_map": ("array_apply",), "isset": ("is_set",),
        "empty": ("is_empty",), "intval": ("to_int",), "is_string": ("is_str",),
        "preg_match": ("regex_match",), "preg_replace": ("regex_replace",), "json_encode": ("json_stringify",),
        "json_decode": ("json_parse",), "array_values": ("array_get_values",), "array_filter": ("array_where",),
        "array_slice": ("array_sub",), "array_search": ("array_index_of",), "ucfirst": ("upper_first",),
        "htmlspecialchars": ("html_escape",),
    },
    "ruby": {
        "puts": ("println",), "Integer": ("Int",),
        ".each": ("for_each",), ".length": ("len",), ".include?": ("contains?",), ".empty?": ("is_empty?",),
        ".nil?": ("null?",), ".to_s": ("to_string",), ".to_i": ("to_integer",), ".to_sym": ("to_symbol",),
        ".each_with_index": ("each_indexed",), ".select": ("where",), ".keys": ("get_keys",),
        ".start_with?": ("starts_with?",), ".end_with?": ("ends_with?",), ".downcase": ("lowercase",),
        ".upcase": ("uppercase",), ".strip": ("trim",), ".is_a?": ("is_an?",),
        ".respond_to?": ("responds_to?",), ".map": ("map_all",), ".join": ("implode",),
        ".split": ("explode",), ".freeze": ("frozen",), ".dup": ("copy",), ".merge": ("merge_with",),
        ".inject": ("fold",), ".gsub": ("replace_all",), ".key?": ("contains_key?",), ".sort_by": ("order_by",),
        ".each_pair": ("each_kv",),
    },
}  # fmt: skip


@dataclass(frozen=True)
class Mutation:
    """One injected bug: the mutated code, its kind, where it starts, and what was replaced by what."""

    kind: str
    code: str
    site: int
    before: str
    after: str


@dataclass
class Vocabulary:
    """Names a corpus uses, to draw natural fresh identifiers from, and what its functions' parameters are
    (so a call's arguments can be checked against the callee's parameter names)."""

    lang: str
    variables: list[str] = field(default_factory=list)  # parameter names seen at least twice, sorted
    functions: list[str] = field(default_factory=list)  # function names, sorted
    params_by_name: dict[str, set[tuple[str, ...]]] = field(default_factory=dict)
    params_by_file: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    file_names: dict[str, set[str]] = field(default_factory=dict)  # identifiers the file's functions show

    @classmethod
    def of(cls, lang: str, functions: Iterable[Function]) -> Vocabulary:
        functions = list(functions)
        counts = Counter(p for f in functions for p in f.params)
        keywords = KEYWORDS.get(lang, frozenset())
        variables = sorted(
            p
            for p, n in counts.items()
            if n >= 2 and p not in NOT_VARIABLES and p not in keywords and re.fullmatch(r"\$?[A-Za-z]\w*", p)
        )
        names = sorted({f.name for f in functions if re.fullmatch(r"[A-Za-z_]\w*", f.name)})
        by_name: dict[str, set[tuple[str, ...]]] = {}
        by_file: dict[tuple[str, str], tuple[str, ...]] = {}
        file_names: dict[str, set[str]] = {}
        for f in functions:
            by_name.setdefault(f.name, set()).add(f.params)
            by_file[(f.path, f.name)] = f.params
            file_names.setdefault(f.path, set()).update(_WORD.findall(f.code), (f.name,))
        return cls(lang, variables, names, by_name, by_file, file_names)

    def taken(self, f: Function, a: Analysis) -> set[str]:
        """Names a fresh identifier must avoid: what `f` shows and what its file's other functions show
        (so an "undefined" name is not a helper or global defined next to it)."""
        return a.names | a.bound | self.file_names.get(f.path, set())

    def params_of(self, callee: str, path: str) -> tuple[str, ...] | None:
        """The callee's parameters: from the same file, else from the corpus when unambiguous."""
        got = self.params_by_file.get((path, callee))
        if got is not None:
            return got
        options = self.params_by_name.get(callee)
        return next(iter(options)) if options and len(options) == 1 else None

    def fresh_variable(self, rng: random.Random, taken: set[str], like: str = "") -> str | None:
        """A corpus variable name that the function does not show (PHP names keep their `$`)."""
        php = self.lang == "php" or like.startswith("$")
        for _ in range(50):
            if not self.variables:
                return None
            name = rng.choice(self.variables)
            if php and not name.startswith("$"):
                name = "$" + name
            if _usable(name, taken, self.lang):
                return name
        return None

    def fresh_function(self, rng: random.Random, taken: set[str], like: str = "") -> str | None:
        """A corpus function name the code does not show, capitalized like `like` (Go exports, Ruby)."""
        pool = [n for n in self.functions if not n.startswith("__") and n[:1].isupper() == like[:1].isupper()]
        for _ in range(50):
            if not pool:
                return None
            name = rng.choice(pool)
            if _usable(name, taken, self.lang):
                return name
        return None


def _usable(name: str, taken: set[str], lang: str) -> bool:
    bare = name.lstrip("$")
    if name in taken or bare in taken or name in KEYWORDS.get(lang, ()) or bare in KEYWORDS.get(lang, ()):
        return False
    return not (lang == "python" and (bare in PYTHON_BUILTINS or bare.startswith("__")))


def _is_variable(name: str) -> bool:
    return name not in NOT_VARIABLES and not name.startswith("__")


def _near_miss(name: str, taken: set[str], lang: str) -> str | None:
    """`item` -> `items`, `values` -> `value`: the most common way a real unbound name arises."""
    bare = name.lstrip("$")
    if len(bare) < 3:
        return None
    cand = name[:-1] if bare.endswith("s") and not bare.endswith("ss") else name + "s"
    return cand if _usable(cand, taken, lang) else None


def _norm(name: str) -> str:
    return name.lstrip("$_").replace("_", "").lower()


# ------------------------------------------------------------------------------------------ defect


def mutate(
    f: Function, a: Analysis, kind: str, rng: random.Random, vocab: Vocabulary, visible: int
) -> Mutation | None:
    """Inject one bug of `kind` whose first edit starts before character `visible`; None if no site."""
    fn = {
        "unbound_name": _unbound_name,
        "swapped_arguments": _swapped_arguments,
        "wrong_return": _wrong_return,
        "undefined_call": _undefined_call,
    }[kind]
    return fn(f, a, rng, vocab, visible)


def _done(f: Function, kind: str, edits: list[tuple[int, int, str]]) -> Mutation | None:
    code = replace_spans(f.code, edits)
    if code == f.code:
        return None
    start, end, text = min(edits)
    return Mutation(kind, code, start, f.code[start:end], text)


def _unbound_name(f: Function, a: Analysis, rng: random.Random, vocab: Vocabulary, visible: int):
    """Replace one read of a bound variable with a name the function never binds (nor shows anywhere)."""
    sites = [(span, n) for span, n in a.uses if _is_variable(n) and span[0] < visible]
    if not sites:
        return None
    span, name = rng.choice(sites)
    taken = vocab.taken(f, a)
    new = _near_miss(name, taken, f.language) if rng.random() < 0.5 else None
    new = new or vocab.fresh_variable(rng, taken, like=name)
    if new is None:
        return None
    return _done(f, "unbound_name", [(span[0], span[1], new)])


def _swapped_arguments(f: Function, a: Analysis, rng: random.Random, vocab: Vocabulary, visible: int):
    """Swap two name arguments of a call whose order the names pin down: they match the callee's
    parameter names (callee found in the corpus), or they are the caller's own parameters passed on in
    the caller's order."""
    own = {p: i for i, p in enumerate(a.params)}
    sites = []
    for call in a.calls:
        if call.span[0] >= visible or call.callee in SYMMETRIC_CALLS or len(call.args) < 2:
            continue
        params = vocab.params_of(call.callee, f.path)
        if params and call.member and f.language == "python" and params[0] in ("self", "cls"):
            params = params[1:]
        for i in range(len(call.args)):
            for j in range(i + 1, len(call.args)):
                (si, ni), (sj, nj) = call.args[i], call.args[j]
                if ni is None or nj is None or ni == nj or not (_is_variable(ni) and _is_variable(nj)):
                    continue
                by_callee = (
                    params is not None
                    and j < len(params)
                    and _norm(ni) == _norm(params[i])
                    and _norm(nj) == _norm(params[j])
                )
                by_caller = ni in own and nj in own and own[ni] < own[nj]
                if by_callee or by_caller:
                    sites.append((si, ni, sj, nj))
    if not sites:
        return None
    si, ni, sj, nj = rng.choice(sites)
    return _done(f, "swapped_arguments", [(si[0], si[1], nj), (sj[0], sj[1], ni)])


def _wrong_return(f: Function, a: Analysis, rng: random.Random, vocab: Vocabulary, visible: int):
    """`return x` -> `return y`, where y is another variable of the function bound before that return."""
    sites = []
    for span, name in a.returns:
        if span[0] >= visible:
            continue
        others = sorted(
            n for n, pos in a.scope_bound.items() if n != name and pos < span[0] and _is_variable(n)
        )
        if others:
            sites.append((span, others))
    if not sites:
        return None
    span, others = rng.choice(sites)
    return _done(f, "wrong_return", [(span[0], span[1], rng.choice(others))])


def _undefined_call(f: Function, a: Analysis, rng: random.Random, vocab: Vocabulary, visible: int):
    """Call a plausible name that does not exist: a well-known library call renamed (`len` -> `length`,
    `strings.HasPrefix` -> `strings.StartsWith`, `.equals` -> `.isEqual`)."""
    table = UNDEFINED_CALLS.get(f.language, {})
    sites: list[tuple[tuple[int, int], tuple[str, ...]]] = []
    for call in a.calls:
        if call.span[0] >= visible:
            continue
        if not call.member and call.callee in table and call.callee not in a.bound:
            sites.append((call.span, table[call.callee]))
        elif call.member and f"{call.qual}.{call.callee}" in table:
            sites.append((call.span, table[f"{call.qual}.{call.callee}"]))
        elif call.member and f".{call.callee}" in table and f.language != "ruby":
            sites.append((call.span, table[f".{call.callee}"]))
    if f.language == "ruby":  # Ruby calls methods without parentheses: look at every `.name`
        tokens = [t for t in lex(f.code, "ruby") if t.kind != "comment"]
        for i, t in enumerate(tokens[1:], 1):
            if t.kind == "name" and tokens[i - 1].text == "." and f".{t.text}" in table and t.start < visible:
                sites.append(((t.start, t.end), table[f".{t.text}"]))
    taken = vocab.taken(f, a)
    sites = [(s, [r for r in reps if _usable(r, taken, f.language)]) for s, reps in sites]
    sites = [(s, reps) for s, reps in sites if reps]
    if f.language == "python":
        sites = [(s, [r for r in reps if not hasattr(builtins, r)]) for s, reps in sites]
        sites = [(s, reps) for s, reps in sites if reps]
    if not sites:
        return None
    span, reps = rng.choice(sorted(sites))
    return _done(f, "undefined_call", [(span[0], span[1], rng.choice(reps))])


# ------------------------------------------------------------------------------------------- clone


def rename(f: Function, a: Analysis, rng: random.Random, vocab: Vocabulary) -> tuple[str, dict[str, str]]:
    """Rename the function and (each with probability 3/4, at least one) its renamable variables
    consistently, to names drawn from the corpus that the code does not show."""
    taken = set(a.names) | a.bound
    mapping: dict[str, str] = {}
    names = [n for n in a.renamable() if _is_variable(n)]
    chosen = [n for n in names if rng.random() < 0.75] or names[:1]
    for n in chosen:
        new = vocab.fresh_variable(rng, taken, like=n)
        if new is not None:
            mapping[n] = new
            taken.add(new)
    edits = [(s, e, mapping[n]) for n in mapping for s, e in a.occurrences[n]]
    # not renamed: special methods (`__init__`, `__construct`), Java constructors (the class's name)
    special = f.name.startswith("__") or (f.language == "java" and f.name[:1].isupper())
    # a name also used as a symbol, string or member (`apply(:name)`, `"name"`, `self.name`) stays
    mentioned = len(re.findall(rf"(?<![\w$]){re.escape(f.name)}(?![\w$])", f.code)) > 1 + len(a.self_calls)
    if a.name_span is not None and f.name not in a.bound and not special and not mentioned:
        new = vocab.fresh_function(rng, taken, like=f.name)
        if new is not None:
            mapping[f.name] = new
            edits += [(s, e, new) for s, e in [a.name_span, *a.self_calls]]
    return replace_spans(f.code, edits), mapping


_HEREDOC = re.compile(r"<<[~-]?['\"]?[A-Z_]+|<<<")


def reformat(code: str, lang: str, rng: random.Random) -> str:
    """Change layout only: indentation unit, spaces after commas, blank lines, brace placement (Java,
    JavaScript, PHP). Strings and comments are left as they are; one to three changes are applied."""
    ops = ["indent", "commas", "blank_lines"] + (["braces"] if lang in ("java", "javascript", "php") else [])
    if _HEREDOC.search(code):
        ops = ["commas"]  # a heredoc's body is a string the lexer cannot see
    rng.shuffle(ops)
    k = rng.randint(1, min(3, len(ops)))
    out = code
    for op in ops:
        new = {"indent": _indent, "commas": _commas, "blank_lines": _blank_lines, "braces": _braces}[op](
            out, lang, rng
        )
        if new != out:
            out = new
            k -= 1
            if k == 0:
                break
    return out


def _protected(code: str, lang: str) -> list[tuple[int, int]]:
    return [(t.start, t.end) for t in lex(code, lang) if t.kind in ("string", "comment") and "\n" in t.text]


def _line_starts(code: str) -> list[int]:
    starts = [0]
    for m in re.finditer("\n", code):
        starts.append(m.end())
    return starts


def _inside(pos: int, spans: Sequence[tuple[int, int]]) -> bool:
    return any(s < pos < e for s, e in spans)


def _indent(code: str, lang: str, rng: random.Random) -> str:
    protected = _protected(code, lang)
    lines = code.split("\n")
    starts = _line_starts(code)
    editable = [i for i in range(len(lines)) if not _inside(starts[i], protected) and lines[i].strip()]
    leading = {i: re.match(r"[ \t]*", lines[i]).group() for i in editable}  # type: ignore[union-attr]
    if any("\t" in ws for ws in leading.values()):
        if lang == "python" or any(" " in ws.split("\t")[0] for ws in leading.values() if "\t" in ws):
            return code
        width = rng.choice((2, 4))
        new = {i: ws.replace("\t", " " * width) for i, ws in leading.items()}
    else:
        widths = {len(ws) for ws in leading.values() if ws}
        if not widths:
            return code
        unit = 0
        for w in widths:
            unit = _gcd(unit, w)
        if unit == 4:
            factor = 0.5
        elif unit == 2:
            factor = 2.0
        else:
            return code
        if lang != "python" and rng.random() < 0.3:
            new = {i: "\t" * (len(ws) // unit) for i, ws in leading.items()}
        else:
            new = {i: " " * int(len(ws) * factor) for i, ws in leading.items()}
    for i, ws in new.items():
        lines[i] = ws + lines[i][len(leading[i]) :]
    return "\n".join(lines)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _commas(code: str, lang: str, rng: random.Random) -> str:
    commas = [t for t in lex(code, lang) if t.kind == "op" and t.text == ","]
    if not commas:
        return code
    spaced = [t for t in commas if code[t.end : t.end + 1] == " "]
    edits = []
    if len(spaced) * 2 >= len(commas):
        for t in spaced:
            nxt = code[t.end + 1 : t.end + 2]
            if nxt and not nxt.isspace():
                edits.append((t.end, t.end + 1, ""))
    else:
        for t in commas:
            nxt = code[t.end : t.end + 1]
            if nxt and not nxt.isspace() and nxt not in ")]}":
                edits.append((t.end, t.end, " "))
    return replace_spans(code, edits)


def _blank_lines(code: str, lang: str, rng: random.Random) -> str:
    protected = _protected(code, lang)
    lines = code.split("\n")
    starts = _line_starts(code)
    blank = [i for i in range(len(lines)) if not lines[i].strip() and not _inside(starts[i], protected)]
    if blank:
        keep = set(blank)
        return "\n".join(line for i, line in enumerate(lines) if i not in keep)
    spots = [
        i
        for i in range(1, len(lines) - 1)
        if not _inside(starts[i], protected) and not lines[i - 1].rstrip().endswith("\\")
    ]
    if not spots:
        return code
    chosen = set(rng.sample(spots, min(len(spots), rng.randint(1, 2))))
    out = []
    for i, line in enumerate(lines):
        if i in chosen:
            out.append("")
        out.append(line)
    return "\n".join(out)


def _braces(code: str, lang: str, rng: random.Random) -> str:
    """K&R (`) {`) <-> Allman (`{` on its own line) for blocks opened after `)`."""
    protected = [(t.start, t.end) for t in lex(code, lang) if t.kind in ("string", "comment")]
    knr = [m for m in re.finditer(r"\)[ \t]*\{[ \t]*\n", code) if not _inside(m.start(), protected)]
    allman = [
        m
        for m in re.finditer(r"(?<=[\w)\]])[ \t]*\n([ \t]*)\{[ \t]*\n", code)
        if not any(s <= m.start() - 1 < e for s, e in protected)  # a line ending in a comment keeps its `{`
        and not code[: m.start()].rstrip().endswith("return")
    ]
    if allman:
        return replace_spans(code, [(m.start(), m.end(), " {\n") for m in allman])
    if not knr:
        return code
    edits = []
    for m in knr:
        line_start = code.rfind("\n", 0, m.start()) + 1
        indent = re.match(r"[ \t]*", code[line_start:]).group()  # type: ignore[union-attr]
        edits.append((m.start() + 1, m.end(), f"\n{indent}{{\n"))
    return replace_spans(code, edits)


# --------------------------------------------------------------------------------------- exception

_RAISE = {
    "python": re.compile(r"\braise\s+((?:[A-Za-z_]\w*\.)*([A-Z]\w*))\b(?!\s*\.)"),
    "ruby": re.compile(
        r"(?<![.\w])(?:raise|fail)\s*\(?\s*((?:[A-Za-z_]\w*::)*([A-Z]\w*))\b(?!\s*\.(?!new\b))"
    ),
    "java": re.compile(r"\bthrow\s+new\s+((?:[A-Za-z_]\w*\.)*([A-Z]\w*))\s*[(<]"),
    "javascript": re.compile(r"\bthrow\s+(?:new\s+)?((?:[A-Za-z_$][\w$]*\.)*([A-Z][\w$]*))\s*\("),
    "php": re.compile(r"\bthrow\s+new\s+(\\?(?:[A-Za-z_]\w*\\)*([A-Z]\w*))\s*\("),
}


def raised_types(code: str, lang: str) -> list[tuple[str, tuple[int, int]]]:
    """(type name, span of the whole qualified name) of every `raise T` / `throw new T(...)` outside
    strings and comments."""
    pattern = _RAISE.get(lang)
    if pattern is None:
        return []
    protected = [(t.start, t.end) for t in lex(code, lang) if t.kind in ("string", "comment")]
    out = []
    for m in pattern.finditer(code):
        if any(s <= m.start() < e for s, e in protected):
            continue
        out.append((m.group(2), m.span(1)))
    return out


def mask_exception(code: str, lang: str, placeholder: str) -> tuple[str, str] | None:
    """(code with the raised type replaced by `placeholder` everywhere, the type), when the function
    raises exactly one named type; None otherwise (no raise, or several types: the label would be
    ambiguous)."""
    found = raised_types(code, lang)
    types = {t for t, _ in found}
    if len(types) != 1:
        return None
    (typ,) = types
    edits = [(s, e, placeholder) for _, (s, e) in found]
    masked = replace_spans(code, edits)
    # the type named anywhere else (`except T`, `catch (T e)`, a comment) would give the answer away
    masked = re.sub(rf"(?<![\w$]){re.escape(typ)}(?![\w$])", placeholder, masked)
    return masked, typ
