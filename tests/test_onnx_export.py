"""The build pipeline's ONNX half: export, ONNX Runtime parity, the ONNX runner, the tensorrt_plan configs.

Tiny random Llama, GPT-2 and Gemma 3 (sliding window) checkpoints always; the trained demo model too when its
weights exist.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.session import DecodingSession
from edge_runtime.runners import load_runner, OnnxRunner
from edge_runtime.torch_runner import TorchRunner
from plugin.export.manifest import ExportError, graph_path, Manifest
from plugin.export.onnx import export_plan
from plugin.export.parity import check_parity, parity_summary, parity_table
from plugin.model.checkpoint import load_model, read_config
from plugin.model.rows import PositionError
from plugin.model.sampling import Greedy
from plugin.serving.repository import render_configs, ServeOptions
from plugin.serving.trt_repository import (check_ensemble, graph_io, parse_config, validate_trt_repository,
                                           write_trt_repository)
from plugin.split.edge import EdgePartition, ExitPolicy
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan
from tests.tiny_models import save_tiny

REPO = Path(__file__).resolve().parents[1]
DEMO_PLAN = REPO / "models" / "shakespeare-llama" / "partition_plan.json"
TINY = ["llama", "gpt2", "gemma3"]
MODELS = TINY + ["demo"]  # the committed demo model: its parity is checked in CI
PROMPT = [5, 17, 33, 2, 71, 8]


@pytest.fixture(scope="module")
def _exports(tmp_path_factory):
    """kind -> (plan, onnx_dir, kind): graphs in fp32 and fp16, exported once per module."""
    cache = {}

    def export(kind: str):
        if kind not in cache:
            out = tmp_path_factory.mktemp(f"onnx-{kind}")
            if kind == "demo":
                plan = PartitionPlan.load(DEMO_PLAN)
            else:
                ckpt = tmp_path_factory.mktemp(kind)
                save_tiny(kind, ckpt)
                plan = PartitionPlan(ckpt.resolve(), 4, (1, 3, 4), threshold=1.0, codec="fp32")
            export_plan(plan, out)
            cache[kind] = (plan, out, kind)
        return cache[kind]

    return export


@pytest.fixture(params=MODELS)
def exported(request, _exports):
    return _exports(request.param)


@pytest.fixture(params=TINY)
def exported_tiny(request, _exports):
    """The tiny checkpoints alone: paths the demo model would only make slower."""
    return _exports(request.param)


def _torch_edge(plan: PartitionPlan) -> EdgePartition:
    return EdgePartition(TorchRunner(load_model(plan.checkpoint, range(0, plan.split_layer))), plan)


def _cloud(plan: PartitionPlan) -> LocalCloud:
    return LocalCloud(load_model(plan.checkpoint, range(plan.split_layer, read_config(plan.checkpoint).num_layers)))


def test_every_graph_matches_pytorch_in_fp32_and_fp16(exported, capsys):
    plan, onnx_dir, kind = exported
    results = check_parity(plan, onnx_dir, "fp32", threads=1) + check_parity(plan, onnx_dir, "fp16", threads=1)
    ok, line = parity_summary(results)
    with capsys.disabled():
        print(f"\n[{kind}] {line}")
    assert ok, parity_table(results)
    fp32 = [r for r in results if r.precision == "fp32" and r.limit > 0]
    assert max(r.max_abs_diff for r in fp32) < 1e-4  # tight: the graphs compute what the layer loop computes
    outputs = {r.output for r in results}
    assert {"hidden_out", "exit_logits", "exit_token", "topk_logprobs", "token_id", "catchup_rows"} <= outputs


def test_graphs_have_dynamic_batch_block_and_past_axes(exported):
    plan, onnx_dir, _ = exported
    manifest = Manifest.load(onnx_dir)
    for spec in manifest.specs():
        inputs, outputs = graph_io(graph_path(onnx_dir, spec, "fp32"))
        assert list(inputs) == list(spec.inputs) and list(outputs) == list(spec.outputs)
        for name, io in inputs.items():
            assert io.shape[0] == "batch", (spec.name, name)
            if name in ("input_ids", "hidden_in"):
                assert io.shape[1] == "block"
            if name.startswith("past_"):
                assert io.shape[2] == "past" and io.shape[1] == manifest.num_kv_heads
    # the fp16 graphs keep hidden states in fp32 at their boundaries, the KV cache in fp16
    edge = next(s for s in manifest.specs() if s.kind == "edge" and s.first_layer > 0)
    inputs, outputs = graph_io(graph_path(onnx_dir, edge, "fp16"))
    assert inputs["hidden_in"].data_type == "TYPE_FP32" and outputs["hidden_out"].data_type == "TYPE_FP32"
    assert next(io for n, io in inputs.items() if n.startswith("past_")).data_type == "TYPE_FP16"


def test_onnx_runner_gives_torch_tokens_standalone_and_collaborative(exported):
    plan, onnx_dir, kind = exported
    torch_edge, onnx_edge = _torch_edge(plan), EdgePartition(load_runner("onnx", plan, onnx_dir=onnx_dir, threads=1), plan)
    n = 16
    for mode, link in (("standalone", None), ("collaborative", _cloud(plan))):
        ref = DecodingSession(torch_edge, link, mode, threshold=1.0, sequence_id=1).generate(PROMPT, n)
        got = DecodingSession(onnx_edge, link, mode, threshold=1.0, sequence_id=2).generate(PROMPT, n)
        assert got.token_ids == ref.token_ids, mode
        assert got.exits() == ref.exits()
        assert set(got.exits()) == ({f"edge:{plan.exit_layers[-1]}"} if mode == "standalone" else {"cloud"})
        if mode == "collaborative":  # each runner computed the same steps ahead and kept the same ones
            assert (got.stats.speculated, got.stats.speculation_hits) == (ref.stats.speculated, ref.stats.speculation_hits)
            print(f"[{kind}] speculation: {got.stats.speculation_hits} of {got.stats.speculated} guesses kept")


def test_onnx_runner_catches_up_skipped_layers_like_torch(exported_tiny):
    """Exits forced at the first exit, then one token at 1.0 carries every pending row through the
    ONNX segments: the KV of every edge layer equals the PyTorch runner's."""
    plan, onnx_dir, kind = exported_tiny
    runners = {"torch": TorchRunner(load_model(plan.checkpoint, range(0, plan.split_layer))),
               "onnx": OnnxRunner(plan, onnx_dir, threads=1)}
    states, tokens = {}, {}
    for name, runner in runners.items():
        edge, seq = EdgePartition(runner, plan), runner.new_sequence()
        block, pos, out = list(PROMPT), 0, []
        for i in range(12):
            policy = ExitPolicy(0.0 if i < 11 else 1.0, local_only=True)
            step = edge.step(seq, block, pos, policy, Greedy())
            pos += len(block)
            block = [step.token_id]
            out.append((step.token_id, step.exit_layer, dict(step.rows_by_layer)))
        states[name], tokens[name] = seq, out
    assert tokens["onnx"] == tokens["torch"]
    assert tokens["torch"][-1][2][plan.split_layer - 1] == len(PROMPT) + 11  # every pending row + the new one
    assert not states["onnx"].pending and not states["torch"].pending
    for layer in range(plan.split_layer):
        keys, values = states["onnx"].kv[layer]
        ref = states["torch"].layers[layer]  # a sliding-window layer holds positions [ref.start, ...) only
        np.testing.assert_allclose(keys[0][:, ref.start:], ref.keys.numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(values[0][:, ref.start:], ref.values.numpy(), atol=1e-4, rtol=1e-4)


def test_onnx_runner_keeps_the_position_rule(exported):
    plan, onnx_dir, _ = exported
    runner = OnnxRunner(plan, onnx_dir, threads=1)
    state = runner.new_sequence()
    first = plan.boundaries[0]
    out = runner.run(0, first, np.array(PROMPT), 0, state, first if first in plan.exit_layers else None)
    assert out.hidden.shape == (len(PROMPT), runner.hidden_size) and state.length(0) == len(PROMPT)
    with pytest.raises(PositionError, match="starts at position 3 but layer 0 holds 6"):
        runner.run(0, first, np.array([1]), 3, state, None)
    with pytest.raises(ValueError, match="no exported segment"):
        runner.run(0, plan.split_layer + 1, np.array([1]), 6, state, None)
    # any row goes through the exit-head graph alone
    row = torch.randn(runner.hidden_size)
    logits = runner.exit_logits(row.numpy(), plan.exit_layers[0])
    ref = load_model(plan.checkpoint, range(0, plan.split_layer)).exit_logits(row, plan.exit_layers[0])
    torch.testing.assert_close(torch.from_numpy(logits), ref.detach(), atol=1e-4, rtol=1e-4)


def test_missing_or_stale_exports_say_what_to_run(exported, tmp_path):
    plan, onnx_dir, _ = exported
    with pytest.raises(ExportError, match="build/export_onnx.py --plan"):
        load_runner("onnx", plan, onnx_dir=tmp_path)
    other = PartitionPlan(plan.checkpoint, plan.split_layer, plan.exit_layers[1:], threshold=1.0)
    with pytest.raises(ExportError, match="exported for split"):
        load_runner("onnx", other, onnx_dir=onnx_dir)
    with pytest.raises(ValueError, match="runner must be one of"):
        load_runner("tflite", plan)


def test_auto_runs_the_exported_graphs_else_the_pytorch_loop(exported_tiny, tmp_path):
    plan, onnx_dir, _ = exported_tiny
    assert load_runner("auto", plan, onnx_dir=onnx_dir).kind == "onnx"
    assert load_runner("auto", plan, onnx_dir=tmp_path).kind == "torch"  # nothing exported there


def test_an_edge_device_needs_no_weight_files_but_refuses_another_config(exported_tiny, tmp_path):
    """An edge holds the plan, config.json, the tokenizer, the exit adapters and the graphs: the weights are in the
    graphs. Without the weight files the graphs are checked against config.json and the adapters alone."""
    plan, onnx_dir, _ = exported_tiny
    device = tmp_path / "checkpoint"
    shutil.copytree(plan.checkpoint, device, ignore=shutil.ignore_patterns("*.safetensors*", "onnx"))
    if plan.exit_adapters:
        shutil.copy(plan.exit_adapters, device / plan.exit_adapters.name)
    on_device = replace(plan, checkpoint=device,
                        exit_adapters=device / plan.exit_adapters.name if plan.exit_adapters else None)
    assert load_runner("onnx", on_device, onnx_dir=onnx_dir).num_layers == read_config(plan.checkpoint).num_layers
    config = json.loads((device / "config.json").read_text())
    (device / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5}))
    with pytest.raises(ExportError, match="other weights"):
        load_runner("onnx", on_device, onnx_dir=onnx_dir)


