"""The dashboard's server on a real bus, over plain HTTP: the guard, the API and the SSE stream."""

from __future__ import annotations

import http.client
import json
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from flowbus.bus import CommandServer
from flowbus.dashboard import CSP, TOKEN_FILE, bind, cookie_name
from flowbus.schemas import FlowbusError, State
from support.bus import BusFactory, bus_fixture, state  # noqa: F401 - the bus fixture
from support.dashboard import DashboardFactory, dashboard_fixture, http_get  # noqa: F401 - fixture

#: another user cannot run the venv's python (the work tree is private): the system's is used
SYSTEM_PYTHON = "/usr/bin/python3"


class TestGuard:
    def test_requests_without_the_token_are_refused(self, bus: BusFactory, dashboard: DashboardFactory) -> None:
        """No token, a wrong token, a wrong cookie: 401, and the page's data is not in the answer."""
        broker = bus.broker()
        pub = bus.source(broker.address, "s1")
        pub.publish(state("s1", "secret-job", State.ACTIVE))
        pub.flush(5)
        dash = dashboard.start(broker.address)
        for path in ("/", "/api/state", "/api/events", "/api/logs?session=s1&key=x", "/static/dashboard.js"):
            status, headers, body = http_get(dash.url.rstrip("/") + path)
            assert status == 401, (path, status)
            assert "secret-job" not in body and headers["content-security-policy"] == CSP
        assert http_get(dash.url + "api/state?token=wrong")[0] == 401
        assert http_get(dash.url + "api/state", {"Cookie": f"{cookie_name(dash.port)}=nope"})[0] == 401
        assert http_get(dash.url + "api/state", {"Authorization": "Bearer nope"})[0] == 401

    def test_the_token_sets_a_strict_cookie_and_a_bearer_header_works(self, bus: BusFactory,
                                                                      dashboard: DashboardFactory) -> None:
        """?token= answers with a redirect setting an HttpOnly SameSite=Strict cookie for this
        port; that cookie, or Authorization: Bearer, then opens the API."""
        broker = bus.broker()
        pub = bus.source(broker.address, "s1")
        pub.publish(state("s1", "job1", State.ACTIVE))
        pub.flush(5)
        dash = dashboard.start(broker.address)
        status, headers, _ = http_get(dash.login_url)
        assert status == 303 and headers["location"] == "/"
        cookie = headers["set-cookie"]
        assert cookie.startswith(f"{cookie_name(dash.port)}=") and "HttpOnly" in cookie
        assert "samesite=strict" in cookie.lower() and dash.token not in cookie
        value = cookie.split(";")[0]
        status, _, body = http_get(dash.url + "api/state", {"Cookie": value})
        assert status == 200 and [r["id"] for r in json.loads(body)["rows"]] == ["qcg/s1/job1"]
        status, _, body = http_get(dash.url + "api/state", {"Authorization": f"Bearer {dash.token}"})
        assert status == 200
        status, headers, _ = http_get(f"{dash.url}/evil.example/?token={dash.token}&match=qcg/")
        assert status == 303 and headers["location"] == "/evil.example/?match=qcg%2F"  # never to another site

    def test_a_foreign_host_header_is_refused(self, bus: BusFactory, dashboard: DashboardFactory) -> None:
        """A page served under another name (DNS rebinding to 127.0.0.1) gets 403, token or not."""
        dash = dashboard.start(bus.broker().address)
        status, _, _ = http_get(dash.url + "api/state", {"Host": f"evil.example:{dash.port}",
                                                          "Authorization": f"Bearer {dash.token}"})
        assert status == 403

    def test_the_token_file_is_private_and_kept(self, bus: BusFactory, dashboard: DashboardFactory,
                                                tmp_path: Path) -> None:
        """dashboard.token is 0600 in the 0700 state dir and the same token is used again."""
        broker = bus.broker()
        first = dashboard.start(broker.address)
        token_file = tmp_path / "state" / TOKEN_FILE
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
        assert dashboard.start(broker.address).token == first.token

    @pytest.mark.skipif(os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
                        reason="needs root (to run a request as another user) and the system's python3")
    def test_another_user_without_the_token_is_refused(self, bus: BusFactory, dashboard: DashboardFactory) -> None:
        """Another local user (uid 65534) reaches 127.0.0.1 but cannot read the token: 401."""
        dash = dashboard.start(bus.broker().address)
        code = ("import sys, urllib.request, urllib.error\n"
                "try:\n    urllib.request.urlopen(sys.argv[1], timeout=10)\n    print(200)\n"
                "except urllib.error.HTTPError as e:\n    print(e.code)\n")
        out = subprocess.run([SYSTEM_PYTHON, "-I", "-c", code, dash.url + "api/state"], user=65534, group=65534,
                             capture_output=True, text=True, timeout=60, check=True, cwd="/")
        assert out.stdout.strip() == "401"
        denied = subprocess.run([SYSTEM_PYTHON, "-I", "-c", f"open({dash.token_file!r}).read()"], user=65534,
                                group=65534, capture_output=True, text=True, timeout=60, cwd="/")
        assert denied.returncode != 0 and "Permission" in denied.stderr


