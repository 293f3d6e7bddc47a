"""Configuration types, loaded from TOML. Unknown keys are errors that name the key and the file."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from ._env import guiserver_env_defaults
from ._errors import ConfigError
from ._paths import private_state_dir
from ._rules import PolicyConfig, RuleConfig, check_rules, raw_rule_problem
from ._sessions import QcgSessionConfig, SessionConfig, SomaSessionConfig, WmsSessionConfig

_LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|localhost|::1|\[::1\])$")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ``localhost`` and ``::1``."""
    return bool(_LOOPBACK.match(host))


class _Conf(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="kebab"):
    pass


class CurveConfig(_Conf, frozen=True):
    """CurveZMQ keys. Any key file set turns encryption on; a non-loopback bind requires it."""

    #: the broker's secret key file (``flowbus keys`` writes one); clients need the public half
    server_secret_key_file: str = ""
    #: the broker's public key file, for clients
    server_public_key_file: str = ""
    #: this client's secret key file
    client_secret_key_file: str = ""
    #: a directory of ``*.key`` public key files; only these clients are admitted (publish,
    #: subscribe, replay and command); empty with a server key: any client with the broker's key
    authorized_keys_dir: str = ""
    #: a directory of ``*.key`` public key files of read-only clients: they may subscribe, replay
    #: and read snapshots, but not publish or command
    readers_keys_dir: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.server_secret_key_file or self.server_public_key_file)


class BusConfig(_Conf, frozen=True):
    """Where the broker listens, who may talk to it, and how much it keeps."""

    #: ``ipc``: Unix sockets in ``ipc-dir`` (the default; the kernel admits only users who may
    #: enter that directory, 0700 by default); ``tcp``: ``host`` and the ports below, with
    #: CurveZMQ required (``flowbus up`` makes the keys when none are configured)
    transport: str = "ipc"
    #: directory of the ipc sockets ("" = ``<state-dir>/bus``); ``ingest`` and ``command`` sit in
    #: its ``owner/`` subdirectory, which is always 0700
    ipc_dir: str = ""
    #: a Unix group that may read (subscribe, replay, snapshot) through the ipc sockets; the
    #: ``ipc-dir`` must then lie outside the 0700 state dir
    ipc_group: str = ""
    host: str = "127.0.0.1"
    #: request socket (replay, snapshot, info); clients connect here and learn the rest
    request_port: int = 7750
    #: fan-out to subscribers
    publish_port: int = 7751
    #: publishers send here
    ingest_port: int = 7752
    #: commands to sessions (``flowbus call``), forwarded to the ``flowbus up`` that serves them
    command_port: int = 7753
    #: on-disk journal directory ("" keeps the journal in memory only)
    journal_dir: str = ""
    #: events kept in memory for replay
    journal_events: int = 200_000
    #: total size of the on-disk journal's segments; past it the oldest segments are dropped
    #: (their latest states rewritten into a snapshot segment first)
    journal_max_bytes: int = 256 * 1024 * 1024
    #: the on-disk journal is a directory of segments; one is closed (and the next started) when
    #: it holds this many bytes; the oldest are dropped past ``journal_max_bytes`` in total
    journal_segment_bytes: int = 64 * 1024 * 1024
    #: a closed segment older than this many hours is dropped too (0 = no age limit)
    journal_max_age_hours: float = 0.0
    #: tombstones of forgotten resources the broker keeps for late joiners' waits
    forgotten_kept: int = 10_000
    #: when the on-disk journal is fsynced (it is always written before the publisher's ack):
    #: ``none`` leaves it to the OS (survives a broker crash, not a machine crash), ``interval``
    #: at most every ``journal-fsync-interval`` s (a machine crash loses at most that much),
    #: ``always`` before every ack (nothing acked is lost)
    journal_fsync: Literal["none", "interval", "always"] = "interval"
    #: seconds between fsyncs with ``journal-fsync = "interval"``
    journal_fsync_interval: float = 1.0
    #: largest frame accepted, in bytes (larger messages are refused by the transport itself)
    max_frame_bytes: int = 4 * 1024 * 1024
    #: largest subscription topic accepted, in bytes
    max_topic_bytes: int = 512
    #: distinct subscription topics the broker keeps track of
    max_subscriptions: int = 10_000
    #: messages queued per connection on the ingest and request sockets before the transport
    #: stops reading from that client (back-pressure, not loss)
    queue_messages: int = 1000
    #: file with the secret that signs flowbus sessions' source grants ("" = grants off: every
    #: source is a user source); ``flowbus up`` creates one in the state dir
    grant_key_file: str = ""
    #: TCP on a loopback host without CurveZMQ: refused unless this is set (tests and throwaway
    #: experiments only: every local user can then publish and subscribe)
    insecure_loopback: bool = False
    #: seconds between heartbeats and ticks
    heartbeat_interval: float = 0.2
    #: a publisher silent this many seconds is reported lost
    publisher_timeout: float = 3.0
    curve: CurveConfig = CurveConfig()

    def request_address(self) -> str:
        """The request endpoint clients connect to."""
        if self.transport == "ipc":
            return f"ipc://{Path(self.ipc_dir).expanduser() / 'request'}"
        return f"tcp://{self.host}:{self.request_port}"


