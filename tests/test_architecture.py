"""The layers hold: the import contract in pyproject.toml passes, fails on a violation, and nobody
dodges it with a string import.

    cli > evaluation > harvest | generator | retrieval > registry
"""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("registry", "harvest", "generator", "retrieval", "evaluation", "cli")
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"


def lint(cwd: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("importlinter")
    return subprocess.run([sys.executable, "-c", LINT], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin", "NO_COLOR": "1"}, timeout=300)


def test_the_import_contract_is_kept():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_the_import_contract_fails_on_a_violation(tmp_path):
    """The same contract over a copy of the layout in which registry imports the generator."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "evaluation" / "accuracy.py").write_text("")
    (tmp_path / "retrieval" / "service.py").write_text("def routed():\n    import evaluation.accuracy\n")  # ignored
    (tmp_path / "registry" / "store.py").write_text("def generate():\n    import generator\n")
    result = lint(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "0 kept, 1 broken" in result.stdout
    assert "registry.store -> generator" in result.stdout


def _production_modules():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_no_string_imports_around_the_contract():
    """``importlib.import_module`` / ``__import__`` hide an import from the contract: none in the packages."""
    found = []
    for path in _production_modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in {"import_module", "__import__"}:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


def test_no_module_getattr_in_generator_and_retrieval():
    """Names are imported from the module that defines them, not re-exported on first access."""
    found = [str(path.relative_to(ROOT)) for package in ("generator", "retrieval")
             for path in sorted((ROOT / package).rglob("*.py"))
             if any(isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
                    for node in ast.parse(path.read_text()).body)]
    assert found == []
