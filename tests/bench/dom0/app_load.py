"""Runs in dom0 (Python's standard library only): the guest's application, nginx or PostgreSQL,
under a steady load, reported second by second by the client itself, for the guest's-view bench
(tests/bench/guestview_bench.py).

    app_load.py http ADDRESS PORT OUT.jsonl STOP_FILE MAX_S NFILES HOT_FRACTION SKEW SEED
                CONNECTIONS SLOW_MS
    app_load.py postgresql ADDRESS PORT OUT.jsonl STOP_FILE MAX_S NROWS HOT_FRACTION SKEW SEED
                CONNECTIONS SLOW_MS DATABASE USER

CONNECTIONS keep-alive HTTP/1.1 connections, each with one request outstanding at a time (as
wrk's connections), drawn as testbed/distro/hot-set.lua draws them: file i = floor(hot * u^SKEW)
of the first HOT_FRACTION of the NFILES files f00000... (Python's generator seeded with SEED, so
the same sequence in every run; not Lua's sequence, the same distribution). Until STOP_FILE
exists or MAX_S passed, one JSON line a second to OUT.jsonl (``Interval.record``): its start and
end on dom0's monotonic clock (the clock measure.py's moments are on), the requests completed in
it, their latency p50/p99/max (a request's latency: from its send to its last byte, as wrk's),
those slower than SLOW_MS ("slow", as hot-set.lua counts them) and the errors.

Errors: a refused or failed connection, a reply that is not 200, a connection closed mid-reply,
and a request unanswered for REQUEST_TIMEOUT_S (wrk's --timeout in the e2e). After an error the
connection is closed and made again after RECONNECT_S; a new connection that does not complete
within CONNECT_TIMEOUT_S is tried again, so that once a paused guest runs again a SYN reaches it
within about a second (a connection left to the kernel's SYN back-off could wait half a minute
more, and the figure would be dom0's TCP timers, not the guest).

PostgreSQL (``PgConnection``): each request is ``SELECT abalance FROM pgbench_accounts WHERE aid =
N`` (the table ``pgbench -i`` makes, NROWS rows), N drawn as the files are (row N is "file" N-1).
Frontend/backend protocol 3.0, simple queries, ``trust`` authentication only (the testbed's guest
allows it from dom0's bridge): a startup message, then each query answered up to its
ReadyForQuery. An ErrorResponse is an error like a reply that is not 200.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import selectors
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

REQUEST_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 2.0
RECONNECT_S = 0.5
INTERVAL_S = 1.0
RECV_BYTES = 1 << 18
HEADER_END = b"\r\n\r\n"


class HotSet:
    """hot-set.lua's draw: the first ``hot_fraction`` of ``nfiles`` files, the lower-numbered
    ones more often with ``skew`` > 1."""

    def __init__(self, nfiles: int, hot_fraction: float, skew: float, seed: int) -> None:
        if nfiles < 1 or not 0 < hot_fraction <= 1 or skew <= 0:
            raise ValueError(f"expected nfiles >= 1, 0 < hot_fraction <= 1, skew > 0; got {nfiles}, "
                             f"{hot_fraction}, {skew}")
        self.hot = max(1, math.floor(nfiles * hot_fraction))
        self.skew = skew
        self._random = random.Random(seed)

    def index(self, uniform: float) -> int:
        return math.floor(self.hot * float(uniform**self.skew))

    def next_index(self) -> int:
        return self.index(self._random.random())

    def next_path(self) -> str:
        return f"/f{self.next_index():05d}"


def request_bytes(host: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("ascii")


@dataclass(frozen=True)
class ReplyHead:
    status: int
    content_length: int
    keep_alive: bool


def parse_head(head: bytes) -> ReplyHead:
    """An HTTP/1.1 reply's status line and headers (without the blank line): nginx serving a
    static file always says Content-Length."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"expected an HTTP/1.x status line, got {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" not in headers or not headers["content-length"].isdigit():
        raise ValueError(f"expected a Content-Length, got headers {sorted(headers)}")
    keep_alive = headers.get("connection", "").lower() != "close" and parts[0] == "HTTP/1.1"
    return ReplyHead(int(parts[1]), int(headers["content-length"]), keep_alive)


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest rank of a sorted, non-empty list."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclass
class Interval:
    """What one second saw: the requests completed in it (by their last byte) and the errors."""

    start: float
    end: float
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0

    def record(self, slow_s: float) -> dict[str, object]:
        ordered = sorted(self.latencies_s)
        line: dict[str, object] = {"start": self.start, "end": self.end, "requests": len(ordered),
                                   "errors": self.errors,
                                   "slow": sum(1 for latency in ordered if latency > slow_s)}
        if ordered:
            line.update(p50_ms=percentile(ordered, 0.5) * 1e3, p99_ms=percentile(ordered, 0.99) * 1e3,
                        max_ms=ordered[-1] * 1e3)
        return line


class Connection:
    """One client connection: connect, then send one request and read its reply, again and again."""

    def __init__(self, address: tuple[str, int], hot_set: HotSet) -> None:
        self.address = address
        self.hot_set = hot_set
        self.sock: socket.socket | None = None
        self.deadline = 0.0
        self.retry_at = 0.0
        self.connecting = False
        self.sent_at = 0.0
        self.outgoing = b""
        self.incoming = bytearray()
        self.head: ReplyHead | None = None
        self.body_start = 0

    def open(self, selector: selectors.BaseSelector, now: float) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        code = self.sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, os.strerror(code))
        self.connecting = True
        self.deadline = now + CONNECT_TIMEOUT_S
        selector.register(self.sock, selectors.EVENT_WRITE, self)

    def close(self, selector: selectors.BaseSelector, now: float) -> None:
        if self.sock is not None:
            selector.unregister(self.sock)
            self.sock.close()
            self.sock = None
        self.retry_at = now + RECONNECT_S

    def send_next(self, selector: selectors.BaseSelector, now: float) -> None:
        self.incoming.clear()
        self.head = None
        self.ask(selector, now, request_bytes(self.address[0], self.hot_set.next_path()))

    def ask(self, selector: selectors.BaseSelector, now: float, request: bytes) -> None:
        """Send ``request``; it times out REQUEST_TIMEOUT_S from now."""
        assert self.sock is not None
        self.outgoing = request
        self.sent_at = now
        self.deadline = now + REQUEST_TIMEOUT_S
        selector.modify(self.sock, selectors.EVENT_WRITE, self)

    def connected(self, selector: selectors.BaseSelector, now: float) -> None:
        """The connection is up: HTTP asks its first request at once."""
        self.send_next(selector, now)

    def on_event(self, selector: selectors.BaseSelector, events: int, now: float) -> float | None:
        """Progress on a ready socket: the latency of a reply completed, else None. OSError or
        ValueError: this connection failed."""
        assert self.sock is not None
        if self.connecting:
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
            self.connecting = False
            self.connected(selector, now)
            return None
        if events & selectors.EVENT_WRITE and self.outgoing:
            self.outgoing = self.outgoing[self.sock.send(self.outgoing):]
            if not self.outgoing:
                selector.modify(self.sock, selectors.EVENT_READ, self)
            return None
        chunk = self.sock.recv(RECV_BYTES)
        if not chunk:
            raise ValueError("connection closed before the reply's end")
        self.incoming += chunk
        return self.on_reply_bytes(selector, now)

    def on_reply_bytes(self, selector: selectors.BaseSelector, now: float) -> float | None:
        """More of the reply arrived (in ``incoming``): its latency once it is complete."""
        if self.head is None:
            end = self.incoming.find(HEADER_END)
            if end < 0:
                return None
            self.head = parse_head(bytes(self.incoming[:end]))
            self.body_start = end + len(HEADER_END)
            if self.head.status != 200:
                raise ValueError(f"expected status 200, got {self.head.status}")
        if len(self.incoming) - self.body_start < self.head.content_length:
            return None
        latency = now - self.sent_at
        if self.head.keep_alive:
            self.send_next(selector, now)
        else:
            self.close(selector, now)
            self.retry_at = now
        return latency


