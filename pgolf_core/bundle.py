"""One self-contained Python script from pgolf's own modules (issue 22: the artifact is
the submission).

**Which modules.** `traced_modules` imports the entry modules in a fresh interpreter
(`python -I`, this checkout first on `sys.path`) and lists every `pgolf_core` module it
loaded, package `__init__`s included, sorted by name: never a
hand list. A bundled module that imports an unbundled `pgolf_core` module inside a
function (which tracing cannot see) is refused by `bundle_source`, by name.

**The script.** `bundle_source` embeds the traced sources in a dict {module name:
(is package, source)} and puts an importer (a `MetaPathFinder` and `Loader` in one) at
the front of `sys.meta_path`: the embedded modules win over any installed `pgolf_core`,
and any other `pgolf_core` module is refused (`ModuleNotFoundError`, "not in this
bundle"), so nothing of an installed copy can slip in. A module is compiled with the
file name `<bundle>/pgolf_core/x.py` and its source is put in `linecache` (and served by
the loader's `get_source`), so tracebacks show the lines and `inspect.getsource` works
(Triton's `jit` reads kernels' source that way). The script refuses to run in a process
that has already imported `pgolf_core`. The profile's hyperparameters are a literal
`BAKED` dict; `main_call` runs under `if __name__ == "__main__":`.

**Shipped form.** `minify` drops docstrings, comments, blank lines and the annotations
nothing reads at run time through `ast` (`ast.unparse`) and indents by one space, and
checks that the result parses to the same AST as the source after those removals (a
bundle any of whose modules may read docstrings or function annotations at run time,
`reads_at_run_time`, keeps them in every module). The minified bundle then loses the
module-level functions and classes nothing in it references (`drop_unreferenced`).
`self_extracting` wraps a script as `exec(<decompress>(<payload>))`, the payload xz,
raw LZMA2, zlib or (where the script imports brotli anyway) brotli in base85, whichever
is smallest, or raw LZMA2 or brotli as a latin-1 string literal in a file that declares
that encoding (`script.payload`: about 1.02 bytes per compressed byte where base85
spends 1.25); it runs in the wrapper's own globals, so `__name__` is the wrapper's and
the main block runs exactly when the wrapper is run as a script. `shipped_script`
returns the smaller of the minified and the self-extracting script as the file's bytes
(`Shipped.data`, what `code_bytes` charges) and says which.

**Isolation.** This venv has `pgolf_core` installed editable: setuptools' `.pth` file
runs `__editable___pgolf_*_finder.install()`, which appends a meta path finder mapping
`pgolf_core` to a checkout, so even `python -I` imports it. `run_isolated` therefore
starts `python -I -c <bootstrap>`: the bootstrap removes from `sys.meta_path` every
finder other than the standard three that finds `pgolf_core`, and from `sys.path` every
entry where `pgolf_core` is found (an entry that also holds `torch`, i.e. a plain install
into site-packages, is refused rather than removed), then checks that
`importlib.util.find_spec("pgolf_core")` is None and only then runs the script with
`runpy.run_path(..., run_name="__main__")`. In that process `pgolf_core` exists only as
the bundle's embedded modules.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import lzma
import os
import re
import subprocess
import sys
import tokenize
import zlib
from collections import Counter
from dataclasses import dataclass
from importlib.util import decode_source
from pathlib import Path

import brotli as brotli_codec

ROOT_PACKAGE = "pgolf_core"
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the checkout whose pgolf_core is bundled
FILENAME_PREFIX = "<bundle>/"  # bundled modules' file names: <bundle>/pgolf_core/x.py
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

# --- tracing ----------------------------------------------------------------------

_PROBE = r"""
import importlib, importlib.util, json, sys, traceback
root, package, names = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, root)
for name in names:
    try:
        missing = importlib.util.find_spec(name) is None
    except ModuleNotFoundError:
        missing = True
    if missing:
        print(json.dumps({"missing": name}))
        sys.exit(0)
    try:
        importlib.import_module(name)
    except BaseException:
        print(json.dumps({"failed": name, "error": traceback.format_exc()}))
        sys.exit(0)
mods = {n: [m.__file__, hasattr(m, "__path__")] for n, m in list(sys.modules.items())
        if (n == package or n.startswith(package + ".")) and getattr(m, "__file__", None)}
