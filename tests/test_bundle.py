"""pgolf_core.bundle: one self-contained script from pgolf's own modules, run in a fresh
`python -I` where pgolf_core itself cannot be imported."""

import ast
import dataclasses
import json
import lzma
import os
import runpy
import subprocess
import sys
import textwrap

import brotli
import numpy as np
import pytest

from pgolf_core import bundle

# what rebuilding the model from an artifact and scoring it imports
EVAL_ENTRY_MODULES = ("pgolf_core.artifact", "pgolf_core.eval.sliding", "pgolf_core.bpb", "pgolf_core.data",
                      "pgolf_core.tokenizer")
TRAIN_ENTRY_MODULES = ("pgolf_core.train", "pgolf_core.calibration", "pgolf_core.quant",
                       "pgolf_core.artifact", "pgolf_core.eval.sliding")
NEVER_BUNDLED = ("pgolf_core.hub", "pgolf_core.ngrams", "pgolf_core.export")

# A small GPT with a few of the records' features, as the bundle's BAKED hyperparameters.
BAKED = {"vocab_size": 64, "num_layers": 2, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "mlp_mult": 2,
         "smear_gate": True, "unet_skips": True, "attn_gate": True, "value_embed_layers": [1], "rope_dims": 4}

# Runs in the bundle (as its main_call, with BAKED from the script) and in this process.
CHECKSUM = '''
import importlib.util, inspect, json, sys
import torch
import pgolf_core.model as M


def checksum(baked):
    """Forward-pass sums of a seeded GPT on CPU, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(1234)
        model = M.GPT(M.ModelConfig(**baked)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # zero-initialised projections would hide most of the model
            idx = torch.randint(0, baked["vocab_size"], (2, 24))
            out = model(idx).double()
        return [float(out.sum()), float(out.abs().sum()), float(out[1, -1, :7].sum())]
    finally:
        torch.set_num_threads(threads)


def report(baked):
    """Where pgolf_core comes from in this process, inside and outside the bundle."""
    ours = sys.meta_path[0]
    origins = {n: m.__spec__.origin for n, m in sys.modules.items() if n.partition(".")[0] == "pgolf_core"}
    try:
        import pgolf_core.hub
        hub = "imported"
    except ModuleNotFoundError as err:
        hub = str(err)
    # outside the bundle: without its importer and with none of its modules loaded
    saved = {n: sys.modules.pop(n) for n in list(origins)}
    sys.meta_path.remove(ours)
    try:
        spec = importlib.util.find_spec("pgolf_core")
        outside = None if spec is None else str(spec.origin)
    finally:
        sys.meta_path.insert(0, ours)
        sys.modules.update(saved)
    return {"checksum": checksum(baked), "origins": origins, "hub": hub, "outside": outside,
            "importer": type(ours).__name__, "embedded": sorted(globals().get("_SOURCES", ())), "isolated": sys.flags.isolated,
            "source": inspect.getsource(M.GPT.forward).splitlines()[0].strip()}
'''

MAIN_CALL = CHECKSUM + '''
if sys.argv[1:] == ["fail"]:
    M.ModelConfig(**{**BAKED, "mlp_activation": "nope"})
print(json.dumps(report(BAKED)))
'''


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    """The GPT-checksum bundle as plain source and as shipped, each alone in an empty directory."""
    shipped = bundle.shipped_script(EVAL_ENTRY_MODULES, "pgolf_core.model", MAIN_CALL, BAKED)
    plain = bundle.bundle_source(EVAL_ENTRY_MODULES, "pgolf_core.model", MAIN_CALL, BAKED)
    paths = {}
    for name, data in (("plain", plain.encode("utf-8")), ("shipped", shipped.data)):
        directory = tmp_path_factory.mktemp(name)
        (directory / "train_gpt.py").write_bytes(data)
        paths[name] = directory / "train_gpt.py"
    return paths, shipped


