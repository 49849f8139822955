"""The tensor table of the wire protocol: every tensor's name, dtype, dims and the models that carry it.

Everything else derives from TENSORS: the config.pbtxt inputs, outputs and ensemble maps
(plugin/serving/repository.py, trt_repository.py), the dtype and shape checks of wire.py, and the
tables of docs/protocol.md (plugin/protocol/docs.py writes them; tests/test_protocol.py compares).

Dims leave out the batch dimension (every request is a batch of one row): ROWS is the number of
rows of a block (ragged: it differs between the requests of a batch; -1 in config.pbtxt), DRAFTS the
number of drafted rows a request asks the cloud to check (also -1), HIDDEN the model's hidden size,
TOP_K_DIM the width of the top-k outputs, GROUPS_DIM the number of int8g scale groups per row
(ceil(D / codec.GROUP)).

The tensors marked `verification` carry verified mode and live exit fidelity (drafts checked by the
full model, rollbacks of rejected drafts): the TensorRT variant of cloud_partition computes the head
on the last row only, so its repository leaves them out (plugin/serving/trt_repository.py). So does it with
the tensor marked `timing` (PASS_MS): the python models time their own pass; an engine cannot report its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from plugin.protocol.codec import CODEC_DTYPES, GROUP, scale_columns

TOP_K = 8
ROWS, DRAFTS, HIDDEN, TOP_K_DIM, GROUPS_DIM = "n", "r", "D", "K", "G"

# the models of the repository that carry protocol tensors
ENSEMBLE, CONTEXT_MANAGER, CLOUD_PARTITION, CLOUD_ONLY = "ce_collm", "context_manager", "cloud_partition", "cloud_only"
_EDGE_FACING = (ENSEMBLE, CONTEXT_MANAGER)  # what edges send, and the step that receives it
_TOKEN_MODELS = (ENSEMBLE, CLOUD_PARTITION, CLOUD_ONLY)
_TRITON_TYPES = {"float32": "FP32", "float16": "FP16", "int8": "INT8", "int64": "INT64", "int32": "INT32",
                 "bool": "BOOL"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple[int | str, ...]  # without the batch dimension; ROWS, HIDDEN, TOP_K_DIM or a number
    inputs_of: tuple[str, ...] = ()  # models that take it
    outputs_of: tuple[str, ...] = ()  # models that return it
    optional: bool = False  # an input a request may leave out
    ragged: bool = False  # an input whose ROWS differ between the requests of one batch (allow_ragged_batch)
    meaning: str = ""
    verification: bool = False  # verified mode / exit fidelity: drafts, rollbacks, per-row verdicts
    timing: bool = False  # the python models' time of their own pass: the TensorRT variant leaves it out
    hop: str = ""  # the ensemble's hop of the pending rows it carries: "encoded" (python partition) or "decoded"

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def triton_dtype(self) -> str:
        """The dtype as tritonclient spells it (InferInput); config.pbtxt writes TYPE_ in front."""
        return _TRITON_TYPES[self.dtype]

    def config_dims(self, hidden_size: int) -> list[int]:
        """Dims for config.pbtxt."""
        sizes = {ROWS: -1, DRAFTS: -1, HIDDEN: hidden_size, TOP_K_DIM: TOP_K,
                 GROUPS_DIM: scale_columns("int8g", hidden_size)}
        return [sizes.get(d, d) for d in self.dims]


_HIDDEN_MEANINGS = {
    "fp32": "layer-k hidden states of positions [START_POS, START_POS + n); send exactly one HIDDEN_* input",
    "fp16": "the same rows as fp16 (rows beyond fp16's range are refused: use HIDDEN_FP16S)",
    "fp16s": "the same rows divided by HIDDEN_SCALE (a power of two per row), as fp16: any magnitude",
    "int8": "the same rows as int8, with HIDDEN_SCALE (per-row absmax)",
    "int8g": f"the same rows as int8, with HIDDEN_GROUP_SCALE (absmax per group of {GROUP} channels)",
}


@dataclass(frozen=True)
class RowTensors:
    """The tensors one block of encoded rows travels in: one per codec (a block uses one) and the scales of the
    codecs that scale. The edge's upload (HIDDEN_*) and the ensemble's internal hop (PENDING_*) are both this, so
    the rows cross the hop as they crossed the network."""

    prefix: str

    def data(self, codec: str) -> str:
        return f"{self.prefix}_{codec.upper()}"

    def scale(self, codec: str) -> str | None:
        """The tensor of the codec's float32 scale (None: the codec sends none)."""
        return {"int8": f"{self.prefix}_SCALE", "fp16s": f"{self.prefix}_SCALE",
                "int8g": f"{self.prefix}_GROUP_SCALE"}.get(codec)

    def specs(self, meanings: dict[str, str], **spec) -> list[TensorSpec]:
        """Its table entries; `meanings`: per codec, and "scale" and "group_scale"."""
        data = [TensorSpec(self.data(codec), np.dtype(dtype).name, (ROWS, HIDDEN), meaning=meanings[codec], **spec)
                for codec, dtype in CODEC_DTYPES.items()]
        return data + [TensorSpec(self.scale("int8"), "float32", (ROWS, 1), meaning=meanings["scale"], **spec),
                       TensorSpec(self.scale("int8g"), "float32", (ROWS, GROUPS_DIM), meaning=meanings["group_scale"],
                                  **spec)]


