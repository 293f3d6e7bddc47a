"""Ray's token authentication and private temp directory (docs/DESIGN.md, "Security";
docs/notes/ray-deploy.md §1.11), with real processes:

- the session Ray of ``ray_local``: every Ray process runs in token mode with flowbus's token
  file; a GCS call or a ``ray.init`` without that token, or from another user (uid 65534 through
  ``setpriv``), is refused, while the same call with the token is answered;
- the token file is 0600 in a 0700 directory, and Ray's temp root lies in a 0700 directory that
  nobody else can enter;
- ``start_ray``/``stop_ray`` in a child process of its own: the temp directory is gone afterwards,
  and nothing of that Ray is left running;
- the token helpers (``ensure_token``, ``ray_auth_env``, ``use_ray_auth``), without Ray.

Every child process runs in a process group of its own, bounded by a timeout; the group is
killed (by the child's PID) when the child overruns or the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from flowbus.schemas import ConfigError

ray = pytest.importorskip("ray")

from flowbus.actors import _ray, ensure_token, ray_auth_env

CHILD_TIMEOUT = 90.0
NOBODY = 65534
#: ``ray.init`` retries a refused GCS connection 20 times, 1 s apart: 2 is enough to see the refusal
FAST_REFUSAL = {"RAY_NUM_REDIS_GET_RETRIES": "2"}
#: what a refused connection leaves in Ray's log lines (gcs_client.cc)
REFUSED = ("Unauthenticated", "InvalidAuthToken")

#: a GCS request with a given ``authorization`` header (or none), and a ray.init: what a stranger tries
STRANGER = r"""
import json, os, sys, time
import grpc
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

address, token_file, temp_dir, header = sys.argv[1:5]
out = {"uid": os.getuid()}
for what, path in (("token", token_file), ("temp", temp_dir)):
    try:
        open(path).read() if what == "token" else os.listdir(path)
        out[what] = "READABLE"
    except OSError as exc:
        out[what] = type(exc).__name__
with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
    try:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
            gcs_service_pb2.GetClusterIdRequest(), timeout=10,
            metadata=(("authorization", header),) if header else ())
        out["gcs"] = "OK"
    except grpc.RpcError as exc:
        out["gcs"] = exc.code().name
import ray
t0 = time.monotonic()
try:
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    out["init"] = "JOINED"
    ray.shutdown()
except Exception as exc:
    out["init"] = type(exc).__name__
out["init_seconds"] = round(time.monotonic() - t0, 1)
print(json.dumps(out))
"""


def run_child(args: list[str], env: dict[str, str], timeout: float = CHILD_TIMEOUT,
              cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``args`` in a process group of its own, bounded by ``timeout``; the group is killed (by
    the child's PID) afterwards in any case, so nothing it started outlives it."""
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, close_fds=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode is None:
            proc.communicate(timeout=10)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray token, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    return {**env, **extra}


def last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    data: dict[str, Any] = json.loads(lines[-1])
    return data


