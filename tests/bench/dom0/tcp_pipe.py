"""Runs in the dom0s of a testbed pair: a migration stream over one plain TCP connection, the
bench's transport across the link where ssh in an emulated dom0 carries too little
(tests/bench/link_bench.py).

    tcp_pipe.py serve [--buffer BYTES] PORT ACCEPT_S -- COMMAND...
        accepts one connection on PORT (within ACCEPT_S seconds) and runs COMMAND with its stdin
        and stdout on it (the receiver: ``xl migrate-receive`` behind the bench's tap); exits
        with COMMAND's status
    tcp_pipe.py connect [--buffer BYTES] HOST PORT
        the sender's end, for ``xl migrate -s "" GUEST "tcp_pipe.py connect HOST PORT"``: stdin
        to the connection, the connection to stdout (the receiver's answers), until the
        receiver closes it

Both directions matter: the stream goes one way, the receiver's ready and done messages the
other. Nothing is encrypted or checked beyond TCP: a test link between two testbed dom0s only.

``--buffer BYTES`` sizes the connection's kernel buffers (SO_SNDBUF and SO_RCVBUF, which Linux
doubles for its bookkeeping, tcp(7)) and the copies' chunks to the link instead of leaving them to
the kernel's autotuning, which grows them to megabytes (net.ipv4.tcp_wmem, tcp_rmem): right for a
fast link, but on a slow one megabytes queued at the suspend are seconds of downtime.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

CHUNK = 1 << 20
CONNECT_RETRY_S = 60.0
"""The receiver is started just before the sender: refused connections are retried this long."""


def size_buffers(connection: socket.socket, buffer: int | None) -> None:
    """Before listen() or connect(): the window scale is agreed in the handshake."""
    if buffer is not None:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)


def serve(port: int, accept_s: float, command: list[str], buffer: int | None = None) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        size_buffers(server, buffer)  # an accepted connection inherits them
        server.bind(("", port))
        server.listen(1)
        server.settimeout(accept_s)
        try:
            connection, _ = server.accept()
        except TimeoutError:
            print(f"tcp_pipe: no connection on port {port} within {accept_s:g} s", file=sys.stderr)
            return 1
    with connection:
        connection.settimeout(None)
        stream = connection.fileno()
        return subprocess.run(command, stdin=stream, stdout=stream, check=False).returncode


def copy(source: int, sink: int, chunk_bytes: int = CHUNK) -> None:
    while chunk := os.read(source, chunk_bytes):
        view = memoryview(chunk)
        while len(view):
            view = view[os.write(sink, view):]


def connect(host: str, port: int, buffer: int | None = None) -> int:
    deadline = time.monotonic() + CONNECT_RETRY_S
    address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
    while True:
        connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        size_buffers(connection, buffer)
        try:
            connection.connect(address)
            break
        except ConnectionRefusedError:
            connection.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with connection:
        def send() -> None:
            copy(sys.stdin.fileno(), connection.fileno(), min(CHUNK, buffer or CHUNK))
            connection.shutdown(socket.SHUT_WR)

        # the sender's stream in a thread of its own; the receiver's answers here, until it closes
        threading.Thread(target=send, daemon=True).start()
        copy(connection.fileno(), sys.stdout.fileno())
    return 0


def main() -> int:
    arguments = sys.argv[1:]
    buffer = None
    if len(arguments) >= 3 and arguments[1] == "--buffer" and arguments[2].isdigit():
        buffer = int(arguments[2]) or None  # 0: the kernel's own
        arguments = [arguments[0], *arguments[3:]]
    if len(arguments) >= 5 and arguments[0] == "serve" and arguments[3] == "--":
        return serve(int(arguments[1]), float(arguments[2]), arguments[4:], buffer)
    if len(arguments) == 3 and arguments[0] == "connect":
        return connect(arguments[1], int(arguments[2]), buffer)
    print("usage: tcp_pipe.py serve [--buffer BYTES] PORT ACCEPT_S -- COMMAND... | "
          "connect [--buffer BYTES] HOST PORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
