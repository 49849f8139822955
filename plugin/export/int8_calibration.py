"""int8 calibration of the engines: each graph's inputs computed with the PyTorch layer loop, and the entropy
calibrator TensorRT reads them from (device copies made with torch). Only an int8 build imports this: fp16 and
fp32 engines build with TensorRT, numpy and the exported graphs alone (on a Jetson, without PyTorch)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from plugin.export.manifest import GraphSpec
from plugin.model.decoder import DecoderModel


@torch.inference_mode()
def calibration_feeds(model: DecoderModel, spec: GraphSpec, tokens: np.ndarray, kv_dtype=np.float16) -> list[dict]:
    """One feed per token block: the graph's inputs for a prefill from an empty cache."""
    cfg = model.cfg
    feeds = []
    for block in tokens:
        ids = torch.from_numpy(block)[None]  # [1, T]
        positions = torch.arange(ids.shape[1])[None]
        feed = {"start_pos": np.zeros((1, 1), np.int64)}
        if spec.first_layer == 0:
            feed["input_ids"] = ids.numpy()
        else:
            seq = model.new_sequence(0, spec.first_layer)
            h = model.run_layers(model.embed_tokens(ids, positions), positions, 0, spec.first_layer, [seq])
            feed["hidden_in"] = h.float().numpy()
        for name in spec.inputs:
            if name.startswith("past_"):
                feed[name] = np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), kv_dtype)
        feeds.append(feed)
    return feeds


def entropy_calibrator(trt, feeds: list[dict], cache: Path | None):
    """An entropy calibrator over precomputed feeds (device copies made with torch)."""

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.feeds, self.index, self.buffers = feeds, 0, {}

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names):
            if self.index >= len(self.feeds):
                return None
            feed = self.feeds[self.index]
            self.index += 1
            self.buffers = {n: torch.from_numpy(np.ascontiguousarray(feed[n])).cuda() for n in names}
            return [t.data_ptr() if t.numel() else torch.empty(1, device="cuda").data_ptr() for t in self.buffers.values()]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache is not None and cache.is_file() else None

        def write_calibration_cache(self, data) -> None:
            if cache is not None:
                cache.write_bytes(bytes(data))

    return Calibrator()
