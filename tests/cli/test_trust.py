"""Trust, tried as an attacker would: the real embedded default (`flowbus up` with no config) under
attack from another local user (uid 65534 through setpriv) and from the owner's own careless
scripts. Nothing the attacker tries gets in; nothing the owner's scripts send takes a session's
source, bloats the broker or bricks the journal; the session keeps publishing and answering;
`flowbus up` starts again without --fresh.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

from flowbus.bus import Client, Publisher
from flowbus.bus import _framing as fr
from flowbus.schemas import SourceRefused, State, StateChanged, encode

FLOWBUS = [sys.executable, "-m", "flowbus"]
ATTACKER = [shutil.which("setpriv") or "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
MB100 = 100 * 1024 * 1024

pytestmark = pytest.mark.timeout(420)


def _attacker_can_run() -> str:
    """Why an unprivileged uid cannot run this checkout's Python here ('' when it can)."""
    if os.getuid() != 0 or not shutil.which("setpriv"):
        return "needs root and setpriv to act as another uid"
    probe = subprocess.run([*ATTACKER, sys.executable, "-c", "import flowbus.bus, zmq"], capture_output=True,
                           text=True, timeout=60, cwd="/")
    return "" if probe.returncode == 0 else f"uid 65534 cannot import this checkout: {probe.stderr.strip()[-200:]}"