print(json.dumps({"modules": mods}))
"""


def _check_names(names, what: str) -> tuple[str, ...]:
    if isinstance(names, str):
        raise TypeError(f"{what} must be a tuple of module names, not the string {names!r}")
    names = tuple(names)
    if not names:
        raise ValueError(f"{what} is empty: nothing to bundle")
    for name in names:
        if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
            raise ValueError(f"{what}: {name!r} is not a module name")
        if name != ROOT_PACKAGE and not name.startswith(ROOT_PACKAGE + "."):
            raise ValueError(f"{what}: {name!r} is not a {ROOT_PACKAGE} module (only {ROOT_PACKAGE} is bundled)")
    return names


def _trace(entry_modules) -> dict[str, tuple[bool, Path]]:
    """{module name: (is package, source file)} of every ROOT_PACKAGE module a fresh
    interpreter loads when importing `entry_modules`, sorted by name."""
    names = _check_names(entry_modules, "entry_modules")
    out = subprocess.run([sys.executable, "-I", "-c", _PROBE, str(SOURCE_ROOT), ROOT_PACKAGE, *names],
                         capture_output=True, text=True, check=False)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"tracing the imports of {names} failed in a fresh interpreter:\n{out.stderr}")
    result = json.loads(lines[-1])
    if "missing" in result:
        raise ValueError(f"entry module {result['missing']!r} does not exist (no such module under {SOURCE_ROOT})")
    if "failed" in result:
        raise ValueError(f"entry module {result['failed']!r} fails to import in a fresh interpreter:\n{result['error']}")
    package_dir = SOURCE_ROOT / ROOT_PACKAGE
    traced = {}
    for name, (file, is_package) in sorted(result["modules"].items()):
        path = Path(file).resolve()
        if not path.is_relative_to(package_dir) or path.suffix != ".py":
            raise RuntimeError(f"{name} was loaded from {path}, not from {package_dir}: another {ROOT_PACKAGE} shadows this checkout's")
        traced[name] = (is_package, path)
    return traced


def traced_modules(entry_modules: tuple[str, ...]) -> list[str]:
    """The ROOT_PACKAGE modules (package `__init__`s included) a fresh interpreter loads
    when importing `entry_modules`, sorted by name."""
    return list(_trace(entry_modules))


def _unbundled_imports(name: str, is_package: bool, tree: ast.Module, bundled) -> list[str]:
    """ROOT_PACKAGE modules that module `name` imports anywhere (inside functions too)
    and that exist as files but are not in `bundled`."""
    base = name if is_package else name.rpartition(".")[0]
    wanted = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            wanted += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{parent}.{node.module}" if node.module else parent
            else:
                module = node.module or ""
            wanted.append(module)
            wanted += [f"{module}.{alias.name}" for alias in node.names]  # a submodule, when a file says so
    missing = []
    for module in wanted:
        if module.partition(".")[0] != ROOT_PACKAGE or module in bundled:
            continue
        rel = Path(*module.split("."))
        if (SOURCE_ROOT / rel).with_suffix(".py").is_file() or (SOURCE_ROOT / rel / "__init__.py").is_file():
            missing.append(module)
    return sorted(set(missing))


def load_imports(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(top-level packages a module imports when it is imported, those it imports only
    inside functions or under a try: optional paths, e.g. Triton kernels, PyYAML)."""
    required, optional = set(), set()

    def visit(node: ast.AST, guarded: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = guarded or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.Try))
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and not child.level and child.module:
                names = [child.module]
            for name in names:
                (optional if inner else required).add(name.partition(".")[0])
            visit(child, inner)

    visit(tree, False)
    return required, optional - required


# --- minification -------------------------------------------------------------------

_BODY_FIELDS = ("body", "orelse", "finalbody")


# Names through which code reads what the minifier removes. `__doc__` and `getdoc`
# (inspect's) read docstrings; `__annotations__`, `get_annotations` (inspect's) and
# `singledispatch` (which registers a function by its first parameter's annotation) read
# function annotations. `typing.get_type_hints` is not among them: pgolf calls it on
# dataclasses, whose field annotations are always kept; a call on a function would need it.
_DOC_READERS = frozenset({"__doc__", "getdoc"})
_ANNOTATION_READERS = frozenset({"__annotations__", "get_annotations", "singledispatch", "singledispatchmethod"})


