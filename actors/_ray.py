"""Starting or joining Ray: loopback-only, token-authenticated, in a private temp directory
(docs/notes/ray-deploy.md §1.1, §1.9, §1.11; docs/DESIGN.md, "Security").

The fences are set before Ray is imported anywhere in the process: by ``_fences``, which
``import flowbus.actors`` runs first (the package loads everything else lazily), and which this
module imports again before ``ray``:

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: without it a local Ray listens on every interface.
- ``RAY_AUTH_MODE=token``, always (never ``disabled``): on a shared login node every local user
  reaches 127.0.0.1, and a Ray without its token authentication runs their code as ours.

How the token reaches every Ray process. Ray reads ``RAY_AUTH_MODE`` into its C++ ``RayConfig``
when ``ray`` is *imported* (a later change is not seen until ``Config.initialize``), and the
token (``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``)
when a connection first needs it. So :func:`start_ray` and :func:`join_ray` put the token into
``os.environ`` and refresh Ray's config and token cache *before* ``ray.init``; every process
``ray.init(address="local")`` starts (GCS, raylet, agents, and the workers the raylet starts)
inherits that environment, and so does every child process started afterwards (``flowbus up``
subprocesses, ``ray start``). Processes started elsewhere get the same two variables from
:func:`ray_auth_env`.

Which token: a cluster flowbus starts uses ``<state dir>/ray/auth_token`` (0600, made by
:func:`ensure_token`); joining uses the token the environment gives (``RAY_AUTH_TOKEN``, as
KubeRay injects it from its Secret, or ``RAY_AUTH_TOKEN_PATH``), else that same file, which is
how the CLI joins the Ray of ``flowbus up`` on the same machine.

Ray's temp directory (logs, unix sockets, session files) is ``/tmp/fbray-XXXXXXXX/r``: Ray makes
its root 0777, so the root sits inside a 0700 directory of ours that nobody else can enter, and
:func:`stop_ray` removes that directory (only the one :func:`start_ray` made; also at exit). A
process killed before it could do so leaves its directory behind: the next :func:`start_ray`
removes those of ours whose maker (recorded in ``owner``) is gone and that no process names.
"""

from __future__ import annotations

from . import _fences  # noqa: F401 - first: the fences, before ray is imported

# isort: split
import atexit
import logging
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import psutil
import ray
import structlog
from ray.exceptions import AuthenticationError

from flowbus.schemas import BusBroken, ConfigError, RayConfig

log = structlog.get_logger("flowbus.ray")

# Ray Client's proxy starts one server per driver, and now and then loses it at birth (a fork
# race in the proxy, ray-project/ray#63202): the driver gets "Initialization failure from
# server" after ~30 s; a new connection usually works
CLIENT_ATTEMPTS = 3
JOIN_PROBE_TIMEOUT = 5.0

FAST_HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}

#: the token file, relative to the state directory
TOKEN_FILE = Path("ray") / "auth_token"
#: where Ray's temp root goes: a short path, Ray's unix socket paths have a ~107 character limit
TEMP_BASE = "/tmp"  # noqa: S108 - our 0700 directory goes inside (below)
TEMP_PREFIX = "fbray-"
#: Ray's root inside our 0700 directory (Ray chmods its root 0777; the parent keeps others out)
RAY_ROOT = "r"
#: in our directory: "<pid> <start time>" of the process that made it
OWNER_FILE = "owner"

_ENV_TOKEN, _ENV_TOKEN_PATH = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"

#: the private directory start_ray made for the local Ray, which stop_ray removes
_temp_parent: Path | None = None
_atexit_registered = False


# -- the token ---------------------------------------------------------------------------------


def default_state_dir() -> Path:
    """The state directory (``FLOWBUS_STATE_DIR``, else ``~/.local/state/flowbus``), created 0700;
    ``ConfigError`` when it is not a directory of ours. (The rules of ``FlowbusConfig.state_path``.)"""
    return _private_dir(Path(os.environ.get("FLOWBUS_STATE_DIR") or "~/.local/state/flowbus").expanduser(),
                        "state-dir", follow=True)


