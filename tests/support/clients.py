"""``flowbus up --address ray://...`` (the helm controller's line) against a loopback cluster whose
head runs a Ray Client server, for tests/actors/test_cluster.py (run as a child process, like
``support/cluster.py``). Usage: ``python -m support.clients RESULT.json WORKDIR`` (from ``tests/``).

One ``ray.cluster_utils.Cluster`` on 127.0.0.1 (a head with ``ray_client_server_port`` and a
worker node offering ``flowbus-ecf``), one broker, one real ``ecflow_server``. ``flowbus up
--config F --address ray://127.0.0.1:PORT --broker tcp://...`` runs twice, stopped once by
SIGINT (Ctrl-C) and once by SIGTERM; while it runs, ``flowbus call`` drives its session through
the same Ray Client address. This process joins the cluster through its GCS address, only to
observe (the actors' namespaces, nodes and states). Everything started here is stopped here.

The cluster runs with Ray's token authentication: ``use_ray_auth`` puts the state dir's token
into this process's environment before the cluster starts; the Ray Client server checks it, and
the ``flowbus up`` / ``flowbus call`` children (other state dirs) join with the token they
inherit (``RAY_AUTH_TOKEN_PATH``), as the helm controller joins with KubeRay's ``RAY_AUTH_TOKEN``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from flowbus.actors import _ray  # loopback and token-auth fences before ray

# isort: split
import psutil
import ray
from ray.cluster_utils import Cluster

from flowbus.actors import start_ray
from flowbus.bus import BrokerProcess, ensure_grant_key
from flowbus.schemas import BusConfig, Connected, Disconnected, RayConfig, StateChanged
from support import ecflow as fx
from support.cluster import MB, RES, SCRIPTS, SUITE, Events, ev_row, ray_auth_of_children, wait_for
from support.netcheck import off_loopback_listeners

NAMESPACE = "fbclient"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def flowbus_actors() -> list[dict[str, Any]]:
    """Every flowbus actor the GCS knows of (alive or dead), as this observer driver sees it."""
    rows = []
    for a in ray._private.state.actors().values():  # ray.util.state needs the dashboard, which is off
        if (a.get("Name") or "").startswith("flowbus-"):
            rows.append({"name": a["Name"], "class": a["ActorClassName"], "state": a["State"],
                         "node": a["Address"]["NodeID"], "detached": a["IsDetached"], "pid": a.get("Pid")})
    return rows


def in_namespace(name: str, namespace: str | None) -> bool:
    """Whether ``ray.get_actor`` finds the live actor ``name`` in ``namespace`` (None: the observer's own)."""
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True


def not_dead(timeout: float) -> list[dict[str, Any]]:
    """The flowbus actors still not DEAD after ``timeout`` s (``ray.kill`` reaches the GCS a moment later)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [a for a in flowbus_actors() if a["state"] != "DEAD"]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def listeners_of(pid: int) -> list[str]:
    return sorted(f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process(pid).net_connections("inet")
                  if c.status == psutil.CONN_LISTEN)


def flowbus(args: list[str], env: dict[str, str], timeout: float = 300) -> dict[str, Any]:
    """One CLI command (a Ray Client driver of its own for ``call``); exit code and output."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flowbus", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, close_fds=True, start_new_session=True)
    return {"code": proc.returncode, "stdout": proc.stdout[-2000:], "stderr": proc.stderr[-2000:],
            "seconds": round(time.monotonic() - t0, 1)}


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def run_up(out: dict[str, Any], how: int, address: str, broker: str, cfg: Path, work: Path, events: Events,
           first: bool, server: fx.EcfServer, head_id: str) -> None:
    """Start `flowbus up` against ``ray://``, check its actors, drive its session with `flowbus
    call`, stop it with the signal ``how``, and check that it left nothing behind but the cluster."""
    state = work / f"state-{signal.Signals(how).name}"
    env = {**os.environ, "FLOWBUS_STATE_DIR": str(state)}
    err_path = work / f"up-{signal.Signals(how).name}.err"
    before = events.incarnation("e1")
    with open(work / f"up-{signal.Signals(how).name}.out", "wb") as so, open(err_path, "wb") as se:
        up = subprocess.Popen([sys.executable, "-m", "flowbus", "up", "--config", str(cfg), "--address", address,
                               "--broker", broker], stdout=so, stderr=se, env=env, close_fds=True,
                              start_new_session=True)
    try:
        wait_for(lambda: up.poll() is not None or b"flowbus up: ready in" in err_path.read_bytes(), 300,
                 "`flowbus up` ready")
        if up.poll() is not None:
            raise RuntimeError(f"flowbus up exited {up.returncode}: {err_path.read_text()[-3000:]}")
        out["run"] = json.loads((state / "run.json").read_text())
        events.pump(lambda evs: events.incarnation("e1") > before, 60, "e1 connected under the new `flowbus up`")
        inc = events.incarnation("e1")
        out["inc_before"], out["inc"] = before, inc
        running = [a for a in flowbus_actors() if a["state"] == "ALIVE"]
        out["actors_running"] = running
        # created in the config's namespace (the Ray Client driver's), not an anonymous one
        out["namespaces"] = {a["name"]: {"config": in_namespace(a["name"], NAMESPACE),
                                         "observer": in_namespace(a["name"], None)} for a in running}
        out["head"] = head_id
        out["off_loopback_mid"] = off_loopback_listeners()
        calls: dict[str, Any] = {"version": flowbus(["call", "e1", "server_version"], env)}
        task = "/s/t1" if first else "/s/t2"
        if first:
            defs = fx.write_suite(server, "s", SUITE, SCRIPTS)
            calls["load"] = flowbus(["call", "e1", "load", json.dumps([defs])], env)
            calls["begin"] = flowbus(["call", "e1", "begin_suite", '["s"]'], env)
        calls["resume"] = flowbus(["call", "e1", "resume", json.dumps([task])], env)
        calls["unknown"] = flowbus(["call", "nope", "server_version"], env)
        out["calls"] = calls
        events.pump(events.has_state("e1", task, "complete", inc), 90, f"e1 {task} complete")
        out["task"] = task
    finally:
        t0 = time.monotonic()
        up.send_signal(how)
        try:
            up.wait(150)
        except subprocess.TimeoutExpired:
            out["hung"] = err_path.read_text(errors="replace")[-3000:]
        out["code"] = up.poll()
        out["stop_seconds"] = round(time.monotonic() - t0, 1)
        out["stderr"] = err_path.read_text(errors="replace")[-3000:]
        # Ray Client connections the proxy lost at birth and flowbus retried (ray-project/ray#63202)
        out["client_retries"] = err_path.read_text(errors="replace").count("ray.client.init_failed")
        out["group_left"] = group_alive(up.pid)
        if out["group_left"]:
            os.killpg(up.pid, signal.SIGKILL)
    out["runfile_left"] = (state / "run.json").exists()
    # clean stop: the session said goodbye, and every flowbus actor is dead (ray.kill is async in the GCS)
    events.pump(lambda evs: any(isinstance(e, Disconnected) and e.source == "e1" and e.incarnation == out["inc"]
                                for e in evs), 30, "e1 disconnected")
    out["alive_after"] = not_dead(30)
    out["dead_after"] = [a["name"] for a in flowbus_actors() if a["state"] == "DEAD"]
    out["nodes_alive_after"] = sum(1 for n in ray.nodes() if n["Alive"])


