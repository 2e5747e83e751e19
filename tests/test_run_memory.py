"""Memory stays flat however many images a run streams: every stage is bounded, so ten times the images must not
mean more peak memory, nor more decoded images waiting for the model.

The test is built so that an unbounded stage would show: the model takes 256x256 inputs, so each decoded image holds
192 kB and 2,000 of them more than the whole run's baseline, and the model is made slower than decoding (it pauses
on every batch), so decoders that are not held back run far ahead of it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from engine_support import SmallArtifact, encode, export_small_cnn, run_python, scene

SMALL, LARGE = 200, 2000
SIZE = (256, 256)
BATCH_SIZE = 8
SHARD_SIZE = 50                  # rows held before a shard is written: the same for both runs, and several
                                 # shards even for the small run, so both reach the steady state of committing
PAUSE_S = 0.01                   # per batch: the model then consumes slower than two decode threads produce
MOST_IN_FLIGHT = 8 * BATCH_SIZE  # decoded, not yet through the model: the decode window and the staged batches

# One run in a fresh interpreter, with the model slowed down, counting decoded images not yet consumed by the model;
# prints peak resident memory (VmHWM, kB), the most images in flight and the summary as JSON on the last line.
SLOW_RUN = r"""
import json, sys, threading, time
from gradcam_engine.engine import local_run
from gradcam_engine.engine.run_config import RunConfig
from gradcam_engine.engine.session import GradCAMSession, SessionOptions

artifact, out, pause, batch_size, shard_size, *inputs = sys.argv[1:]
lock = threading.Lock()
count = {"decoded": 0, "consumed": 0, "most_in_flight": 0}
load = local_run.load

def counting_load(*args, **kwargs):
    loaded = load(*args, **kwargs)
    with lock:
        count["decoded"] += 1
    return loaded

class SlowSession:
    # The engine's session, consuming no faster than a model that needs `pause` seconds per batch.
    def __init__(self, session):
        self.session = session
    def __getattr__(self, name):
        return getattr(self.session, name)
    def run_prepared(self, prepared):
        with lock:
            count["most_in_flight"] = max(count["most_in_flight"], count["decoded"] - count["consumed"])
        time.sleep(float(pause))
        outputs = self.session.run_prepared(prepared)
        with lock:
            count["consumed"] += prepared.n
        return outputs

local_run.load = counting_load
session = SlowSession(GradCAMSession(artifact, SessionOptions(backend="onnx", device="cpu")))
summary = local_run.run_gradcam(RunConfig(artifact=artifact, inputs=inputs, out=out, batch_size=int(batch_size),
                                          shard_size=int(shard_size), progress=False), session=session)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Vm"))
print(json.dumps({"vmhwm_kb": int(status["VmHWM"].split()[0]), "images": summary.images, "ok": summary.ok,
                  "most_in_flight": count["most_in_flight"]}))
"""


@pytest.fixture(scope="module")
def large_input_artifact(tmp_path_factory: pytest.TempPathFactory) -> SmallArtifact:
    return export_small_cnn(tmp_path_factory.mktemp("memory_artifact") / "cnn_256", size=SIZE)


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two folders of 48x48 JPEGs (small files, quick to decode, 192 kB each once resized): the first SMALL images,
    and all LARGE of them."""
    root = tmp_path_factory.mktemp("memory")
    large, small = root / "large", root / "small"
    large.mkdir()
    small.mkdir()
    for i in range(LARGE):
        (large / f"img_{i:05d}.jpg").write_bytes(encode(scene(48, 48, i), "JPEG", quality=85))
    for path in sorted(large.iterdir())[:SMALL]:
        shutil.copy(path, small / path.name)
    return small, large


def slow_run(artifact: SmallArtifact, out: Path, folder: Path) -> dict[str, Any]:
    done = run_python(SLOW_RUN, str(artifact.root), str(out), str(PAUSE_S), str(BATCH_SIZE), str(SHARD_SIZE),
                      str(folder),
                      timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_2000_images_behind_a_slow_model_keep_memory_and_the_images_in_flight_flat(
        large_input_artifact: SmallArtifact, image_sets: tuple[Path, Path], tmp_path: Path) -> None:
    small, large = image_sets
    few = slow_run(large_input_artifact, tmp_path / "few", small)
    many = slow_run(large_input_artifact, tmp_path / "many", large)
    assert (few["images"], few["ok"]) == (SMALL, SMALL)
    assert (many["images"], many["ok"]) == (LARGE, LARGE)

    decoded_kb = LARGE * SIZE[0] * SIZE[1] * 3 / 1024
    assert decoded_kb > few["vmhwm_kb"], "an unbounded queue must be able to show: 2,000 decoded images > baseline"
    assert many["most_in_flight"] <= MOST_IN_FLIGHT, (
        f"{many['most_in_flight']} decoded images waited for the model at once (bound {MOST_IN_FLIGHT})")
    ratio = many["vmhwm_kb"] / few["vmhwm_kb"]
    assert ratio <= 1.15, (f"peak RSS {many['vmhwm_kb'] / 1024:.0f} MB for {LARGE} images vs "
                           f"{few['vmhwm_kb'] / 1024:.0f} MB for {SMALL}")