def gcs_call(address: str, header: str | None) -> str:
    """GetClusterId on the GCS, with ``authorization: header`` (None: no header): "OK" or the gRPC status."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=10,  # type: ignore[attr-defined]  # generated protobuf
                              metadata=(("authorization", header),) if header else ())
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return "OK"


def our_token() -> Path:
    return Path(os.environ["RAY_AUTH_TOKEN_PATH"])


def ray_processes() -> dict[str, psutil.Process]:
    """The session Ray's GCS and raylet: children of this (the driver's) process that name its temp dir."""
    temp = str(_ray.ray_temp_dir())
    found = {p.name(): p for p in psutil.Process().children(recursive=True)
             if p.name() in ("gcs_server", "raylet") and temp in " ".join(p.cmdline())}
    assert set(found) == {"gcs_server", "raylet"}, found
    return found


@pytest.fixture(scope="module")
def nobody_python() -> Iterator[list[str]]:
    """The command prefix that runs this venv's Python as uid/gid 65534 (skips when that cannot be done here)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot run a client as another user")
    if os.geteuid() != 0:
        pytest.skip("running a client as another user (setpriv --reuid) needs root")
    prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable]
    probe = run_child([*prefix, "-c", "import grpc, ray; print(ray.__version__)"],
                      {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1"}, 60, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"uid {NOBODY} cannot run {sys.executable} with Ray: {probe.stderr.strip()[-300:]}")
    yield prefix


@pytest.mark.ray
@pytest.mark.timeout(180)
class TestSessionRayAdmitsOnlyTheToken:
    """The session Ray (``ray_local``) answers only requests that carry flowbus's token."""

    def test_every_ray_process_runs_in_token_mode(self, ray_local: str) -> None:
        """The GCS, the raylet and a worker run with RAY_AUTH_MODE=token and the state dir's token file, no inline token."""
        token = our_token()
        assert token == Path(os.environ["FLOWBUS_STATE_DIR"]) / "ray" / "auth_token"
        assert os.environ["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in os.environ
        for name, proc in ray_processes().items():
            env = proc.environ()
            assert (env.get("RAY_AUTH_MODE"), env.get("RAY_AUTH_TOKEN_PATH"), env.get("RAY_AUTH_TOKEN")) == (
                "token", str(token), None), name

        @ray.remote(num_cpus=0)  # type: ignore[untyped-decorator]  # ray.remote is untyped
        def worker_env() -> tuple[str | None, str | None, bool]:
            return os.environ.get("RAY_AUTH_MODE"), os.environ.get("RAY_AUTH_TOKEN_PATH"), "RAY_AUTH_TOKEN" in os.environ

        assert ray.get(worker_env.remote(), timeout=60) == ("token", str(token), False)

    def test_gcs_refuses_a_call_without_the_token(self, ray_local: str) -> None:
        """GetClusterId without a token, or with a wrong one, is UNAUTHENTICATED; with flowbus's token it is answered."""
        right = f"Bearer {our_token().read_text().strip()}"
        assert gcs_call(ray_local, None) == "UNAUTHENTICATED"
        assert gcs_call(ray_local, "Bearer " + "0" * 64) == "UNAUTHENTICATED"
        assert gcs_call(ray_local, right[:-1]) == "UNAUTHENTICATED"  # one character short
        assert gcs_call(ray_local, right) == "OK"

    def test_ray_init_without_the_token_is_refused(self, ray_local: str, tmp_path: Path) -> None:
        """A driver with a wrong token, and one with auth disabled, cannot ray.init the session Ray; one with the token can."""
        wrong = tmp_path / "wrong_token"
        wrong.write_text("1" * 64)
        wrong.chmod(0o600)
        cases = {
            "wrong token": child_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(wrong), **FAST_REFUSAL),
            "auth disabled": child_env(RAY_AUTH_MODE="disabled", **FAST_REFUSAL),
            "our token": child_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(our_token()), **FAST_REFUSAL),
        }
        for case, env in cases.items():
            proc = run_child([sys.executable, "-c", STRANGER, ray_local, str(our_token()), str(tmp_path), ""], env)
            got = last_json(proc)
            if case == "our token":
                assert got["init"] == "JOINED", (case, got, proc.stderr[-2000:])
            else:
                assert got["init"] == "ConnectionError", (case, got)
                assert all(word in proc.stderr for word in REFUSED), (case, proc.stderr[-2000:])

    def test_join_ray_names_a_refused_token_within_seconds(self, ray_local: str, tmp_path: Path) -> None:
        """join_ray with another state dir's token (none in the environment): BusBroken saying the token was refused, fast."""
        code = ("import json, time\nfrom flowbus.actors import join_ray\nt0 = time.monotonic()\ntry:\n"
                f"    join_ray({ray_local!r}, 'x'); out = {{'joined': True}}\n"
                "except Exception as exc:\n    out = {'error': type(exc).__name__, 'message': str(exc)}\n"
                "out['seconds'] = time.monotonic() - t0\nprint(json.dumps(out))")
        got = last_json(run_child([sys.executable, "-c", code], child_env(FLOWBUS_STATE_DIR=str(tmp_path / "other"))))
        assert got.get("error") == "BusBroken" and "refused our Ray token" in got["message"], got
        assert str(tmp_path / "other" / "ray" / "auth_token") in got["message"]
        assert got["seconds"] < 10, got

    def test_another_user_can_neither_read_the_token_nor_join(self, ray_local: str, nobody_python: list[str]) -> None:
        """uid 65534 cannot read the token file or enter Ray's temp dir; the GCS refuses its calls, and its ray.init fails."""
        temp = _ray.ray_temp_dir()
        assert temp is not None
        base = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1",
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **FAST_REFUSAL}
        for mode in ("disabled", "token"):
            env = {**base, "RAY_AUTH_MODE": mode, **({"RAY_AUTH_TOKEN": "2" * 64} if mode == "token" else {})}
            # the Ray root itself is 0777 (Ray makes it so): the 0700 directory around it keeps others out
            proc = run_child([*nobody_python, "-c", STRANGER, ray_local, str(our_token()), str(temp / _ray.RAY_ROOT),
                              "Bearer " + "2" * 64], env, cwd="/")
            got = last_json(proc)
            assert got == {"uid": NOBODY, "token": "PermissionError", "temp": "PermissionError",
                           "gcs": "UNAUTHENTICATED", "init": "ConnectionError", "init_seconds": got["init_seconds"]}, got
            assert all(word in proc.stderr for word in REFUSED), (mode, proc.stderr[-2000:])