@pytest.fixture(scope="module")
def expected_checksum():
    namespace = {}
    exec(CHECKSUM, namespace)
    return namespace["checksum"](BAKED)


def _report(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- tracing ------------------------------------------------------------------------

@pytest.mark.parametrize("entries", [EVAL_ENTRY_MODULES, TRAIN_ENTRY_MODULES], ids=["eval", "train"])
def test_traced_modules_are_what_the_entries_import(entries):
    traced = bundle.traced_modules(entries)
    assert traced == sorted(traced)
    assert set(entries) | {"pgolf_core", "pgolf_core.eval", "pgolf_core.model", "pgolf_core.quant"} <= set(traced)
    for absent in NEVER_BUNDLED:
        assert absent not in traced
    assert "pgolf_core.bundle" not in traced  # bench is checked on the bundled sources' imports (test_submission)


def test_bad_entries_are_refused_by_name():
    with pytest.raises(ValueError, match="pgolf_core.no_such_module"):
        bundle.traced_modules(("pgolf_core.model", "pgolf_core.no_such_module"))
    with pytest.raises(ValueError, match="'bench.quantize' is not a pgolf_core module"):
        bundle.traced_modules(("bench.quantize",))
    with pytest.raises(ValueError, match="not a module name"):
        bundle.traced_modules(("pgolf_core..model",))
    with pytest.raises(TypeError, match="tuple of module names"):
        bundle.traced_modules("pgolf_core.model")
    with pytest.raises(ValueError, match="empty"):
        bundle.traced_modules(())


def test_bad_bundle_arguments_are_refused():
    with pytest.raises(ValueError, match="main_call is not valid Python"):
        bundle.bundle_source(EVAL_ENTRY_MODULES, "pgolf_core.model", "m.main(")
    with pytest.raises(ValueError, match="main_call is empty"):
        bundle.bundle_source(EVAL_ENTRY_MODULES, "pgolf_core.model", "  ")
    with pytest.raises(ValueError, match="'numpy' is not a pgolf_core module"):
        bundle.bundle_source(EVAL_ENTRY_MODULES, "numpy")
    with pytest.raises(ValueError, match="not JSON-able"):
        bundle._baked_literal({"lr": float("nan")})
    with pytest.raises(ValueError, match="string keys"):
        bundle._baked_literal({1: 2})
    assert bundle._baked_literal({"a": (1, 2), "b": {"c": None}}) == "{'a': [1, 2], 'b': {'c': None}}"


def test_a_lazy_import_of_an_unbundled_module_is_found():
    tree = ast.parse("from pgolf_core import data\ndef f():\n    from pgolf_core import hub, model\n    from . import ngrams\n")
    found = bundle._unbundled_imports("pgolf_core.x", False, tree, {"pgolf_core", "pgolf_core.data", "pgolf_core.model"})
    assert found == ["pgolf_core.hub", "pgolf_core.ngrams"]


# --- the bundle, run alone ----------------------------------------------------------------

def test_isolated_process_cannot_import_pgolf_core(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import pgolf_core\n")
    result = bundle.run_isolated(probe)
    assert result.returncode == 1
    assert "ModuleNotFoundError: No module named 'pgolf_core'" in result.stderr


@pytest.mark.parametrize("form", ["plain", "shipped"])
def test_bundle_runs_isolated_and_matches_in_process(scripts, expected_checksum, form):
    paths, _ = scripts
    assert list(paths[form].parent.iterdir()) == [paths[form]]
    report = _report(bundle.run_isolated(paths[form]))
    assert report["checksum"] == expected_checksum
    assert report["isolated"] == 1
    assert report["importer"] == "_BundleImporter"
    assert report["outside"] is None  # no pgolf_core anywhere but in the bundle
    assert "pgolf_core.hub" in report["hub"] and "not in this bundle" in report["hub"]
    assert report["embedded"] == bundle.traced_modules(EVAL_ENTRY_MODULES)
    assert "pgolf_core.model" in report["origins"] and set(report["origins"]) <= set(report["embedded"])
    assert all(o.startswith("<bundle>/pgolf_core/") for o in report["origins"].values())
    assert report["source"].startswith("def forward(self, idx")  # inspect reads the embedded source


def test_embedded_modules_win_over_an_installed_pgolf_core(scripts, expected_checksum):
    paths, _ = scripts
    result = subprocess.run([sys.executable, "-I", str(paths["shipped"])], cwd=paths["shipped"].parent,
                            capture_output=True, text=True)
    report = _report(result)
    assert report["checksum"] == expected_checksum
    assert all(o.startswith("<bundle>/") for o in report["origins"].values())
    assert "not in this bundle" in report["hub"]  # an installed copy's extra modules are refused too


def test_tracebacks_name_the_bundled_file_and_line(scripts):
    paths, _ = scripts
    for path in paths.values():
        result = bundle.run_isolated(path, ["fail"])
        assert result.returncode == 1
        assert 'File "<bundle>/pgolf_core/config.py", line' in result.stderr
        assert "in __post_init__" in result.stderr and "raise ValueError(" in result.stderr
        assert "train.model.mlp_activation='nope'" in result.stderr
        assert len(result.stderr) < 3000  # the self-extracting payload is not quoted


def test_bundle_refuses_a_process_that_already_imported_pgolf_core(scripts):
    paths, _ = scripts
    code = f"import sys, runpy; sys.path.insert(0, {str(bundle.SOURCE_ROOT)!r}); import pgolf_core; runpy.run_path({str(paths['plain'])!r}, run_name='__main__')"
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "pgolf_core is already imported from outside this bundle" in result.stderr


def test_shipped_form_is_the_smallest(scripts):
    paths, shipped = scripts
    sizes = shipped.sizes
    assert sizes["self_extracting"] < sizes["minified"] < sizes["plain"]
    assert shipped.form == "self-extracting" and shipped.bytes == sizes["self_extracting"]
    assert paths["shipped"].stat().st_size == shipped.bytes
    assert sizes["plain"] == bundle.script_bytes(paths["plain"].read_text(encoding="utf-8"))


# --- minification and compression ---------------------------------------------------------

SAMPLE = '''"""A module docstring
over two lines."""

# a comment
import math


class Circle:
    """A circle."""

    radius: float  # the radius

    def area(self):
        """Its area."""

        return math.pi * self.radius ** 2  # pi r^2

    def nothing(self):
        """Only a docstring."""


def label(x):
    text = "#not a comment"
    if x:
        return f"{text!r}: {x:>{4}}"
    """a bare string in a body"""
    return """two
lines"""
'''


def _run(source: str) -> list:
    namespace = {}
    exec(compile(source, "<test>", "exec"), namespace)
    circle = namespace["Circle"]()
    circle.radius = 2.0
    return [circle.area(), circle.nothing(), namespace["label"](7), namespace["label"](0)]


def test_minify_drops_docstrings_comments_and_blank_lines():
    small = bundle.minify(SAMPLE)
    assert bundle.script_bytes(small) < bundle.script_bytes(SAMPLE) / 2
    assert "docstring" not in small and "comment\n" not in small and "pi r^2" not in small
    assert "#not a comment" in small
    assert "\n\n" not in small and "\n    " not in small  # indentation by one space
    assert bundle.ast_equivalent(SAMPLE, small)
    assert _run(small) == _run(SAMPLE)
    assert bundle.minify(small) == small


def test_minify_keeps_docstrings_a_module_reads():
    source = '"""Usage: this."""\nimport argparse\n\n\ndef f():\n    """F."""\n    return argparse.ArgumentParser(description=__doc__).description\n'
    small = bundle.minify(source)
    namespace = {}
    exec(small, namespace)
    assert namespace["f"]() == "Usage: this." and namespace["f"].__doc__ == "F."


ANNOTATED = """
from __future__ import annotations
import dataclasses, functools

LIMIT: int = 3

@dataclasses.dataclass
class Point:
    x: float
    y: float = 0.0

def scaled(p: Point, k: float = 2.0, *rest: int, by: str = "k", **kw: bool) -> Point:
    total: float = p.x * k
    if k:
        for _ in range(1):
            inner: int = 1
            def nested(a: int) -> int:
                kept: int
                b: int = a
                return b
            total += nested(inner)
    return Point(total, p.y)

@functools.lru_cache
def cached(n: int) -> int:
    return n

def kernel(ptr, BLOCK: tl.constexpr, n: int):
    return BLOCK
"""


def test_minify_drops_the_annotations_nothing_reads():
    small = bundle.minify(ANNOTATED)
    assert "def scaled(p, k=2.0, *rest, by='k', **kw):" in small  # parameters and return
    assert "total = p.x * k" in small and "inner = 1" in small and "b = a" in small  # locals, at any depth
    assert "def nested(a):" in small and "kept: int" in small  # a bare one makes a name local: kept
    assert "def cached(n: int) -> int:" in small  # decorated: the decorator may read them
    assert "def kernel(ptr, BLOCK: tl.constexpr, n: int):" in small  # Triton reads tl.constexpr
    assert "x: float" in small and "y: float = 0.0" in small and "LIMIT: int = 3" in small  # fields, module
    namespace = {}
    exec(compile(small, "<test>", "exec"), namespace)
    point = namespace["scaled"](namespace["Point"](1.5, 4.0))
    assert (point.x, point.y) == (4.0, 4.0) and namespace["cached"](5) == 5
    assert [f.name for f in dataclasses.fields(point)] == ["x", "y"]
    assert bundle.ast_equivalent(ANNOTATED, small) and not bundle.ast_equivalent(ANNOTATED, ANNOTATED)


def test_every_pgolf_core_module_minifies_to_the_same_ast():
    for path in sorted((bundle.SOURCE_ROOT / "pgolf_core").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        small = bundle.minify(source)
        assert bundle.ast_equivalent(source, small), path
        assert len(small) < len(source) or not source, path


# --- dropping what nothing references -------------------------------------------------------

DROP_A = '''
import dataclasses
import functools
REGISTRY = {}
def register(f):
    REGISTRY[f.__name__] = f
    return f
def used(x):
    return x + 1
def unused(x):
    return only_for_unused(x) * 2
def only_for_unused(x):
    return x
def recursive_unused(n):
    return 1 if n < 1 else n * recursive_unused(n - 1)
def found_by_string(x):
    return x
def found_by_keyword(x):
    return x
@register
def registered_unused():
    return "registered"
@dataclasses.dataclass(frozen=True)
class UnusedRecord:
    x: int = 0
@functools.cache
def cached_unused():
    return 1
def __unused_dunder__():
    return 0
class Base:
    def method(self):
        return found_by_keyword
'''
DROP_B = '''
from mod_a import used, Base
import mod_a
def run():
    return [used(1), getattr(mod_a, "found_by_string")(2), next(iter(mod_a.REGISTRY.values()))(), Base().method()(3)]
def helper_the_main_call_names():
    return "main"
'''


def test_drop_unreferenced_drops_exactly_what_nothing_references(tmp_path):
    sources = {"mod_a": bundle.minify(DROP_A), "mod_b": bundle.minify(DROP_B),
               "mod_c": bundle.minify("def lonely():\n    return 0\n")}
    kept, dropped = bundle.drop_unreferenced(sources, "import mod_b\nmod_b.run(); mod_b.helper_the_main_call_names()")
    # only_for_unused goes in the second round, once unused has gone; mod_c, emptied in
    # the first, stays a module (`pass`) through the second
    assert sorted(dropped) == ["mod_a.UnusedRecord", "mod_a.cached_unused", "mod_a.only_for_unused",
                               "mod_a.recursive_unused", "mod_a.unused", "mod_c.lonely"]
    assert kept["mod_c"] == "pass\n"
    assert kept["mod_b"] == sources["mod_b"]  # untouched modules stay as they were
    names = lambda text: [n.name for n in ast.parse(text).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert names(kept["mod_a"]) == [n for n in names(sources["mod_a"]) if f"mod_a.{n}" not in dropped]
    assert bundle.minify(kept["mod_a"]) == kept["mod_a"]  # still in the minified form
    for name, text in kept.items():
        (tmp_path / f"{name}.py").write_text(text, encoding="utf-8")
    result = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, '.'); import mod_b; print(mod_b.run())"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[2, 2, 'registered', 3]"


DEFINITION_EFFECTS = """
import dataclasses
SEEN = []
def note(x):
    SEEN.append(x)
    return x
def default_calls(a=note("default")):
    return a
class BodyCalls:
    note("class body")
class Watched:
    def __init_subclass__(cls):
        SEEN.append(cls.__name__)
class Subclass(Watched):
    pass
class Meta(type):
    pass
class WithMeta(metaclass=Meta):
    pass
class PlainUnused:
    x = 1
@dataclasses.dataclass
class FieldsUnused:
    items: list = dataclasses.field(default_factory=list)
def run():
    return SEEN
"""


def test_drop_unreferenced_keeps_defs_whose_definition_runs_code(tmp_path):
    """A def nothing names may still act when defined: a default argument's call, a class
    body's call, a subclass that `__init_subclass__` sees, a metaclass. Those stay; a
    plain class or a dataclass with field declarations goes."""
    kept, dropped = bundle.drop_unreferenced({"mod": bundle.minify(DEFINITION_EFFECTS)}, "import mod\nmod.run()")
    assert sorted(dropped) == ["mod.FieldsUnused", "mod.PlainUnused"]
    (tmp_path / "mod.py").write_text(kept["mod"], encoding="utf-8")
    result = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, '.'); import mod; "
                             "print(mod.run())"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['default', 'class body', 'Subclass']"


READS_AT_RUN_TIME = """
import functools
@functools.singledispatch
def describe(x):
    return "thing"
def describe_int(x: int) -> str:
    \"\"\"An integer.\"\"\"
    return "int"
describe.register(describe_int)
def documented():
    \"\"\"Read back.\"\"\"
    return getattr(documented, "__doc__")
"""


def test_minify_keeps_what_code_may_read_at_run_time():
    """singledispatch registers by a parameter's annotation and getattr(f, "__doc__")
    reads a docstring: a module (or, through `keep`, a bundle) that may do either keeps
    them; `reads_at_run_time` names what each reads."""
    assert bundle.reads_at_run_time(ast.parse(READS_AT_RUN_TIME)) == {"docstrings", "annotations"}
    namespace = {}
    exec(compile(bundle.minify(READS_AT_RUN_TIME), "<test>", "exec"), namespace)
    assert namespace["describe"](3) == "int" and namespace["documented"]() == "Read back."
    plain = "def f(x: int) -> str:\n    \"\"\"Doc.\"\"\"\n    return str(x)\n"
    assert bundle.reads_at_run_time(ast.parse(plain)) == frozenset()
    assert bundle.minify(plain) == "def f(x):\n return str(x)\n"
    kept = bundle.minify(plain, frozenset({"docstrings", "annotations"}))  # another module reads them
    assert "def f(x: int) -> str:" in kept and "Doc." in kept
    assert bundle.ast_equivalent(plain, kept, frozenset({"docstrings", "annotations"}))


@pytest.mark.parametrize("dynamic", ["globals()['x']", "vars()['x']", "from mod_c import *",
                                     "def __getattr__(name):\n return name"])
def test_drop_unreferenced_drops_nothing_where_code_reads_globals_by_a_computed_name(dynamic):
    sources = {"mod_a": "def unused():\n return 1\n", "mod_b": dynamic + "\n"}
    assert bundle.drop_unreferenced(sources) == (sources, [])


def test_the_shipped_script_drops_only_defs_that_exist_and_never_the_entry(scripts):
    _, shipped = scripts
    assert shipped.dropped, "the stages' helpers (provenance, tokenizer training) are not in the script's path"
    for qualified in shipped.dropped:
        module, _, name = qualified.rpartition(".")
        path = bundle.SOURCE_ROOT.joinpath(*module.split(".")).with_suffix(".py")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert name in [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))], qualified
    assert not any(d.startswith("pgolf_core.model.") and d.endswith((".GPT", ".ModelConfig")) for d in shipped.dropped)


