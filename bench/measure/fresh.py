"""Run a bench worker module in a new Python process and read the JSON line it prints last.

Fresh processes give memory figures that belong to one run or one contender alone; the worker is this interpreter, so
it imports the same installed gradcam_engine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from gradcam_engine.bench.errors import BenchError


def run_worker(module: str, args: list[str], timeout: float = 3600) -> dict[str, Any]:
    """`python -m module args...` -> the dict its last stdout line holds; a failure names the worker and its error."""
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if done.returncode != 0 or not done.stdout.strip():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise BenchError(f"{module} failed (exit {done.returncode}): {' | '.join(tail)}")
    return json.loads(done.stdout.strip().splitlines()[-1])
