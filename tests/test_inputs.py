"""Which items a run sees, in which order, and how their bytes are read."""
from __future__ import annotations

import io
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gradcam_engine.engine.errors import UserError
from gradcam_engine.engine.inputs import (
    IMAGE_EXTENSIONS,
    InputError,
    InputItem,
    ReadError,
    list_inputs,
    read_bytes,
    split_tar_key,
)


def write(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def keys(specs: list[str]) -> list[str]:
    return [item.key for item in list_inputs(specs).items]


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    write(root / "b.jpg")
    write(root / "a.PNG")
    write(root / "sub" / "c.gif")
    write(root / "sub" / "deeper" / "d.tiff")
    write(root / "a-z.webp")
    write(root / "notes.txt")
    write(root / "sub" / "readme.md")
    return root


def test_image_extensions_cover_the_supported_formats() -> None:
    expected = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
    assert IMAGE_EXTENSIONS == expected


def test_directory_is_walked_recursively_in_sorted_order_and_non_images_are_counted(image_tree: Path) -> None:
    listing = list_inputs([str(image_tree)])
    root = str(image_tree)
    assert [item.key for item in listing.items] == [
        f"{root}/a-z.webp",
        f"{root}/a.PNG",
        f"{root}/b.jpg",
        f"{root}/sub/c.gif",
        f"{root}/sub/deeper/d.tiff",
    ]
    assert {item.kind for item in listing.items} == {"file"}
    assert listing.skipped_non_image == 2


def test_directory_keys_keep_the_spec_as_given(image_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(image_tree.parent)
    assert keys(["images/sub"]) == ["images/sub/c.gif", "images/sub/deeper/d.tiff"]


def test_directory_walk_does_not_follow_symlinked_directories(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "hidden.jpg")
    root = tmp_path / "root"
    write(root / "own.jpg")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    assert keys([str(root)]) == [f"{root}/own.jpg"]


def test_symlinks_to_images_are_listed_under_their_own_name_even_when_broken(tmp_path: Path) -> None:
    target = write(tmp_path / "store" / "real.jpg")
    root = tmp_path / "root"
    root.mkdir()
    (root / "alias.jpg").symlink_to(target)
    (root / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    assert keys([str(root)]) == [f"{root}/alias.jpg", f"{root}/dangling.jpg"]


def test_glob_gives_sorted_matches(image_tree: Path) -> None:
    write(image_tree / "c.jpg")
    assert keys([f"{image_tree}/*.jpg"]) == [f"{image_tree}/b.jpg", f"{image_tree}/c.jpg"]


def test_glob_walks_matched_directories_and_counts_non_images(image_tree: Path) -> None:
    listing = list_inputs([f"{image_tree}/s*", f"{image_tree}/*.txt"])
    assert [item.key for item in listing.items] == [f"{image_tree}/sub/c.gif", f"{image_tree}/sub/deeper/d.tiff"]
    assert listing.skipped_non_image == 2  # sub/readme.md and notes.txt


def test_glob_without_matches_is_an_input_error(tmp_path: Path) -> None:
    pattern = f"{tmp_path}/*.jpg"
    with pytest.raises(InputError, match=r"no file matches this pattern"):
        list_inputs([pattern])


def test_existing_path_with_glob_characters_is_taken_literally(tmp_path: Path) -> None:
    path = write(tmp_path / "shot[1].jpg")
    write(tmp_path / "shot1.jpg")
    assert keys([str(path)]) == [str(path)]


def test_path_list_gives_one_item_per_line_whatever_the_path_holds(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write(images / "a.jpg")
    write(images / "notes.txt")
    absolute = write(tmp_path / "elsewhere" / "b.png")
    listing_file = tmp_path / "lists" / "run.lst"
    listing_file.parent.mkdir()
    listing_file.write_text(
        "# images for the run\n"
        "\n"
        "../images/a.jpg\n"
        "missing.jpg\n"
        "../images\n"
        "../images/notes.txt\n"
        f"{absolute}\n"
        "   \n"
    )
    listing = list_inputs([str(listing_file)])
    base = str(tmp_path / "lists")
    assert listing.items == [  # verbatim: a '#' line and a line of spaces are names too
        InputItem(f"{base}/# images for the run", "file"),
        InputItem(f"{base}/../images/a.jpg", "file"),
        InputItem(f"{base}/missing.jpg", "file"),
        InputItem(f"{base}/../images", "file"),
        InputItem(f"{base}/../images/notes.txt", "file"),
        InputItem(str(absolute), "file"),
        InputItem(f"{base}/   ", "file"),
    ]
    assert listing.skipped_non_image == 0


def test_path_list_entries_turn_into_read_errors_not_listing_errors(tmp_path: Path) -> None:
    (tmp_path / "dir.jpg").mkdir()
    listing_file = tmp_path / "run.txt"
    listing_file.write_text("missing.jpg\ndir.jpg\n")
    missing, directory = list_inputs([str(listing_file)]).items
    with pytest.raises(ReadError, match="^no such file$"):
        read_bytes(missing, 100)
    with pytest.raises(ReadError, match="^is a directory$"):
        read_bytes(directory, 100)


def test_tar_shard_lists_image_members_in_archive_order(tmp_path: Path) -> None:
    shard = tmp_path / "shard-0001.tar"
    with tarfile.open(shard, "w") as archive:
        add_member(archive, "z/last.jpg", b"first in archive")
        add_member(archive, "notes.txt", b"text")
        directory = tarfile.TarInfo("a")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)
        add_member(archive, "a/first.png", b"second in archive")
        link = tarfile.TarInfo("a/link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "first.png"
        archive.addfile(link)
    listing = list_inputs([str(shard)])
    assert listing.items == [
        InputItem(f"{shard}::z/last.jpg", "tar"),
        InputItem(f"{shard}::a/first.png", "tar"),
    ]
    assert listing.skipped_non_image == 2  # notes.txt and the symlink member; directories are not counted
    assert [read_bytes(item, 1000) for item in listing.items] == [b"first in archive", b"second in archive"]


def test_unreadable_tar_is_an_input_error(tmp_path: Path) -> None:
    shard = write(tmp_path / "broken.tar", b"this is not a tar archive" * 40)
    with pytest.raises(InputError, match=r"broken\.tar: not a readable tar archive"):
        list_inputs([str(shard)])


def test_tar_key_splits_at_the_archive_name_even_when_the_member_holds_separators() -> None:
    assert split_tar_key("/data/s.tar::dir/a::b.jpg") == ("/data/s.tar", "dir/a::b.jpg")


def test_single_image_file_is_one_item(tmp_path: Path) -> None:
    path = write(tmp_path / "photo.jpeg")
    listing = list_inputs([str(path)])
    assert listing.items == [InputItem(str(path), "file")]
    assert listing.skipped_non_image == 0


def test_missing_spec_is_an_input_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(InputError) as raised:
        list_inputs([str(missing)])
    assert str(raised.value) == f"{missing}: no such file or directory"
    assert isinstance(raised.value, UserError)  # the command line prints it as one line


def test_specs_keep_their_order_and_duplicates_keep_the_first_occurrence(tmp_path: Path) -> None:
    first = write(tmp_path / "b" / "one.jpg")
    write(tmp_path / "a" / "two.jpg")
    specs = [str(tmp_path / "b"), str(tmp_path / "a"), str(first), f"{tmp_path}/a/../a", str(tmp_path / "b")]
    assert keys(specs) == [str(first), f"{tmp_path}/a/two.jpg"]


def test_read_bytes_returns_the_file_content(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jpg", b"\xff\xd8 image bytes")
    assert read_bytes(InputItem(str(path), "file"), 100) == b"\xff\xd8 image bytes"


def test_read_bytes_of_a_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(ReadError, match="^is a directory$"):
        read_bytes(InputItem(str(tmp_path), "file"), 100)


def test_read_bytes_of_a_broken_symlink_says_so(tmp_path: Path) -> None:
    link = tmp_path / "dangling.jpg"
    link.symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(ReadError, match="^broken symlink$"):
        read_bytes(InputItem(str(link), "file"), 100)


def test_read_bytes_of_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ReadError, match="^no such file$"):
        read_bytes(InputItem(str(tmp_path / "gone.jpg"), "file"), 100)


def test_read_bytes_refuses_files_over_the_limit_with_both_sizes(tmp_path: Path) -> None:
    path = write(tmp_path / "big.jpg", b"x" * 100)
    with pytest.raises(ReadError) as raised:
        read_bytes(InputItem(str(path), "file"), 10)
    assert str(raised.value) == "file is 100 bytes, over the limit of 10"
    assert read_bytes(InputItem(str(path), "file"), 100) == b"x" * 100


def test_permission_error_while_opening_is_reported_as_permission_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "locked.jpg")

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("gradcam_engine.engine.storage.open", refuse, raising=False)
    with pytest.raises(ReadError, match="^permission denied$"):
        read_bytes(InputItem(str(path), "file"), 100)


def test_path_list_that_is_not_text_is_an_input_error(tmp_path: Path) -> None:
    listing_file = write(tmp_path / "run.txt", b"\xff\xfe\x00binary")
    with pytest.raises(InputError, match=r"run\.txt: cannot read the path list"):
        list_inputs([str(listing_file)])


def test_read_bytes_does_not_block_on_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ReadError, match="^not a regular file$"):
        read_bytes(InputItem(str(fifo), "file"), 100)


def test_read_bytes_refuses_tar_members_over_the_limit(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as archive:
        add_member(archive, "big.jpg", b"x" * 100)
    with pytest.raises(ReadError, match="^file is 100 bytes, over the limit of 10$"):
        read_bytes(InputItem(f"{shard}::big.jpg", "tar"), 10)


def test_read_bytes_of_a_missing_tar_or_member_says_which(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as archive:
        add_member(archive, "a.jpg", b"a")
    with pytest.raises(ReadError, match="^no such member in the tar archive$"):
        read_bytes(InputItem(f"{shard}::b.jpg", "tar"), 10)
    with pytest.raises(ReadError, match="^no such file$"):
        read_bytes(InputItem(f"{tmp_path}/gone.tar::a.jpg", "tar"), 10)


def test_tar_members_read_concurrently_from_many_threads_are_intact(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar"
    contents = {f"img{index:03d}.jpg": os.urandom(1000 + index * 37) for index in range(200)}
    with tarfile.open(shard, "w") as archive:
        for name, data in contents.items():
            add_member(archive, name, data)
    items = list_inputs([str(shard)]).items * 5
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda item: read_bytes(item, 1 << 20), items))
    assert results == [contents[split_tar_key(item.key)[1]] for item in items]


def test_a_tar_rewritten_in_place_is_reopened(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar"
    item = InputItem(f"{shard}::a.jpg", "tar")
    with tarfile.open(shard, "w") as archive:
        add_member(archive, "a.jpg", b"old")
    assert read_bytes(item, 100) == b"old"
    shard.unlink()
    with tarfile.open(shard, "w") as archive:
        add_member(archive, "padding.jpg", b"p" * 3000)
        add_member(archive, "a.jpg", b"new content")
    assert read_bytes(item, 100) == b"new content"
