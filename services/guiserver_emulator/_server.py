"""A protocol-faithful DiFX guiServer on 127.0.0.1 that executes nothing (docs/protocols/guiserver.md §6.1).

* Binds 127.0.0.1 only; every client path ``/a/b`` lives at ``<sandbox>/a/b``; nothing is run.
* Version reply 8, 11, (16), 10..., 12..., 18; relay on/off and MESSAGE_SELECTION rules
  (docs/protocols/guiserver.md §3.3).
* Channelled (19) and direct (20) sub-streams; channelled data chunked as the real server
  chunks it (id, length, data as separate CHANNEL_DATA; raw streams length and data apart).
* File operations (no reply; ``ls`` streams ``[len][path\\n]`` then 0), GET_JOB_STATUS from
  ``.difxlog`` files, fake DifxStart jobs with scripted outcomes (see :data:`OUTCOMES`) producing
  the packet sequences of docs/protocols/guiserver.md §5.1, DifxStatusMessage relays with progress MJDs,
  DifxStop, GENERATE_FILELIST (MJDs faked), Mark5 operations (every unit unreachable) and the
  real-time monitor (START_DIFX_MONITOR: products read from the job's .input/.calc, synthetic
  integrations while the job runs; :mod:`._monitor`).
* The ``.difxlog`` is buffered as the real server does: created empty when the job reaches the run
  stage and written when the job ends, so job status says NO_STATUS while it runs and a crash
  loses its lines for good (``difxlog_live=True`` writes each line at once instead).
* Faithful defects on request: ``crash_after_job`` (every connection is dropped after a job that
  reached the run stage, and the listener comes back ``restart_delay`` s later) and
  ``startup_race`` (the first packet of every connection is lost, as a real guiServer loses it on
  about one connection in ten, and a CHANNEL_ALL_DATA_ON before the first version request is lost) and
  ``crash_on_disconnect`` (a client that disconnects while its job runs takes the server down).
* :meth:`GuiserverEmulator.freeze` stops the server as SIGSTOP would: connections stay open and
  accepted, nothing is read or sent until :meth:`GuiserverEmulator.thaw`.

Run one by hand: ``python -m flowbus.services.guiserver_emulator --port 50200 --sandbox DIR``
(:func:`main`).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Self

import structlog

from flowbus.schemas import BackendProtocolError

from ..guiserver import messages as gx
from ..guiserver.protocol import FrameDecoder, decode_int, encode_int
from ..guiserver.protocol import PacketId as P
from ._extra import run_file_list, run_mark5
from ._jobs import Client, Job, Stream, run_job, run_machines, run_vex2difx
from ._ls import ls_lines
from ._monitor import run_monitor

#: scripted job outcomes (choose per job name with ``outcomes={"job_1": "failure"}``)
OUTCOMES = ("good", "warning", "failure", "partial", "partial_failed", "config_fail", "slow", "no_tools", "silent")
_COMMAND_MAX = 93712
_log = structlog.get_logger("flowbus.guiserver.emulator")


class GuiserverEmulator:
    """A guiServer stand-in. ``start()`` binds, ``stop()`` releases everything (idempotent)."""

    def __init__(self, sandbox: str | os.PathLike[str], *, port: int = 0, difx_base: str = "/opt/difx",
                 versions: tuple[str, ...] = ("DIFX-DEVEL", "TEST"), user: str = "",
                 environment: Mapping[str, str] | None = None, outcomes: Mapping[str, str] | None = None,
                 step_delay: float = 0.01, slow_ticks: int = 400, crash_after_job: bool = False,
                 startup_race: bool = False, crash_on_disconnect: bool = False,
                 restart_delay: float = 0.2, difxlog_live: bool = False, monitor_interval: float = 0.05) -> None:
        self.sandbox = Path(sandbox).resolve()
        self.port = port
        self.difx_base, self.versions, self.user = difx_base, versions, user
        self.environment = dict(environment or {"DIFX_BASE": difx_base, "HOME": "/home/difx"})
        self.outcomes = dict(outcomes or {})
        self.step_delay, self.slow_ticks = step_delay, slow_ticks
        self.crash_after_job, self.startup_race, self.restart_delay = crash_after_job, startup_race, restart_delay
        self.received: list[tuple[int, bytes]] = []  # every client packet, for tests
        self.crashes = 0
        self.crash_on_disconnect = crash_on_disconnect
        #: write .difxlog lines at once (not the real server: it writes them when the job ends)
        self.difxlog_live = difxlog_live
        #: real-time monitor: seconds between two synthetic integrations; whether "monitor_server" runs
        self.monitor_interval = monitor_interval
        self.monitor_server_up = False
        #: set at every crash (tests wait on it)
        self.crashed = threading.Event()
        self._lock = threading.Lock()
        self._clients: list[Client] = []
        self._jobs: dict[str, Job] = {}
        self._listener: socket.socket | None = None
        self._running = False
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        #: cleared while frozen (every connection's reads and sends wait on it)
        self._thawed = threading.Event()
        self._thawed.set()

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        self.sandbox.mkdir(parents=True, exist_ok=True)
        self._running = True
        self._stopped.clear()
        self._listen()
        return self

    def stop(self) -> None:
        self._running = False
        self._stopped.set()
        self._thawed.set()
        self._drop_all()
        for job in list(self._jobs.values()):
            job.finish.set()
        for t in list(self._threads):
            t.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def crash(self, finish_jobs: bool = True) -> None:
        """Die like the real server (every connection gone) and come back ``restart_delay`` s later.
        Running jobs finish unseen (``finish_jobs``): only their ``.difxlog`` tells the outcome."""
        self.crashes += 1
        self.crashed.set()
        jobs = list(self._jobs.values())
        for job in jobs:
            job.lost = True  # the process that buffered its .difxlog is gone
        self._drop_all()  # before the jobs finish: no client may see their end
        for job in jobs if finish_jobs else []:
            job.finish.set()
        if self._running:
            self._spawn(self._restart)

    def freeze(self) -> None:
        """Stop like a SIGSTOPped server: connections stay open (new ones are still accepted by the
        kernel), nothing is read, answered or sent until :meth:`thaw`."""
        self._thawed.clear()

    def thaw(self) -> None:
        self._thawed.set()

    def _restart(self) -> None:
        if not self._stopped.wait(self.restart_delay) and self._running:
            self._listen()

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(8)
        sock.settimeout(0.05)
        self.port = sock.getsockname()[1]
        with self._lock:
            self._listener = sock
        self._spawn(self._accept, sock)

    def _drop_all(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            clients, self._clients = self._clients, []
        if listener is not None:
            listener.close()
        for c in clients:
            c.alive = False
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        def body() -> None:
            try:
                target(*args)
            except Exception as exc:  # noqa: BLE001 - a fake server thread must never take the test run down
                _log.warning("guiserver.emulator.thread_failed", error=repr(exc))

        t = threading.Thread(target=body, daemon=True, name=f"gs-emu-{target.__name__}")
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _accept(self, listener: socket.socket) -> None:
        while self._running and self._listener is listener:
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            client = Client(sock, thawed=self._thawed)
            with self._lock:
                self._clients.append(client)
            self._spawn(self._serve, client)

    # -- the main connection -----------------------------------------------------------------------

    def _serve(self, c: Client) -> None:
        frames = FrameDecoder(max_length=16 * 1024 * 1024)
        first = True
        try:
            while c.alive:
                self._thawed.wait()
                data = c.sock.recv(65536)
                if not data:
                    break
                self._thawed.wait()
                for p in frames.feed(data):
                    self.received.append((p.id, p.payload))
                    if first and self.startup_race:  # the real server's receive thread lost it
                        first = False
                        continue
                    first = False
                    self._dispatch(c, p.id, p.payload)
        except (OSError, BackendProtocolError):
            pass
        finally:
            c.alive = False
            with c.inbox_cond:
                c.inbox_cond.notify_all()
            c.sock.close()
            with self._lock:
                if c in self._clients:
                    self._clients.remove(c)
            if self.crash_on_disconnect and self._running and any(j.client is c for j in list(self._jobs.values())):
                # docs/protocols/guiserver.md §7, item 2: the connection object is deleted under a running job
                self.crash(finish_jobs=False)

    def _dispatch(self, c: Client, pid: int, payload: bytes) -> None:
        if pid == P.GUISERVER_VERSION:
            self._version(c)
        elif pid == P.RELAY:
            c.relay = len(payload) >= 4 and decode_int(payload) != 0
        elif pid == P.MESSAGE_SELECTION:
            c.selected.clear()
            for line in payload.decode(errors="replace").split("\n"):
                if "ALL_MESSAGES" in line and "SELECTED" not in line:
                    c.relay_all = True
                elif "SELECTED_MESSAGES" in line:
                    c.relay_all = False
                for token, types in gx.SELECTION_TOKENS.items():
                    if token in line:
                        c.selected.update(types)
        elif pid == P.DIFX_SETUP_PATH:
            if len(payload) < 4096:
                c.setup = payload.decode(errors="replace")
        elif pid == P.CHANNEL_ALL_DATA_ON:
            if not (self.startup_race and not c.greeted):
                c.channelled = True
        elif pid == P.CHANNEL_ALL_DATA_OFF:
            c.channelled = False
        elif pid in (P.RELAY_COMMAND,):
            self.inject(payload)
        elif pid == P.COMMAND:
            self._command(c, payload)
        elif pid == P.CHANNEL_DATA and len(payload) >= 4:
            with c.inbox_cond:
                c.inbox.setdefault(decode_int(payload), bytearray()).extend(payload[4:])
                c.inbox_cond.notify_all()
        elif pid == P.GENERATE_FILELIST:
            self._spawn(run_file_list, self, c, payload)
        elif pid == P.GET_JOB_STATUS:
            self._spawn(self._job_status, c, payload)
        elif pid == P.START_DIFX_MONITOR:
            self._spawn(run_monitor, self, c, payload)

    def _version(self, c: Client) -> None:
        c.greeted = True
        c.send(P.GUISERVER_VERSION, b"DEVELr7531-emulator")
        c.send(P.DIFX_BASE, self.difx_base.encode())
        if self.user:
            c.send(P.GUISERVER_USER, self.user.encode())
        if self.versions:
            for v in sorted(self.versions):
                c.send(P.AVAILABLE_DIFX_VERSION, v.encode())
        else:
            c.send(P.WARNING, (f'On DiFX Host "{self.difx_base}/bin/rungeneric.*" returns empty or path does not '
                               "exist - no versions of DiFX can be located.\n").encode())
        for k, v in self.environment.items():
            c.send(P.GUISERVER_ENVIRONMENT, f"{k}={v}".encode())
        c.send(P.CHANNEL_ALL_DATA)

    def _command(self, c: Client, payload: bytes) -> None:
        if len(payload) > _COMMAND_MAX:
            c.send(P.ERROR, f"Message length ({len(payload)}) is longer than allowed DiFX maximum "
                            f"({_COMMAND_MAX}) - ignored!\n".encode())
            return
        try:
            msg = gx.parse(payload)
        except BackendProtocolError:
            msg = gx.DifxMessage(type="Unknown")
        f = msg.fields
        if msg.type == "DifxFileOperation":
            self._file_op(c, f)
        elif msg.type == "DifxMachinesDefinition":
            self._spawn(run_machines, self, c, msg)
        elif msg.type == "DifxVex2DifxRun":
            self._spawn(run_vex2difx, self, c, f)
        elif msg.type == "DifxFileTransfer":
            self._spawn(self._transfer, c, f)
        elif msg.type == "DifxStart":
            self._spawn(self._job, c, msg)
        elif msg.type == "DifxStop":
            job = self._jobs.get(f.get("input", ""))
            if job is not None:
                job.stopped.set()
        elif msg.type in ("DifxMk5Control", "DifxGetDirectory", "DifxMark5Copy"):
            self._spawn(run_mark5, c, msg.type, f)
        elif msg.type == "DifxCommand":
            self.inject(payload)
        else:
            c.send(P.WARNING, f"Received command message type {msg.type_id} - don't know what this is....\n".encode())

    # -- relay ---------------------------------------------------------------------------------------

    def inject(self, datagram: bytes) -> None:
        """A DiFX multicast datagram arrives: relay it (per-client filter) and log it for jobs."""
        datagram = datagram[:10240].split(b"\x00", 1)[0]
        try:
            msg: gx.DifxMessage | None = gx.parse(datagram)
        except BackendProtocolError:
            msg = None
        mtype = msg.type if msg else "Unknown"
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            if c.relay and (c.relay_all or mtype in c.selected):
                c.send(P.RELAY, datagram)
        job = next((j for j in self._jobs.values() if msg and j.name == msg.identifier), None)
        if job is not None and msg is not None:
            self._log_line(job, msg)

    def _log_line(self, job: Job, msg: gx.DifxMessage) -> None:
        prefix = f"{time.ctime()} {msg.mpi_id:3d} {msg.source}"
        lines = []
        if msg.type == "DifxStatusMessage":
            lines.append(f"{prefix}  STATUS {msg.fields.get('state', '')}  {msg.fields.get('message', '')}")
            if msg.weights:
                lines.append(f"{prefix}  WEIGHTS " + " ".join(f"{w:4.2f}" for _, w in msg.weights))
        elif msg.type == "DifxAlertMessage" and msg.severity() <= 4:
            lines.append(f"{prefix} {gx.SEVERITIES[msg.severity()][0]}  {msg.fields.get('alertMessage', '')}")
        if lines and self.difxlog_live:  # the job runs on under mpirun, unseen after a crash
            with open(job.log, "a") as fh:
                fh.write("\n".join(lines) + "\n")
        elif lines and not job.lost:
            job.buffer.append("\n".join(lines) + "\n")

    # -- file operations -----------------------------------------------------------------------------

    def real(self, path: str) -> Path:
        """Where client path ``path`` lives in the sandbox (never outside it)."""
        parts = [p for p in PurePosixPath("/" + path).parts[1:] if p not in ("..", ".")]
        return self.sandbox.joinpath(*parts)

    def client_path(self, real: str | Path) -> str:
        return "/" + str(Path(real).relative_to(self.sandbox))

    def _file_op(self, c: Client, f: Mapping[str, str]) -> None:
        op, path, arg = f.get("operation", ""), f.get("path", ""), f.get("arg", "")
        try:
            target = self.real(path)
            if op == "mkdir":
                target.mkdir(parents=True, exist_ok=True)
            elif op == "rmdir":
                target.rmdir()
            elif op == "touch":
                target.touch()
            elif op == "rm":
                for hit in glob.glob(str(target)):
                    if os.path.isdir(hit) and "r" in arg:
                        shutil.rmtree(hit)
                    elif not os.path.isdir(hit):
                        os.unlink(hit)
            elif op in ("mv", "cp") and arg.startswith("/"):
                dest = self.real(arg)
                (shutil.move if op == "mv" else shutil.copy)(str(target), str(dest))
            elif op == "ls":
                self._spawn(self._ls, c, target, f)
        except OSError:
            pass  # the real server only prints these on its own stderr

    def _ls(self, c: Client, target: Path, f: Mapping[str, str]) -> None:
        """``ls <arg> <path>`` as GNU ls prints it after the shell's glob expansion (stdout only):
        operands that are files as given, a lone directory as bare entry names, several operands
        with ``<dir>:`` headers; ``-l`` adds ``total N`` and long lines (docs/protocols/guiserver.md §6.1a)."""
        stream = Stream(c, int(f.get("port", "0")), f.get("address", ""))
        for line in ls_lines(self, target, f.get("arg", "")):
            stream.item((line + "\n").encode())
        stream.raw(encode_int(0))
        stream.close()

    def _transfer(self, c: Client, f: Mapping[str, str]) -> None:
        """getFile (``from DiFX``) and sendFile (``to DiFX``) of docs/protocols/guiserver.md §5.5, NUL truncation
        included."""
        stream = Stream(c, int(f.get("port", "0")), f.get("address", ""))
        if f.get("direction") == "from DiFX":
            origin = f.get("origin", "")
            target = self.real(origin)
            if not origin.startswith("/"):
                stream.raw(encode_int(-1))
            elif not target.is_file():
                stream.raw(encode_int(-2))
            else:
                data = target.read_bytes()
                stream.raw(encode_int(len(data)))
                for i in range(0, len(data), 1024):
                    stream.raw(data[i:i + 1024])
        elif f.get("direction") == "to DiFX":
            head = stream.read(4)
            size = decode_int(head) if head else -10
            got = stream.read(size) if size > 0 else b""
            if got is None:
                size, got = -10, b""
            kept = b"".join(got[i:i + 1024].split(b"\x00", 1)[0] for i in range(0, len(got), 1024))
            dest = f.get("destination", "")
            parent = self.real(dest).parent
            code = size
            if not dest.startswith("/"):
                code = -1
            elif not parent.exists():
                code = -2
            elif not parent.is_dir():
                code = -5
            elif size >= 0:
                self.real(dest).write_bytes(kept)
            stream.raw(encode_int(code))
        stream.close()

    # -- job status ----------------------------------------------------------------------------------

    def _job_status(self, c: Client, payload: bytes) -> None:
        short = decode_int(payload, 0)
        n1 = decode_int(payload, 4)
        pattern = payload[8:8 + n1].decode(errors="replace")
        n2 = decode_int(payload, 8 + n1)
        address = payload[12 + n1:12 + n1 + n2].decode(errors="replace")
        port = decode_int(payload, 12 + n1 + n2)
        stream = Stream(c, port, address)
        stream.packet(102)
        stream.packet(110, time.ctime().encode())
        for hit in sorted(glob.glob(str(self.real(pattern)))):
            if not hit.endswith(".input"):
                continue
            stream.packet(104, self.client_path(hit).encode())
            log = Path(hit[:-len(".input")] + ".difxlog")
            if not log.exists():
                stream.packet(105)
                continue
            status = [ln for ln in log.read_text().splitlines() if "  STATUS " in ln]
            if short != 1 or not status:
                stream.packet(108)
            else:
                last = status[-1]
                stream.packet(106, (last[:24] + last.split("  STATUS ", 1)[1])[:99].encode())
        stream.packet(101)
        stream.close()

    # -- jobs ------------------------------------------------------------------------------------------

    def _job(self, c: Client, msg: gx.DifxMessage) -> None:
        f = msg.fields
        inp = f.get("input", "")
        name = PurePosixPath(inp).stem
        outcome = self.outcomes.get(name, "good")
        try:
            s = Stream(c, int(f.get("port", "0")), f.get("address", ""))
        except (OSError, ValueError):
            c.send(P.ERROR, b"client socket connection from guiServer to GUI failed - unable to start job")
            return
        ran = False
        try:
            ran = run_job(self, c, s, msg, inp, name, outcome)
        finally:
            job = self._jobs.pop(inp, None)
            if job is not None:
                job.flush()  # the real server writes the .difxlog when the job ends
            s.close()
        if ran and self.crash_after_job:
            self.crash(finish_jobs=False)


def main(argv: list[str] | None = None) -> int:
    """``python -m flowbus.services.guiserver_emulator``: serve until interrupted."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m flowbus.services.guiserver_emulator",
                                     description="a guiServer emulator on 127.0.0.1 (executes nothing)")
    parser.add_argument("--port", type=int, default=50200)
    parser.add_argument("--sandbox", default="", help="directory that holds every client path (default: a temp dir)")
    parser.add_argument("--crash-after-job", action="store_true")
    parser.add_argument("--startup-race", action="store_true")
    args = parser.parse_args(argv)
    sandbox = args.sandbox or tempfile.mkdtemp(prefix="guiserver-emulator-")
    emu = GuiserverEmulator(sandbox, port=args.port, crash_after_job=args.crash_after_job,
                            startup_race=args.startup_race).start()
    print(f"guiServer emulator on {emu.address}, sandbox {emu.sandbox}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
    return 0


__all__ = ["OUTCOMES", "GuiserverEmulator", "main"]
