"""The python-backend side of every model.py: Triton requests <-> services.py, nothing else.

Imported only inside tritonserver's Python stub (triton_python_backend_utils exists there alone).
"""
from __future__ import annotations

import json
import threading
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from plugin.protocol.errors import ErrorCode, ProtocolError, tagged
from plugin.serving.services import RequestData, Service

CONTROLS = ("START", "END", "CORRID")
METRIC_HELP = {
    "sessions_live": "sequences whose state this model holds",
    "rows_uploaded_total": "layer-k hidden-state rows uploaded by edges",
    "pending_bytes": "bytes of uploaded rows waiting for a token request",
    "tokens_served_total": "tokens computed by this model",
    "layer_rows_computed_total": "rows x layers computed (catch-up rows included)",
    "kv_bytes": "bytes held in per-sequence KV caches",
    "verified_rows_total": "edge drafts the full model checked (verified mode, exit fidelity), by edge exit",
    "draft_agreements_total": "... that were the full model's greedy token, by edge exit",
}
METRIC_LABELS = {"verified_rows_total": "exit", "draft_agreements_total": "exit"}  # one series per label value


def sweep_period_s(ttl_s: float) -> float:
    """How often idle sessions are looked for between requests: a quarter of the TTL, in [0.25, 10] s."""
    return min(10.0, max(0.25, ttl_s / 4))


def _request_data(request) -> RequestData:
    tensors = {t.name(): t.as_numpy() for t in request.inputs()}
    controls = {name: tensors.pop(name, None) for name in CONTROLS}
    sequence_id = request.correlation_id()
    # A string sequence id reaches CORRID as 8 bytes of Triton's string object (measured: "fuzz" ->
    # 0x7A7A756600000004), so different strings can share a CORRID: keep the string, the wire refuses it.
    if not isinstance(sequence_id, str) and controls["CORRID"] is not None:
        sequence_id = int(controls["CORRID"].reshape(-1)[0])
    start = bool(controls["START"].reshape(-1)[0]) if controls["START"] is not None else bool(request.flags() & 1)
    end = bool(controls["END"].reshape(-1)[0]) if controls["END"] is not None else bool(request.flags() & 2)
    return RequestData({k: np.array(v, copy=True) for k, v in tensors.items()}, sequence_id, start, end)


def _error_response(result: ProtocolError):
    """A refusal answers with its code token in front of its sentence (plugin/protocol/errors.py)."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(tagged(result.code, str(result))))


class Adapter:
    """TritonPythonModel for one service class; errors become per-request TritonError responses."""

    service_class: type[Service]

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        root = Path(args["model_repository"]).resolve().parent
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        self.service = self.service_class(params, root, device)
        self.name = args["model_name"]
        self._metrics, self._families = {}, {}  # a Metric must not outlive its MetricFamily
        self._reported: dict[tuple[str, str | None], float] = {}
        for key in self.service.metrics():
            help_text = METRIC_HELP[key]
            kind = pb_utils.MetricFamily.COUNTER if key.endswith("_total") else pb_utils.MetricFamily.GAUGE
            self._families[key] = pb_utils.MetricFamily(name=f"ce_collm_{key}", description=help_text, kind=kind)
            if key not in METRIC_LABELS:
                self._metric(key, None)
        # Triton frees an idle sequence slot without calling the model (ENVIRONMENT.md), so the TTL
        # also runs on a timer: an edge that vanished is reclaimed even when no other request comes.
        self._lock = threading.Lock()  # execute() and the sweep never touch the service at once
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, args=(sweep_period_s(self.service.limits.ttl_s),),
                                         name=f"{self.name}-ttl-sweep", daemon=True)
        self._sweeper.start()

    def _sweep_loop(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            try:
                with self._lock:
                    if self.service.sweep():
                        self._report()
            except Exception:  # never let the sweeper die silently
                pb_utils.Logger.log_error(f"{self.name}: TTL sweep failed:\n{traceback.format_exc()}")

    def finalize(self) -> None:
        self._stop.set()
        self._sweeper.join(timeout=5)

    def execute(self, requests):
        with self._lock:
            return self._execute(requests)

    def _execute(self, requests):
        try:
            results = self.service.execute([_request_data(r) for r in requests])
        except Exception as e:  # a bug must fail these requests, not the model instance
            pb_utils.Logger.log_error(f"{self.name}: internal error, {len(requests)} request(s) failed:\n"
                                      + traceback.format_exc())
            bug = ProtocolError(ErrorCode.INTERNAL, f"{self.name}: internal error: {type(e).__name__}: {e}")
            results = [bug] * len(requests)
        responses = []
        for result in results:
            if isinstance(result, ProtocolError):
                responses.append(_error_response(result))
            else:
                tensors = [pb_utils.Tensor(name, value) for name, value in result.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        self._report()
        return responses

    def _metric(self, key: str, label: str | None):
        """The series of `key` (for one value of its METRIC_LABELS label), made on first use."""
        if (key, label) not in self._metrics:
            labels = {"model": self.name} if label is None else {"model": self.name, METRIC_LABELS[key]: label}
            self._metrics[(key, label)] = self._families[key].Metric(labels=labels)
        return self._metrics[(key, label)]

    def _report(self) -> None:
        for key, value in self.service.metrics().items():
            series = {str(label): v for label, v in value.items()} if isinstance(value, dict) else {None: value}
            for label, v in series.items():
                metric = self._metric(key, label)
                if key.endswith("_total"):
                    metric.increment(v - self._reported.get((key, label), 0))
                else:
                    metric.set(v)
                self._reported[(key, label)] = v


def model_class(service_class: type[Service]) -> type:
    """The TritonPythonModel class of a model.py that serves `service_class`."""
    return type("TritonPythonModel", (Adapter,), {"service_class": service_class})
