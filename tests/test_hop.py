"""The ensemble's internal hop (context_manager -> cloud_partition) carries the rows as the edge encoded them:
its bytes are the encoded bytes, not fp32's, and the partition's token is the one it computes from the rows
decoded in one place (before this, the context manager widened them to fp32 for the hop)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from plugin.model.checkpoint import load_model, read_config
from plugin.protocol.codec import encode, to_array
from plugin.protocol.messages import CloudRequest, PendingBlock
from plugin.protocol.tensors import TENSORS
from plugin.protocol.wire import reply_from_outputs, request_inputs
from plugin.serving.services import CloudPartitionService, ContextManagerService, RequestData
from plugin.split.cloud import CloudPartition
from tests.tiny_models import LAYERS, save_tiny

SPLIT = 3
KEY = 0x40B
HOP_ROWS = [t.name for t in TENSORS.values() if t.hop == "encoded"]  # the tensors that carry the pending rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_tiny("llama", ckpt)
    return ckpt


def _through(manager: ContextManagerService, partition: CloudPartitionService, req: CloudRequest):
    """One request as the Triton adapter hands it to each step: the context manager's output tensors, and the
    partition's reply computed from them."""
    [handed] = manager.execute([RequestData(request_inputs(req), req.sequence_id, req.start, req.end)])
    [answer] = partition.execute([RequestData(handed, req.sequence_id, req.start, req.end)])
    return handed, reply_from_outputs(answer)


def _hop_bytes(tensors: dict[str, np.ndarray]) -> int:
    return sum(tensors[name].nbytes for name in HOP_ROWS)


@pytest.mark.parametrize("codec", ["fp16", "int8", "int8g"])
def test_the_hop_carries_the_encoded_bytes(tiny, codec):
    params = {"checkpoint": str(tiny), "min_split_layer": str(SPLIT)}
    manager, partition = ContextManagerService(params, tiny.parent), CloudPartitionService(params, tiny.parent)
    hidden = torch.randn(5, read_config(tiny).hidden_size, generator=torch.Generator().manual_seed(1))
    uploaded, asked = encode(hidden[:3], codec), encode(hidden[3:], codec)  # one block from two requests
    handed, reply = _through(manager, partition, CloudRequest(4, 0, False, rows=uploaded, split_layer=SPLIT,
                                                              start=True, session_key=KEY))
    assert _hop_bytes(handed) == 0 and reply.token_id == -1  # an upload stays in the context manager
    handed, reply = _through(manager, partition, CloudRequest(4, 3, True, rows=asked, session_key=KEY))
    encoded = uploaded.nbytes + asked.nbytes  # what crossed the network: the HIDDEN_* and scale inputs
    assert _hop_bytes(handed) == encoded < hidden.numel() * 4
    print(f"\n{codec}: {_hop_bytes(handed)} bytes on the hop for 5 rows of {hidden.shape[1]} "
          f"(fp32: {hidden.numel() * 4})")
    # the partition decodes the block once: the token of the same rows handed over decoded to fp32, as before
    decoded = torch.cat([torch.from_numpy(to_array(uploaded)), torch.from_numpy(to_array(asked))])
    reference = CloudPartition(load_model(tiny, range(SPLIT, LAYERS))).step([PendingBlock(
        4, SPLIT, 0, decoded, True, start=True, session_key=KEY)])[0]
    assert reply.catchup_rows == 5 and (reply.token_id, reply.topk_ids) == (reference.token_id, reference.topk_ids)