def _private_dir(path: Path, what: str, *, follow: bool) -> Path:
    """``path`` as a directory of ours with mode 0700 (made, or tightened); ConfigError otherwise.
    ``follow=False`` refuses a symlink (a directory we create ourselves is never one)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat() if follow else path.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{what} {str(path)!r} is not a directory")
        if st.st_uid != os.getuid():
            raise ConfigError(f"{what} {str(path)!r} belongs to another user (uid {st.st_uid}); use a directory "
                              "of your own")
        if st.st_mode & 0o777 != 0o700:
            path.chmod(0o700)
    except OSError as exc:  # FileExistsError: a file there; PermissionError: not ours to make
        raise ConfigError(f"{what} {str(path)!r}: {exc.strerror or exc}") from None
    return path


def ensure_token(state_dir: Path | None = None) -> Path:
    """The Ray token file ``<state_dir>/ray/auth_token`` (``state_dir`` None: :func:`default_state_dir`),
    created when missing: 64 hex characters (``secrets.token_hex(32)``), mode 0600, in a 0700
    directory. Creation is atomic (a complete 0600 file is linked into place), so two processes
    starting at once agree on one token. ``ConfigError`` for a token file that is not a regular
    file of ours, is empty, or is readable by anyone else (then it may have leaked: delete it,
    and stop the Ray that used it)."""
    base = (default_state_dir() if state_dir is None
            else _private_dir(Path(state_dir).expanduser(), "state-dir", follow=True))
    folder = _private_dir(base / TOKEN_FILE.parent, "ray token directory", follow=False)
    path = folder / TOKEN_FILE.name
    if not os.path.lexists(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)  # 0600
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(secrets.token_hex(32))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process made it first: theirs is the token
        finally:
            os.unlink(tmp)
    return _check_token_file(path)


def _check_token_file(path: Path) -> Path:
    try:
        st = path.lstat()
        ok = stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()
        if not ok:
            raise ConfigError(f"ray token file {str(path)!r} is not a regular file of ours; remove it")
        if st.st_mode & 0o077:
            raise ConfigError(f"ray token file {str(path)!r} has mode {stat.S_IMODE(st.st_mode):04o}: others may "
                              "have read it; remove it (a new one is made) and stop any Ray that used it")
        if not path.read_text(encoding="ascii", errors="replace").strip():
            raise ConfigError(f"ray token file {str(path)!r} is empty; remove it (a new one is made)")
    except OSError as exc:
        raise ConfigError(f"ray token file {str(path)!r}: {exc.strerror or exc}") from None
    return path


def ray_auth_env(state_dir: Path | None = None) -> dict[str, str]:
    """What a Ray process needs to join flowbus's Ray: ``RAY_AUTH_MODE=token`` and
    ``RAY_AUTH_TOKEN_PATH`` = :func:`ensure_token` (``state_dir``). For a child environment
    (``{**os.environ, **ray_auth_env(d)}``); ``RAY_AUTH_TOKEN``, which Ray prefers over the file,
    must not be set there."""
    return {"RAY_AUTH_MODE": "token", _ENV_TOKEN_PATH: str(ensure_token(state_dir))}


def use_ray_auth(state_dir: Path | None = None, *, keep_given: bool = False) -> str:
    """Make this process, and every process it starts from now on, use Ray token auth, and make
    the already imported Ray see it. The token: ``<state_dir>/ray/auth_token`` (made when
    missing); with ``keep_given``, a token the environment already gives (``RAY_AUTH_TOKEN``, or
    a readable ``RAY_AUTH_TOKEN_PATH``) is kept instead. Returns where the token comes from."""
    given = os.environ.get(_ENV_TOKEN) or os.environ.get(_ENV_TOKEN_PATH)
    if keep_given and given:
        if os.environ.get(_ENV_TOKEN):
            source = f"${_ENV_TOKEN}"
        else:
            source = os.environ[_ENV_TOKEN_PATH]
            try:  # Ray aborts the whole process on an unreadable or empty token file: refuse it first
                if not Path(source).read_text(encoding="ascii", errors="replace").strip():
                    raise ConfigError(f"{_ENV_TOKEN_PATH}={source!r}: the token file is empty")
            except OSError as exc:
                raise ConfigError(f"{_ENV_TOKEN_PATH}={source!r}: {exc.strerror or exc}") from None
    else:
        source = str(ensure_token(state_dir))
        os.environ.pop(_ENV_TOKEN, None)
        os.environ[_ENV_TOKEN_PATH] = source
    os.environ["RAY_AUTH_MODE"] = "token"
    if not ray.is_initialized():
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]  # compiled, no stub

        Config.initialize("")  # re-reads RAY_AUTH_MODE (Ray read it at import)
        AuthenticationTokenLoader.instance().reset_cache()
    return source


def _check_token_accepted(address: str, timeout: float) -> None:
    """Ask the GCS at ``address`` (host:port) for its cluster id with our token: ConnectionError
    naming the cause when it refuses the token (``ray.init`` would retry for ~20 s and then report
    only "Failed to connect"). Anything else is left to ``ray.init``."""
    import grpc
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]  # compiled, no stub
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = tuple(AuthenticationTokenLoader.instance().get_token_for_http_header().items())
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:  # as Ray dials it
        try:
            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            # generated protobuf classes carry no type information
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(),  # type: ignore[attr-defined]
                              timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                where = f"${_ENV_TOKEN}" if os.environ.get(_ENV_TOKEN) else os.environ.get(_ENV_TOKEN_PATH, "?")
                raise ConnectionError(f"the cluster refused our Ray token (from {where}); give the cluster's token "
                                      f"in {_ENV_TOKEN} or {_ENV_TOKEN_PATH}") from None


# -- start, join, stop -------------------------------------------------------------------------


def start_ray(cfg: RayConfig, state_dir: Path | None = None) -> str:
    """``address = "local"``: a private Ray on 127.0.0.1, with token auth (the token of
    ``state_dir``, None: :func:`default_state_dir`) and a private temp directory that
    :func:`stop_ray` removes; otherwise join ``cfg.address`` (the environment's token, else the
    state dir's). Returns the GCS address other drivers (the CLI) can join."""
    global _temp_parent, _atexit_registered  # noqa: PLW0603 - one Ray, one temp dir per process
    if ray.is_initialized():
        return str(ray.get_runtime_context().gcs_address)
    common: dict[str, Any] = {"namespace": cfg.namespace, "logging_level": logging.ERROR, "log_to_driver": False,
                              "include_dashboard": False}
    try:
        if cfg.address == "local":
            use_ray_auth(state_dir)
            sweep_stale_temp_dirs()
            parent = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=TEMP_BASE))  # 0700, ours
            _temp_parent = parent
            me = psutil.Process()
            (parent / OWNER_FILE).write_text(f"{me.pid} {me.create_time()!r}\n", encoding="ascii")
            if not _atexit_registered:  # runs before Ray's own atexit shutdown (LIFO), and does it
                atexit.register(stop_ray)
                _atexit_registered = True
            try:
                ray.init(address="local", num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_mb * 2**20,
                         _temp_dir=str(parent / RAY_ROOT), _system_config=FAST_HEALTH, **common)
            except BaseException:
                ray.shutdown(wait_for_processes=True)  # whatever of the node did start
                stop_ray()
                raise
        else:
            use_ray_auth(state_dir, keep_given=True)
            _probe(cfg)
            if cfg.address.startswith("ray://"):
                _client_init(cfg.address, cfg.namespace)
            else:
                ray.init(address=cfg.address, **{k: v for k, v in common.items() if k != "include_dashboard"})
    except (ConnectionError, RuntimeError, ValueError, AuthenticationError) as exc:
        raise BusBroken(f"ray: cannot start or join a cluster at {cfg.address!r}: {exc}") from exc
    if cfg.address.startswith("ray://"):
        return cfg.address  # a Ray Client driver has no GCS address of its own
    return str(ray.get_runtime_context().gcs_address)


