"""dom0/app_load.py's PostgreSQL client against a fake server speaking just enough of protocol 3.0."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bench.dom0 import app_load
from tests.bench.dom0.app_load import HotSet


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def serve(connection: socket.socket, queries: list[str], fail_on: int | None) -> None:
    with connection, contextlib.suppress(ConnectionError):  # the client closes a connection that failed
        (length,) = struct.unpack("!i", connection.recv(4, socket.MSG_WAITALL))
        startup = connection.recv(length - 4, socket.MSG_WAITALL)
        assert struct.unpack_from("!i", startup)[0] == app_load.PROTOCOL_3_0
        assert b"user\0postgres\0" in startup and b"database\0bench\0" in startup
        connection.sendall(message(b"R", struct.pack("!i", 0)) + message(b"Z", b"I"))
        while True:
            head = connection.recv(5, socket.MSG_WAITALL)
            if len(head) < 5:
                return
            body = connection.recv(struct.unpack_from("!i", head, 1)[0] - 4, socket.MSG_WAITALL)
            queries.append(body.rstrip(b"\0").decode())
            if fail_on is not None and len(queries) == fail_on:
                connection.sendall(message(b"E", b"SERROR\0MThe guest said no\0\0") + message(b"Z", b"I"))
                continue
            # in two pieces, the second one split in its length field
            reply = message(b"D", b"\0\1\0\0\0\0010") + message(b"C", b"SELECT 1\0") + message(b"Z", b"I")
            connection.sendall(reply[:7])
            connection.sendall(reply[7:])


@pytest.fixture
def fake_postgres() -> Iterator[tuple[int, list[str]]]:
    listener = socket.create_server(("127.0.0.1", 0))
    queries: list[str] = []

    def accept() -> None:
        for index in range(2):
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(connection, queries, 5 if index == 0 else None),
                             daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1], queries
    listener.close()


def test_point_reads_from_the_hot_rows_and_an_error_reconnects(tmp_path: Path,
                                                               fake_postgres: tuple[int, list[str]]) -> None:
    port, queries = fake_postgres
    out = tmp_path / "load.jsonl"
    hot_set = HotSet(nfiles=1000, hot_fraction=0.25, skew=2.0, seed=1)
    clients: list[app_load.Connection] = [app_load.PgConnection(("127.0.0.1", port), hot_set, "bench",
                                                              "postgres")]
    app_load.run(str(out), str(tmp_path / "stop"), 1.5, clients, slow_s=0.5)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(line["errors"] for line in lines) == 1  # the fifth query's ErrorResponse
    # every query answered but the refused one, and perhaps the one in flight at the end
    assert len(queries) - 2 <= sum(line["requests"] for line in lines) <= len(queries) - 1
    aids = [int(query.rsplit("= ", 1)[1]) for query in queries]
    assert all(query.startswith("SELECT abalance FROM pgbench_accounts WHERE aid = ") for query in queries)
    assert len(aids) > 10 and all(1 <= aid <= 250 for aid in aids)


def test_messages_are_taken_whole() -> None:
    buffer = bytearray(message(b"Z", b"I") + message(b"C", b"SELECT 1\0")[:8])
    assert app_load.take_messages(buffer) == [(b"Z", b"I")]
    assert bytes(buffer) == message(b"C", b"SELECT 1\0")[:8]  # the rest of it is still to come
    buffer = bytearray(message(b"C", b"SELECT 1\0")[:6])
    assert app_load.take_messages(buffer) == [] and len(buffer) == 6
    with pytest.raises(ValueError, match="length of at least 4"):
        app_load.take_messages(bytearray(b"Z\0\0\0\1"))
    assert app_load.error_text(b"SFATAL\0C28000\0Mno pg_hba.conf entry\0\0") == "FATAL: no pg_hba.conf entry"
