"""The shape of the code: the core (engine, export) imports nothing above it, every import goes through the one
installed name, and the wheel installs that name alone."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "gradcam_engine"
FOLDERS = {"engine": "engine", "export": "export", "cli": "cli", "demo": "demo", "report": "report", "bench": "bench"}
CORE = ("engine", "export")
ABOVE_CORE = ("cli", "demo", "report", "bench")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, at any depth (functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("layer", CORE)
def test_the_core_imports_nothing_above_it(layer: str) -> None:
    offending = [f"{path.relative_to(REPO)}:{line}: {name}" for path in sources(layer)
                 for line, name in imported_modules(path)
                 if any(name == f"{PACKAGE}.{up}" or name.startswith(f"{PACKAGE}.{up}.") for up in ABOVE_CORE)]
    assert not offending, offending


def test_the_runtime_imports_nothing_of_export() -> None:
    """engine/ runs ONNX artifacts without TensorFlow; export/ is TensorFlow code."""
    offending = [f"{path.relative_to(REPO)}:{line}: {name}" for path in sources("engine")
                 for line, name in imported_modules(path) if name.startswith(f"{PACKAGE}.export")]
    assert not offending, offending


def test_every_import_uses_the_installed_name_never_a_bare_folder_name() -> None:
    """`import engine` would load a second copy of the module from the working directory (or another project's)."""
    offending = [f"{path.relative_to(REPO)}:{line}: {name}" for path in sources(*FOLDERS, "tests")
                 for line, name in imported_modules(path) if name.split(".")[0] in FOLDERS]
    assert not offending, offending


def test_importing_the_core_loads_no_module_above_it() -> None:
    modules = sorted(f"{PACKAGE}.{p.relative_to(REPO).with_suffix('').as_posix().replace('/', '.')}"
                     for p in sources(*CORE) if p.name != "__init__.py")
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            f"above = sorted(m for m in sys.modules if m.split('.')[:2][-1] in {ABOVE_CORE!r} "
            f"and m.startswith('{PACKAGE}.'))\n"
            "assert not above, above\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_wheel_installs_one_top_level_name(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building in place would leave build/ and egg-info in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                                "__pycache__", ".pytest_cache", "demo_out"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {PACKAGE, f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}"
                                                         ".dist-info"}
    for folder in FOLDERS:
        assert f"{PACKAGE}/{folder}/__init__.py" in names
    assert f"{PACKAGE}/demo/model.keras" in names  # the demo runs from an installed wheel too
    assert not [n for n in names if "/tests/" in n or "/benchmarks/" in n]