PROTOCOL_3_0 = 196608
AUTHENTICATION_OK = 0


def startup_message(user: str, database: str) -> bytes:
    body = struct.pack("!i", PROTOCOL_3_0) + b"".join(
        key.encode("ascii") + b"\0" + value.encode("utf-8") + b"\0"
        for key, value in (("user", user), ("database", database), ("application_name", "pg_load"))) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def query_message(sql: str) -> bytes:
    body = sql.encode("utf-8") + b"\0"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


def error_text(body: bytes) -> str:
    """An ErrorResponse's fields as ``S: M`` (severity, then message)."""
    fields = {chunk[:1]: chunk[1:].decode("utf-8", "replace") for chunk in body.split(b"\0") if chunk}
    return f"{fields.get(b'S', '?')}: {fields.get(b'M', '?')}"


def take_messages(buffer: bytearray) -> list[tuple[bytes, bytes]]:
    """The complete backend messages at the start of ``buffer`` as (type, body), removed from it."""
    messages = []
    while len(buffer) >= 5:
        (length,) = struct.unpack_from("!i", buffer, 1)
        if length < 4:
            raise ValueError(f"expected a message length of at least 4, got {length}")
        if len(buffer) < 1 + length:
            break
        messages.append((bytes(buffer[:1]), bytes(buffer[5 : 1 + length])))
        del buffer[: 1 + length]
    return messages


