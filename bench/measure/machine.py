"""What the numbers were measured on (CPU, cores, GPU, library versions, load) and the process's resident memory.

Peak memory is read from /proc/self/status (VmHWM) after resetting it through /proc/self/clear_refs, so each
contender's peak is its own rather than the highest seen since the process started.
"""
from __future__ import annotations

import importlib
import os
import platform
import re
import resource
import shutil
import subprocess
from typing import Any

_STATUS = "/proc/self/status"
_PACKAGES = ("numpy", "onnxruntime", "onnx", "tensorflow", "keras", "tf2onnx", "pyarrow", "PIL")


def _status_kb(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_mb() -> float:
    """Resident memory now, in MB (ru_maxrss where /proc is missing)."""
    kb = _status_kb("VmRSS")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def reset_peak() -> bool:
    """Restart the peak-RSS counter so the next peak_mb() covers only what runs from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """Peak resident memory since the last reset_peak() (since start where it cannot be reset), in MB."""
    kb = _status_kb("VmHWM")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[str]:
    """GPU names from nvidia-smi; empty when there is none (or no driver)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def versions() -> dict[str, str]:
    """Versions of the libraries that decide the numbers; a missing one is reported as absent, not an error."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found["pillow" if name == "PIL" else name] = importlib.import_module(name).__version__
        except Exception:  # an absent or broken optional library
            found["pillow" if name == "PIL" else name] = "absent"
    return found


def machine_info() -> dict[str, Any]:
    """The machine a report belongs to, written into the JSON so numbers are never read without it."""
    try:
        import onnxruntime as ort
        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    from gradcam_engine.engine.cpu import cpu_features

    return {
        "cpu": _cpu_model(), "cores": cores, "usable_cores": usable, "memory_gb": _memory_gb(),
        "cpu_features": cpu_features(),  # int8 (VNNI, AMX) and bf16 (avx512_bf16, AMX) units decide those rows
        "gpus": _gpus(), "onnxruntime_providers": providers, "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "versions": versions(),
    }
