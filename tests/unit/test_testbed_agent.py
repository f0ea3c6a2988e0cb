"""The e2e harness's flake handling. Its dom0 agent client: a long command keeps waiting while dom0
answers, and a dom0 that stops answering fails the command within a liveness period (Dom0Hung),
not at its timeout (the agent here is a fake on a unix socket that speaks the agent's wire
format). And the scripts' retry: a failure during which a guest triple-faulted runs once more on
a fresh guest; any other failure stands."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import softpage_testbed
from softpage_testbed import host

PERIOD_S = 0.2


class FakeAgent:
    """Answers ``true`` at once while ``responsive``; a ``sleep N`` request after N seconds."""

    def __init__(self, path: Path) -> None:
        self.responsive = True
        self.pings = 0
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(1)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        connection, _ = self._server.accept()
        lock = threading.Lock()

        def reply(request: dict[str, object], delay_s: float) -> None:
            time.sleep(delay_s)
            stdout = base64.b64encode(b"done").decode()
            answer = {"id": request["id"], "rc": 0, "stdout": stdout, "stderr": ""}
            # A test that saw dom0 hang has closed the client by the time a slow answer is due.
            with lock, contextlib.suppress(BrokenPipeError, ConnectionResetError):
                connection.sendall((json.dumps(answer) + "\n").encode())

        for line in connection.makefile("rb"):
            request = json.loads(line)
            argv = request["argv"]
            if argv == ["true"]:
                self.pings += 1
                if self.responsive:
                    reply(request, 0)
            elif argv[0] == "sleep":
                threading.Thread(target=reply, args=(request, float(argv[1])), daemon=True).start()

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def agent_and_client(tmp_path: Path) -> Iterator[tuple[FakeAgent, softpage_testbed.AgentClient]]:
    path = tmp_path / "agent.sock"
    agent = FakeAgent(path)
    client = softpage_testbed.AgentClient(path, liveness_period_s=PERIOD_S, reply_margin_s=PERIOD_S)
    yield agent, client
    client.close()
    agent.close()


def pinger(client: softpage_testbed.AgentClient) -> Callable[[], bool]:
    def still_alive() -> bool:
        try:
            return client.request({"argv": ["true"]}, timeout_s=PERIOD_S).ok
        except softpage_testbed.TestbedError:
            return False

    return still_alive


def test_a_long_command_waits_while_dom0_answers(
    agent_and_client: tuple[FakeAgent, softpage_testbed.AgentClient],
) -> None:
    agent, client = agent_and_client
    result = client.request({"argv": ["sleep", str(8 * PERIOD_S)]}, timeout_s=60, still_alive=pinger(client))
    assert (result.rc, result.stdout) == (0, "done")
    assert agent.pings >= 3


def test_a_silent_dom0_fails_the_command_within_a_period(
    agent_and_client: tuple[FakeAgent, softpage_testbed.AgentClient],
) -> None:
    agent, client = agent_and_client
    agent.responsive = False
    started = time.monotonic()
    with pytest.raises(softpage_testbed.Dom0Hung):
        client.request({"argv": ["sleep", "60"]}, timeout_s=60, still_alive=pinger(client))
    assert time.monotonic() - started < 20 * PERIOD_S


def test_without_a_probe_a_silent_command_fails_at_its_timeout(
    agent_and_client: tuple[FakeAgent, softpage_testbed.AgentClient],
) -> None:
    _, client = agent_and_client
    with pytest.raises(softpage_testbed.TestbedError, match="no reply from the dom0 agent"):
        client.request({"argv": ["sleep", "60"]}, timeout_s=PERIOD_S)


class FaultCountingTestbed:
    """What retry_after_triple_faults asks of a testbed: Xen's triple-fault count and a reset."""

    def __init__(self) -> None:
        self.faults = 0
        self.destroyed = 0

    def triple_faults(self) -> int:
        return self.faults

    def destroy_all_guests(self) -> None:
        self.destroyed += 1


def test_a_failure_with_a_triple_fault_runs_once_more_on_a_fresh_guest() -> None:
    testbed = FaultCountingTestbed()
    tries: list[str] = []

    def action(guest: str) -> str:
        tries.append(guest)
        if guest == "old":
            testbed.faults += 1
            raise softpage_testbed.TestbedError("guest died")
        return f"measured on {guest}"

    result = softpage_testbed.retry_after_triple_faults(
        testbed, "old", action, lambda: "fresh"  # type: ignore[arg-type]
    )
    assert result == ("fresh", "measured on fresh")
    assert (tries, testbed.destroyed) == (["old", "fresh"], 1)


