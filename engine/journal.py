"""The commit journal of a run directory: which shards are committed, with their row count, size and sha256.

    RUN_DIR/journal.jsonl
      {"kind": "run", "version": 1, "fingerprint": {...}}                       the run this directory holds
      {"kind": "shard", "name": "part-….parquet", "rows": 4096, "sha256": "…", "bytes": 123}   one per commit
      {"kind": "set_aside", "name": "part-….parquet", "reason": "…", "moved_to": "damaged/…"}  damaged shards

A shard is renamed into results/ first and journaled after, so a kill between the two leaves a shard that exists but
is not journaled; the next run verifies it and adopts it, or sets it aside (engine.rundir). Appends are flushed to
stable storage; a line cut short by a crash is ignored, which is the same as never written. The journal is rewritten
(atomically) at the start of each run with exactly what verified.
"""
from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gradcam_engine.engine.results import ShardRecord

JOURNAL = "journal.jsonl"
VERSION = 1


@dataclass
class JournalState:
    """What a journal file says; fingerprint is None when it has no readable header."""

    fingerprint: dict[str, Any] | None = None
    shards: list[ShardRecord] = field(default_factory=list)
    set_aside: list[dict[str, Any]] = field(default_factory=list)


def _shard(entry: dict[str, Any]) -> ShardRecord | None:
    try:
        return ShardRecord(str(entry["name"]), int(entry["rows"]), str(entry["sha256"]), int(entry["bytes"]))
    except (KeyError, TypeError, ValueError):
        return None


class Journal:
    """Append-only record of the commits of one run directory; thread-safe appends."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> JournalState:
        """Every readable line; an unreadable line (a crash cut it short, or an edit) is skipped, so the shard it
        named is treated as not journaled and verified from its own bytes instead."""
        state = JournalState()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return state
        for line in data.split(b"\n"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict):
                continue
            kind = entry.get("kind")
            if kind == "run" and isinstance(entry.get("fingerprint"), dict):
                state.fingerprint = entry["fingerprint"]
            elif kind == "shard" and (record := _shard(entry)) is not None:
                state.shards.append(record)
            elif kind == "set_aside":
                state.set_aside.append({k: v for k, v in entry.items() if k != "kind"})
        return state

    def rewrite(self, state: JournalState) -> None:
        """Replace the journal atomically with exactly `state`; OSError (the old journal is kept) on failure."""
        lines = [{"kind": "run", "version": VERSION, "fingerprint": state.fingerprint}]
        lines += [{"kind": "shard", **asdict(record)} for record in state.shards]
        lines += [{"kind": "set_aside", **event} for event in state.set_aside]
        write_atomically(self.path, "".join(json.dumps(line, default=str) + "\n" for line in lines))

    def append_shard(self, record: ShardRecord) -> None:
        self._append({"kind": "shard", **asdict(record)})

    def _append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, default=str) + "\n").encode()
        with self._lock, open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def write_atomically(path: Path, text: str) -> None:
    """Replace a file atomically and durably: a reader sees the old or the new file, never half of one, and a
    failure (a full disk) leaves the old file and no temporary behind."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
