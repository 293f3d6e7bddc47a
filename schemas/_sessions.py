"""Session configuration types: one ``[[sessions]]`` table per backend session, tagged by
``backend``, and the retention keys they all share. Loaded and checked by ``_config``."""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class _SConf(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="kebab"):
    pass


class RetentionConfig(_SConf, frozen=True, kw_only=True):
    """What every session config has: how long the session remembers finished resources
    (docs/retention.md). A final resource is forgotten once it is older than ``retain-hours``
    *and* not among the last ``retain-count`` finished ones, whichever keeps more."""

    #: hours a finished resource is kept at least (0 = only the count limit applies)
    retain_hours: float = 24.0
    #: finished resources always kept, the newest first (0 = only the age limit applies)
    retain_count: int = 10_000
    #: also ask the backend to forget what the session forgets (QCG ``remove``, soma
    #: ``delete_workflow``, WMS run directories the session submitted); ``None`` = the
    #: backend's default (on for QCG and WMS, off for soma, never for ecFlow and guiServer)
    forget_in_backend: bool | None = None

    def __post_init__(self) -> None:
        if self.retain_hours < 0 or self.retain_count < 0:
            raise ValueError(f"retain-hours and retain-count must be >= 0 (got {self.retain_hours:g}, "
                             f"{self.retain_count})")


class QcgSessionConfig(RetentionConfig, frozen=True, tag="qcg", tag_field="backend"):
    """A QCG-PilotJob session: a manager we start (its own process, on 127.0.0.1), or an existing one by address."""

    name: str
    #: ``local`` starts a manager bound to 127.0.0.1; ``connect`` uses ``address``
    mode: Literal["local", "connect"] = "local"
    address: str = ""
    #: the started manager's resources, QCG's ``--nodes`` syntax (``n1:2,n2:2``)
    nodes: str = "n1:2"
    #: working directory of the started manager ("" = a fresh temporary directory)
    wd: str = ""
    #: seconds per request before the manager is declared unresponsive
    request_timeout: float = 2.0
    #: seconds between status() reconciliations
    reconcile_interval: float = 2.0
    #: seconds between two liveness probes of the manager (a ``status`` request on a socket of
    #: its own; 0 = no probe); a manager that is dead or frozen (SIGSTOP) is reported
    #: (``Disconnected``) within ``liveness-interval + liveness-timeout`` + 50 ms
    liveness_interval: float = 0.2
    #: seconds a liveness probe waits for the reply before the manager is declared lost
    liveness_timeout: float = 1.4
    #: what to do when the manager dies: report only, start a new one, or also resubmit
    recovery: Literal["none", "restart", "resubmit"] = "resubmit"
    #: attempts before giving up, and the first backoff in seconds (doubling)
    recovery_attempts: int = 5
    recovery_backoff: float = 0.5
    #: actor that hosts the session (sessions with the same value share one actor)
    actor: str = ""


def _localhost() -> list[str]:
    return ["localhost"]


