"""Multi-node scenarios for tests/actors/test_cluster.py, run in a process of their own.

The pytest process may already be a Ray driver (the session-scoped ``ray_local`` fixture), and a
process joins one cluster only; so test_cluster.py runs this script as a child (bounded, its
process group killed at the end) and asserts on the JSON it writes. Usage:
``python -m support.cluster RESULT.json WORKDIR`` (from ``tests/``).

One ``ray.cluster_utils.Cluster`` on 127.0.0.1 (head + 2 worker nodes with the custom resource
``flowbus-ecf`` and node labels, a third node added later), one broker, two real
``ecflow_server`` processes. Everything started here is stopped here, by handle or PID.

The cluster runs with Ray's token authentication, as flowbus's own Ray does: ``use_ray_auth``
puts the token of the state dir (``FLOWBUS_STATE_DIR``) into this process's environment before
the cluster starts, so its GCS, raylets and workers, this driver and the ``flowbus up`` child
all carry ``RAY_AUTH_MODE=token`` and the same ``RAY_AUTH_TOKEN_PATH``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from flowbus.actors import _ray  # loopback and token-auth fences before ray

# isort: split
import msgspec
import psutil
import ray
from ray.cluster_utils import Cluster

from flowbus.actors import ACTOR_PREFIX, Supervisor, start_ray
from flowbus.actors._placement import check_fit, make_plan
from flowbus.actors._supervisor import supervisor_options
from flowbus.bus import BrokerProcess, Subscriber, ensure_grant_key
from flowbus.bus._request import Requester
from flowbus.schemas import (
    BusConfig,
    Connected,
    EcflowSessionConfig,
    Event,
    FlowbusConfig,
    FlowbusError,
    PlacementConfig,
    RayConfig,
    StateChanged,
)
from support import ecflow as fx
from support.netcheck import off_loopback_listeners

MB = 2**20
RES = "flowbus-ecf"
SUITE = """\
task t1
  defstatus suspended
task t2
  defstatus suspended
