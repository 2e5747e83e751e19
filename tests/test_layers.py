"""The shape of the code: the core (engine, export) imports nothing above it, every import goes through the one
installed name, the wheel installs that name alone, and every error a user can fix is a UserError."""
from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gradcam_engine.engine.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "gradcam_engine"
FOLDERS = {"engine": "engine", "export": "export", "cli": "cli", "demo": "demo", "report": "report", "bench": "bench"}
CORE = ("engine", "export")
ABOVE_CORE = ("cli", "demo", "report", "bench")
# The exceptions that are not UserError on purpose; the CLI never prints one of them as a user error.
NOT_USER_ERRORS = {
    "gradcam_engine.engine.inputs.ReadError": "one item's bytes cannot be read: an error row, the run goes on",
    "gradcam_engine.engine.decode.DecodeError": "one item is not a usable image: an error row, the run goes on",
    "gradcam_engine.engine.storage.StorageError": "a store's failure: engine.inputs turns it into ReadError (one "
                                                  "item, a row) or InputError (the listing, the run stops)",
    "gradcam_engine.engine.signals.RunInterrupted": "a run stopped by a signal: `gradcam run` prints it and exits "
                                                    "128 + the signal's number, not 2",
}


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


def module_name(path: Path) -> str:
    """engine/run.py -> gradcam_engine.engine.run; a package's __init__.py -> the package."""
    return f"{PACKAGE}.{path.relative_to(REPO).with_suffix('').as_posix().replace('/', '.')}".removesuffix(".__init__")


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
    modules = sorted(module_name(p) for p in sources(*CORE) if p.name != "__init__.py")
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


def module_names(*folders: str) -> list[str]:
    """The importable modules of these folders (bench/benchmarks is a pytest suite, __main__ runs the command)."""
    return sorted(module_name(p) for p in sources(*folders)
                  if p.name != "__main__.py" and "benchmarks" not in p.relative_to(REPO).parts)


def test_every_error_class_is_a_user_error_but_the_per_item_ones() -> None:
    """The CLI prints a UserError as one line (exit 2); any other exception keeps its traceback, as a bug should."""
    found = {}
    for name in module_names(*FOLDERS):
        module = importlib.import_module(name)
        found.update({f"{name}.{obj.__qualname__}": obj for obj in vars(module).values()
                      if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == name})
    named_error = {f"{module_name(p)}.{node.name}"
                   for p in sources(*FOLDERS) for node in ast.walk(ast.parse(p.read_text()))
                   if isinstance(node, ast.ClassDef) and node.name.endswith("Error")}
    assert named_error <= set(found), f"classes named *Error the scan did not reach: {named_error - set(found)}"
    assert set(NOT_USER_ERRORS) <= set(found), f"allowed but gone: {set(NOT_USER_ERRORS) - set(found)}"
    offending = sorted(name for name, cls in found.items() if not issubclass(cls, UserError)
                       and name not in NOT_USER_ERRORS)
    assert not offending, f"subclass engine.errors.UserError, or allow them above with the reason: {offending}"
