"""Runs in the dom0s of a testbed pair: the offset between two dom0s' monotonic clocks, measured
over the link between them (tests/bench/link_bench.py: a migration's suspend is seen on one host,
the incoming copy's unpause on the other).

    clock_offset.py serve PORT IDLE_S           (answers each probe with its clock; exits after
                                                 IDLE_S without one)
    clock_offset.py probe HOST PORT COUNT       (prints one JSON line: offset_s, rtt_s, samples)

A probe carries nothing; the answer carries the server's ``time.monotonic()``. With the probe sent
at ``sent`` and the answer back at ``received`` (the prober's clock), the server's clock read
``peer`` at about the midpoint, so ``offset = peer - (sent + received) / 2`` (server minus prober),
uncertain by at most half the round trip. Of COUNT probes the one with the shortest round trip
wins: the least queueing, the tightest bound. Each QEMU's clock runs on its own under TCG, so the
caller measures it again at every migration.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

ANSWER = struct.Struct("!Qd")
"""The probe's sequence number echoed, and the server's monotonic clock."""
PROBE = struct.Struct("!Q")
PROBE_GAP_S = 0.05
ANSWER_TIMEOUT_S = 2.0


def best_offset(samples: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(offset_s, rtt_s) of the sample ``(sent, peer, received)`` with the shortest round trip."""
    if not samples:
        raise ValueError("expected at least one answered probe, got none")
    for sent, _peer, received in samples:
        if received < sent:
            raise ValueError(f"expected an answer after its probe, got sent {sent} > received {received}")
    sent, peer, received = min(samples, key=lambda sample: sample[2] - sample[0])
    return peer - (sent + received) / 2, received - sent


def serve(port: int, idle_s: float) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("", port))
        server.settimeout(idle_s)
        while True:
            try:
                probe, sender = server.recvfrom(PROBE.size)
            except TimeoutError:
                return 0
            (sequence,) = PROBE.unpack(probe)
            server.sendto(ANSWER.pack(sequence, time.monotonic()), sender)


def probe(host: str, port: int, count: int) -> int:
    samples: list[tuple[float, float, float]] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as prober:
        prober.connect((host, port))
        prober.settimeout(ANSWER_TIMEOUT_S)
        for sequence in range(count):
            sent = time.monotonic()
            prober.send(PROBE.pack(sequence))
            try:
                while True:  # skip late answers to earlier probes
                    answered, peer = ANSWER.unpack(prober.recv(ANSWER.size))
                    if answered == sequence:
                        break
            except (TimeoutError, ConnectionRefusedError):
                continue
            samples.append((sent, peer, time.monotonic()))
            time.sleep(PROBE_GAP_S)
    offset, rtt = best_offset(samples)
    print(json.dumps({"offset_s": offset, "rtt_s": rtt, "samples": len(samples)}))
    return 0


def main() -> int:
    arguments = sys.argv[1:]
    if len(arguments) == 3 and arguments[0] == "serve":
        return serve(int(arguments[1]), float(arguments[2]))
    if len(arguments) == 4 and arguments[0] == "probe":
        return probe(arguments[1], int(arguments[2]), int(arguments[3]))
    print("usage: clock_offset.py serve PORT IDLE_S | probe HOST PORT COUNT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
