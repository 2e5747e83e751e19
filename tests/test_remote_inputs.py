"""Inputs named by URI go through pyarrow.fs; file:// URIs exercise the same code as s3:// or gs:// without a
network."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from gradcam_engine.engine.inputs import IMAGE, TAR_MEMBER, InputError, InputItem, ReadError, list_inputs, read_bytes
from gradcam_engine.engine.storage import is_uri
from gradcam_engine.engine.local_run import run_gradcam
from gradcam_engine.engine.run_config import RunConfig
from engine_support import SmallArtifact, artifact, cam_of, rows_by_path, write_scenes  # noqa: F401 (fixture)


def write(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def uri(path: Path) -> str:
    return path.resolve().as_uri()


def test_a_uri_prefix_is_listed_recursively_in_path_order_and_non_images_are_counted(tmp_path: Path) -> None:
    for name in ("b/2.jpg", "a/z.png", "a/sub/1.jpg", "a-b.jpg", "notes.md", "a/data.csv"):
        write(tmp_path / name)
    listing = list_inputs([uri(tmp_path)])
    base = uri(tmp_path)
    assert [i.key for i in listing.items] == [f"{base}/a/sub/1.jpg", f"{base}/a/z.png", f"{base}/a-b.jpg",
                                              f"{base}/b/2.jpg"]
    assert {i.kind for i in listing.items} == {IMAGE} and listing.skipped_non_image == 2


def test_a_path_list_at_a_uri_keeps_uri_lines_and_resolves_the_others_beside_it(tmp_path: Path) -> None:
    write(tmp_path / "imgs" / "a.jpg")
    elsewhere = write(tmp_path / "other" / "b.jpg")
    lst = tmp_path / "imgs" / "list.txt"
    lst.write_text(f"a.jpg\n# a comment\n\n{uri(elsewhere)}\nmissing.jpg\n")
    items = list_inputs([uri(lst)]).items
    assert [i.key for i in items] == [uri(tmp_path / "imgs" / "a.jpg"), uri(tmp_path / "imgs" / "# a comment"),
                                      uri(elsewhere), uri(tmp_path / "imgs" / "missing.jpg")]  # every line verbatim


def test_a_local_path_list_may_name_uris(tmp_path: Path) -> None:
    image = write(tmp_path / "x.jpg")
    lst = tmp_path / "list.txt"
    lst.write_text(f"{uri(image)}\nx.jpg\n")
    items = list_inputs([str(lst)]).items
    assert items == [InputItem(uri(image), IMAGE), InputItem(str(tmp_path / "x.jpg"), IMAGE)]


def test_names_with_spaces_and_hashes_become_valid_uris_that_read_back(tmp_path: Path) -> None:
    image = write(tmp_path / "my photos" / "cat #1.jpg", b"meow")
    (tmp_path / "my photos" / "list.txt").write_text("cat #1.jpg\n")
    for spec in (uri(tmp_path / "my photos"), uri(tmp_path / "my photos" / "list.txt")):
        items = list_inputs([spec]).items
        assert [i.key for i in items] == [uri(image)] and "%20" in items[0].key and "%231" in items[0].key
        assert read_bytes(items[0], 100) == b"meow"


def test_two_spellings_of_one_object_are_one_input(tmp_path: Path) -> None:
    image = write(tmp_path / "d" / "x.jpg")
    assert len(list_inputs([uri(image), uri(image).replace("/d/", "/d/./")]).items) == 1


def test_reading_a_uri_gives_its_bytes_and_every_failure_is_a_read_error(tmp_path: Path) -> None:
    image = write(tmp_path / "x.jpg", b"0123456789")
    assert read_bytes(InputItem(uri(image), IMAGE), 100) == b"0123456789"
    with pytest.raises(ReadError, match="^no such file$"):
        read_bytes(InputItem(uri(tmp_path / "gone.jpg"), IMAGE), 100)
    with pytest.raises(ReadError, match="^is a directory$"):
        read_bytes(InputItem(uri(tmp_path), IMAGE), 100)
    with pytest.raises(ReadError, match="^file is 10 bytes, over the limit of 5$"):
        read_bytes(InputItem(uri(image), IMAGE), 5)


@pytest.mark.parametrize("spec, message", [
    ("file:///no/such/prefix", "no such file, directory or prefix"),
    ("nosuchscheme://bucket/key.jpg", "cannot open"),
    ("file:///data/*.jpg", "glob patterns are not supported in URIs"),
])
def test_a_uri_that_names_nothing_usable_stops_the_run_before_it_starts(spec: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        list_inputs([spec])


def test_a_tar_shard_by_uri_is_listed_and_read_like_a_local_one(tmp_path: Path) -> None:
    shard = tmp_path / "shards" / "s 1.tar"
    shard.parent.mkdir()
    contents = {"a.jpg": b"first", "sub/b.png": b"second" * 100, "notes.txt": b"not an image"}
    with tarfile.open(shard, "w") as archive:
        for name, data in contents.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    local, remote = list_inputs([str(shard)]), list_inputs([uri(shard)])
    assert [i.key.split("::")[1] for i in remote.items] == [i.key.split("::")[1] for i in local.items] == \
        ["a.jpg", "sub/b.png"]
    assert {i.kind for i in remote.items} == {TAR_MEMBER} and remote.skipped_non_image == 1
    assert remote.items[0].key == f"{uri(shard)}::a.jpg"
    assert [read_bytes(i, 1 << 20) for i in remote.items] == [contents["a.jpg"], contents["sub/b.png"]]
    with pytest.raises(ReadError, match="^no such member in the tar archive$"):
        read_bytes(InputItem(f"{uri(shard)}::c.jpg", TAR_MEMBER), 100)


def test_is_uri_tells_schemes_from_local_paths() -> None:
    assert is_uri("s3://bucket/key") and is_uri("gs://b/k") and is_uri("file:///tmp/x")
    assert not is_uri("/tmp/x.jpg") and not is_uri("photos/s3:/x.jpg") and not is_uri("C:\\x.jpg")


def test_a_run_over_a_uri_prefix_gives_the_rows_of_the_same_run_over_the_local_directory(
        artifact: SmallArtifact, tmp_path: Path) -> None:  # noqa: F811
    folder = tmp_path / "scenes"
    write_scenes(folder, [(64, 64), (120, 80), (33, 90), (200, 200), (64, 65)], seed=5)
    write(folder / "broken.jpg", b"not a jpeg")
    local, remote = tmp_path / "local", tmp_path / "remote"
    for inputs, out in (([str(folder)], local), ([uri(folder)], remote)):
        summary = run_gradcam(RunConfig(artifact=str(artifact.root), inputs=inputs, out=str(out), batch_size=2,
                                        overlays="all", progress=False))
        assert (summary.images, summary.ok, summary.errors) == (6, 5, 1)
    local_rows, remote_rows = rows_by_path(local), rows_by_path(remote)
    assert sorted(remote_rows) == sorted(uri(Path(p)) for p in local_rows)
    for path, row in local_rows.items():
        other = remote_rows[uri(Path(path))]
        assert (other["status"], other["width"], other["height"], other["target_class"]) == \
            (row["status"], row["width"], row["height"], row["target_class"])
        if row["status"] == "ok":
            assert np.array_equal(cam_of(other), cam_of(row))
        else:
            assert "broken.jpg" in other["error"] and "(decode)" in other["error"]
    assert len(list((remote / "overlays").glob("*.jpg"))) == 5
