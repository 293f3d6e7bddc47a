"""Shared fixtures: a loopback-only Ray, a broker factory, and the guards every run keeps:
no listener of ours beyond loopback, and no process of ours left behind."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["RAY_AUTH_MODE"] = "token"  # never "disabled"; the token: start_ray puts the state dir's in the env
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
#: what flowbus puts in the shared temp space, and what was there before this run: a run must
#: leave nothing new behind (checked in pytest_sessionfinish)
TEMP_PREFIXES = ("fbray-", "fbc-", "flowbus-")
TEMP_ROOTS = sorted({"/tmp", tempfile.gettempdir()})
_TEMP_BEFORE = {os.path.join(root, name) for root in TEMP_ROOTS if os.path.isdir(root)
                for name in os.listdir(root) if name.startswith(TEMP_PREFIXES)}
#: the run's private state dir (removed at the end), unless the caller gave one
_STATE_PREFIX = "flowbus-test-state-"
_OWN_STATE_DIR = "" if os.environ.get("FLOWBUS_STATE_DIR") else tempfile.mkdtemp(prefix=_STATE_PREFIX)
if _OWN_STATE_DIR:
    os.environ["FLOWBUS_STATE_DIR"] = _OWN_STATE_DIR

import psutil
import pytest
import structlog

from flowbus.bus import BrokerProcess
from flowbus.schemas import BusConfig
from support.netcheck import off_loopback_listeners, process_name


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[str]:
    """A private Ray on 127.0.0.1 for the whole run (started once: it costs ~4 s), with token auth
    (the token file of FLOWBUS_STATE_DIR) and a private temp dir that stop_ray removes."""
    from flowbus.actors import start_ray, stop_ray
    from flowbus.schemas import RayConfig

    address = start_ray(RayConfig(num_cpus=2, object_store_mb=80, namespace="flowbus-test"))
    bad = off_loopback_listeners()
    assert not bad, f"Ray is listening beyond loopback: {bad}"
    yield address
    stop_ray()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[object]:
    """Start real broker processes on random loopback ports; all are stopped at teardown."""
    made: list[BrokerProcess] = []

    def make(journal: bool = True, **bus: object) -> BrokerProcess:
        from flowbus.bus import ensure_grant_key

        # source grants on, as in `flowbus up`: Supervisors find the key through the broker's info
        key = str(ensure_grant_key(tmp_path / "keys" / "grant.key"))
        fields: dict[str, object] = {"transport": "tcp", "insecure_loopback": True, "request_port": 0, "publish_port": 0,
                                     "ingest_port": 0, "command_port": 0, "heartbeat_interval": 0.1,
                                     "grant_key_file": key, **bus}
        cfg = BusConfig(**fields)  # type: ignore[arg-type]  # fields: dict[str, object]
        n = len(made)
        bp = BrokerProcess(cfg, str(tmp_path / f"journal{n}") if journal else None, log_path=str(tmp_path / f"broker{n}.log"))
        bp.start()
        made.append(bp)
        return bp

    yield make
    for bp in made:
        bp.stop()


#: an entry that changed within this many seconds and that nothing ties to this run may be a
#: concurrent run's (the temp space is shared): it is reported, neither removed nor failed
_QUIET_S = 60.0


def _ray_drivers(path: str) -> set[int]:
    """The driver PIDs Ray names its session directories after (``session_<time>_<pid>``), in
    ``path`` or one level down (``fbray-XXXXXXXX/r/``)."""
    pids: set[int] = set()
    for folder in (path, *glob.glob(os.path.join(glob.escape(path), "*", ""))):
        with contextlib.suppress(OSError):
            pids.update(int(n.rsplit("_", 1)[1]) for n in os.listdir(folder)
                        if n.startswith("session_") and n.rsplit("_", 1)[1].isdigit())
    return pids


def _last_change(path: str) -> float:
    times = [os.lstat(path).st_mtime]
    with contextlib.suppress(OSError), os.scandir(path) as entries:
        times += [e.stat(follow_symlinks=False).st_mtime for e in entries]
    return max(times)


def _new_temp_entries() -> tuple[list[str], list[str]]:
    """Entries of flowbus' in the shared temp space that were not there when the run began and
    are this user's: (left behind by this run, perhaps a concurrent run's). Another process
    referring to one (cwd, command line, environment, open file), a live Ray driver other than
    this process, a recent change without a Ray session of this process, or another run's state
    dir (its FLOWBUS_STATE_DIR, set after exec, is not in its /proc environment) mean the latter."""
    me, uid = os.getpid(), os.getuid()
    new = {os.path.join(root, name) for root in TEMP_ROOTS if os.path.isdir(root)
           for name in os.listdir(root) if name.startswith(TEMP_PREFIXES)}
    new -= _TEMP_BEFORE
    new.discard(_OWN_STATE_DIR)
    mine = set()
    for path in new:
        with contextlib.suppress(OSError):
            if os.lstat(path).st_uid == uid:
                mine.add(path)
    if not mine:
        return [], []
    elsewhere: set[str] = set()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.uids().real != uid:
                continue
            refs = [proc.cwd(), *proc.cmdline(), *proc.environ().values(), *(f.path for f in proc.open_files())]
        except psutil.Error:
            continue
        elsewhere.update(path for path in mine if any(path in ref for ref in refs))
    now = time.time()
    for path in mine - elsewhere:
        if os.path.basename(path).startswith(_STATE_PREFIX):
            elsewhere.add(path)  # another run's: this run's is _OWN_STATE_DIR, removed at its end
            continue
        try:
            drivers = _ray_drivers(path)
            if (drivers - {me} and any(psutil.pid_exists(pid) for pid in drivers - {me})) or (me not in drivers and now - _last_change(path) < _QUIET_S):
                elsewhere.add(path)
        except OSError:
            elsewhere.add(path)  # gone meanwhile
    return sorted(mine - elsewhere), sorted(p for p in elsewhere if os.path.lexists(p))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a process started by the tests is still alive (then end it, by PID), or
    if the run left something of flowbus' in the shared temp space (then remove it); remove the
    run's state dir."""
    left = [p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    if left:
        names = [f"{p.pid}: {process_name(p.pid)}" for p in left]
        print(f"\nLEAKED PROCESSES after the test run: {names}")
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=5)
        session.exitstatus = 1
    leftovers, maybe_others = _new_temp_entries()
    if maybe_others:
        print(f"\nnew in the shared temp space, perhaps a concurrent run's (left alone): {maybe_others}")
    if leftovers:
        print(f"\nLEFT IN THE SHARED TEMP SPACE after the test run (now removed): {leftovers}")
        for path in leftovers:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        session.exitstatus = 1
    if _OWN_STATE_DIR:
        shutil.rmtree(_OWN_STATE_DIR, ignore_errors=True)
