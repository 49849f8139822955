"""deploy/: every Kubernetes manifest validates offline against the Kubernetes schemas, the front's
ConfigMap is exactly what the command in deploy/README.md writes, the front Deployment and the
StatefulSet agree with it, and nginx accepts the configuration it holds.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import replace
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from plugin.cli import build_parser, main as cli_main
from plugin.protocol.tensors import CLIENT_HEADER
from plugin.serving import front
from tests.test_tls import certs  # noqa: F401 (fixture: a CA, a server and a client certificate)

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest with the preStop sleep action; the validator's newest


def _documents() -> list[dict]:
    return [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
            if doc is not None]


def _one(kind: str, name: str) -> dict:
    [doc] = [d for d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _readme_command() -> list[str]:
    """The `ce-collm front-config` command in deploy/README.md, as argv."""
    text = (DEPLOY / "README.md").read_text()
    block = re.search(r"```bash\n(ce-collm front-config .*?)\n```", text, re.S)
    assert block, "deploy/README.md lost its front-config command"
    return shlex.split(block.group(1).replace("\\\n", " "))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version):
    docs = _documents()
    assert {d["kind"] for d in docs} >= {"Namespace", "Service", "StatefulSet", "ConfigMap", "Deployment",
                                         "PodDisruptionBudget", "PersistentVolumeClaim", "NetworkPolicy"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any schema error or unknown field


def test_validation_refuses_a_broken_manifest():
    sts = _one("StatefulSet", "triton")
    sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/v2/health/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSIONS[-1], strict=True)


def test_front_configmap_is_what_the_command_writes(tmp_path):
    argv = _readme_command()
    assert argv[:2] == ["ce-collm", "front-config"] and argv[-2] == "--out"
    written = tmp_path / "front-config.yaml"
    assert cli_main([*argv[1:-2], "--out", str(written)]) == 0
    assert written.read_text() == (DEPLOY / "k8s" / "front-config.yaml").read_text()


def test_front_and_replicas_agree():
    sts, svc = _one("StatefulSet", "triton"), _one("Service", "triton")
    namespace = sts["metadata"]["namespace"]
    grpc_port = {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"]
    conf = _one("ConfigMap", "ce-collm-front")["data"]["nginx.conf"]
    # the front lists every replica by its stable pod name, in order, and only those
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == "triton"
    assert re.findall(r"^\s*server (\S+) ", conf, re.M) == [
        f"triton-{i}.triton.{namespace}.svc.cluster.local:{grpc_port}" for i in range(sts["spec"]["replicas"])]
    # the Deployment runs that file, with the TLS secret and a writable state folder where the config says
    pod = _one("Deployment", "ce-collm-front")["spec"]["template"]["spec"]
    [nginx] = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in nginx["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert nginx["command"][:3] == ["nginx", "-c", f"{mounts['config']}/nginx.conf"]
    assert volumes["config"]["configMap"]["name"] == "ce-collm-front"
    assert f"ssl_certificate {mounts['tls']}/tls.crt;" in conf and "emptyDir" in volumes["state"]
    assert f"pid {mounts['state']}/nginx.pid;" in conf
    assert f"listen 0.0.0.0:{nginx['ports'][0]['containerPort']} ssl http2;" in conf
    # each replica: a GPU, readiness on Triton's own endpoint, metrics scraped
    triton = sts["spec"]["template"]
    [server] = triton["spec"]["containers"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    # the front names the client it authenticated in the client header, and every replica hands it to the models
    assert f"grpc_set_header {CLIENT_HEADER} $remote_addr;" in conf
    assert f"--grpc-header-forward-pattern=^{CLIENT_HEADER}$" in server["command"]


def test_nginx_accepts_the_deployed_front_configuration(tmp_path, certs):  # noqa: F811
    """nginx -t on the ConfigMap's configuration, with what only exists in the cluster swapped for local
    stand-ins: replica names (loopback addresses), `resolve` (nginx >= 1.27.3; Debian's is 1.22), paths."""
    try:
        binary = front.find_nginx()
    except front.FrontError as e:
        pytest.fail(str(e))
    deployed = front.config_from_args(build_parser().parse_args(_readme_command()[1:-2]))
    local = replace(deployed, replicas=tuple(f"127.0.0.1:{9001 + i}" for i in range(len(deployed.replicas))),
                    resolver="", state_dir=tmp_path, access_log="", error_log="",
                    tls_cert=certs / "server.pem", tls_key=certs / "server.key")
    conf = tmp_path / "nginx.conf"
    conf.write_text(front.render(local))
    front.check_config(conf, binary)
    swapped = re.compile(r"(server|resolver|pid|\w+_temp_path|ssl_certificate(_key)?|error_log|access_log) ")
    changed = set(front.render(deployed).splitlines()) ^ set(conf.read_text().splitlines())
    assert changed and all(swapped.match(line.strip()) for line in changed), changed


def test_front_config_refuses_bad_input(capsys):
    assert cli_main(["front-config", "--replica", "a:1", "--replica", "a:1"]) == 2
    assert cli_main(["front-config", "--replica", "no-port"]) == 2
    assert cli_main(["front-config", "--replica", "a:1", "--client-ca", "ca.pem"]) == 2
    err = capsys.readouterr().err
    assert "listed twice" in err and "expected host:port" in err and "needs TLS" in err
