"""Fuzz ``softpage.bitmap.decode`` with atheris (libFuzzer) and record the run in results/.

    python -m tests.fuzz.fuzz_bitmap [--runs N] [--workers W]      what `make fuzz` runs
    python -m tests.fuzz.fuzz_bitmap worker CORPUS LIBFUZZER-FLAGS  one fuzzing process (from the above)

The run starts W worker processes on one shared corpus directory, seeded at run
time with bitmap_target.seed_corpus() (libFuzzer reloads what the others found),
each for ceil(N / W) executions. The oracle is bitmap_target.one_input with
allocation tracing on; libFuzzer adds a per-input time limit (a hang) and an
RSS limit. It writes results/fuzz-DATE/: README.md (commit, executions, wall
time, coverage, findings), summary.log (each worker's log without its
per-input NEW/REDUCE lines) and any crashing input. Exit status 0 if all N
executions ran without a finding, 1 otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RUNS = 1_000_000
TIME_LIMIT_S = 10
"""An input that decodes for longer is a hang (a valid one takes well under a millisecond)."""
RSS_LIMIT_MB = 2048
"""decode's largest legitimate allocation at MAX_P2M_SIZE is about 1 MiB, but an atheris worker's
RSS grows by about 0.7 KiB an execution whatever the target (measured 2026-12-05: 60 MB at the
start, 130 MB after 100,000 executions; the same inputs decoded in a plain loop stay at 32 MB)."""
MAX_LEN_SLACK = 4096
"""Octets the fuzzer may grow an input by beyond the longest seed."""

_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_STATUS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
_SEED = re.compile(r"INFO: Seed: (\d+)")
_PEAK_RSS = re.compile(r"stat::peak_rss_mb:\s+(\d+)")
_FINDING = re.compile(r"==\d+== ERROR|Uncaught Python exception|ERROR: libFuzzer|deadly signal|timeout after")


@dataclass(frozen=True)
class WorkerOutcome:
    index: int
    returncode: int
    executions: int
    seconds: int
    coverage: int
    features: int
    corpus: int
    libfuzzer_seed: int
    peak_rss_mb: int
    finding_lines: tuple[str, ...]
    summary: str


def worker(corpus: str, libfuzzer_flags: list[str]) -> None:
    import atheris  # the `fuzz` extra: only `make fuzz` installs it

    # softpage is imported under instrumentation so that its branches guide the fuzzer; the
    # oracle is not, so that its own comparisons do not.
    with atheris.instrument_imports(include=["softpage"]):
        import softpage.bitmap  # noqa: F401
    from tests.fuzz import bitmap_target

    def test_one_input(data: bytes) -> None:
        bitmap_target.one_input(data, measure_memory=True)

    tracemalloc.start()  # once: see bitmap_target.one_input
    atheris.Setup([sys.argv[0], *libfuzzer_flags, corpus], test_one_input)
    atheris.Fuzz()


def parse_log(index: int, returncode: int, log: str) -> WorkerOutcome:
    done = _DONE.findall(log)
    statuses = [match.groups() for line in log.splitlines() if (match := _STATUS.match(line))]
    last = statuses[-1] if statuses else ("0", "", "0", "0", "0")
    seed = _SEED.search(log)
    peak_rss = _PEAK_RSS.search(log)
    summary = "\n".join(
        line for line in log.splitlines() if not re.match(r"^#\d+\s+(NEW|REDUCE)\b", line)
    )
    return WorkerOutcome(
        index=index,
        returncode=returncode,
        executions=int(done[-1][0]) if done else int(last[0]),
        seconds=int(done[-1][1]) if done else 0,
        coverage=int(last[2]),
        features=int(last[3]),
        corpus=int(last[4]),
        libfuzzer_seed=int(seed.group(1)) if seed else 0,
        peak_rss_mb=int(peak_rss.group(1)) if peak_rss else 0,
        finding_lines=tuple(line for line in log.splitlines() if _FINDING.search(line)),
        summary=summary,
    )


def atheris_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("atheris")
    except PackageNotFoundError:
        return "not installed"


def commit_fuzzed() -> str:
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", "python", "tests"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()
    return f"{head or 'unknown'}{' with uncommitted changes' if dirty else ''}"


def run(runs: int, workers: int, out: Path) -> int:
    from tests.fuzz import bitmap_target

    seeds = bitmap_target.seed_corpus()
    per_worker = math.ceil(runs / workers)
    max_len = max(len(seed) for seed in seeds) + MAX_LEN_SLACK
    commit = commit_fuzzed()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with tempfile.TemporaryDirectory(prefix="softpage-fuzz-") as scratch_name:
        scratch = Path(scratch_name)
        corpus = scratch / "corpus"
        artifacts = scratch / "artifacts"
        corpus.mkdir()
        artifacts.mkdir()
        for number, seed in enumerate(seeds):
            (corpus / f"seed-{number}").write_bytes(seed)
        print(f"fuzzing bitmap.decode at {commit}: {workers} x {per_worker} executions, "
              f"{len(seeds)} seeds, max_len {max_len}", flush=True)
        started = time.monotonic()
        processes = []
        for index in range(workers):
            log = (scratch / f"worker-{index}.log").open("w")
            flags = [
                f"-runs={per_worker}", f"-max_len={max_len}", f"-timeout={TIME_LIMIT_S}",
                f"-rss_limit_mb={RSS_LIMIT_MB}", f"-artifact_prefix={artifacts}/worker-{index}-",
                "-print_final_stats=1", "-reload=1",
            ]
            command = [sys.executable, "-m", "tests.fuzz.fuzz_bitmap", "worker", str(corpus), *flags]
            processes.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), log))
        returncodes = []
        for process, log in processes:
            returncodes.append(process.wait())
            log.close()
        wall_s = time.monotonic() - started
        outcomes = [
            parse_log(index, code, (scratch / f"worker-{index}.log").read_text(errors="replace"))
            for index, code in enumerate(returncodes)
        ]
        crashing_inputs = sorted(artifacts.iterdir())
        outcomes_of_corpus = Counter(bitmap_target.outcome(path.read_bytes()) for path in corpus.iterdir())
        out.mkdir(parents=True)
        for artifact in crashing_inputs:
            shutil.copy(artifact, out / artifact.name)
    executions = sum(outcome.executions for outcome in outcomes)
    findings = [line for outcome in outcomes for line in outcome.finding_lines]
    failed = any(outcome.returncode for outcome in outcomes) or bool(crashing_inputs) or bool(findings)
    result = "FINDINGS" if failed else ("too few executions" if executions < runs else "no findings")
    (out / "summary.log").write_text(
        "".join(f"==== worker {outcome.index} (exit {outcome.returncode})\n{outcome.summary}\n"
                for outcome in outcomes)
    )
    write_readme(out, commit, started_at, runs, workers, wall_s, outcomes, outcomes_of_corpus, len(seeds),
                 max_len, result, findings, [path.name for path in crashing_inputs])
    print(f"{executions} executions in {wall_s:.0f} s on {workers} workers: {result} "
          f"(coverage {max(outcome.coverage for outcome in outcomes)} edges); written to {out}")
    return 0 if result == "no findings" else 1


def write_readme(out: Path, commit: str, started_at: str, runs: int, workers: int, wall_s: float,
                 outcomes: list[WorkerOutcome], outcomes_of_corpus: Counter[str], nr_seeds: int, max_len: int,
                 result: str, findings: list[str], crashing_inputs: list[str]) -> None:
    executions = sum(outcome.executions for outcome in outcomes)
    rows = "\n".join(
        f"| {o.index} | {o.libfuzzer_seed} | {o.executions} | {o.seconds} | {o.coverage} | {o.features} "
        f"| {o.corpus} | {o.peak_rss_mb} | {o.returncode} |"
        for o in outcomes
    )
    finding_text = (
        "None: no exception other than `BitmapError`, no oracle violation, no input over "
        f"{TIME_LIMIT_S} s and no RSS over {RSS_LIMIT_MB} MB."
        if result != "FINDINGS"
        else "\n".join(f"- `{line.strip()}`" for line in findings[:20])
        + "".join(f"\n- crashing input: [{name}]({name})" for name in crashing_inputs)
    )
    (out / "README.md").write_text(f"""\
