"""The dom0 agent's client: one JSON line per request and reply over QEMU's virtio-serial socket
(the agent is ``softpage-agent``, testbed/dom0/), so exit codes and output are exact."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import itertools
import json
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from softpage_testbed.errors import Dom0Hung, TestbedError

AGENT_PORT_NAME = "org.softpage.agent"
LIVENESS_PERIOD_S = 60.0
"""While a dom0 command runs longer than this, dom0 is asked to run ``true`` once per period."""
LIVENESS_TIMEOUT_S = 30.0
"""The agent's limit for that ``true``; with the reply margin, dom0 has a minute to answer."""
REPLY_MARGIN_S = 30.0
"""Beyond the agent's own timeout: TCG slowness on the way back."""



@dataclasses.dataclass(frozen=True)
class CommandResult:
    rc: int
    stdout: str
    stderr: str
    wall_s: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.error is None



class AgentClient:
    """Talks to softpage-agent over QEMU's unix socket for the virtio-serial port. Thread safe:
    replies are matched to requests by id, so commands may overlap."""

    def __init__(
        self,
        socket_path: Path,
        liveness_period_s: float = LIVENESS_PERIOD_S,
        reply_margin_s: float = REPLY_MARGIN_S,
    ) -> None:
        self.liveness_period_s = liveness_period_s
        self.reply_margin_s = reply_margin_s
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.connect(str(socket_path))
        self._ids = itertools.count(1)
        self._waiting: dict[int, queue.Queue[dict[str, object]]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._read_replies, name="agent-reader", daemon=True)
        self._reader.start()

    def _read_replies(self) -> None:
        pending = b""
        while not self._closed:
            try:
                chunk = self._socket.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                try:
                    reply = json.loads(line)
                except ValueError:
                    continue  # a partial line from before the agent (re)started
                reply_id = reply.get("id") if isinstance(reply, dict) else None
                if not isinstance(reply_id, int):
                    continue  # not a reply to any request
                with self._lock:
                    waiter = self._waiting.pop(reply_id, None)
                if waiter is not None:
                    waiter.put(reply)

    def request(
        self, request: dict[str, object], timeout_s: float, still_alive: Callable[[], bool] | None = None
    ) -> CommandResult:
        """Send one request and wait for its reply. The agent enforces timeout_s itself. While
        waiting, ``still_alive`` is asked once per liveness period; False raises Dom0Hung."""
        request_id = next(self._ids)
        waiter: queue.Queue[dict[str, object]] = queue.Queue(maxsize=1)
        with self._lock:
            self._waiting[request_id] = waiter
        data = (json.dumps({**request, "id": request_id, "timeout": timeout_s}) + "\n").encode()
        deadline = time.monotonic() + timeout_s + self.reply_margin_s
        try:
            self._socket.sendall(data)
            while True:
                remaining = deadline - time.monotonic()
                try:
                    reply = waiter.get(timeout=max(0.0, min(remaining, self.liveness_period_s)))
                    break
                except queue.Empty:
                    if remaining <= self.liveness_period_s:
                        raise
                    if still_alive is not None and not still_alive():
                        raise Dom0Hung(f"dom0 stopped answering while it ran {request!r}") from None
        except (OSError, queue.Empty) as error:
            raise TestbedError(f"no reply from the dom0 agent for {request!r}: {error!r}") from error
        finally:
            with self._lock:
                self._waiting.pop(request_id, None)
        return CommandResult(
            rc=int(str(reply.get("rc", -1))),
            stdout=base64.b64decode(str(reply.get("stdout") or "")).decode("utf-8", "replace"),
            stderr=base64.b64decode(str(reply.get("stderr") or "")).decode("utf-8", "replace"),
            wall_s=float(str(reply.get("wall_s") or 0.0)),
            error=str(reply["error"]) if reply.get("error") else None,
        )

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