def test_tensorrt_plan_variant_parses_and_matches_the_cloud_graph(exported, tmp_path):
    plan, onnx_dir, _ = exported
    write_trt_repository(plan, onnx_dir, tmp_path)  # validates what it wrote; raises on any problem
    assert validate_trt_repository(tmp_path, onnx_dir) == []
    config = parse_config(tmp_path / "cloud_partition" / "config.pbtxt")
    manifest = Manifest.load(onnx_dir)
    cloud_layers = manifest.num_layers - plan.split_layer
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 1
    assert len(config.sequence_batching.state) == 2 * cloud_layers
    state = config.sequence_batching.state[0]
    assert list(state.dims) == [manifest.num_kv_heads, -1, manifest.head_dim]
    assert list(state.initial_state[0].dims) == [manifest.num_kv_heads, 0, manifest.head_dim]
    assert {t.name for t in config.input} == {"hidden_in", "start_pos"}
    assert list(config.instance_group[0].profile) == ["0", "1"]
    for name in ("context_manager", "cloud_only"):
        assert (tmp_path / name / "1" / "model.py").is_file()
    # the context manager admits the engine's split layer only (the python repository: any the cloud holds)
    admitted = parse_config(tmp_path / "context_manager" / "config.pbtxt").parameters
    assert admitted["min_split_layer"].string_value == admitted["max_split_layer"].string_value == str(plan.split_layer)
    # a config that drifted from the graph is reported
    path = tmp_path / "cloud_partition" / "config.pbtxt"
    path.write_text(path.read_text().replace(f"dims: [-1, {manifest.hidden_size}]", "dims: [-1, 7]"))
    problems = validate_trt_repository(tmp_path, onnx_dir)
    assert any("hidden_in" in p for p in problems), problems