def test_a_failure_without_a_triple_fault_stands() -> None:
    testbed = FaultCountingTestbed()

    def action(guest: str) -> str:
        raise softpage_testbed.TestbedError("softpage broke it")

    with pytest.raises(softpage_testbed.TestbedError, match="softpage broke it"):
        softpage_testbed.retry_after_triple_faults(testbed, "old", action, lambda: "fresh")  # type: ignore[arg-type]
    assert testbed.destroyed == 0


def test_retries_stop_at_their_limit_and_the_last_failure_stands() -> None:
    testbed = FaultCountingTestbed()
    fresh = iter(["fresh-1", "fresh-2", "fresh-3"])

    def action(guest: str) -> str:
        testbed.faults += 1
        raise softpage_testbed.TestbedError(f"{guest} died")

    with pytest.raises(softpage_testbed.TestbedError, match="fresh-2 died"):
        softpage_testbed.retry_after_triple_faults(
            testbed, "old", action, lambda: next(fresh), retries=2  # type: ignore[arg-type]
        )
    assert testbed.destroyed == 2


def test_a_dom0_boot_with_a_silent_console_is_called_stalled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host, "DOM0_BOOT_STALL_S", 0.3)
    testbed = softpage_testbed.Testbed(softpage_testbed.TestbedConfig(), tmp_path / "payload.img", tmp_path)
    testbed.serial_log.write_text("(XEN) booting\n[    4.118727] clocksource: Switched to clocksource xen\n")
    testbed._qemu = subprocess.Popen(["sleep", "30"])  # a QEMU that runs on and says nothing
    try:
        with pytest.raises(softpage_testbed.Dom0BootStalled, match="no serial output for"):
            testbed._wait_for_agent(time.monotonic())
    finally:
        testbed._qemu.kill()
        testbed._qemu.wait()


def test_a_stalled_dom0_boot_is_tried_again_once_and_its_log_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    testbed = softpage_testbed.Testbed(softpage_testbed.TestbedConfig(), tmp_path / "payload.img", tmp_path)
    attempts: list[int] = []

    def boot_once() -> None:
        attempts.append(len(attempts) + 1)
        testbed.serial_log.write_text(f"boot {len(attempts)}\n")
        if len(attempts) == 1:
            raise softpage_testbed.Dom0BootStalled("dom0 boot stalled: no serial output for 301 s")

    monkeypatch.setattr(testbed, "_boot_once", boot_once)
    testbed.boot()
    assert attempts == [1, 2]
    assert (tmp_path / "serial-stalled-1.log").read_text() == "boot 1\n"
    assert testbed.serial_log.read_text() == "boot 2\n"


def test_a_dom0_boot_that_stalls_twice_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    testbed = softpage_testbed.Testbed(softpage_testbed.TestbedConfig(), tmp_path / "payload.img", tmp_path)

    def boot_once() -> None:
        raise softpage_testbed.Dom0BootStalled("dom0 boot stalled: no serial output for 301 s")

    monkeypatch.setattr(testbed, "_boot_once", boot_once)
    with pytest.raises(softpage_testbed.Dom0BootStalled):
        testbed.boot()


def test_a_new_dom0_boot_does_not_inherit_the_last_ones_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first boot whose dom0 hung and stalled is booted again: that boot's commands must run
    (they failed at once as "dom0 hung earlier in this boot", 2026-12-06)."""
    testbed = softpage_testbed.Testbed(softpage_testbed.TestbedConfig(), tmp_path / "payload.img", tmp_path)
    testbed.hung = True
    hung_when_waiting: list[bool] = []

    def wait_for_agent(started: float) -> None:
        hung_when_waiting.append(testbed.hung)
        raise softpage_testbed.Dom0BootStalled("dom0 boot stalled: no serial output for 301 s")

    monkeypatch.setattr(testbed, "qemu_command", lambda: ["true"])
    monkeypatch.setattr(testbed, "_wait_for_agent", wait_for_agent)
    with pytest.raises(softpage_testbed.Dom0BootStalled):
        testbed._boot_once()
    assert hung_when_waiting == [False]
