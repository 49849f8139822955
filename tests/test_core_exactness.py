"""The core's first promise: early exit never changes what the cloud computes.

1. Threshold 1.0 through edge + context manager + cloud == Hugging Face greedy generate.
2. With exits forced or mixed, once pending rows are flushed, every layer's K/V equals a
   full-model forward over the same tokens; breaking the catch-up breaks this test.
Each on tiny random Llama, GPT-2, Gemma 3 (local + global layers), Llama 3 rope, Mistral (sliding
window), Qwen3 (q/k norms per head, local + global layers) and OLMo 2 (output norms, q/k norms over all
heads) checkpoints; the prompts and tokens cross the sliding windows many times.
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from edge_runtime.cloud_only import CloudOnlySession
from edge_runtime.session import DecodingSession
from edge_runtime.torch_runner import TorchRunner
from plugin.model.checkpoint import load_model
from plugin.model.kv import LayerKV, SequenceKV
from plugin.model.rows import BoundaryRows, PositionError
from plugin.split.edge import EdgePartition
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan
from tests.tiny_models import KINDS, LAYERS, save_tiny

PROMPTS = [[5, 17, 33, 2, 71], [90, 4, 4, 12, 61, 8, 30, 55, 1], [42]]


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny(request.param, path)
    return path, hf


def _pipeline(path, dtype, threshold, codec="fp32", split=4, exits=(1, 3, 4)):
    plan = PartitionPlan(checkpoint=path, split_layer=split, exit_layers=exits, threshold=threshold, codec=codec)
    edge = EdgePartition(TorchRunner(load_model(path, range(0, split), dtype=dtype)), plan)
    cloud = LocalCloud(load_model(path, range(split, LAYERS), dtype=dtype))
    return edge, cloud


def test_threshold_one_equals_hf_greedy(tiny):
    path, hf = tiny
    hf = hf.to(torch.float64)
    edge, cloud = _pipeline(path, torch.float64, threshold=1.0)
    for sid, prompt in enumerate(PROMPTS, start=1):
        expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=64, min_new_tokens=64)
        expected = expected[0, len(prompt):].tolist()
        gen = DecodingSession(edge, cloud, "collaborative", threshold=1.0, sequence_id=sid).generate(prompt, 64)
        assert gen.token_ids == expected
        assert set(gen.exits()) == {"cloud"}
    assert not cloud.context.sessions and not cloud.partition.sequences  # END freed both


def _decode_then_flush(edge, cloud, threshold, prompt, n_new):
    """Decode n_new tokens at `threshold`, then one token at 1.0 that carries every pending row."""
    gen = DecodingSession(edge, cloud, "collaborative", threshold=threshold, sequence_id=7)
    tokens, block, pos, exits = list(prompt), list(prompt), 0, []
    for i in range(n_new + 1):
        if i == n_new:  # a step computed ahead under the old threshold is not reused: this token goes to the cloud
            gen.decider.threshold = 1.0
        record = gen.step(block, pos)
        exits.append(record.exit)
        pos += len(block)
        block = [record.token_id]
        tokens.append(record.token_id)
    gen.drop_lookahead()  # the step computed ahead on a guess is not part of the decoded positions
    return gen, tokens[:pos], exits


def _assert_kv_matches_full_model(hf, edge_seq: SequenceKV, cloud_seq: SequenceKV, tokens, split, tol=1e-5):
    """Every position each layer holds equals the full model's K/V; local layers hold at least their window."""
    with torch.no_grad():  # a cache without the config keeps every position of every layer
        past = hf(torch.tensor([tokens]), past_key_values=DynamicCache(), use_cache=True).past_key_values
    layers = [(edge_seq if layer < split else cloud_seq).layers[layer] for layer in range(hf.config.num_hidden_layers)]
    if any(ours.window is not None for ours in layers):
        assert any(ours.start > 0 for ours in layers), "no sliding-window layer forgot anything"
    for layer, ours in enumerate(layers):
        assert ours.length == len(tokens), f"layer {layer} holds {ours.length} of {len(tokens)} positions"
        if ours.window is not None:  # kept every key the next position's query sees
            assert ours.start <= len(tokens) - ours.window + 1, f"layer {layer} forgot {ours.start} positions"
        torch.testing.assert_close(ours.keys, past.layers[layer].keys[0, :, ours.start:], rtol=tol, atol=tol)
        torch.testing.assert_close(ours.values, past.layers[layer].values[0, :, ours.start:], rtol=tol, atol=tol)


def _first_exit_confidences(edge, cloud, prompt, n):
    gen = DecodingSession(edge, cloud, "collaborative", threshold=1.0, sequence_id=99).generate(prompt, n)
    return sorted(r.confidences[0][1] for r in gen.records)


