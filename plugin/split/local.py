"""The cloud in one process, for tests, the bench and recording sessions."""
from __future__ import annotations

from plugin.model.decoder import DecoderModel
from plugin.protocol.errors import ProtocolError
from plugin.protocol.messages import CloudReply, CloudRequest
from plugin.split.cloud import CloudPartition
from plugin.split.cloud_only import CloudOnly
from plugin.split.context import ContextManager
from plugin.split.limits import Limits


class LocalCloud:
    """Context manager -> cloud partition, chained as the `ce_collm` ensemble chains them, in one
    process: the in-process reference the Triton path must match token for token; and cloud-only beside
    them (`cloud_only`), which a model holding every layer serves."""

    def __init__(self, model: DecoderModel, limits: Limits | None = None):
        self.partition = CloudPartition(model, limits)
        # hidden rows start at layer 1 at the earliest (a model with every layer also serves cloud-only)
        self.context = ContextManager(model.cfg.hidden_size, model.cfg.num_layers, self.partition.limits,
                                      min_split_layer=max(1, model.layer_range.start), vocab_size=model.cfg.vocab_size)
        self.cloud_only = CloudOnly(model, limits)

    def send(self, req: CloudRequest) -> CloudReply:
        if req.token_ids is not None:
            reply = self.cloud_only.step([self.cloud_only.block(req)])[0]
        else:
            reply = self.partition.step([self.context.handle(req)])[0]
        if isinstance(reply, ProtocolError):
            raise reply
        return reply
