"""The emulator's connection helpers and its fake jobs (docs/protocols/guiserver.md §5.1): no process is ever run."""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..guiserver import messages as gx
from ..guiserver.protocol import JobId as J
from ..guiserver.protocol import PacketId as P
from ..guiserver.protocol import channel_data, encode, encode_int


@dataclass
class Client:
    sock: socket.socket
    lock: threading.Lock = field(default_factory=threading.Lock)
    channelled: bool = False
    relay: bool = False
    relay_all: bool = True
    selected: set[str] = field(default_factory=set)
    setup: str = ""
    greeted: bool = False
    alive: bool = True
    #: client -> server CHANNEL_DATA, queued per port (first in, first out)
    inbox: dict[int, bytearray] = field(default_factory=dict)
    inbox_cond: threading.Condition = field(default_factory=threading.Condition)
    #: cleared while the emulator is frozen: nothing is sent
    thawed: threading.Event | None = None

    def take(self, port: int, n: int, timeout: float = 10.0) -> bytes | None:
        """``n`` bytes the client sent on ``port`` (None after ``timeout`` or a disconnect)."""
        with self.inbox_cond:
            buf = self.inbox.setdefault(port, bytearray())
            if not self.inbox_cond.wait_for(lambda: len(buf) >= n or not self.alive, timeout) or len(buf) < n:
                return None
            out = bytes(buf[:n])
            del buf[:n]
            return out

    def send(self, pid: int, payload: bytes = b"") -> None:
        if self.thawed is not None:
            self.thawed.wait()
        if not self.alive:
            return
        try:
            with self.lock:
                self.sock.sendall(encode(pid, payload))
        except OSError:
            self.alive = False


class Stream:
    """One sub-stream: CHANNEL_DATA chunks (channelled) or a connect-back socket (direct)."""

    def __init__(self, client: Client, port: int, address: str) -> None:
        self.client, self.port, self.sock = client, port, None
        if client.channelled:
            client.send(P.CHANNEL_CONNECTION, encode_int(port))
        else:
            host = address or "127.0.0.1"
            if host not in ("127.0.0.1", "localhost", "0.0.0.0"):  # noqa: S104 - compared, never bound
                raise OSError(f"emulator connects back to loopback only, not {host}")
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def raw(self, data: bytes) -> None:
        if self.client.thawed is not None:
            self.client.thawed.wait()
        if self.sock is not None:
            try:
                self.sock.sendall(data)
            except OSError:
                pass
        elif self.client.alive:
            try:
                with self.client.lock:
                    self.client.sock.sendall(channel_data(self.port, data))
            except OSError:
                self.client.alive = False

    def packet(self, pid: int, payload: bytes = b"") -> None:
        self.raw(encode_int(pid))
        self.raw(encode_int(len(payload)))
        if payload:
            self.raw(payload)

    def item(self, data: bytes) -> None:
        self.raw(encode_int(len(data)))
        if data:
            self.raw(data)

    def read(self, n: int, timeout: float = 10.0) -> bytes | None:
        """``n`` bytes the client sends on this stream (None on timeout or close)."""
        if self.sock is None:
            return self.client.take(self.port, n, timeout)
        buf = b""
        self.sock.settimeout(timeout)
        try:
            while len(buf) < n:
                more = self.sock.recv(n - len(buf))
                if not more:
                    return None
                buf += more
        except OSError:
            return None
        return buf

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


@dataclass
class Job:
    name: str
    input: str
    log: Path
    client: Client | None = None
    stopped: threading.Event = field(default_factory=threading.Event)
    finish: threading.Event = field(default_factory=threading.Event)
    #: .difxlog lines held until the job ends (the real server buffers them; a crash loses them)
    buffer: list[str] = field(default_factory=list)
    #: the server "process" that ran it crashed: its buffered lines are gone
    lost: bool = False

    def flush(self) -> None:
        if self.buffer and not self.lost:
            with open(self.log, "a") as fh:
                fh.write("".join(self.buffer))
        self.buffer.clear()


