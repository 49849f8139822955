"""The reference segment runner: the project's own PyTorch layer loop (`DecoderModel`), for development and the
exactness tests. Rows and logits leave it as numpy arrays (`plugin.split.edge`'s seam); on the CPU in fp32 that
costs no copy, and a float32 round trip of bf16/fp16 rows is exact."""
from __future__ import annotations

import numpy as np
import torch

from plugin.model.decoder import DecoderModel, exit_decision
from plugin.model.kv import SequenceKV
from plugin.split.edge import ExitOutput, SegmentOutput


class TorchRunner:
    """The plan's edge layers in `DecoderModel`, on its device and in its dtype."""

    kind = "torch"

    def __init__(self, model: DecoderModel, layers: range | None = None):
        self.model = model
        self.layers = layers if layers is not None else model.layer_range
        if self.layers.start < model.layer_range.start or self.layers.stop > model.layer_range.stop:
            raise ValueError(f"runner layers {self.layers} outside the model's {model.layer_range}")
        self.hidden_size, self.num_layers = model.cfg.hidden_size, model.cfg.num_layers

    def new_sequence(self) -> SequenceKV:
        return self.model.new_sequence(self.layers.start, self.layers.stop)

    @torch.inference_mode()
    def run(self, first_layer: int, last_layer: int, x: np.ndarray, start_pos: int, state: SequenceKV,
            exit_layer: int | None) -> SegmentOutput:
        model = self.model
        positions = torch.arange(start_pos, start_pos + x.shape[0], device=model.device)[None]  # [1, T]
        block = torch.from_numpy(x).to(model.device)
        if first_layer == 0:
            h = model.embed_tokens(block[None], positions)  # [1, T, D]
        else:
            h = block.to(model.dtype)[None]  # [1, T, D]
        h = model.run_layers(h, positions, first_layer, last_layer, [state])[0]  # [T, D]
        rows = _host(h)
        if exit_layer is None:
            return SegmentOutput(rows, None)
        logits = model.exit_logits(h[-1], exit_layer).float()  # [V], or [S + 1] for a shortlist head
        return SegmentOutput(rows, _exit_output(logits, model.exit_token_ids(exit_layer)))

    @torch.inference_mode()
    def exit_logits(self, hidden_row: np.ndarray, layer: int) -> np.ndarray:
        row = torch.from_numpy(hidden_row).to(self.model.device, self.model.dtype)
        return _host(self.model.exit_logits(row, layer))


def _exit_output(logits: torch.Tensor, token_ids: torch.Tensor | None) -> ExitOutput:
    """The seam's ExitOutput from an exit head's logits ([V], or a shortlist head's [S + 1])."""
    conf, token = exit_decision(logits, token_ids)
    ids = None if token_ids is None else token_ids.cpu().numpy()
    return ExitOutput(_host(logits if token_ids is None else logits[:-1]), float(conf), int(token), ids)


def _host(t: torch.Tensor) -> np.ndarray:
    """float32 numpy on the CPU: no copy for a CPU fp32 tensor."""
    return t.float().cpu().numpy()