def test_ensemble_checker_accepts_the_python_repository(exported, tmp_path):
    """The checker that validates the variant passes the python repository that real Triton serves
    (tests/test_triton_cloud.py), and catches a broken wiring."""
    plan, _, _ = exported
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    texts = render_configs(plan, tmp_path, ServeOptions())
    configs = {n: text_format.Parse(t, model_config_pb2.ModelConfig()) for n, t in texts.items()}
    assert check_ensemble(configs["ce_collm"], configs) == []
    broken = text_format.Parse(texts["ce_collm"].replace('value: "pending_start"', 'value: "pending_begin"', 1),
                               model_config_pb2.ModelConfig())
    assert check_ensemble(broken, configs)


def test_trt_configs_cli(exported_tiny, tmp_path, capsys):
    from plugin.cli import main

    plan, onnx_dir, kind = exported_tiny
    plan_file = tmp_path / "plan.json"
    plan.save(plan_file)
    out = tmp_path / "repo"
    assert main(["trt-configs", "--plan", str(plan_file), "--onnx-dir", str(onnx_dir), "--out", str(out)]) == 0
    assert main(["trt-configs", "--plan", str(plan_file), "--onnx-dir", str(onnx_dir), "--out", str(out), "--check"]) == 0
    assert main(["trt-configs", "--plan", str(plan_file), "--onnx-dir", str(tmp_path / "none"), "--out", str(out)]) == 1
    assert "build/export_onnx.py" in capsys.readouterr().err


