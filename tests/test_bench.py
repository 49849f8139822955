"""A bounded smoke run of the benchmark harness on a tiny random checkpoint (real tritonserver,
link emulator on 127.0.0.1): the JSON has its fields and the numbers agree with each other."""
from __future__ import annotations

import json
import math
import os
import threading

import numpy as np
import pytest
import torch

from bench.naive_split import NaiveSplitService, write_bench_repository
from bench.perf_inputs import input_data, record_sessions
from bench.clients import capacity
from bench.cores import pinned
from bench.measures import paired_interval, rouge_l, token_agreement
from bench.run import BenchConfig, run_benchmark
from bench.systems import heldout_texts, LinkSpec, System
from plugin.protocol.codec import encode
from plugin.protocol.messages import CloudRequest
from plugin.protocol.tensors import START_POS
from plugin.protocol.wire import request_inputs
from plugin.serving.repository import ServeOptions
from plugin.split.limits import Limits
from plugin.split.plan import PartitionPlan
from tests.tiny_models import LAYERS, save_tiny

SPLIT, EXITS = 4, (1, 3, 4)
PROMPTS = [[5, 17, 33, 2, 71], [90, 4, 4, 12, 61, 8, 30, 55, 1]]
NEW_TOKENS = 6


def test_quality_metrics():
    assert token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_agreement([1, 2, 4, 5], [1, 2, 3, 5]) == 0.75
    assert rouge_l([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert rouge_l([1, 9, 3, 4], [1, 2, 3, 4]) == pytest.approx(0.75)
    assert rouge_l([7, 8], [1, 2]) == 0.0
    assert LinkSpec.parse("20/100").delay_ms == 10 and LinkSpec.parse("60/inf").bandwidth_mbit is None
    rows = [{"system": "a", "clients": n, "p99_ms": p} for n, p in ((1, 10), (4, 20), (16, 90))]
    assert capacity(rows, 50) == {"a": {"max_clients_within_slo": 4, "all_measured_within_slo": False,
                                        "interpolated_clients": pytest.approx(7.2, abs=0.1)}}
    assert capacity(rows, 100)["a"]["all_measured_within_slo"] and capacity(rows, 5)["a"]["max_clients_within_slo"] == 0


def test_paired_interval_over_prompts():
    assert paired_interval([10, 20, 30], [20, 40, 60]) == (pytest.approx(0.5), pytest.approx(0.5))
    low, high = paired_interval([8, 30, 20, 25], [20, 31, 30, 26])  # one prompt gains a lot, the others little
    point = 1 - (8 + 30 + 20 + 25) / (20 + 31 + 30 + 26)
    assert low < point < high and high - low > 0.1
    assert all(math.isnan(x) for x in paired_interval([1.0], [2.0]))


def test_naive_split_service_recomputes_the_whole_context(tmp_path):
    save_tiny("llama", tmp_path / "ckpt")
    service = NaiveSplitService({"checkpoint": "ckpt", "split_layer": str(SPLIT)}, tmp_path)
    rows = encode(torch.randn(7, 64), "fp16")
    out = service.answer(request_inputs(CloudRequest(0, 0, True, rows=rows, split_layer=SPLIT)))
    assert out["CATCHUP_ROWS"][0, 0] == 7 and out["TOKEN_ID"][0, 0] >= 0
    again = service.answer(request_inputs(CloudRequest(0, 0, True, rows=rows, split_layer=SPLIT)))
    assert again["TOKEN_ID"][0, 0] == out["TOKEN_ID"][0, 0]  # stateless: same context, same token
    with pytest.raises(ValueError, match="position 0"):
        service.answer(request_inputs(CloudRequest(0, 3, True, rows=rows, split_layer=SPLIT)))


def test_perf_inputs_streams_line_up(tmp_path):
    save_tiny("llama", tmp_path / "ckpt")
    plan = PartitionPlan(tmp_path / "ckpt", SPLIT, EXITS, threshold=0.1, codec="fp16")
    data = input_data(record_sessions(plan, PROMPTS, NEW_TOKENS), SPLIT)["data"]
    assert len(data) == len(PROMPTS) and len({len(s) for s in data}) == 1  # one length for perf_analyzer
    for stream in data:
        positions = [int(np.frombuffer(__import__("base64").b64decode(step[START_POS]["b64"]), "<i8")[0]) for step in stream]
        rows = [step["HIDDEN_FP16"]["shape"][0] for step in stream]
        assert positions[0] == 0 and all(p + n == q for p, n, q in zip(positions, rows, positions[1:]))
        assert all(step["HIDDEN_FP16"]["shape"][1] == 64 and step["SPLIT_LAYER"]["shape"] == [1] for step in stream)


@pytest.mark.server
@pytest.mark.slow
def test_bench_smoke_run(tmp_path_factory, start_server):
    ckpt = tmp_path_factory.mktemp("bench-ckpt")
    save_tiny("llama", ckpt)
    plan = PartitionPlan(ckpt, SPLIT, EXITS, threshold=0.8, codec="fp16")
    repo = tmp_path_factory.mktemp("bench-repo")
    opts = ServeOptions(limits=Limits(max_sessions=64))
    write_bench_repository(plan, repo, opts)
    server = start_server(repo)
    out = tmp_path_factory.mktemp("bench-out")
    cfg = BenchConfig(plan=plan, prompts=PROMPTS, max_new_tokens=NEW_TOKENS, thresholds=(0.1, 1.0),
                      codecs=("fp32", "int8"), links=(LinkSpec(0, None), LinkSpec(10, 100)), clients=(1, 2),
                      client_tokens=4, sessions_per_client=1, long_tokens=10, out=out, progress=False,
                      serve_options=opts, verified_thresholds=(0.5,),
                      verified_plan=PartitionPlan(ckpt, SPLIT + 1, (SPLIT + 1,), threshold=0.5, codec="fp16"))
    results = run_benchmark(cfg, server=server)

    assert results["meta"]["pinning"] is None  # a server given: its cores are the caller's
    assert json.loads((out / "results.json").read_text())["runs"]  # written and parseable
    assert (out / "report.md").read_text().startswith("# CE-CoLLM benchmark")
    for png in ("quality_vs_cloud_share.png", "time_per_token_vs_link.png", "bytes_up_per_token.png",
                "clients_p99_throughput.png"):
        assert (out / png).stat().st_size > 1000
    keys = {System("cloud-only").key, System("naive-split", codec="fp32").key, System("standalone", 0.1).key,
            System("verified", 0.5, "fp32").key,
            *(System("collaborative", t, c).key for t in (0.1, 1.0) for c in ("fp32", "int8"))}
    runs = {(r["key"], r["rtt_ms"]): r for r in results["runs"]}
    assert {k for k, _ in runs} == keys and {rtt for _, rtt in runs} == {0, 10}
    fields = ("time_per_token_ms", "ttft_ms", "bytes_up_per_token", "bytes_down_per_token", "wire_bytes_up_per_token",
              "exit_share", "edge_share", "cloud_share", "cloud_work_share", "server_time_share", "token_agreement",
              "rouge_l", "perplexity", "server")
    cloud_layers = LAYERS - SPLIT
    for (key, rtt), r in runs.items():
        assert all(f in r for f in fields), key
        assert r["tokens"] == len(PROMPTS) * NEW_TOKENS
        assert r["time_per_token_ms"]["median"] > 0 and r["ttft_ms"]["median"] > 0
        assert math.isclose(sum(r["exit_share"].values()), 1.0) and math.isclose(r["cloud_share"], 1 - r["edge_share"])
        assert r["perplexity"] > 1
        if r["system"] != "standalone":
            assert r["wire_bytes_up_per_token"] > r["bytes_up_per_token"] > 0  # framing on top of the tensors
            assert r["server"]["busy_s"] > 0
        if key.startswith("collaborative@1/"):
            assert r["cloud_share"] == 1.0
            # every row of every prompt crosses the cloud's layers once: (N - k) / N of cloud-only's work
            assert r["cloud_work_share"] == pytest.approx(cloud_layers / LAYERS)
            assert r["speculated"] == r["tokens"]  # each request had the next position computed ahead
        if key == "collaborative@1/fp32":
            assert r["token_agreement"] == 1.0 and r["exact_match"] == 1.0 and r["rouge_l"] == 1.0
        if r["system"] == "collaborative":
            assert 0 < r["cloud_work_share"] <= cloud_layers / LAYERS + 1e-9
        assert runs[(System("standalone", 0.1).key, rtt)]["cloud_layer_token_work"] == 0
    for rtt in (0, 10):
        naive = runs[("naive-split/fp32", rtt)]
        collab = runs[("collaborative@1/fp32", rtt)]
        assert naive["bytes_up_per_token"] > collab["bytes_up_per_token"]
        assert naive["wire_bytes_up_per_token"] > collab["wire_bytes_up_per_token"]
        assert runs[("cloud-only", rtt)]["cloud_work_share"] == 1.0
    for rtt in (0, 10):  # verified systems run on the verified plan's edge (split 5): exact, every exit its own
        verified = runs[(System("verified", 0.5, "fp32").key, rtt)]
        assert verified["exact_match"] == 1.0 and set(verified["exit_share"]) == {f"edge:{SPLIT + 1}", "cloud"}
    assert results["meta"]["verified_plan"]["split_layer"] == SPLIT + 1
    # the 10 ms RTT link puts a floor under every cloud round trip (load can only add to it)
    assert runs[("cloud-only", 10)]["time_per_token_ms"]["median"] >= 10
    assert runs[("naive-split/fp32", 10)]["ttft_ms"]["median"] >= 10
    assert {t["name"] for t in results["targets"]} >= {"time per token vs cloud-only", "token agreement with cloud-only"}
    time_target = next(t for t in results["targets"] if t["name"] == "time per token vs cloud-only")
    assert time_target["interval"][0] <= time_target["measured"] <= time_target["interval"][1]
    long = results["long_context"]  # longer contexts: the naive split's requests grow, collaborative's do not
    assert long["tokens"] == 10 and long["ratio"] > runs[("naive-split/fp32", 0)]["bytes_up_per_token"] / runs[
        ("collaborative@0.1/fp32", 0)]["bytes_up_per_token"] > 1
    clients = results["clients"]
    assert {(r["system"], r["clients"]) for r in clients["rows"]} == {
        (s, n) for s in ("collaborative@0.1/fp32", "cloud-only") for n in (1, 2)}
    assert all(r["throughput_tok_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in clients["rows"])
    assert set(clients["capacity"]) == {"collaborative@0.1/fp32", "cloud-only"}


def test_pinning_gives_the_edge_and_the_server_a_core_each_and_gives_the_cores_back():
    """All of this process's threads on the edge core inside, the server's core apart; the cores back on exit."""
    cores = os.sched_getaffinity(0)
    with pinned(False) as off:
        assert off is None and os.sched_getaffinity(0) == cores
    if len(cores) < 2:
        pytest.skip("one core: nothing to split")
    worker = threading.Thread(target=threading.Event().wait, args=(30,), daemon=True)
    worker.start()  # started before the pinning: pinned too
    with pinned(True) as pinning:
        assert pinning is not None and pinning.server_cpus == {pinning.server} and pinning.server != pinning.edge
        assert os.sched_getaffinity(0) == os.sched_getaffinity(worker.native_id) == {pinning.edge}
        assert "the edge one core and the cloud one core" in pinning.note()
    assert os.sched_getaffinity(0) == os.sched_getaffinity(worker.native_id) == cores


def test_heldout_prompts_come_from_the_checkpoint_or_from_beside_the_exit_heads(tmp_path):
    """The demo model keeps its held-out prompts in the checkpoint; an imported model (Gemma) has them beside
    the plan's exit heads, with the texts those heads were not trained on."""
    ckpt, heads = tmp_path / "ckpt", tmp_path / "heads"
    ckpt.mkdir(), heads.mkdir()
    plan = PartitionPlan(ckpt, 2, (2,), exit_adapters=heads / "exit_heads.safetensors")
    with pytest.raises(FileNotFoundError, match="heldout_prompts"):
        heldout_texts(plan)
    (heads / "heldout_prompts.json").write_text(json.dumps(["Glaciers shape the landscape by", "Dear diary,\n"]))
    assert heldout_texts(plan) == ["Glaciers shape the landscape by", "Dear diary,\n"]
    (ckpt / "heldout_prompts.txt").write_text("ROMEO:\\nBut soft\n\nJULIET:\n")
    assert heldout_texts(plan) == ["ROMEO:\nBut soft", "JULIET:"]  # the checkpoint's own come first
