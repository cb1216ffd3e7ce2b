"""Port-forward for VM pods: the pod namespace's localhost reaches the guest's.

containerd serves CRI PortForward (``crictl``/``kubectl port-forward``) by
entering the pod's network namespace on the host and dialing
``localhost:<port>`` there, as if the containers ran in it. With husk they
run in the VM, so nothing listens in that namespace. The shim therefore
keeps, inside it, one listener on 127.0.0.1 and one iptables rule that
redirects every other TCP connection to 127.0.0.1 onto that listener. The
listener reads the port the connection was meant for (SO_ORIGINAL_DST) and
splices it, through the agent, to the same port on the guest's loopback.
Nothing changes in containerd; the rule is deleted with the pod (and the
namespace goes with the pod anyway). Only loopback traffic inside the pod's
namespace is touched: nothing else runs there, and the pod's own traffic
goes through the taps, never through the namespace's stack.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable
from typing import Protocol

from shim import errors
from shim.network.netns import NetnsError, run_in_netns
from shim.util.tasks import cancel_and_wait

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80
IPTABLES = "iptables"
IPTABLES_WAIT_S = 5
IPTABLES_TIMEOUT_S = 15.0
RULE_COMMENT = "husk port-forward"
LISTEN_BACKLOG = 64
MAX_CONNECTIONS = 64
CHUNK = 64 * 1024
# A connection that stops moving in both directions is still the user's
# (kubectl port-forward holds idle connections for hours); no idle timeout.


class AgentStream(Protocol):
    async def write(self, data: bytes) -> None: ...
    async def done_writing(self) -> None: ...
    async def read(self) -> bytes: ...
    def cancel(self) -> None: ...


class PortForwardError(Exception):
    """The forwarder cannot be set up in the pod's namespace."""


def _rule(listen_port: int) -> list[str]:
    return ["OUTPUT", "-o", "lo", "-p", "tcp", "-d", "127.0.0.1/32", "!", "--dport",
            str(listen_port), "-m", "comment", "--comment", RULE_COMMENT,
            "-j", "REDIRECT", "--to-ports", str(listen_port)]


def _iptables(action: str, listen_port: int) -> None:
    """Run iptables in the calling thread's namespace (a child inherits it)."""
    argv = [IPTABLES, "-w", str(IPTABLES_WAIT_S), "-t", "nat", action, *_rule(listen_port)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=IPTABLES_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PortForwardError(f"{' '.join(argv[:4])}: {exc}") from exc
    if done.returncode != 0:
        raise PortForwardError(f"iptables {action} failed: {done.stderr.strip()[:300]}")


def remove_rule(listen_port: int) -> None:
    """Delete the redirect to ``listen_port``; in the pod's namespace."""
    _iptables("-D", listen_port)


def _listen_and_redirect() -> socket.socket:
    """In the pod's namespace: the listener, and the rule that sends localhost to it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
        _iptables("-A", listener.getsockname()[1])
    except BaseException:
        listener.close()
        raise
    return listener


def original_port(sock: socket.socket) -> int:
    """The port a redirected connection was dialed to (its own port if not redirected)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port: int = struct.unpack_from("!H", raw, 2)[0]
    return port


class PortForwarder:
    """The pod namespace's localhost, forwarded to the guest's."""

    def __init__(self, netns_path: str, open_stream: Callable[[int], AgentStream],
                 name: str) -> None:
        self.netns_path = netns_path
        self._open_stream = open_stream
        self._name = name
        self._listener: socket.socket | None = None
        self.listen_port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """:raise PortForwardError: no iptables, or the namespace refused the rule."""
        if shutil.which(IPTABLES) is None:
            raise PortForwardError(f"{IPTABLES} is not installed (Debian package iptables)")
        try:
            self._listener = await run_in_netns(self.netns_path, _listen_and_redirect,
                                                IPTABLES_TIMEOUT_S + 5, "port-forward",
                                                lambda sock: sock.close())
        except (NetnsError, TimeoutError) as exc:
            raise PortForwardError(str(exc) or "timed out") from exc
        except OSError as exc:  # no loopback in the namespace
            raise PortForwardError(f"cannot listen on 127.0.0.1 in {self.netns_path}: "
                                   f"{exc.strerror}") from exc
        self.listen_port = self._listener.getsockname()[1]
        self._server = await asyncio.start_server(self._serve, sock=self._listener)
        log.info("%s: port-forward listening on 127.0.0.1:%d in %s", self._name,
                 self.listen_port, self.netns_path)

    async def stop(self) -> None:
        """Close the listener and every connection, and delete the rule; never raises."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._listener is None:
            return
        port = self.listen_port
        self._listener.close()  # the server closed it already; closing twice is harmless
        self._listener = None
        try:
            await run_in_netns(self.netns_path, lambda: remove_rule(port),
                               IPTABLES_TIMEOUT_S + 5, "port-forward-stop")
        except Exception as exc:  # noqa: BLE001 - teardown goes on
            # The namespace is usually still there (CNI DEL comes after the shim).
            log.info("%s: port-forward rule not removed: %s", self._name, exc)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= MAX_CONNECTIONS:
            log.warning("%s: port-forward refused: %d connections open", self._name,
                        MAX_CONNECTIONS)
            writer.close()
            return
        self._connections.add(task)
        try:
            port = original_port(writer.get_extra_info("socket"))
            log.info("%s: port-forward to guest port %d", self._name, port)
            stream = self._open_stream(port)
            try:
                await _splice(reader, writer, stream)
            finally:
                stream.cancel()
        except (errors.HuskError, OSError) as exc:
            log.info("%s: port-forward ended: %s", self._name, exc)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  stream: AgentStream) -> None:
    async def to_guest() -> None:
        while data := await reader.read(CHUNK):
            await stream.write(data)
        await stream.done_writing()

    await stream.write(b"")  # opens the stream: the agent connects now
    sending = asyncio.create_task(to_guest())
    try:
        while data := await stream.read():
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    finally:
        await cancel_and_wait(sending, errors.HuskError, OSError)
