"""`run_gradcam_ray`: the local run (engine.local_run) expressed in Ray Data, so every node of a cluster works on one
run.

Stages, as in the local engine: the driver takes the run directory's lock, lists the inputs and drops those already
committed and verified in results/; decode tasks read and decode them (bad inputs become error rows); a pool of
actors, one model replica each, runs the graph and builds the result rows; writer tasks write each batch of rows as
one Parquet shard (overlays first), read it back, checksum it and rename it into results/ while the driver's lock
is still theirs; the driver journals every shard they return. The run directory (results/ schema, journal, run.json
and its fingerprint) is the local runner's, so either runner can resume a run the other started. Rows inside a
shard are in input order; which inputs share a shard, and the order in which shards appear, depend on scheduling.
The first SIGINT/SIGTERM stops the driver taking more shards; shards a writer renamed but the driver never journaled
are verified and adopted by the next run. A shard is committed every --shard-size rows only: Ray Data hands a writer
task a full batch however long its rows take, so RunConfig.commit_seconds does not apply (the command line refuses
--commit-seconds with --runner ray).

Ray is imported inside the functions only: importing this module (the CLI does) works without Ray installed.
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping

from gradcam_engine.engine.artifact import Artifact, load_artifact
from gradcam_engine.engine.errors import RunError, UserError, first_line
from gradcam_engine.engine.inputs import InputItem, list_inputs
from gradcam_engine.engine.ray_stages import (FAILURE, INDEX, KIND, CommitSpec, DecodeSpec, GradCAMActor,
                                              decode_batch, probe_replica, write_batch)
from gradcam_engine.engine.results import ShardRecord, path_text
from gradcam_engine.engine.run_config import RunConfig, parse_overlays, resolve_overlay_method, resolve_target
from gradcam_engine.engine.rundir import RunDirectory, RunSummary, fingerprint
from gradcam_engine.engine.session import SessionOptions
from gradcam_engine.engine.signals import GracefulStop, RunInterrupted

MAX_INPUT_BLOCKS = 4096  # blocks the input list is cut into: enough to spread decoding, few enough to schedule


@dataclass(frozen=True)
class RayOptions:
    """Where a Ray run executes and how its model replicas are sized."""

    address: str | None = None       # None: RAY_ADDRESS if set, else a new local Ray; "auto" or "ray://HOST:10001"
    num_gpus_per_worker: float = 0.0  # GPUs per model replica; > 0 runs the replica on CUDA
    num_cpus_per_worker: float = 1.0  # CPUs per model replica; also its ONNX Runtime thread count
    concurrency: int | None = None   # replicas; None: one per GPU share, or an autoscaling pool up to half the CPUs
    init_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra ray.init arguments for a local start


def _import_ray() -> Any:
    """Ray, or a one-line error that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray[data], not only ray core)
    except ImportError:
        raise RunError("--runner ray needs Ray Data: pip install 'gradcam-engine[ray]'") from None
    return ray


def replica_device(device: str, num_gpus: float) -> str:
    """The device a replica asks for: CUDA exactly when Ray gives it a GPU, so no replica touches an unreserved one."""
    if num_gpus < 0:
        raise RunError("--num-gpus-per-worker must be 0 or more")
    if device == "cuda" and num_gpus == 0:
        raise RunError("--device cuda with --runner ray needs --num-gpus-per-worker (a GPU reserved per replica)")
    if device == "cpu" and num_gpus > 0:
        raise RunError("--device cpu uses no GPU; drop --num-gpus-per-worker")
    return "cuda" if num_gpus > 0 else "cpu"


def replica_options(config: RunConfig, options: RayOptions) -> SessionOptions:
    """The session options of every replica, from the run's; threads default to the replica's CPU reservation."""
    return config.session_options(device=replica_device(config.session.device, options.num_gpus_per_worker),
                                  threads=config.session.threads or max(1, int(options.num_cpus_per_worker)))


