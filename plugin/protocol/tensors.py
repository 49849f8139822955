"""Tensor names of the wire protocol (the table is in messages.py and docs/protocol.md)."""
from __future__ import annotations
HIDDEN_INPUTS = {"fp32": "HIDDEN_FP32", "fp16": "HIDDEN_FP16", "int8": "HIDDEN_INT8"}
HIDDEN_SCALE = "HIDDEN_SCALE"
TOKEN_IDS = "TOKEN_IDS"
START_POS = "START_POS"
WANT_TOKEN = "WANT_TOKEN"
SPLIT_LAYER = "SPLIT_LAYER"
OUTPUTS = ("TOKEN_ID", "CONFIDENCE", "TOPK_IDS", "TOPK_LOGPROBS", "CATCHUP_ROWS")
TOP_K = 8


# Tensors between the ensemble's two steps (context_manager -> cloud_partition).
PENDING_HIDDEN = "PENDING_HIDDEN"
PENDING_START = "PENDING_START"
PENDING_SPLIT = "PENDING_SPLIT"
PENDING_WANT = "PENDING_WANT"

# gRPC metadata key in which the edge sends its sequence id on every request: a front that routes
# sessions to replicas hashes on it (plugin/serving/front.py, docs/scaling.md).
SESSION_HEADER = "ce-collm-session"