"""
SCRIPTS = {"t1": "true\n", "t2": "true\n"}


def ev_row(e: Event) -> dict[str, Any]:
    row: dict[str, Any] = {"type": type(e).__name__, "source": e.source, "key": e.key, "seq": e.seq,
                           "incarnation": e.incarnation, "observed": str(e.observed.value)}
    if isinstance(e, StateChanged):
        row["state"] = str(e.state.value)
        row["native"] = e.native
    return row


class Events:
    """Everything a journal-start subscriber delivers, pumped from this (the only) thread."""

    def __init__(self, address: str) -> None:
        self.sub = Subscriber(address, "ecflow/", start="journal")
        self.all: list[Event] = []

    def pump(self, until: Callable[[list[Event]], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.all.extend(self.sub.recv_many(0.2))
            if until(self.all):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:g} s for: {what}")

    def has_state(self, source: str, key: str, native: str, min_inc: int = 0) -> Callable[[list[Event]], bool]:
        return lambda evs: any(isinstance(e, StateChanged) and e.source == source and e.key == key
                               and e.native == native and e.incarnation >= min_inc for e in evs)

    def incarnation(self, source: str) -> int:
        return max((e.incarnation for e in self.all if e.source == source), default=0)


def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for: {what}")
        time.sleep(every)


def node_of(pid: int, nodes: dict[str, Any]) -> str:
    """Which cluster node runs the worker ``pid`` (workers are children of their raylet)."""
    parents = {p.pid for p in psutil.Process(pid).parents()}
    for name, node in nodes.items():
        if any(info.process.pid in parents for info in node.all_processes.get("raylet", [])):
            return name
    return "?"


def ray_auth_of_children() -> list[list[str | None]]:
    """``[name, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, RAY_AUTH_TOKEN set?]`` of every GCS and raylet
    this process started, read from their environment (/proc)."""
    rows: list[list[str | None]] = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name() in ("gcs_server", "raylet") and p.status() != psutil.STATUS_ZOMBIE:
                env = p.environ()
                rows.append([p.name(), env.get("RAY_AUTH_MODE"), env.get("RAY_AUTH_TOKEN_PATH"),
                             "yes" if env.get("RAY_AUTH_TOKEN") else None])
        except psutil.Error:
            pass
    return sorted(rows, key=str)


def actor_ping(name: str) -> dict[str, Any]:
    return cast("dict[str, Any]", ray.get(ray.get_actor(ACTOR_PREFIX + name).ping.remote(), timeout=20))


def actor_pid(name: str) -> int:
    return int(actor_ping(name)["pid"])


def config(servers: list[fx.EcfServer], group: str, **ray_kw: Any) -> FlowbusConfig:
    return FlowbusConfig(
        ray=RayConfig(namespace="fbtest", move_after=8.0, start_timeout=90.0,
                      placement=[PlacementConfig(name=group, backends=["ecflow"], actors=2, resources={RES: 1.0})],
                      **ray_kw),
        # e1 and e3 watch the same server, and land on the same actor (round-robin over 2)
        sessions=[EcflowSessionConfig(name=name, host="127.0.0.1", port=s.port, poll_interval=0.1)
                  for name, s in (("e1", servers[0]), ("e2", servers[1]), ("e3", servers[0]))])


def load_suites(sup: Any, servers: list[fx.EcfServer]) -> None:
    for i, server in enumerate(servers):
        text = fx.write_suite(server, "s", SUITE, SCRIPTS)
        ray.get(sup.call.remote(f"e{i + 1}", "load", [text], {}), timeout=60)
        ray.get(sup.call.remote(f"e{i + 1}", "begin_suite", ["s"], {}), timeout=60)


def stop_supervisor(sup: Any) -> None:
    try:
        ray.get(sup.stop.remote(), timeout=90)
    finally:
        ray.kill(sup, no_restart=True)


def scenario_node_death(out: dict[str, Any], cluster: Cluster, nodes: dict[str, Any], broker: str,
                        servers: list[fx.EcfServer], events: Events) -> None:
    """Kill the node of e1's actor: e1 moves to the surviving node, and a task that completed
    meanwhile shows up as a resync."""
    sup = Supervisor.options(**supervisor_options(None)).remote(msgspec.json.encode(config(servers, "ecf")), broker)
    try:
        out["placement_before"] = ray.get(sup.start.remote(), timeout=180)
        load_suites(sup, servers)
        events.pump(lambda evs: all(any(isinstance(e, StateChanged) and e.source == s and e.key == "/s/t1" for e in evs)
                                    for s in ("e1", "e2", "e3")), 60, "every session saw the suite")
        where = {s: node_of(actor_pid(a), nodes) for s, a in out["placement_before"].items()}
        out["supervisor_node"] = node_of(int(ray.get(sup.__ray_call__.remote(lambda self: os.getpid()), timeout=20)),
                                       {**nodes, "head": cluster.head_node})
        out["nodes_before"] = where
        first_inc = events.incarnation("e1")
        out["first_inc_e3"] = events.incarnation("e3")
        victim = where["e1"]
        t0 = time.monotonic()
        old_pid = actor_pid(out["placement_before"]["e1"])
        cluster.remove_node(nodes.pop(victim), allow_graceful=False)
        out["victim"] = victim
        # workers outlive their raylet briefly: the change below must happen when nobody watches
        wait_for(lambda: not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE,
                 60, "the old actor process is gone")
        # while nobody watches e1's server, t1 runs to completion
        fx.quick_client(servers[0].port).resume("/s/t1")
        wait_for(lambda: fx.quick_client(servers[0].port).query("state", "/s/t1") == "complete", 60, "t1 completes")
        out["t1_done_after"] = round(time.monotonic() - t0, 1)
        moved = wait_for(lambda: ray.get(sup.sessions.remote(), timeout=20).get("e1") != out["placement_before"]["e1"],
                         120, "e1 moved")
        assert moved
        out["moved_after"] = round(time.monotonic() - t0, 1)
        events.pump(events.has_state("e1", "/s/t1", "complete", first_inc + 1), 90, "e1 t1 complete from a new incarnation")
        events.pump(events.has_state("e3", "/s/t1", "complete", out["first_inc_e3"] + 1), 90,
                    "e3 t1 complete from a new incarnation")
        out["placement_after"] = ray.get(sup.sessions.remote(), timeout=20)
        out["nodes_after"] = {s: node_of(actor_pid(a), nodes) for s, a in out["placement_after"].items()}
        out["report_a"] = ray.get(sup.placement_report.remote(), timeout=20)
        out["first_inc_e1"] = first_inc
        # the other session still works where it was: t2 of e2 runs and completes
        ray.get(sup.call.remote("e2", "resume", ["/s/t2"], {}), timeout=60)
        events.pump(events.has_state("e2", "/s/t2", "complete"), 90, "e2 t2 complete")
        out["status_a"] = {k: {kk: v[kk] for kk in ("state", "sessions") if kk in v}
                           for k, v in ray.get(sup.status.remote(), timeout=30).items()}
        # the surviving actor crashes: Ray restarts it with its constructor's sessions (e2), and
        # the supervisor adds back the two that moved to it (e1, e3)
        incs = {src: events.incarnation(src) for src in ("e1", "e2", "e3")}
        survivor = out["placement_after"]["e2"]
        os.kill(actor_pid(survivor), signal.SIGKILL)
        events.pump(lambda evs: all(any(isinstance(e, Connected) and e.source == src and e.incarnation > inc for e in evs)
                                    for src, inc in incs.items()), 120, "all three reopened after the crash")
        out["after_crash"] = {"placement": ray.get(sup.sessions.remote(), timeout=20),
                              "restarts": ray.get(sup.placement_report.remote(), timeout=20)["restarts"],
                              "hosted": actor_ping(survivor)["sessions"]}
        out["steps"].append("node_death")
        scenario_rebalance(out, cluster, nodes, sup, servers, events)
        out["steps"].append("rebalance")
    finally:
        stop_supervisor(sup)


def scenario_rebalance(out: dict[str, Any], cluster: Cluster, nodes: dict[str, Any], sup: Any,
                       servers: list[fx.EcfServer], events: Events) -> None:
    """A node with the resource joins again (n3, in the killed node's place): the supervisor
    gets e1's old actor back (Ray restarts it there, or it is created again) and e1 and e3 move
    back to it, each under a new incarnation, with reason ``rebalance``; a change made after the
    return comes from the new incarnation."""
    home = out["placement_before"]["e1"]
    incs = {src: events.incarnation(src) for src in ("e1", "e2", "e3")}
    t0 = time.monotonic()
    nodes["n3"] = cluster.add_node(num_cpus=1, resources={RES: 1.0}, labels={"site": "three"},
                                   object_store_memory=80 * MB)
    cluster.wait_for_nodes()
    wait_for(lambda: all(a == home for s, a in ray.get(sup.sessions.remote(), timeout=20).items() if s != "e2"),
             240, "e1 and e3 back on their home actor")
    out["returned_after"] = round(time.monotonic() - t0, 1)
    events.pump(lambda evs: all(any(isinstance(e, Connected) and e.source == src and e.incarnation > incs[src]
                                    for e in evs) for src in ("e1", "e3")), 60, "e1 and e3 reopened at home")
    fx.quick_client(servers[0].port).resume("/s/t2")
    for src in ("e1", "e3"):
        events.pump(events.has_state(src, "/s/t2", "complete", incs[src] + 1), 90, f"{src} t2 complete after the return")
    out["incs_before_return"] = incs
    out["placement_back"] = ray.get(sup.sessions.remote(), timeout=20)
    out["nodes_back"] = {s: node_of(actor_pid(a), nodes) for s, a in out["placement_back"].items()}
    out["report_r"] = ray.get(sup.placement_report.remote(), timeout=20)


def scenario_partition(out: dict[str, Any], nodes: dict[str, Any], broker: str, servers: list[fx.EcfServer],
                       events: Events) -> None:
    """SIGSTOP the actor of e2 (a partition as its peers see it): e2 moves; after SIGCONT the old
    incarnation is fenced by the broker and lets go of the session."""
    # rebalancing off: after the heal the retired actor would be created again and e2 moved back
    # under a third incarnation (scenario_rebalance covers that); here the fence alone is looked at
    sup = Supervisor.options(**supervisor_options(None)).remote(
        msgspec.json.encode(config(servers, "pt", rebalance_per_second=0.0)), broker)
    stopped: int | None = None
    try:
        out["placement_p"] = ray.get(sup.start.remote(), timeout=180)
        events.pump(lambda evs: sum(1 for e in evs if isinstance(e, Connected) and e.source == "e2") >= 2, 60,
                    "e2 connected again under the new supervisor")
        old_actor = out["placement_p"]["e2"]
        stopped = actor_pid(old_actor)
        out["partition_nodes"] = {s: node_of(actor_pid(a), nodes) for s, a in out["placement_p"].items()}
        old_inc = events.incarnation("e2")
        out["old_inc"] = old_inc
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        wait_for(lambda: ray.get(sup.sessions.remote(), timeout=20).get("e2") != old_actor, 120, "e2 moved away")
        out["moved_after_p"] = round(time.monotonic() - t0, 1)
        events.pump(lambda evs: any(isinstance(e, Connected) and e.source == "e2" and e.incarnation > old_inc for e in evs),
                    60, "e2 connected under a new incarnation")
        new_inc = events.incarnation("e2")
        out["new_inc"] = new_inc
        fenced_before = Requester_stats(broker).get("fenced", 0)
        os.kill(stopped, signal.SIGCONT)
        stopped = None
        # a change both incarnations see: the old one publishes it, and learns it is fenced
        fx.quick_client(servers[1].port).resume("/s/t1")
        events.pump(events.has_state("e2", "/s/t1", "complete", new_inc), 90, "e2 t1 complete (new incarnation)")
        report = wait_for(lambda: (lambda r: r if any(x["actor"] == old_actor for x in r["retired"]) else None)(  # noqa: PLC3002 - binds the fetched report once
            ray.get(sup.placement_report.remote(), timeout=20)), 90, "old actor retired")
        out["report_p"] = report
        out["broker_fenced"] = Requester_stats(broker).get("fenced", 0) - fenced_before
        events.sub.sync()
        events.all.extend(events.sub.recv_many(1.0))
        out["sub_stats"] = {k: v for k, v in events.sub.statistics().items() if isinstance(v, int)}
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        stop_supervisor(sup)


def Requester_stats(address: str) -> dict[str, Any]:  # noqa: N802 - reads like the request it makes
    import zmq

    req = Requester(zmq.Context.instance(), address, None, 5.0)
    try:
        return dict(req.call("stats")["stats"])
    finally:
        req.close()


def scenario_bad_input(out: dict[str, Any], broker: str, servers: list[fx.EcfServer]) -> None:
    """Configs the cluster cannot satisfy fail at start, fast, naming the group and what is missing."""
    cases = {
        "too_much": PlacementConfig(name="big", backends=["ecflow"], actors=1, resources={RES: 5.0}),
        "too_many": PlacementConfig(name="many", backends=["ecflow"], actors=3, resources={RES: 1.0}),
        "no_resource": PlacementConfig(name="gpu", backends=["ecflow"], resources={"flowbus-gpu": 1.0}),
        "bad_label": PlacementConfig(name="mars", backends=["ecflow"], node_labels={"site": "mars"}),
    }
    results: dict[str, Any] = {}
    for case, grp in cases.items():
        cfg = FlowbusConfig(ray=RayConfig(namespace="fbtest", placement=[grp]), sessions=[
            EcflowSessionConfig(name=f"b{i}", host="127.0.0.1", port=servers[0].port) for i in range(3)])
        sup = Supervisor.options(**supervisor_options(None)).remote(msgspec.json.encode(cfg), broker)
        t0 = time.monotonic()
        try:
            ray.get(sup.start.remote(), timeout=60)
            results[case] = {"error": None}
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            results[case] = {"error": type(cause).__name__, "message": str(cause),
                             "flowbus_error": isinstance(cause, FlowbusError)}
        results[case]["seconds"] = round(time.monotonic() - t0, 2)
        stop_supervisor(sup)
        try:
            check_fit(make_plan(cfg), ray.nodes())
            results[case]["driver_check"] = None
        except FlowbusError as exc:
            results[case]["driver_check"] = str(exc)
    out["bad_input"] = results


def scenario_cli(out: dict[str, Any], cluster: Cluster, broker: str, servers: list[fx.EcfServer], work: Path,
                 events: Events) -> None:
    """The helm controller's command line: ``flowbus up --config F --address <cluster> --broker <addr>``
    joins the cluster, uses the running broker (does not start one), places its session by resource."""
    import subprocess

    cfg = work / "cli.toml"
    cfg.write_text(f"""state-dir = "{work / 'cli-state'}"
[ray]
namespace = "fbcli"
move-after = 8.0
[[ray.placement]]
name = "cli"
backends = ["ecflow"]
resources = {{ "{RES}" = 1.0 }}
[[sessions]]
backend = "ecflow"
name = "e1"
host = "127.0.0.1"
port = {servers[0].port}
""")
    # (ray://, through a Ray Client server on the head: client_scenarios.py)
    for key, address in (("cli", cluster.address),):
        before = events.incarnation("e1")
        proc = subprocess.run([sys.executable, "-m", "flowbus", "up", "--config", str(cfg), "--address", address,
                               "--broker", broker, "--duration", "4"], capture_output=True, text=True, timeout=180,
                              close_fds=True, start_new_session=True)
        out[key] = {"code": proc.returncode, "stderr": proc.stderr[-3000:], "address": address}
        events.pump(lambda evs: events.incarnation("e1") > before, 30,  # noqa: B023 - pump calls it now
                    f"e1 opened by `flowbus up --address {address}`")
        out[key]["inc_before"], out[key]["inc_after"] = before, events.incarnation("e1")


def main() -> int:
    result_path, work = Path(sys.argv[1]), Path(sys.argv[2])
    out: dict[str, Any] = {"steps": []}
    t_start = time.monotonic()
    # an unreachable address: a clear error within connect-timeout, before any Ray is started
    t0 = time.monotonic()
    try:
        start_ray(RayConfig(address="127.0.0.1:9", connect_timeout=2.0))
        out["unreachable"] = {"error": None}
    except FlowbusError as exc:
        out["unreachable"] = {"error": type(exc).__name__, "message": str(exc)}
    out["unreachable"]["seconds"] = round(time.monotonic() - t0, 2)
    out["unreachable"]["ray_initialized"] = ray.is_initialized()

    cluster: Cluster | None = None
    broker: BrokerProcess | None = None
    servers: list[fx.EcfServer] = []
    events: Events | None = None
    try:
        out["token"] = _ray.use_ray_auth()  # before the cluster: every process it starts inherits the token
        fast = dict(_ray.FAST_HEALTH)
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=1, include_dashboard=False, object_store_memory=80 * MB, _system_config=fast))
        nodes: dict[str, Any] = {
            "n1": cluster.add_node(num_cpus=1, resources={RES: 1.0}, labels={"site": "one"}, object_store_memory=80 * MB),
            "n2": cluster.add_node(num_cpus=1, resources={RES: 1.0}, labels={"site": "two"}, object_store_memory=80 * MB),
        }
        cluster.wait_for_nodes()
        # join it as an existing cluster, through the same path as `[ray] address` / `flowbus up --address`
        out["joined"] = start_ray(RayConfig(address=cluster.address, namespace="fbtest", connect_timeout=5.0))
        out["cluster_up"] = round(time.monotonic() - t_start, 1)
        out["off_loopback_start"] = off_loopback_listeners()
        out["auth_start"] = ray_auth_of_children()
        broker = BrokerProcess(BusConfig(transport="tcp", insecure_loopback=True, request_port=0, publish_port=0, ingest_port=0,
                                     command_port=0, heartbeat_interval=0.1,
                                         grant_key_file=str(ensure_grant_key(work / "keys" / "grant.key"))),
                               str(work / "journal"), log_path=str(work / "broker.log"))
        address = broker.start()["request"]
        shim = fx._shim(work)
        for i in range(2):
            servers.append(fx.EcfServer(work / f"ecf{i}", shim).start())
        events = Events(address)

        scenario_bad_input(out, address, servers)
        out["steps"].append("bad_input")
        scenario_node_death(out, cluster, nodes, address, servers, events)  # then rebalance: adds n3
        out["off_loopback_mid"] = off_loopback_listeners()
        out["auth_mid"] = ray_auth_of_children()  # the node added later too
        scenario_partition(out, nodes, address, servers, events)
        out["steps"].append("partition")
        scenario_cli(out, cluster, address, servers, work, events)
        out["steps"].append("cli")
        out["off_loopback_end"] = off_loopback_listeners()
    except BaseException as exc:  # noqa: BLE001 - reported to the test, which fails with it
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()[-4000:]
    finally:
        if events is not None:
            out["events"] = [ev_row(e) for e in events.all]
            events.sub.close()
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            if cluster is not None:
                cluster.shutdown()
            out["ecflow_left"] = [left for s in servers for left in s.stop()]
            if broker is not None:
                broker.stop()
        left = [p for p in psutil.Process().children(recursive=True) if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
        out["leaked"] = [" ".join(p.cmdline())[:100] for p in left]
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        out["seconds"] = round(time.monotonic() - t_start, 1)
        result_path.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
