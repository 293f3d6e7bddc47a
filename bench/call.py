"""How long a command takes on the embedded default: ``flowbus call local resources`` as a user
types it (a new process each time), and ``Client.call`` from a running program.

Starts ``flowbus up`` (the embedded default: ipc bus in a private state dir, a local QCG manager,
Ray with token auth on loopback) in a temporary state dir, measures, stops it by PID, and removes
the state dir. The baseline, run in the same process, is the floor of any command-line tool
here: starting the same Python and exiting (``python -c pass``).

    .venv/bin/python bench/call.py [--reps N]

Last line: ``BENCH call cli_p50_ms=... cli_p99_ms=... api_p50_ms=... api_p99_ms=... floor_p50_ms=...
cli_over_floor_ms=...``. Goal (issue 17): ``cli_p50_ms`` <= 100 on this 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed_runs(cmd: list[str], env: dict[str, str], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        out.append((time.perf_counter() - t0) * 1000)
        if proc.returncode != 0:
            raise SystemExit(f"bench/call.py: {' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="fbcall-"))
    env = {**os.environ, "FLOWBUS_STATE_DIR": str(state)}
    env.pop("FLOWBUS_ADDRESS", None)
    up = subprocess.Popen([sys.executable, "-m", "flowbus", "up", "--duration", "600"], env=env,
                          stdout=subprocess.DEVNULL, stderr=open(state / "up.err", "w"))  # noqa: SIM115 - for the child
    try:
        deadline = time.monotonic() + 120
        while not (state / "run.json").exists():
            if up.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench/call.py: flowbus up did not start: {(state / 'up.err').read_text()[-800:]}")
            time.sleep(0.2)  # another process starting; nothing to arm
        cli = [sys.executable, "-m", "flowbus", "call", "local", "resources"]
        timed_runs(cli, env, 3)  # warm-up: page cache, the session's first answer
        floor = timed_runs([sys.executable, "-c", "pass"], env, args.reps)
        cli_ms = timed_runs(cli, env, args.reps)
        os.environ["FLOWBUS_STATE_DIR"] = str(state)
        import flowbus

        with flowbus.connect() as client:
            api_ms = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                client.call("local", "resources", timeout=30)
                api_ms.append((time.perf_counter() - t0) * 1000)
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(120)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(10)
        shutil.rmtree(state, ignore_errors=True)
    cli50, floor50 = statistics.median(cli_ms), statistics.median(floor)
    print(f"flowbus call (new process): p50 {cli50:.1f} ms, p99 {pct(cli_ms, 0.99):.1f} ms; "
          f"python -c pass {floor50:.1f} ms; Client.call p50 {statistics.median(api_ms):.2f} ms")
    print(f"BENCH call cli_p50_ms={cli50:.1f} cli_p99_ms={pct(cli_ms, 0.99):.1f} "
          f"api_p50_ms={statistics.median(api_ms):.2f} api_p99_ms={pct(api_ms, 0.99):.2f} "
          f"floor_p50_ms={floor50:.1f} cli_over_floor_ms={cli50 - floor50:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