def run_job(emu: Any, c: Client, s: Stream, msg: gx.DifxMessage, inp: str, name: str, outcome: str) -> bool:
    """The steps of docs/protocols/guiserver.md §5.1 for one fake job; True when it reached the run stage."""
    f, step = msg.fields, emu.step_delay
    s.packet(J.STARTED)
    s.packet(J.PARAMETER_CHECK_IN_PROGRESS)
    real = emu.real(inp)
    if not inp or not real.is_file():
        c.send(P.ERROR, f"DiFX start failed - input file {inp} not found.".encode())
        s.packet(J.FAILURE_INPUTFILE_NOT_FOUND)
        s.packet(J.TERMINATED)
        return False
    s.packet(J.RUN_CONFIG_CHECK)
    bad = outcome == "config_fail"
    if outcome == "no_tools":
        c.send(P.WARNING, b"checkmpifxcorr... /bin/bash: line 1: checkmpifxcorr: command not found")
        s.packet(J.DIFX_WARNING, b"/bin/bash: line 1: checkmpifxcorr: command not found")
        s.packet(J.CONFIG_COMMAND_NOT_FOUND)
    else:
        c.send(P.INFORMATION, f"checkmpicorr... Checking {inp}".encode())
        s.packet(J.DIFX_MESSAGE, f"Checking {inp}".encode())
        if bad:
            c.send(P.WARNING, b"checkmpifxcorr... Error: bad configuration")
            s.packet(J.DIFX_WARNING, b"Error: bad configuration")
        else:
            c.send(P.INFORMATION, f"checkmpicorr... No errors with input file {inp}".encode())
            s.packet(J.DIFX_MESSAGE, f"No errors with input file {inp}".encode())
    if bad:
        c.send(P.ERROR, f"Input file {inp} failed the configuration check.".encode())
        s.packet(J.FAILURE_INPUTFILE_BAD_CONFIG)
    else:
        s.packet(J.CONFIG_PASSED)
    function = f.get("function", "")
    if function == "CONFIG_ONLY" or (function == "BAIL_ON_CONFIG_FAIL" and bad):
        if bad:
            s.packet(J.DIFX_ERROR, b"Execution stopped")
            c.send(P.ERROR, f"Execution of job {inp} stopped.".encode())
        s.packet(J.STOPPED_AFTER_CONFIG)
        return False
    for attr, pid, what in (("manager", J.FAILURE_NO_HEADNODE, "no headnode specified."),
                            ("datastream", J.FAILURE_NO_DATASOURCES, "no data sources specified."),
                            ("process", J.FAILURE_NO_PROCESSORS, "no processing nodes  specified.")):
        if not _has_nodes(msg.raw, attr):
            c.send(P.ERROR, f"DiFX start failed - {what}".encode())
            s.packet(pid)
            s.packet(J.TERMINATED)
            return False
    s.packet(J.PARAMETER_CHECK_SUCCESS)
    if outcome == "silent":  # docs/protocols/guiserver.md §5.1 step 10: statvfs failed, the stream just stops
        c.send(P.ERROR, f"statvfs failed when accessing directory {inp.rpartition('/')[0]} : it seems not to "
                        "exist!".encode())
        return False
    out = real.with_suffix(".difx")
    force = f.get("force", "0")[:1] not in ("0", "n", "N", "f", "F", "")
    if out.exists() and not force:
        c.send(P.ERROR, f"Output file {inp[:-6]}.difx exists.  Aborting correlation.".encode())
        s.packet(J.FAILURE_OUTPUT_EXISTS)
        s.packet(J.TERMINATED)
        return False
    job = Job(name, inp, real.with_suffix(".difxlog"), c)
    job.log.touch()  # opened for append at step 12: empty while the job runs
    emu._jobs[inp] = job
    if out.exists():
        s.packet(J.DELETING_PREVIOUS_OUTPUT)
        shutil.rmtree(out, ignore_errors=True)
    prog = f.get("difxProgram") or "mpifxcorr"
    c.send(P.WARNING, f"executing: {start_command(emu, c, msg, inp, prog)}\n".encode())
    s.packet(J.STARTING_DIFX)

    def tell(doc: bytes) -> None:
        """A DifxStatusMessage of the job; none once the server that ran it crashed (mpifxcorr's
        output pipe to it is gone), so a restarted server never relays a lost job's end."""
        if emu.difxlog_live or not job.lost:  # a line-by-line log stands for a job running on unseen
            emu.inject(doc)

    def end(*packets: tuple[int, bytes]) -> bool:
        job.flush()  # the .difxlog is written when the job ends (emulated just before its terminal id)
        for pid, payload in packets:
            s.packet(pid, payload)
        return True

    if outcome == "no_tools":
        c.send(P.ERROR, f"{prog}... /bin/bash: line 1: mpirun: command not found".encode())
        s.packet(J.DIFX_ERROR, b"/bin/bash: line 1: mpirun: command not found")
        c.send(P.ERROR, f"{prog} FAILED".encode())
        return end((J.DIFX_ERROR, f"{prog} FAILED".encode()), (J.JOB_FAILED, b""))
    t0, t1 = 60000.0, 60000.01
    tell(gx.status_message(name, "Starting", "starting", start_mjd=t0, stop_mjd=t1))
    ticks = emu.slow_ticks if outcome == "slow" else 2
    for i in range(ticks):
        if job.stopped.is_set() or (job.finish.is_set() and outcome == "slow"):
            break
        c.send(P.INFORMATION, f"{prog}... tick {i + 1}".encode())
        s.packet(J.DIFX_MESSAGE, f"tick {i + 1}".encode())
        if outcome == "warning" and i == 0:
            c.send(P.WARNING, f"{prog}... WARNING: weak signal".encode())
            s.packet(J.DIFX_WARNING, b"WARNING: weak signal")
        if outcome in ("failure", "partial", "partial_failed") and i == 0:
            c.send(P.ERROR, f"{prog}... Error: disk read failed".encode())
            s.packet(J.DIFX_ERROR, b"Error: disk read failed")
            if outcome == "failure":
                break
        pct = (i + 1) / ticks
        tell(gx.status_message(name, "Running", f"{name} {100 * pct:.0f}%", vis_mjd=t0 + pct * (t1 - t0),
                                      start_mjd=t0, stop_mjd=t1, weights=[0.95]))
        job.stopped.wait(step)
    if job.stopped.is_set():
        c.send(P.WARNING, f"{prog} terminated by user".encode())
        tell(gx.status_message(name, "Terminated", "stopped by user"))
        return end((J.TERMINATED, b""))
    if outcome == "partial_failed":
        # the same program output as "partial", but the server's stderr thread saw the error line
        # after the stdout thread's last line (docs/protocols/guiserver.md §6.1a): JOB_FAILED
        c.send(P.ERROR, f"{prog}... Error: disk read failed".encode())
        s.packet(J.DIFX_ERROR, b"Error: disk read failed")
    if outcome in ("failure", "partial_failed"):
        tell(gx.status_message(name, "Crashed", "disk read failed"))
        c.send(P.ERROR, f"{prog} FAILED".encode())
        return end((J.DIFX_ERROR, f"{prog} FAILED".encode()), (J.JOB_FAILED, b""))
    out.mkdir(parents=True, exist_ok=True)
    tell(gx.status_message(name, "Done", "done", vis_mjd=t1, start_mjd=t0, stop_mjd=t1))
    c.send(P.WARNING, f"{prog} complete".encode())
    s.packet(J.DIFX_COMPLETE)
    return end((J.JOB_ENDED_WITH_ERRORS if outcome == "partial" else J.ENDED_GRACEFULLY, b""))