class PlacementConfig(_Conf, frozen=True):
    """One ``[[ray.placement]]`` group: which sessions, over how many BackendActors, on which nodes.

    A session belongs to the first group whose ``sessions`` globs match its name or whose
    ``backends`` list its backend; sessions no group takes go to the ``default`` group."""

    #: group name; its actors are named ``flowbus-backend-<name>-<i>``
    name: str
    #: session-name globs (``fnmatch``: ``ecf-*``) this group takes
    sessions: list[str] = []
    #: backends this group takes (``ecflow``, ``qcg``, ``guiserver``, ``soma``, ``wms``)
    backends: list[str] = []
    #: BackendActors the group's sessions are spread over (round-robin, many sessions per actor)
    actors: int = 1
    #: Ray resources every actor of the group asks for, e.g. ``{"flowbus-ecflow" = 0.001}``
    #: (nodes offer them with ``ray start --resources``); an actor only runs where they are
    resources: dict[str, float] = {}
    #: node labels the actor's node must carry (``ray start --labels``), e.g. ``{site = "ecmwf"}``
    node_labels: dict[str, str] = {}


class RayConfig(_Conf, frozen=True):
    """Where sessions run. ``local`` starts a private loopback-only Ray."""

    #: ``local`` (a private loopback-only Ray), or an existing cluster: ``host:port`` (its GCS),
    #: ``auto`` (``RAY_ADDRESS`` or the cluster last started on this machine), ``ray://host:10001``
    address: str = "local"
    namespace: str = "flowbus"
    num_cpus: int = 2
    object_store_mb: int = 100
    #: sessions per BackendActor before the supervisor opens another actor (default group, ``actors = 0``)
    sessions_per_actor: int = 64
    #: BackendActors of the default group (sessions no placement group takes); 0 = one per
    #: ``sessions-per-actor`` sessions
    actors: int = 0
    #: Ray restarts of a dead BackendActor
    max_restarts: int = -1
    #: threads per BackendActor that run polls (a poll that blocks holds one; the others go on)
    poll_workers: int = 16
    #: sessions a BackendActor starts at once when it opens (or reopens) its sessions
    open_concurrency: int = 8
    #: placement groups (``[[ray.placement]]``), see :class:`PlacementConfig`
    placement: list[PlacementConfig] = []
    #: seconds a BackendActor may stay unreachable (dead node, hung, partitioned) before its
    #: sessions move to another actor of its group (they resync there under a new incarnation)
    move_after: float = 30.0
    #: sessions moved per second at most when actors return (node back, capacity back) and the
    #: supervisor moves sessions back until the group is balanced; 0 = never move them back
    rebalance_per_second: float = 1.0
    #: seconds to reach an existing cluster (``address``) before a clear error instead of a hang
    connect_timeout: float = 10.0
    #: seconds the BackendActors may take to be placed and started before a clear error
    start_timeout: float = 120.0