@pytest.mark.parametrize("mode", ["forced", "mixed"])
def test_kv_after_catch_up_equals_full_model(tiny, mode):
    path, hf = tiny
    hf = hf.to(torch.float32)
    edge, cloud = _pipeline(path, torch.float32, threshold=1.0)
    prompt = PROMPTS[1]
    threshold = 0.0 if mode == "forced" else _first_exit_confidences(edge, cloud, prompt, 40)[20]
    gen, tokens, exits = _decode_then_flush(edge, cloud, threshold, prompt, 40)
    edge_exits = [e for e in exits[:-1] if e.startswith("edge")]
    if mode == "forced":
        assert set(exits[:-1]) == {"edge:1"}
    else:
        assert 0 < len(edge_exits) < 40, exits  # some tokens exit, some do not
    assert exits[-1] == "cloud"
    assert gen.stats.speculated == exits.count("cloud")  # every cloud request computed ahead, then kept or rewound
    assert not gen.seq.pending and not cloud.context.sessions[7].pending  # flushed: nothing waits anywhere
    _assert_kv_matches_full_model(hf, gen.seq, cloud.partition.sequences[7].kv, tokens, edge.plan.split_layer)


def test_speculation_never_changes_tokens(tiny):
    """Steps computed ahead on a guess are kept when the cloud agrees and rewound when it does not."""
    path, _ = tiny
    edge, cloud = _pipeline(path, torch.float64, threshold=1.0)
    threshold = _first_exit_confidences(edge, cloud, PROMPTS[1], 40)[20]
    runs = {}
    for speculate in (False, True):
        gen = DecodingSession(edge, cloud, "collaborative", threshold=threshold, sequence_id=20 + speculate,
                              speculate=speculate)
        runs[speculate] = gen.generate(PROMPTS[1], 40)
    plain, ahead = runs[False], runs[True]
    assert ahead.token_ids == plain.token_ids and ahead.exits() == plain.exits()
    assert plain.stats.speculated == 0
    assert ahead.stats.speculated == ahead.stats.cloud_requests
    assert 0 < ahead.stats.speculation_hits < ahead.stats.speculated, "want both kept and rewound guesses"


def test_rewind_restores_lengths_and_pending_rows_and_refuses_to_go_forward():
    seq = SequenceKV(0, 2, num_kv_heads=1, head_dim=4, dtype=torch.float32, device="cpu")
    for layer in seq.layers.values():
        layer.append(0, torch.ones(1, 3, 4), torch.ones(1, 3, 4))
    seq.pending.add(1, 3, torch.zeros(1, 8))
    mark = seq.mark()
    seq.layers[0].append(3, torch.ones(1, 2, 4), torch.ones(1, 2, 4))
    seq.pending.add(1, 4, torch.zeros(1, 8))
    seq.rewind(mark)
    assert seq.length(0) == 3 and seq.pending[1].start == 3 and seq.pending[1].end == 4
    seq.layers[0].truncate(1)
    with pytest.raises(PositionError, match="rewind layer 0 from 1 positions to 3"):
        seq.rewind(mark)


def test_sliding_window_layer_forgets_only_what_no_query_sees():
    layer = LayerKV(1, 4, torch.float32, "cpu", window=4)
    for pos in range(40):  # one row at a time, as decoding appends
        layer.append(pos, torch.full((1, 1, 4), float(pos)), torch.zeros(1, 1, 4))
    assert layer.start == 36 and layer.positions.tolist() == [36, 37, 38, 39]
    assert layer.keys[0, :, 0].tolist() == [36.0, 37.0, 38.0, 39.0]
    assert layer.nbytes <= 2 * 4 * 4 * 32  # compacted: the buffer does not grow with the context
    layer.append(40, torch.full((1, 3, 4), 40.0), torch.zeros(1, 3, 4))  # a block: its first row sees back to 37
    assert layer.start == 37
    layer.truncate(40)  # undo that block: a block at 40 needs 37..39, still held
    with pytest.raises(PositionError, match="forgot the positions before 37"):
        layer.truncate(39)


def test_broken_catch_up_fails_the_kv_check(tiny, monkeypatch):
    """Mutation check: if pending rows were dropped instead of carried, the KV check must fail."""
    path, hf = tiny
    edge, cloud = _pipeline(path, torch.float32, threshold=1.0)
    monkeypatch.setattr(BoundaryRows, "take", lambda self, boundary: None)
    with pytest.raises((PositionError, AssertionError)):
        gen, tokens, _ = _decode_then_flush(edge, cloud, 0.0, PROMPTS[0], 10)
        _assert_kv_matches_full_model(hf.float(), gen.seq, cloud.partition.sequences[7].kv, tokens,
                                      edge.plan.split_layer)


def test_standalone_and_cloud_only_modes(tiny):
    path, hf = tiny
    edge, cloud = _pipeline(path, torch.float64, threshold=1.0)
    standalone = DecodingSession(edge, None, "standalone", threshold=1.0).generate(PROMPTS[0], 16)
    assert set(standalone.exits()) == {"edge:4"} and standalone.stats.cloud_requests == 0
    full = load_model(path, dtype=torch.float64)
    cloud_only = CloudOnlySession(LocalCloud(full), sequence_id=3).generate(PROMPTS[0], 16)
    collab = DecodingSession(edge, cloud, "collaborative", threshold=1.0, sequence_id=4).generate(PROMPTS[0], 16)
    assert cloud_only.token_ids == collab.token_ids
    assert cloud_only.stats.cloud_requests == 16
