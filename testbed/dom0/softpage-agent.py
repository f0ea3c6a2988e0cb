#!/usr/bin/python3
"""Command agent for the softpage testbed, running in dom0 under systemd.

The serial console is shared with Xen and kernel messages and loses or interleaves bytes under
TCG, so the host drives dom0 through a dedicated virtio-serial port instead. Wire format, one JSON
object per line in each direction (the framing: JSON never contains a raw newline):

  request  {"id": int, "argv": [str, ...]}         or  {"id": int, "sh": "shell command"}
           optional: "timeout": seconds (default 600), "stdin": base64
  reply    {"id": int, "rc": int, "stdout": base64, "stderr": base64, "wall_s": float,
            "error": str | null}

rc is the command's exit status; -9 with error "timeout" when the agent killed it. Requests run
concurrently (a migration and a guest-console command may overlap); replies carry the request id.
"""

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

PORT_PATH = "/dev/virtio-ports/org.softpage.agent"
DEFAULT_TIMEOUT_S = 600.0
# dom0 environment every command gets: the session payload's python package and tools.
PAYLOAD_ENV = {
    "PYTHONPATH": "/opt/softpage/py",
    "PATH": ":".join(
        [
            "/opt/softpage/bin",
            "/opt/softpage/py/bin",
            *("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"),
        ]
    ),
    "LC_ALL": "C.UTF-8",
}


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def run_request(request: dict[str, object]) -> dict[str, object]:
    started = time.monotonic()
    reply: dict[str, object] = {"id": request.get("id"), "rc": -1, "stdout": "", "stderr": "", "error": None}
    argv = request.get("argv")
    if "sh" in request:
        argv = ["/bin/bash", "-c", str(request["sh"])]
    if not isinstance(argv, list) or not argv:
        reply["error"] = "expected 'argv' (non-empty list) or 'sh' (string)"
        return reply
    stdin_data = base64.b64decode(str(request.get("stdin", "")))
    timeout_s = float(request.get("timeout", DEFAULT_TIMEOUT_S))  # type: ignore[arg-type]
    env = dict(os.environ)
    env.update(PAYLOAD_ENV)
    try:
        process = subprocess.Popen(
            [str(arg) for arg in argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd="/root",
            start_new_session=True,
        )
    except OSError as error:
        reply["error"] = f"cannot run {argv[0]!r}: {error}"
        return reply
    try:
        stdout, stderr = process.communicate(stdin_data, timeout=timeout_s)
        reply.update(rc=process.returncode, stdout=encode(stdout), stderr=encode(stderr))
    except subprocess.TimeoutExpired:
        # The whole process group: a grandchild (xl under bash -c) holding the pipes open would
        # otherwise keep this request, and the host waiting on it, hanging forever.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        reply.update(rc=-9, error="timeout", stdout=encode(stdout), stderr=encode(stderr))
    reply["wall_s"] = round(time.monotonic() - started, 3)
    return reply


class Port:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.write_lock = threading.Lock()

    def send(self, reply: dict[str, object]) -> None:
        data = (json.dumps(reply) + "\n").encode()
        with self.write_lock:
            view = memoryview(data)
            while view:
                written = os.write(self.fd, view)
                view = view[written:]

    def lines(self):  # type: ignore[no-untyped-def]
        pending = b""
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                # No host connected: the port reads as EOF until one connects.
                time.sleep(0.2)
                continue
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.strip():
                    yield line


def serve(port: Port) -> None:
    def handle(line: bytes) -> None:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("request is not an object")
        except ValueError as error:
            port.send({"id": None, "rc": -1, "stdout": "", "stderr": "", "error": f"bad request: {error}"})
            return
        port.send(run_request(request))

    for line in port.lines():
        threading.Thread(target=handle, args=(line,), daemon=True).start()


def main() -> int:
    for _ in range(600):
        if os.path.exists(PORT_PATH):
            break
        time.sleep(0.5)
    else:
        print(f"softpage-agent: {PORT_PATH} never appeared", file=sys.stderr)
        return 1
    serve(Port(PORT_PATH))
    return 0


if __name__ == "__main__":
    sys.exit(main())
