"""The edge's link to the `ce_collm` ensemble: tritonclient gRPC with sequence ids and START/END."""
from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from edge_runtime.link import CloudUnreachable
from plugin.protocol.errors import error_code, error_for, Recovery
from plugin.protocol.messages import CloudReply, CloudRequest
from plugin.protocol.tensors import SESSION_HEADER
from plugin.protocol.wire import reply_from_outputs, request_inputs


class TritonLink:
    """Sends CloudRequests through one model (`ce_collm`, or `cloud_only` for the baseline)."""

    def __init__(self, url: str, model: str = "ce_collm", timeout_s: float = 30.0, reconnect_backoff_ms: int = 500,
                 headers: dict[str, str] | None = None, **tls: bool | str | None):
        """tls: ssl, root_certificates, private_key, certificate_chain, as tritonclient's client takes them: TLS
        (and mutual TLS) to a server started with --grpc-use-ssl; headers: sent with every request (e.g. a token
        for an authenticating proxy). Every infer call also carries its sequence id in SESSION_HEADER: a front
        routes sessions on it."""
        self.url, self.model, self.timeout_s, self.headers = url, model, timeout_s, headers
        # gRPC's default reconnect backoff grows to minutes while the server is down; an edge
        # wants to notice within a second that the cloud is back.
        backoff = [("grpc.initial_reconnect_backoff_ms", reconnect_backoff_ms),
                   ("grpc.min_reconnect_backoff_ms", reconnect_backoff_ms),
                   ("grpc.max_reconnect_backoff_ms", reconnect_backoff_ms)]
        self.client = grpcclient.InferenceServerClient(url, channel_args=backoff, **tls)

    def send(self, req: CloudRequest) -> CloudReply:
        """Asks for no output by name, so the model returns every output it declares: PASS_MS where the model
        times its pass (not the TensorRT variant's ensemble), ROW_TOPK_* where it checks drafts (0 rows without)."""
        inputs = []
        for name, value in request_inputs(req).items():
            tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(np.ascontiguousarray(value))
            inputs.append(tensor)
        try:
            result = self.client.infer(self.model, inputs, sequence_id=req.sequence_id,
                                       sequence_start=req.start, sequence_end=req.end,
                                       client_timeout=self.timeout_s,
                                       headers={**(self.headers or {}), SESSION_HEADER: str(req.sequence_id)})
        except InferenceServerException as e:
            raise _translate(e) from None
        return reply_from_outputs({out.name: result.as_numpy(out.name) for out in result.get_response().outputs})

    def ready(self, timeout_s: float = 2.0) -> bool:
        """Whether the server answers and its model is ready (never raises)."""
        try:
            return self.client.is_model_ready(self.model, headers=self.headers, client_timeout=timeout_s)
        except InferenceServerException:
            return False

    def close(self) -> None:
        self.client.close()


def _translate(e: InferenceServerException) -> Exception:
    """The error's code (plugin/protocol/errors.py) decides the exception: CloudUnreachable while the cloud is
    not serving (a link that is down, a model being healed: Recovery.WAIT), SequenceNeedsStart when a re-sync
    helps, else ProtocolError carrying the code."""
    message, status = e.message() or str(e), e.status() or ""
    code = error_code(message, status)
    if code.recovery is Recovery.WAIT:
        return CloudUnreachable(f"{status}: {message}")
    return error_for(code, message)
