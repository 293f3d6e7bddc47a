"""flowbus over a 3-node Ray cluster on loopback: placement by custom resources and node labels,
a node killed (sessions move and resync, no transition lost), a partitioned actor fenced, bad
placement input refused at start. Plus the pure placement functions and the subscriber's
incarnation check, which need no cluster.

The cluster runs in a child process (``support/cluster.py``): this pytest process may already be
a Ray driver of the session-scoped ``ray_local``, and one process joins one cluster only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowbus.actors._placement import check_fit, make_plan, probe_address
from flowbus.bus import Publisher, Subscriber, load_grant_key, make_grant
from flowbus.schemas import (
    ConfigError,
    EcflowSessionConfig,
    FlowbusConfig,
    Heartbeat,
    PlacementConfig,
    QcgSessionConfig,
    RayConfig,
    encode,
    parse_config,
)

TESTS = Path(__file__).resolve().parents[1]
SCENARIO_TIMEOUT = 600


def _node(alive: bool = True, labels: dict[str, str] | None = None, **res: float) -> dict[str, Any]:
    return {"Alive": alive, "Resources": {"CPU": 1.0, **res}, "Labels": {"ray.io/node-id": "x", **(labels or {})}}


class TestPlacementPlan:
    """Sessions to actors and the cluster check, without Ray."""

    def test_groups_take_sessions_by_backend_and_glob_and_spread_round_robin(self) -> None:
        """A group takes its sessions by backend or name glob and spreads them over its actors; the rest go to default."""
        cfg = FlowbusConfig(ray=RayConfig(placement=[
            PlacementConfig(name="ecf", backends=["ecflow"], actors=2, resources={"flowbus-ecf": 0.001}),
            PlacementConfig(name="site", sessions=["site-*"], node_labels={"site": "a"})]),
            sessions=[*[EcflowSessionConfig(name=f"e{i}") for i in range(3)],
                      QcgSessionConfig(name="site-q"), QcgSessionConfig(name="q")])
        plans = make_plan(cfg)
        assert {n: [s["name"] for s in p.specs] for n, p in plans.items()} == {
            "ecf-0": ["e0", "e2"], "ecf-1": ["e1"], "site-0": ["site-q"], "default-0": ["q"]}
        assert plans["ecf-1"].resources == {"flowbus-ecf": 0.001} and plans["site-0"].node_labels == {"site": "a"}

    def test_default_group_keeps_sessions_per_actor_and_named_actors(self) -> None:
        """Without placement, sessions naming an actor share it and the rest fill default-N by sessions-per-actor."""
        cfg = FlowbusConfig(ray=RayConfig(sessions_per_actor=2), sessions=[
            QcgSessionConfig(name="a", actor="shared"), QcgSessionConfig(name="b"), QcgSessionConfig(name="c"),
            QcgSessionConfig(name="d")])
        assert {n: [s["name"] for s in p.specs] for n, p in make_plan(cfg).items()} == {
            "shared": ["a"], "default-0": ["b", "c"], "default-1": ["d"]}

    def test_an_actor_shared_across_groups_is_refused(self) -> None:
        """Sessions of two placement groups naming the same actor are a ConfigError naming both groups."""
        cfg = FlowbusConfig(ray=RayConfig(placement=[PlacementConfig(name="ecf", backends=["ecflow"])]), sessions=[
            EcflowSessionConfig(name="e", actor="one"), QcgSessionConfig(name="q", actor="one")])
        with pytest.raises(ConfigError, match="actor 'one' is shared by sessions of placement groups 'ecf' and 'default'"):
            make_plan(cfg)

    def test_check_fit_names_the_group_and_what_is_missing(self) -> None:
        """Too much of a resource, a resource no node has, and an unknown label are ConfigErrors naming the group."""
        # (ignored arg-type: mypy fears that a resource name could fill alive= or labels=)
        nodes = [_node(labels={"site": "a"}, **{"flowbus-ecf": 1.0}), _node(**{"flowbus-ecf": 1.0}),  # type: ignore[arg-type]
                 _node(alive=False, **{"flowbus-ecf": 8.0})]  # type: ignore[arg-type]

        def fit(grp: PlacementConfig, n: int = 2) -> None:
            cfg = FlowbusConfig(ray=RayConfig(placement=[grp]), sessions=[EcflowSessionConfig(name=f"e{i}") for i in range(n)])
            check_fit(make_plan(cfg), nodes)

        fit(PlacementConfig(name="ok", backends=["ecflow"], actors=2, resources={"flowbus-ecf": 1.0}))
        with pytest.raises(ConfigError, match=r"group 'big'.*asks for flowbus-ecf=3, the cluster has 2 in all"):
            fit(PlacementConfig(name="big", backends=["ecflow"], resources={"flowbus-ecf": 3.0}))
        with pytest.raises(ConfigError, match=r"group 'many'.*do not fit"):
            fit(PlacementConfig(name="many", backends=["ecflow"], actors=3, resources={"flowbus-ecf": 1.0}), n=3)
        with pytest.raises(ConfigError, match=r"group 'gpu'.*offers the resource 'gpu'"):
            fit(PlacementConfig(name="gpu", backends=["ecflow"], resources={"gpu": 1.0}))
        with pytest.raises(ConfigError, match=r"group 'mars'.*labels \{'site': 'mars'\}.*site=a"):
            fit(PlacementConfig(name="mars", backends=["ecflow"], node_labels={"site": "mars"}))

    def test_placement_keys_are_validated_at_load(self) -> None:
        """Bad [[ray.placement]] tables are ConfigErrors naming the key."""
        bad = [({"name": "g"}, "takes no session"), ({"name": "g", "backends": ["ecfloww"]}, "unknown backend 'ecfloww'"),
               ({"name": "g", "sessions": ["*"], "actors": 0}, r"\(g\)\.actors"),
               ({"name": "g", "sessions": ["*"], "resources": {"x": -1}}, r"resources\.x"),
               ({"name": "default", "sessions": ["*"]}, r"placement\[0\]\.name"),
               ({"name": "g", "sessions": ["*"], "node_labels": {}}, "unknown key 'ray.placement\\[0\\].node_labels'")]
        for table, msg in bad:
            with pytest.raises(ConfigError, match=msg):
                parse_config({"ray": {"placement": [table]}}, "f.toml")
        with pytest.raises(ConfigError, match=r"ray.move-after"):
            parse_config({"ray": {"move-after": 0}}, "f.toml")

    def test_probe_address_fails_fast_for_nothing_listening(self) -> None:
        """An address where nothing listens is a ConnectionError within the timeout, not Ray's 80 s wait."""
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match=r"nothing answers at 127.0.0.1:9"):
            probe_address("ray://127.0.0.1:9", 2.0)
        with pytest.raises(ConnectionError, match="expected host:port"):
            probe_address("nowhere", 2.0)
        assert time.monotonic() - t0 < 10