def start_command(emu: Any, c: Client, msg: gx.DifxMessage, inp: str, prog: str) -> str:
    """The command line the real server runs and reports in ``executing: ...``
    (docs/protocols/guiserver.md §5.1): ``-np`` is the number of lines of
    ``<filebase>.machines`` (0 without one); empty parts leave their spaces."""
    f = msg.fields
    base = inp.rpartition(".")[0] or inp
    machines = emu.real(f"{base}.machines")
    n = len(machines.read_text().splitlines(keepends=True)) if machines.is_file() else 0
    options = f.get("mpiOptions") or "--mca mpi_yield_when_idle 1 --mca rmaps seq"
    whole = re.match(r"\s*[-+]?\d+", f.get("restartSeconds", ""))  # parsed with atoi
    seconds = int(whole.group()) if whole else 0
    restart = f"-r {float(seconds):f}" if seconds > 0 else ""
    monitor = "-Mlocalhost:9999" if f.get("function") == "RUN_MONITOR" else ""
    return (f"{f.get('mpiWrapper') or 'mpirun'} -np {n} --bynode --hostfile {base}.machines {options} {c.setup} "
            f"{prog} {restart} {inp} {monitor}")




def _has_nodes(raw: str, element: str) -> bool:
    """Whether the DifxStart document names at least one node in ``<element node(s)="...">``."""
    for m in re.finditer(rf"<{element}\b([^>]*)>", raw):
        vals = re.findall(r'nodes?\s*=\s*"([^"]*)"', m.group(1))
        if any(v.strip(" ,[]") for v in vals):
            return True
    return False