class LogConfig(_Conf, frozen=True):
    level: str = "info"
    json: bool = False
    #: also write the log to this file ("" = stderr only), rotated at ``max-bytes``
    file: str = ""
    #: size at which the log file is rotated (``file.1`` ... ``file.<backups>``)
    max_bytes: int = 64 * 1024 * 1024
    #: rotated files kept
    backups: int = 5


class MetricsConfig(_Conf, frozen=True):
    """``[metrics]``: Prometheus metrics of ``flowbus up`` (docs/metrics.md). ``port = -1`` (the
    default) serves none; ``0`` a free port (written to run.json). Every scrape must carry the
    token of ``<state-dir>/metrics.token``."""

    port: int = -1
    host: str = "127.0.0.1"


class DashboardConfig(_Conf, frozen=True):
    """``[dashboard]``: the live web dashboard of ``flowbus up`` (docs/dashboard.md). ``port = -1``
    serves none, ``0`` a free port; when the default port is taken a free one is used (the URL is
    printed and written to run.json). Every request must carry the token of
    ``<state-dir>/dashboard.token``. ``hours`` of timeline are kept, for at most ``max-resources``
    resources and ``max-timeline`` state intervals; ``max-clients`` browsers at once."""

    port: int = 7780
    host: str = "127.0.0.1"
    hours: float = 6.0
    max_resources: int = 5000
    max_timeline: int = 50000
    max_clients: int = 16


class FlowbusConfig(_Conf, frozen=True):
    """The whole configuration file."""

    bus: BusConfig = BusConfig()
    ray: RayConfig = RayConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    dashboard: DashboardConfig = DashboardConfig()
    sessions: list[SessionConfig] = []
    #: where runtime files (addresses, journals, QCG working dirs) go
    state_dir: str = ""
    #: orchestration: "when <condition> then <actions>" rules and recovery policies (schemas/_rules.py)
    rules: list[RuleConfig] = []
    policies: list[PolicyConfig] = []

    def state_path(self) -> Path:
        """The state directory, created on demand, private (see ``private_state_dir``)."""
        return private_state_dir(self.state_dir)


def embedded_default() -> FlowbusConfig:
    """``flowbus up`` with no file: local Ray, broker on 127.0.0.1, a local QCG manager."""
    return FlowbusConfig(sessions=[QcgSessionConfig(name="local")])


def _where(path: str) -> str:
    # msgspec paths look like `$.sessions[0].nodes`; show them as sessions[0].nodes
    return path.removeprefix("$").removeprefix(".") or "(top level)"


def parse_config(data: dict[str, Any], origin: str = "<config>", env: Mapping[str, str] | None = None) -> FlowbusConfig:
    """Validate a mapping; errors name the key and ``origin``.

    With ``env``, guiServer sessions take their host and port from ``DIFX_CONTROL_HOST`` /
    ``DIFX_CONTROL_PORT`` / ``DIFX_MESSAGE_PORT`` as the DiFX interface does; keys written in
    the file win."""
    sessions = data.get("sessions") if isinstance(data, dict) else None
    if env is not None and isinstance(sessions, list):
        extra = guiserver_env_defaults(env)  # raises ConfigError naming a bad variable
        if extra:
            sessions = [{**extra, **s} if isinstance(s, dict) and s.get("backend") == "guiserver" else s
                        for s in sessions]
            data = {**data, "sessions": sessions}
    if isinstance(sessions, list):
        kinds = ", ".join(str(t.__struct_config__.tag) for t in SessionConfig.__args__)
        for i, sess in enumerate(sessions):
            if isinstance(sess, dict) and "backend" not in sess:
                raise ConfigError(f"{origin}: sessions[{i}]: missing key 'backend' (one of: {kinds})")
    problem = raw_rule_problem(data)
    if problem:
        raise ConfigError(f"{origin}: {problem}")
    try:
        cfg = msgspec.convert(data, FlowbusConfig)
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = re.match(r"Object contains unknown field `([^`]+)`(?: - at `([^`]+)`)?", text)
        if m:
            parent = _where(m.group(2) or "$")
            key = m.group(1) if parent == "(top level)" else f"{parent}.{m.group(1)}"
            raise ConfigError(f"{origin}: unknown key {key!r}") from None
        m = re.match(r"(.*) - at `([^`]+)`", text)
        if m:
            raise ConfigError(f"{origin}: {_where(m.group(2))}: {m.group(1)}") from None
        raise ConfigError(f"{origin}: {text}") from None
    _check(cfg, origin)
    return cfg


