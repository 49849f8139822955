"""The exit-head cost bench and the codec fidelity bench, run end to end on a tiny random Llama (the
figures on Gemma 3 270M are in the README; these check that the tools compute what they say)."""
from __future__ import annotations

import json

import pytest
import torch

from bench import codec_fidelity, exit_costs
from plugin.model.checkpoint import load_model
from plugin.split.plan import PartitionPlan
from plugin.training.continuations import Continuation, save
from tests.tiny_models import LAYERS, VOCAB, save_tiny

SPLIT, EXITS, HIDDEN = 4, (2, 4), 64


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("tiny-llama")
    save_tiny("llama", ckpt)
    PartitionPlan(ckpt, SPLIT, EXITS, threshold=0.8, codec="fp32").save(ckpt / "partition_plan.json")
    return ckpt / "partition_plan.json"


def test_exit_costs_times_every_design_on_both_runners(plan_path, tmp_path):
    out = tmp_path / "costs.json"
    args = ["--plan", str(plan_path), "--context", "8", "--shortlists", "16,32", "--prune", "8", "--repeats", "2",
            "--threads", "1", "--out", str(out)]
    assert exit_costs.main(args) == 0
    got = json.loads(out.read_text())
    macs = got["macs_per_token"]
    assert macs["full_head"] == HIDDEN * VOCAB and macs["shortlist_16"] == HIDDEN * 17 and macs["pruned_8"] == HIDDEN * 8
    assert macs["whole_model_layers"] == macs["edge_layers"] * LAYERS // SPLIT
    for runner in ("torch", "onnx"):
        ms = got[f"{runner}_ms"]
        assert set(ms) == {"edge_layers", "full_model", "heads_full", "heads_pruned_8", "heads_shortlist_16",
                           "heads_shortlist_32"} and all(v > 0 for v in ms.values())
        designs = got[f"{runner}_designs_ms"]
        assert designs["no exit heads"] == ms["edge_layers"]
        assert designs["shortlist 16 + other at every exit"] == pytest.approx(ms["edge_layers"] + ms["heads_shortlist_16"])


def test_shortlist_heads_of_the_cost_bench_score_s_plus_one_classes(plan_path):
    model = load_model(PartitionPlan.load(plan_path).checkpoint)
    exit_costs.use_heads(model, exit_costs.shortlist_heads(model, EXITS, 16))
    row = torch.randn(HIDDEN)
    assert model.exit_logits(row, EXITS[0]).shape == (17,) and model.exit_token_ids(EXITS[0]).tolist() == list(range(16))
    exit_costs.use_heads(model, None)
    assert model.exit_logits(row, EXITS[0]).shape == (VOCAB,) and model.exit_token_ids(EXITS[0]) is None


def test_codec_fidelity_counts_flips_and_bytes(plan_path, tmp_path):
    g = torch.Generator().manual_seed(0)
    records = [Continuation("p", torch.randint(0, VOCAB, (4,), generator=g).tolist(),
                            torch.randint(0, VOCAB, (20,), generator=g).tolist(), "greedy") for _ in range(3)]
    records.append(Continuation("p", [1, 2], [3, 4], "sample:t=1"))  # sampled ones are left out
    save(records, tmp_path / "heldout.json")
    out = tmp_path / "fidelity.json"
    assert codec_fidelity.main(["--plan", str(plan_path), "--continuations", str(tmp_path / "heldout.json"),
                                "--tokens", "16", "--out", str(out)]) == 0
    codecs = json.loads(out.read_text())["codecs"]
    assert set(codecs) == {"fp32", "fp16", "fp16s", "int8", "int8g"}
    fp32 = codecs["fp32"]
    assert fp32["token_agreement"] == 1.0 and fp32["generations_with_a_flip"] == 0 and fp32["relative_error_mean"] == 0
    assert fp32["tokens"] == 3 * 16 and fp32["generations"] == 3
    assert {c: r["bytes_per_row"] for c, r in codecs.items()} == {
        "fp32": 4 * HIDDEN, "fp16": 2 * HIDDEN, "fp16s": 2 * HIDDEN + 4, "int8": HIDDEN + 4, "int8g": HIDDEN + 4 * 4}
    assert 0 < codecs["int8g"]["relative_error_mean"] < codecs["int8"]["relative_error_mean"]
    assert codecs["fp16s"]["relative_error_mean"] < codecs["int8g"]["relative_error_mean"]