HIDDEN_ROWS, PENDING_ROWS = RowTensors("HIDDEN"), RowTensors("PENDING")
_UPLOAD = HIDDEN_ROWS.specs({
    **_HIDDEN_MEANINGS, "scale": "float32 scale of each HIDDEN_INT8 or HIDDEN_FP16S row",
    "group_scale": f"float32 scale of each group of {GROUP} channels of each HIDDEN_INT8G row"},
    inputs_of=_EDGE_FACING, optional=True, ragged=True)
_HOP = PENDING_ROWS.specs({
    **{codec: f"the session's pending rows (every row not computed yet) as {HIDDEN_ROWS.data(codec)} carried them: "
              "the one of the session's codec holds them, the others 0 rows (all 0 rows for an upload)"
       for codec in CODEC_DTYPES},
    "scale": "their scale, as HIDDEN_SCALE (0 rows for the codecs without)",
    "group_scale": "their scale, as HIDDEN_GROUP_SCALE (0 rows for the codecs without)"},
    inputs_of=(CLOUD_PARTITION,), outputs_of=(CONTEXT_MANAGER,), ragged=True, hop="encoded")

TENSORS: dict[str, TensorSpec] = {t.name: t for t in [
    *_UPLOAD,
    TensorSpec("TOKEN_IDS", "int64", (ROWS,), (CLOUD_ONLY,), ragged=True,
               meaning="token ids of positions [START_POS, START_POS + n), for the cloud-only baseline"),
    TensorSpec("START_POS", "int64", (1,), (*_EDGE_FACING, CLOUD_ONLY),
               meaning="position of the first row; must equal the number of positions the cloud holds"),
    TensorSpec("WANT_TOKEN", "bool", (1,), (*_EDGE_FACING, CLOUD_ONLY),
               meaning="false: upload only, the cloud stores the rows and computes nothing"),
    TensorSpec("SPLIT_LAYER", "int32", (1,), _EDGE_FACING, optional=True,
               meaning="required with START: the edge's split layer k (edges may differ)"),
    TensorSpec("CONTEXT_ROWS", "int64", (1,), _EDGE_FACING, optional=True,
               meaning="with START: the positions of the context the edge is about to send (all its blocks): a "
                       "context over the cloud's max_context is refused LIMIT_EXCEEDED at once, before the rest "
                       "is uploaded"),
    TensorSpec("SESSION_KEY", "int64", (1,), (*_EDGE_FACING, CLOUD_ONLY), optional=True,
               meaning="the session's random key in [1, 2^63), drawn by the edge: sent with START and every later "
                       "request; missing or not the session's: refused with SESSION_KEY (optional for Triton only, "
                       "so that the model answers with that code)"),
    TensorSpec("DRAFT_TOKENS", "int64", (DRAFTS,), _EDGE_FACING, optional=True, ragged=True, verification=True,
               meaning="the edge's guess of the next token after each of the last r rows of the context once this "
                       "request's rows are in (1 <= r <= rows this request computes; needs WANT_TOKEN): the reply "
                       "gives the full model's top-K after each of them (ROW_TOPK_*)"),
    TensorSpec("DRAFT_EXITS", "int32", (DRAFTS,), _EDGE_FACING, optional=True, ragged=True, verification=True,
               meaning="with DRAFT_TOKENS, same width: the edge exit layer each guess came from, in [1, split layer], "
                       "or 0 for a guess looked up in the sequence's own tokens (the per-exit agreement counters)"),
    TensorSpec("ROLLBACK_TO", "int64", (1,), _EDGE_FACING, optional=True, verification=True,
               meaning="before this request's rows, drop every position >= ROLLBACK_TO (rows of rejected drafts); "
                       "valid only in the request right after one with DRAFT_TOKENS, between its first drafted row + 1 "
                       "and the next position, and START_POS must equal it"),
    # between the ensemble's two steps (context_manager -> cloud_partition); edges never see them
    *_HOP,
    TensorSpec("PENDING_HIDDEN", "float32", (ROWS, HIDDEN), outputs_of=(CONTEXT_MANAGER,), hop="decoded",
               meaning="the TensorRT variant's hop instead of PENDING_FP32 ... PENDING_GROUP_SCALE: the pending rows "
                       "decoded, for the engine's float hidden_in (plugin/serving/trt_repository.py)"),
    TensorSpec("PENDING_START", "int64", (1,), (CLOUD_PARTITION,), (CONTEXT_MANAGER,),
               meaning="position of the first pending row"),
    TensorSpec("PENDING_SPLIT", "int32", (1,), (CLOUD_PARTITION,), (CONTEXT_MANAGER,),
               meaning="the session's split layer"),
    TensorSpec("PENDING_WANT", "bool", (1,), (CLOUD_PARTITION,), (CONTEXT_MANAGER,),
               meaning="WANT_TOKEN of the request"),
    TensorSpec("PENDING_KEY", "int64", (1,), (CLOUD_PARTITION,), (CONTEXT_MANAGER,),
               meaning="the session's SESSION_KEY, checked by the context manager: the partition binds its state to "
                       "it at START and checks it on every block, so a client that calls cloud_partition itself "
                       "cannot touch a session without its key"),
    TensorSpec("PENDING_DRAFTS", "int64", (DRAFTS,), (CLOUD_PARTITION,), (CONTEXT_MANAGER,), ragged=True,
               verification=True, meaning="DRAFT_TOKENS of the request, validated; 0 wide without"),
    TensorSpec("PENDING_DRAFT_EXITS", "int32", (DRAFTS,), (CLOUD_PARTITION,), (CONTEXT_MANAGER,), ragged=True,
               verification=True, meaning="DRAFT_EXITS of the request, validated; 0 wide without"),
    TensorSpec("PENDING_ROLLBACK", "int64", (1,), (CLOUD_PARTITION,), (CONTEXT_MANAGER,), verification=True,
               meaning="ROLLBACK_TO of the request, validated (the partition drops its KV from there first); -1 without"),
    TensorSpec("TOKEN_ID", "int64", (1,), outputs_of=_TOKEN_MODELS,
               meaning="the full model's greedy token, or -1 for an upload-only request"),
    TensorSpec("CONFIDENCE", "float32", (1,), outputs_of=_TOKEN_MODELS, meaning="its softmax probability"),
    TensorSpec("TOPK_IDS", "int64", (TOP_K_DIM,), outputs_of=_TOKEN_MODELS,
               meaning="the cloud's K best tokens, padded with -1; edges that sample choose among them"),
    TensorSpec("TOPK_LOGPROBS", "float32", (TOP_K_DIM,), outputs_of=_TOKEN_MODELS,
               meaning="their log-probabilities, padded with -inf"),
    TensorSpec("CATCHUP_ROWS", "int32", (1,), outputs_of=_TOKEN_MODELS,
               meaning="rows the cloud computed for this request (the pending block, catch-up included)"),
    TensorSpec("PASS_MS", "float32", (1,), outputs_of=_TOKEN_MODELS, timing=True,
               meaning="milliseconds of the forward pass that computed this request's rows (with the other requests "
                       "of its batch): compute it waited for, not queueing; 0 for an upload-only request. The "
                       "TensorRT variant's ensemble does not declare it (its engine cannot time itself)"),
    TensorSpec("ROW_TOPK_IDS", "int64", (DRAFTS, TOP_K_DIM), outputs_of=(ENSEMBLE, CLOUD_PARTITION), verification=True,
               meaning="the full model's K best tokens after each row DRAFT_TOKENS named (its greedy token first), "
                       "padded with -1; 0 rows without DRAFT_TOKENS"),
    TensorSpec("ROW_TOPK_LOGPROBS", "float32", (DRAFTS, TOP_K_DIM), outputs_of=(ENSEMBLE, CLOUD_PARTITION),
               verification=True, meaning="their log-probabilities, padded with -inf"),
]}


