"""The operations a :class:`~flowbus.services.guiserver.GuiserverSession` runs through ``call()``:
one function per operation, named as the operation, declared with ``@OPS.op``.

Every path and argument is checked by :mod:`._check` before anything is sent; command fields
that guiServer runs in a shell (mpiWrapper, difxProgram, setup path) come only from the config.

No operation can break the session: none closes the connection, changes its channel mode or setup
path (config only), or stops guiServer; ``stop_job`` stops only jobs this session started.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flowbus.schemas import (
    BackendError,
    BackendProtocolError,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    State,
)

from .._ops import Operations
from .._session import Phase
from . import _check as check
from . import messages as gx
from .protocol import JOB_TERMINAL, PacketId, StreamKind, channel_data, encode, encode_int

if TYPE_CHECKING:
    from ._session import GuiserverSession

OPS: Operations[GuiserverSession] = Operations("guiserver")

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

#: phases in which a job can no longer be followed (wait_job gives up)
_ENDED = (Phase.CLOSED, Phase.DEAD)


def _path(session: GuiserverSession, value: object, what: str = "path", glob: bool = False) -> str:
    return check.path(value, session.config.allowed_dirs, glob=glob, what=what)


def _target(session: GuiserverSession, value: object, what: str = "path", glob: bool = False) -> str:
    """A path the operation deletes or overwrites: strictly inside allowed-dirs (:func:`._check.destructive`)."""
    return check.destructive(value, session.config.allowed_dirs, glob=glob, what=what)


def _file_op(session: GuiserverSession, op: str, path: str, arg: str = "", port: int | None = None) -> bytes:
    body: list[tuple[str, str | int]] = [("operation", op), ("path", path)]
    if arg:
        body.append(("arg", arg))
    if port is not None:
        body += session._where(port)
    return encode(PacketId.COMMAND, gx.build("DifxFileOperation", body))


# -- session settings ----------------------------------------------------------------------------

@OPS.op
def version(session: GuiserverSession, environment: bool = False) -> dict[str, Any]:
    """The server's version reply (docs/protocols/guiserver.md §3.2) and the setup path sent.

    guiServer sends every variable of its environment (tokens, paths): they are returned only
    when asked for with ``environment=True``; otherwise ``environment`` is the number of them."""
    with session._lock:
        session._require_up("version")
        info = session._conn.version if session._conn is not None else None
        if info is None:
            raise BackendUnavailable(f"version: session {session.name!r} is not connected to {session.address}")
        return {"version": info.version, "difx_base": info.difx_base, "user": info.user,
                "versions": list(info.versions),
                "environment": list(info.environment) if environment is True else len(info.environment),
                "setup_path": session.setup_path}

@OPS.op
def relay(session: GuiserverSession, on: bool = True) -> None:
    """Relay DiFX multicast messages or not (kept across reconnects)."""
    with session._lock:
        session._require_up("relay")
        session._relay = bool(on)
        session._send(session._settings())

@OPS.op
def select(session: GuiserverSession, tokens: list[str]) -> None:
    """The MESSAGE_SELECTION tokens (kept across reconnects)."""
    chosen = check.selection(tokens)
    with session._lock:
        session._require_up("select")
        session._selection = chosen
        session._send(session._settings())

# -- files ---------------------------------------------------------------------------------------

@OPS.op
def mkdir(session: GuiserverSession, path: str) -> None:
    session._send_op("mkdir", _file_op(session, "mkdir", _path(session, path)))

@OPS.op
def rmdir(session: GuiserverSession, path: str) -> None:
    session._send_op("rmdir", _file_op(session, "rmdir", _target(session, path)))

@OPS.op
def touch(session: GuiserverSession, path: str) -> None:
    session._send_op("touch", _file_op(session, "touch", _path(session, path)))

@OPS.op
def rm(session: GuiserverSession, path: str, args: str = "") -> None:
    """``args``: flags from ``-r``/``-f``; ``path`` may be a glob, strictly inside allowed-dirs
    (never ``/`` nor an allowed directory itself; nothing at all without allowed-dirs)."""
    flags = check.args(args, allowed_flags="rf")
    session._send_op("rm", _file_op(session, "rm", _target(session, path, glob=True), flags))

@OPS.op
def mv(session: GuiserverSession, src: str, dst: str) -> None:
    session._send_op("mv", _file_op(session, "mv", _target(session, src), _target(session, dst, "destination")))

@OPS.op
def cp(session: GuiserverSession, src: str, dst: str) -> None:
    session._send_op("cp", _file_op(session, "cp", _path(session, src), _target(session, dst, "destination")))

@OPS.op
def ls(session: GuiserverSession, path: str, args: str = "", timeout: float | None = None) -> list[str]:
    """The lines ``ls <args> <path>`` prints on the server, newline removed, as GNU ls prints
    them (docs/protocols/guiserver.md §6.1a): a directory gives its bare entry names, a file its
    path, a glob what the shell expands (several directories under ``<dir>:`` headers); ``-l``
    gives ``total N`` and long lines. ``args``: flags from ``-d -l -a -t -r -S -1``."""
    target, flags = _path(session, path, glob=True), check.args(args, allowed_flags="dlatrS1")
    items = session._stream("ls", StreamKind.RAW, lambda port: _file_op(session, "ls", target, flags, port), timeout)
    return [it.data.decode(errors="replace").rstrip("\n") for it in items if it.data is not None]

@OPS.op
def get_file(session: GuiserverSession, path: str, timeout: float | None = None) -> bytes:
    """The content of a server file (DifxFileTransfer ``from DiFX``, docs/protocols/guiserver.md §5.5)."""
    origin = _path(session, path, "origin")

    def request(port: int) -> bytes:
        return encode(PacketId.COMMAND, gx.build("DifxFileTransfer", [
            ("direction", "from DiFX"), ("origin", origin), ("destination", "/dev/null"), *session._where(port)]))

    items = session._stream("get_file", StreamKind.SIZED, request, timeout)
    if not items:
        raise BackendProtocolError(f"get_file {origin}: the sub-stream ended without a reply")
    size, content = items[0].id, items[0].payload
    if size < 0:
        raise BackendRejected(f"get_file {origin}: {_TRANSFER_CODES.get(size, f'error {size}')}")
    return bytes(content)

@OPS.op
def send_file(session: GuiserverSession, path: str, data: bytes, timeout: float | None = None,
              allow_nul: bool = False) -> int:
    """Write ``data`` to a server file (``to DiFX``); returns the size the server reports.

    guiServer writes each 1024-byte block as a C string, so everything after a NUL byte in a
    block is lost: data with NUL bytes is refused unless ``allow_nul``."""
    dest = _target(session, path, "destination")
    if not isinstance(data, bytes | bytearray):
        raise BackendRejected(f"send_file: data must be bytes, not {type(data).__name__}")
    if b"\x00" in data and not allow_nul:
        raise BackendRejected("send_file: data contains NUL bytes, which guiServer truncates "
                              "(docs/protocols/guiserver.md §5.5)")
    if len(data) > 2**31 - 1:
        raise BackendRejected("send_file: guiServer sizes are signed 32-bit")
    channelled = session.config.channelled

    def request(port: int) -> bytes:
        doc = gx.build("DifxFileTransfer", [("direction", "to DiFX"), ("origin", "/dev/null"),
                                            ("destination", dest), *session._where(port)])
        if not channelled:
            return encode(PacketId.COMMAND, doc)
        # each value the server reads is its own chunk (its channel reader over-reads otherwise)
        return (encode(PacketId.COMMAND, doc) + channel_data(port, encode_int(len(data)))
                + channel_data(port, bytes(data)))

    upload = b"" if channelled else encode_int(len(data)) + bytes(data)
    items = session._stream("send_file", StreamKind.INT, request, timeout, upload)
    if not items:
        raise BackendProtocolError(f"send_file {dest}: the sub-stream ended without a reply")
    code = int(items[0].id)
    if code < 0:
        raise BackendRejected(f"send_file {dest}: {_TRANSFER_CODES.get(code, f'error {code}')}")
    return code

# -- preparing jobs --------------------------------------------------------------------------------

@OPS.op
def vex2difx(session: GuiserverSession, pass_path: str, file: str, calc_only: bool = False, wait: bool = True,
             timeout: float | None = 600.0) -> list[str] | None:
    """Run vex2difx (unless ``calc_only``) and the calc command in ``pass_path`` (docs/protocols/guiserver.md §5.6).

    ``file`` is the .v2d name, or with ``calc_only`` a job name or glob that must match existing
    ``.calc`` files (checked with ls first: the server would create one literally named). Each new .input/.im
    path is published at once as ``LogLine(stream="vex2difx.file")``; the end as
    ``StateChanged(key="vex2difx/<file>", state=complete, attrs={"files": n})``. Returns the
    paths, or None at once when ``wait`` is False (the run goes on in a thread of the session)."""
    where = _path(session, pass_path, "pass-path")
    name = check.file_name(file, glob=calc_only)
    key = f"vex2difx/{name}"
    session._require_up("vex2difx")
    if calc_only and not ls(session, f"{where}/{name}.calc"):
        # guiServer runs `touch <file>.calc`: a name or glob matching no .calc file would create one
        # literally named so (e.g. `exp_*.calc`) and run the calc command on it
        # (docs/protocols/guiserver.md §6.1a)
        raise BackendRejected(f"vex2difx: {where}/{name}.calc matches no .calc file (run vex2difx first)")

    def request(port: int) -> bytes:
        return encode(PacketId.COMMAND, gx.build("DifxVex2DifxRun", [
            ("passPath", where), ("file", name), ("calcCommand", session.config.calc_command),
            ("calcOnly", 1 if calc_only else 0), *session._where(port)]))

    def on_item(item: Any) -> None:
        if item.data is not None:
            session._publish([session._tx.log("info", item.data.decode(errors="replace"), "vex2difx.file", key)])

    def run() -> list[str]:
        with session._lock:
            session._publish([session._tx.run_state(key, State.ACTIVE, "running")])
        try:
            items = session._stream("vex2difx", StreamKind.RAW, request, timeout, on_item=on_item)
        except Exception:
            with session._lock:
                session._publish([session._tx.run_state(key, State.ABORTED, "failed")])
            raise
        paths = [i.data.decode(errors="replace") for i in items if i.data is not None]
        with session._lock:
            session._publish([session._tx.run_state(key, State.COMPLETE, "complete", files=len(paths))])
        return paths

    if wait:
        return run()
    session._spawn(_quiet(run), name=f"vex2difx-{name}")
    return None

@OPS.op
def machines(session: GuiserverSession, input: str, manager: str | None = None,
             datastreams: list[str] | None = None, processes: list[str] | None = None, threads: int | None = None,
             read_back: bool = True, timeout: float | None = None) -> dict[str, Any]:
    """Write ``<job>.machines``/``.threads`` for ``input`` (DifxMachinesDefinition,
    docs/protocols/guiserver.md §5.7).

    Nodes default to the configured ones. Returns ``ok``, the sub-packet names, the two file
    paths and (``read_back``) their contents fetched with get_file."""
    cfg = session.config
    inp = _path(session, input, "input")
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
    items = session._stream("machines", StreamKind.FRAMED, lambda port: encode(PacketId.COMMAND, gx.build(
        "DifxMachinesDefinition", body + session._where(port), attrs)), timeout, terminal=frozenset({100, 101}))
    names = [_MACHINES_IDS.get(i.id, str(i.id)) for i in items]
    out: dict[str, Any] = {"ok": bool(items) and items[-1].id == 101, "packets": names,
                           "machines_file": "", "threads_file": ""}
    for i in items:
        if i.id in (110, 111):
            out["threads_file" if i.id == 110 else "machines_file"] = i.payload.decode(errors="replace")
    if read_back and out["ok"]:
        for kind in ("machines", "threads"):
            out[kind] = get_file(session, out[f"{kind}_file"]).decode(errors="replace") if out[f"{kind}_file"] else ""
    return out

# -- jobs ------------------------------------------------------------------------------------------

@OPS.op
def job_status(session: GuiserverSession, pattern: str, timeout: float | None = None) -> list[dict[str, Any]]:
    """Short job status for an ``.input`` pattern, from the ``.difxlog`` files
    (docs/protocols/guiserver.md §5.3)."""
    return session._job_status(_path(session, pattern, "pattern", glob=True), timeout)

@OPS.op
def start_job(session: GuiserverSession, input: str, function: str = "USNO",
              force: bool = False, wait: bool = False, timeout: float | None = None) -> Any:
    """Start a DiFX job from its ``.input``; return the job name, or with ``wait`` its final state."""
    cfg = session.config
    inp = _target(session, input, "input") if force else _path(session, input, "input")  # force: rm -rf <job>.difx
    if not inp.endswith(".input"):
        raise BackendRejected(f"input {inp!r}: expected a .input file")
    func = check.function(function)
    manager = check.nodes(cfg.manager_node, "manager-node")
    ds = check.nodes(cfg.datastream_nodes, "datastream-nodes")
    proc = check.nodes(cfg.process_nodes, "process-nodes")
    name = check.job_name(inp)
    with session._lock:
        if session._tx.running(name):
            raise BackendRejected(f"job {name!r} is already running")
    # the .difxlog is appended to: remember its last STATUS line, so that a resync after a crash
    # does not take an earlier run's end for this run's
    before = next((f"{r['timestamp']}{r['native']}" for r in session._job_status(inp, None, "start_job")
                   if r["job"] == name and r["state"] is not None), "")
    with session._lock:
        session._require_up("start_job")
        if session._tx.running(name):
            raise BackendRejected(f"job {name!r} is already running")
        port = session._open_port(StreamKind.FRAMED, JOB_TERMINAL)
        body: list[tuple[str, str | int]] = [("input", inp), ("force", "1" if force else "0"),
                                             ("function", func), *session._where(port)]
        if cfg.mpi_wrapper:
            body.append(("mpiWrapper", cfg.mpi_wrapper))
        if cfg.difx_program:
            body.append(("difxProgram", cfg.difx_program))
        attrs = [("manager", {"node": manager[0] if manager else ""}), ("datastream", {"nodes": " ".join(ds)}),
                 ("process", {"nodes": " ".join(proc), "threads": str(cfg.process_threads)})]
        session._tx.job_started(name, inp, port, before)
        session._send(encode(PacketId.COMMAND, gx.build("DifxStart", body, attrs)))
    return wait_job(session, name, timeout) if wait else name

@OPS.op
def stop_job(session: GuiserverSession, job: str) -> None:
    """DifxStop for a job this session started (or resynced); it ends ``cancelled``."""
    with session._lock:
        track = session._tx.job(job)
        if track is None:
            raise BackendRejected(f"unknown job {job!r}")
        session._require_up("stop_job")
        body: list[tuple[str, str | int]] = [("input", track.input)]
        if session.config.mpi_wrapper:
            body.append(("mpiWrapper", session.config.mpi_wrapper))
        if session.config.difx_program:
            body.append(("difxProgram", session.config.difx_program))
        track.stop_requested = True
        session._send(encode(PacketId.COMMAND, gx.build("DifxStop", body)))

@OPS.op
def wait_job(session: GuiserverSession, job: str, timeout: float | None = None) -> dict[str, Any]:
    """Block until ``job`` reaches a final state, or ``unknown`` for good (its state was lost in a
    server crash); return ``{"job", "state", "native", "detail"}``. Waits through reconnects (the
    resync may end it); ``BackendUnavailable`` once the session is stopped or gave up."""
    with session._lock:
        track = session._tx.job(job)
        if track is None:
            raise BackendRejected(f"unknown job {job!r}")
        if not session._cond.wait_for(lambda: session._tx.settled(track) or session._phase in _ENDED, timeout):
            raise BackendTimeout(f"job {job!r} not finished within {timeout} s")
        if not session._tx.settled(track):
            raise BackendUnavailable(f"wait_job: session {session.name!r} is {session.phase}; "
                                     f"job {job!r} was last {track.state.value}")
        return {"job": job, "state": track.state.value, "native": track.native, "detail": track.detail}

@OPS.op
def jobs(session: GuiserverSession) -> dict[str, str]:
    """Every job the session knows, with its last state (also while disconnected)."""
    with session._lock:
        return session._tx.states()


def _quiet(run: Callable[[], Any]) -> Callable[[], None]:
    """A background run: its failure is already published as a state; do not raise in the thread."""

    def body() -> None:
        try:
            run()
        except BackendError:
            pass

    return body
