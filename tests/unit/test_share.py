"""SharedDir on real mounts: the guest's view is read-only around its mounts, and
the shim never follows a path that someone else could have changed."""
from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import errors
from shim.storage.share import RootfsMount, SharedDir
from shim.util import mount as mnt

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def _umount(path: Path) -> None:
    fd = os.open(path, os.O_PATH)
    try:
        mnt.detach(fd)
    finally:
        os.close(fd)


def _table() -> set[tuple[int, str]]:
    return {(m.mount_id, m.point) for m in mnt.mount_table()}


@pytest.fixture
def share(tmp_path: Path) -> Iterator[SharedDir]:
    before = _table()
    sd = SharedDir(tmp_path / "sb" / "pod1")
    sd.create()
    yield sd
    sd.destroy()
    assert mnt.mounts_under(tmp_path) == [], "the test left mounts behind"
    assert _table() == before, "a mount outside the share changed"


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    src = tmp_path / "image"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("image\n")
    return src


def test_view_is_read_only_around_the_mounts(share: SharedDir, rootfs: Path) -> None:
    guest = share.bind_rootfs("c1", rootfs)
    assert guest == "/run/husk/shared/c1/rootfs"
    view = share.host_dir
    # What virtiofsd would do for the guest: the container's own rootfs is writable...
    (view / "c1" / "rootfs" / "new").write_text("x")
    assert (rootfs / "new").read_text() == "x"
    # ...the structure around it is not.
    for attack in (lambda: (view / "planted").write_text("x"),
                   lambda: (view / "c1").rename(view / "moved"),
                   lambda: os.symlink("/", view / "c2"),
                   lambda: (view / "c1" / "rootfs").rename(view / "c1" / "gone"),
                   lambda: os.mkdir(view / "c1" / "volumes")):
        with pytest.raises(OSError) as exc:
            attack()
        assert exc.value.errno == errno.EROFS
    share.release("c1")
    assert not (share.mounts_dir / "c1").exists()
    assert (rootfs / "etc" / "hostname").read_text() == "image\n", "release touched the image"


def test_read_only_volume_is_read_only_in_the_view(share: SharedDir, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    share.share_path("c1", 0, vol, readonly=True)
    share.share_path("c1", 1, vol, readonly=False)
    with pytest.raises(OSError) as exc:
        (share.host_dir / "c1" / "volumes" / "0" / "f").write_text("x")
    assert exc.value.errno == errno.EROFS
    (share.host_dir / "c1" / "volumes" / "1" / "f").write_text("x")
    assert (vol / "f").read_text() == "x"
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    guest = share.share_path("c1", 2, hosts, readonly=True)
    assert guest == "/run/husk/shared/c1/volumes/2"
    assert (share.host_dir / "c1" / "volumes" / "2").read_text() == "127.0.0.1 localhost\n"
    share.release("c1")
    assert (vol / "f").exists() and hosts.exists()


def test_swapped_directory_is_not_followed_at_release(share: SharedDir, rootfs: Path,
                                                      tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Even if the structure could be swapped (it cannot from the guest), release
    unmounts nothing the swap points at: the path is not followed."""
    share.bind_rootfs("c1", rootfs)
    outside = tmp_path / "outside"
    outside.mkdir()
    mnt.mount("tmpfs", outside, "tmpfs")
    try:
        cdir = share.mounts_dir / "c1"
        cdir.rename(share.mounts_dir / "moved")
        os.symlink(tmp_path, cdir)  # c1/rootfs -> .../image is not a mount of ours
        before = _table()
        with caplog.at_level(logging.ERROR):
            share.release("c1")
        assert _table() == before, "release unmounted something through the symlink"
        assert "cannot unmount mounts/c1/rootfs" in caplog.text
        os.unlink(cdir)
        (share.mounts_dir / "moved").rename(cdir)
    finally:
        _umount(outside)
    share.release("c1")
    assert mnt.mounts_under(share.mounts_dir / "c1") == []


def test_symlink_planted_at_a_target_is_refused(share: SharedDir, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    vol = tmp_path / "vol"
    vol.mkdir()
    (share.mounts_dir / "c1" / "volumes").mkdir(parents=True)
    os.symlink(victim, share.mounts_dir / "c1" / "volumes" / "0")
    before = _table()
    with pytest.raises(errors.InternalError, match="cannot share"):
        share.share_path("c1", 0, vol, readonly=False)
    assert _table() == before
    os.unlink(share.mounts_dir / "c1" / "volumes" / "0")
    # A planted symlink on the way (the container dir itself) is refused too.
    os.rmdir(share.mounts_dir / "c1" / "volumes")
    os.rmdir(share.mounts_dir / "c1")
    os.symlink(victim, share.mounts_dir / "c1")
    with pytest.raises(errors.InternalError):
        share.bind_rootfs("c1", vol)
    assert _table() == before and list(victim.iterdir()) == []
    os.unlink(share.mounts_dir / "c1")


def test_a_foreign_mount_in_place_of_ours_is_left_alone(share: SharedDir, rootfs: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    share.bind_rootfs("c1", rootfs)
    target = share.mounts_dir / "c1" / "rootfs"
    _umount(target)
    mnt.mount("tmpfs", target, "tmpfs")  # same path, not the mount we made
    with caplog.at_level(logging.ERROR):
        share.release("c1")
    assert "not ours" in caplog.text
    assert [str(p) for p in mnt.mounts_under(target)] == [str(target)]
    _umount(target)


def test_a_dead_shims_share_is_unmounted_from_its_records(tmp_path: Path, rootfs: Path) -> None:
    before = _table()
    run_dir = tmp_path / "sb" / "pod2"
    first = SharedDir(run_dir)
    first.create()
    first.bind_rootfs("c1", rootfs)
    first.share_path("c1", 0, rootfs, readonly=True)
    del first  # the daemon is gone; `delete` starts from the files
    again = SharedDir.load(run_dir)
    assert len(again.records) == 4
    again.release("c1")
    assert again.destroy() == []
    assert _table() == before


def test_overlay_with_many_long_lowerdirs_is_compacted(share: SharedDir, tmp_path: Path) -> None:
    layers = []
    for i in range(120):  # ~ 9 KiB of lowerdir: more than mount(2)'s page
        layer = tmp_path / ("layer-with-a-rather-long-snapshot-like-name-" + "x" * 20) / str(i)
        layer.mkdir(parents=True)
        (layer / f"f{i}").write_text(str(i))
        layers.append(str(layer))
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    options = (f"lowerdir={':'.join(layers)}", f"upperdir={upper}", f"workdir={work}")
    assert len(",".join(options)) > 4096
    share.mount_rootfs("c1", [RootfsMount("overlay", "overlay", options)])
    root = share.host_dir / "c1" / "rootfs"
    assert (root / "f0").read_text() == "0" and (root / "f119").read_text() == "119"
    (root / "written").write_text("up")
    assert (upper / "written").read_text() == "up"
    share.release("c1")
