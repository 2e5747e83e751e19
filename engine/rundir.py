"""The run directory both runners share: one writer at a time, what is committed and verified, and run.json.

    RUN_DIR/
      run.json       status (running | complete | interrupted | failed, with the reason), fingerprint, options,
                     device, counts, shards set aside, throughput
      journal.jsonl  the run's fingerprint and every committed shard with rows, bytes and sha256 (engine.journal)
      run.lock       held by the one run writing here (engine.runlock)
      results/       exactly the committed, verified shards: one Parquet dataset
      overlays/      JPEG overlays of committed rows (engine.overlay)
      damaged/       shards set aside because they failed verification, kept for inspection
      .staging/      shards being written (a killed run's leftovers are deleted by the next run)
      .reserve       64 KiB held while a run goes, freed to record its end in run.json even on a full disk

A run: `opened` takes the lock; `prepare` checks the fingerprint and verifies what is there (journaled shards by size
and sha256, a damaged one set aside and its rows redone, a shard committed but not journaled read back whole and
adopted, or set aside); `pending` is what has no verified row; `start` checks that every folder it writes is
writable and marks run.json "running"; `commit` adds a shard; `finish` verifies everything again and reports counts
for the current listing. What is done is derived from verified shards only, so either runner can resume a run the
other started, and a later run never replaces or deletes a committed shard (except --overwrite).
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import platform
import shutil
import signal
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from gradcam_engine.engine.errors import RunError, UserError, first_line, one_line
from gradcam_engine.engine.inputs import InputItem, InputListing, normalise_spec
from gradcam_engine.engine.journal import JOURNAL, Journal, JournalState, write_atomically
from gradcam_engine.engine.overlay import OVERLAY_DIR, overlay_name
from gradcam_engine.engine.results import (RESULTS_DIR, ShardRecord, publish_shard, results_schema, shard_name,
                                           stage_shard)
from gradcam_engine.engine.run_config import RunConfig
from gradcam_engine.engine.runlock import RunLock
from gradcam_engine.engine.signals import RunInterrupted, signal_name
from gradcam_engine.engine.verify import CommittedRows, Findings, ShardCheck

RUN_JSON = "run.json"
DAMAGED_DIR = "damaged"
STAGING_DIR = ".staging"
RESERVE, RESERVE_BYTES = ".reserve", 64 << 10


@dataclass
class RunSummary:
    """What a run did; also written into run.json. Counts describe the current listing."""

    out: str
    images: int
    ok: int
    errors: int
    processed: int
    skipped_resume: int
    skipped_non_image: int
    seconds: float
    images_per_second: float
    device: str
    backend: str
    extra: dict[str, Any] = field(default_factory=dict)
    unlisted_rows: int = 0                                   # rows of inputs no longer listed, kept in results/
    set_aside: list[dict[str, Any]] = field(default_factory=list)  # damaged shards this run found and set aside

    def text(self) -> str:
        resumed = f" ({self.skipped_resume} already done, resumed)" if self.skipped_resume else ""
        notes = ""
        if self.set_aside:
            rows = sum(int(s.get("rows") or 0) for s in self.set_aside)
            notes += (f"; {len(self.set_aside)} damaged shard(s) set aside in {Path(self.out) / DAMAGED_DIR}/"
                      + (f" ({rows} rows redone)" if rows else ""))
        if self.unlisted_rows:
            notes += f"; {self.unlisted_rows} rows of inputs no longer listed kept in results/"
        return (f"{self.images} images: {self.ok} ok, {self.errors} errors{notes}; processed {self.processed} in "
                f"{self.seconds:.1f} s ({self.images_per_second:.1f} img/s, {self.backend} on {self.device})"
                f"{resumed}. Results: {Path(self.out) / RESULTS_DIR}/ (Parquet), summary {Path(self.out) / RUN_JSON}"
                + (f", overlays {Path(self.out) / OVERLAY_DIR}/" if self.extra.get("overlays") else "") + ".")


def fingerprint(config: RunConfig, artifact_sum: str, class_index: int, precision: str) -> dict[str, Any]:
    """The options that decide what a row contains; a resumed run must match them. Inputs are compared
    absolute and resolved, so the same run spelled differently resumes (run.json keeps them as typed too)."""
    return {"artifact_sha256": artifact_sum, "inputs": [normalise_spec(str(s)) for s in config.inputs],
            "backend": config.session.backend, "precision": precision, "class_index": class_index,
            "overlays": config.overlays, "overlay_method": config.overlay_method}


def run_digest(fingerprint: dict[str, Any]) -> str:
    """The digest of a run's fingerprint that each of its shards carries, so a shard found in results/ without a
    journal line can prove it is this run's."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    """The versions that decide the numbers, recorded in run.json."""
    import onnxruntime
    import PIL
    import pyarrow

    return {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "pyarrow": pyarrow.__version__, "pillow": PIL.__version__}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace a JSON file atomically: a reader sees the old or the new file, never half of one; OSError leaves
    the old file and no temporary."""
    write_atomically(path, json.dumps(data, indent=2, default=str) + "\n")


def _options(config: RunConfig) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in asdict(config).items()}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _os_reason(e: OSError) -> str:
    return one_line(e.strerror or e)


class RunDirectory:
    """One run directory, written by one run at a time."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.results = self.out / RESULTS_DIR
        self.overlays = self.out / OVERLAY_DIR
        self.damaged = self.out / DAMAGED_DIR
        self.staging = self.out / STAGING_DIR
        self.run_json = self.out / RUN_JSON
        self.reserve = self.out / RESERVE
        self.journal = Journal(self.out / JOURNAL)
        self.lock = RunLock(self.out)
        self.attempt = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.info: dict[str, Any] = {}
        self._seq = itertools.count()
        self._state = JournalState()
        self._committed_now: list[ShardRecord] = []
        self._found = Findings()
        self._done: set[str] = set()
        self._identified = False
        self._created = False
        self.repaired = ""
        self.run_digest = ""                    # set by prepare: written into every shard this run commits
        self.schema: pa.Schema = results_schema()

    # --- lifecycle ----------------------------------------------------------------------------------------------
    @contextmanager
    def opened(self) -> Iterator["RunDirectory"]:
        """Hold the lock while the run loads its model, prepares (`prepare`), computes and commits; a failure after
        the directory is known to hold this run is recorded in run.json (status "failed" and the reason), a
        directory this run created is removed again if nothing was written, and the lock is always released."""
        try:
            self._created = not self.out.exists()
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"{self.out}: cannot create the run directory ({_os_reason(e)})") from None
        try:
            self.lock.acquire()
        except BaseException:
            self._remove_if_new()
            raise
        try:
            self._hold_reserve()
            yield self
        except RunInterrupted:
            raise
        except KeyboardInterrupt:  # a second signal in a library caller (already recorded), or a plain Ctrl-C
            if self.lock.held:
                self.abort(signal.SIGINT)
            raise
        except OSError as e:  # a file system failure not caught where it happened: still one line
            self.fail(f"{_os_reason(e)} ({getattr(e, 'filename', '') or self.out})")
            raise RunError(f"{self.out}: {_os_reason(e)} ({getattr(e, 'filename', '') or 'run directory'}); "
                           "nothing committed is lost: fix the cause and rerun the same command") from None
        except UserError as e:
            self.fail(str(e))
            raise
        except BaseException as e:
            self.fail(f"{type(e).__name__}: {first_line(e)}")
            raise
        finally:
            try:
                self._clear_staging()
                self.reserve.unlink(missing_ok=True)
            except OSError:
                pass  # best effort: the next run clears these too
            self.lock.release()
            self._remove_if_new()

    def _hold_reserve(self) -> None:
        """Set aside a little space at the start, so that a disk that fills up during the run still has room for
        run.json to say so; a disk already full fails here, before anything else is written."""
        try:
            with open(self.reserve, "wb") as f:
                f.write(bytes(RESERVE_BYTES))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            self.reserve.unlink(missing_ok=True)
            raise RunError(f"{self.out}: cannot write ({_os_reason(e)}); nothing was computed: fix it and rerun "
                           "the same command") from None

    def _remove_if_new(self) -> None:
        """A run that failed before writing anything leaves no directory behind it created."""
        try:
            if self._created and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()
        except OSError:
            pass

    def prepare(self, fingerprint: dict[str, Any], overwrite: bool, methods: Sequence[str] = ()) -> None:
        """Check that the directory holds this same run (else refuse, unless overwriting), then verify what it
        holds (results of an artifact with these CAM methods) and rewrite the journal with exactly what verified."""
        if overwrite:
            self._wipe()
        state = self.journal.read()
        previous, unreadable = self._read_run_json()
        recorded = state.fingerprint or (previous or {}).get("fingerprint")
        if not isinstance(recorded, dict):
            recorded = None
        elif isinstance(recorded.get("inputs"), list):  # also a run.json written before inputs were normalised
            recorded = {**recorded, "inputs": [normalise_spec(str(s)) for s in recorded["inputs"]]}
        has_results = self.results.is_dir() and any(self.results.iterdir())
        if recorded is not None and recorded != fingerprint:
            changed = sorted(k for k in set(fingerprint) | set(recorded) if recorded.get(k) != fingerprint.get(k))
            raise RunError(f"{self.out}: holds a run with different {', '.join(changed)}; use another --out, or "
                           "--overwrite to replace it")
        if recorded is None and has_results:
            if unreadable:
                raise RunError(f"{self.run_json}: unreadable ({unreadable}) and no {JOURNAL} says which run "
                               f"{RESULTS_DIR}/ belongs to; use another --out, or --overwrite to start again")
            raise RunError(f"{self.out}: has results but no {RUN_JSON}; use another --out or --overwrite")
        self._identified = True
        self.run_digest, self.schema = run_digest(fingerprint), results_schema(methods)
        if unreadable:
            self.repaired = f"{RUN_JSON} was unreadable ({unreadable}); rewritten " + (
                f"from {JOURNAL}" if state.fingerprint else "(no results were committed)")
        state.fingerprint = fingerprint
        self._reconcile(state)

    def _wipe(self) -> None:
        try:
            for target in (self.results, self.overlays, self.damaged, self.staging):
                if target.is_dir():
                    shutil.rmtree(target)
            for target in (self.run_json, self.journal.path):
                target.unlink(missing_ok=True)
        except OSError as e:
            raise RunError(f"{self.out}: --overwrite cannot remove the earlier run ({_os_reason(e)})") from None

    def _read_run_json(self) -> tuple[dict[str, Any] | None, str]:
        """(run.json, "") or (None, why it is unreadable); (None, "") when there is none."""
        try:
            data = json.loads(self.run_json.read_text())
        except FileNotFoundError:
            return None, ""
        except (OSError, ValueError) as e:
            return None, one_line(e, 120)
        if not isinstance(data, dict):
            return None, "not a JSON object"
        return data, ""

    # --- verification -------------------------------------------------------------------------------------------
    def _reconcile(self, state: JournalState) -> None:
        """Delete half-written files, keep the shards that verify (engine.verify), and rewrite the journal with
        exactly those: afterwards results/ holds exactly the verified shards."""
        self._clear_staging()
        for folder in (self.results, self.overlays):
            if folder.is_dir():
                for tmp in folder.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)
        rows = CommittedRows()
        check = self._check(self._found)
        trusted = check.journaled(state.shards, rows)
        trusted += check.strays({r.name for r in trusted}, rows)
        state.shards = trusted
        state.set_aside += self._found.set_aside
        try:
            self.journal.rewrite(state)
        except OSError as e:
            raise RunError(f"{self.journal.path}: cannot write ({_os_reason(e)}); nothing committed is lost: "
                           "fix the cause and rerun the same command") from None
        self._state = state
        self._done = set(rows.status)
        self._clean_overlays(rows.paths)

    def _check(self, findings: Findings) -> ShardCheck:
        return ShardCheck(self.results, self.damaged, findings, self.run_digest, self.schema)

    def _clean_overlays(self, paths: list[str]) -> None:
        """Overlays of rows that were never committed (a killed run wrote them) are removed; their rows are redone."""
        if not self.overlays.is_dir():
            return
        keep = {overlay_name(p) for p in paths}
        for path in self.overlays.iterdir():
            if path.suffix == ".jpg" and path.name not in keep and _is_overlay_name(path.name):
                path.unlink(missing_ok=True)

    def _clear_staging(self) -> None:
        if self.staging.is_dir():
            for tmp in self.staging.iterdir():
                tmp.unlink(missing_ok=True)
            try:
                self.staging.rmdir()
            except OSError:
                pass

    # --- the run ------------------------------------------------------------------------------------------------
    def pending(self, listing: InputListing) -> list[tuple[int, InputItem]]:
        """(listing position, item) of every input without a verified row."""
        return [(i, item) for i, (item, key) in enumerate(zip(listing.items, listing.identities))
                if key not in self._done]

    def start(self, config: RunConfig, fingerprint: dict[str, Any], device: str, precision: str,
              overlays: bool = False, precision_note: str = "", **extra: Any) -> None:
        """Check every folder the run writes, then write run.json with status "running", all before the first image
        is read; `precision_note` (why the precision is what it is) is recorded when there is one; `extra` adds
        runner-specific keys (and library versions under "versions")."""
        for folder in (self.results, self.staging, *((self.overlays,) if overlays else ())):
            self._check_writable(folder)
        versions = {**library_versions(), **extra.pop("versions", {})}
        self.info = {"status": "running", "fingerprint": fingerprint, "artifact": str(config.artifact),
                     "options": _options(config), **extra, "device": device, "precision": precision,
                     "versions": versions, "attempt": self.attempt, "holder": self.lock.info(),
                     "started": _now(), "journal": JOURNAL,
                     "verified_at_start": {"shards": len(self._state.shards),
                                           "adopted": list(self._found.adopted),
                                           "missing": list(self._found.missing),
                                           "set_aside": list(self._found.set_aside)},
                     "set_aside": self._state.set_aside}
        if precision_note:
            self.info["precision_note"] = precision_note
        if self.repaired:
            self.info["repaired"] = self.repaired
        self._write_run_json()

    def _check_writable(self, folder: Path) -> None:
        probe = folder / f".probe-{uuid.uuid4().hex[:8]}.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"probe")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise RunError(f"{folder}: not writable ({_os_reason(e)}); nothing was computed: fix it and rerun "
                           "the same command") from None
        finally:
            try:
                probe.unlink(missing_ok=True)
            except OSError:
                pass

    def _write_run_json(self) -> None:
        try:
            self._write_info()
        except OSError as e:
            raise RunError(f"{self.run_json}: cannot write ({_os_reason(e)}); nothing committed is lost: fix the "
                           "cause and rerun the same command") from None

    def next_shard_name(self) -> str:
        return shard_name(self.attempt, f"{next(self._seq):06d}")

    def commit(self, table: Any) -> ShardRecord:
        """Write, verify and commit one shard of this run's rows (the local runner's writer thread)."""
        self.lock.check()
        name = self.next_shard_name()
        try:
            tmp, record = stage_shard(self.staging, table, name, os.getcwd(), self.run_digest)
            publish_shard(tmp, self.results, name)
        except OSError as e:
            raise RunError(f"{self.results}: cannot commit a shard ({_os_reason(e)}); nothing committed is lost: "
                           "fix the cause and rerun the same command") from None
        self.record(record)
        return record

    def record(self, record: ShardRecord) -> None:
        """Journal a shard already renamed into results/ (by commit, or by a Ray writer task)."""
        try:
            self.journal.append_shard(record)
        except OSError as e:
            (self.results / record.name).unlink(missing_ok=True)  # not journaled: not committed
            raise RunError(f"{self.journal.path}: cannot write ({_os_reason(e)}); nothing committed is lost: fix "
                           "the cause and rerun the same command") from None
        self._committed_now.append(record)

    @property
    def committed_this_run(self) -> int:
        return sum(r.rows for r in self._committed_now)

    def _final_rows(self) -> CommittedRows:
        """Every committed shard verified again (size, sha256, reads back) and strays in results/ adopted or set
        aside, so the dataset a complete run reports is whole."""
        rows = CommittedRows()
        found = Findings()
        check = self._check(found)
        records = self._state.shards + self._committed_now
        try:
            for record in records:
                path = self.results / record.name
                problem = "missing" if not path.is_file() else check.problem(path, record, rows)
                if problem:
                    if path.is_file():
                        check.set_aside(path, problem, record.rows)
                    raise RunError(f"{path}: changed after it was committed ({problem}); rerun the same command "
                                   "to redo its rows")
            for record in check.strays({r.name for r in records}, rows):
                self.record(record)
        finally:
            self._found.set_aside += found.set_aside
            self._found.adopted += found.adopted
            self._state.set_aside += found.set_aside
        return rows

    def finish(self, listing: InputListing, processed: int, seconds: float, device: str, backend: str,
               extra: dict[str, Any], status: str = "complete", note: str = "") -> RunSummary:
        """Verify the results again, mark run.json with counts for the current listing and throughput, return
        the summary; a "complete" run whose listing is not wholly covered by verified rows is refused."""
        rows = self._final_rows()
        listed = listing.identities
        listed_set = set(listed)
        statuses = [rows.status.get(i) for i in listed]
        ok, errors, missing = statuses.count("ok"), statuses.count("error"), statuses.count(None)
        unlisted = sum(1 for i in rows.status if i not in listed_set)
        summary = RunSummary(
            out=str(self.out), images=len(listed), ok=ok, errors=errors, processed=processed,
            skipped_resume=max(0, len(listed) - missing - processed), skipped_non_image=listing.skipped_non_image,
            seconds=seconds,
            images_per_second=processed / seconds if seconds > 0 else 0.0, device=device, backend=backend,
            extra=extra, unlisted_rows=unlisted, set_aside=list(self._found.set_aside))
        if status == "complete" and missing:
            self.info.update(status="failed", reason=f"{missing} listed inputs have no row")
            self._write_run_json()
            raise RunError(f"{self.out}: {missing} of {len(listed)} inputs have no row after the run; rerun the same "
                           "command to complete it")
        self.info.update(status=status, counts={"inputs": summary.images, "ok": ok, "error": errors,
                                                "no_row_yet": missing,
                                                "rows_of_inputs_no_longer_listed": unlisted,
                                                "skipped_non_image": summary.skipped_non_image,
                                                "processed_this_run": processed,
                                                "already_done": summary.skipped_resume},
                         set_aside=self._state.set_aside,
                         throughput={"seconds": round(seconds, 3),
                                     "images_per_second": round(summary.images_per_second, 2)},
                         finished=_now())
        if note:
            self.info["reason"] = note
        self._write_run_json()
        return summary

    def interrupted(self, signum: int, listing: InputListing, seconds: float, device: str, backend: str,
                    extra: dict[str, Any]) -> RunInterrupted:
        """Mark run.json "interrupted" with counts after a graceful stop; returns the exception the runner raises."""
        name = signal_name(signum)
        summary = self.finish(listing, self.committed_this_run, seconds, device, backend, extra,
                              status="interrupted", note=f"stopped by {name}; what was in flight was committed")
        left = summary.images - summary.ok - summary.errors
        return RunInterrupted(f"interrupted by {name}: {summary.processed} rows committed by this run, "
                              f"{summary.ok + summary.errors} of {summary.images} inputs done, {left} left; rerun "
                              "the same command to resume", signum)

    def abort(self, signum: int) -> None:
        """A second stop signal: record it and let the lock go, quickly; the process exits at once after this."""
        if self._identified and self.info:
            self.info.update(status="interrupted", finished=_now(),
                             reason=f"stopped at once by a second {signal_name(signum)}; rows in flight were not "
                                    "committed")
            try:
                self._write_info()
            except OSError:
                pass
        self.lock.release()

    def fail(self, reason: str) -> None:
        """Record a failure in run.json (best effort: on a full disk even this may not fit) once the directory is
        known to hold this run; a directory holding another run, or none we can identify, is never touched, nor one
        whose lock another run has taken over."""
        try:
            if not self._identified or not self.lock.still_held():
                return
        except OSError:
            pass  # cannot read the lock: record the failure, best effort as below
        self.info.update(status="failed", reason=reason, finished=_now())
        if "fingerprint" not in self.info and self._state.fingerprint is not None:
            self.info["fingerprint"] = self._state.fingerprint
        try:
            self._write_info()
        except OSError:
            pass

    def _write_info(self) -> None:
        """run.json, atomically; on a full disk the reserve is given up for it."""
        try:
            write_json(self.run_json, self.info)
        except OSError as e:
            if e.errno != errno.ENOSPC or not self.reserve.exists():
                raise
            self.reserve.unlink()
            write_json(self.run_json, self.info)


def _is_overlay_name(name: str) -> bool:
    stem = name[:-len(".jpg")]
    digest = stem.rsplit("_", 1)[-1]
    return len(digest) == 12 and all(c in "0123456789abcdef" for c in digest)
