"""The python-backend side of every model.py: Triton requests <-> services.py, nothing else.

Imported only inside tritonserver's Python stub (triton_python_backend_utils exists there alone).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import threading
import traceback
from pathlib import Path

import triton_python_backend_utils as pb_utils

from plugin.protocol.errors import ProtocolError, tagged
from plugin.protocol.tensors import CLIENT_HEADER
from plugin.serving.services import error_answer, RequestData, Result, Service

CONTROLS = ("START", "END", "CORRID")
METRIC_HELP = {
    "sessions_live": "sequences whose state this model holds",
    "rows_uploaded_total": "layer-k hidden-state rows uploaded by edges",
    "pending_bytes": "bytes of uploaded rows waiting for a token request",
    "tokens_served_total": "tokens computed by this model",
    "layer_rows_computed_total": "rows x layers computed (catch-up rows included)",
    "kv_bytes": "bytes held in per-sequence KV caches",
    "state_budget_bytes": "bytes of session state (KV caches + pending rows) this model may hold (max_state_bytes)",
    "memory_refusals_total": "requests refused because the session state would pass the byte budget",
    "verified_rows_total": "edge drafts the full model checked (verified mode, exit fidelity), by edge exit",
    "draft_agreements_total": "... that were the full model's greedy token, by edge exit",
}
METRIC_LABELS = {"verified_rows_total": "exit", "draft_agreements_total": "exit"}  # one series per label value
TRIM_AFTER_BYTES = 1 << 20  # a batch that moved this much input, or ended sessions, returns freed memory


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
    return RequestData(tensors, sequence_id, start, end, _client(request))  # views of the request's buffers


def _client(request) -> str:
    """Who sent the request, as the front named it (CLIENT_HEADER, forwarded by Triton as a request parameter)."""
    parameters = json.loads(request.parameters() or "{}")
    return str(parameters.get(CLIENT_HEADER, ""))


def _release_freed_memory() -> None:
    """Give the memory that freed sessions and requests left in glibc's heap back to the system.

    glibc serves an allocation below its mmap threshold from the heap, and the threshold rises to the size
    of the largest block freed so far (up to 32 MiB), so after a few large requests their memory stays in
    the heap when freed, counted in the stub's resident set. malloc_trim(0) returns the free pages (measured:
    19 ms for 480 MiB, 0.1 ms when there is nothing to return). Not glibc: nothing to do."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)


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
        # Triton frees an idle sequence slot without calling the model (docs/triton-facts.md), so the TTL
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
                        _release_freed_memory()
            except Exception:  # never let the sweeper die silently
                pb_utils.Logger.log_error(f"{self.name}: TTL sweep failed:\n{traceback.format_exc()}")

    def finalize(self) -> None:
        self._stop.set()
        self._sweeper.join(timeout=5)

    def execute(self, requests):
        with self._lock:
            return self._execute(requests)

    def _execute(self, requests):
        batch = [_request_data(r) for r in requests]
        try:
            results = self.service.execute(batch)
        except Exception as e:  # a bug outside any one request must fail these requests, not the model instance
            results = [error_answer(e, f"{self.name}: ")] * len(requests)
        self._log_failures(results, len(requests))
        responses = [_error_response(result) if isinstance(result, ProtocolError)
                     else pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, v) for n, v in result.items()])
                     for result in results]
        self._report()
        moved = sum(value.nbytes for r in batch for value in r.inputs.values())
        if moved >= TRIM_AFTER_BYTES or any(r.end for r in batch):
            _release_freed_memory()
        return responses

    def _log_failures(self, results: list[Result], batch_size: int) -> None:
        """Each failure's traceback once, in one log record (a batch-wide failure answers all its requests)."""
        failures = {id(r): r for r in results if isinstance(r, ProtocolError) and r.details}
        for failure in failures.values():
            answered = sum(r is failure for r in results)
            pb_utils.Logger.log_error(f"{self.name}: {failure} ({answered} of {batch_size} request(s) of the batch):\n"
                                      + failure.details)

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
