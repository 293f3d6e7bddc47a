"""The helm chart (helm/flowbus), offline: rendered and linted by real Helm code (helm-python-sdk,
the Helm v4 Go SDK through ctypes), every built-in kind validated against Kubernetes' own schemas
(strict: unknown fields are errors), the RayCluster against KubeRay's CRD schema made strict the
same way, and what matters asserted on the rendered objects, for the default values and every
value set in helm/flowbus/ci/. Invalid values must be rejected with the path of the bad value.

Ray's token authentication is on by default: the RayCluster has ``authOptions.mode: token`` and
every container that runs or joins Ray gets ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` from
the Secret KubeRay uses.

What this cannot prove (no API server here): admission, KubeRay's defaulting and CEL rules,
pods starting, Ray joining, the broker being reachable, KubeRay generating the token Secret.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import select
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import msgspec
import pytest
import yaml

from flowbus.bus import Client, ClientCurve, Publisher, make_keypair
from flowbus.schemas import BusBroken, BusConfig, RayConfig, State, StateChanged, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "flowbus"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
#: Kubernetes versions the built-in kinds are validated for: the chart's minimum (kubeVersion
#: >=1.27) and a current one
KUBE_VERSIONS = ("1.27.0", "1.33.0")
RELEASE, NAMESPACE = "fb", "science"
CRD_FILE = Path("kuberay-v1.7.0") / "ray.io_rayclusters.yaml"
#: KubeRay shortens a head Service name longer than this (utils.CheckName), so ours must fit
KUBERAY_MAX_NAME = 50

VALUE_SETS = ["default", *(p.name for p in CI_VALUES)]


# -- helpers -----------------------------------------------------------------------------------


def load_values(name: str) -> dict[str, Any]:
    """A value set by name: "default" (the chart's values.yaml only) or a file in ci/."""
    if name == "default":
        return {}
    return helm.values_from_yaml((CHART / "ci" / name).read_text())


def render_raw(values: dict[str, Any] | None = None, name: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values or {}, name=name, namespace=namespace)


def render(values: dict[str, Any] | None = None, name: str = RELEASE, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Render the chart as `helm template` does (NOTES.txt left out) and parse every document."""
    manifests = render_raw(values, name, namespace)
    return [d for path, text in sorted(manifests.items()) if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]


def notes(values: dict[str, Any] | None = None) -> str:
    return render_raw(values)["flowbus/templates/NOTES.txt"]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind)
             if component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def ray_pod_specs(rc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pod specs of the RayCluster by role: "head" and "worker/<group>"."""
    specs = {"head": rc["spec"]["headGroupSpec"]["template"]["spec"]}
    for g in rc["spec"]["workerGroupSpecs"]:
        specs[f"worker/{g['groupName']}"] = g["template"]["spec"]
    return specs


def client_pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod spec that talks to the broker as a client: the Ray pods and the controller."""
    specs = ray_pod_specs(one(docs, "RayCluster"))
    for d in by_kind(docs, "Deployment"):
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "controller":
            specs["controller"] = d["spec"]["template"]["spec"]
    return specs


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """The container's plain environment variables (``value``; those taken from a Secret are in :func:`env_refs`)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def env_refs(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The container's environment variables taken from elsewhere: name -> ``valueFrom``."""
    return {e["name"]: e["valueFrom"] for e in container.get("env", []) if "valueFrom" in e}


def mounted_file(spec: dict[str, Any], container: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The volume and key that provide the file at ``path`` in the container (fails when none does)."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"]
        if m.get("subPath") and mp == path:
            return volumes[m["name"]], m["subPath"]
        if not m.get("subPath") and path.startswith(mp.rstrip("/") + "/"):
            rel, vol = path[len(mp.rstrip("/")) + 1:], volumes[m["name"]]
            items = (vol.get("secret") or vol.get("configMap") or {}).get("items")
            if items is None or any(i["path"] == rel for i in items):
                return vol, rel
    raise AssertionError(f"{path} is not mounted in container {container['name']}")


def config_toml(docs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return tomllib.loads(one(docs, "ConfigMap")["data"][key])


def find_crd() -> Path | None:
    """KubeRay's RayCluster CRD (third-party test data, never copied into the repository)."""
    env = [Path(os.environ["FLOWBUS_SHARED_DATA"])] if os.environ.get("FLOWBUS_SHARED_DATA") else []
    found = [b / CRD_FILE for b in [*env, ROOT.parent / "shared" / "data", Path("/work/shared/data")] if (b / CRD_FILE).is_file()]
    return found[0] if found else None


def strict_schema(node: Any) -> Any:
    """Close every object schema that lists properties and does not preserve unknown fields:
    what the API server's strict field validation does with a CRD."""
    if isinstance(node, dict):
        out = {k: strict_schema(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [strict_schema(v) for v in node]
    return node


@pytest.fixture(scope="module")
def raycluster_validator() -> Iterator[jsonschema.Draft7Validator]:
    path = find_crd()
    if path is None:
        pytest.skip(f"KubeRay CRD {CRD_FILE} not found (set FLOWBUS_SHARED_DATA, or place it in ../shared/data "
                    "or /work/shared/data); only the CRD validation is skipped")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(path.read_text(), Loader=loader)  # noqa: S506 - a safe loader
    assert crd["spec"]["names"]["kind"] == "RayCluster"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict_schema(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    yield jsonschema.Draft7Validator(schema)


def crd_errors(validator: jsonschema.Draft7Validator, doc: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as info:
        render(values)
    return str(info.value)


def worker(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "replicas": 1, "minReplicas": 1, "maxReplicas": 1, **extra}


# -- lint and schema-level validation -----------------------------------------------------------


class TestValidity:
    @pytest.mark.parametrize("value_set", VALUE_SETS)
    def test_lint_strict(self, value_set: str) -> None:
        """`helm lint --strict` finds no warning or error for the value set."""
        for kube in KUBE_VERSIONS:
            report = helm.lint(CHART, load_values(value_set), strict=True, namespace=NAMESPACE, kube_version=f"v{kube}")
            bad = [m for m in report["messages"] if m["severity"] >= 2]
            assert report["total_charts_linted"] == 1
            assert not bad and not report["errors"], (kube, bad, report["errors"])

    def test_lint_reports_bad_values(self) -> None:
        """The strict lint above can fail: values the schema forbids give a lint error."""
        report = helm.lint(CHART, {"broker": {"replicas": 2}}, strict=True, kube_version=f"v{KUBE_VERSIONS[0]}")
        text = " ".join(m["error"] for m in report["messages"] if m["severity"] >= 3) + " ".join(report["errors"])
        assert "replicas" in text

    @pytest.mark.parametrize("value_set", VALUE_SETS)
    def test_builtin_kinds_validate_strictly(self, value_set: str) -> None:
        """Every rendered object of a built-in kind passes Kubernetes' schema with unknown fields forbidden."""
        docs = render(load_values(value_set))
        builtin = [d for d in docs if d["kind"] != "RayCluster"]
        assert {d["kind"] for d in builtin} >= {"ConfigMap", "Service", "Deployment"}
        for kube in KUBE_VERSIONS:
            for doc in builtin:
                kubernetes_validate.validate(doc, kube, strict=True)

    def test_strict_kubernetes_validation_can_fail(self) -> None:
        """An unknown container field in a rendered Deployment is rejected (the check is not vacuous)."""
        dep = copy.deepcopy(one(render(), "Deployment", "broker"))
        dep["spec"]["template"]["spec"]["containers"][0]["bogusField"] = 1
        with pytest.raises(kubernetes_validate.ValidationError, match="bogusField"):
            kubernetes_validate.validate(dep, KUBE_VERSIONS[0], strict=True)

    @pytest.mark.parametrize("value_set", VALUE_SETS)
    def test_raycluster_matches_kuberay_crd(self, value_set: str, raycluster_validator: jsonschema.Draft7Validator) -> None:
        """The RayCluster passes KubeRay v1.7.0's openAPIV3Schema with unknown fields forbidden."""
        rc = one(render(load_values(value_set)), "RayCluster")
        assert rc["apiVersion"] == "ray.io/v1"
        assert crd_errors(raycluster_validator, rc) == []

    def test_crd_validation_can_fail(self, raycluster_validator: jsonschema.Draft7Validator) -> None:
        """A misspelt field, a number where the CRD wants a string, and a string count are all caught."""
        rc = one(render(), "RayCluster")
        rc["spec"]["headGroupSpec"]["rayStartParam"] = {}
        rc["spec"]["workerGroupSpecs"][0]["resources"]["flowbus-sessions"] = 1000
        rc["spec"]["workerGroupSpecs"][0]["replicas"] = "three"
        errors = "\n".join(crd_errors(raycluster_validator, rc))
        assert "rayStartParam" in errors
        assert "workerGroupSpecs.0.resources.flowbus-sessions" in errors
        assert "workerGroupSpecs.0.replicas" in errors


# -- behaviour --------------------------------------------------------------------------------


class TestBroker:
    @pytest.mark.parametrize("value_set", VALUE_SETS)
    def test_every_client_pod_gets_the_service_address(self, value_set: str) -> None:
        """FLOWBUS_ADDRESS in the Ray head, every worker and the controller is the broker Service's DNS name and request port."""
        docs = render(load_values(value_set))
        svc = one(docs, "Service", "broker")
        port = {p["name"]: p["port"] for p in svc["spec"]["ports"]}["request"]
        expected = f"tcp://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc:{port}"
        specs = client_pod_specs(docs)
        assert {"head"} < set(specs)
        for role, spec in specs.items():
            (container,) = spec["containers"]
            assert env_of(container)["FLOWBUS_ADDRESS"] == expected, role

    def test_default_address(self) -> None:
        """With the defaults the address is the one the README documents."""
        docs = render()
        (c,) = client_pod_specs(docs)["head"]["containers"]
        assert env_of(c)["FLOWBUS_ADDRESS"] == f"tcp://{RELEASE}-flowbus-broker.{NAMESPACE}.svc:7750"
        text = notes()
        assert f"tcp://{RELEASE}-flowbus-broker.{NAMESPACE}.svc:7750" in text
        assert f"create secret generic {RELEASE}-flowbus-curve" in text  # the Secret the pods mount
        vols = {v["name"]: v for v in client_pod_specs(docs)["head"]["volumes"]}
        assert vols["flowbus-curve"]["secret"]["secretName"] == f"{RELEASE}-flowbus-curve"

    @pytest.mark.parametrize("value_set", VALUE_SETS)
    def test_one_broker_behind_a_clusterip_service(self, value_set: str) -> None:
        """Exactly one broker replica, never two during an upgrade, behind a ClusterIP Service whose ports are the container's and the config's."""
        docs = render(load_values(value_set))
        dep = one(docs, "Deployment", "broker")
        assert dep["spec"]["replicas"] == 1
        assert dep["spec"]["strategy"]["type"] == "Recreate"
        svc = one(docs, "Service", "broker")
        assert svc["spec"]["type"] == "ClusterIP"
        pod = dep["spec"]["template"]
        assert all(pod["metadata"]["labels"][k] == v for k, v in svc["spec"]["selector"].items())
        (c,) = pod["spec"]["containers"]
        container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        service_ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
        targets = {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]}
        assert set(service_ports) == {"request", "publish", "ingest", "command"}
        assert targets == {n: n for n in service_ports}
        assert container_ports == service_ports  # clients learn publish/ingest ports from the broker
        for key in ("flowbus.toml", "broker.toml"):
            bus = config_toml(docs, key)["bus"]
            assert {n: bus[f"{n}-port"] for n in service_ports} == service_ports, key
        assert c["readinessProbe"]["tcpSocket"]["port"] in ("request", service_ports["request"])

    def test_broker_runs_its_config_and_journals_on_the_volume(self) -> None:
        """The broker is started on broker.toml, binds every interface, and its journal directory is the journal volume (emptyDir by default)."""
        docs = render()
        dep = one(docs, "Deployment", "broker")
        spec = dep["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        assert c["command"][:2] == ["flowbus", "broker"]
        cfg_path = c["command"][c["command"].index("--config") + 1]
        vol, key = mounted_file(spec, c, cfg_path)
        assert vol["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"] and key == "broker.toml"
        bus = config_toml(docs, "broker.toml")["bus"]
        assert bus["host"] == "0.0.0.0"
        journal_vol, _ = mounted_file(spec, c, bus["journal-dir"] + "/x")
        assert journal_vol["name"] == "journal" and "emptyDir" in journal_vol
        assert not by_kind(docs, "PersistentVolumeClaim")

    def test_pvc_journal(self) -> None:
        """With persistence on, the chart creates a claim (kept on uninstall) and the journal volume uses it."""
        docs = render(load_values("pvc-journal-values.yaml"))
        (pvc,) = by_kind(docs, "PersistentVolumeClaim")
        assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
        assert pvc["spec"]["storageClassName"] == "standard"
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        vols = {v["name"]: v for v in one(docs, "Deployment", "broker")["spec"]["template"]["spec"]["volumes"]}
        assert vols["journal"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]

    def test_existing_claim(self) -> None:
        """An existing claim is used as it is; no claim is created."""
        docs = render(load_values("controller-off-values.yaml"))
        assert not by_kind(docs, "PersistentVolumeClaim")
        vols = {v["name"]: v for v in one(docs, "Deployment", "broker")["spec"]["template"]["spec"]["volumes"]}
        assert vols["journal"]["persistentVolumeClaim"]["claimName"] == "flowbus-journal"


class TestConfig:
    @pytest.mark.parametrize("value_set", VALUE_SETS)
    def test_config_parses_with_flowbus(self, value_set: str) -> None:
        """Both files of the ConfigMap are valid flowbus configs (flowbus.schemas.parse_config), and the clients' [bus] is the Service."""
        docs = render(load_values(value_set))
        svc = one(docs, "Service", "broker")
        broker = parse_config(config_toml(docs, "broker.toml"), "ConfigMap broker.toml")
        assert broker.bus.curve.server_secret_key_file  # the broker binds off loopback: CurveZMQ
        client = parse_config(config_toml(docs, "flowbus.toml"), "flowbus.toml")
        assert client.bus.curve.server_public_key_file and not client.bus.curve.server_secret_key_file
        assert client.bus.host == f"{svc['metadata']['name']}.{NAMESPACE}.svc"

    def test_user_config_is_kept(self) -> None:
        """The sessions, [ray] and [log] the user wrote reach the pods' config."""
        cfg = parse_config(config_toml(render(load_values("two-groups-values.yaml")), "flowbus.toml"), "flowbus.toml")
        assert [s.name for s in cfg.sessions] == ["ops", "hpc"]
        assert cfg.ray.sessions_per_actor == 128 and cfg.log.json is True
        assert cfg.state_dir == "/var/lib/flowbus/state"

    def test_bus_values_reach_the_config(self) -> None:
        """bus.journalEvents and bus.heartbeatInterval become journal-events and heartbeat-interval."""
        cfg = parse_config(config_toml(render(load_values("pvc-journal-values.yaml")), "broker.toml"), "broker.toml")
        assert cfg.bus.journal_events == 500000 and cfg.bus.heartbeat_interval == 0.5

    def test_fsync_and_rebalance_defaults_are_the_codes(self) -> None:
        """By default the chart writes journal-fsync, journal-fsync-interval (broker) and [ray]
        rebalance-per-second (clients) with the values flowbus itself defaults to."""
        docs = render()
        broker = parse_config(config_toml(docs, "broker.toml"), "broker.toml")
        assert (broker.bus.journal_fsync, broker.bus.journal_fsync_interval) == (BusConfig().journal_fsync,
                                                                                  BusConfig().journal_fsync_interval)
        client = parse_config(config_toml(docs, "flowbus.toml"), "flowbus.toml")
        assert client.ray.rebalance_per_second == RayConfig().rebalance_per_second

    @pytest.mark.parametrize("value_set", ["default", "two-groups-values.yaml"])
    def test_fsync_and_rebalance_values_reach_the_config(self, value_set: str) -> None:
        """bus.journalFsync(Interval) reach the broker's [bus]; ray.rebalancePerSecond reaches the
        clients' [ray]: a table of its own, or the user's [ray] table with its keys kept."""
        values = load_values(value_set)
        values.setdefault("bus", {}).update(journalFsync="always", journalFsyncInterval=0.25)
        values.setdefault("ray", {})["rebalancePerSecond"] = 0.5
        docs = render(values)
        broker = parse_config(config_toml(docs, "broker.toml"), "broker.toml")
        assert (broker.bus.journal_fsync, broker.bus.journal_fsync_interval) == ("always", 0.25)
        client = parse_config(config_toml(docs, "flowbus.toml"), "flowbus.toml")
        assert client.ray.rebalance_per_second == 0.5
        if value_set != "default":
            assert client.ray.sessions_per_actor == 128 and client.ray.namespace == "flowbus"

    @pytest.mark.parametrize("value_set", VALUE_SETS)
    def test_config_and_keys_are_mounted_where_the_config_says(self, value_set: str) -> None:
        """Every client pod mounts flowbus.toml and the broker's public key at the paths the config names; only the broker pod gets the secret key."""
        docs = render(load_values(value_set))
        curve = config_toml(docs, "flowbus.toml")["bus"]["curve"]
        for role, spec in client_pod_specs(docs).items():
            (c,) = spec["containers"]
            vol, key = mounted_file(spec, c, "/etc/flowbus/flowbus.toml")
            assert "configMap" in vol and key == "flowbus.toml", role
            vol, _ = mounted_file(spec, c, curve["server-public-key-file"])
            assert "secret" in vol, role
            assert "server-secret-key-file" not in curve  # clients need only the public key
            if "client-secret-key-file" in curve:
                vol, _ = mounted_file(spec, c, curve["client-secret-key-file"])
                assert vol["secret"]["secretName"] == "flowbus-client-key", role
        broker_spec = one(docs, "Deployment", "broker")["spec"]["template"]["spec"]
        (bc,) = broker_spec["containers"]
        bcurve = config_toml(docs, "broker.toml")["bus"]["curve"]
        vol, _ = mounted_file(broker_spec, bc, bcurve["server-secret-key-file"])
        assert "secret" in vol
        if "authorized-keys-dir" in bcurve:
            vol, _ = mounted_file(broker_spec, bc, bcurve["authorized-keys-dir"] + "/client.key")
            assert [i["key"] for i in vol["secret"]["items"]] == ["client.key"]  # the public key only

    def test_bus_table_in_user_config_is_rejected(self) -> None:
        """A [bus] table in `config` is refused: the chart owns it so that pods reach the one broker."""
        assert "config: must not set the [bus] table" in render_error({"config": "[bus]\nhost = \"x\"\n"})
        assert "config: must not set the [bus] table" in render_error({"config": "[bus.curve]\nserver-secret-key-file = \"k\"\n"})


class TestRayCluster:
    def test_head_turns_off_grpc_fork_support(self) -> None:
        """The head (home of the Ray Client server) runs with gRPC fork handlers off (ray#63202)."""
        head = one(render(), "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert {"name": "GRPC_ENABLE_FORK_SUPPORT", "value": "false"} in head["env"]

    def test_head_takes_no_sessions(self) -> None:
        """The head starts with num-cpus "0" (sessions never land there); other start parameters are added, dashboard-host can be overridden."""
        assert one(render(), "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0", "dashboard-host": "0.0.0.0"}
        raw = render_raw({"ray": {"head": {"rayStartParams": {"metrics-export-port": "8080", "dashboard-host": "127.0.0.1"}}}})
        assert raw["flowbus/templates/raycluster.yaml"].count("dashboard-host:") == 1  # no duplicate key
        params = one(render({"ray": {"head": {"rayStartParams": {"metrics-export-port": "8080", "dashboard-host": "127.0.0.1"}}}}), "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]
        assert params == {"num-cpus": "0", "metrics-export-port": "8080", "dashboard-host": "127.0.0.1"}

    def test_worker_groups_carry_ray_resources_and_labels(self) -> None:
        """Each worker group gets its custom Ray resources (as the strings KubeRay wants), labels, replicas and container resources."""
        values = load_values("two-groups-values.yaml")
        rc = one(render(values), "RayCluster")
        groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
        assert list(groups) == [g["name"] for g in values["ray"]["workerGroups"]]
        for want in values["ray"]["workerGroups"]:
            got = groups[want["name"]]
            assert got["resources"] == {k: str(v) for k, v in want["rayResources"].items()}
            assert got["labels"] == want["rayLabels"]
            assert "resources" not in got["rayStartParams"] and "labels" not in got["rayStartParams"]
            assert (got["replicas"], got["minReplicas"], got["maxReplicas"]) == (want["replicas"], want["minReplicas"], want["maxReplicas"])
            (c,) = got["template"]["spec"]["containers"]
            assert c.get("resources") == want.get("resources")
        assert groups["ecflow"]["resources"] == {"flowbus-ecflow": "1000"}
        assert groups["ecflow"]["template"]["spec"]["securityContext"] == {"runAsNonRoot": True, "fsGroup": 100}
        assert groups["qcg"]["rayStartParams"] == {"metrics-export-port": "8080", "num-cpus": "4"}
        assert rc["spec"]["headGroupSpec"]["labels"] == {"flowbus.io/role": "head"}

    def test_large_resource_counts_stay_integers(self) -> None:
        """A resource count of a million renders as "1000000", not in float notation."""
        rc = one(render({"ray": {"workerGroups": [worker("big", rayResources={"flowbus-x": 1000000})]}}), "RayCluster")
        assert rc["spec"]["workerGroupSpecs"][0]["resources"] == {"flowbus-x": "1000000"}

    def test_gcs_fault_tolerance_only_when_enabled(self) -> None:
        """gcsFaultToleranceOptions appear only with ray.gcsFaultTolerance.enabled, with the Redis address and password secret."""
        assert "gcsFaultToleranceOptions" not in one(render(), "RayCluster")["spec"]
        assert "gcsFaultToleranceOptions" not in one(render({"ray": {"gcsFaultTolerance": {"enabled": False, "redisAddress": "r:6379"}}}), "RayCluster")["spec"]
        gcs = one(render(load_values("gcs-ft-values.yaml")), "RayCluster")["spec"]["gcsFaultToleranceOptions"]
        assert gcs["redisAddress"] == "redis.flowbus.svc:6379"
        assert gcs["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "redis-password", "key": "password"}

    @pytest.mark.parametrize("release", ["fb", "a-very-long-release-name-for-the-science-department-0123"])
    def test_controller_targets_the_head_service_kuberay_creates(self, release: str) -> None:
        """The controller runs `flowbus up --address ray://<RayCluster>-head-svc... --broker <FLOWBUS_ADDRESS>`, a name KubeRay keeps unshortened."""
        docs = render(name=release)
        rc = one(docs, "RayCluster")
        head_svc = f"{rc['metadata']['name']}-head-svc"
        assert len(head_svc) <= KUBERAY_MAX_NAME
        (c,) = one(docs, "Deployment", "controller")["spec"]["template"]["spec"]["containers"]
        cmd = c["command"]
        assert cmd[:2] == ["flowbus", "up"]
        assert cmd[cmd.index("--config") + 1] == "/etc/flowbus/flowbus.toml"
        assert cmd[cmd.index("--address") + 1] == f"ray://{head_svc}.{NAMESPACE}.svc:10001"
        assert cmd[cmd.index("--broker") + 1] == env_of(c)["FLOWBUS_ADDRESS"]
        for d in docs:
            assert len(d["metadata"]["name"]) <= 63

    def test_controller_can_be_disabled(self) -> None:
        """controller.enabled=false renders no controller; the rest stays."""
        docs = render(load_values("controller-off-values.yaml"))
        assert [d["metadata"]["labels"]["app.kubernetes.io/component"] for d in by_kind(docs, "Deployment")] == ["broker"]
        assert one(docs, "RayCluster")
        assert "flowbus watch" in notes(load_values("controller-off-values.yaml"))


class TestRayAuth:
    """Ray's token authentication: KubeRay authOptions on the RayCluster, the token in every pod that runs or joins Ray."""

    @staticmethod
    def ray_pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The containers that run Ray (head, workers) or join it (the controller), by role."""
        return {role: spec["containers"][0] for role, spec in client_pod_specs(docs).items()}

    def test_token_mode_is_the_default(self) -> None:
        """With the chart's defaults the RayCluster has authOptions.mode == "token", and KubeRay generates the token Secret."""
        rc = one(render(), "RayCluster")
        assert rc["spec"]["authOptions"] == {"mode": "token"}
        text = notes()
        assert "Ray token authentication: on" in text
        assert f"get secret {RELEASE}-flowbus -o jsonpath='{{.data.auth_token}}'" in text

    @pytest.mark.parametrize("value_set", VALUE_SETS)
    def test_every_ray_pod_and_the_controller_get_the_token(self, value_set: str) -> None:
        """authOptions.mode is token, and the head, every worker and the controller get RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the Secret KubeRay uses."""
        values = load_values(value_set)
        docs = render(values)
        rc = one(docs, "RayCluster")
        auth = rc["spec"]["authOptions"]
        assert auth["mode"] == "token"
        own = ((values.get("ray") or {}).get("auth") or {}).get("secretName")
        if own:
            assert auth == {"mode": "token", "secretName": own}
        # KubeRay's own Secret is named like the RayCluster (utils.CheckName leaves names like ours as they are)
        secret = own or rc["metadata"]["name"]
        pods = self.ray_pods(docs)
        assert "head" in pods and any(role.startswith("worker/") for role in pods)
        assert ("controller" in pods) == (value_set != "controller-off-values.yaml")
        for role, c in pods.items():
            assert env_of(c)["RAY_AUTH_MODE"] == "token", role
            assert env_refs(c)["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": secret, "key": "auth_token"}}, role
            names = [e["name"] for e in c["env"]]
            assert len(names) == len(set(names)), (role, names)  # KubeRay adds its own only when missing

    @pytest.mark.parametrize("value_set", VALUE_SETS)
    def test_the_broker_gets_no_ray_token(self, value_set: str) -> None:
        """The broker does not join Ray: no Ray token in its pod (least privilege)."""
        (c,) = one(render(load_values(value_set)), "Deployment", "broker")["spec"]["template"]["spec"]["containers"]
        assert not [e["name"] for e in c.get("env", []) if e["name"].startswith("RAY_AUTH")]

    def test_secret_name_follows_kuberay_for_a_release_starting_with_a_digit(self) -> None:
        """KubeRay names its Secret after the RayCluster with a leading digit replaced by "r" (utils.CheckName); the pods refer to that name."""
        docs = render(name="1fb")
        assert one(docs, "RayCluster")["metadata"]["name"] == "1fb-flowbus"
        for role, c in self.ray_pods(docs).items():
            assert env_refs(c)["RAY_AUTH_TOKEN"]["secretKeyRef"]["name"] == "rfb-flowbus", role

    def test_disabled_is_explicit_and_leaves_no_token_env(self, raycluster_validator: jsonschema.Draft7Validator) -> None:
        """ray.auth.mode=disabled renders authOptions.mode disabled (valid for the CRD), no token env, and NOTES says it is off."""
        values = {"ray": {"auth": {"mode": "disabled"}}}
        docs = render(values)
        rc = one(docs, "RayCluster")
        assert rc["spec"]["authOptions"] == {"mode": "disabled"}
        assert crd_errors(raycluster_validator, rc) == []
        for role, c in self.ray_pods(docs).items():
            assert "RAY_AUTH_MODE" not in env_of(c) and "RAY_AUTH_TOKEN" not in env_refs(c), role
        assert "Ray token authentication: OFF" in notes(values)

    def test_crd_knows_auth_options(self, raycluster_validator: jsonschema.Draft7Validator) -> None:
        """The CRD check covers authOptions: a mode it does not know and an unknown field are errors."""
        rc = one(render(), "RayCluster")
        rc["spec"]["authOptions"] = {"mode": "tokens", "secretNme": "x"}
        errors = "\n".join(crd_errors(raycluster_validator, rc))
        assert "authOptions.mode" in errors and "secretNme" in errors


# -- invalid values ----------------------------------------------------------------------------


class TestGrantKey:
    """The key that signs sessions' source grants: one Secret, in the broker and every pod that runs or joins Ray."""

    def test_the_chart_makes_one_kept_secret_and_every_flowbus_pod_mounts_it(self) -> None:
        """By default the chart makes <fullname>-grant (64 hex characters, kept on uninstall); the
        broker, the controller and the Ray pods mount it read-only and their config names it."""
        docs = render()
        (secret,) = [d for d in by_kind(docs, "Secret") if d["metadata"]["name"] == f"{RELEASE}-flowbus-grant"]
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        key = base64.b64decode(secret["data"]["grant.key"]).decode()
        assert len(key) == 64 and int(key, 16) >= 0
        specs = {"broker": one(docs, "Deployment", "broker")["spec"]["template"]["spec"], **client_pod_specs(docs)}
        for role, spec in specs.items():
            (vol,) = [v for v in spec["volumes"] if v["name"] == "flowbus-grant"]
            assert vol["secret"]["secretName"] == f"{RELEASE}-flowbus-grant" and vol["secret"]["defaultMode"] == 0o400, role
            mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
            assert mounts["flowbus-grant"]["mountPath"] == "/etc/flowbus/grant", role
        for name, text in one(docs, "ConfigMap")["data"].items():
            assert 'grant-key-file = "/etc/flowbus/grant/grant.key"' in text, name

    def test_a_secret_of_your_own(self) -> None:
        """bus.grantSecretName: the chart makes no Secret and the pods mount the named one."""
        docs = render({"bus": {"grantSecretName": "site-grant"}})
        assert not [d for d in by_kind(docs, "Secret") if d["metadata"]["name"].endswith("-grant")]
        spec = one(docs, "Deployment", "broker")["spec"]["template"]["spec"]
        assert [v["secret"]["secretName"] for v in spec["volumes"] if v["name"] == "flowbus-grant"] == ["site-grant"]


class TestInvalidValues:
    @pytest.mark.parametrize(("values", "path"), [
        ({"ray": {"workerGroups": [worker("Bad_Name")]}}, "/ray/workerGroups/0/name"),
        ({"ray": {"workerGroups": [worker("a", replicas="three")]}}, "/ray/workerGroups/0/replicas"),
        ({"broker": {"replicas": 2}}, "/broker"),
        ({"bogus": 1}, "bogus"),
        ({"ray": {"gcsFaultTolerance": {"enabled": True}}}, "/ray/gcsFaultTolerance/redisAddress"),
        ({"ray": {"workerGroups": [worker("a", rayResources={"flowbus-x": 1.5})]}}, "/ray/workerGroups/0/rayResources/flowbus-x"),
        ({"ray": {"head": {"rayStartParams": {"num-cpus": "4"}}}}, "/ray/head/rayStartParams/num-cpus"),
        ({"ray": {"workerGroups": [worker("a", rayStartParams={"resources": "{}"})]}}, "/ray/workerGroups/0/rayStartParams/resources"),
        ({"ray": {"workerGroups": []}}, "/ray/workerGroups"),
        ({"bus": {"requestPort": 70000}}, "/bus/requestPort"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"ray": {"auth": {"mode": "off"}}}, "/ray/auth/mode"),
        ({"ray": {"auth": {"mode": "token", "secretName": "Bad_Secret"}}}, "/ray/auth/secretName"),
        ({"ray": {"auth": {"mode": "token", "enableK8sTokenAuth": True}}}, "/ray/auth"),
        ({"bus": {"journalFsync": "sometimes"}}, "/bus/journalFsync"),
        ({"bus": {"journalFsyncInterval": 0}}, "/bus/journalFsyncInterval"),
        ({"ray": {"rebalancePerSecond": -1}}, "/ray/rebalancePerSecond"),
    ], ids=["bad-name", "wrong-type", "unknown-key", "unknown-top-key", "gcs-without-redis", "fractional-resource",
            "head-num-cpus", "resources-as-start-param", "no-worker-group", "port-range", "enum", "auth-mode",
            "auth-secret-name", "auth-unknown-key", "fsync-policy", "fsync-interval", "rebalance-negative"])
    def test_schema_rejects_with_path(self, values: dict[str, Any], path: str) -> None:
        """values.schema.json rejects the value and the error names its path."""
        with pytest.raises(helm.HelmValuesError) as info:
            render(values)
        assert path in str(info.value)

    @pytest.mark.parametrize(("values", "message"), [
        ({"ray": {"workerGroups": [worker("a"), worker("a")]}}, 'ray.workerGroups[1].name: "a" is already the name of ray.workerGroups[0]'),
        ({"ray": {"workerGroups": [worker("a", minReplicas=3, maxReplicas=2, replicas=2)]}}, "ray.workerGroups[0].minReplicas: 3 is above maxReplicas 2"),
        ({"ray": {"workerGroups": [worker("a", replicas=5)]}}, "ray.workerGroups[0].replicas: 5 is outside"),
        ({"bus": {"publishPort": 7750}}, "bus: requestPort, publishPort, ingestPort and commandPort must differ"),
        ({"config": "[ray]\nrebalance-per-second = 2\n"}, "config: must not set rebalance-per-second; the chart writes it"),
        ({"config": 'ray.namespace = "x"\n'}, "config: write the ray settings under a [ray] table header"),
    ], ids=["duplicate-group", "min-above-max", "replicas-outside", "same-port", "rebalance-in-config", "dotted-ray"])
    def test_template_checks_name_the_value(self, values: dict[str, Any], message: str) -> None:
        """Checks the schema cannot express fail the render with the value's path."""
        assert message in render_error(values)


class TestReadme:
    def test_readme_example_renders_as_documented(self) -> None:
        """The values example of docs/kubernetes.md renders, its config parses, and the controller command is the one the page shows."""
        section = (ROOT / "docs" / "kubernetes.md").read_text()
        match = re.search(r"```yaml\n# my-values.yaml\n(.*?)```", section, re.S)
        assert match, "docs/kubernetes.md has no my-values.yaml example"
        docs = render(helm.values_from_yaml(match.group(1)), name="fb", namespace="ns")
        cfg = parse_config(config_toml(docs, "flowbus.toml"), "README example")
        assert [s.name for s in cfg.sessions] == ["ops"]
        (c,) = one(docs, "Deployment", "controller")["spec"]["template"]["spec"]["containers"]
        assert f"`{' '.join(c['command'])}`" in " ".join(section.split())
        assert "gcsFaultToleranceOptions" in one(docs, "RayCluster")["spec"]


# -- the rendered pods' files against the real broker -------------------------------------------


def materialise(docs: list[dict[str, Any]], spec: dict[str, Any], root: Path,
                secrets: dict[str, dict[str, bytes]]) -> None:
    """Lay out under ``root`` the files the pod's container sees: ConfigMap and Secret volumes
    projected as the kubelet does (items, subPath), emptyDirs and claims as empty directories.
    Absolute paths inside the config files are moved under ``root`` too."""
    (container,) = spec["containers"]
    maps = {d["metadata"]["name"]: d["data"] for d in by_kind(docs, "ConfigMap")}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for m in container["volumeMounts"]:
        vol = volumes[m["name"]]
        target = root / m["mountPath"].lstrip("/")
        if "configMap" in vol:
            src = vol["configMap"]
            data = {k: re.sub(r'"/(etc|var/lib)/flowbus/', f'"{root}/\\1/flowbus/', v).encode() for k, v in maps[src["name"]].items()}
        elif "secret" in vol:
            src = vol["secret"]
            data = secrets[src["secretName"]]  # a KeyError: the pod would not start
        else:  # emptyDir or claim
            target.mkdir(parents=True, exist_ok=True)
            continue
        files = {i["path"]: data[i["key"]] for i in src.get("items") or [{"key": k, "path": k} for k in data]}
        if m.get("subPath"):
            files, target = {target.name: files[m["subPath"]]}, target.parent
        for name, content in files.items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(content)


def on_loopback(path: Path, request_port: int | None = None) -> None:
    """Keep a materialised config on 127.0.0.1 (tests never bind or dial anything else); the
    broker takes free ports, a client the broker's actual request port."""
    text = re.sub(r'(?m)^host = ".*"$', 'host = "127.0.0.1"', path.read_text())
    if request_port is None:
        text = re.sub(r"(?m)^(request|publish|ingest|command)-port = \d+$", r"\1-port = 0", text)
    else:
        text = re.sub(r"(?m)^request-port = \d+$", f"request-port = {request_port}", text)
    path.write_text(text)


class TestPodsTalk:
    """The broker pod and a Ray worker pod, as rendered, run with flowbus's real broker and client:
    the files each pod gets (config, keys) are enough, and CurveZMQ is really on."""

    pytestmark = pytest.mark.timeout(90)

    @pytest.mark.parametrize("value_set", ["default", "curve-clients-values.yaml"])
    def test_worker_pod_reaches_broker_pod(self, value_set: str, tmp_path: Path) -> None:
        """The broker started as its Deployment says serves a client built only from a worker pod's files; a client without the keys is refused."""
        values = load_values(value_set)
        docs = render(values)
        curve_values = values.get("curve", {})
        pub_key, sec_key = make_keypair(tmp_path / "keys", "broker")
        secrets = {curve_values.get("secretName") or f"{RELEASE}-flowbus-curve":
                   {"broker.key": pub_key.read_bytes(), "broker.key_secret": sec_key.read_bytes()}}
        for doc in by_kind(docs, "Secret"):  # the ones the chart makes itself (the grant key)
            secrets[doc["metadata"]["name"]] = {k: base64.b64decode(v) for k, v in doc["data"].items()}
        if curve_values.get("clientSecretName"):
            cpub, csec = make_keypair(tmp_path / "keys", "client")
            secrets[curve_values["clientSecretName"]] = {"client.key": cpub.read_bytes(), "client.key_secret": csec.read_bytes()}

        broker_spec = one(docs, "Deployment", "broker")["spec"]["template"]["spec"]
        broker_root = tmp_path / "broker-pod"
        materialise(docs, broker_spec, broker_root, secrets)
        cmd = list(broker_spec["containers"][0]["command"])
        assert cmd[:2] == ["flowbus", "broker"]
        cfg_at = cmd.index("--config") + 1
        cmd[cfg_at] = str(broker_root / cmd[cfg_at].lstrip("/"))
        on_loopback(Path(cmd[cfg_at]))
        log = tmp_path / "broker.log"
        with log.open("w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "flowbus", *cmd[1:]], stdout=subprocess.PIPE, stderr=err,
                                    text=True, close_fds=True, start_new_session=True)
        try:
            endpoints = self.wait_ready(proc, log)
            request_port = int(endpoints["request"].rsplit(":", 1)[1])
            specs = ray_pod_specs(one(docs, "RayCluster"))
            worker_spec = specs[next(role for role in specs if role.startswith("worker/"))]
            pod_root = tmp_path / "worker-pod"
            materialise(docs, worker_spec, pod_root, secrets)
            # the broker's secret key stays in its pod: the only secret key here is the client's own
            own = ["client.key_secret"] if curve_values.get("clientSecretName") else []
            assert [p.name for p in pod_root.rglob("*.key_secret")] == own
            on_loopback(pod_root / "etc/flowbus/flowbus.toml", request_port)
            cfg = load_config(pod_root / "etc/flowbus/flowbus.toml")
            address = cfg.bus.request_address()
            with Client(address, curve=cfg.bus.curve, timeout=10) as client:
                assert client.info["curve_server_key"] == ClientCurve.from_config(cfg.bus.curve).server_public.decode()  # type: ignore[union-attr]  # curve is configured here
                with client.expect("qcg/pod/state/j1 state=complete", timeout=20) as exp:
                    pub = Publisher(address, curve=ClientCurve.from_config(cfg.bus.curve), timeout=10)
                    try:
                        pub.open_source("pod", "qcg")
                        pub.publish(StateChanged(source="pod", backend="qcg", key="j1", state=State.COMPLETE))
                        pub.flush(10)
                    finally:
                        pub.close()
                assert exp.event is not None and exp.event.seq == 1
            with pytest.raises(BusBroken):  # no CURVE at all
                Client(address, timeout=0.5)
            if curve_values.get("clientSecretName"):
                anonymous = ClientCurve.from_config(msgspec.structs.replace(cfg.bus.curve, client_secret_key_file=""))
                with pytest.raises(BusBroken):  # the broker admits only the client key
                    Client(address, curve=anonymous, timeout=0.5)
        finally:
            proc.terminate()
            try:
                proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate(timeout=15)

    @staticmethod
    def wait_ready(proc: subprocess.Popen[str], log: Path, timeout: float = 30.0) -> dict[str, Any]:
        """The endpoints from the broker's readiness line (fails with its log if it never comes)."""
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = proc.stdout.readline()
            if line.startswith("FLOWBUS-BROKER-READY "):
                return dict(json.loads(line.split(" ", 1)[1]))
            if not line:
                break
        raise AssertionError(f"the broker pod's command did not come up: {log.read_text()[-2000:]}")

