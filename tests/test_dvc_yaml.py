"""Guards on dvc.yaml: each stage's deps are exactly its script plus the pgolf_core
modules it imports (transitively), and its params are its own config section, whose
keys in params.yaml are exactly the fields of the section's dataclass."""

import ast
from pathlib import Path

import pytest
import yaml

from params_helpers import leaf_keys

from pgolf_core import config

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path:
    path = Path(*name.split("."))
    return path.with_suffix(".py") if (ROOT / path.with_suffix(".py")).is_file() else path / "__init__.py"


def direct_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pgolf_core"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if (ROOT / module_file(f"{node.module}.{a.name}")).is_file()}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pgolf_core")}
    return found


def core_closure(script: Path) -> set[str]:
    """pgolf_core files a script imports, directly or not (package __init__s included
    when they hold code; an empty one cannot change behaviour)."""
    seen, todo = set(), list(direct_imports(script))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += direct_imports(module_file(name))
    files = {module_file(m) for m in seen}
    return {str(f) for f in files if (ROOT / f).read_text().strip() and not _docstring_only(f)}


def _docstring_only(path: Path) -> bool:
    body = ast.parse((ROOT / path).read_text()).body
    return len(body) == 1 and isinstance(body[0], ast.Expr)


@pytest.mark.parametrize("stage", sorted(DVC))
def test_code_deps_are_the_import_closure(stage):
    script = f"stages/{stage}.py"
    deps = set(DVC[stage]["deps"])
    code_deps = {d for d in deps if d.startswith(("stages/", "pgolf_core/"))}  # data/script/train_gpt.py is data
    assert code_deps == {script} | core_closure(Path(script))


@pytest.mark.parametrize("stage", sorted(DVC))
def test_params_are_the_stage_config_section(stage):
    """A stage reads its own section, or the sections its module declares (`SECTIONS`):
    the script bakes train, quantize and evaluate (and the tokenizer's vocabulary) and its
    own section says how it is shipped, so a change to any of them changes the shipped
    code; the export describes and checks them all."""
    import importlib

    declared = getattr(importlib.import_module(f"pgolf_core.stage.{stage}"), "SECTIONS", None)
    assert DVC[stage]["params"] == list(declared or [stage])
    assert set(DVC[stage]["params"]) <= set(config.SECTIONS) and (declared or stage in config.SECTIONS)
    if stage == "script":
        assert declared == ("tokenize", "train", "quantize", "evaluate", "script")


def test_params_yaml_sets_every_key_once():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section in config.SECTIONS:
        assert sorted(leaf_keys(params[section], section)) == sorted(config.section_keys(section))
        config.build_section(section, params[section])  # the defaults validate
