"""The layout rules of docs/DESIGN.md, kept true: every module listed there, small modules and functions."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p for d in ("solution", "Chinese-CLIP/cn_clip_patch") for p in (ROOT / d).rglob("*.py"))
MAX_MODULE, MAX_FUNCTION = 400, 60


def test_design_lists_every_module():
    design = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    missing = []
    for p in MODULES:
        if p.name == "__init__.py":
            continue
        rel = p.relative_to(ROOT)
        folder = rel.parent.name
        if p.name not in design or (folder not in ("solution",) and f"{folder}/" not in design):
            missing.append(str(rel))
    assert not missing, f"docs/DESIGN.md does not list: {missing}"


def test_design_lists_no_module_that_is_gone():
    design = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    names = {p.name for p in MODULES}
    listed = set(re.findall(r"^- `([a-z_]+\.py)`", design, flags=re.M))
    assert listed and listed <= names, sorted(listed - names)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_are_small(path):
    src = path.read_text(encoding="utf-8")
    assert src.count("\n") <= MAX_MODULE, f"{path.name}: {src.count(chr(10))} lines"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(src))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name != "build_parser"
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION]
    assert not long, long
