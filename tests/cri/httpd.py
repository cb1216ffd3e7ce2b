"""A web server in a pod (busybox httpd) and a client for it, for the network tests."""
from __future__ import annotations

import socket
import time

from tests.cri.cri import CriClient, Pod
from tests.cri.images import BUSYBOX_REF

HTTP_PORT = 8080
# busybox httpd in the foreground, serving "hello from <hostname>".
HTTPD = ("mkdir -p /www && echo \"hello from $(hostname)\" > /www/index.html && "
         f"exec httpd -f -p {HTTP_PORT} -h /www")


def start_httpd(cri: CriClient, pod: Pod) -> str:
    """The httpd container's id, once it listens (the container starts before httpd binds)."""
    cid = cri.run_container(pod, BUSYBOX_REF, ["sh", "-c", HTTPD])
    for _ in range(100):
        if f":{HTTP_PORT} " in cri.exec_sync(cid, ["netstat", "-ltn"], timeout=30).out:
            return cid
        time.sleep(0.1)
    raise AssertionError("httpd did not start listening")


def http_get(sock: socket.socket) -> str:
    """GET / on a connected socket; the whole answer, headers included."""
    with sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")
