"""The cloud in one process, for tests, the bench and recording sessions."""
from __future__ import annotations

from plugin.model.decoder import DecoderModel
from plugin.protocol.errors import ProtocolError
from plugin.protocol.messages import CloudReply, CloudRequest
from plugin.split.cloud import CloudPartition, token_block
from plugin.split.context import ContextManager
from plugin.split.limits import Limits


class LocalCloud:
    """Context manager -> cloud partition, chained as the `ce_collm` ensemble chains them, in one
    process: the in-process reference the Triton path must match token for token."""

    def __init__(self, model: DecoderModel, limits: Limits | None = None):
        self.partition = CloudPartition(model, limits)
        # hidden rows start at layer 1 at the earliest (a model with every layer also serves cloud-only)
        self.context = ContextManager(model.cfg.hidden_size, model.cfg.num_layers, self.partition.limits,
                                      min_split_layer=max(1, model.layer_range.start), vocab_size=model.cfg.vocab_size)

    def send(self, req: CloudRequest) -> CloudReply:
        if req.token_ids is not None:
            block = token_block(req, self.partition.model.cfg.vocab_size, self.partition.limits)
        else:
            block = self.context.handle(req)
        reply = self.partition.step([block])[0]
        if isinstance(reply, ProtocolError):
            raise reply
        return reply