# Fuzzing bitmap.decode, {started_at}: {result}

`make fuzz` (tests/fuzz/fuzz_bitmap.py) at {commit}: atheris (libFuzzer) on
`softpage.bitmap.decode`, with the oracle of tests/fuzz/bitmap_target.py: decode raises only
`BitmapError`, or returns a snapshot that re-encodes to exactly the octets given, with every set
inside the guest's `nr_pfns` and the header's counts, and allocates (traced by `tracemalloc`) no
more than the octets given and four sets of `p2m_size` bits allow. {workers} worker processes
shared one corpus, seeded with {nr_seeds} snapshots made by `bitmap.encode` at run time; inputs of
at most {max_len} octets, {TIME_LIMIT_S} s each, {RSS_LIMIT_MB} MB RSS a worker (which grows with
the executions in atheris itself: tests/fuzz/fuzz_bitmap.py, RSS_LIMIT_MB). Machine:
{os.cpu_count()} cores, Python {sys.version.split()[0]}, atheris {atheris_version()}.

- executions: {executions} (asked for {runs})
- wall time: {wall_s:.0f} s
- coverage: {max(o.coverage for o in outcomes)} edges, {max(o.features for o in outcomes)} features
  (the larger worker's; libFuzzer counts atheris' edges of the instrumented softpage modules)
- corpus at the end: {outcomes_of_corpus.total()} inputs (seeds included); what `decode` makes of
  them, by the field of the rule that rejects each (docs/spec/bitmap-page.md, section 11):
  {", ".join(f"{name} {number}" for name, number in sorted(outcomes_of_corpus.items()))}

| worker | libFuzzer seed | executions | s | cov | ft | corpus | peak RSS MB | exit |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{rows}

## Findings
{finding_text}

summary.log holds each worker's log without its per-input NEW/REDUCE lines.
""")


def main(argv: list[str]) -> int:
    if argv[:1] == ["worker"]:
        worker(argv[1], argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("SOFTPAGE_FUZZ_RUNS", DEFAULT_RUNS)),
                        help="total executions (default $SOFTPAGE_FUZZ_RUNS or %(default)s)")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("SOFTPAGE_FUZZ_WORKERS", 2)))
    parser.add_argument("--out", type=Path, default=None, help="default results/fuzz-DATE")
    options = parser.parse_args(argv)
    out = options.out or REPO / "results" / time.strftime("fuzz-%Y%m%d-%H%M%S")
    return run(options.runs, options.workers, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