class GuiserverSessionConfig(RetentionConfig, frozen=True, tag="guiserver", tag_field="backend"):
    """A DiFX guiServer link: one TCP connection, channelled mode, version handshake first.

    Command fields that guiServer runs in a shell (setup path, mpi wrapper, difx program) come
    only from here, never from an operation's arguments.
    """

    name: str
    host: str = "127.0.0.1"
    port: int = 50200
    #: ``DIFX_SETUP_PATH`` sent after every handshake; "" = ``<difx base>/bin/rungeneric.<difx-version>``
    setup_path: str = ""
    difx_version: str = "DIFX-DEVEL"
    #: directories every path must lie under ([] = any absolute path)
    allowed_dirs: list[str] = []
    #: relay DiFX multicast messages, and the MESSAGE_SELECTION tokens ([] = ALL_MESSAGES)
    relay: bool = True
    message_selection: list[str] = []
    #: sub-streams over the main connection (19); False = direct mode (20), guiServer connects back
    #: to a listener of ours on 127.0.0.1 (only useful when guiServer runs on this host)
    channelled: bool = True
    #: fixed command fields of DifxStart/DifxStop ("" = the server's defaults)
    mpi_wrapper: str = ""
    difx_program: str = ""
    #: the calc command of vex2difx runs (DifxVex2DifxRun ``calcCommand``)
    calc_command: str = "calcif2"
    #: DifxStart defaults: manager node, datastream nodes, process nodes and threads per node
    manager_node: str = "localhost"
    datastream_nodes: list[str] = msgspec.field(default_factory=_localhost)
    process_nodes: list[str] = msgspec.field(default_factory=_localhost)
    process_threads: int = 1
    #: seconds for the version handshake and for operations that return data
    request_timeout: float = 5.0
    #: seconds without a job sub-packet before its status is read from the .difxlog (0 = never);
    #: guiServer ends some streams without a terminal id (statvfs failure). Keep it well above the
    #: longest quiet phase: a job with no .difxlog yet is then taken as never started (aborted)
    job_silence_timeout: float = 0.0
    #: largest accepted payload; anything bigger is a protocol error
    max_packet: int = 4 * 1024 * 1024
    #: reconnection: first backoff (doubling, capped at 30 s) and attempts before giving up (0 = forever)
    reconnect_backoff: float = 0.5
    reconnect_attempts: int = 0
    #: allow a non-loopback host (guiServer is a remote shell: use an SSH tunnel instead)
    allow_remote: bool = False
    #: actor that hosts the session (sessions with the same value share one actor)
    actor: str = ""


class EcflowSessionConfig(RetentionConfig, frozen=True, tag="ecflow", tag_field="backend"):
    """An ecFlow session: one running ``ecflow_server`` reached at ``host:port``.

    Every poll is one ``news_local`` request (plus a ``sync_local`` when there is news), and the
    server writes each request to its log (about 380 B/s at the default interval): run the
    server with ``ECF_LOG=/dev/null`` or set ``clear-log-interval`` when that growth matters.
    """

    name: str
    host: str = "localhost"
    port: int = 3141
    #: user name sent with requests ("" = the client's default, the login name)
    user: str = ""
    #: ecFlow custom password file (``ECF_CUSTOM_PASSWD``) for a server that checks passwords
    password_file: str = ""
    #: talk TLS to a server started with ``--ssl``
    ssl: bool = False
    #: seconds between polls (news_local, then sync_local when there is news)
    poll_interval: float = 0.1
    #: seconds start() keeps trying to reach the server before it raises BackendUnavailable
    timeout: float = 2.0
    #: whole seconds one request may take (ecFlow's ECF_CONNECT_TIMEOUT, at least 1); a server
    #: that accepts but never answers holds the calling thread, and the GIL, this long
    request_timeout: int = 1
    #: seconds the poll's NEWS request (ecFlow's wire on a socket of our own, GIL-free; a ping
    #: before every reconnect) waits for its answer; a server that does not answer is ``stuck``
    #: (no client call is made to it) and lost (``Disconnected``) within request-timeout +
    #: probe-timeout + poll-interval; 0 = the binding's news_local instead (a stuck server then
    #: holds the process's GIL per request)
    probe_timeout: float = 0.5
    #: on every (re)connect, restart a server found HALTED (it always comes back HALTED from a checkpoint)
    restart_halted: bool = False
    #: after the server is lost: seconds before the first reconnect attempt (doubling, capped at 30 s)
    reconnect_backoff: float = 0.2
    #: reconnect attempts before giving up (0 = never give up)
    reconnect_attempts: int = 0
    #: seconds between ``clear_log`` requests to the server (0 = never; the log is the server's own)
    clear_log_interval: float = 0.0
    #: actor that hosts the session (sessions with the same value share one actor)
    actor: str = ""


