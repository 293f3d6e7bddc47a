"""Stand-in DiFX tools for a real guiServer under test (:class:`support.guiserver.RealServer`).

Run as ``python gs_tools.py <tool> ARGS``; ``$DIFX_BASE/bin/<tool>`` wrappers call it. Each tool
prints what the emulator's fake jobs print (services/guiserver_emulator/_jobs.py), so a job's
packets and texts on a real guiServer can be compared word for word with the emulator's. The
outcome of job ``<name>`` comes from the JSON map in ``$FLOWBUS_GS_OUTCOMES`` (default ``good``);
outcomes are the emulator's (:data:`flowbus.services.guiserver_emulator.OUTCOMES`).

mpifxcorr sends its DifxStatusMessages to ``$DIFX_MESSAGE_GROUP:$DIFX_MESSAGE_PORT`` with TTL 0
(they never leave the host). A short pause separates a stdout line from a following stderr line:
guiServer reads the two pipes in separate threads, and the pause makes their order the one the
emulator produces.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

#: seconds between two lines of different pipes, and between two ticks of a job
PAUSE = 0.05
SLOW_TICKS = 100000


def outcome(path: str) -> tuple[str, str]:
    name = Path(path).stem
    table = json.loads(os.environ.get("FLOWBUS_GS_OUTCOMES", "{}") or "{}")
    return name, str(table.get(name, "good"))


def out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    time.sleep(PAUSE)


def err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
    time.sleep(PAUSE)


def tell(doc: bytes) -> None:
    group = os.environ.get("DIFX_MESSAGE_GROUP", "")
    port = int(os.environ.get("DIFX_MESSAGE_PORT", "0") or 0)
    if not group or not port:
        return
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        s.sendto(doc, (group, port))
    except OSError:
        pass  # no multicast route: the job runs on, unseen by the relay
    finally:
        s.close()


def checkmpifxcorr(args: list[str]) -> int:
    inp = args[-1]
    _, what = outcome(inp)
    out(f"Checking {inp}")
    if what == "config_fail":
        err("Error: bad configuration")
    else:
        out(f"No errors with input file {inp}")
    return 0


def mpifxcorr(args: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from flowbus.services.guiserver import messages as gx

    inp = args[-1]
    name, what = outcome(inp)
    t0, t1 = 60000.0, 60000.01
    tell(gx.status_message(name, "Starting", "starting", start_mjd=t0, stop_mjd=t1))
    ticks = SLOW_TICKS if what == "slow" else 2
    for i in range(ticks):
        out(f"tick {i + 1}")
        if what == "warning" and i == 0:
            err("WARNING: weak signal")
        if what in ("failure", "partial") and i == 0:
            err("Error: disk read failed")
            if what == "failure":
                break
        pct = (i + 1) / ticks
        tell(gx.status_message(name, "Running", f"{name} {100 * pct:.0f}%", vis_mjd=t0 + pct * (t1 - t0),
                               start_mjd=t0, stop_mjd=t1, weights=[0.95]))
        time.sleep(PAUSE)
    if what == "failure":
        tell(gx.status_message(name, "Crashed", "disk read failed"))
        return 1
    Path(inp).with_suffix(".difx").mkdir(exist_ok=True)
    tell(gx.status_message(name, "Done", "done", vis_mjd=t1, start_mjd=t0, stop_mjd=t1))
    return 0


def mpirun(args: list[str]) -> int:
    """``mpirun -np N ... <setup> <prog> ... <input>`` runs ``<setup> <prog> ...`` here; ``mpirun
    -host H <cmd>`` (DifxStop) runs ``<cmd>`` here."""
    base = os.environ.get("DIFX_BASE", "")
    if args[:1] == ["-host"]:
        rest = args[2:]
    else:
        at = next((i for i, a in enumerate(args) if a.startswith(f"{base}/bin/rungeneric.")), None)
        if at is None:
            err(f"mpirun stand-in: no setup path in {args}")
            return 1
        rest = args[at:]
    os.execvp(rest[0], rest)  # noqa: S606 - a stand-in mpirun runs the command it was given
    return 1  # pragma: no cover


def vex2difx(args: list[str]) -> int:
    """``vex2difx -f <stem>.v2d`` in the pass directory: two jobs, each a .input and a .calc."""
    name = args[-1]
    if not Path(name).is_file():
        err(f"cannot open {name}")
        return 1
    out(f"processing {name}")
    stem = Path(name).stem
    for i in (1, 2):
        Path(f"{stem}_{i}.input").write_text(f"# fake job {i} of {name}\n")
        Path(f"{stem}_{i}.calc").write_text("")
    return 0


def calcif2(args: list[str]) -> int:
    """``calcif2 -f <job>.calc``: the job's .im."""
    Path(args[-1]).with_suffix(".im").write_text("fake model\n")
    return 0


TOOLS = {"checkmpifxcorr": checkmpifxcorr, "mpifxcorr": mpifxcorr, "mpirun": mpirun, "vex2difx": vex2difx,
         "calcif2": calcif2}

if __name__ == "__main__":
    sys.exit(TOOLS[sys.argv[1]](sys.argv[2:]))