def _check_dashboard(d: DashboardConfig, origin: str) -> None:
    if not -1 <= d.port <= 65535:
        raise ConfigError(f"{origin}: dashboard.port: {d.port} is not a port (-1: off, 0: any free port)")
    if not is_loopback(d.host):
        raise ConfigError(f"{origin}: dashboard.host: {d.host!r} is not a loopback address (the dashboard serves "
                          "127.0.0.1 only; reach it from elsewhere through an SSH tunnel)")
    if not d.hours > 0:
        raise ConfigError(f"{origin}: dashboard.hours: {d.hours} must be more than 0")
    for key in ("max_resources", "max_timeline", "max_clients"):
        if getattr(d, key) < 1:
            raise ConfigError(f"{origin}: dashboard.{key.replace('_', '-')}: {getattr(d, key)} must be at least 1")


def _check(cfg: FlowbusConfig, origin: str) -> None:
    if not -1 <= cfg.metrics.port <= 65535:
        raise ConfigError(f"{origin}: metrics.port: {cfg.metrics.port} is not a port (-1: off, 0: any free port)")
    _check_dashboard(cfg.dashboard, origin)
    names = [s.name for s in cfg.sessions]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{origin}: sessions: duplicate session name {sorted(dup)[0]!r}")
    for i, s in enumerate(cfg.sessions):
        if not s.name or "/" in s.name:
            raise ConfigError(f"{origin}: sessions[{i}].name: must be non-empty and contain no '/'")
        if isinstance(s, QcgSessionConfig) and s.mode == "connect" and not s.address:
            raise ConfigError(f"{origin}: sessions[{i}].address: required when mode = 'connect'")
        if isinstance(s, WmsSessionConfig):
            _check_wms(s, f"{origin}: sessions[{i}]")
        if isinstance(s, SomaSessionConfig):
            if s.poll_interval <= 0 or s.engine_refresh <= 0:
                raise ConfigError(f"{origin}: sessions[{i}]: poll-interval and engine-refresh must be > 0")
            if s.probe_timeout < 0 or s.request_timeout <= 0:
                raise ConfigError(f"{origin}: sessions[{i}]: probe-timeout must be >= 0 and request-timeout > 0")
            if s.mode == "light" and (s.resource_id or s.login or s.password or s.config_file):
                raise ConfigError(f"{origin}: sessions[{i}]: resource-id/login/password/config-file "
                                  "need mode = 'resource'")
            if s.mode == "resource" and s.directory:
                raise ConfigError(f"{origin}: sessions[{i}].directory: only for mode = 'light'")
    _check_ray(cfg, origin)
    bus = cfg.bus
    if bus.transport not in ("ipc", "tcp"):
        raise ConfigError(f"{origin}: bus.transport: {bus.transport!r} is not one of 'ipc', 'tcp'")
    for key in ("max_frame_bytes", "max_topic_bytes", "max_subscriptions", "queue_messages"):
        if getattr(bus, key) < 1:
            raise ConfigError(f"{origin}: bus.{key.replace('_', '-')}: must be >= 1")
    if bus.transport == "tcp" and not is_loopback(bus.host) and bus.insecure_loopback:
        raise ConfigError(f"{origin}: bus.insecure-loopback: only for a loopback host, not {bus.host!r}")
    if not is_loopback(bus.host) and not (bus.curve.server_secret_key_file or bus.curve.server_public_key_file):
        raise ConfigError(
            f"{origin}: bus.host: {bus.host!r} is not loopback; set bus.curve.server-secret-key-file (the broker)"
            " or bus.curve.server-public-key-file (a client): CurveZMQ is required beyond loopback"
        )
    for key in ("request_port", "publish_port", "ingest_port", "command_port"):
        port = getattr(bus, key)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{origin}: bus.{key.replace('_', '-')}: port {port} out of range")
    if bus.heartbeat_interval <= 0:
        raise ConfigError(f"{origin}: bus.heartbeat-interval: must be > 0")
    if bus.journal_fsync_interval <= 0:
        raise ConfigError(f"{origin}: bus.journal-fsync-interval: must be > 0")
    if bus.journal_max_bytes <= 0 or bus.journal_segment_bytes <= 0 or bus.journal_max_age_hours < 0:
        raise ConfigError(f"{origin}: bus.journal-max-bytes and bus.journal-segment-bytes must be > 0, "
                          "bus.journal-max-age-hours >= 0")
    problem = check_rules(cfg.rules, cfg.policies)
    if problem:
        raise ConfigError(f"{origin}: {problem}")