def main() -> int:
    result_path, work = Path(sys.argv[1]), Path(sys.argv[2])
    # started from a shell without job control, SIGINT may come in ignored, and `flowbus up` would
    # inherit that: with a handler here, children start with the default (Python's Ctrl-C)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out: dict[str, Any] = {"steps": []}
    t_start = time.monotonic()
    cluster: Cluster | None = None
    broker: BrokerProcess | None = None
    server: fx.EcfServer | None = None
    events: Events | None = None
    seen: dict[int, psutil.Process] = {}  # with their start times: a pid may be reused
    try:
        out["token"] = _ray.use_ray_auth()  # before the cluster: every process it starts inherits the token
        port = free_port()
        # Ray Client's proxy forks one server per driver while its gRPC threads run, and now and then
        # the child dies at birth (ray-project/ray#63202: ~7%, in bursts under load, so flowbus's
        # retries alone would leave this test flaky). gRPC's fork handlers are what races, and gRPC
        # says to turn them off when fork is followed by exec: off for this cluster's processes,
        # as a head's environment can set it. `flowbus up` and `flowbus call` keep the defaults.
        os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=1, node_ip_address=LOOPBACK, include_dashboard=False, object_store_memory=80 * MB,
            ray_client_server_port=port, _system_config=dict(_ray.FAST_HEALTH)))
        worker = cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK, resources={RES: 1.0},
                                  object_store_memory=80 * MB)
        cluster.wait_for_nodes()
        os.environ.pop("GRPC_ENABLE_FORK_SUPPORT")
        head: Any = cluster.head_node  # ray annotates it None until the head starts
        proxy = head.all_processes[ray._private.ray_constants.PROCESS_TYPE_RAY_CLIENT_SERVER][0].process
        out["client_server"] = {"port": port, "listens": wait_for(lambda: listeners_of(proxy.pid), 60,
                                                                  "the Ray Client server listening")}
        out["worker_node"] = worker.node_id
        # an observer joined through the GCS address: a process is one driver of one cluster only
        start_ray(RayConfig(address=cluster.address, namespace="fbclient-observer", connect_timeout=5.0))
        out["off_loopback_start"] = off_loopback_listeners()
        out["auth_start"] = ray_auth_of_children()
        broker = BrokerProcess(BusConfig(transport="tcp", insecure_loopback=True, request_port=0, publish_port=0, ingest_port=0,
                                     command_port=0, heartbeat_interval=0.1,
                                         grant_key_file=str(ensure_grant_key(work / "keys" / "grant.key"))),
                               str(work / "journal"), log_path=str(work / "broker.log"))
        broker_address = broker.start()["request"]
        server = fx.EcfServer(work / "ecf0", fx._shim(work)).start()
        events = Events(broker_address)
        cfg = work / "client.toml"
        cfg.write_text(f"""[ray]
namespace = "{NAMESPACE}"
connect-timeout = 10.0
[[ray.placement]]
name = "ecf"
backends = ["ecflow"]
resources = {{ "{RES}" = 1.0 }}
[[sessions]]
backend = "ecflow"
name = "e1"
host = "127.0.0.1"
port = {server.port}
poll-interval = 0.1
""")
        address = f"ray://{LOOPBACK}:{port}"
        for key, how in (("sigint", signal.SIGINT), ("sigterm", signal.SIGTERM)):
            out[key] = {}
            run_up(out[key], how, address, broker_address, cfg, work, events, key == "sigint", server,
                   head.node_id)
            out["steps"].append(key)
            seen.update({p.pid: p for p in psutil.Process().children(recursive=True)})
        out["off_loopback_end"] = off_loopback_listeners()
        # the cluster was not ours to stop: it still runs work after both `flowbus up`s left
        out["cluster_works_after"] = ray.get(ray.remote(num_cpus=0)(lambda: 42).remote(), timeout=60)
    except BaseException as exc:  # noqa: BLE001 - reported to the test, which fails with it
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()[-4000:]
    finally:
        if events is not None:
            out["events"] = [ev_row(e) for e in events.all if isinstance(e, (Connected, Disconnected, StateChanged))]
            events.sub.close()
        seen.update({p.pid: p for p in psutil.Process().children(recursive=True)})
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            if cluster is not None:
                cluster.shutdown()
            out["ecflow_left"] = server.stop() if server is not None else []
            if broker is not None:
                broker.stop()
        # Ray Client's per-driver servers are grandchildren of the head: look them up by pid too
        def survivors() -> list[psutil.Process]:
            procs = {**seen, **{p.pid: p for p in psutil.Process().children(recursive=True)}}
            alive = []
            for p in procs.values():
                try:
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:  # is_running checks the start time
                        alive.append(p)
                except psutil.Error:
                    pass
            return alive

        deadline = time.monotonic() + 30
        while survivors() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = survivors()
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
