"""The helm controller's command line, parsed by flowbus's own CLI parser (``flowbus._cli._parser``),
and its Ray token as flowbus's join code takes it.

The chart is rendered as tests/helm/test_helm.py does (helm-python-sdk, offline); the controller
container's ``command`` + ``args`` must be a ``flowbus up`` invocation that the real parser accepts,
with ``--config``, ``--address`` and ``--broker`` exactly as rendered; its environment (the
Secret's token as ``RAY_AUTH_TOKEN``) must make flowbus join Ray with that token. (That ``flowbus
up --address ray://...`` then works against a cluster is tests/actors/test_cluster.py::TestRayClient.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_helm import NAMESPACE, VALUE_SETS, config_toml, env_of, env_refs, load_values, mounted_file, one, render

from flowbus._cli import _parser
from flowbus.schemas import parse_config

WITH_CONTROLLER = [v for v in VALUE_SETS if v != "controller-off-values.yaml"]


def controller(docs: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """(argv = command + args, the container, the pod spec) of the controller Deployment."""
    spec = one(docs, "Deployment", "controller")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    return [*c.get("command", []), *c.get("args", [])], c, spec


class TestControllerCommandLine:
    """What the controller pod runs is a command line flowbus accepts, with the rendered addresses."""

    @pytest.mark.parametrize("values", WITH_CONTROLLER)
    def test_flowbus_parser_accepts_the_rendered_command(self, values: str) -> None:
        """`flowbus up --config F --address ray://<head-svc>:10001 --broker tcp://<broker>:7750` parses as rendered."""
        vals = load_values(values)
        docs = render(vals)
        argv, c, spec = controller(docs)
        assert argv[0] == "flowbus", argv
        extra = (vals.get("controller") or {}).get("extraArgs", [])
        assert argv[8:] == extra  # flowbus up --config F --address A --broker B, then controller.extraArgs
        ns = _parser().parse_args(argv[1:])
        head_svc = f"{one(docs, 'RayCluster')['metadata']['name']}-head-svc"
        assert ns.cmd == "up"
        assert ns.config == "/etc/flowbus/flowbus.toml"
        assert ns.address == f"ray://{head_svc}.{NAMESPACE}.svc:10001"
        assert ns.broker == env_of(c)["FLOWBUS_ADDRESS"]
        # the shapes `flowbus up` checks before it connects (flowbus/_up.py, actors/_placement.py)
        assert re.fullmatch(r"tcp://[a-z0-9.-]+:\d+", ns.broker), ns.broker
        assert re.fullmatch(r"ray://[a-z0-9.-]+:\d+", ns.address), ns.address
        assert (ns.fresh, ns.demo, ns.duration, ns.json) == (False, False, None, "--json" in extra)
        # the file --config names is mounted from the ConfigMap and is a valid flowbus config
        _, key = mounted_file(spec, c, ns.config)
        cfg = parse_config(config_toml(docs, key), f"ConfigMap {key}")
        assert cfg.bus.host == ns.broker.removeprefix("tcp://").rpartition(":")[0]
        assert cfg.bus.request_port == int(ns.broker.rpartition(":")[2])

    def test_extra_args_reach_the_parser(self) -> None:
        """controller.extraArgs are appended to the command and parsed as `flowbus up` options; a bad one is refused."""
        argv, _, _ = controller(render({"controller": {"extraArgs": ["--json", "--duration", "30"]}}))
        ns = _parser().parse_args(argv[1:])
        assert (ns.cmd, ns.json, ns.duration) == ("up", True, 30.0)
        assert ns.address.startswith("ray://") and ns.broker.startswith("tcp://")
        argv, _, _ = controller(render({"controller": {"extraArgs": ["--no-such-flag"]}}))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
            _parser().parse_args(argv[1:])
        assert exc.value.code == 2 and "unrecognized arguments: --no-such-flag" in err.getvalue()

    @pytest.mark.timeout(120)
    def test_controller_joins_ray_with_the_secrets_token(self, tmp_path: Path) -> None:
        """With the controller's environment as rendered (RAY_AUTH_MODE, RAY_AUTH_TOKEN from the Secret), flowbus joins with that token and makes none of its own."""
        _, c, _ = controller(render())
        ref = env_refs(c)["RAY_AUTH_TOKEN"]["secretKeyRef"]
        secret = {ref["key"]: "4" * 64}  # what the kubelet puts in the variable from the Secret's key
        state = tmp_path / "state"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env.update(env_of(c))
        env.update({"RAY_AUTH_TOKEN": secret[ref["key"]], "FLOWBUS_STATE_DIR": str(state)})  # a writable state dir here
        code = ("import json, os\nfrom flowbus.actors import _ray\nfrom ray._raylet import AuthenticationTokenLoader as L\n"
                "src = _ray.use_ray_auth(keep_given=True)\n"
                "print(json.dumps([src, os.environ['RAY_AUTH_MODE'], L.instance().get_token_for_http_header()]))")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90,
                              close_fds=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout.splitlines()[-1]) == [
            "$RAY_AUTH_TOKEN", "token", {"authorization": "Bearer " + "4" * 64}]
        assert not (state / "ray" / "auth_token").exists()