_CLASS_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def _check_wms(s: WmsSessionConfig, where: str) -> None:
    for key in ("service_class", "site_class"):
        value = getattr(s, key)
        if not _CLASS_PATH.match(value):
            raise ConfigError(f"{where}.{key.replace('_', '-')}: {value!r} is not a class path (package.module.Class)")
    if s.poll_interval <= 0 or s.report_interval <= 0 or s.request_timeout <= 0:
        raise ConfigError(f"{where}: poll-interval, report-interval and request-timeout must be > 0")
    if s.cores < 1 or s.retries < 0:
        raise ConfigError(f"{where}: cores must be >= 1 and retries >= 0")


def _check_ray(cfg: FlowbusConfig, origin: str) -> None:
    ray = cfg.ray
    for key in ("move_after", "connect_timeout", "start_timeout"):
        if getattr(ray, key) <= 0:
            raise ConfigError(f"{origin}: ray.{key.replace('_', '-')}: must be > 0")
    if ray.actors < 0:
        raise ConfigError(f"{origin}: ray.actors: must be >= 0 (0 = one actor per sessions-per-actor sessions)")
    for key in ("sessions_per_actor", "poll_workers", "open_concurrency"):
        if getattr(ray, key) < 1:
            raise ConfigError(f"{origin}: ray.{key.replace('_', '-')}: must be >= 1")
    if not ray.address.strip():
        raise ConfigError(f"{origin}: ray.address: empty (use 'local', 'auto', host:port or ray://host:port)")
    kinds = {str(t.__struct_config__.tag) for t in SessionConfig.__args__}
    seen: set[str] = set()
    for i, grp in enumerate(ray.placement):
        where = f"{origin}: ray.placement[{i}]"
        if not grp.name or "/" in grp.name or grp.name == "default" or grp.name in seen:
            raise ConfigError(f"{where}.name: {grp.name!r} must be non-empty, unique, not 'default' and without '/'")
        seen.add(grp.name)
        if grp.actors < 1:
            raise ConfigError(f"{where} ({grp.name}).actors: must be >= 1")
        if not grp.sessions and not grp.backends:
            raise ConfigError(f"{where} ({grp.name}): takes no session; set sessions (globs) or backends")
        bad = sorted(set(grp.backends) - kinds)
        if bad:
            raise ConfigError(f"{where} ({grp.name}).backends: unknown backend {bad[0]!r} "
                              f"(one of: {', '.join(sorted(kinds))})")
        for res, amount in grp.resources.items():
            if not res or not amount > 0:
                raise ConfigError(f"{where} ({grp.name}).resources.{res}: must be a name with an amount > 0")
        for key, value in grp.node_labels.items():
            if not key or not isinstance(value, str) or not value:
                raise ConfigError(f"{where} ({grp.name}).node-labels.{key}: must be a non-empty string")


def load_config(path: str | os.PathLike[str] | None) -> FlowbusConfig:
    """Load a TOML file, or the embedded default when ``path`` is None."""
    if path is None:
        return embedded_default()
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(raw, str(p), env=os.environ)