class TestSubscriberFencing:
    """The subscriber drops live events of an incarnation older than the newest it saw."""

    def test_stale_incarnation_is_dropped_and_counted(self, broker_factory: Any) -> None:
        """After a source re-registers (new incarnation), a live event of the old one is dropped; the journal's history is not."""
        broker = broker_factory()
        grant = make_grant(load_grant_key(broker.config.grant_key_file), "src", "flowbus-test")
        old = Publisher(broker.address)
        new: Publisher | None = None
        sub = Subscriber(broker.address, "flowbus-test/", start="journal")
        try:
            inc_old, _ = old.open_source("src", "flowbus-test", grant=grant)
            old.publish(Heartbeat(source="src", backend="flowbus-test"))
            old.flush()
            new = Publisher(broker.address)
            inc_new, seq = new.open_source("src", "flowbus-test", grant=grant)
            assert inc_new > inc_old
            new.publish(Heartbeat(source="src", backend="flowbus-test"))
            new.flush()
            got: list[Any] = []
            deadline = time.monotonic() + 10
            while len(got) < 2 and time.monotonic() < deadline:
                got += sub.recv_many(0.2)
            assert [(e.seq, e.incarnation) for e in got] == [(1, inc_old), (2, inc_new)]
            # what a split-brain publisher could get past a broker that lost its journal
            stale = Heartbeat(source="src", backend="flowbus-test", seq=seq + 1, incarnation=inc_old, time=1)
            sub._handle(stale.topic().encode(), encode(stale))
            assert sub.recv(0.5) is None
            assert sub.statistics()["fenced"] == 1
        finally:
            sub.close()
            old.close()
            if new is not None:
                new.close()