def _probe(cfg: RayConfig) -> None:
    """Fail within ``connect-timeout`` seconds for an unreachable cluster (``ray.init`` waits ~80 s),
    or one that refuses our token."""
    from ._placement import probe_address

    address = cfg.address
    if address.startswith("ray://"):
        from ray._private.utils import get_ray_client_dependency_error

        missing = get_ray_client_dependency_error()
        if missing is not None:
            raise ConnectionError(f"a ray:// address needs the Ray Client (pip package ray[client]: {missing}); "
                                  "or give the cluster's GCS address, host:6379")
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        resolved = canonicalize_bootstrap_address("auto")
        if resolved is None:
            raise ConnectionError("address 'auto': no running Ray cluster found (RAY_ADDRESS is unset and none was "
                                  "started on this machine)")
        address = resolved
    probe_address(address, cfg.connect_timeout)
    if not address.startswith("ray://"):
        _check_token_accepted(address, cfg.connect_timeout)


def _client_init(address: str, namespace: str) -> None:
    """``ray.init`` through Ray Client, retried when the server failed to start this driver's server."""
    for attempt in range(1, CLIENT_ATTEMPTS + 1):
        try:
            ray.init(address=address, namespace=namespace, logging_level=logging.ERROR, log_to_driver=False)
            return
        except ConnectionAbortedError as exc:
            # the server's traceback ends with its reason, e.g. "Starting Ray client server failed. See ..."
            why = next((ln.strip() for ln in reversed(str(exc).splitlines()) if ln.strip()), type(exc).__name__)
            if attempt == CLIENT_ATTEMPTS:
                raise ConnectionError(f"the Ray Client server could not start a server for this driver "
                                      f"({attempt} attempts; last: {why}); see ray_client_server*.err in the "
                                      f"head's Ray logs") from exc
            log.warning("ray.client.init_failed", address=address, attempt=attempt, error=why[:300])