def probe(ray: Any, artifact: str, session_options: SessionOptions, options: RayOptions) -> tuple[str, str, str]:
    """(device, precision, precision note) of a replica built once with the replicas' resources; its setup errors
    surface here."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    replicas = options.concurrency or 1
    if replicas * options.num_cpus_per_worker > cpus - 1:  # else decode and write tasks never get a CPU: a hang
        raise RunError(f"{replicas} replica(s) x --num-cpus-per-worker {options.num_cpus_per_worker:g} leave none "
                       f"of the Ray cluster's {cpus:g} CPUs to decode and write tasks; ask for fewer "
                       "(fractions such as 0.5 are allowed)")
    if options.num_gpus_per_worker > gpus:
        raise RunError(f"the Ray cluster has {gpus:g} GPUs, fewer than --num-gpus-per-worker "
                       f"{options.num_gpus_per_worker:g}; start GPU workers first")
    task = ray.remote(probe_replica).options(num_cpus=options.num_cpus_per_worker,
                                             num_gpus=options.num_gpus_per_worker, max_retries=0)
    try:
        return tuple(ray.get(task.remote(artifact, session_options)))  # type: ignore[return-value]
    except ray.exceptions.RayTaskError as e:
        cause = user_cause(e)
        if cause is not None:
            raise cause from None
        raise


def user_cause(error: BaseException) -> UserError | None:
    """The user-fixable error a Ray task failed with (a full or read-only disk becomes one), wherever Ray wrapped it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None)  # Ray's wrapper is also an instance of its cause, with a traceback text
        if isinstance(inner, BaseException) and id(inner) not in seen:
            error = inner
            continue
        if isinstance(error, UserError):
            return error
        if isinstance(error, OSError) and error.errno is not None:
            return RunError(f"a writer task: {error.strerror} ({error.filename or 'run directory'}); nothing "
                            "committed is lost: fix the cause and rerun the same command")
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__  # type: ignore[assignment]
    return None