class TestUpFlags:
    """`flowbus up --address/--broker` with nothing there: a clear error, fast, nothing left running."""

    def _up(self, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FLOWBUS_STATE_DIR": str(tmp_path / "state")}
        return subprocess.run([sys.executable, "-m", "flowbus", "up", "--duration", "5", *flags], capture_output=True,
                              text=True, timeout=60, env=env, close_fds=True)

    def test_unreachable_ray_address(self, tmp_path: Path) -> None:
        """--address where no Ray listens exits 1 naming the address (not Ray's 80 s wait)."""
        t0 = time.monotonic()
        proc = self._up(tmp_path, "--address", "127.0.0.1:9")
        assert proc.returncode == 1, proc.stderr
        assert "flowbus: error: ray: cannot start or join a cluster at '127.0.0.1:9'" in proc.stderr, proc.stderr
        assert time.monotonic() - t0 < 45

    def test_ray_client_address_is_checked(self, tmp_path: Path) -> None:
        """--address ray://... fails fast with what is missing: the Ray Client package, or a server at that address."""
        t0 = time.monotonic()
        proc = self._up(tmp_path, "--address", "ray://127.0.0.1:9")
        assert proc.returncode == 1, proc.stderr
        assert "ray[client]" in proc.stderr or "nothing answers at 127.0.0.1:9" in proc.stderr, proc.stderr
        assert time.monotonic() - t0 < 45

    def test_call_when_up_is_gone(self, tmp_path: Path) -> None:
        """`flowbus call` whose `flowbus up` (and its broker) is gone: a one-line error naming the
        endpoint, at once (no Ray is joined for a command)."""
        state = tmp_path / "state"
        state.mkdir()
        (state / "run.json").write_text(json.dumps({"request": f"ipc://{state}/bus/request",
                                                    "command": f"ipc://{state}/bus/owner/command",
                                                    "pid": os.getpid()}))
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "flowbus", "call", "e1", "ping"], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "FLOWBUS_STATE_DIR": str(state)}, close_fds=True)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip() == (f"flowbus: error: nothing answers at ipc://{state}/bus/owner/command (No such "
                                       "file or directory): is `flowbus up` running?"), proc.stderr
        assert time.monotonic() - t0 < 10

    def test_unreachable_broker(self, tmp_path: Path) -> None:
        """--broker where no broker answers exits 1 naming it; a malformed one is refused before any connect."""
        proc = self._up(tmp_path, "--broker", "tcp://127.0.0.1:9")
        assert proc.returncode == 1 and "--broker tcp://127.0.0.1:9: no flowbus broker answers there" in proc.stderr, proc.stderr
        proc = self._up(tmp_path, "--broker", "127.0.0.1:9")
        assert proc.returncode == 1 and "expected the broker's request endpoint, tcp://HOST:PORT" in proc.stderr, proc.stderr