@pytest.mark.ray
class TestPrivateFiles:
    """The token file and Ray's temp directory are the flowbus user's alone."""

    def test_token_file_is_0600_in_a_0700_directory(self, ray_local: str) -> None:
        """The token file is a regular file of ours, 0600, 64 hex characters, in a 0700 directory of a 0700 state dir."""
        token = our_token()
        st = token.lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o600
        text = token.read_text()
        assert len(text) == 64 and int(text, 16) >= 0
        for folder in (token.parent, token.parent.parent):
            st = folder.lstat()
            assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700, folder

    def test_ray_temp_dir_is_private(self, ray_local: str) -> None:
        """Ray's temp root (sessions, logs, unix sockets) lies in a 0700 directory of ours under /tmp, short enough for socket paths."""
        from ray._private import worker

        temp = _ray.ray_temp_dir()
        assert temp is not None and temp.parent == Path(_ray.TEMP_BASE) and temp.name.startswith(_ray.TEMP_PREFIX)
        st = temp.lstat()
        assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
        node = worker._global_node
        assert node is not None
        assert Path(node.get_temp_dir_path()) == temp / _ray.RAY_ROOT
        for path in (node.get_session_dir_path(), node.get_sockets_dir_path(), node.get_logs_dir_path()):
            assert Path(path).is_relative_to(temp), path
        assert len(str(Path(node.get_sockets_dir_path()) / "plasma_store")) < 100