class Up:
    """`flowbus up` with no config (the embedded default) in a state dir under a world-readable
    parent, so only flowbus's own permissions stand between it and other users."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.state = base / "state"
        self.env = {**os.environ, "FLOWBUS_STATE_DIR": str(self.state)}
        self.env.pop("FLOWBUS_ADDRESS", None)
        self.proc: subprocess.Popen[str] | None = None
        self.run: dict[str, Any] = {}

    def start(self, *extra: str) -> dict[str, Any]:
        runfile = self.state / "run.json"
        err = open(self.base / "up.err", "a")  # noqa: SIM115 - closed below, the child keeps its copy
        self.proc = subprocess.Popen([*FLOWBUS, "up", *extra, "--duration", "400"], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=err, text=True)
        err.close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not runfile.exists() and self.proc.poll() is None:
            time.sleep(0.2)  # another process reaching a state; nothing to arm across processes
        assert runfile.exists(), f"flowbus up did not start: {(self.base / 'up.err').read_text()[-2000:]}"
        self.run = json.loads(runfile.read_text())
        return self.run

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FLOWBUS, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        kids = [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)] if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self.proc = None
        for pid in kids:  # nothing of it may outlive it; end only what it started
            try:
                psutil.Process(pid).wait(30)
            except psutil.NoSuchProcess:
                pass
            except psutil.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
        assert code == 0, f"flowbus up exited {code}: {(self.base / 'up.err').read_text()[-2000:]}"

    def tcp_ports(self) -> list[int]:
        """Loopback TCP ports that `flowbus up` and its descendants listen on (Ray's)."""
        assert self.proc is not None
        me = psutil.Process(self.proc.pid)
        ports: set[int] = set()
        for p in [me, *me.children(recursive=True)]:
            try:
                ports |= {c.laddr.port for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
            except psutil.Error:
                continue
        return sorted(ports)


@pytest.fixture
def up() -> Iterator[Up]:
    base = Path(tempfile.mkdtemp(prefix="flowbus-trust-"))
    base.chmod(0o755)  # other users may look into the parent: only the state dir's own mode protects it
    u = Up(base)
    try:
        yield u
    finally:
        try:
            u.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _rss_mib(pid: int) -> float:
    rss: int = psutil.Process(pid).memory_info().rss
    return rss / 2**20


class TestTrustByDefault:
    def test_other_user_and_careless_owner_change_nothing(self, up: Up) -> None:
        """Another uid is refused everywhere, the owner's scripts cannot take, bloat or brick
        anything, the session keeps answering, and `flowbus up` starts again without --fresh."""
        why = _attacker_can_run()
        if why:
            pytest.skip(why)
        run = up.start()
        state = up.state
        assert run["request"].startswith("ipc://"), "the embedded default talks over ipc in the state dir"
        assert oct(state.stat().st_mode & 0o777) == "0o700"
        for name in ("run.json", "keys/grant.key", "journal/journal.000001"):
            assert oct((state / name).stat().st_mode & 0o777) == "0o600", name
        broker_pid = int(run["broker_pid"])
        assert not [c for c in psutil.Process(broker_pid).net_connections("inet") if c.status == psutil.CONN_LISTEN], \
            "the embedded default's broker listens on no TCP port"
        client = Client(run["request"])
        try:
            epoch_before = client.marks()["local"][1]
            # -- another local user ------------------------------------------------------------
            plan = {"state": str(state), "tcp_ports": up.tcp_ports(), "gcs": run["ray_address"]}
            report: dict[str, str] = {}
            for mode in ("bus", "ray"):
                attack = subprocess.run([*ATTACKER, sys.executable, str(Path(__file__).resolve().parents[1] / "support" / "attacker.py"),
                                         json.dumps(plan), mode], capture_output=True, text=True, timeout=150, cwd="/")
                assert attack.returncode == 0, attack.stderr[-2000:]
                report.update(json.loads(attack.stdout.strip().splitlines()[-1]))
            assert report["uid"] == "65534"
            accepted = {k: v for k, v in report.items() if v.startswith("ACCEPTED")}
            assert accepted == {}, f"another user got in: {accepted}"
            assert report["ray join"].startswith("refused"), report["ray join"]
            # -- the owner's own scripts, by accident or worse -------------------------------------
            with pytest.raises(SourceRefused, match="belongs to session qcg/local"):
                pub = Publisher(run["request"])
                try:
                    pub.open_source("local", "qcg")
                finally:
                    pub.close()
            ctx = zmq.Context()
            try:
                raw = ctx.socket(zmq.DEALER)
                raw.linger = 0
                raw.connect(run["ingest"])
                raw.send_multipart([fr.REGISTER, fr.pack(["local", "qcg", 2**64 - 1, 0, 0])])
                assert raw.poll(5000), "an absurd registration is answered"
                kind, body = raw.recv_multipart()
                assert kind == fr.REFUSED and fr.unpack(body)[1] in ("out_of_range", "owned")
                # data for the session's source from a connection that did not register it
                # (the right epoch and the very next seq: only the holder check stands in the way)
                nxt = client.marks()["local"][2] + 1
                forged = StateChanged(source="local", backend="qcg", key="forged", state=State.COMPLETE, seq=nxt,
                                      incarnation=epoch_before)
                raw.send_multipart([fr.DATA, fr.pack_data("local", epoch_before, nxt, [encode(forged)])])
                self._flood(run, client, broker_pid)
            finally:
                ctx.destroy(linger=0)
            # -- the session is untouched and still answers ----------------------------------------
            assert client.marks()["local"][1] == epoch_before, "no new incarnation of the session"
            r = up.cli("submit", "qcg", "--exec", "/bin/true", "--name", "after-attack")
            assert r.returncode == 0, r.stderr
            r = up.cli("wait", "qcg/local/state/after-attack state=complete", "--timeout", "60")
            assert r.returncode == 0, r.stderr
            journal = client.subscribe("qcg/local/", start="journal")
            try:
                seen = []
                while (ev := journal.recv(2.0)) is not None:
                    seen.append(ev)
            finally:
                journal.close()
            assert seen and all(ev.incarnation == epoch_before for ev in seen if ev.source == "local")
            assert not [ev for ev in seen if ev.key == "forged"], "a forged event reached the journal"
            stats = client.stats()["stats"]
            assert stats.get("refused.owned", 0) >= 1 and stats.get("refused.out_of_range", 0) + stats.get(
                "refused.owned", 0) >= 2
        finally:
            client.close()
        up.stop()
        # -- and it comes back, journal and all, without --fresh --------------------------------
        run = up.start()
        r = up.cli("call", "local", "resources")
        assert r.returncode == 0, r.stderr
        with Client(run["request"]) as again:
            assert again.marks()["local"][1] == epoch_before + 1
            assert any(e.key == "after-attack" for e in again.status("qcg/local/state/"))

    @staticmethod
    def _flood(run: dict[str, Any], client: Client, broker_pid: int) -> None:
        """100 MB frames on every socket and a 100 MB topic on the publish socket, all at once
        (from a process of their own: libzmq itself may crash in the *sender* when the broker
        drops such a subscriber): the broker stays under 512 MiB and keeps answering."""
        done = threading.Event()
        peak = [_rss_mib(broker_pid)]

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss_mib(broker_pid))
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        flood = subprocess.Popen([sys.executable, "-c", _FLOOD, json.dumps(run)], stdout=subprocess.PIPE, text=True)
        try:
            assert flood.stdout is not None and flood.stdout.readline().strip() == "sent", "the flood was sent"
            answered = 0
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                assert client.stats()["broker_id"], "the broker answers during the flood"
                assert time.monotonic() - t0 < 2.0, "an answer within 2 s during the flood"
                answered += 1
            assert answered >= 5
        finally:
            done.set()
            sampler.join(5)
            if flood.poll() is None:
                flood.kill()
            flood.wait(30)
            if flood.stdout is not None:
                flood.stdout.close()
        assert peak[0] < 512, f"broker RSS peaked at {peak[0]:.0f} MiB"
        assert psutil.pid_exists(broker_pid), "the broker survived"


#: an abusive script of the owner's: 100 MB on each socket, a 100 MB subscription, then it idles
#: until killed (it never closes its sockets: the test ends it by PID)
_FLOOD = """
import json, sys, time, zmq
run = json.loads(sys.argv[1])
ctx = zmq.Context()
big = b"\\0" * (100 * 1024 * 1024)
socks = []
for endpoint in (run["ingest"], run["request"], run["command"]):
    s = ctx.socket(zmq.DEALER); s.sndtimeo = 5000; s.connect(endpoint); socks.append(s)
    for _ in range(3):
        s.send(big)
sub = ctx.socket(zmq.SUB); sub.connect(run["publish"]); sub.setsockopt(zmq.SUBSCRIBE, big)
print("sent", flush=True)
time.sleep(60)
"""
