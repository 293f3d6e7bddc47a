"""The dashboard of a real `flowbus up` (Ray, broker, a local QCG session), and `flowbus dashboard`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.dashboard import http_get
from support.up import running_up

FLOWBUS = [sys.executable, "-m", "flowbus"]


@pytest.mark.timeout(420)
def test_up_serves_the_dashboard_and_flowbus_dashboard_prints_and_serves_it(tmp_path: Path) -> None:
    """`flowbus up` prints the dashboard's URL and writes it to run.json; `flowbus dashboard`
    prints it with the token; the page's API shows the demo's jobs; a job's log is asked of the
    session through the command path; `flowbus dashboard --serve` serves a second one."""
    with running_up(tmp_path, "flowbus-dashboard-test", extra="[metrics]\nport = 0\n[dashboard]\nport = 0", demo=True) as running:
        env, runfile = running.env, running.state / "run.json"
        url = json.loads(runfile.read_text())["dashboard"]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        assert f"dashboard at {url}?token=" in (tmp_path / "up.err").read_text()

        r = subprocess.run([*FLOWBUS, "dashboard"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        login = r.stdout.strip()
        token = (tmp_path / "state" / "dashboard.token").read_text().strip()
        assert login == f"{url}?token={token}"
        assert http_get(url + "api/state")[0] == 401
        status, headers, _ = http_get(login)
        assert status == 303 and "HttpOnly" in headers["set-cookie"]
        auth = {"Authorization": f"Bearer {token}"}
        deadline = time.monotonic() + 60
        keys: set[str] = set()
        while time.monotonic() < deadline and "demo-broken" not in keys:
            keys = {row["key"] for row in json.loads(http_get(url + "api/state", auth)[2])["rows"]}
            time.sleep(0.2)  # polling another process's state over HTTP; no event to arm from here
        assert "demo-broken" in keys, keys
        # a job's log, as a click asks for it: the session's `logs` operation through the command path
        r = subprocess.run([*FLOWBUS, "submit", "qcg", "--exec", "/bin/echo", "--arg", "dash-hello", "--name",
                            "dash-echo", "--stdout", str(tmp_path / "echo.out")], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        r = subprocess.run([*FLOWBUS, "wait", "qcg/local/state/dash-echo state=complete", "--timeout", "120"], env=env,
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        status, _, body = http_get(url + "api/logs?session=local&key=dash-echo", auth, timeout=60)
        answer = json.loads(body)
        assert status == 200 and any("dash-hello" in p["text"] for p in answer["parts"]), answer
        _, _, body = http_get(url + "api/logs?session=local&key=demo-prepare", auth, timeout=60)
        assert "demo-prepare" in json.loads(body)["error"]  # the backend's reason, shown as "no logs: <reason>"

        serve = subprocess.Popen([*FLOWBUS, "dashboard", "--serve", "--port", "0", "--duration", "60"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert serve.stdout is not None
            line = serve.stdout.readline()
            assert line.startswith("dashboard at http://127.0.0.1:"), (line, serve.stderr.read() if serve.stderr else "")
            second = line.split()[2]
            assert second.endswith(f"?token={token}") and not second.startswith(url)
            status, _, body = http_get(second.split("?")[0] + "api/state", auth)
            assert status == 200 and "demo-broken" in body
        finally:
            serve.send_signal(signal.SIGTERM)
            assert serve.wait(30) == 0
    assert running.code == 0, running.err_tail()
    assert not running.left, f"left behind: {running.left}"
    assert not runfile.exists()


def test_flowbus_dashboard_says_in_one_line_what_is_missing(tmp_path: Path) -> None:
    """Without a running `flowbus up`, or with --serve's options alone, one line says why (exit 1)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    env = {**os.environ, "FLOWBUS_STATE_DIR": str(state)}
    env.pop("FLOWBUS_ADDRESS", None)
    for args, needle in [([], "no `flowbus up` is running here"), (["--port", "0"], "--port goes with --serve"),
                         (["--serve", "--duration", "1"], "cannot subscribe to the bus")]:
        r = subprocess.run([*FLOWBUS, "dashboard", *args], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
