"""The command line's registry: exactly the six subcommands, each with a handler and a working --help, the Ray
runner's flags those of RayOptions; and the pytest-benchmark suite in bench/benchmarks, which nothing else in the
suite runs, still collects and finds every name it imports."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from gradcam_engine.cli.main import build_parser, main

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "bench" / "benchmarks"
SUBCOMMANDS = ("export", "run", "evaluate", "report", "demo", "bench")


def subparsers() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_the_command_line_registers_exactly_the_six_subcommands_each_with_a_handler() -> None:
    found = subparsers()
    assert sorted(found) == sorted(SUBCOMMANDS)
    for name, parser in found.items():
        assert callable(parser.get_default("handler")), f"gradcam {name} sets no handler"


@pytest.mark.parametrize("argv, refusal", [
    (["export", "{tmp}/m.keras", "--out", "{tmp}/a"], "m.keras: no such file"),
    (["run", "{tmp}/a", "{tmp}/images", "--out", "{tmp}/r"], "images: no such file"),
    (["evaluate", "{tmp}/r"], "not a run directory"),
    (["report", "{tmp}/r"], "not a run directory"),
    (["bench", "--quick", "--backends", "nosuch", "--work-dir", "{tmp}/w"], "--backends: unknown nosuch"),
], ids=["export", "run", "evaluate", "report", "bench"])
def test_each_subcommand_dispatches_to_its_own_handler(argv: list[str], refusal: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Its handler, not just a callable: each refuses a missing input in its own one line (`gradcam demo` is run
    from the command line by tests/test_demo.py)."""
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gradcam {argv[0]}: error: ") and refusal in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand_exits_0(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert f"usage: gradcam {command}" in capsys.readouterr().out


def test_the_gradcam_module_lists_every_subcommand_in_its_help() -> None:
    done = subprocess.run([sys.executable, "-m", "gradcam_engine.cli", "--help"], capture_output=True, text=True,
                          cwd="/", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(name in done.stdout for name in SUBCOMMANDS), done.stdout


def test_every_ray_option_is_a_flag_of_gradcam_run_and_reaches_ray_options() -> None:
    """A field added to RayOptions gets its flag, or this fails (init_kwargs is for library callers alone)."""
    from gradcam_engine.cli import run
    from gradcam_engine.engine.ray_run import RayOptions

    names = [f.name for f in dataclasses.fields(RayOptions) if f.name != "init_kwargs"]
    values = {"address": "auto", "num_gpus_per_worker": "0.5", "num_cpus_per_worker": "2", "concurrency": "3"}
    assert sorted(values) == sorted(names), "a new RayOptions field: give it a value here"
    argv = ["run", "artifact", "images", "--out", "out", "--runner", "ray"]
    for name in names:
        argv += [f"--{name.replace('_', '-')}", values[name]]
    args = build_parser().parse_args(argv)
    assert RayOptions(**run.ray_flags(args)) == RayOptions(address="auto", num_gpus_per_worker=0.5,
                                                           num_cpus_per_worker=2.0, concurrency=3)
    assert run.ray_flags(build_parser().parse_args(argv[:7])) == {}


def test_the_benchmark_suite_collects() -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           str(BENCHMARKS)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "test_throughput.py::" in done.stdout, done.stdout[-3000:]


def test_every_name_the_benchmarks_import_exists() -> None:
    """Collecting imports the modules, not what the fixtures import when they run: those names are checked here."""
    missing = []
    for path in sorted(BENCHMARKS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                wanted = [(alias.name, None) for alias in node.names if alias.name.startswith("gradcam_engine")]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(
                    "gradcam_engine"):
                wanted = [(node.module, alias.name) for alias in node.names]
            else:
                continue
            for module, name in wanted:
                if not _importable(module, name):
                    missing.append(f"{path.name}:{node.lineno}: {module}{'.' + name if name else ''}")
    assert not missing, missing


def _importable(module: str, name: str | None) -> bool:
    try:
        found = importlib.import_module(module)
    except ImportError:
        return False
    if name is None or hasattr(found, name):
        return True
    try:
        importlib.import_module(f"{module}.{name}")
    except ImportError:
        return False
    return True