def inputs_of(model: str) -> list[TensorSpec]:
    return [t for t in TENSORS.values() if model in t.inputs_of]


def outputs_of(model: str, decoded_hop: bool = False) -> list[TensorSpec]:
    """decoded_hop: the context manager of the TensorRT variant, which hands the pending rows on decoded."""
    skipped = "encoded" if decoded_hop else "decoded"
    return [t for t in TENSORS.values() if model in t.outputs_of and t.hop != skipped]


TOKEN_IDS = "TOKEN_IDS"
START_POS = "START_POS"
WANT_TOKEN = "WANT_TOKEN"
SPLIT_LAYER = "SPLIT_LAYER"
SESSION_KEY = "SESSION_KEY"
CONTEXT_ROWS = "CONTEXT_ROWS"
DRAFT_TOKENS, DRAFT_EXITS, ROLLBACK_TO = "DRAFT_TOKENS", "DRAFT_EXITS", "ROLLBACK_TO"
PENDING_HIDDEN, PENDING_START, PENDING_SPLIT, PENDING_WANT = "PENDING_HIDDEN", "PENDING_START", "PENDING_SPLIT", "PENDING_WANT"
PENDING_KEY = "PENDING_KEY"
PENDING_DRAFTS, PENDING_DRAFT_EXITS, PENDING_ROLLBACK = "PENDING_DRAFTS", "PENDING_DRAFT_EXITS", "PENDING_ROLLBACK"
OUTPUTS = tuple(t.name for t in outputs_of(ENSEMBLE) if not (t.verification or t.timing))  # every variant answers
TOKEN_ID, CONFIDENCE, TOPK_IDS, TOPK_LOGPROBS, CATCHUP_ROWS = OUTPUTS
ROW_OUTPUTS = tuple(t.name for t in outputs_of(ENSEMBLE) if t.verification)  # ... and a request with drafts too
ROW_TOPK_IDS, ROW_TOPK_LOGPROBS = ROW_OUTPUTS
PASS_MS = "PASS_MS"

# gRPC metadata key in which the edge sends its sequence id on every request: a front that routes
# sessions to replicas hashes on it (plugin/serving/front.py, docs/scaling.md).
SESSION_HEADER = "ce-collm-session"

# gRPC metadata key in which a front names the client it authenticated (its certificate, token or address),
# set by the front over whatever the client sent: Triton hands it to the models as a request parameter
# (--grpc-header-forward-pattern), and they share sessions and bytes of state per client (plugin/split/limits.py).
CLIENT_HEADER = "ce-collm-client"