def test_shortlist_exit_heads_export_match_and_run_on_onnx_runtime(tmp_path):
    """Shortlist heads (S rows + "other", adapters on h / RMS(h)) in the exported exit graphs: parity with the
    layer loop, and the ONNX runner maps its candidates back to vocabulary ids as the torch runner does."""
    from plugin.training.exit_heads import ExitHeads, save_adapters

    ckpt = tmp_path / "llama"
    save_tiny("llama", ckpt)
    torch.manual_seed(3)
    shortlist = torch.randperm(read_config(ckpt).vocab_size)[:24]
    heads = ExitHeads(load_model(ckpt), (1, 3, 4), rank=4, shortlist=shortlist, normalize_input=True)
    for p in heads.trainable_parameters():  # away from the identity start, so that a head left out would show
        torch.nn.init.normal_(p, std=0.3)
    save_adapters(heads, ckpt / "heads.safetensors")
    plan = PartitionPlan(ckpt.resolve(), 4, (1, 3, 4), threshold=0.0, codec="fp32",
                         exit_adapters=ckpt.resolve() / "heads.safetensors")
    export_plan(plan, tmp_path / "onnx")
    results = check_parity(plan, tmp_path / "onnx", "fp32", threads=1)
    assert parity_summary(results)[0], parity_table(results)
    torch_edge = EdgePartition(TorchRunner(load_model(plan.checkpoint, range(0, 4), exit_adapters=plan.exit_adapters)),
                               plan)
    onnx_edge = EdgePartition(load_runner("onnx", plan, onnx_dir=tmp_path / "onnx", threads=1), plan)
    ref = DecodingSession(torch_edge, None, "standalone", sequence_id=1).generate(PROMPT, 12)
    got = DecodingSession(onnx_edge, None, "standalone", sequence_id=2).generate(PROMPT, 12)
    assert got.token_ids == ref.token_ids and got.exits() == ref.exits()
    assert set(got.token_ids) <= set(shortlist.tolist()) and set(got.exits()) == {"edge:1"}  # threshold 0: first exit
