"""Attacks of a hostile client on a default server, each refused (docs/security.md).

Every test here is an attack that worked before the fix it names: a client loading its own Python into
the server, a client calling an internal model with a live sequence id but not its key, a client
filling the session table or Triton's sequence slots so that nobody else gets in.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from plugin.serving.server import admin_headers
from tests.identity_model import write_identity_repository

pytestmark = pytest.mark.server

EVIL_MODEL = """import pathlib
pathlib.Path({marker!r}).write_text("client code ran in the server")


class TritonPythonModel:
    def execute(self, requests):
        return []
"""
EVIL_CONFIG = json.dumps({"name": "evil", "backend": "python", "max_batch_size": 0,
                          "input": [{"name": "IN", "data_type": "TYPE_FP32", "dims": [1]}],
                          "output": [{"name": "OUT", "data_type": "TYPE_FP32", "dims": [1]}]})


@pytest.fixture(scope="module")
def healing_server(tmp_path_factory, start_server):
    """What `ce-collm serve` runs by default: the healer on, so Triton is in model-control mode explicit."""
    repo = write_identity_repository(tmp_path_factory.mktemp("identity-repo"))
    return start_server(repo, heal_stubs=True)


def test_no_client_loads_its_own_code_or_unloads_a_model(healing_server, tmp_path):
    server = healing_server
    marker = tmp_path / "pwned"
    files = {"file:1/model.py": EVIL_MODEL.format(marker=str(marker)).encode()}
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    http = httpclient.InferenceServerClient(server.http_url)
    for client in (grpc, http):
        with pytest.raises(InferenceServerException, match="restricted"):
            client.load_model("evil", config=EVIL_CONFIG, files=files)
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model("identity")
        with pytest.raises(InferenceServerException, match="restricted"):
            client.register_system_shared_memory("peek", "/ce_collm_anything", 64)
    assert not marker.exists()
    assert grpc.is_model_ready("identity") and not grpc.is_model_ready("evil")
    # the launcher, with its secret, still reaches the API (its healer uses it)
    assert {m["name"] for m in server.repository_index()} == {"identity"}


def test_admin_apis_need_the_launchers_secret_not_any(healing_server):
    url = f"http://{healing_server.http_url}/v2/repository/index"
    for headers in ({}, admin_headers("guessed"), {"triton-grpc-protocol-ce-collm-admin": healing_server.admin_secret}):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, data=b"{}", headers=headers), timeout=10)
        assert refused.value.code == 403
    grpc = grpcclient.InferenceServerClient(healing_server.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        grpc.get_model_repository_index(headers=admin_headers(healing_server.admin_secret))  # the HTTP spelling
    assert grpc.get_model_repository_index(headers=admin_headers(healing_server.admin_secret, grpc=True)) is not None
    assert healing_server.admin_secret not in " ".join(healing_server.command(shown=True))