def _run_scenarios(script: str, tmp_path_factory: pytest.TempPathFactory, timeout: float) -> dict[str, Any]:
    """Run one scenario script in its own process group (bounded; the group is killed afterwards)
    and return the JSON it wrote."""
    pytest.importorskip("ecflow", reason="python3-ecflow is not installed")
    work = tmp_path_factory.mktemp(script)
    result = work / "result.json"
    # Ray's root is <ray_tmp>/ray: short (Ray's unix socket paths have a length limit), and private
    # (mkdtemp makes ray_tmp 0700, so the 0777 root Ray makes inside is no one else's to enter)
    ray_tmp = tempfile.mkdtemp(prefix="fbc-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    try:
        with open(work / "scenarios.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", f"support.{script}", str(result), str(work)], cwd=TESTS,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True, env=env)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if not result.exists():
        tail = (work / "scenarios.log").read_text(errors="replace")[-3000:]
        pytest.fail(f"{script} wrote no result (exit {proc.returncode}):\n{tail}")
    data: dict[str, Any] = json.loads(result.read_text())
    return data


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The 3-node cluster scenarios (support/cluster.py), run once."""
    yield _run_scenarios("cluster", tmp_path_factory, SCENARIO_TIMEOUT)


def _events(data: dict[str, Any], source: str) -> list[dict[str, Any]]:
    return [e for e in data["events"] if e["source"] == source]


@pytest.mark.ray
@pytest.mark.timeout(SCENARIO_TIMEOUT + 60)
class TestCluster:
    """One 3-node loopback cluster, real ecflow_servers and a broker, in a child process."""

    def test_scenarios_ran_and_left_nothing_behind(self, scenarios: dict[str, Any]) -> None:
        """Every scenario ran to the end; no Ray, broker or ecFlow process outlived it."""
        assert "error" not in scenarios, scenarios.get("traceback", scenarios.get("error"))
        assert scenarios["steps"] == ["bad_input", "node_death", "rebalance", "partition", "cli"]
        assert scenarios["leaked"] == [] and scenarios["ecflow_left"] == []

    def test_every_cluster_process_listens_on_loopback_only(self, scenarios: dict[str, Any]) -> None:
        """GCS, raylets, workers, broker and ecflow_servers listen on 127.0.0.0/8 only, before, during and after."""
        for key in ("off_loopback_start", "off_loopback_mid", "off_loopback_end"):
            assert scenarios.get(key) == [], (key, scenarios.get(key))

    def test_every_cluster_process_uses_token_auth(self, scenarios: dict[str, Any]) -> None:
        """The GCS and every raylet (the node added later too) run with RAY_AUTH_MODE=token and the state dir's token file."""
        token = scenarios["token"]
        assert token.endswith("/ray/auth_token"), token
        for key, n_raylets in (("auth_start", 3), ("auth_mid", 3)):  # head + 2 nodes; then one node dead, one added
            rows = scenarios[key]
            assert sorted(r[0] for r in rows) == ["gcs_server"] + ["raylet"] * n_raylets, (key, rows)
            assert all(r[1:] == ["token", token, None] for r in rows), (key, rows)

    def test_unreachable_address_is_a_clear_error_within_seconds(self, scenarios: dict[str, Any]) -> None:
        """Joining a cluster where nothing listens fails within connect-timeout, naming the address, without Ray started."""
        u = scenarios["unreachable"]
        assert u["error"] == "BusBroken" and "127.0.0.1:9" in u["message"] and "nothing answers" in u["message"]
        assert u["seconds"] < 10 and u["ray_initialized"] is False

    def test_bad_placement_is_refused_at_start(self, scenarios: dict[str, Any]) -> None:
        """Too much of a resource, too many actors, a missing resource and an unknown label: ConfigError naming the group, fast."""
        bad = scenarios["bad_input"]
        expect = {"too_much": "group 'big'", "too_many": "group 'many'", "no_resource": "'flowbus-gpu'",
                  "bad_label": "'site': 'mars'"}
        for case, needle in expect.items():
            r = bad[case]
            assert r["error"] == "ConfigError" and r["flowbus_error"], (case, r)
            assert needle in r["message"] and needle in (r["driver_check"] or ""), (case, r)
            assert r["seconds"] < 30, (case, r)  # generous: the machine is shared; a pending actor would hang

    def test_node_death_moves_the_session_and_loses_no_transition(self, scenarios: dict[str, Any]) -> None:
        """e1's node is killed: e1 moves to the surviving node, and t1, completed meanwhile, arrives as a resync."""
        s = scenarios
        before, after = s["placement_before"], s["placement_after"]
        assert before["e1"] == before["e3"] != before["e2"]  # round-robin over the group's 2 actors
        assert s["nodes_before"]["e1"] != s["nodes_before"]["e2"]  # one actor per node (flowbus-ecf = 1 each)
        assert after["e1"] == after["e2"] == after["e3"] == before["e2"]
        assert s["nodes_after"]["e1"] == s["nodes_after"]["e3"] == s["nodes_before"]["e2"] != s["victim"]
        moves = s["report_a"]["moves"]
        assert sorted((m["session"], m["from"], m["to"]) for m in moves) == [
            ("e1", before["e1"], before["e2"]), ("e3", before["e1"], before["e2"])]
        assert not [m for m in moves if "error" in m], moves
        for src in ("e1", "e3"):  # t1 completed while nobody watched: it arrives as a resync, nothing lost
            t1 = [e for e in _events(s, src) if e["type"] == "StateChanged" and e["key"] == "/s/t1"]
            final = [e for e in t1 if e["native"] == "complete"]
            assert final and final[0]["observed"] == "resync" and final[0]["incarnation"] > s[f"first_inc_{src}"], t1
        t2 = [e for e in _events(s, "e2") if e["type"] == "StateChanged" and e["key"] == "/s/t2"]
        assert any(e["native"] == "complete" for e in t2), t2
        for src in ("e1", "e2", "e3"):  # gapless per source, incarnations never go back
            evs = _events(s, src)
            assert [e["seq"] for e in evs] == list(range(evs[0]["seq"], evs[0]["seq"] + len(evs))), src
            incs = [e["incarnation"] for e in evs]
            assert incs == sorted(incs), src

    def test_restarted_actor_gets_back_the_sessions_moved_to_it(self, scenarios: dict[str, Any]) -> None:
        """Ray restarts a crashed actor with its constructor's sessions; the supervisor adds the ones moved to it since."""
        crash, survivor = scenarios["after_crash"], scenarios["placement_after"]["e2"]
        assert crash["restarts"] == {survivor: 1}
        assert crash["placement"] == scenarios["placement_after"]
        assert crash["hosted"] == ["e1", "e2", "e3"]

    def test_sessions_return_when_the_node_does(self, scenarios: dict[str, Any]) -> None:
        """A node with the resource joins again: e1 and e3 move back to their home actor, now on that
        node, recorded with reason ``rebalance``, each under a new incarnation; no seq gap, no duplicate."""
        s = scenarios
        before, back = s["placement_before"], s["placement_back"]
        assert back == before, back
        assert s["nodes_back"]["e1"] == s["nodes_back"]["e3"] == "n3" != s["nodes_back"]["e2"], s["nodes_back"]
        report = s["report_r"]
        assert [r["actor"] for r in report["returned"]] == [before["e1"]], report["returned"]
        rebalanced = [m for m in report["moves"] if m["reason"] == "rebalance"]
        assert sorted((m["session"], m["from"], m["to"]) for m in rebalanced) == [
            ("e1", before["e2"], before["e1"]), ("e3", before["e2"], before["e1"])], report["moves"]
        assert not [m for m in rebalanced if "error" in m or "hand_over_error" in m], rebalanced
        # rebalance-per-second = 1 (the default): the second move starts a second or more after the first
        assert rebalanced[1]["time"] - rebalanced[0]["time"] >= 1.0, rebalanced
        for src in ("e1", "e3"):
            t2 = [e for e in _events(s, src) if e["type"] == "StateChanged" and e["key"] == "/s/t2"
                  and e["native"] == "complete"]
            assert t2 and t2[0]["incarnation"] > s["incs_before_return"][src], t2
        for src in ("e1", "e2", "e3"):  # across the whole run: no seq twice, none missing
            seqs = [e["seq"] for e in _events(s, src)]
            assert len(seqs) == len(set(seqs)) and seqs == list(range(seqs[0], seqs[0] + len(seqs))), src

    def test_up_joins_the_cluster_and_uses_a_running_broker(self, scenarios: dict[str, Any]) -> None:
        """`flowbus up --config F --address <cluster> --broker <addr>` (the helm controller's line) runs its session there."""
        cli = scenarios["cli"]
        assert cli["code"] == 0, cli["stderr"]
        assert "joining 127.0.0.1:" in cli["stderr"] and "starting the broker" not in cli["stderr"], cli["stderr"]
        assert "sessions e1" in cli["stderr"], cli["stderr"]
        assert cli["inc_after"] > cli["inc_before"]

    def test_partitioned_actor_is_fenced(self, scenarios: dict[str, Any]) -> None:
        """A stopped (partitioned) actor's session moves; resumed, its old incarnation is rejected and lets go."""
        s = scenarios
        assert s["partition_nodes"]["e1"] == s["partition_nodes"]["e3"] != s["partition_nodes"]["e2"]
        assert s["new_inc"] > s["old_inc"]
        assert s["broker_fenced"] >= 1  # the resumed old incarnation tried to publish and was rejected
        old_actor = s["placement_p"]["e2"]
        retired = [r for r in s["report_p"]["retired"] if r["actor"] == old_actor]
        assert retired and retired[0]["reason"] == "released its sessions (fenced)", s["report_p"]
        assert s["report_p"]["placement"]["e2"] != old_actor
        e2 = _events(s, "e2")
        first_new = min(e["seq"] for e in e2 if e["incarnation"] == s["new_inc"])
        assert all(e["incarnation"] == s["new_inc"] for e in e2 if e["seq"] >= first_new), e2
        done = [e for e in e2 if e["type"] == "StateChanged" and e["key"] == "/s/t1" and e["native"] == "complete"]
        assert done and done[-1]["incarnation"] == s["new_inc"]
        assert s["sub_stats"].get("fenced", 0) == 0  # the broker stopped them: none reached a subscriber