def actor_pool(ray: Any, options: RayOptions) -> Any:
    """The replica pool: --concurrency if given, else one per GPU share, else autoscaling up to half the CPUs."""
    if options.concurrency is not None:
        return ray.data.ActorPoolStrategy(size=options.concurrency)
    resources = ray.cluster_resources()
    if options.num_gpus_per_worker > 0:  # probe() has checked that at least one replica fits
        return ray.data.ActorPoolStrategy(size=max(1, int(resources.get("GPU", 0) // options.num_gpus_per_worker)))
    most = max(1, int(resources.get("CPU", 1) // (2 * options.num_cpus_per_worker)))
    return ray.data.ActorPoolStrategy(min_size=1, max_size=most)


def check_options(options: RayOptions) -> None:
    """Refuse replica sizes Ray would only reject (or wait on forever) after the run had started."""
    if options.concurrency is not None and options.concurrency < 1:
        raise RunError("--concurrency must be at least 1")
    if options.num_cpus_per_worker <= 0:
        raise RunError("--num-cpus-per-worker must be more than 0")


def input_blocks(count: int, batch_size: int) -> int:
    """How many blocks the pending inputs start as: about one decode batch each, capped."""
    return max(1, min(math.ceil(count / batch_size), MAX_INPUT_BLOCKS))


@contextmanager
def ray_session(ray: Any, options: RayOptions) -> Iterator[None]:
    """Reuse a Ray this process already started; else join the given cluster or start a local one, stopped after."""
    if ray.is_initialized():
        yield
        return
    address = options.address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, **options.init_kwargs)
        else:
            ray.init(address="local", **{"include_dashboard": False, **options.init_kwargs})
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise RunError(f"cannot start or join Ray{f' at {address}' if address else ''}: "
                       f"{first_line(e)}") from None
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def progress_bars(ray: Any, enabled: bool | None) -> Iterator[None]:
    """Ray Data's own per-stage bars follow --progress (None keeps Ray's default); restored afterwards."""
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars
    if enabled is not None:
        context.enable_progress_bars = enabled
    try:
        yield
    finally:
        context.enable_progress_bars = saved


def build_dataset(ray: Any, pending: list[tuple[int, InputItem]], config: RunConfig, options: RayOptions,
                  artifact: Artifact, session_options: SessionOptions, class_index: int, overlay_limit: int,
                  run_dir: RunDirectory) -> Any:
    """The run's Ray Data plan: inputs -> decode tasks -> replica actors -> writer tasks (one row per shard)."""
    spec = DecodeSpec(artifact.input_size, config.max_bytes, config.max_pixels, os.getcwd())
    root = run_dir.out.resolve()
    commit = CommitSpec(str(root), str(root / run_dir.results.name), str(root / run_dir.staging.name),
                        str(root / run_dir.overlays.name), run_dir.attempt, run_dir.lock.token(), run_dir.run_digest)
    items = [{"path": path_text(item.key), KIND: item.kind, INDEX: index} for index, item in pending]
    return (ray.data.from_items(items, override_num_blocks=input_blocks(len(items), config.batch_size))
            .map_batches(decode_batch, batch_size=config.batch_size, batch_format="numpy",
                         fn_kwargs={"spec": spec})
            .map_batches(GradCAMActor, batch_size=config.batch_size, batch_format="numpy",
                         compute=actor_pool(ray, options), num_cpus=options.num_cpus_per_worker,
                         num_gpus=options.num_gpus_per_worker or None,
                         fn_constructor_kwargs={"artifact": str(artifact.root.resolve()), "options": session_options,
                                                "class_index": class_index})
            .map_batches(write_batch, batch_size=config.shard_size, batch_format="pyarrow",
                         fn_kwargs={"commit": commit, "overlay_limit": overlay_limit, "spec": spec,
                                    "methods": artifact.methods,
                                    "overlay_index": resolve_overlay_method(config.overlay_method,
                                                                            artifact.methods)}))


def run_gradcam_ray(config: RunConfig, options: RayOptions = RayOptions()) -> RunSummary:
    """Run like run_gradcam, on Ray Data: the same rows, run directory and resume, spread over a cluster."""
    config.check()
    check_options(options)
    session_options = replica_options(config, options)
    overlay_limit = parse_overlays(config.overlays)
    ray = _import_ray()
    listing = list_inputs(config.inputs)  # raises InputError for a missing path, before anything is written
    artifact = load_artifact(config.artifact, verify=[])  # each replica checks the model file it loads
    class_index = resolve_target(config.target, artifact.class_names)
    resolve_overlay_method(config.overlay_method, artifact.methods)  # refused before Ray starts
    run_dir = RunDirectory(config.out)
    # The lock first: a busy directory is refused before Ray starts. The stop signals' handlers after Ray, whose
    # start installs its own.
    with run_dir.opened(), ray_session(ray, options), progress_bars(ray, config.progress), \
            GracefulStop(exit_at_once=config.exit_on_second_signal) as stop:
        stop.on_abort = run_dir.abort
        device, precision, note = probe(ray, str(artifact.root.resolve()), session_options, options)
        run_fingerprint = fingerprint(config, artifact.checksum, class_index, precision)
        backend = f"{config.session.backend} {precision}"
        extra = {"overlays": overlay_limit > 0 and bool(listing.items), "runner": "ray"}
        if stop.requested is not None:
            raise RunInterrupted("interrupted before the run started; nothing was written", stop.requested)
        run_dir.prepare(run_fingerprint, config.overwrite, artifact.methods)
        pending = run_dir.pending(listing)
        ray_info = {**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(options).items()},
                    "cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}}
        if note:
            print(f"gradcam run: {note}", file=sys.stderr)
        run_dir.start(config, run_fingerprint, device, precision, overlays=bool(extra["overlays"]),
                      runner="ray", ray=ray_info, versions={"ray": ray.__version__}, methods=list(artifact.methods),
                      precision_note=note)
        start = time.perf_counter()
        if pending:
            dataset = build_dataset(ray, pending, config, options, artifact, session_options, class_index,
                                    overlay_limit, run_dir)
            try:
                for shard in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    for i in range(len(shard["shard"])):
                        if not shard[FAILURE][i]:
                            run_dir.record(ShardRecord(str(shard["shard"][i]), int(shard["rows"][i]),
                                                       str(shard["sha256"][i]), int(shard["bytes"][i])))
                    failures = [str(f) for f in shard[FAILURE] if f]
                    if failures:
                        raise RunError(failures[0])
                    if stop.requested is not None:
                        break
            except Exception as e:
                cause = user_cause(e)
                if cause is not None:
                    raise cause from None
                raise
        seconds = time.perf_counter() - start
        if stop.requested is not None:
            raise run_dir.interrupted(stop.requested, listing, seconds, device, backend, extra)
        written = run_dir.committed_this_run
        if written != len(pending):
            raise RunError(f"{config.out}: the Ray run wrote {written} of {len(pending)} rows; run it again to "
                           "complete it")
        return run_dir.finish(listing, written, seconds, device, backend, extra)
