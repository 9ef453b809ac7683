"""The SASS reader of `sm90` (what the kernel tests count instructions with), on a listing
made by hand, so a wrong count fails here rather than as a kernel's figure; and the rule
that keeps the test suite independent of the benchmark scripts."""

import ast
from pathlib import Path

from sm90 import path_counts

TESTS = Path(__file__).resolve().parent


def test_sass_path_counts_follow_branches_and_loops():
    """An if/else (then 3 instructions, 2 of them MUFU; else 2), an if without else (1), a
    loop of 2 instructions run 4 times, then padding."""
    listing = [(0x00, False, "LDG.E", "R0"), (0x10, True, "BRA", "0x50"),
               (0x20, False, "MUFU.EX2", "R1, R1"), (0x30, False, "MUFU.RCP", "R2, R2"), (0x40, False, "BRA", "0x70"),
               (0x50, False, "FFMA", "R1"), (0x60, False, "FFMA", "R2"),
               (0x70, True, "BRA", "0x90"), (0x80, False, "FMUL", "R3"),
               (0x90, False, "FADD", "R4"), (0xa0, True, "BRA", "0x90"),
               (0xb0, False, "EXIT", ""), (0xc0, False, "BRA", "0xc0"), (0xd0, False, "NOP", "")]
    counts = path_counts(listing, trips=4)
    assert counts == {"instructions": (14, 18), "mufu": (0, 2)}
    nested = listing[:11] + [(0xb0, True, "BRA", "0x00"), (0xc0, False, "EXIT", ""), (0xd0, False, "BRA", "0xd0")]
    assert path_counts(nested, trips=4) is None


def test_no_test_module_imports_bench():
    """bench/ holds scripts measured on a GPU; a change that breaks one must not break
    pytest, so what a test needs lives in tests/ or pgolf_core."""
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.name}: {name}" for name in names if name == "bench" or name.startswith("bench.")]
    assert offenders == []
