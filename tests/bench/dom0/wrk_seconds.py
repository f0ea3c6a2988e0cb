"""Runs in dom0: the guest's service second by second. wrk prints nothing until its run ends, so
this runs it again and again, one second at a time, until STOP_FILE exists (or MAX_S passed),
and writes one JSON line per run to OUT.jsonl: its start and end on dom0's monotonic clock (the
clock measure.py's moments are on), wrk's exit code and hot-set.lua's JSON line.

    wrk_seconds.py OUT.jsonl STOP_FILE MAX_S FIRST_SEED -- WRK COMMAND... SEED ...

The word SEED in the command becomes FIRST_SEED + the run's number: every second draws other
files of the hot set (one seed for all would request the same few hundred files every second),
and the same ones in every sweep. What it costs: each run opens its connections anew, and the
gap between two runs (wrk's start in dom0) is not measured; the lines show both ends, so the
gaps can be told.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

SEED_WORD = "SEED"


def main() -> int:
    out_path, stop_file, max_s, first_seed, separator, *command = sys.argv[1:]
    if separator != "--" or SEED_WORD not in command:
        print("usage: wrk_seconds.py OUT.jsonl STOP_FILE MAX_S FIRST_SEED -- WRK COMMAND... SEED ...",
              file=sys.stderr)
        return 2
    deadline = time.monotonic() + float(max_s)
    with open(out_path, "w", encoding="utf-8", buffering=1) as out:
        number = 0
        while not os.path.exists(stop_file) and time.monotonic() < deadline:
            seed = str(int(first_seed) + number)
            argv = [seed if word == SEED_WORD else word for word in command]
            start = time.monotonic()
            completed = subprocess.run(argv, capture_output=True, text=True, check=False)
            end = time.monotonic()
            summaries = [line for line in completed.stdout.splitlines() if line.startswith("{")]
            record: dict[str, object] = {"run": number, "start": start, "end": end,
                                         "rc": completed.returncode}
            if summaries:
                record["wrk"] = json.loads(summaries[-1])
            else:
                record["stderr"] = completed.stderr[-500:]
            out.write(json.dumps(record) + "\n")
            number += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
