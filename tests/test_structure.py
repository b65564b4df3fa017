"""The library's shape: modules a reader can hold in their head, no import up to the package."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ddpm_lib"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 400
MAX_TRAINER_LINES = 200


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_the_package_has_modules():
    assert len(MODULES) > 10 and PACKAGE / "__init__.py" in MODULES


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_no_module_imports_up_to_the_package_init(path):
    """``from ddpm_lib import x`` inside the package runs ``__init__``, which imports every module:
    it works only while ``__init__`` happens to define x first. Import from the module instead."""
    if path.name == "__init__.py" and path.parent == PACKAGE:
        return
    up = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            is_package = node.module == "ddpm_lib" and node.level == 0
            relative_to_package = node.level > 0 and not node.module
            if is_package or relative_to_package:
                up.append(f"line {node.lineno}: from {'.' * node.level}{node.module or ''} import")
        elif isinstance(node, ast.Import):
            up += [
                f"line {node.lineno}: import ddpm_lib" for a in node.names if a.name == "ddpm_lib"
            ]
    assert not up, f"{_name(path)} imports the package __init__: {up}"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_every_module_is_under_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines < MAX_MODULE_LINES, f"{_name(path)} has {lines} lines"


def test_the_trainer_class_is_under_200_lines():
    tree = _tree(PACKAGE / "training.py")
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    lines = trainer.end_lineno - trainer.lineno + 1
    assert lines < MAX_TRAINER_LINES, f"Trainer has {lines} lines"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_function_local_imports_say_why(path):
    """An import inside a function (an optional dependency, a slow import few calls need) has
    its reason in a comment on its line or the line above; otherwise it belongs at the top."""
    source = path.read_text().splitlines()
    silent = []
    for function in ast.walk(_tree(path)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                here, above = source[node.lineno - 1], source[node.lineno - 2]
                if "#" not in here and not above.strip().startswith("#"):
                    silent.append(f"line {node.lineno}: {here.strip()}")
    assert not silent, f"{_name(path)}: function-local imports without a reason: {silent}"
