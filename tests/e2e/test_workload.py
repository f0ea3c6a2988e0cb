"""The guest workload's integrity check, run on the host: it must catch what the e2e tests rely on
it to catch (a changed anonymous byte, a page holding another page's content, a changed file).

No Xen here, but it is the e2e suite's judge, so it runs with the e2e tests. Corruption is
injected from outside through /proc/PID/mem, as a faulty migration would.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from softpage.abi import PAGE_SIZE as PAGE
from softpage_testbed import REPO_DIR, VERIFY_RE

pytestmark = pytest.mark.e2e

WORKLOAD_SOURCE = REPO_DIR / "testbed" / "guest" / "workload.c"
ANON_MB = 4


class RunningWorkload:
    def __init__(self, process: subprocess.Popen[str], output: Path) -> None:
        self.process = process
        self.output = output

    def lines(self) -> str:
        return self.output.read_text()

    def wait_for(self, pattern: str, timeout_s: float = 20) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = re.search(pattern, self.lines())
            if match:
                return match
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in workload output:\n{self.lines()}")

    def verify(self) -> tuple[str, str]:
        seen = len(VERIFY_RE.findall(self.lines()))
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            verdicts = VERIFY_RE.findall(self.lines())
            if len(verdicts) > seen:
                return verdicts[-1][0], verdicts[-1][2]
            time.sleep(0.05)
        raise AssertionError(f"no verdict:\n{self.lines()}")

    def anon_region(self) -> int:
        """Start address of the ANON_MB anonymous mapping (the only mapping of that size)."""
        for line in Path(f"/proc/{self.process.pid}/maps").read_text().splitlines():
            start, end = (int(part, 16) for part in line.split()[0].split("-"))
            if end - start == ANON_MB << 20 and len(line.split()) == 5:
                return start
        raise AssertionError("anonymous region not found")

    def poke(self, address: int, data: bytes) -> None:
        with open(f"/proc/{self.process.pid}/mem", "r+b", buffering=0) as memory:
            memory.seek(address)
            memory.write(data)

    def peek(self, address: int, length: int) -> bytes:
        with open(f"/proc/{self.process.pid}/mem", "rb", buffering=0) as memory:
            memory.seek(address)
            return memory.read(length)


@pytest.fixture
def workload(tmp_path: Path) -> Iterator[RunningWorkload]:
    if shutil.which("gcc") is None:
        pytest.skip("no gcc on this host")
    binary = tmp_path / "workload"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(WORKLOAD_SOURCE)],
                   check=True)
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run([str(binary), "gendata", str(data), "20"], check=True)
    output = tmp_path / "out.txt"
    with output.open("w") as sink:
        # dirty rate 0: the test decides which pages change
        process = subprocess.Popen(
            [str(binary), "run", "--anon-mb", str(ANON_MB), "--cache-mb", "20", "--dirty-rate", "0",
             "--data-dir", str(data)], stdout=sink, text=True)
    running = RunningWorkload(process, output)
    try:
        running.wait_for(r"WORKLOAD READY anon_pages=1024 files=2 cache_bytes=20971520")
        yield running
    finally:
        process.kill()
        process.wait(timeout=10)


def test_untouched_workload_verifies_ok(workload: RunningWorkload) -> None:
    verdict, details = workload.verify()
    assert verdict == "ok", details
    assert "anon_pages=1024 files=2" in details


def test_one_changed_byte_in_memory_fails(workload: RunningWorkload) -> None:
    address = workload.anon_region() + 37 * PAGE + 1234
    workload.poke(address, bytes([workload.peek(address, 1)[0] ^ 0x01]))
    verdict, details = workload.verify()
    assert verdict == "FAIL"
    assert "bad_anon_pages=1 first_bad_page=37 " in details


def test_page_swapped_with_another_fails(workload: RunningWorkload) -> None:
    # A page holding valid content of the wrong page (a misplaced PFN) must not pass.
    base = workload.anon_region()
    workload.poke(base + 5 * PAGE, workload.peek(base + 6 * PAGE, PAGE))
    verdict, details = workload.verify()
    assert verdict == "FAIL"
    assert "bad_anon_pages=1 first_bad_page=5 " in details


def test_changed_data_file_fails(workload: RunningWorkload, tmp_path: Path) -> None:
    target = tmp_path / "data" / "data-001"
    os.chmod(target, 0o644)
    with target.open("r+b") as data_file:
        data_file.seek(4096 * 3 + 8)
        original = data_file.read(1)
        data_file.seek(4096 * 3 + 8)
        data_file.write(bytes([original[0] ^ 0x80]))
    verdict, details = workload.verify()
    assert verdict == "FAIL"
    assert "bad_files=1 first_bad_file=data-001" in details