class TestApi:
    def test_the_stream_sends_a_snapshot_then_each_change(self, bus: BusFactory, dashboard: DashboardFactory) -> None:
        """/api/events: a snapshot first, then the ops of a change published on the bus."""
        broker = bus.broker()
        pub = bus.source(broker.address, "s1")
        pub.publish(state("s1", "job1", State.QUEUED))
        pub.flush(5)
        dash = dashboard.start(broker.address)
        conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=10)
        try:
            conn.request("GET", "/api/events", headers={"Authorization": f"Bearer {dash.token}"})
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("content-type", "").startswith("text/event-stream")
            kind, data = read_sse(resp)
            assert kind == "snapshot" and [r["state"] for r in data["rows"]] == ["queued"]
            pub.publish(state("s1", "job1", State.COMPLETE))
            kind, data = read_sse(resp)
            assert kind == "ops" and data[0]["row"]["state"] == "complete"
        finally:
            conn.close()

    def test_streams_are_bounded_by_max_clients(self, bus: BusFactory, dashboard: DashboardFactory) -> None:
        """Beyond max-clients a stream is refused with 503 saying why; a closed one frees its place."""
        dash = dashboard.start(bus.broker().address, max_clients=1)
        auth = {"Authorization": f"Bearer {dash.token}"}
        first = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=10)
        try:
            first.request("GET", "/api/events", headers=auth)
            resp = first.getresponse()
            assert read_sse(resp)[0] == "snapshot"
            status, _, body = http_get(dash.url + "api/events", auth)
            assert status == 503 and "max-clients" in body
        finally:
            first.close()
        deadline = time.monotonic() + 20
        while dash.hub.clients() and time.monotonic() < deadline:
            time.sleep(0.05)  # the server notices the closed connection on its own; nothing to arm
        assert dash.hub.clients() == 0

    def test_the_filter_check_names_the_typo(self, bus: BusFactory, dashboard: DashboardFactory) -> None:
        """/api/check answers 400 with the parser's did-you-mean for a bad expression."""
        dash = dashboard.start(bus.broker().address)
        auth = {"Authorization": f"Bearer {dash.token}"}
        status, _, body = http_get(dash.url + "api/check?match=qcg/*%20stat=complete", auth)
        assert status == 400 and "did you mean 'state'" in json.loads(body)["error"]
        assert http_get(dash.url + "api/check?match=qcg/", auth)[0] == 200

    def test_logs_come_through_the_command_path(self, bus: BusFactory, dashboard: DashboardFactory) -> None:
        """/api/logs calls the session's `logs` operation through the bus' command socket, with
        max_bytes; an error of the backend comes back as the reason."""
        broker = bus.broker(grant_key_file="")
        seen: list[dict[str, Any]] = []

        def handler(req: dict[str, Any]) -> object:  # the worker side of `flowbus up`, answering the logs contract
            seen.append(req)
            if req["args"] == ["gone"]:
                raise FlowbusError("no output kept for 'gone'")
            return {"key": req["args"][0], "parts": [{"name": "stdout", "path": "/w/j.out", "text": "hello\n",
                                                      "truncated": False}]}

        server = CommandServer(broker.endpoints["command"], handler)
        try:
            dash = dashboard.start(broker.address)
            auth = {"Authorization": f"Bearer {dash.token}"}
            status, _, body = http_get(dash.url + "api/logs?session=local&key=j", auth, timeout=40)
            assert status == 200 and json.loads(body)["parts"][0]["text"] == "hello\n"
            assert seen[-1]["operation"] == "logs" and seen[-1]["kwargs"] == {"max_bytes": 65536}
            _, _, body = http_get(dash.url + "api/logs?session=local&key=gone", auth, timeout=40)
            assert "no output kept" in json.loads(body)["error"]
        finally:
            server.close()


class TestPort:
    def test_the_default_port_gives_way_and_another_taken_port_is_an_error(self) -> None:
        """When 7780 is taken a free port is used; a chosen port that is taken is a clear error."""
        taken = bind("127.0.0.1", 0)
        try:
            with pytest.raises(FlowbusError, match=f"cannot listen on 127.0.0.1:{taken.getsockname()[1]}"):
                bind("127.0.0.1", taken.getsockname()[1])
        finally:
            taken.close()
        try:
            holder = bind("127.0.0.1", 7780)
        except FlowbusError:
            holder = None  # someone else holds 7780 already: the point stands
        try:
            other = bind("127.0.0.1", 7780)
            assert other.getsockname()[1] != 7780
            other.close()
        finally:
            if holder is not None:
                holder.close()


def read_sse(resp: http.client.HTTPResponse, timeout: float = 10.0) -> tuple[str, Any]:
    """The next event of a Server-Sent Events stream (comments and retry lines skipped)."""
    deadline = time.monotonic() + timeout
    kind, data = "", ""
    while time.monotonic() < deadline:
        line = resp.readline().decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif line == "" and kind:
            return kind, json.loads(data)
    raise AssertionError("no event on the stream in time")
