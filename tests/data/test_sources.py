"""Every --source format reads to the same images; bad sources fail with one clear message."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import threading
from functools import partial

import numpy as np
import pytest
from conftest import free_port, make_tar, write_canonical_batches

from cifar.data import sources
from cifar.data.sources import CIFAR10_CLASSES, download_cifar10, load_source
from cifar.errors import CifarError


def fingerprints(images, labels):
    return sorted(hashlib.md5(image.tobytes()).hexdigest() + str(label) for image, label in zip(images, labels))


def assert_same(raw, reference):
    # Canonical batches hold decoded pixels in another order: compare as sorted sets per split.
    for split in ("train", "test"):
        a_img, a_lab = getattr(raw, f"{split}_images"), getattr(raw, f"{split}_labels")
        b_img, b_lab = getattr(reference, f"{split}_images"), getattr(reference, f"{split}_labels")
        assert a_img.shape == b_img.shape and a_img.dtype == np.uint8
        assert fingerprints(a_img, a_lab) == fingerprints(b_img, b_lab)
    assert raw.classes == CIFAR10_CLASSES


def test_imagefolder_tree(mini_raw):
    assert mini_raw.train_images.shape == (500, 32, 32, 3)
    assert mini_raw.test_images.shape == (200, 32, 32, 3)
    assert np.bincount(mini_raw.train_labels).tolist() == [50] * 10
    assert np.bincount(mini_raw.test_labels).tolist() == [20] * 10
    assert mini_raw.train_images.std() > 30  # real photos, not blank arrays


@pytest.mark.parametrize(
    "fmt", ["canonical_archive", "canonical_folder", "canonical_parent", "imagefolder_archive", "imagefolder_parent"]
)
def test_every_source_format_reads_the_same_images(fmt, request, tmp_path, mini_raw, mini_dir):
    if fmt == "canonical_parent":  # an extracted archive: the folder that holds cifar-10-batches-py/
        source = request.getfixturevalue("canonical_folder").parent
    elif fmt == "imagefolder_parent":  # a folder whose one child is the ImageFolder root
        source = tmp_path / "wrap"
        shutil.copytree(mini_dir, source / "cifar10-mini")
    else:
        source = request.getfixturevalue(fmt)
    raw = load_source(str(source), tmp_path, workers=2)
    assert_same(raw, mini_raw)


@pytest.mark.parametrize("fmt", ["imagefolder_archive", "imagefolder_tree"])
def test_parallel_decoding_keeps_every_image_in_order(fmt, request, monkeypatch, tmp_path, mini_raw, mini_dir):
    """Chunks smaller than the fixture: decoding runs in a process pool while the archive still
    streams in, and the images come back identical, in the serial read's order."""
    monkeypatch.setattr(sources, "_DECODE_CHUNK", 64)
    source = request.getfixturevalue("imagefolder_archive") if fmt == "imagefolder_archive" else mini_dir
    raw = load_source(str(source), tmp_path, workers=2)
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(raw, f"{split}_images"), getattr(mini_raw, f"{split}_images"))
        np.testing.assert_array_equal(getattr(raw, f"{split}_labels"), getattr(mini_raw, f"{split}_labels"))