def join_ray(address: str, namespace: str, state_dir: Path | None = None) -> None:
    """Join a running cluster as a driver (the CLI joining ``flowbus up``), with the environment's
    Ray token, else the one of ``state_dir`` (None: :func:`default_state_dir`); BusBroken if it
    cannot (within ``JOIN_PROBE_TIMEOUT`` s when nothing listens there any more, or the cluster
    refuses the token)."""
    from ._placement import probe_address

    if ray.is_initialized():
        return
    try:
        use_ray_auth(state_dir, keep_given=True)
        probe_address(address, JOIN_PROBE_TIMEOUT)
        if address.startswith("ray://"):
            _client_init(address, namespace)
        else:
            _check_token_accepted(address, JOIN_PROBE_TIMEOUT)
            ray.init(address=address, namespace=namespace, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError, AuthenticationError) as exc:
        raise BusBroken(f"ray: cannot join the cluster of `flowbus up` at {address!r}: {exc}") from exc


def ray_temp_dir() -> Path | None:
    """The private directory :func:`start_ray` made for the local Ray (Ray's root is its ``r``),
    None when this process started none (or it was removed)."""
    return _temp_parent


def stop_ray() -> None:
    """Leave Ray: shut this driver down (a local Ray it started too, waiting for its processes),
    then remove the private temp directory :func:`start_ray` made, and no other. Idempotent."""
    global _temp_parent
    try:
        if ray.is_initialized():
            ray.shutdown(wait_for_processes=_temp_parent is not None)
    finally:
        parent, _temp_parent = _temp_parent, None
        if parent is not None:
            _remove_tree(parent)


def sweep_stale_temp_dirs() -> list[Path]:
    """Remove the temp directories of ours (``/tmp/fbray-*``, with an ``owner`` file) whose maker
    is gone, killed before its :func:`stop_ray` ran, and that no running process of ours names
    (Ray's processes carry their temp dir on their command line). Returns what was removed."""
    stale: list[Path] = []
    try:
        entries = list(os.scandir(TEMP_BASE))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            pid, created = (Path(entry.path) / OWNER_FILE).read_text(encoding="ascii").split()
            if _alive(int(pid), float(created)):
                continue
        except (OSError, ValueError):
            continue  # no owner file (yet, or not made by this code): not ours to judge
        stale.append(Path(entry.path))
    if not stale:
        return []
    named: set[Path] = set()
    for proc in psutil.process_iter(["uids", "cmdline"]):
        info = proc.info
        if not info.get("uids") or info["uids"].real != os.getuid():
            continue
        line = " ".join(info.get("cmdline") or [])
        named.update(path for path in stale if str(path) in line)
    removed = [path for path in stale if path not in named]
    for path in removed:
        _remove_tree(path)
        log.info("ray.temp_dir.swept", path=str(path))
    return removed


def _alive(pid: int, created: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return bool(abs(proc.create_time() - created) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _remove_tree(path: Path, attempts: int = 5) -> None:
    # a worker that outlived its raylet may still write a log line for a moment: a few tries
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return
    log.warning("ray.temp_dir.left", path=str(path))
