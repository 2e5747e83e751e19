"""Which shards in results/ can be trusted, decided from their own bytes: what a resumed run counts as done.

A journaled shard is trusted when its size and sha256 match the journal, it reads back and repeats no row of a shard
trusted before it. A file the journal does not list (a kill between a shard's rename and its journal line, or a file
put there by hand) is read back whole and adopted only when it provably belongs to this run: it carries the digest of
this run's fingerprint (engine.results.RUN_KEY), has exactly this run's results schema, and none of its rows is
already committed. Anything else is set aside: moved to damaged/, kept as found, never deleted, and recorded with the
reason; the rows it held are then simply not done.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from gradcam_engine.engine.errors import first_line
from gradcam_engine.engine.inputs import Identities
from gradcam_engine.engine.results import RUN_KEY, ShardRecord, base_of, is_shard_name, path_key, read_shard


@dataclass
class CommittedRows:
    """The rows of trusted shards: input identity -> status, and each row's `path` text."""

    status: dict[str, str] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)


@dataclass
class Findings:
    """What a check found, for run.json and the summary."""

    set_aside: list[dict[str, Any]] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)


class ShardCheck:
    """Checks results/ against a list of journaled shards, moving what cannot be trusted to `damaged`; `run` (the
    digest of the run's fingerprint) and `schema` are what a stray shard must carry to be adopted."""

    def __init__(self, results: Path, damaged: Path, findings: Findings, run: str, schema: pa.Schema):
        self.results = results
        self.damaged = damaged
        self.findings = findings
        self.run = run
        self.schema = schema

    def journaled(self, records: list[ShardRecord], rows: CommittedRows) -> list[ShardRecord]:
        """The journaled shards that verify, their rows added to `rows`; a missing one is noted (its rows are
        redone), a damaged one or one repeating rows of a shard before it set aside."""
        trusted: list[ShardRecord] = []
        names: set[str] = set()
        for record in records:
            if record.name in names:
                continue
            names.add(record.name)
            path = self.results / record.name
            if not path.is_file():
                self.findings.missing.append({"shard": record.name, "rows": record.rows})
                continue
            problem = self.problem(path, record, rows)
            if problem:
                self.set_aside(path, problem, self._redone(path, rows, record.rows))
                continue
            trusted.append(record)
        return trusted

    def strays(self, trusted: set[str], rows: CommittedRows) -> list[ShardRecord]:
        """Every other file in results/: adopted (returned, rows added) or set aside."""
        adopted = []
        for path in sorted(self.results.iterdir()) if self.results.is_dir() else []:
            if path.name in trusted:
                continue
            record = self._adopt(path, rows)
            if record is not None:
                adopted.append(record)
                self.findings.adopted.append(record.name)
        return adopted

    def problem(self, path: Path, record: ShardRecord, rows: CommittedRows | None = None) -> str:
        """Why a journaled shard cannot be trusted, or "" (its rows then added to `rows`)."""
        size = path.stat().st_size
        if size != record.bytes:
            return f"size {size} bytes, committed as {record.bytes}"
        data = path.read_bytes()  # read once: checksummed, then parsed from memory
        if hashlib.sha256(data).hexdigest() != record.sha256:
            return "checksum mismatch"
        return "" if rows is None else self.read_rows(data, rows)

    def read_rows(self, shard: Path | bytes, rows: CommittedRows) -> str:
        """Add a shard's rows; else (nothing added) why not: it does not read back, or it repeats a row already
        committed or one of its own (a copy, by hand or by a retried writer)."""
        try:
            ids, texts, statuses = _rows(shard)
        except Exception:  # pyarrow raises several types on damaged files
            return "does not read back"
        if len(set(ids)) != len(ids) or not rows.status.keys().isdisjoint(ids):
            return "repeats rows already committed"
        rows.status.update(zip(ids, statuses))
        rows.paths.extend(texts)
        return ""

    def _adopt(self, path: Path, rows: CommittedRows) -> ShardRecord | None:
        if not (path.is_file() and is_shard_name(path.name)):
            self.set_aside(path, "not a shard committed by this run", None)
            return None
        try:
            data = path.read_bytes()  # read once: parsed, checked for rows and checksummed from memory
            table = read_shard(data)
        except Exception as e:
            self.set_aside(path, f"not journaled and does not read back ({first_line(e, 100)})", None)
            return None
        if table.schema.remove_metadata() != self.schema:
            self.set_aside(path, "not journaled and not a shard of this run's results schema",
                           self._redone(data, rows, table.num_rows))
            return None
        if not self.run or (table.schema.metadata or {}).get(RUN_KEY) != self.run.encode():
            self.set_aside(path, "not journaled and from another run (it lacks this run's digest)",
                           self._redone(data, rows, table.num_rows))
            return None
        problem = self.read_rows(data, rows)
        if problem:
            self.set_aside(path, f"not journaled and {problem}", self._redone(data, rows, table.num_rows))
            return None
        return ShardRecord(path.name, table.num_rows, hashlib.sha256(data).hexdigest(), len(data))

    @staticmethod
    def _redone(shard: Path | bytes, rows: CommittedRows, count: int) -> int:
        """How many of a set-aside shard's `count` rows no trusted shard holds: the rows the run redoes."""
        try:
            return len(set(_rows(shard)[0]) - rows.status.keys())
        except Exception:  # it does not read back: all of them
            return count

    def set_aside(self, path: Path, reason: str, rows: int | None) -> None:
        """Move a file out of results/ into damaged/ (kept as found) and record why."""
        self.damaged.mkdir(parents=True, exist_ok=True)
        target = self.damaged / path.name
        for n in itertools.count(1):
            if not target.exists():
                break
            target = self.damaged / f"{path.name}.{n}"
        os.replace(path, target)
        self.findings.set_aside.append({"shard": path.name, "reason": reason, "rows": rows,
                                        "moved_to": f"{self.damaged.name}/{target.name}",
                                        "found": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _rows(shard: Path | bytes) -> tuple[list[str], list[str], list[str]]:
    """A shard's (file's or bytes') input identities, `path` texts and statuses; raises when it does not read back."""
    table = read_shard(shard, columns=["path", "status"])
    identities = Identities(base_of(table.schema))
    texts = table.column("path").to_pylist()
    return [identities(path_key(t)) for t in texts], texts, table.column("status").to_pylist()
