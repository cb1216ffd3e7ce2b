"""The daemon's socket file: claimed by identity at start, removed at exit only if still ours."""
from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.daemon import SOCKET_MODE, SocketFile, _socket_path, claim_socket_file, unlink_socket_file


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Not tmp_path: unix socket paths must stay under 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="husk-daemon-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def bound(sock_dir: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(sock_dir / "shim.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o000)  # as loose as a careless binder could leave it
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    yield path, sock
    sock.close()


def mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_claim_records_identity_and_tightens_the_mode(bound: tuple[str, socket.socket]) -> None:
    path, sock = bound
    assert mode(path) == 0o777
    owned = claim_socket_file(path)
    st = os.lstat(path)
    assert owned == SocketFile(path, st.st_dev, st.st_ino)
    assert mode(path) == SOCKET_MODE == 0o600
    assert _socket_path(sock) == path


def test_claim_keeps_an_already_private_socket(bound: tuple[str, socket.socket]) -> None:
    path, _ = bound
    os.chmod(path, 0o600)
    ctime = os.lstat(path).st_ctime_ns
    claim_socket_file(path)
    assert mode(path) == 0o600 and os.lstat(path).st_ctime_ns == ctime  # not touched


def test_claim_refuses_what_is_not_a_socket(sock_dir: Path) -> None:
    regular = sock_dir / "file"
    regular.write_text("")
    with pytest.raises(OSError, match="not a socket"):
        claim_socket_file(str(regular))
    target = sock_dir / "target"
    target.write_text("")
    target.chmod(0o644)
    (sock_dir / "link").symlink_to(target)
    with pytest.raises(OSError, match="not a socket"):
        claim_socket_file(str(sock_dir / "link"))
    assert mode(str(target)) == 0o644  # the symlink was not followed
    with pytest.raises(FileNotFoundError):
        claim_socket_file(str(sock_dir / "missing"))


def test_unlink_removes_our_socket(bound: tuple[str, socket.socket]) -> None:
    path, _ = bound
    owned = claim_socket_file(path)
    assert unlink_socket_file(owned)
    assert not os.path.lexists(path)
    assert not unlink_socket_file(owned)  # already gone: nothing to do, no error


def test_unlink_leaves_another_daemons_socket(
    bound: tuple[str, socket.socket], sock_dir: Path
) -> None:
    path, _ = bound
    owned = claim_socket_file(path)
    # Ours moves aside (still alive, so its inode cannot be reused) and another
    # daemon binds the same path.
    os.rename(path, sock_dir / "ours.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(path)
        assert not unlink_socket_file(owned)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_unlink_leaves_whatever_else_took_the_path(
    bound: tuple[str, socket.socket], sock_dir: Path
) -> None:
    path, _ = bound
    owned = claim_socket_file(path)
    os.rename(path, sock_dir / "ours.sock")
    Path(path).write_text("not a socket")
    assert not unlink_socket_file(owned)
    assert Path(path).read_text() == "not a socket"
    # Same dev/ino but no longer a socket would be refused too.
    st = os.lstat(path)
    assert not unlink_socket_file(SocketFile(path, st.st_dev, st.st_ino))
    assert os.path.exists(path)


def test_abstract_and_unbound_sockets_have_no_file() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unbound:
        assert _socket_path(unbound) is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as abstract:
        abstract.bind(f"\0husk-daemon-test-{os.getpid()}")
        assert _socket_path(abstract) is None