@pytest.mark.ray
@pytest.mark.timeout(150)
class TestStartStop:
    """start_ray and stop_ray in a child process of their own."""

    def test_stop_ray_removes_the_temp_dir_and_leaves_nothing_running(self, tmp_path: Path) -> None:
        """While Ray runs its temp dir is 0700 and the token is the state dir's; after stop_ray the directory is gone and no Ray process is left."""
        code = r"""
import json, os, stat, sys
import psutil
from pathlib import Path
from flowbus.actors import _ray, start_ray, stop_ray
from flowbus.schemas import RayConfig
out = {}
start_ray(RayConfig(num_cpus=1, object_store_mb=80, namespace="fbauth"), state_dir=Path(sys.argv[1]))
temp = _ray.ray_temp_dir()
out["temp"] = str(temp)
out["mode"] = stat.S_IMODE(temp.stat().st_mode)
out["token"] = os.environ["RAY_AUTH_TOKEN_PATH"]
out["ray_processes"] = len(psutil.Process().children(recursive=True))
stop_ray()
stop_ray()  # idempotent
out["exists_after"] = os.path.lexists(temp)
out["alive_after"] = [" ".join(p.cmdline())[:80] for p in psutil.Process().children(recursive=True)
                      if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
out["remembered_after"] = _ray.ray_temp_dir() is not None
print(json.dumps(out))
"""
        state = tmp_path / "state"
        env = child_env(FLOWBUS_STATE_DIR=str(tmp_path / "unused"))
        cwd = str(Path(__file__).resolve().parents[2])
        proc = run_child([sys.executable, "-c", code, str(state)], env, 120, cwd=cwd)
        got = last_json(proc)
        temp = Path(got["temp"])
        assert temp.parent == Path(_ray.TEMP_BASE) and temp.name.startswith(_ray.TEMP_PREFIX), got
        assert got["mode"] == 0o700 and got["token"] == str(state / "ray" / "auth_token"), got
        assert got["ray_processes"] >= 2, got  # GCS and raylet at least
        assert got["exists_after"] is False and not temp.exists(), got
        assert got["alive_after"] == [] and got["remembered_after"] is False, got
        assert not (tmp_path / "unused").exists()  # the state_dir argument wins over FLOWBUS_STATE_DIR

    def test_start_ray_sweeps_the_temp_dirs_of_killed_makers(self, tmp_path: Path) -> None:
        """start_ray removes a temp dir of ours whose maker died (killed before stop_ray); a live maker's, one a running process names, and one without owner file stay."""
        made = {name: Path(tempfile.mkdtemp(prefix=_ray.TEMP_PREFIX, dir=_ray.TEMP_BASE))
                for name in ("dead", "alive", "named", "legacy")}
        waiting: list[subprocess.Popen[bytes]] = []
        try:
            def waiter(*args: str) -> psutil.Process:
                proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", *args],
                                        stdin=subprocess.PIPE, start_new_session=True, close_fds=True)
                waiting.append(proc)
                return psutil.Process(proc.pid)

            gone = waiter()
            gone_created = gone.create_time()
            waiting[0].communicate(b"", timeout=30)  # it exits: the maker is dead
            me = psutil.Process()
            owners = {"dead": (gone.pid, gone_created), "alive": (me.pid, me.create_time()),
                      "named": (gone.pid, gone_created)}
            for name, (pid, created) in owners.items():
                (made[name] / _ray.OWNER_FILE).write_text(f"{pid} {created!r}\n")
            waiter(str(made["named"]))  # a running process names it (as Ray's processes name theirs)
            code = ("import json\nfrom flowbus.actors import start_ray, stop_ray\nfrom flowbus.schemas import RayConfig\n"
                    "start_ray(RayConfig(num_cpus=1, object_store_mb=80, namespace='fbauth'))\nstop_ray()\nprint('{}')")
            last_json(run_child([sys.executable, "-c", code], child_env(FLOWBUS_STATE_DIR=str(tmp_path / "s")), 120))
            assert {name: path.exists() for name, path in made.items()} == {
                "dead": False, "alive": True, "named": True, "legacy": True}
        finally:
            for proc in waiting:
                if proc.poll() is None:
                    proc.communicate(b"", timeout=30)
            for path in made.values():
                shutil.rmtree(path, ignore_errors=True)


