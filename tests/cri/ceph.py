"""A throwaway single-node Ceph cluster for the rbd direct-volume tests.

One monitor and one memstore OSD, cephx on, no manager (rbd needs none), all
state in one temp dir, and every daemon and CLI call run inside a given
network namespace, bound to 127.0.0.1 there. The CRI tests pass containerd's
netns: husk's QEMU (librbd) runs in the shim's netns, which is containerd's,
so that is where "127.0.0.1:3300" must answer; the host network is untouched.

    with CephCluster.started(cd.netns_path, tmp_path) as ceph:
        ceph.create_image("rbd", "vol1", 64)
        key = ceph.client_key("qemu")

Settings, and why (measured with Ceph 18, re-checked on bookworm's 16.2):

- ``osd_class_dir`` absolute: Debian's default is relative to ``/`` (systemd's
  cwd); an OSD started anywhere else cannot load cls_rbd and ``rbd create``
  fails with "Operation not supported".
- keyrings, admin sockets and log files per daemon section, never global: a
  global keyring is also the OSD's (which then cannot fetch its config), and a
  global admin socket makes concurrent CLI calls collide.
- paxos tuning: each map change otherwise waits ~1 s (bring-up 8 s, not 2).
- ``osd_fast_shutdown = false``: a fast shutdown skips memstore's save, and a
  restarted OSD would come back without its PGs.
- ``mon_data_avail_warn``/``crit``: a busy CI disk must not warn or stop the mon.
- nothing gates on ``ceph health``: without a manager it never settles; the
  ready signal is ``rbd pool init`` returning (it waits for active PGs).
"""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MON_ID = "a"
OSD_ID = 0
MON_PORT = 3300         # msgr2: the port a record's "monitors" names
MON_LEGACY_PORT = 6789  # msgr1, for old clients
PG_NUM = 8
ADMIN_USER = "admin"
QEMU_USER = "qemu"
QEMU_POOL = "rbd"       # client.qemu may use this pool only
RADOS_CLASS_DIR = Path("/usr/lib/x86_64-linux-gnu/rados-classes")
MEMSTORE_BYTES = 1 << 30  # the OSD's "disk", in RAM: only what is written costs memory
# CLI calls on a machine busy with TCG guests and critest: generous, but bounded.
CLI_TIMEOUT_S = 120.0
CLIENT_MOUNT_TIMEOUT_S = 60  # the CLI's wait for the mon (librados' default is 300 s)
STOP_TIMEOUT_S = 10.0
STOP_POLL_S = 0.01
LOG_TAIL_LINES = 15
UNIX_PATH_MAX = 107
PROGRAMS = ("ceph-mon", "ceph-osd", "ceph", "rbd", "nsenter")
# A cephx secret as Ceph encodes it (CryptoKey): type AES, creation time, 16 bytes.
CEPHX_AES = 1
CEPHX_SECRET_BYTES = 16


class CephError(RuntimeError):
    """The cluster did not come up, or a CLI call failed; the message has the logs' tail."""


def missing_programs() -> list[str]:
    """The programs this helper needs that are not installed (ceph-mon, ceph-osd, ceph-common)."""
    return [p for p in PROGRAMS if shutil.which(p) is None]


def generate_key() -> str:
    """A fresh, well-formed cephx key (what ``ceph-authtool --gen-print-key`` prints)."""
    header = struct.pack("<HIIH", CEPHX_AES, int(time.time()), 0, CEPHX_SECRET_BYTES)
    return base64.b64encode(header + os.urandom(CEPHX_SECRET_BYTES)).decode()


@dataclass(frozen=True)
class CephUser:
    """An entity with its key and capabilities, as a keyring file section."""

    entity: str  # "mon.", "client.admin", "osd.0"
    key: str = field(default_factory=generate_key)
    caps: Mapping[str, str] = field(default_factory=dict)

    def keyring(self) -> str:
        lines = [f"[{self.entity}]", f"\tkey = {self.key}"]
        lines += [f'\tcaps {kind} = "{cap}"' for kind, cap in self.caps.items()]
        return "\n".join(lines) + "\n"


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs. A killed daemon's parent is PID 1, which may reap it
    late: a zombie counts as gone (``kill -0`` would still succeed on it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")),
                 "X")
    return state not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


