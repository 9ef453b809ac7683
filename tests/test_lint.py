"""Every Python file of the tree passes pyflakes: no unused import, no undefined name, no
name redefined before it was used, no unused local. In `pgolf_core` this is more than
tidiness: the modules are bundled into the shipped `train_gpt.py`, whose bytes are
`code_bytes`, so an unused import is charged against the 16 MB artifact.

One exception, by construction rather than by list: a name a module binds into a scope
dict it builds itself (`scope["_capped"] = ...`, as `fused_ce` hands its Triton kernels
their helpers as globals) is defined for the functions that run in that scope, which
pyflakes cannot see.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pyflakes import checker, messages

ROOT = Path(__file__).resolve().parents[1]
TREES = ("pgolf_core", "stages", "bench", "tests")
SOURCES = sorted(path for tree in TREES for path in (ROOT / tree).rglob("*.py"))


def _scope_bound_names(tree: ast.Module) -> set[str]:
    """Names assigned as string keys of a subscript (`scope["name"] = ...`, tuple targets
    too) anywhere in the module."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                for part in ast.walk(target):
                    if isinstance(part, ast.Subscript) and isinstance(part.ctx, ast.Store) \
                            and isinstance(part.slice, ast.Constant) and isinstance(part.slice.value, str):
                        names.add(part.slice.value)
    return names


def lint(source: str, filename: str = "<snippet>") -> list[str]:
    """'file:line: message' for each pyflakes finding in `source`, less undefined names
    the module binds into a scope dict of its own."""
    tree = ast.parse(source, filename=filename)
    bound = _scope_bound_names(tree)
    return [f"{filename}:{message.lineno}: {message.message % message.message_args}"
            for message in sorted(checker.Checker(tree, filename=filename).messages, key=lambda m: m.lineno)
            if not (isinstance(message, messages.UndefinedName) and message.message_args[0] in bound)]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pyflakes_finds_nothing(path):
    assert lint(path.read_text(), str(path.relative_to(ROOT))) == []


def test_the_linter_finds_what_it_looks_for():
    snippet = '''
import os
import time
from dataclasses import replace, field


def f(x):
    unused = x + 1
    return missing(x) + os.sep


def g():
    scope = {}
    scope["helper"], scope["other"] = 1, 2
    return helper + other + undefined_one


def h():
    pass


def h():
    return field
'''
    found = lint(snippet)
    assert [int(f.split(":")[1]) for f in found] == [3, 4, 8, 9, 15, 22], found
    assert "'time' imported but unused" in found[0]
    assert "'dataclasses.replace' imported but unused" in found[1]
    assert "local variable 'unused' is assigned to but never used" in found[2]
    assert "undefined name 'missing'" in found[3]
    assert "undefined name 'undefined_one'" in found[4]  # helper and other: bound in the scope dict
    assert "redefinition of unused 'h'" in found[5]