class TestTokenHelpers:
    """ensure_token, ray_auth_env and use_ray_auth, without a Ray cluster."""

    def test_ensure_token_creates_it_once(self, tmp_path: Path) -> None:
        """The first call makes a 64-hex-character 0600 token in a 0700 directory (and the state dir, 0700); later calls keep it."""
        state = tmp_path / "state"
        path = ensure_token(state)
        assert path == state / "ray" / "auth_token"
        text = path.read_text()
        assert len(text) == 64 and int(text, 16) >= 0
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and stat.S_IMODE(state.stat().st_mode) == 0o700
        assert ensure_token(state) == path and path.read_text() == text
        assert [p.name for p in path.parent.iterdir()] == ["auth_token"]  # no temporary file left
        assert ensure_token(tmp_path / "other").read_text() != text

    def test_processes_starting_at_once_agree_on_one_token(self, tmp_path: Path) -> None:
        """Eight threads making the token of a fresh state dir at once all get the same complete token."""
        state = tmp_path / "state"
        got: list[str] = []
        barrier = threading.Barrier(8)

        def make() -> None:
            barrier.wait(10)
            got.append(ensure_token(state).read_text())

        threads = [threading.Thread(target=make) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(got) == 8 and len(set(got)) == 1 and len(got[0]) == 64

    def test_a_token_others_may_have_read_is_refused(self, tmp_path: Path) -> None:
        """A group/world-readable, empty, foreign-typed (symlink) token file is a ConfigError naming it; a wide directory is tightened."""
        path = ensure_token(tmp_path / "a")
        path.chmod(0o644)
        with pytest.raises(ConfigError, match="mode 0644: others may have read it"):
            ensure_token(tmp_path / "a")
        (tmp_path / "b" / "ray").mkdir(parents=True)
        (tmp_path / "b" / "ray" / "auth_token").symlink_to(path)
        with pytest.raises(ConfigError, match="not a regular file of ours"):
            ensure_token(tmp_path / "b")
        empty = tmp_path / "c" / "ray" / "auth_token"
        empty.parent.mkdir(parents=True)
        empty.touch(0o600)
        with pytest.raises(ConfigError, match="is empty"):
            ensure_token(tmp_path / "c")
        (tmp_path / "c" / "ray").chmod(0o755)
        empty.write_text("x" * 64)
        ensure_token(tmp_path / "c")
        assert stat.S_IMODE((tmp_path / "c" / "ray").stat().st_mode) == 0o700

    def test_ray_auth_env(self, tmp_path: Path) -> None:
        """ray_auth_env gives token mode and the state dir's token file, for a child's environment."""
        assert ray_auth_env(tmp_path / "s") == {"RAY_AUTH_MODE": "token",
                                                 "RAY_AUTH_TOKEN_PATH": str(tmp_path / "s" / "ray" / "auth_token")}

    def test_importing_the_actors_forces_token_mode(self, tmp_path: Path) -> None:
        """RAY_AUTH_MODE=disabled in the environment is overridden to token when flowbus.actors is imported, before Ray reads it."""
        code = ("import os\nimport flowbus.actors\nfrom ray._raylet import AuthenticationMode, get_authentication_mode\n"
                "print(os.environ['RAY_AUTH_MODE'], get_authentication_mode() == AuthenticationMode.TOKEN)")
        proc = run_child([sys.executable, "-c", code], child_env(RAY_AUTH_MODE="disabled",
                                                                 FLOWBUS_STATE_DIR=str(tmp_path / "s")), 60)
        assert proc.returncode == 0 and proc.stdout.split() == ["token", "True"], (proc.stdout, proc.stderr[-2000:])

    def test_joining_keeps_the_token_the_environment_gives(self, tmp_path: Path) -> None:
        """Joining (keep_given) keeps RAY_AUTH_TOKEN (KubeRay's) and makes no token of its own; a cluster of our own uses the state dir's token."""
        code = ("import json, os\nfrom flowbus.actors import _ray\nfrom ray._raylet import AuthenticationTokenLoader as L\n"
                "out = {'join': _ray.use_ray_auth(keep_given=True), 'header': L.instance().get_token_for_http_header()}\n"
                "out['own_token_made'] = os.path.exists(os.environ['FLOWBUS_STATE_DIR'] + '/ray/auth_token')\n"
                "out['own'] = _ray.use_ray_auth()\n"
                "out['env'] = [os.environ.get(k) for k in ('RAY_AUTH_MODE', 'RAY_AUTH_TOKEN', 'RAY_AUTH_TOKEN_PATH')]\n"
                "out['own_header'] = L.instance().get_token_for_http_header()\nprint(json.dumps(out))")
        state = tmp_path / "s"
        got = last_json(run_child([sys.executable, "-c", code],
                                  child_env(RAY_AUTH_TOKEN="3" * 64, FLOWBUS_STATE_DIR=str(state)), 60))
        own = state / "ray" / "auth_token"
        assert got["join"] == "$RAY_AUTH_TOKEN" and got["header"] == {"authorization": "Bearer " + "3" * 64}, got
        assert got["own_token_made"] is False, got
        assert got["own"] == str(own) and got["env"] == ["token", None, str(own)], got
        assert got["own_header"] == {"authorization": f"Bearer {own.read_text()}"}, got

    def test_an_unreadable_given_token_file_is_a_clear_error(self, tmp_path: Path) -> None:
        """A RAY_AUTH_TOKEN_PATH that cannot be read is a ConfigError naming it (Ray itself would abort the process)."""
        code = ("from flowbus.actors import _ray\nfrom flowbus.schemas import ConfigError\ntry:\n"
                "    _ray.use_ray_auth(keep_given=True)\nexcept ConfigError as exc:\n    print('ConfigError', exc)")
        missing = tmp_path / "no-such-token"
        proc = run_child([sys.executable, "-c", code], child_env(RAY_AUTH_TOKEN_PATH=str(missing),
                                                                 FLOWBUS_STATE_DIR=str(tmp_path / "s")), 60)
        assert proc.returncode == 0 and proc.stdout.startswith("ConfigError"), (proc.stdout, proc.stderr[-2000:])
        assert f"RAY_AUTH_TOKEN_PATH={str(missing)!r}" in proc.stdout