class PgConnection(Connection):
    """One client connection to PostgreSQL: start up, then one point read after another."""

    def __init__(self, address: tuple[str, int], hot_set: HotSet, database: str, user: str) -> None:
        super().__init__(address, hot_set)
        self.database = database
        self.user = user
        self.started = False

    def open(self, selector: selectors.BaseSelector, now: float) -> None:
        self.started = False
        self.incoming.clear()
        super().open(selector, now)

    def send_next(self, selector: selectors.BaseSelector, now: float) -> None:
        aid = self.hot_set.next_index() + 1
        self.ask(selector, now, query_message(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid}"))

    def connected(self, selector: selectors.BaseSelector, now: float) -> None:
        """The connection is up: the startup message first, its ReadyForQuery before any query."""
        self.ask(selector, now, startup_message(self.user, self.database))

    def on_reply_bytes(self, selector: selectors.BaseSelector, now: float) -> float | None:
        ready = False
        for kind, body in take_messages(self.incoming):
            if kind == b"E":
                raise ValueError(error_text(body))
            if kind == b"R" and struct.unpack_from("!i", body)[0] != AUTHENTICATION_OK:
                raise ValueError(f"the server asks for authentication {struct.unpack_from('!i', body)[0]}: "
                                 "app_load.py speaks trust only")
            ready = ready or kind == b"Z"
        if not ready:
            return None
        if not self.started:
            self.started = True
            self.send_next(selector, now)
            return None
        latency = now - self.sent_at
        self.send_next(selector, now)
        return latency


def run(out_path: str, stop_file: str, max_s: float, clients: list[Connection], slow_s: float) -> None:
    """Drive ``clients`` (HTTP or PostgreSQL connections) until STOP_FILE or MAX_S."""
    selector = selectors.DefaultSelector()
    started = time.monotonic()
    interval = Interval(started, started + INTERVAL_S)
    with open(out_path, "w", encoding="utf-8", buffering=1) as out:
        while True:
            now = time.monotonic()
            while now >= interval.end:
                out.write(json.dumps(interval.record(slow_s)) + "\n")
                interval = Interval(interval.end, interval.end + INTERVAL_S)
                if os.path.exists(stop_file) or now - started >= max_s:
                    return
            for client in clients:
                if client.sock is None and now >= client.retry_at:
                    try:
                        client.open(selector, now)
                    except OSError:
                        interval.errors += 1
                        client.close(selector, now)
                elif client.sock is not None and now >= client.deadline:
                    interval.errors += 1
                    client.close(selector, now)
            wake = min([interval.end] + [client.retry_at if client.sock is None else client.deadline
                                         for client in clients])
            for key, events in selector.select(max(0.0, wake - time.monotonic())):
                client = key.data
                now = time.monotonic()
                try:
                    latency = client.on_event(selector, events, now)
                except (OSError, ValueError):
                    interval.errors += 1
                    client.close(selector, now)
                    continue
                if latency is not None:
                    interval.latencies_s.append(latency)


USAGE = ("usage: app_load.py http ADDRESS PORT OUT.jsonl STOP_FILE MAX_S NFILES HOT_FRACTION SKEW SEED "
         "CONNECTIONS SLOW_MS\n"
         "       app_load.py postgresql ADDRESS PORT OUT.jsonl STOP_FILE MAX_S NROWS HOT_FRACTION SKEW SEED "
         "CONNECTIONS SLOW_MS DATABASE USER")


def main() -> int:
    try:
        protocol, host, port, out_path, stop_file, max_s, items, hot_fraction, skew, seed, connections, \
            slow_ms, *login = sys.argv[1:]
        hot_set = HotSet(int(items), float(hot_fraction), float(skew), int(seed))
        address = (host, int(port))
        clients: list[Connection]
        if protocol == "http" and not login:
            clients = [Connection(address, hot_set) for _ in range(int(connections))]
        elif protocol == "postgresql" and len(login) == 2:
            clients = [PgConnection(address, hot_set, *login) for _ in range(int(connections))]
        else:
            raise ValueError(f"protocol {protocol!r} with {len(login)} more arguments")
        run(out_path, stop_file, float(max_s), clients, float(slow_ms) / 1e3)
    except ValueError as bad:
        print(f"app_load.py: {bad}\n{USAGE}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