class SomaSessionConfig(RetentionConfig, frozen=True, tag="soma", tag_field="backend"):
    """A soma-workflow session: one WorkflowController (isolated light mode in a per-session
    directory by default, or a configured resource)."""

    name: str
    #: ``light``: ``WorkflowController(isolated_light_mode=directory)``, the engine runs in the
    #: session's process; ``resource``: ``WorkflowController(resource-id, login, password, config)``
    mode: Literal["light", "resource"] = "light"
    #: light mode: the soma directory (database, job stdout/stderr); "" = the previous
    #: incarnation's directory, else a fresh temporary one (removed by a graceful stop)
    directory: str = ""
    #: resource mode: the resource id of the soma-workflow configuration ("" = soma's default)
    resource_id: str = ""
    #: resource mode: login and password for a remote resource ("" = none / the file's)
    login: str = ""
    password: str = ""
    #: resource mode: a soma-workflow configuration file ("" = soma's search: $SOMA_WORKFLOW_CONFIG,
    #: ~/.soma-workflow.cfg)
    config_file: str = ""
    #: seconds between polls (workflow_elements_status diffs)
    poll_interval: float = 0.2
    #: the engine loop period (soma's ``engine.refreshment_interval``, 1 s by default in soma)
    engine_refresh: float = 0.1
    #: light mode: seconds a read of soma's database may wait for a lock before the database
    #: counts as ``stuck`` (no soma call is made to it while it is; 0 = no probe)
    probe_timeout: float = 0.5
    #: light mode: seconds the database may stay stuck before the controller is lost
    #: (``Disconnected``); above soma's own 15 s sqlite timeout, so a long transaction of soma's
    #: own (a large submit under load) is not taken for a stuck database
    request_timeout: float = 20.0
    #: jobs run at once by the local scheduler (0 = soma's default, the CPU count)
    proc_nb: int = 0
    #: when the controller dies: ``reattach`` (new controller, kill orphaned jobs, force-stop and
    #: restart the workflows), ``resubmit`` (delete them and submit them again), ``none`` (report)
    recovery: Literal["reattach", "resubmit", "none"] = "reattach"
    #: recovery attempts before giving up, and the first backoff in seconds (doubling)
    recovery_attempts: int = 5
    recovery_backoff: float = 0.5
    #: seconds a graceful stop waits for soma's stop_workflow on each running workflow
    stop_timeout: float = 10.0
    #: actor that hosts the session (sessions with the same value share one actor)
    actor: str = ""


class WmsSessionConfig(RetentionConfig, frozen=True, tag="wms", tag_field="backend"):
    """An LSST ctrl_bps WMS service session: any ``BaseWmsService`` chosen by class path."""

    name: str
    #: the ``BaseWmsService`` implementation, as BPS's ``wmsServiceClass``
    service_class: str = "lsst.ctrl.bps.parsl.ParslService"
    #: a table merged into the BpsConfig of every workflow (and given to the service); it wins
    #: over the keys below, e.g. ``{site = {local = {cores = 4}}}`` or a whole HTCondor config
    bps_config: dict[str, Any] = {}
    #: where each workflow gets its submit directory ("" = ``<tmp>/flowbus-wms/<session name>``)
    submit_dir: str = ""
    #: BPS ``computeSite``
    compute_site: str = "local"
    #: Parsl site class of ``site.<compute-site>.class`` (the default opens no socket)
    site_class: str = "flowbus.services.wms.LocalThreads"
    #: job threads of the default site, and Parsl retries of a failed job (``site.<compute-site>``)
    cores: int = 2
    retries: int = 0
    #: seconds between observations of running Parsl jobs (their futures; cheap, in process)
    poll_interval: float = 0.1
    #: seconds between ``report()`` calls for workflows of services that implement it
    report_interval: float = 1.0
    #: seconds a ``ping()`` or ``report()`` the session makes may take: one still running after
    #: that is a WMS that stopped answering (``Disconnected``); named ``stuck`` after 1 s
    request_timeout: float = 30.0
    #: BPS ``operator`` ("" = the login name)
    operator: str = ""
    #: actor that hosts the session (sessions with the same value share one actor)
    actor: str = ""


SessionConfig = QcgSessionConfig | GuiserverSessionConfig | EcflowSessionConfig | SomaSessionConfig | WmsSessionConfig