def test_imagefolder_archive_truncated_while_decoding(monkeypatch, tmp_path, imagefolder_archive):
    monkeypatch.setattr(sources, "_DECODE_CHUNK", 64)  # chunks already decoding when the stream breaks
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(imagefolder_archive.read_bytes()[: imagefolder_archive.stat().st_size * 2 // 3])
    with pytest.raises(CifarError, match="truncated or corrupt"):
        load_source(str(cut), tmp_path, workers=2)


@pytest.fixture
def http_mirror(tmp_path, canonical_archive):
    """A CIFAR-10 mirror on 127.0.0.1 serving the canonical-format archive."""
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(canonical_archive, root / "cifar-10-python.tar.gz")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz", root / "cifar-10-python.tar.gz"
    server.shutdown()


def test_download_verifies_checksum_and_reads(http_mirror, tmp_path, mini_raw):
    url, served = http_mirror
    md5 = hashlib.md5(served.read_bytes()).hexdigest()
    archive = download_cifar10(tmp_path / "dl", url=url, md5=md5)
    assert archive.read_bytes() == served.read_bytes()
    raw = load_source(str(archive), tmp_path)
    assert_same(raw, mini_raw)


def test_download_through_source_cifar10_uses_mirror(http_mirror, tmp_path, monkeypatch, mini_raw):
    url, served = http_mirror
    monkeypatch.setenv("CIFAR10_URL", url)
    monkeypatch.setenv("CIFAR10_MD5", hashlib.md5(served.read_bytes()).hexdigest())
    raw = load_source("cifar10", tmp_path / "dl")
    assert raw.source_format == "cifar10-python-archive"
    assert_same(raw, mini_raw)


def test_download_with_wrong_checksum_is_deleted(http_mirror, tmp_path):
    url, _ = http_mirror
    with pytest.raises(CifarError, match="checksum.*deleted"):
        download_cifar10(tmp_path / "dl", url=url, md5="0" * 32)
    assert not (tmp_path / "dl" / "cifar-10-python.tar.gz").exists()


def test_download_unreachable_server_says_what_to_do(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/cifar-10-python.tar.gz"
    with pytest.raises(CifarError, match="--source PATH"):
        download_cifar10(tmp_path, url=url, md5="0" * 32)


def test_missing_source(tmp_path):
    with pytest.raises(CifarError, match="does not exist"):
        load_source(str(tmp_path / "nope"), tmp_path)


def test_truncated_archive(tmp_path, canonical_archive):
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(canonical_archive.read_bytes()[: canonical_archive.stat().st_size // 2])
    with pytest.raises(CifarError, match="truncated or corrupt"):
        load_source(str(cut), tmp_path)


def test_not_an_archive(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not an archive" * 100)
    with pytest.raises(CifarError, match="neither a folder nor"):
        load_source(str(junk), tmp_path)


def test_imagefolder_missing_class(tmp_path, mini_dir):
    tree = shutil.copytree(mini_dir, tmp_path / "tree")
    shutil.rmtree(tree / "test" / "frog")
    with pytest.raises(CifarError, match="test/.*missing frog"):
        load_source(str(tree), tmp_path)


def test_imagefolder_extra_class(tmp_path, mini_dir):
    tree = shutil.copytree(mini_dir, tmp_path / "tree")
    shutil.copytree(tree / "train" / "cat", tree / "train" / "lion")
    with pytest.raises(CifarError, match="unexpected lion"):
        load_source(str(tree), tmp_path)


def test_unreadable_images_are_all_named(tmp_path, mini_dir):
    tree = shutil.copytree(mini_dir, tmp_path / "tree")
    (tree / "train" / "cat" / "0000.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tree / "test" / "dog" / "0001.jpg").write_bytes(b"")
    with pytest.raises(CifarError, match=r"2 unreadable image\(s\)") as info:
        load_source(str(tree), tmp_path, workers=2)
    assert "train/cat/0000.jpg" in str(info.value) and "test/dog/0001.jpg" in str(info.value)


def test_canonical_batch_with_code_is_refused(tmp_path, mini_raw):
    """A batch file whose unpickling would run code is refused, and the code never runs."""
    folder = write_canonical_batches(tmp_path / "cifar-10-batches-py", mini_raw)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(CifarError, match="not a valid CIFAR-10 python batch"):
        load_source(str(folder), tmp_path)
    assert not marker.exists()


def test_archive_without_images(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "readme.txt").write_text("hello")
    archive = make_tar(tmp_path / "x.tar.gz", tmp_path / "stuff", "stuff")
    with pytest.raises(CifarError, match="holds no ImageFolder tree"):
        load_source(str(archive), tmp_path)


def crafted_archive(tmp_path, mini_dir, add) -> str:
    """The real fixture tree as a tar.gz, plus one hostile member from ``add(tar)``."""
    import io
    import tarfile

    path = tmp_path / "crafted.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(mini_dir, arcname="cifar10-mini")
        add(tar, tarfile, io)
    return str(path)


def _symlink(tar, tarfile, io):
    info = tarfile.TarInfo("cifar10-mini/train/cat/evil.jpg")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(info)


def _hardlink(tar, tarfile, io):
    info = tarfile.TarInfo("cifar10-mini/train/cat/hard.jpg")
    info.type, info.linkname = tarfile.LNKTYPE, "cifar10-mini/train/cat/0000.jpg"
    tar.addfile(info)


def _escape(tar, tarfile, io):
    data = b"\xff\xd8 not really a jpeg"
    info = tarfile.TarInfo("../../escaped/train/cat/0001.jpg")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _absolute(tar, tarfile, io):
    data = b"x"
    info = tarfile.TarInfo("/tmp/absolute/train/cat/0001.jpg")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _device(tar, tarfile, io):
    info = tarfile.TarInfo("cifar10-mini/train/cat/dev.jpg")
    info.type = tarfile.CHRTYPE
    tar.addfile(info)


@pytest.mark.parametrize(
    "add, message",
    [
        (_symlink, "holds a link"),
        (_hardlink, "holds a link"),
        (_escape, r"outside the\s+destination"),
        (_absolute, "absolute path"),
        (_device, "special file"),
    ],
    ids=["symlink", "hardlink", "dotdot", "absolute", "device"],
)
def test_crafted_archives_are_refused(tmp_path, mini_dir, add, message):
    archive = crafted_archive(tmp_path, mini_dir, add)
    with pytest.raises(CifarError, match=f"is refused: .*{message}"):
        load_source(archive, tmp_path / "data")
    assert not (tmp_path / "escaped").exists() and not list((tmp_path / "data").glob("cache*"))
