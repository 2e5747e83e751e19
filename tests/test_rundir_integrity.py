"""What a run directory holds is exact after anything a real run meets: any file name the OS allows gets one row that
reads back, new inputs never replace committed shards, and a damaged or unjournaled shard is found, kept aside and
exactly its rows redone."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine_support import (SmallArtifact, artifact, encode, rows_by_path, scene,  # noqa: F401 (fixture)
                            write_image, write_scenes)
from rundir_support import (finish, gradcam, journal_shards, one_line, run_json, run_ok, slow_images, start_gradcam,
                            stray_files, wait_for)




def test_the_path_escape_is_one_to_one_and_leaves_valid_names_alone() -> None:
    from gradcam_engine.engine.results import path_key, path_text

    names = [b"plain.jpg", "ünïcødé ✓.jpg".encode(), b"caf\xe9.jpg", b"caf\\xe9.jpg", b"a\\b", b"a\\\\xe9",
             b"\xff\\\xfe", b"\\", b"\\x", b"x\\udcff", b"dir/\x80/\xc3.png"]
    keys = [os.fsdecode(name) for name in names]
    texts = [path_text(key) for key in keys]
    assert len(set(texts)) == len(texts)
    for name, key, text in zip(names, keys, texts):
        text.encode("utf-8")  # always valid UTF-8
        assert os.fsencode(path_key(text)) == name
        if b"\\" not in name and name.decode("utf-8", "replace").encode() == name:
            assert text == key
    assert path_text(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"
    assert path_text("caf\\xe9.jpg") == "caf\\\\xe9.jpg"


def test_a_file_name_that_is_not_utf8_gets_one_row_from_a_folder_a_path_list_and_a_tar(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    folder = tmp_path / "photos"
    write_scenes(folder, [(40, 30), (50, 40)])
    in_folder = os.fsdecode(os.fsencode(folder) + b"/caf\xe9.png")
    Path(in_folder).write_bytes(encode(scene(48, 36, 1), "PNG"))
    listed = tmp_path / "listed"
    listed.mkdir()
    in_list = os.fsdecode(os.fsencode(listed) + b"/\xff\xfeodd.jpg")
    Path(in_list).write_bytes(encode(scene(30, 30, 2), "JPEG"))
    backslash = listed / "back\\slash.jpg"
    backslash.write_bytes(encode(scene(36, 30, 3), "JPEG"))
    (listed / "list.txt").write_bytes(b"\xff\xfeodd.jpg\nback\\slash.jpg\n")
    shard = tmp_path / "shard.tar"
    member = os.fsdecode(b"na\xefve.jpg")
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as archive:
        data = encode(scene(44, 33, 4), "JPEG")
        info = tarfile.TarInfo(member)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    run_dir = tmp_path / "run"
    argv = [str(artifact.root), str(folder), str(listed / "list.txt"), str(shard), "--out", str(run_dir),
            "--overlays", "all", "--batch-size", "2"]

    out = run_ok(argv, capsys)

    from gradcam_engine.engine.results import path_key

    expected = {str(folder / "img_0000.jpg"), str(folder / "img_0001.png"), in_folder, in_list, str(backslash),
                f"{shard}::{member}"}
    rows = pq.read_table(run_dir / "results").to_pylist()
    assert sorted(path_key(row["path"]) for row in rows) == sorted(expected)
    assert {row["status"] for row in rows} == {"ok"}
    paths = {row["path"] for row in rows}
    assert f"{folder}/caf\\xe9.png" in paths and f"{shard}::na\\xefve.jpg" in paths  # the documented escape
    assert f"{listed}/back\\\\slash.jpg" in paths
    assert len(pd.read_parquet(run_dir / "results")) == 6
    overlays = os.listdir(os.fsencode(run_dir / "overlays"))
    assert len(overlays) == 6 and all(name.decode("utf-8").endswith(".jpg") for name in overlays)
    assert out.startswith("6 images: 6 ok, 0 errors")

    again = run_ok(argv, capsys)
    assert "processed 0 " in again and "(6 already done, resumed)" in again
    assert pq.read_table(run_dir / "results").num_rows == 6


def test_inputs_added_before_a_resume_never_replace_committed_shards(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    folder = tmp_path / "images"
    write_scenes(folder, [(40 + i, 30 + i) for i in range(12)])
    run_dir = tmp_path / "run"
    argv = [str(artifact.root), str(folder), "--out", str(run_dir)]
    run_ok(argv, capsys)
    before = {p.name: p.read_bytes() for p in (run_dir / "results").iterdir()}
    # One sorts first, one lands last among the earlier run's positions: listing positions no longer name anything.
    write_image(folder / "aaa_new.png", scene(33, 44, 99))
    write_image(folder / "img_0009_b.png", scene(35, 41, 98))

    out = run_ok(argv, capsys)

    assert out.startswith("14 images: 14 ok, 0 errors; processed 2 ")
    after = {p.name: p.read_bytes() for p in (run_dir / "results").iterdir()}
    assert {name: after.get(name) for name in before} == before  # every committed shard, byte for byte
    assert sorted(rows_by_path(run_dir)) == sorted(str(p) for p in folder.iterdir())


def _three_shards(artifact: SmallArtifact, tmp_path: Path,
                  capsys: pytest.CaptureFixture[str]) -> tuple[list[str], Path]:
    write_scenes(tmp_path / "images", [(40 + i, 30 + i) for i in range(12)])
    argv = [str(artifact.root), str(tmp_path / "images"), "--out", str(tmp_path / "run"), "--shard-size", "4",
            "--batch-size", "2"]
    run_ok(argv, capsys)
    assert len(list((tmp_path / "run" / "results").glob("part-*.parquet"))) == 3
    return argv, tmp_path / "run"


@pytest.mark.parametrize("damage", ["truncated", "overwritten mid-file"])
def test_a_damaged_shard_is_set_aside_and_exactly_its_rows_are_redone(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:  # noqa: F811
    argv, run_dir = _three_shards(artifact, tmp_path, capsys)
    before = rows_by_path(run_dir)
    victim = sorted((run_dir / "results").iterdir())[1]
    victim_paths = set(pq.read_table(victim, columns=["path"]).column("path").to_pylist())
    data = victim.read_bytes()
    middle = len(data) // 2
    damaged = data[:middle] if damage == "truncated" else data[:middle] + b"\xa5" * 64 + data[middle + 64:]
    victim.write_bytes(damaged)

    out = run_ok(argv, capsys)

    assert out.startswith(f"12 images: 12 ok, 0 errors; 1 damaged shard(s) set aside in {run_dir / 'damaged'}/ "
                          f"(4 rows redone); processed 4 ")
    assert (run_dir / "damaged" / victim.name).read_bytes() == damaged  # kept as found
    set_aside = run_json(run_dir)["set_aside"]
    assert [(event["shard"], event["rows"]) for event in set_aside] == [(victim.name, 4)]
    assert not (run_dir / "results" / victim.name).exists()
    table = pd.read_parquet(run_dir / "results")  # the dataset reads back whole
    assert len(table) == 12 and set(table["path"]) == set(before)
    redone = {p for p in rows_by_path(run_dir) if p in victim_paths}
    assert redone == victim_paths
    assert run_json(run_dir)["status"] == "complete" and stray_files(run_dir) == []


@pytest.mark.parametrize("shard_state", ["intact", "truncated"])
def test_a_shard_renamed_but_never_journaled_is_adopted_when_whole_and_set_aside_when_not(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        shard_state: str) -> None:  # noqa: F811
    argv, run_dir = _three_shards(artifact, tmp_path, capsys)
    # What a kill between a shard's rename into results/ and its journal line leaves: the shard, unjournaled.
    journal = run_dir / "journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    unjournaled = json.loads(lines[-1])["name"]
    journal.write_text("".join(lines[:-1]))
    if shard_state == "truncated":
        shard = run_dir / "results" / unjournaled
        shard.write_bytes(shard.read_bytes()[:300])

    out = run_ok(argv, capsys)

    state = run_json(run_dir)["verified_at_start"]
    if shard_state == "intact":
        assert "processed 0 " in out
        assert state["adopted"] == [unjournaled] and state["set_aside"] == []
        assert unjournaled in [line["name"] for line in journal_shards(run_dir)]
    else:
        assert "processed 4 " in out and "1 damaged shard(s) set aside" in out
        assert state["adopted"] == [] and [e["shard"] for e in state["set_aside"]] == [unjournaled]
        assert (run_dir / "damaged" / unjournaled).exists()
    assert len(rows_by_path(run_dir)) == 12
    assert {p.name for p in (run_dir / "results").iterdir()} == {line["name"] for line in journal_shards(run_dir)}


def _paths(shard: Path) -> set[str]:
    return set(pq.read_table(shard, columns=["path"]).column("path").to_pylist())


def test_a_shard_copied_from_a_run_with_another_target_is_set_aside_and_its_rows_redone(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    argv, run_dir = _three_shards(artifact, tmp_path, capsys)
    before = rows_by_path(run_dir)
    other = tmp_path / "other"
    run_ok([*argv[:3], str(other), *argv[4:], "--target", "1"], capsys)
    # A shard lost here, "filled in" with the shard of the same images from the run that explained class 1.
    victim = sorted((run_dir / "results").iterdir())[1]
    copied = next(p for p in (other / "results").iterdir() if _paths(p) == _paths(victim))
    foreign = pq.read_table(copied).to_pylist()
    assert {row["target_class"] for row in foreign} == {1} and {row["predicted_class"] for row in foreign} != {1}
    victim.unlink()
    shutil.copy(copied, run_dir / "results" / copied.name)

    out = run_ok(argv, capsys)

    assert "processed 4 " in out
    verified = run_json(run_dir)["verified_at_start"]
    assert verified["adopted"] == [] and [m["shard"] for m in verified["missing"]] == [victim.name]
    [event] = verified["set_aside"]
    assert event["shard"] == copied.name and "from another run" in event["reason"] and event["rows"] == 4
    assert (run_dir / "damaged" / copied.name).read_bytes() == copied.read_bytes()  # kept as found
    table = pd.read_parquet(run_dir / "results")  # one dataset, this run's rows only
    assert len(table) == 12 and set(table["path"]) == set(before)
    assert (table["target_class"] == table["predicted_class"]).all()


def test_an_unjournaled_shard_of_another_schema_is_set_aside_even_with_this_runs_digest(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    argv, run_dir = _three_shards(artifact, tmp_path, capsys)
    journal = run_dir / "journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:-1]))
    shard = run_dir / "results" / json.loads(lines[-1])["name"]
    table = pq.read_table(shard)  # its key-value metadata, this run's digest included, is kept
    pq.write_table(table.append_column("note", pa.array(["edited"] * table.num_rows)), shard)

    out = run_ok(argv, capsys)

    assert "processed 4 " in out
    [event] = run_json(run_dir)["verified_at_start"]["set_aside"]
    assert event["shard"] == shard.name and "schema" in event["reason"]
    table = pd.read_parquet(run_dir / "results")
    assert len(table) == 12 and "note" not in table.columns


def test_a_journaled_shard_that_repeats_another_shards_rows_is_set_aside(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    argv, run_dir = _three_shards(artifact, tmp_path, capsys)
    first = sorted((run_dir / "results").iterdir())[0]
    copy = first.with_name(first.name.replace(".parquet", "-copy.parquet"))
    shutil.copy(first, copy)
    data = copy.read_bytes()
    with open(run_dir / "journal.jsonl", "a") as journal:  # journaled as if committed: size and checksum verify
        journal.write(json.dumps({"kind": "shard", "name": copy.name, "rows": 4,
                                  "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}) + "\n")

    out = run_ok(argv, capsys)

    assert out.startswith("12 images: 12 ok, 0 errors; 1 damaged shard(s) set aside") and "processed 0 " in out
    [event] = run_json(run_dir)["set_aside"]
    assert event["shard"] == copy.name and "repeats rows" in event["reason"] and event["rows"] == 0
    assert (run_dir / "damaged" / copy.name).exists() and (run_dir / "results" / first.name).exists()
    assert len(pd.read_parquet(run_dir / "results")) == 12
    assert copy.name not in [line["name"] for line in journal_shards(run_dir)]


def test_a_journaled_shard_that_repeats_its_own_rows_is_set_aside(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """As a retried writer could leave it: each row twice, journaled as committed (size and checksum verify)."""
    argv, run_dir = _three_shards(artifact, tmp_path, capsys)
    shard = sorted((run_dir / "results").iterdir())[-1]
    table = pq.read_table(shard)
    pq.write_table(pa.concat_tables([table, table]), shard)  # the schema and its metadata (this run's digest) kept
    data = shard.read_bytes()
    journal = run_dir / "journal.jsonl"
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    for line in lines:
        if line.get("name") == shard.name:
            line.update(rows=8, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    journal.write_text("".join(json.dumps(line) + "\n" for line in lines))

    out = run_ok(argv, capsys)

    assert "processed 4 " in out and "1 damaged shard(s) set aside" in out
    [event] = run_json(run_dir)["set_aside"]
    assert event["shard"] == shard.name and "repeats rows" in event["reason"] and event["rows"] == 4
    table = pd.read_parquet(run_dir / "results")
    assert len(table) == 12 and table["path"].is_unique


def test_a_run_never_reports_complete_over_a_shard_damaged_while_it_ran(artifact: SmallArtifact,  # noqa: F811
                                                                         tmp_path: Path) -> None:
    slow_images(tmp_path / "slow", 12)
    run_dir = tmp_path / "run"
    argv = ["run", str(artifact.root), str(tmp_path / "slow"), "--out", str(run_dir), "--workers", "1",
            "--batch-size", "2", "--shard-size", "2"]
    process = start_gradcam(*argv)
    try:
        wait_for(lambda: bool(journal_shards(run_dir)), process, what="a shard commit")
        shard = run_dir / "results" / journal_shards(run_dir)[0]["name"]
        data = shard.read_bytes()
        shard.write_bytes(data[:100] + b"\x00" * 32 + data[132:])  # the disk, or a person, changed it
    finally:
        code, out, err = finish(process)
    assert code == 2, out + err
    assert f"{shard}: changed after it was committed (checksum mismatch)" in one_line(err)
    state = run_json(run_dir)
    assert state["status"] == "failed" and (run_dir / "damaged" / shard.name).exists()

    assert gradcam(*argv).returncode == 0  # the rerun redoes exactly that shard's rows
    assert len(rows_by_path(run_dir)) == 12 and run_json(run_dir)["status"] == "complete"
