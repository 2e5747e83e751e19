"""Where a model comes from: a saved file, or the code that builds or loads it.

A `.keras` or `.h5` file is loaded by the framework that saved it, read from the file itself (`keras_version` 2.x is
tf_keras, 3.x Keras 3), so a TF Model Garden classifier saved by tf_keras loads with tf_keras. A model that needs
code (custom classes, a backbone built from a config, weights restored from a checkpoint) comes from a function:
`path/to/module.py:function` or `package.module:function`, called without arguments, returning a model or a
`(backbone, head)` pair.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator

from gradcam_engine.engine.errors import first_line
from gradcam_engine.export.errors import ExportError
from gradcam_engine.export.frameworks import Framework, framework_named, framework_of

MODEL_FILES = (".keras", ".h5", ".hdf5")
_BUILDER = re.compile(r"^(?P<module>[^:]+):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")
ROUTE = "`gradcam export your_module.py:build_model` (a function returning the model or a (backbone, head) pair)"


def resolve(model: Any) -> Any:
    """A model object as given; a file path or a builder spec (module.py:function) turned into one."""
    if isinstance(model, os.PathLike):
        return load_model_file(Path(model))
    if isinstance(model, str):
        spec = builder_spec(model)
        return call_builder(*spec) if spec and not Path(model).exists() else load_model_file(Path(model))
    return model


def builder_spec(text: str) -> tuple[str, str] | None:
    """("module.py" or "package.module", "function") when text names a function, else None."""
    match = _BUILDER.match(text)
    if match is None:
        return None
    module = match["module"]
    return (module, match["attr"]) if module.endswith(".py") or _DOTTED.match(module) else None


@contextlib.contextmanager
def _first_on_path(folder: str) -> Iterator[None]:
    """Put folder first on sys.path while a user's module imports and runs, as Python does for a script."""
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def _import(module: str) -> Any:
    if not module.endswith(".py"):
        return importlib.import_module(module)
    path = Path(module)
    if not path.is_file():
        raise ExportError(f"{module}: no such file")
    name = f"_gradcam_model_source_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
    spec = importlib.util.spec_from_file_location(name, path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded  # dataclasses and pickling look a class's module up here
    try:
        spec.loader.exec_module(loaded)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return loaded


def call_builder(module: str, attr: str) -> Any:
    """Import module (a file or a dotted name), call module.attr() and check it returned something exportable."""
    where = f"{module}:{attr}"
    folder = str(Path(module).resolve().parent) if module.endswith(".py") else os.getcwd()
    with _first_on_path(folder):
        try:
            loaded = _import(module)
        except ExportError:
            raise
        except Exception as e:  # whatever the user's module raises on import
            raise ExportError(f"{where}: importing {module} failed: {type(e).__name__}: {first_line(e, 300)}") \
                from None
        fn: Any = loaded
        for part in attr.split("."):
            fn = getattr(fn, part, None)
        if not callable(fn):
            raise ExportError(f"{where}: {module} has no function {attr!r}")
        try:
            built = fn()
        except ExportError:
            raise
        except Exception as e:  # whatever the user's function raises
            raise ExportError(f"{where} failed: {type(e).__name__}: {first_line(e, 300)}") from None
    if isinstance(built, tuple) and len(built) == 2 or framework_of(built) is not None:
        return built
    raise ExportError(f"{where} returned {type(built).__name__}; it must return a Keras or tf_keras model or a "
                      "(backbone, head) pair")


def import_modules(names: list[str]) -> None:
    """Import modules that register custom classes (a Model Garden backbone) before a model file is loaded."""
    with _first_on_path(os.getcwd()):
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as e:  # whatever the module raises on import
                raise ExportError(f"--import {name}: {type(e).__name__}: {first_line(e, 300)}") from None


# --- saved files ------------------------------------------------------------------------------------------------
def saved_keras_version(path: Path) -> str | None:
    """The Keras version that saved a .keras or .h5 file (its metadata); None when unreadable."""
    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                return str(json.loads(archive.read("metadata.json")).get("keras_version") or "") or None
        import h5py

        with h5py.File(path, "r") as f:
            version = f.attrs.get("keras_version")
        return version.decode() if isinstance(version, bytes) else (str(version) if version is not None else None)
    except Exception:  # a damaged or foreign file: the loader will say what is wrong with it
        return None


def _saved_config(path: Path) -> dict[str, Any] | None:
    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                return json.loads(archive.read("config.json"))
        import h5py

        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw) if raw is not None else None
    except Exception:  # no readable config: nothing to name
        return None


def _layer_entries(entry: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A saved model config and, recursively, the layer entries of every functional or Sequential model in it."""
    yield entry
    layers = entry.get("config", {}).get("layers") if isinstance(entry.get("config"), dict) else None
    for layer in layers if isinstance(layers, list) else []:
        if isinstance(layer, dict) and "class_name" in layer:
            yield from _layer_entries(layer)


def unresolved_classes(path: Path, fw: Framework) -> list[tuple[str, str | None]]:
    """(registered name, module) of each layer class in a saved model that this process cannot resolve."""
    config = _saved_config(path)
    found: list[tuple[str, str | None]] = []
    for entry in _layer_entries(config) if isinstance(config, dict) else []:
        module = entry.get("module")
        if isinstance(module, str) and module.split(".")[0] in ("keras", "tf_keras"):
            continue  # a built-in class: both frameworks record theirs under keras.*
        name = entry.get("registered_name") or entry["class_name"]
        if not fw.knows_class(name) and (name, module) not in found:
            found.append((name, module))
    return found


def _unknown_class_message(path: Path, name: str, module: str | None) -> str:
    how = f"--import {module}" if module else "--import MODULE"
    return (f"{path}: unknown layer {name!r}{f' (from module {module})' if module else ''}: import the module that "
            f"defines it ({how}, or import it before export_artifact), or export through {ROUTE}")


def load_model_file(path: Path) -> Any:
    """Load a .keras or .h5 file with the framework that saved it; a missing custom class is named."""
    if not path.exists():
        raise ExportError(f"{path}: no such file")
    if path.suffix not in MODEL_FILES:
        raise ExportError(f"{path}: not a Keras model file (expected a .keras or .h5 file, or module.py:function "
                          "for a model built by code)")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):  # Keras would call it "File not found"
        raise ExportError(f"{path}: not a loadable Keras model (a .keras file is a zip archive; this one is not)")
    version = saved_keras_version(path)
    fw = framework_named("tf_keras" if version and version.startswith("2.") else "keras")
    if not fw.installed():
        raise ExportError(f"{path}: saved by Keras {version} (tf_keras), which is not installed; install it with "
                          "pip install 'gradcam-engine[tf-keras]'")
    try:
        return fw.load(str(path))
    except Exception as e:  # Keras raises many types for a bad file
        missing = unresolved_classes(path, fw)
        if missing:
            raise ExportError(_unknown_class_message(path, *missing[0])) from None
        raise ExportError(f"{path}: not a loadable Keras model ({first_line(e, 200)})") from None