@pytest.mark.parametrize("payload", ["base85", "latin1"])
def test_self_extracting_runs_like_the_source(tmp_path, payload):
    source = bundle.minify(SAMPLE) + textwrap.dedent('''
        import sys
        if __name__ == "__main__":
            print(label(3), Circle.__name__, sys.argv[1:])
            if sys.argv[1:] == ["fail"]:
                raise RuntimeError("failed as asked")
        ''') + "# padding to make compression worth it\n" * 40
    packed = bundle.self_extracting(source, payload)
    assert packed.startswith(b"import " if payload == "base85" else b"#coding:latin-1\nimport ")
    assert packed.count(b"\n") == 3 + (payload == "latin1")
    assert len(packed) < bundle.script_bytes(source)
    (tmp_path / "source.py").write_text(source, encoding="utf-8")
    (tmp_path / "packed.py").write_bytes(packed)
    runs = [subprocess.run([sys.executable, "-I", "-W", "error", name, "x"], cwd=tmp_path, capture_output=True,
                           text=True) for name in ("source.py", "packed.py")]
    assert runs[0].returncode == runs[1].returncode == 0, runs[1].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout == "'#not a comment':    3 Circle ['x']\n"
    failed = subprocess.run([sys.executable, "-I", "packed.py", "fail"], cwd=tmp_path, capture_output=True, text=True)
    assert failed.returncode == 1 and "RuntimeError: failed as asked" in failed.stderr
    assert "exec(" in failed.stderr and len(failed.stderr) < 1000  # the payload is not quoted
    namespace = runpy.run_path(str(tmp_path / "packed.py"), run_name="imported")  # not __main__: no main block
    assert namespace["label"](0) == "two\nlines"