def reads_at_run_time(tree: ast.AST) -> frozenset[str]:
    """What of the minifier's removals code in `tree` may read: "docstrings",
    "annotations" (of functions), or both. A name counts wherever it occurs: as a name,
    an attribute, an imported name or a string (`getattr(f, "__doc__")`)."""
    names = _words(tree).keys()
    return frozenset({"docstrings"} if names & _DOC_READERS else set()) | \
        frozenset({"annotations"} if names & _ANNOTATION_READERS else set())


def strip_docstrings(tree: ast.Module) -> ast.Module:
    """`tree` (changed in place) without docstrings and other bare string statements (no
    effect at run time, like `python -OO`); a body left empty becomes `pass`."""
    for node in ast.walk(tree):
        for field in _BODY_FIELDS:
            body = getattr(node, field, None)
            if not isinstance(body, list) or not body or not isinstance(body[0], ast.stmt):
                continue
            kept = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                            and isinstance(s.value.value, str))]
            if not kept and field == "body":
                kept = [ast.Pass()]
            setattr(node, field, kept)
    return ast.fix_missing_locations(tree)


def _arguments(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.arg]:
    args = function.args
    return [a for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg) if a is not None]


def _annotations_read(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether something may read this function's annotations at run time: a decorator
    (`torch.library.custom_op` takes its schema from them), or Triton, which marks
    compile-time parameters by a `tl.constexpr` annotation and may wrap the function
    without a decorator (`JITFunction(fn)`)."""
    annotations = [a.annotation for a in _arguments(function) if a.annotation is not None]
    return bool(function.decorator_list) or any("constexpr" in ast.unparse(a) for a in annotations)


def _strip_function_annotations(function: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
    for arg in _arguments(function):
        arg.annotation = None
    function.returns = None


def _strip_local_annotations(body: list) -> list:
    """A function body's statements with `x: T = v` as `x = v`, searched through its
    compound statements but not into nested functions or classes (visited on their own).
    A bare `x: T` stays: it makes `x` local, which dropping it could change."""
    out = []
    for stmt in body:
        if isinstance(stmt, ast.AnnAssign) and stmt.value is not None and stmt.simple:
            stmt = ast.copy_location(ast.Assign(targets=[stmt.target], value=stmt.value), stmt)
        elif not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for field in _BODY_FIELDS:
                if isinstance(getattr(stmt, field, None), list):
                    setattr(stmt, field, _strip_local_annotations(getattr(stmt, field)))
            for handler in getattr(stmt, "handlers", ()):  # try: ... except: <body>
                handler.body = _strip_local_annotations(handler.body)
            for case in getattr(stmt, "cases", ()):  # match: case ...: <body>
                case.body = _strip_local_annotations(case.body)
        out.append(stmt)
    return out


def strip_annotations(tree: ast.Module, keep_functions: bool = False) -> ast.Module:
    """`tree` (changed in place) without the annotations nothing reads at run time: the
    parameter and return annotations of functions whose annotations nothing reads
    (`_annotations_read`; none when `keep_functions`), and annotated assignments with a
    value inside function bodies (never stored). Kept: those functions' annotations,
    class bodies' (dataclass fields, which `typing.get_type_hints` reads) and the
    module's. About 4 % of the compressed bundle."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if not keep_functions and not _annotations_read(node):
                _strip_function_annotations(node)
            node.body = _strip_local_annotations(node.body)
    return ast.fix_missing_locations(tree)


def _shipped_tree(source: str, keep: frozenset[str] = frozenset()) -> ast.Module:
    """The AST that `minify` writes back as source: `source`'s without docstrings and
    unread annotations, but for what `keep` or the source itself reads
    (`reads_at_run_time`)."""
    tree = ast.parse(source)
    keep = keep | reads_at_run_time(tree)
    if "docstrings" not in keep:
        tree = strip_docstrings(tree)
    return strip_annotations(tree, keep_functions="annotations" in keep)


def _compact_lines(text: str) -> str:
    """`ast.unparse` output without its blank lines and with its 4-space indentation
    reduced to 1 space, leaving the lines inside multi-line tokens (triple-quoted
    strings) as they are."""
    frozen = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        frozen.update(range(tok.start[0] + 1, tok.end[0] + 1))
    lines = []
    for number, line in enumerate(text.split("\n"), start=1):
        if number in frozen:
            lines.append(line)
        elif line.strip():
            stripped = line.lstrip(" ")
            lines.append(" " * ((len(line) - len(stripped)) // 4) + stripped)
    return "\n".join(lines)


def ast_equivalent(source: str, minified: str, keep: frozenset[str] = frozenset()) -> bool:
    """True when `minified` parses to the AST of `source` with its docstrings and unread
    annotations removed (`strip_docstrings`, `strip_annotations`, `keep` as `minify`
    takes it), ignoring positions."""
    return ast.dump(_shipped_tree(source, keep)) == ast.dump(ast.parse(minified))


def minify(source: str, keep: frozenset[str] = frozenset()) -> str:
    """`source` without docstrings, comments, blank lines and unread annotations,
    indented by one space; the same AST as the source after those removals (checked:
    ValueError if not). `keep` ("docstrings", "annotations"): removals another module
    of a bundle may observe (`reads_at_run_time` of each); the source's own are added."""
    tree = _shipped_tree(source, keep)
    expected = ast.dump(tree)
    text = ast.unparse(tree)
    if ast.dump(ast.parse(text)) != expected:
        raise ValueError("ast.unparse did not round-trip this source (an ast.unparse bug); it cannot be minified")
    compact = _compact_lines(text)
    try:
        if ast.dump(ast.parse(compact)) == expected:
            text = compact
    except SyntaxError:
        pass
    compile(text, "<minified>", "exec", dont_inherit=True)
    return text + "\n" if text else ""


# --- dropping what the script never references ---------------------------------------

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Decorators that only wrap or describe the function or class they decorate: a def so
# decorated does nothing at definition time that anything could observe once nothing
# references it. Any other decorator may register it (`register_fake`, `custom_op`), so
# its def is always kept.
_PURE_DECORATORS = frozenset({"dataclass", "dataclasses.dataclass", "functools.cache", "functools.lru_cache",
                              "functools.cached_property", "contextlib.contextmanager", "torch.no_grad"})


def _words(node: ast.AST) -> Counter:
    """How often each identifier occurs in `node`: names, attributes, keyword
    arguments, imported names and every identifier-like word of its string constants
    (a name looked up by `getattr(x, "name")` counts)."""
    counts = Counter()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            found = [sub.id]
        elif isinstance(sub, ast.Attribute):
            found = [sub.attr]
        elif isinstance(sub, ast.keyword):
            found = [sub.arg] if sub.arg else []
        elif isinstance(sub, ast.alias):
            found = sub.name.split(".") + ([sub.asname] if sub.asname else [])
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            found = _WORD.findall(sub.value)
        else:
            continue
        counts.update(found)
    return counts


# Calls a class body may make to declare its fields: they run at definition time but only
# build a descriptor of the class itself.
_FIELD_CALLS = frozenset({"field", "dataclasses.field"})


def _calls_in(nodes) -> list[str]:
    """The callees of every call inside `nodes` (as source text)."""
    return [ast.unparse(sub.func) for node in nodes if node is not None for sub in ast.walk(node)
            if isinstance(sub, ast.Call)]


def _runs_code_when_defined(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef,
                            subclasses_observed: bool) -> bool:
    """Whether defining `node` may do something observable besides binding its name: a
    call in a default argument; for a class, a call in its body's statements (a field
    declaration aside) or in its bases, a keyword (`metaclass=`), or any base at all
    where some bundled class defines `__init_subclass__` (`subclasses_observed`), which
    sees every subclass defined."""
    if isinstance(node, ast.ClassDef):
        if node.keywords or (node.bases and subclasses_observed) or _calls_in(node.bases):
            return True
        statements = [s for s in node.body if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))]
        return any(c not in _FIELD_CALLS for c in _calls_in(statements)) or any(
            _runs_code_when_defined(s, subclasses_observed) for s in node.body
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return bool(_calls_in([*node.args.defaults, *node.args.kw_defaults]))


def _droppable(node: ast.stmt, subclasses_observed: bool) -> bool:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("__"):
        return False
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if ast.unparse(target) not in _PURE_DECORATORS:
            return False
    return not _runs_code_when_defined(node, subclasses_observed)


def _looks_up_globals(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("globals", "vars")
                and not node.args):
            return True
        if isinstance(node, ast.ImportFrom) and any(alias.name == "*" for alias in node.names):
            return True
    return any(isinstance(node, ast.FunctionDef) and node.name == "__getattr__" for node in tree.body)


def drop_unreferenced(sources: dict[str, str], also_read: str = "",
                      keep: frozenset[str] = frozenset()) -> tuple[dict[str, str], list[str]]:
    """(`sources` without the module-level functions and classes nothing references,
    the dropped ones as `module.name`). A def counts as referenced when its name occurs
    as an identifier anywhere in the bundle outside its own body, or as a word in a
    string constant there or in `also_read` (the script's own code: its main call and
    baked settings); repeated until nothing more drops, so what only dropped code used
    goes too. Kept whatever the count: dunder names, defs with a decorator that may
    register them (`_PURE_DECORATORS` lists the others) and defs whose definition runs
    code (`_runs_code_when_defined`). Why: the bundle ships the
    modules the entry imports whole, and about 5 % of their minified text is functions
    only the stages call (provenance, tokenizer training, profile merging). Code that
    finds a global by a computed name (`globals()`, `vars()`, a module `__getattr__`,
    `import *`) would defeat the count, so a bundle with any of them drops nothing."""
    trees = {name: ast.parse(text) for name, text in sources.items()}
    if any(_looks_up_globals(tree) for tree in trees.values()):
        return dict(sources), []
    subclasses_observed = any(isinstance(node, ast.FunctionDef) and node.name == "__init_subclass__"
                              for tree in trees.values() for node in ast.walk(tree))
    outside = Counter(_WORD.findall(also_read))
    # a statement's words never change (dropping edits module bodies only): count each once
    words = {node: _words(node) for tree in trees.values() for node in tree.body}  # AST nodes hash by identity
    dropped: list[str] = []
    while True:
        total = outside.copy()
        for tree in trees.values():
            for node in tree.body:
                total.update(words[node])
        before = len(dropped)
        for name, tree in trees.items():
            kept = []
            for node in tree.body:
                if _droppable(node, subclasses_observed) and total[node.name] == words[node][node.name]:
                    dropped.append(f"{name}.{node.name}")
                else:
                    kept.append(node)
            tree.body = kept
        if len(dropped) == before:
            break
    changed = {qualified.rpartition(".")[0] for qualified in dropped}
    for name in changed:
        trees[name].body = trees[name].body or [ast.Pass()]  # a module all of whose defs went
    return {name: minify(ast.unparse(trees[name]), keep) if name in changed else text
            for name, text in sources.items()}, dropped


# --- the bundle ---------------------------------------------------------------------

_BOOTSTRAP = '''\
"""Generated by pgolf_core.bundle from {count} {root} modules ({entries}). Do not edit."""
import importlib.abc
import importlib.machinery
import linecache
import sys
import traceback

_SOURCES = {{  # module name: (is package, source)
{sources}}}
_ROOTS = {roots!r}


class _BundleImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """First on sys.meta_path: serves the embedded modules and refuses every other
    module of their packages, so an installed copy can never be imported."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in _ROOTS:
            return None
        if name not in _SOURCES:
            raise ModuleNotFoundError(f"No module named {{name!r}}: it is not in this bundle", name=name)
        return importlib.machinery.ModuleSpec(name, self, origin=self.filename(name), is_package=_SOURCES[name][0])

    @staticmethod
    def filename(name):
        return {prefix!r} + name.replace(".", "/") + ("/__init__.py" if _SOURCES[name][0] else ".py")

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        name = module.__name__
        source, filename = _SOURCES[name][1], self.filename(name)
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec", dont_inherit=True), module.__dict__)

    def get_source(self, name):
        return _SOURCES[name][1]


_outside = sorted(n for n in sys.modules if n.partition(".")[0] in _ROOTS)
if _outside:
    raise ImportError(f"{{_outside[0]}} is already imported from outside this bundle: run the bundle in a fresh interpreter")
sys.meta_path.insert(0, _BundleImporter())
if sys.excepthook is sys.__excepthook__:  # the built-in hook reads source lines from files only, not linecache
    sys.excepthook = traceback.print_exception
BAKED = {baked}
'''


def _baked_literal(baked: dict | None) -> str:
    if baked is None:
        return "None"
    if not isinstance(baked, dict):
        raise TypeError(f"baked must be a dict of hyperparameters, not {type(baked).__name__}")

    def normal(value):
        if isinstance(value, (list, tuple)):
            return [normal(v) for v in value]
        if isinstance(value, dict):
            return {k: normal(v) for k, v in value.items()}
        return value

    try:
        text = json.dumps(baked, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"baked is not JSON-able (finite numbers, strings, bools, None, lists, str-keyed dicts): {err}") from None
    value = json.loads(text)
    if value != normal(baked):
        raise ValueError("baked changes through JSON (a dict key that is not a string?); use string keys")
    return repr(value)


def _main_block(main_call: str) -> str:
    if not isinstance(main_call, str) or not main_call.strip():
        raise ValueError("main_call is empty: the bundle would run nothing")
    try:
        body = ast.parse(main_call).body
    except SyntaxError as err:
        raise ValueError(f"main_call is not valid Python: {err}") from None
    test = ast.parse('__name__ == "__main__"', mode="eval").body
    return ast.unparse(ast.fix_missing_locations(ast.Module([ast.If(test, body, [])], []))) + "\n"


def _render(entries: tuple[str, ...], traced: dict[str, tuple[bool, Path]], main_call: str,
            baked: dict | None, minified: bool, left_out: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """(the script, the defs `drop_unreferenced` dropped: none unless `minified`)."""
    sources, problems, trees = {}, [], {}
    for name, (is_package, path) in traced.items():
        text = decode_source(path.read_bytes())
        trees[name] = ast.parse(text, filename=str(path))
        problems += [f"{name} imports {m}" for m in _unbundled_imports(name, is_package, trees[name], traced)
                     if m not in left_out]
        sources[name] = (is_package, text)
    # what one module reads (a docstring, an annotation) may be another's: kept bundle-wide
    keep = frozenset().union(*map(reads_at_run_time, trees.values()))
    if minified:
        sources = {name: (is_package, minify(text, keep)) for name, (is_package, text) in sources.items()}
    if problems:
        raise ValueError("bundled modules import unbundled ones (inside functions, which tracing misses): "
                         + "; ".join(problems) + ". Add them to the entry modules.")
    baked_text, dropped = _baked_literal(baked), []
    if minified:
        sources, dropped = _drop_from_bundle(sources, main_call + "\n" + baked_text, keep)
    items = "".join(f"    {name!r}: ({pkg!r}, {src!r}),\n" for name, (pkg, src) in sources.items())
    script = _BOOTSTRAP.format(count=len(sources), root=ROOT_PACKAGE, entries=", ".join(entries),
                               sources=items, roots=(ROOT_PACKAGE,), prefix=FILENAME_PREFIX,
                               baked=baked_text)
    script += _main_block(main_call)
    return (minify(script) if minified else script), dropped


def _drop_from_bundle(sources: dict[str, tuple[bool, str]], also_read: str, keep: frozenset[str]):
    texts, dropped = drop_unreferenced({name: text for name, (_, text) in sources.items()}, also_read, keep)
    return {name: (is_package, texts[name]) for name, (is_package, _) in sources.items()}, dropped


def _prepare(entry_modules, main_module: str, main_call: str | None):
    entries = _check_names(entry_modules, "entry_modules")
    (main_module,) = _check_names((main_module,), "main_module")
    if main_module not in entries:
        entries += (main_module,)
    if main_call is None:
        main_call = f"import {main_module} as _main\n_main.main(BAKED)"
    _main_block(main_call)  # refuse a bad main_call before the (slow) trace
    return entries, _trace(entries), main_call


def bundle_source(entry_modules: tuple[str, ...], main_module: str, main_call: str | None = None,
                  baked: dict | None = None, *, minified: bool = False, left_out: tuple[str, ...] = ()) -> str:
    """One Python script embedding the ROOT_PACKAGE modules that importing
    `entry_modules` and `main_module` loads; importable under their own names with no
    installed ROOT_PACKAGE. It defines `BAKED` (the literal of `baked`) and runs
    `main_call` (default `import <main_module> as _main; _main.main(BAKED)`) when run as
    a script. `minified`: each module and the script itself through `minify`. `left_out`:
    modules a bundled one imports inside a function, deliberately not bundled because
    this script never takes that path (training's fused kernels when switched off); an
    import of one still fails, by name."""
    entries, traced, main_call = _prepare(entry_modules, main_module, main_call)
    return _render(entries, traced, main_call, baked, minified, left_out)[0]


# --- compression and the shipped form ------------------------------------------------


def script_bytes(text: str) -> int:
    """A script's size as shipped and as `code_bytes` charges it: its UTF-8 bytes."""
    return len(text.encode("utf-8"))


def _raw_lzma2(data: bytes) -> bytes:
    best = None
    for lc, lp, pb in ((3, 0, 2), (3, 0, 0), (4, 0, 0), (2, 0, 0), (1, 0, 0)):
        filt = {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": lc, "lp": lp, "pb": pb}
        out = lzma.compress(data, format=lzma.FORMAT_RAW, filters=[filt])
        if best is None or len(out) < len(best):
            best = out
    return best


# Bytes a str literal must escape in the latin-1 wrapper: NUL (no source may hold one),
# the line ends (a lone CR ends a line too), the quote and the backslash.
_LATIN1_ESCAPES = {0: "\\0", 10: "\\n", 13: "\\r", 34: '\\"', 92: "\\\\"}


def latin1_literal(payload: bytes) -> str:
    """A double-quoted str literal that, in a source file read as latin-1, is the str
    whose latin-1 encoding is `payload`: one source byte per payload byte but for the
    few escaped (about 1 in 50 of compressed bytes), where base85 spends 5 per 4."""
    chars = []
    for i, b in enumerate(payload):
        if b == 0 and payload[i + 1 : i + 2].isdigit():
            chars.append("\\x00")  # "\0" and an octal digit would read as one escape
        else:
            chars.append(_LATIN1_ESCAPES.get(b, chr(b)))
    return '"' + "".join(chars) + '"'


def self_extracting(source: str, payload: str = "base85", brotli: bool = False) -> bytes:
    """The bytes of a tiny script that decompresses `source` and runs it in its own
    globals (so its `if __name__ == "__main__":` block runs exactly when this script is
    run as one). `payload` (`script.payload`): "base85", the smallest of xz, raw LZMA2 and
    zlib in base85 (an ASCII file); "latin1", raw LZMA2 as a latin-1 str literal in a file
    that declares `coding: latin-1` (PEP 263, which Python honours wherever it reads
    source: run, runpy, import). `brotli`: brotli 11 is a candidate too (both payloads),
    for a script that imports the `brotli` package anyway, so that the wrapper adds no
    requirement; on pgolf's bundle it is about 2.4 % smaller than raw LZMA2."""
    data = source.encode("utf-8")
    raw = _raw_lzma2(data)
    raw_call = 'L.FORMAT_RAW,None,[{"id":L.FILTER_LZMA2}]'
    packed_brotli = brotli_codec.compress(data, quality=11, lgwin=24) if brotli else None
    # The payload on a line of its own: a traceback quotes only the line of the exec call.
    if payload == "latin1":
        candidates = [f'#coding:latin-1\nimport lzma as L\nexec(L.decompress(\n{latin1_literal(raw)}.encode("latin-1"),{raw_call}))\n']
        if packed_brotli is not None:
            candidates.append(f'#coding:latin-1\nimport brotli as R\nexec(R.decompress(\n{latin1_literal(packed_brotli)}.encode("latin-1")))\n')
        return min(candidates, key=len).encode("latin-1")
    if payload != "base85":
        raise ValueError(f"script.payload={payload!r}: must be 'base85' or 'latin1'")

    def b85(blob: bytes) -> str:
        return base64.b85encode(blob).decode("ascii")  # no quote or backslash in its alphabet

    candidates = [
        f'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode(\n"{b85(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))}")))\n',
        f'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode(\n"{b85(raw)}"),{raw_call}))\n',
        f'import zlib as Z,base64 as B\nexec(Z.decompress(B.b85decode(\n"{b85(zlib.compress(data, 9))}")))\n',
    ]
    if packed_brotli is not None:
        candidates.append(f'import brotli as R,base64 as B\nexec(R.decompress(B.b85decode(\n"{b85(packed_brotli)}")))\n')
    return min(candidates, key=len).encode("ascii")


@dataclass(frozen=True)
class Shipped:
    """The script as shipped (`data`: the file's bytes, what `code_bytes` charges), which
    form won ("minified" or "self-extracting"), the bytes of each form ("plain": the
    readable bundle, "minified", "self_extracting"), the modules it holds and the
    unreferenced defs left out of them (`module.name`, `drop_unreferenced`)."""

    data: bytes
    form: str
    sizes: dict
    modules: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        return len(self.data)


def smaller_form(minified_source: str, payload: str = "base85", brotli: bool = False) -> tuple[bytes, str]:
    """(the script's bytes, form): `minified_source` itself (UTF-8) or its
    self-extracting wrapper with that `payload` and `brotli` choice, whichever is
    smaller (the minified text on a tie: it stays readable)."""
    packed = self_extracting(minified_source, payload, brotli)
    if len(packed) < script_bytes(minified_source):
        return packed, "self-extracting"
    return minified_source.encode("utf-8"), "minified"


def shipped_script(entry_modules: tuple[str, ...], main_module: str, main_call: str | None = None,
                   baked: dict | None = None, left_out: tuple[str, ...] = (), payload: str = "base85") -> Shipped:
    """The bundle (see `bundle_source`) as shipped: the smaller of its minified and
    self-extracting forms, with the bytes of every form."""
    entries, traced, main_call = _prepare(entry_modules, main_module, main_call)
    plain, _ = _render(entries, traced, main_call, baked, minified=False, left_out=left_out)
    small, dropped = _render(entries, traced, main_call, baked, minified=True, left_out=left_out)
    brotli = any("brotli" in load_imports(ast.parse(path.read_bytes()))[0] for _, path in traced.values())
    data, form = smaller_form(small, payload, brotli)
    packed = len(data) if form == "self-extracting" else len(self_extracting(small, payload, brotli))  # compress once
    sizes = {"plain": script_bytes(plain), "minified": script_bytes(small), "self_extracting": packed}
    return Shipped(data=data, form=form, sizes=sizes, modules=tuple(traced), dropped=tuple(dropped))


# --- running in isolation -------------------------------------------------------------

_ISOLATE = r"""
import importlib, importlib.machinery as M, importlib.util, runpy, sys
hidden = sys.argv[1].split(",")
if not sys.flags.isolated:
    sys.exit("isolate: not started with -I")
standard = (M.BuiltinImporter, M.FrozenImporter, M.PathFinder)
def finds(finder, name, path=None):
    find = getattr(finder, "find_spec", None)
    return find is not None and find(name, path) is not None
for finder in list(sys.meta_path):
    if finder not in standard and any(finds(finder, n) for n in hidden):
        sys.meta_path.remove(finder)  # e.g. setuptools' editable finder
for entry in list(sys.path):
    if any(M.PathFinder.find_spec(n, [entry]) for n in hidden):
        if M.PathFinder.find_spec("torch", [entry]):
            sys.exit(f"isolate: {hidden} is installed in {entry} beside torch; install it editable or not at all")
        sys.path.remove(entry)
sys.path_importer_cache.clear()
importlib.invalidate_caches()
for name in hidden:
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        sys.exit(f"isolate: {name} is still importable")
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_isolated(script_path, args=(), env: dict | None = None, *, cwd=None, timeout: float | None = None,
                 python: str = sys.executable) -> subprocess.CompletedProcess:
    """Run `script_path` with `args` in a fresh `python -I` in which ROOT_PACKAGE cannot be
    imported from anywhere (see the module docstring), in `cwd` (default: the script's
    directory), with `env` (default: this environment without PYTHONPATH). Text output
    captured; the exit status is not checked."""
    script = Path(script_path).resolve()
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([python, "-I", "-c", _ISOLATE, ROOT_PACKAGE, str(script), *map(str, args)],
                          cwd=cwd or script.parent, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
