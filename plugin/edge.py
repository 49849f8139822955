"""The edge partition: layers [0, k) run segment by segment, with an exit decision at each exit."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .decoder import DecoderModel, confidence
from .kv_store import PendingRows, SequenceKV
from .plan import PartitionPlan
from .sampling import Sampler


@dataclass(frozen=True)
class ExitPolicy:
    """Exit when confident; a threshold of 1.0 never exits (a saturated softmax rounds to 1.0)."""

    threshold: float
    local_only: bool = False  # standalone: the last edge exit emits even when not confident

    def exits(self, conf: float, is_last_exit: bool) -> bool:
        if is_last_exit and self.local_only:
            return True
        return self.threshold < 1.0 and conf >= self.threshold


@dataclass
class EdgeStep:
    token_id: int | None = None  # set when the token exited on the edge
    exit_layer: int | None = None
    confidences: list[tuple[int, float]] = field(default_factory=list)  # (exit layer, confidence) seen
    split_rows: PendingRows | None = None  # rows that reached the split in this step: the cloud's input
    rows_by_layer: dict[int, int] = field(default_factory=dict)  # rows computed per layer in this step
    last_exit_hidden: torch.Tensor | None = None  # [D] at the last exit: the edge's answer if the cloud fails


class EdgePartition:
    def __init__(self, model: DecoderModel, plan: PartitionPlan):
        plan.check_depth(model.cfg.num_layers)
        if model.layer_range.start != 0 or model.layer_range.stop < plan.split_layer:
            raise ValueError(f"the edge needs layers [0, {plan.split_layer}), the model holds {model.layer_range}")
        self.model, self.plan = model, plan

    def new_sequence(self) -> SequenceKV:
        return self.model.new_sequence(0, self.plan.split_layer)

    @torch.inference_mode()
    def step(self, seq: SequenceKV, token_ids: list[int], start_pos: int, policy: ExitPolicy,
             sampler: Sampler) -> EdgeStep:
        """Run a block (a prompt, or one new token) from the embeddings up to where it stops.

        At every boundary the rows waiting there are put in front of the block, so the layers
        they skipped are filled before any later token attends to them.
        """
        model, out = self.model, EdgeStep()
        ids = torch.tensor([token_ids], dtype=torch.long, device=model.device)  # [1, T]
        start = start_pos
        h = model.embed_tokens(ids, _positions(start, len(token_ids), model.device))[0]  # [T, D]
        layer, last_exit = 0, self.plan.exit_layers[-1]
        for boundary in self.plan.boundaries:
            waiting = seq.take_pending(layer)
            if waiting is not None:
                h, start = torch.cat([waiting.hidden, h]), waiting.start
            positions = _positions(start, h.shape[0], model.device)
            h = model.run_layers(h[None], positions, layer, boundary, [seq])[0]
            out.rows_by_layer.update({i: h.shape[0] for i in range(layer, boundary)})
            layer = boundary
            if boundary == self.plan.split_layer:
                out.split_rows = PendingRows(start, h)
            if boundary not in self.plan.exit_layers:
                continue
            if boundary == last_exit:
                out.last_exit_hidden = h[-1]
            logits = model.exit_logits(h[-1], boundary)  # [V]
            conf = float(confidence(logits)[0])
            out.confidences.append((boundary, conf))
            if policy.exits(conf, boundary == last_exit):
                out.token_id, out.exit_layer = sampler.pick(logits), boundary
                if boundary != self.plan.split_layer:  # rows at the split belong to the cloud
                    seq.add_pending(boundary, start, h)
                return out
        return out


def _positions(start: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + n, device=device)[None]  # [1, n]
