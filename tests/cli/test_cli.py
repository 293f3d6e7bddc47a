"""The CLI as a user runs it: `flowbus up` in one process, the other commands from another."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.docs import page_blocks
from support.up import running_up

FLOWBUS = [sys.executable, "-m", "flowbus"]


def run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(FLOWBUS + args, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`flowbus up --demo` with its own state dir and random loopback ports; stopped by SIGTERM."""
    with running_up(tmp_path, "flowbus-cli-test", demo=True) as running:
        env = running.env
        env["UP_PID"] = str(running.proc.pid)
        env["UP_ERR"] = str(running.err)
        yield env
    out = running.stdout
    assert running.code == 0, f"flowbus up exited {running.code}: {running.err_tail()}"
    shown = [json.loads(line)["type"] for line in out.splitlines() if line.startswith("{")]
    assert "connected" in shown and "heartbeat" not in shown, "heartbeats are shown only with --heartbeats"
    assert not running.left, f"flowbus up left processes behind: {running.left}"
    assert not (running.state / "run.json").exists(), "the run file must be removed at exit"


class TestCliAgainstUp:
    @pytest.mark.timeout(420)
    def test_up_watch_status_wait_submit_call(self, up: dict[str, str]) -> None:
        """The demo runs; status, wait, submit, call and watch work from another process."""
        r = run(["wait", "qcg/local/state/demo-cleanup state=complete", "--timeout", "90", "--json"], up, 120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["native"] == "SUCCEED"
        r = run(["status", "qcg/local/state/", "--json"], up)
        assert r.returncode == 0, r.stderr
        states = {e["key"]: e["state"] for e in json.loads(r.stdout)}
        assert states["demo-broken"] == "aborted" and states["demo-ensemble:2"] == "complete"
        r = run(["submit", "qcg", "--exec", "/bin/echo", "--arg", "hi", "--name", "cli-job"], up)
        assert r.returncode == 0 and r.stdout.strip() == "cli-job", r.stderr
        r = run(["wait", "qcg/local/state/cli-job final=true", "--timeout", "60"], up, 90)
        assert r.returncode == 0 and "cli-job" in r.stdout, r.stderr
        r = run(["call", "local", "status", '[["cli-job"]]'], up)
        assert r.returncode == 0 and "SUCCEED" in r.stdout, r.stderr
        # a command's limit is never below the operation's own bound: wait4(timeout=30) under --timeout 1
        r = run(["submit", "qcg", "--exec", "/bin/sleep", "--arg", "3", "--name", "long-one"], up)
        assert r.returncode == 0, r.stderr
        r = run(["call", "local", "wait4", '[["long-one"], 30]', "--timeout", "1"], up, 90)
        assert r.returncode == 0 and "SUCCEED" in r.stdout, r.stderr
        r = run(["call", "local", "cancel", '[["cli-job"]]'], up)  # finished: QCG refuses it, per job
        assert r.returncode == 1 and "cancel on 'local' failed for some items: cli-job" in r.stderr, (r.stdout, r.stderr)
        assert json.loads(r.stdout)["errors"]
        r = run(["watch", "qcg/local/state/cli-job", "--snapshot", "--json", "--count", "1"], up)
        assert r.returncode == 0 and json.loads(r.stdout)["key"] == "cli-job", r.stderr
        r = run(["wait", "qcg/local/state/cli-job state=aborted", "--timeout", "1"], up)
        assert r.returncode == 124 and "timed out after 1 s waiting for qcg/local/state/cli-job state=aborted" in r.stderr
        r = run(["call", "local", "no-such-op"], up)
        assert r.returncode == 1 and r.stderr.startswith("flowbus: error: session 'local': unknown operation 'no-such-op'")
        r = run(["stats", "--json"], up)
        assert r.returncode == 0 and json.loads(r.stdout)["stats"]["received"] > 0
        limits = json.loads(r.stdout)["limits"]  # every bound, with its use (docs/retention.md)
        assert limits["retention"]["local"]["retain_count"] == 10_000 and limits["retention"]["local"]["retained"] > 0
        assert limits["journal_events"]["limit"] == 200_000 and limits["forgotten_kept"]["limit"] == 10_000
        # the README's Python tour, as written
        readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
        tour = re.search(r"```python\n(.*?)```", readme, re.S)
        assert tour is not None
        r = subprocess.run([sys.executable, "-c", tour.group(1)], env=up, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "State.COMPLETE", (r.stdout, r.stderr[-2000:])
        # the Python examples of the docs, as written (tests/repo/test_doc_examples.py checks each runs here)
        api, publishing = page_blocks("docs/python-api.md")
        r = subprocess.run([sys.executable, "-c", api], env=up, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        seq, first = r.stdout.splitlines()[:2]
        assert int(seq) > 0 and first.split()[1].startswith("State."), r.stdout
        r = subprocess.run([sys.executable, "-c", publishing], env=up, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        r = run(["status", "flowbus/my-pipeline/state/", "--json"], up)
        assert r.returncode == 0 and [e["state"] for e in json.loads(r.stdout)] == ["active"], (r.stdout, r.stderr)
        (orchestration,) = page_blocks("docs/orchestration.md")
        r = subprocess.run([sys.executable, "-c", orchestration], env=up, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "['a', 'b']", (r.stdout, r.stderr[-2000:])
        # Prometheus: the owner's token is required; the metrics name sessions, events and the broker
        import urllib.error
        import urllib.request

        run_info = json.loads((Path(up["FLOWBUS_STATE_DIR"]) / "run.json").read_text())
        url = run_info["metrics"]
        assert url.startswith("http://127.0.0.1:")
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(url, timeout=10)  # noqa: S310 - the http:// URL flowbus up wrote
        assert denied.value.code == 401
        token = (Path(up["FLOWBUS_STATE_DIR"]) / "metrics.token").read_text().strip()
        scrape = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})  # noqa: S310 - http://
        with urllib.request.urlopen(scrape, timeout=10) as reply:  # noqa: S310 - the URL flowbus up wrote
            text = reply.read().decode()
        assert 'flowbus_session_up{backend="qcg",source="local"} 1.0' in text
        assert 'flowbus_events_total{backend="qcg",source="local",type="state"}' in text
        assert "flowbus_broker_up 1.0" in text and 'flowbus_broker_total{counter="received"}' in text
        doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
        documented = set(re.findall(r"`(flowbus_[a-z_]+)`", doc))
        assert documented and all(f"# TYPE {name} " in text for name in documented), \
            sorted(n for n in documented if f"# TYPE {n} " not in text)
        # typos are refused at once, naming the known values; watch takes wait's expressions
        for match, needle in [("qcg/lcoal/state/cli-job", "unknown session 'lcoal'"),
                              ("qcg/local/state/cli-job state=complet", "did you mean 'complete'?"),
                              ("qcg/local/state/cli-job stat=complete", "did you mean 'state'?")]:
            t0 = time.monotonic()
            r = run(["wait", match, "--timeout", "60"], up)
            assert r.returncode == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert time.monotonic() - t0 < 30
        r = run(["status", "qcg/*/state/", "--state", "aborted", "--json"], up)
        rows = json.loads(r.stdout)
        assert r.returncode == 0 and rows and {e["state"] for e in rows} == {"aborted"}, r.stderr
        assert "demo-broken" in {e["key"] for e in rows}
        r = run(["status", "qcg/local/state/", "--state", "abortd"], up)
        assert r.returncode == 1 and "did you mean 'aborted'?" in r.stderr, r.stderr
        r = run(["watch", "qcg/*/state/ state=aborted", "--snapshot", "--json", "--count", "1", "--for", "30"], up)
        assert r.returncode == 0 and json.loads(r.stdout)["state"] == "aborted", r.stderr

    @pytest.mark.timeout(420)
    def test_up_restarts_a_dead_broker(self, up: dict[str, str]) -> None:
        """SIGKILL of the broker under `up`: it is started again, the journal is kept, and
        commands and waits work afterwards."""
        runfile = Path(up["FLOWBUS_STATE_DIR"]) / "run.json"
        r = run(["wait", "qcg/local/state/demo-cleanup state=complete", "--timeout", "90"], up, 120)
        assert r.returncode == 0, r.stderr
        old = json.loads(runfile.read_text())["broker_pid"]
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and json.loads(runfile.read_text()).get("broker_pid") == old:
            time.sleep(0.2)  # `up` notices within its 0.5 s loop; no event to arm across processes
        assert json.loads(runfile.read_text())["broker_pid"] != old, "up did not restart the broker"
        r = run(["status", "qcg/local/state/demo-cleanup", "--json"], up)
        assert r.returncode == 0 and json.loads(r.stdout)[0]["state"] == "complete", "journal lost"
        r = run(["submit", "qcg", "--exec", "/bin/true", "--name", "after-restart"], up)
        assert r.returncode == 0, r.stderr
        r = run(["wait", "qcg/local/state/after-restart state=complete", "--timeout", "60"], up, 90)
        assert r.returncode == 0, r.stderr


class TestCliErrors:
    @pytest.mark.timeout(60)
    def test_usage_errors_exit_2(self) -> None:
        """Missing or unknown arguments are usage errors (exit 2)."""
        assert run(["wait"], dict(os.environ)).returncode == 2
        assert run(["frobnicate"], dict(os.environ)).returncode == 2

    @pytest.mark.timeout(60)
    def test_version_and_bare_command(self) -> None:
        """`flowbus --version` names the version; bare `flowbus` shows the help (exit 0)."""
        from flowbus import __version__

        r = run(["--version"], dict(os.environ))
        assert r.returncode == 0 and r.stdout.strip() == f"flowbus {__version__}"
        r = run([], dict(os.environ))
        assert r.returncode == 0 and r.stdout.startswith("usage: flowbus") and "watch" in r.stdout

    @pytest.mark.timeout(60)
    def test_bad_addresses_and_ports_are_one_line(self) -> None:
        """An address without tcp:// (flag or $FLOWBUS_ADDRESS), garbage, a port out of range:
        one line naming it and the right form, no traceback."""
        env = dict(os.environ)
        for args, needle in [(["stats", "--address", "127.0.0.1:7760"], "did you mean 'tcp://127.0.0.1:7760'?"),
                             (["stats", "--address", "garbage"], "expected tcp://HOST:PORT or ipc://PATH"),
                             (["status", "--address", "tcp://127.0.0.1:99999"], "a port in 1..65535")]:
            r = run(args, env)
            assert r.returncode == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        r = run(["status"], {**env, "FLOWBUS_ADDRESS": "localhost:1"})
        assert r.returncode == 1 and "did you mean 'tcp://localhost:1'?" in r.stderr, r.stderr
        r = run(["emulate", "guiserver", "--port", "99999"], env)
        assert r.returncode == 2 and "99999 is not a port" in r.stderr and "Traceback" not in r.stderr

    @pytest.mark.timeout(60)
    def test_a_closed_pipe_is_not_a_traceback(self) -> None:
        """`flowbus --help | head -1`-style early exits of the reader end quietly."""
        proc = subprocess.Popen([*FLOWBUS, "emulate", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before anything was written
        _, err = proc.communicate(timeout=30)
        assert b"Traceback" not in err

    @pytest.mark.timeout(60)
    def test_bad_config_is_one_line_naming_key_and_file(self, tmp_path: Path) -> None:
        """An unknown config key fails `up` at once with one line naming the key and the file."""
        cfg = tmp_path / "bad.toml"
        cfg.write_text("[bus]\nhots = '127.0.0.1'\n")
        r = run(["up", "--config", str(cfg)], dict(os.environ))
        assert r.returncode == 1
        assert r.stderr.strip() == f"flowbus: error: {cfg}: unknown key 'bus.hots'"

    @pytest.mark.timeout(60)
    def test_port_in_use_is_a_clear_error(self, tmp_path: Path) -> None:
        """`up` on a port something else holds fails at once, naming the socket and the port."""
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            cfg = tmp_path / "f.toml"
            cfg.write_text(f'state-dir = "{tmp_path}"\n[bus]\ntransport = "tcp"\nrequest-port = {port}\n'
                           'publish-port = 0\ningest-port = 0\ncommand-port = 0\n')
            r = run(["up", "--config", str(cfg)], dict(os.environ))
        assert r.returncode == 1
        assert f"cannot bind the request socket on tcp://127.0.0.1:{port}" in r.stderr.strip().splitlines()[-1]

    @pytest.mark.timeout(60)
    def test_no_broker_is_a_clear_error(self) -> None:
        """Commands against an address where nobody listens fail within their timeout, clearly."""
        r = run(["status", "--address", "tcp://127.0.0.1:9", "--timeout-connect", "1"], dict(os.environ))
        assert r.returncode == 1
        assert "nothing answers at tcp://127.0.0.1:9 (Connection refused): is `flowbus up` running?" in r.stderr

    @pytest.mark.timeout(60)
    def test_keys_writes_a_keypair(self, tmp_path: Path) -> None:
        """`flowbus keys` writes a public and a private CurveZMQ key file."""
        r = run(["keys", "--dir", str(tmp_path), "--name", "broker"], dict(os.environ))
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "broker.key").exists() and (tmp_path / "broker.key_secret").exists()
        assert oct((tmp_path / "broker.key_secret").stat().st_mode & 0o777) == "0o600"

    @pytest.mark.timeout(60)
    def test_emulate_guiserver_serves_until_sigterm(self, tmp_path: Path) -> None:
        """`flowbus emulate guiserver` listens on 127.0.0.1, answers a connection, stops on SIGTERM."""
        import socket

        proc = subprocess.Popen([*FLOWBUS, "emulate", "guiserver", "--port", "0", "--sandbox", str(tmp_path)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("guiServer emulator on 127.0.0.1:"), line
            port = int(line.split()[3].rsplit(":", 1)[1])
            assert port > 0
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0



class TestHelp:
    def test_every_command_describes_itself_with_examples_that_parse(self) -> None:
        """Each subcommand's --help has a description and examples; every example is a command
        line the parser accepts (so the help cannot show a form that no longer exists)."""
        import shlex

        from flowbus._cli import EXAMPLES, _parser

        parser = _parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # the subcommands
        assert set(EXAMPLES) == set(sub.choices)
        for name, command in sub.choices.items():
            assert command.description and "examples:" in (command.epilog or ""), name
            for line in EXAMPLES[name]:
                argv = shlex.split(line, comments=True)
                assert argv[:2] == ["flowbus", name], line
                parser.parse_args(argv[1:])  # SystemExit (exit 2) on a form the parser refuses

    def test_the_shell_completes_subcommands(self, tmp_path: Path) -> None:
        """argcomplete's protocol, as bash runs it after `eval "$(register-python-argcomplete flowbus)"`."""
        out = tmp_path / "completions"
        env = {**os.environ, "_ARGCOMPLETE": "1", "COMP_LINE": "flowbus st", "COMP_POINT": "10",
               "_ARGCOMPLETE_IFS": "\n", "_ARGCOMPLETE_STDOUT_FILENAME": str(out)}
        r = subprocess.run([str(Path(sys.executable).parent / "flowbus")], env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        assert out.read_text().split() == ["status", "stats"]
