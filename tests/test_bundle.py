"""pgolf_core.bundle: one self-contained script from pgolf's own modules, run in a fresh
`python -I` where pgolf_core itself cannot be imported."""

import ast
import dataclasses
import json
import os
import runpy
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

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
