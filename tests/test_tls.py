"""TLS and client certificates on Triton's gRPC endpoint, and admin APIs behind a header key.

What the README's "Reliability and security" section tells operators to run, checked against a real
tritonserver (a numpy-only identity model: fast to load) with certificates made here by openssl:
  --grpc-use-ssl=true --grpc-server-cert=... --grpc-server-key=...          (TLS)
  --grpc-use-ssl-mutual=true ... --grpc-root-cert=ca.pem                    (clients need a certificate)
  and the admin APIs behind the launcher's secret, as every TritonServer starts (server.admin_headers)
and tritonclient.grpc.InferenceServerClient(url, ssl=True, root_certificates=..., private_key=...,
certificate_chain=...) on the edge.
With --allow-http=false the launcher's own readiness checks and stub healer go over gRPC, with TLS.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from plugin.serving.server import admin_headers
from tests.identity_model import write_identity_repository
from tests.test_healing import kill_stub, wait_for_heal

pytestmark = pytest.mark.server


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (apt-get install openssl): cannot make test certificates")
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ce-collm test CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=ce-collm {who}", "-keyout", f"{who}.key",
                 "-out", f"{who}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{who}.ext", "-out", f"{who}.pem", cwd=d)
    return d


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return write_identity_repository(tmp_path_factory.mktemp("identity-repo"))


def _infer(client) -> np.ndarray:
    x = np.arange(4, dtype=np.float32)
    inp = grpcclient.InferInput("IN", [4], "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("identity", [inp], client_timeout=10).as_numpy("OUT")


def _client(server, certs: Path, ssl: bool = True, client_cert: bool = False):
    """As an edge connects: TLS with the CA's certificate (file paths), optionally its own key and certificate."""
    return grpcclient.InferenceServerClient(
        server.grpc_url, ssl=ssl, root_certificates=str(certs / "ca.pem") if ssl else None,
        private_key=str(certs / "client.key") if client_cert else None,
        certificate_chain=str(certs / "client.pem") if client_cert else None,
    )


def test_tls_and_restricted_admin_apis(certs, repo, start_server):
    server = start_server(repo, extra_args=[
        "--exit-timeout-secs=3", "--grpc-use-ssl=true",
        f"--grpc-server-cert={certs / 'server.pem'}", f"--grpc-server-key={certs / 'server.key'}",
    ], admin_secret="s3cret-for-tests")
    np.testing.assert_array_equal(_infer(_client(server, certs)), np.arange(4, dtype=np.float32))
    with pytest.raises(InferenceServerException):  # plaintext gRPC does not get in
        _infer(_client(server, certs, ssl=False))
    client = _client(server, certs)
    with pytest.raises(InferenceServerException, match="This protocol is restricted"):
        client.get_model_repository_index()  # load/unload models: admins only
    with pytest.raises(InferenceServerException):
        client.get_system_shared_memory_status()  # registering shared memory: admins only
    # Triton expects the key as the header triton-grpc-protocol-<key> (measured with 2.51)
    assert client.get_model_repository_index(headers=admin_headers("s3cret-for-tests", grpc=True)) is not None


def test_mutual_tls_refuses_clients_without_a_certificate(certs, repo, start_server):
    server = start_server(repo, extra_args=[
        "--exit-timeout-secs=3", "--grpc-use-ssl-mutual=true", f"--grpc-root-cert={certs / 'ca.pem'}",
        f"--grpc-server-cert={certs / 'server.pem'}", f"--grpc-server-key={certs / 'server.key'}",
    ])
    np.testing.assert_array_equal(_infer(_client(server, certs, client_cert=True)), np.arange(4, dtype=np.float32))
    with pytest.raises(InferenceServerException):
        _infer(_client(server, certs, client_cert=False))


def test_with_http_off_readiness_and_healing_go_over_grpc_with_mutual_tls(certs, repo, start_server):
    """The README's recipe: mutual TLS and --allow-http=false. The launcher checks readiness (server, repository index)
    and heals a dead stub over gRPC, as a client of its own server with the server's certificate."""
    server = start_server(repo, heal_stubs=True, extra_args=[
        "--grpc-use-ssl-mutual=true", f"--grpc-root-cert={certs / 'ca.pem'}",
        f"--grpc-server-cert={certs / 'server.pem'}", f"--grpc-server-key={certs / 'server.key'}", "--allow-http=false",
    ])
    log = server.log_file.read_text()
    assert not server.http_enabled and "Started HTTPService" not in log and "Started GRPCInferenceService" in log
    assert [(m["name"], m["state"]) for m in server.repository_index()] == [("identity", "READY")]
    client = _client(server, certs, client_cert=True)
    np.testing.assert_array_equal(_infer(client), np.arange(4, dtype=np.float32))
    victim = kill_stub(server, "identity")
    heal = wait_for_heal(server, 0)
    assert (heal.model, heal.dead_pid) == ("identity", victim)
    np.testing.assert_array_equal(_infer(client), np.arange(4, dtype=np.float32))
    print(f"\nhttp off: ready and healed over gRPC with mutual TLS, the stub's model back after {heal.seconds:.1f} s")