def run_vex2difx(emu: Any, c: Client, f: Mapping[str, str]) -> None:
    """DifxVex2DifxRun (docs/protocols/guiserver.md §5.6), faked: ``<stem>_1``/``<stem>_2`` .input and
    .calc from ``<stem>.v2d``, then a .im per new .calc. "New" is the real server's rule: modified in
    or after the second the run started, so any other .input/.calc written then counts too. The raw
    stream lists the new .input paths, then the new .im paths, and ends with 0."""
    where, name, calc = f.get("passPath", ""), f.get("file", ""), f.get("calcCommand", "calcif2")
    stamp = int(time.time())
    stream = Stream(c, int(f.get("port", "0")), f.get("address", ""))
    base = emu.real(where)

    def new(suffix: str) -> list[Path]:
        return sorted((p for p in base.glob(f"*{suffix}") if int(p.stat().st_mtime) >= stamp), key=lambda p: p.name)

    if f.get("calcOnly", "0") == "0":
        c.send(P.WARNING, f"Executing: cd {where}; {c.setup} vex2difx -f {name}".encode())
        v2d = base / name
        if v2d.is_file():
            c.send(P.INFORMATION, f"vex2difx... processing {name}".encode())
            for i in (1, 2):
                job = base / f"{v2d.stem}_{i}"
                job.with_suffix(".input").write_text(f"# fake job {i} of {name}\n")
                job.with_suffix(".calc").write_text("")
            c.send(P.WARNING, b"vex2difx complete")
        else:
            c.send(P.ERROR, f"vex2difx... cannot open {name}".encode())
            c.send(P.ERROR, b"vex2difx RETURNED ERRORS")
        for inp in new(".input"):
            stream.item(emu.client_path(inp).encode())
    else:
        # `touch <file>.calc` then `rm -f <file>.im` in a shell: a glob that matches no .calc file
        # is kept literally, so touch creates a file named e.g. `exp_*.calc` (docs/protocols/guiserver.md §6.1a)
        c.send(P.WARNING, f"Executing: cd {where}; touch {name}.calc".encode())
        c.send(P.WARNING, f"Executing: cd {where}; rm -f {name}.im".encode())
        for calc_file in sorted(base.glob(f"{name}.calc")) or [base / f"{name}.calc"]:
            calc_file.touch()
            calc_file.with_suffix(".im").unlink(missing_ok=True)
    c.send(P.WARNING, f"running {calc} on all new .calc files".encode())
    for path in new(".calc"):
        im = path.with_suffix(".im")
        im.write_text("fake model\n")
        stream.item(emu.client_path(im).encode())
    c.send(P.WARNING, f"{calc} complete".encode())
    stream.raw(encode_int(0))
    stream.close()


def run_machines(emu: Any, c: Client, msg: gx.DifxMessage) -> None:
    """DifxMachinesDefinition (docs/protocols/guiserver.md §5.7): write the .machines/.threads files by the
    server's rules."""
    f = msg.fields
    stream = Stream(c, int(f.get("port", "0")), f.get("address", ""))
    stream.packet(102)
    stream.packet(103)
    head = _attr_nodes(msg.raw, "manager")
    ds = _attr_nodes(msg.raw, "datastream")
    procs = _attr_nodes(msg.raw, "process")
    for nodes, pid, what in ((head, 105, "no headnode specified."), (ds, 106, "no data sources specified."),
                             (procs, 107, "no processing nodes  specified.")):
        if not nodes:
            c.send(P.ERROR, f"Machines specification failed - {what}".encode())
            stream.packet(pid)
            stream.packet(100)
            stream.close()
            return
    inp = f.get("input", "")
    base = inp.removesuffix(".input")
    machines, threads = f.get("machinesFile") or base + ".machines", f.get("threadsFile") or base + ".threads"
    if not f.get("machinesFile"):
        c.send(P.WARNING, b"No machines file specified - generating path from input file.")
        stream.packet(108)
    stream.packet(111, machines.encode())
    if not f.get("threadsFile"):
        c.send(P.WARNING, b"No threads file specified - generating path from input file.")
        stream.packet(109)
    stream.packet(110, threads.encode())
    stream.packet(104)
    hname = head[0][0]
    listed = [(n, t - 1 if n == hname else t) for n, t in procs]
    listed = [(n, t) for n, t in listed if t > 0]
    try:
        emu.real(machines).write_text("\n".join([hname] + [n for n, _ in ds] + [n for n, _ in listed]) + "\n")
        stream.packet(115)
        emu.real(threads).write_text(f"NUMBER OF CORES:    {len(listed)}\n" + "".join(f"{t}\n" for _, t in listed))
        stream.packet(116)
    except OSError as exc:
        stream.packet(113, str(exc).encode())
        stream.packet(100)
        stream.close()
        return
    stream.packet(101)
    stream.close()


def _attr_nodes(raw: str, element: str) -> list[tuple[str, int]]:
    """(node, threads) pairs of every ``<element node(s)="..." threads="n"/>`` in the document."""
    out: list[tuple[str, int]] = []
    for m in re.finditer(rf"<{element}\b([^>]*)>", raw):
        attrs: dict[str, str] = dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', m.group(1)))
        names = re.split(r"[\s,\[\]]+", attrs.get("nodes") or attrs.get("node") or "")
        out += [(n, int(attrs.get("threads", "1") or 1)) for n in names if n]
    return out