@dataclass
class CephCluster:
    """One mon and one memstore OSD in ``dir``, listening on 127.0.0.1:3300 in ``netns``.

    Use ``started()``; ``stop()`` kills the daemons and removes the dir.
    """

    netns: Path
    dir: Path
    fsid: str = field(default_factory=lambda: str(uuid.uuid4()))
    users: dict[str, CephUser] = field(default_factory=dict)  # by entity
    timings: dict[str, float] = field(default_factory=dict)   # step -> seconds

    @classmethod
    @contextlib.contextmanager
    def started(cls, netns: Path, root: Path) -> Iterator[CephCluster]:
        """A running cluster in a new temp dir under ``root``, stopped and removed on exit."""
        cluster = cls(netns, Path(tempfile.mkdtemp(prefix="ceph-", dir=root)))
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()

    # -- paths and addresses ------------------------------------------------------

    @property
    def conf(self) -> Path:
        return self.dir / "ceph.conf"

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    @property
    def monitors(self) -> str:
        """The monitors as a direct-volume record names them ("host:port,...")."""
        return f"{LOOPBACK}:{MON_PORT}"

    def pid_file(self, daemon: str) -> Path:
        return self.run_dir / f"{daemon}.pid"

    # -- bring-up -----------------------------------------------------------------

    def start(self) -> None:
        """Create and start the cluster, up to a usable ``rbd`` pool.

        :raise CephError: a step failed (its output and the daemons' log tails).
        """
        begin = time.monotonic()
        if len(str(self.run_dir / f"osd.{OSD_ID}.asok")) > UNIX_PATH_MAX:
            raise CephError(f"{self.dir} is too long for the daemons' admin sockets")
        for sub in (self.run_dir, self.log_dir, self.dir / f"mon.{MON_ID}",
                    self.dir / f"osd.{OSD_ID}"):
            sub.mkdir(parents=True, exist_ok=True)
        self._add_users()
        self.conf.write_text(self._render_conf())
        self._step("mon mkfs", ["ceph-mon", "--mkfs", "-i", MON_ID,
                                "--keyring", str(self.dir / "mon.keyring")])
        self._step("mon start", ["ceph-mon", "-i", MON_ID])  # returns once it serves
        self._start_osd()
        self._step("pool create", ["ceph", "osd", "pool", "create", QEMU_POOL, str(PG_NUM),
                                   str(PG_NUM)])
        self._step("pool init", ["rbd", "pool", "init", QEMU_POOL])  # waits for active PGs
        self.timings["total"] = time.monotonic() - begin
        log.info("ceph cluster %s up in %.2fs (%s)", self.dir, self.timings["total"],
                 ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))

    def _add_users(self) -> None:
        """mon., client.admin and the least-privilege client.qemu, known to the mon at mkfs."""
        everything = {kind: "allow *" for kind in ("mon", "osd", "mgr", "mds")}
        rbd_only = {"mon": "profile rbd", "osd": f"profile rbd pool={QEMU_POOL}",
                    "mgr": f"profile rbd pool={QEMU_POOL}"}
        for user in (CephUser("mon.", caps={"mon": "allow *"}),
                     CephUser(f"client.{ADMIN_USER}", caps=everything),
                     CephUser(f"client.{QEMU_USER}", caps=rbd_only)):
            self.users[user.entity] = user
        self._write_secret(self.dir / "mon.keyring",
                           "".join(u.keyring() for u in self.users.values()))
        for user in self.users.values():
            if user.entity.startswith("client."):
                self._write_secret(self.dir / f"{user.entity}.keyring", user.keyring())

    def _start_osd(self) -> None:
        """Register osd.0 with its key (``osd new``), make its memstore, start it."""
        osd = CephUser(f"osd.{OSD_ID}")
        osd_uuid = str(uuid.uuid4())
        secret = self.dir / "osd-new.json"
        self._write_secret(secret, json.dumps({"cephx_secret": osd.key}))
        self._step("osd new", ["ceph", "osd", "new", osd_uuid, str(OSD_ID), "-i", str(secret)])
        secret.unlink()
        self._write_secret(self.dir / f"osd.{OSD_ID}" / "keyring", osd.keyring())
        self._step("osd mkfs", ["ceph-osd", "-i", str(OSD_ID), "--mkfs", "--osd-uuid", osd_uuid])
        self._step("osd start", ["ceph-osd", "-i", str(OSD_ID)])

    @staticmethod
    def _write_secret(path: Path, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def _render_conf(self) -> str:
        d = self.dir
        daemon = [f"admin_socket = {self.run_dir}/$name.asok", f"pid_file = {self.run_dir}/$name.pid",
                  f"log_file = {self.log_dir}/$name.log"]
        sections: dict[str, list[str]] = {
            "global": [
                f"fsid = {self.fsid}",
                f"mon_host = [v2:{LOOPBACK}:{MON_PORT},v1:{LOOPBACK}:{MON_LEGACY_PORT}]",
                f"mon_initial_members = {MON_ID}",
                f"public_addr = {LOOPBACK}", "public_network = 127.0.0.0/8",
                "cluster_network = 127.0.0.0/8", "ms_bind_ipv4 = true", "ms_bind_ipv6 = false",
                *(f"auth_{k}_required = cephx" for k in ("cluster", "service", "client")),
                "auth_allow_insecure_global_id_reclaim = false",
                f"run_dir = {self.run_dir}", f"crash_dir = {d}/crash",
                "osd_pool_default_size = 1", "osd_pool_default_min_size = 1",
                f"osd_pool_default_pg_num = {PG_NUM}", f"osd_pool_default_pgp_num = {PG_NUM}",
                "osd_pool_default_pg_autoscale_mode = off",
                "osd_crush_chooseleaf_type = 0",  # one host: replicas across OSDs, not hosts
                "mon_allow_pool_size_one = true", "mon_warn_on_pool_no_redundancy = false",
                "mon_data_avail_warn = 1", "mon_data_avail_crit = 0",
                "paxos_propose_interval = 0.05", "paxos_min_wait = 0.01",
            ],
            "mon": [f"mon_data = {d}/mon.$id", f"mon_cluster_log_file = {self.log_dir}/cluster.log",
                    *daemon],
            "osd": [f"osd_data = {d}/osd.$id", f"keyring = {d}/osd.$id/keyring", *daemon,
                    f"osd_class_dir = {RADOS_CLASS_DIR}", "osd_objectstore = memstore",
                    f"memstore_device_bytes = {MEMSTORE_BYTES}", "osd_fast_shutdown = false",
                    "osd_op_num_shards = 1", "osd_op_num_threads_per_shard = 2"],
            # The CLI: its own keyring, no admin socket, no log file outside the dir.
            "client": [f"keyring = {d}/$name.keyring", "admin_socket =",
                       f"log_file = {self.log_dir}/$name.$pid.log",
                       f"client_mount_timeout = {CLIENT_MOUNT_TIMEOUT_S}"],
        }
        return "".join(f"[{name}]\n" + "".join(f"{line}\n" for line in lines) + "\n"
                       for name, lines in sections.items())

    # -- commands -------------------------------------------------------------------

    def run(self, argv: Sequence[str], timeout: float = CLI_TIMEOUT_S,
            stdin: str | None = None) -> str:
        """Run a Ceph program with this cluster's conf in its netns; returns stdout.

        :raise CephError: it failed or timed out.
        """
        command = ["nsenter", f"--net={self.netns}", "--", argv[0], "-c", str(self.conf),
                   *argv[1:]]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  input=stdin, check=False, cwd=self.dir)
        except subprocess.TimeoutExpired as exc:
            raise CephError(f"{' '.join(argv)} timed out after {timeout:.0f}s"
                            f"{self._log_tails()}") from exc
        if done.returncode != 0:
            raise CephError(f"{' '.join(argv)} exited {done.returncode}: "
                            f"{(done.stderr or done.stdout).strip()[-2000:]}{self._log_tails()}")
        return done.stdout

    def _step(self, name: str, argv: Sequence[str]) -> None:
        begin = time.monotonic()
        self.run(argv)
        self.timings[name] = time.monotonic() - begin

    def _log_tails(self) -> str:
        tails = []
        for daemon in (f"mon.{MON_ID}", f"osd.{OSD_ID}"):
            with contextlib.suppress(OSError):
                lines = (self.log_dir / f"{daemon}.log").read_text(errors="replace").splitlines()
                tails.append(f"\n--- {daemon}.log ---\n" + "\n".join(lines[-LOG_TAIL_LINES:]))
        return "".join(tails)

    # -- images and users -----------------------------------------------------------

    def create_image(self, pool: str, name: str, size_mib: int) -> None:
        self.run(["rbd", "create", "--size", f"{size_mib}M", f"{pool}/{name}"])

    def remove_image(self, pool: str, name: str) -> None:
        self.run(["rbd", "rm", "--no-progress", f"{pool}/{name}"])

    def export_image(self, pool: str, name: str, dest_file: Path) -> Path:
        """The image's content, copied to ``dest_file`` (which must not exist)."""
        self.run(["rbd", "export", "--no-progress", f"{pool}/{name}", str(dest_file)])
        return dest_file

    def client_key(self, user: str) -> str:
        """The cephx key of ``client.<user>`` (``qemu``: caps ``profile rbd pool=rbd``)."""
        known = self.users.get(f"client.{user}")
        if known is not None:
            return known.key
        return self.run(["ceph", "auth", "get-key", f"client.{user}"]).strip()

    # -- processes and teardown -----------------------------------------------------

    def daemon_pids(self) -> dict[str, int]:
        """The running daemons by name ("mon.a", "osd.0"), from their pid files."""
        pids = {}
        for daemon in (f"osd.{OSD_ID}", f"mon.{MON_ID}"):  # the order stop() kills them in
            with contextlib.suppress(OSError, ValueError):
                pid = int(self.pid_file(daemon).read_text().strip())
                if self._ours(pid):
                    pids[daemon] = pid
        return pids

    def rss_bytes(self) -> dict[str, int]:
        """Each daemon's resident memory."""
        found = {}
        for daemon, pid in self.daemon_pids().items():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        found[daemon] = int(line.split()[1]) * 1024
        return found

    def processes(self) -> list[int]:
        """Every live process started with this cluster's conf (daemons, stray CLI calls)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and self._ours(int(entry.name)):
                found.append(int(entry.name))
        return found

    def _ours(self, pid: int) -> bool:
        return str(self.conf) in _cmdline(pid) and _alive(pid)

    def stop(self) -> None:
        """Kill the daemons (the OSD first: one outliving its mon waits for it) and
        anything else on this conf, then remove the dir. Safe to call twice."""
        for pid in [*self.daemon_pids().values(), *self.processes()]:
            self._kill(pid)
        if self.processes():
            raise CephError(f"ceph processes {self.processes()} survived SIGKILL")
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _kill(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(STOP_POLL_S)