@pytest.mark.parametrize("payload", ["base85", "latin1"])
def test_brotli_wraps_the_script_only_when_asked_and_smaller(tmp_path, payload):
    source = bundle.minify((bundle.SOURCE_ROOT / "pgolf_core" / "config.py").read_text(encoding="utf-8"))
    source += 'if __name__ == "__main__":\n print(sorted(SECTIONS))\n'
    data = source.encode("utf-8")
    raw_lzma = lzma.compress(data, format=lzma.FORMAT_RAW,
                             filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
    assert len(brotli.compress(data, quality=11, lgwin=24)) < 0.99 * len(raw_lzma)  # the case this test is about
    without, with_brotli = bundle.self_extracting(source, payload), bundle.self_extracting(source, payload, brotli=True)
    assert b"brotli" not in without and b"import brotli as R" in with_brotli
    assert len(with_brotli) < len(without)
    plain = tmp_path / "plain.py"
    plain.write_text(source, encoding="utf-8")
    expected = subprocess.run([sys.executable, "-I", str(plain)], capture_output=True, text=True)
    assert expected.returncode == 0 and "'train'" in expected.stdout, expected.stderr
    for name, packed in (("without.py", without), ("with.py", with_brotli)):
        (tmp_path / name).write_bytes(packed)
        run = subprocess.run([sys.executable, "-I", "-W", "error", name], cwd=tmp_path, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout == expected.stdout


def test_the_shipped_wrapper_uses_brotli_only_where_the_bundle_imports_it():
    model_only = bundle.shipped_script(("pgolf_core.model",), "pgolf_core.model", "print(1)")
    assert "pgolf_core.compress" not in model_only.modules
    assert b"brotli" not in model_only.data
    with_compress = bundle.shipped_script(("pgolf_core.model", "pgolf_core.compress"), "pgolf_core.model", "print(1)")
    assert with_compress.data.startswith(b"import brotli as R")


def test_latin1_literal_carries_every_byte_value(tmp_path):
    """Every byte value, the escaped ones next to octal digits and to each other, read
    back by a separate interpreter from a latin-1 file (warnings as errors: no invalid
    escape), costs one source byte each but for the escapes."""
    rng = np.random.default_rng(4)
    payload = (bytes(range(256)) + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
               + b"\x000\x007\x008\x00\x00\\\\\"\r\n\r\x00")
    literal = bundle.latin1_literal(payload)
    # a plain byte costs 1; NUL, LF, CR, quote and backslash 2 ("\\0", "\\n", ...); a NUL before a digit 4 ("\\x00")
    costs = [4 if b == 0 and payload[i + 1 : i + 2].isdigit() else 2 if b in (0, 10, 13, 34, 92) else 1
             for i, b in enumerate(payload)]
    assert len(literal.encode("latin-1")) == 2 + sum(costs)
    script = tmp_path / "literal.py"
    script.write_bytes(f"#coding:latin-1\nimport sys\nsys.stdout.write({literal}.encode('latin-1').hex())\n"
                       .encode("latin-1"))
    out = subprocess.run([sys.executable, "-I", "-W", "error", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert bytes.fromhex(out.stdout) == payload


@pytest.mark.parametrize("payload", ["base85", "latin1"])
def test_the_smaller_form_is_chosen(payload):
    tiny = "print(1)\n"
    assert bundle.smaller_form(tiny, payload) == (tiny.encode("utf-8"), "minified")
    big = "".join(f"x{i} = {i}\n" for i in range(500))
    data, form = bundle.smaller_form(big, payload)
    assert form == "self-extracting" and len(data) < bundle.script_bytes(big)
    namespace = {}
    exec(data, namespace)
    assert namespace["x499"] == 499


def test_latin1_is_smaller_than_base85_and_a_bad_payload_is_named():
    source = "".join(f"x{i} = {i * 7919 % 10007}\n" for i in range(3000))
    b85, latin1 = bundle.self_extracting(source, "base85"), bundle.self_extracting(source, "latin1")
    assert len(latin1) < 0.85 * len(b85)
    with pytest.raises(ValueError, match="script.payload='utf8'"):
        bundle.self_extracting(source, "utf8")


def test_script_bytes_counts_utf8():
    assert bundle.script_bytes("é = 1\n") == 7


def test_triton_kernels_run_from_the_bundle(tmp_path):
    """Triton's jit reads a kernel's source with inspect: the embedded (minified) source
    serves it, under the interpreter on the CPU, self-extracted, in isolation."""
    pytest.importorskip("triton")
    call = textwrap.dedent('''
        import json, torch
        from pgolf_core import fused_ce
        from pgolf_core.loss import softcap_nll
        torch.manual_seed(0)
        logits, targets = torch.randn(3, 7, 50) * 5, torch.randint(0, 50, (3, 7))
        error = (fused_ce.softcap_ce(logits, targets, 30.0).double() - softcap_nll(logits.double(), targets, 30.0)).abs().max()
        print(json.dumps({"error": float(error)}))
        ''')
    shipped = bundle.shipped_script(("pgolf_core.fused_ce", "pgolf_core.loss"), "pgolf_core.fused_ce", call)
    assert shipped.form == "self-extracting"
    script = tmp_path / "kernels.py"
    script.write_bytes(shipped.data)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TRITON_INTERPRET": "1"}
    assert _report(bundle.run_isolated(script, env=env))["error"] < 1e-5
