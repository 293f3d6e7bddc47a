"""The operations of a guiServer session (mixed into :class:`~.guiserver.GuiserverSession`).

Every path and argument is checked by :mod:`._gs_check` before anything is sent; command fields
that guiServer runs in a shell (mpiWrapper, difxProgram, setup path) come only from the config.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

from flowbus.schemas import (
    BackendError,
    BackendProtocolError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    GuiserverSessionConfig,
    State,
)

from . import _gs_check as check
from . import _gs_xml as gx
from ._gs_events import Translator
from ._gs_protocol import (
    JOB_TERMINAL,
    Connection,
    PacketId,
    StreamKind,
    channel_data,
    encode,
    encode_int,
    encode_string,
)

OPERATIONS = {name: name for name in (
    "version", "relay", "select", "mkdir", "rmdir", "touch", "rm", "mv", "cp", "ls",
    "start_job", "stop_job", "wait_job", "job_status", "jobs", "get_file", "send_file", "vex2difx", "machines",
)}


#: negative DifxFileTransfer replies (docs/protocols/guiserver.md §5.5)
_TRANSFER_CODES = {-1: "path is not absolute", -2: "file or parent directory does not exist",
                   -3: "permission denied", -4: "server user unknown", -5: "parent is not a directory",
                   -10: "the server could not open the sub-stream"}


#: DifxMachinesDefinition sub-packet names (docs/protocols/guiserver.md §5.7)
_MACHINES_IDS = {100: "TERMINATED", 101: "ENDED_GRACEFULLY", 102: "STARTED", 103: "PARAMETER_CHECK_IN_PROGRESS",
                 104: "PARAMETER_CHECK_SUCCESS", 105: "FAILURE_NO_HEADNODE", 106: "FAILURE_NO_DATASOURCES",
                 107: "FAILURE_NO_PROCESSORS", 108: "WARNING_NO_MACHINES_FILE_SPECIFIED",
                 109: "WARNING_NO_THREADS_FILE_SPECIFIED", 110: "THREADS_FILE_NAME", 111: "MACHINES_FILE_NAME",
                 112: "FAILURE_NO_FILES_SPECIFIED", 113: "FAILURE_OPEN_MACHINES_FILE",
                 114: "FAILURE_OPEN_THREADS_FILE", 115: "MACHINES_FILE_CREATED", 116: "THREADS_FILE_CREATED",
                 119: "FAILURE_MPIRUN", 120: "SUCCESS_MPIRUN", 121: "LOW_THREAD_COUNT", 122: "RUNNING_MPIRUN_TESTS"}


class GuiserverOperations:
    """The operations table of :data:`OPERATIONS` (state lives in the session)."""

    config: GuiserverSessionConfig
    setup_path: str
    _lock: threading.RLock
    _cond: threading.Condition
    _conn: Connection | None
    _up: bool
    _tx: Translator
    _ports: itertools.count[int]
    _relay: bool
    _selection: list[str]

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def _send(self, data: bytes) -> None:
        raise NotImplementedError

    def _publish(self, event: Any) -> None:
        raise NotImplementedError

    def _settings(self) -> bytes:
        raise NotImplementedError

    def _stream(self, kind: StreamKind, build: Callable[[int], bytes], timeout: float | None,
                upload: bytes = b"", on_item: Callable[[Any], None] | None = None,
                terminal: frozenset[int] = frozenset({101})) -> list[Any]:
        raise NotImplementedError

    def _open_port(self, kind: StreamKind, terminal: frozenset[int], upload: bytes = b"") -> int:
        raise NotImplementedError

    def _where(self, port: int) -> list[tuple[str, str | int]]:
        """The ``<address>``/``<port>`` fields: direct mode names our loopback listener."""
        return [("port", port)] if self.config.channelled else [("address", "127.0.0.1"), ("port", port)]

    # -- operations ----------------------------------------------------------------------------------

    def version(self) -> dict[str, Any]:
        with self._lock:
            info = self._conn.version if self._conn is not None else None
            if info is None:
                raise BackendUnavailable(f"not connected to {self.address}")
            return {"version": info.version, "difx_base": info.difx_base, "user": info.user,
                    "versions": list(info.versions), "environment": list(info.environment),
                    "setup_path": self.setup_path}

    def relay(self, on: bool = True) -> None:
        with self._lock:
            self._relay = bool(on)
            self._send(self._settings())

    def select(self, tokens: list[str]) -> None:
        chosen = check.selection(tokens)
        with self._lock:
            self._selection = chosen
            self._send(self._settings())

    def _file_op(self, op: str, path: str, arg: str = "", port: int | None = None) -> bytes:
        body: list[tuple[str, str | int]] = [("operation", op), ("path", path)]
        if arg:
            body.append(("arg", arg))
        if port is not None:
            body += self._where(port)
        return encode(PacketId.COMMAND, gx.build("DifxFileOperation", body))

    def _p(self, value: object, what: str = "path", glob: bool = False) -> str:
        return check.path(value, self.config.allowed_dirs, glob=glob, what=what)

    def mkdir(self, path: str) -> None:
        self._send(self._file_op("mkdir", self._p(path)))

    def rmdir(self, path: str) -> None:
        self._send(self._file_op("rmdir", self._p(path)))

    def touch(self, path: str) -> None:
        self._send(self._file_op("touch", self._p(path)))

    def rm(self, path: str, args: str = "") -> None:
        flags = check.args(args, allowed_flags="rf")
        self._send(self._file_op("rm", self._p(path, glob=True), flags))

    def mv(self, src: str, dst: str) -> None:
        self._send(self._file_op("mv", self._p(src), self._p(dst, "destination")))

    def cp(self, src: str, dst: str) -> None:
        self._send(self._file_op("cp", self._p(src), self._p(dst, "destination")))

    def ls(self, path: str, args: str = "", timeout: float | None = None) -> list[str]:
        target, flags = self._p(path, glob=True), check.args(args, allowed_flags="dlatrS1")
        items = self._stream(StreamKind.RAW, lambda port: self._file_op("ls", target, flags, port), timeout)
        return [it.data.decode(errors="replace").rstrip("\n") for it in items if it.data is not None]

    def get_file(self, path: str, timeout: float | None = None) -> bytes:
        """The content of a server file (DifxFileTransfer ``from DiFX``, docs/protocols/guiserver.md §5.5)."""
        origin = self._p(path, "origin")

        def body(port: int) -> list[tuple[str, str | int]]:
            return [("direction", "from DiFX"), ("origin", origin), ("destination", "/dev/null"), *self._where(port)]

        items = self._stream(StreamKind.SIZED, lambda port: encode(
            PacketId.COMMAND, gx.build("DifxFileTransfer", body(port))), timeout)
        if not items:
            raise BackendProtocolError(f"get_file {origin}: the sub-stream ended without a reply")
        size, content = items[0].id, items[0].payload
        if size < 0:
            raise BackendRejected(f"get_file {origin}: {_TRANSFER_CODES.get(size, f'error {size}')}")
        return bytes(content)

    def send_file(self, path: str, data: bytes, timeout: float | None = None, allow_nul: bool = False) -> int:
        """Write ``data`` to a server file (``to DiFX``); returns the size the server reports.

        guiServer writes each 1024-byte block as a C string, so everything after a NUL byte in a
        block is lost: data with NUL bytes is refused unless ``allow_nul``."""
        dest = self._p(path, "destination")
        if not isinstance(data, bytes | bytearray):
            raise BackendRejected(f"send_file: data must be bytes, not {type(data).__name__}")
        if b"\x00" in data and not allow_nul:
            raise BackendRejected("send_file: data contains NUL bytes, which guiServer truncates "
                                  "(docs/protocols/guiserver.md §5.5)")
        if len(data) > 2**31 - 1:
            raise BackendRejected("send_file: guiServer sizes are signed 32-bit")

        def request(port: int) -> bytes:
            doc = gx.build("DifxFileTransfer", [("direction", "to DiFX"), ("origin", "/dev/null"),
                                                ("destination", dest), *self._where(port)])
            if not self.config.channelled:
                return encode(PacketId.COMMAND, doc)
            # each value the server reads is its own chunk (its channel reader over-reads otherwise)
            return (encode(PacketId.COMMAND, doc) + channel_data(port, encode_int(len(data)))
                    + channel_data(port, bytes(data)))

        upload = b"" if self.config.channelled else encode_int(len(data)) + bytes(data)
        items = self._stream(StreamKind.INT, request, timeout, upload)
        if not items:
            raise BackendProtocolError(f"send_file {dest}: the sub-stream ended without a reply")
        code = int(items[0].id)
        if code < 0:
            raise BackendRejected(f"send_file {dest}: {_TRANSFER_CODES.get(code, f'error {code}')}")
        return code

    def vex2difx(self, pass_path: str, file: str, calc_only: bool = False, wait: bool = True,
                 timeout: float | None = 600.0) -> list[str] | None:
        """Run vex2difx (unless ``calc_only``) and the calc command in ``pass_path`` (docs/protocols/guiserver.md §5.6).

        ``file`` is the .v2d name, or with ``calc_only`` a job name or glob. Each new .input/.im
        path is published at once as ``LogLine(stream="vex2difx.file")``; the end as
        ``StateChanged(key="vex2difx/<file>", state=complete, attrs={"files": n})``. Returns the
        paths, or None at once when ``wait`` is False (the run goes on in a thread)."""
        where = self._p(pass_path, "pass-path")
        name = check.file_name(file, glob=calc_only)
        key = f"vex2difx/{name}"

        def request(port: int) -> bytes:
            return encode(PacketId.COMMAND, gx.build("DifxVex2DifxRun", [
                ("passPath", where), ("file", name), ("calcCommand", self.config.calc_command),
                ("calcOnly", 1 if calc_only else 0), *self._where(port)]))

        def on_item(item: Any) -> None:
            if item.data is not None:
                self._publish(self._tx.log("info", item.data.decode(errors="replace"), "vex2difx.file", key))

        def run() -> list[str]:
            with self._lock:
                self._publish(self._tx.run_state(key, State.ACTIVE, "running"))
            try:
                items = self._stream(StreamKind.RAW, request, timeout, on_item=on_item)
            except Exception:
                with self._lock:
                    self._publish(self._tx.run_state(key, State.ABORTED, "failed"))
                raise
            paths = [i.data.decode(errors="replace") for i in items if i.data is not None]
            with self._lock:
                self._publish(self._tx.run_state(key, State.COMPLETE, "complete", files=len(paths)))
            return paths

        if wait:
            return run()
        threading.Thread(target=_quiet(run), daemon=True, name=f"vex2difx-{name}").start()
        return None

    def machines(self, input: str, manager: str | None = None, datastreams: list[str] | None = None,
                 processes: list[str] | None = None, threads: int | None = None, read_back: bool = True,
                 timeout: float | None = None) -> dict[str, Any]:
        """Write ``<job>.machines``/``.threads`` for ``input`` (DifxMachinesDefinition,
        docs/protocols/guiserver.md §5.7).

        Nodes default to the configured ones. Returns ``ok``, the sub-packet names, the two file
        paths and (``read_back``) their contents fetched with get_file."""
        cfg = self.config
        inp = self._p(input, "input")
        head = check.nodes(manager if manager is not None else cfg.manager_node, "manager")
        ds = check.nodes(datastreams if datastreams is not None else cfg.datastream_nodes, "datastreams")
        proc = check.nodes(processes if processes is not None else cfg.process_nodes, "processes")
        nthreads = cfg.process_threads if threads is None else threads
        if not isinstance(nthreads, int) or not 0 < nthreads < 1000:
            raise BackendRejected(f"threads {nthreads!r}: an integer 1..999")
        attrs = [("manager", {"node": " ".join(head)}), ("datastream", {"nodes": " ".join(ds)}),
                 ("process", {"nodes": " ".join(proc), "threads": str(nthreads)})]
        body: list[tuple[str, str | int]] = [("input", inp), ("testProcessors", "false")]
        if cfg.mpi_wrapper:
            body.append(("mpiWrapper", cfg.mpi_wrapper))
        items = self._stream(StreamKind.FRAMED, lambda port: encode(PacketId.COMMAND, gx.build(
            "DifxMachinesDefinition", body + self._where(port), attrs)), timeout, terminal=frozenset({100, 101}))
        names = [_MACHINES_IDS.get(i.id, str(i.id)) for i in items]
        out: dict[str, Any] = {"ok": bool(items) and items[-1].id == 101, "packets": names,
                               "machines_file": "", "threads_file": ""}
        for i in items:
            if i.id in (110, 111):
                out["threads_file" if i.id == 110 else "machines_file"] = i.payload.decode(errors="replace")
        if read_back and out["ok"]:
            for kind in ("machines", "threads"):
                out[kind] = self.get_file(out[f"{kind}_file"]).decode(errors="replace") if out[f"{kind}_file"] else ""
        return out

    def job_status(self, pattern: str, timeout: float | None = None) -> list[dict[str, Any]]:
        """Short job status for an ``.input`` pattern, from the ``.difxlog`` files
        (docs/protocols/guiserver.md §5.3)."""
        pat = self._p(pattern, "pattern", glob=True)
        items = self._stream(StreamKind.FRAMED, lambda port: encode(
            PacketId.GET_JOB_STATUS, encode_int(1) + encode_string(pat)
            + encode_string("" if self.config.channelled else "127.0.0.1") + encode_int(port)),
            timeout)
        return self._tx.status_rows(items)

    def start_job(self, input: str, function: str = "USNO", force: bool = False, wait: bool = False,
                  timeout: float | None = None) -> Any:
        """Start a DiFX job from its ``.input``; return the job name, or with ``wait`` its final state."""
        cfg = self.config
        inp = self._p(input, "input")
        if not inp.endswith(".input"):
            raise BackendRejected(f"input {inp!r}: expected a .input file")
        func = check.function(function)
        manager = check.nodes(cfg.manager_node, "manager-node")
        ds = check.nodes(cfg.datastream_nodes, "datastream-nodes")
        proc = check.nodes(cfg.process_nodes, "process-nodes")
        name = check.job_name(inp)
        with self._lock:
            if self._tx.running(name):
                raise BackendRejected(f"job {name!r} is already running")
            if not self._up or self._conn is None:
                raise BackendUnavailable(f"not connected to {self.address}")
            port = self._open_port(StreamKind.FRAMED, JOB_TERMINAL)
            body: list[tuple[str, str | int]] = [("input", inp), ("force", "1" if force else "0"),
                                                 ("function", func), *self._where(port)]
            if cfg.mpi_wrapper:
                body.append(("mpiWrapper", cfg.mpi_wrapper))
            if cfg.difx_program:
                body.append(("difxProgram", cfg.difx_program))
            attrs = [("manager", {"node": manager[0] if manager else ""}), ("datastream", {"nodes": " ".join(ds)}),
                     ("process", {"nodes": " ".join(proc), "threads": str(cfg.process_threads)})]
            self._tx.job_started(name, inp, port)
            self._send(encode(PacketId.COMMAND, gx.build("DifxStart", body, attrs)))
        return self.wait_job(name, timeout) if wait else name

    def stop_job(self, job: str) -> None:
        with self._lock:
            track = self._tx.job(job)
            if track is None:
                raise BackendRejected(f"unknown job {job!r}")
            body: list[tuple[str, str | int]] = [("input", track.input)]
            if self.config.mpi_wrapper:
                body.append(("mpiWrapper", self.config.mpi_wrapper))
            if self.config.difx_program:
                body.append(("difxProgram", self.config.difx_program))
            track.stop_requested = True
            self._send(encode(PacketId.COMMAND, gx.build("DifxStop", body)))

    def wait_job(self, job: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until ``job`` reaches a final state; return ``{"job", "state", "native", "detail"}``."""
        with self._lock:
            track = self._tx.job(job)
            if track is None:
                raise BackendRejected(f"unknown job {job!r}")
            if not self._cond.wait_for(lambda: track.state.final, timeout):
                raise BackendTimeout(f"job {job!r} not finished within {timeout} s")
            return {"job": job, "state": track.state.value, "native": track.native, "detail": track.detail}

    def jobs(self) -> dict[str, str]:
        with self._lock:
            return self._tx.states()


def _quiet(run: Callable[[], Any]) -> Callable[[], None]:
    """A background run: its failure is already published as a state; do not raise in the thread."""

    def body() -> None:
        try:
            run()
        except BackendError:
            pass

    return body