CLIENT_TIMEOUT = 900  # typically ~80 s; a Ray Client connection the proxy loses costs ~40 s more


@pytest.fixture(scope="module")
def client_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Ray Client scenarios (support/clients.py), run once."""
    return _run_scenarios("clients", tmp_path_factory, CLIENT_TIMEOUT)


@pytest.mark.ray
@pytest.mark.timeout(CLIENT_TIMEOUT + 60)
class TestRayClient:
    """`flowbus up --address ray://...` (the helm controller's line) against a loopback cluster whose head
    runs a Ray Client server, with a running broker; stopped once by SIGINT and once by SIGTERM."""

    RUNS = ("sigint", "sigterm")

    def test_scenarios_ran_and_left_nothing_behind(self, client_run: dict[str, Any]) -> None:
        """Both runs went to the end; no Ray (Ray Client servers included), broker or ecFlow process outlived the cluster."""
        assert "error" not in client_run, client_run.get("traceback", client_run.get("error"))
        assert client_run["steps"] == list(self.RUNS)
        assert client_run["leaked"] == [] and client_run["ecflow_left"] == []

    def test_cluster_uses_token_auth(self, client_run: dict[str, Any]) -> None:
        """The GCS and both raylets run with RAY_AUTH_MODE=token and the state dir's token; `flowbus up` joined with it through Ray Client."""
        token = client_run["token"]
        rows = client_run["auth_start"]
        assert sorted(r[0] for r in rows) == ["gcs_server", "raylet", "raylet"], rows
        assert all(r[1:] == ["token", token, None] for r in rows), rows

    def test_client_server_and_cluster_listen_on_loopback_only(self, client_run: dict[str, Any]) -> None:
        """The Ray Client server binds 127.0.0.1 at its port; nothing of the cluster listens beyond loopback."""
        cs = client_run["client_server"]
        assert cs["listens"] and all(a.removeprefix("::ffff:") == f"127.0.0.1:{cs['port']}" for a in cs["listens"]), cs
        for key in ("off_loopback_start", "off_loopback_end"):
            assert client_run.get(key) == [], (key, client_run.get(key))
        for run in self.RUNS:
            assert client_run[run].get("off_loopback_mid") == [], client_run[run].get("off_loopback_mid")

    def test_session_opens_on_the_cluster_in_the_configured_namespace(self, client_run: dict[str, Any]) -> None:
        """The Supervisor runs on the head, the BackendActor on the node with the resource, both in [ray] namespace."""
        port = client_run["client_server"]["port"]
        for run in self.RUNS:
            r = client_run[run]
            assert r["run"]["ray_address"] == f"ray://127.0.0.1:{port}" and r["run"]["namespace"] == "fbclient", r["run"]
            assert r["run"]["placement"] == {"e1": "flowbus-backend-ecf-0"} and r["run"]["broker_pid"] is None
            actors = {a["name"]: a for a in r["actors_running"]}
            assert set(actors) == {"flowbus-supervisor", "flowbus-backend-ecf-0"}, actors
            assert actors["flowbus-supervisor"]["node"] == r["head"]
            assert actors["flowbus-backend-ecf-0"]["node"] == client_run["worker_node"]
            assert not any(a["detached"] for a in actors.values())
            assert r["namespaces"] == {name: {"config": True, "observer": False} for name in actors}, r["namespaces"]
            assert "joining ray://127.0.0.1:" in r["stderr"] and "starting the broker" not in r["stderr"], r["stderr"]
            assert r["inc"] > r["inc_before"]

    def test_events_reach_the_bus_and_flowbus_call_works_through_ray_client(self, client_run: dict[str, Any]) -> None:
        """`flowbus call` (through the bus to the Supervisor on the Ray Client cluster) runs session operations; their effects arrive on the bus."""
        for run in self.RUNS:
            r = client_run[run]
            calls = r["calls"]
            # a string result is printed as it is: the server's version, e.g. 5.9.2
            assert calls["version"]["code"] == 0 and calls["version"]["stdout"].strip()[:1].isdigit(), calls["version"]
            for op in ("load", "begin", "resume"):
                if op in calls:
                    assert calls[op]["code"] == 0, (op, calls[op])
            assert calls["unknown"]["code"] == 1
            assert "no session named 'nope'; running sessions: e1" in calls["unknown"]["stderr"], calls["unknown"]
            done = [e for e in _events(client_run, "e1") if e["type"] == "StateChanged" and e["key"] == r["task"]
                    and e["native"] == "complete" and e["incarnation"] == r["inc"]]
            assert done, (run, r["task"], r["inc"])
        assert "load" in client_run["sigint"]["calls"] and client_run["sigterm"]["task"] == "/s/t2"

    def test_sigint_and_sigterm_stop_the_actors_and_leave_the_cluster_running(self, client_run: dict[str, Any]) -> None:
        """Ctrl-C and SIGTERM: exit 0, session closed, every flowbus actor dead, nothing of up left; the cluster still works."""
        for run in self.RUNS:
            r = client_run[run]
            assert "hung" not in r and r["code"] == 0, r["stderr"]
            assert "flowbus up: stopped" in r["stderr"] and "Traceback" not in r["stderr"], r["stderr"]
            assert not r["group_left"] and not r["runfile_left"]
            assert r["alive_after"] == [], r["alive_after"]
            assert {"flowbus-supervisor", "flowbus-backend-ecf-0"} <= set(r["dead_after"])
            assert any(e["type"] == "Disconnected" and e["incarnation"] == r["inc"] for e in _events(client_run, "e1"))
            assert r["nodes_alive_after"] == 2
        assert client_run["cluster_works_after"] == 42
