"""House rules of pgolf_core that an `ast` pass over its sources checks:

- no `global` statement, except in a multiprocessing worker's initialiser: a module-level
  function that the same module passes as `initializer=` to a pool (it sets that worker
  process's own globals, e.g. export's `_init_worker`);
- no assignment (`=`, `+=`, `del`, `setattr`) to an attribute, or an item, of an imported
  module or of anything imported from another module (a class, a function, a config
  object), e.g. `GPT.loss_kernels = ...` or `inductor_config.x = ...`: process-wide
  switches are set nowhere; what varies is handed over as arguments. A name bound
  locally (a parameter such as `self`, a local variable) is not an import.

And the model module leaves training's fused kernels unloaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pgolf_core.bundle import traced_modules

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "pgolf_core").rglob("*.py"))
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def _initialisers(tree: ast.Module) -> set[str]:
    """Names of module-level functions passed as `initializer=` anywhere in the module."""
    module_functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    return {kw.value.id for node in ast.walk(tree) if isinstance(node, ast.Call) for kw in node.keywords
            if kw.arg == "initializer" and isinstance(kw.value, ast.Name) and kw.value.id in module_functions}


def _own_nodes(scope: ast.AST):
    """The nodes of `scope` outside its nested functions, lambdas and classes."""
    for child in ast.iter_child_nodes(scope):
        yield child
        if not isinstance(child, _SCOPES):
            yield from _own_nodes(child)


def _bindings(scope: ast.AST) -> dict[str, bool]:
    """Names bound in `scope` (its own statements and, for a function, its parameters):
    True where the binding is an import."""
    bound: dict[str, bool] = {}
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        args = scope.args
        for arg in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
            if arg is not None:
                bound[arg.arg] = False
    for node in _own_nodes(scope):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound[alias.asname or alias.name.split(".")[0]] = True
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.setdefault(node.id, False)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.setdefault(node.name, False)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.setdefault(node.name, False)
    return bound


def _root_name(target: ast.AST) -> str | None:
    """`a` of `a.b.c` or `a.b[i].c`: the name an attribute chain starts from."""
    while isinstance(target, (ast.Attribute, ast.Subscript)):
        target = target.value
    return target.id if isinstance(target, ast.Name) else None


def house_rule_violations(source: str, filename: str = "<source>") -> list[str]:
    """'file:line: what' for each `global` outside a worker initialiser and each
    assignment to an attribute of something imported."""
    tree = ast.parse(source, filename)
    initialisers = _initialisers(tree)
    found = []

    def visit(scope: ast.AST, enclosing: list[dict[str, bool]], function: str | None) -> None:
        bound = _bindings(scope)
        # a class body's names are not visible inside its methods
        chain = enclosing if isinstance(scope, ast.ClassDef) else [bound, *enclosing]
        lookup = [bound, *enclosing]

        def imported(name: str | None) -> bool:
            return name is not None and next((b[name] for b in lookup if name in b), False)

        for node in _own_nodes(scope):
            if isinstance(node, ast.Global):
                is_initialiser = function in initialisers and scope in tree.body
                if not is_initialiser:
                    found.append(f"{filename}:{node.lineno}: global {', '.join(node.names)} "
                                 f"outside a worker initialiser")
            targets = []
            if isinstance(node, (ast.Assign, ast.Delete)):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("setattr", "delattr") and node.args and imported(_root_name(node.args[0])):
                found.append(f"{filename}:{node.lineno}: {node.func.id} on {ast.unparse(node.args[0])}, "
                             "which is imported")
            for target in targets:
                for part in ast.walk(target):  # tuple targets too
                    if isinstance(part, (ast.Attribute, ast.Subscript)) and isinstance(part.ctx, (ast.Store, ast.Del)) \
                            and imported(_root_name(part)):
                        found.append(f"{filename}:{node.lineno}: assigns {ast.unparse(part)}, "
                                     f"an attribute of the imported {_root_name(part)}")
            if isinstance(node, _SCOPES):
                visit(node, chain, getattr(node, "name", None))

    visit(tree, [], None)
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_global_state_is_set_from_outside(path):
    assert house_rule_violations(path.read_text(), str(path.relative_to(ROOT))) == []


def test_the_checker_finds_what_it_looks_for():
    snippet = '''
import torch
from torch._inductor import config as inductor_config
from pgolf_core.model import GPT
from concurrent.futures import ProcessPoolExecutor

_state = None


def switch(on):
    global _state
    _state = on
    torch.x = 1
    GPT.loss_kernels = on
    setattr(GPT, "other", on)


def configure():
    inductor_config.triton.mix_order_reduction, flag = False, True
    torch.backends.flags[0] = 1
    del GPT.loss_kernels


def _init_worker(value):
    global _state
    _state = value


def _not_an_initialiser():
    global _state


def fine(model, torch_like):
    import os as torch_like_module
    model.looping = True  # a parameter, not an import
    torch = object()
    torch.x = 1  # a local that shadows the import
    with ProcessPoolExecutor(2, initializer=_init_worker, initargs=(1,)):
        pass


class Holder:
    x = 0

    def set(self):
        self.x = 1
        Holder.x = 2  # the module's own class: not imported
'''
    found = house_rule_violations(snippet)
    lines = sorted(int(f.split(":")[1]) for f in found)
    assert lines == [11, 13, 14, 15, 19, 20, 21, 30], found
    assert any("global _state outside a worker initialiser" in f for f in found)
    assert any("assigns torch.x, an attribute of the imported torch" in f for f in found)
    assert any("inductor_config.triton.mix_order_reduction" in f for f in found)


def test_the_model_leaves_trainings_fused_kernels_unloaded():
    """Evaluation builds the model: importing it loads neither the kernel choice nor
    fused_mlp and fused_ce, whose code would otherwise count in the artifact's code; the
    dispatch loads them only when asked for."""
    names = {m.rpartition(".")[2] for m in traced_modules(("pgolf_core.model", "pgolf_core.dispatch"))}
    assert {"model", "kernels", "dispatch"} <= names and not names & {"fused_mlp", "fused_ce"}
    names = {m.rpartition(".")[2] for m in traced_modules(("pgolf_core.artifact", "pgolf_core.eval.sliding"))}
    assert "model" in names and not names & {"dispatch", "fused_mlp", "fused_ce"}
