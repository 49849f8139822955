"""Engine building: presets, optimization profiles, arguments, the no-TensorRT path.

The TensorRT build itself runs only where `tensorrt` imports and a GPU is present (a Jetson, the
NGC container); here it is skipped with that reason.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from plugin.export.engine_manifest import TensorRTUnavailable
from plugin.export.engines import (
    add_build_arguments, BuildOptions, describe_plan, engine_graphs, engine_profiles, options_from_args,
    read_calibration_tokens)
from plugin.export.int8_calibration import calibration_feeds
from plugin.export.manifest import default_onnx_dir, new_manifest
from plugin.model.checkpoint import load_model, read_config
from plugin.split.plan import PartitionPlan
from tests.tiny_models import save_tiny

REPO = Path(__file__).resolve().parents[1]
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NO_TENSORRT = ("TensorRT is not installed here (its wheels come from NVIDIA's index, unreachable, and there is "
               "no GPU): engines are built and tested on a Jetson (JetPack) or in the NGC container")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint, its plan file and a manifest (no graphs: profile logic needs only shapes)."""
    ckpt = tmp_path_factory.mktemp("llama")
    save_tiny("llama", ckpt)  # 6 layers, hidden 64, 2 KV heads of 16, 256 positions
    plan = PartitionPlan(ckpt.resolve(), 4, (1, 3, 4), threshold=0.8)
    plan.save(ckpt / "partition_plan.json")
    manifest = new_manifest(plan, read_config(ckpt), ["fp32", "fp16"])
    default_onnx_dir(plan).mkdir(parents=True)
    manifest.save(default_onnx_dir(plan))
    return plan, manifest


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_build_arguments(p)
    return p.parse_args(["--plan", "plan.json", *argv])


def test_presets_pick_their_graphs(tiny):
    _, manifest = tiny
    jetson = [s.name for s in engine_graphs(manifest, BuildOptions("jetson"))]
    cloud = [s.name for s in engine_graphs(manifest, BuildOptions("cloud"))]
    assert jetson == ["edge_00_01", "edge_01_03", "edge_03_04", "exit_01", "exit_03", "exit_04"]
    assert cloud == ["cloud_04_06"]


@pytest.mark.parametrize("target", ["jetson", "cloud"])
def test_profiles_cover_decode_and_blocks_up_to_the_max_context(tiny, target):
    _, manifest = tiny
    opts = BuildOptions(target)
    ctx = opts.context(manifest)
    assert ctx == 256  # the checkpoint's max_position_embeddings, under both presets' caps
    for spec in engine_graphs(manifest, opts):
        profiles = engine_profiles(spec, manifest, opts)
        for p in profiles:
            assert set(p.shapes) == set(spec.inputs), (spec.name, p.name)  # every input, no other name
            for lo, opt, hi in p.shapes.values():
                assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
        if spec.kind == "exit_head":
            assert [p.name for p in profiles] == ["rows"]
            continue
        decode, block = profiles  # the order the TensorRT runner and Triton's profile list rely on
        first = spec.inputs[0]
        assert [s[1] for s in decode.shapes[first]] == [1, 1, 1]
        lo, opt, hi = (s[1] for s in block.shapes[first])
        assert (lo, hi) == (0 if spec.kind == "cloud" else 1, min(opts.preset.max_block, ctx))
        past = next(v for n, v in block.shapes.items() if n.startswith("past_"))
        assert past[0][2] == 0 and past[2][2] == ctx - 1
        assert past[0][1] == manifest.num_kv_heads and past[0][3] == manifest.head_dim


def test_options_from_arguments(tiny):
    _, manifest = tiny
    assert options_from_args(_args("--target", "jetson")).precision == "fp16"  # fp16 by default
    assert options_from_args(_args("--target", "cloud", "--fp32")).onnx_precision == "fp32"
    opts = options_from_args(_args("--target", "jetson", "--int8", "--calib-data", "c.npy", "--max-context", "128",
                                   "--max-block", "64", "--timing-cache", "t.cache"))
    assert (opts.precision, opts.onnx_precision, opts.context(manifest)) == ("int8", "fp16", 128)
    assert opts.preset.max_block == 64 and opts.timing_cache == Path("t.cache")
    with pytest.raises(ValueError, match="--int8 needs --calib-data"):
        options_from_args(_args("--target", "jetson", "--int8"))
    with pytest.raises(ValueError, match="only used with --int8"):
        options_from_args(_args("--target", "jetson", "--calib-data", "c.npy"))
    with pytest.raises(ValueError, match="exceeds the checkpoint's 256 positions"):
        options_from_args(_args("--target", "cloud", "--max-context", "4096")).context(manifest)
    with pytest.raises(SystemExit):
        _args("--target", "jetson", "--int8", "--fp32")
    with pytest.raises(SystemExit):
        _args("--target", "desktop")
    text = describe_plan(manifest, options_from_args(_args("--target", "jetson", "--max-context", "128")))
    assert "max context 128" in text and "profile decode" in text and "exit_04.plan" in text


def test_calibration_feeds_are_each_graphs_inputs(tiny, tmp_path):
    plan, manifest = tiny
    np.save(tmp_path / "calib.npy", np.arange(200) % 96)
    tokens = read_calibration_tokens(tmp_path / "calib.npy", plan.checkpoint, block=16, max_blocks=4)
    assert tokens.shape == (4, 16) and tokens.dtype == np.int64
    model = load_model(plan.checkpoint)
    spec = next(s for s in manifest.specs() if s.name == "edge_01_03")
    feeds = calibration_feeds(model, spec, tokens)
    assert len(feeds) == 4 and set(feeds[0]) == set(spec.inputs)
    with torch.inference_mode():
        ids = torch.from_numpy(tokens[1])[None]
        positions = torch.arange(16)[None]
        seq = model.new_sequence(0, 1)
        h = model.run_layers(model.embed_tokens(ids, positions), positions, 0, 1, [seq])
    np.testing.assert_allclose(feeds[1]["hidden_in"], h.numpy(), rtol=1e-6, atol=1e-6)
    assert feeds[0]["past_key_01"].shape == (1, manifest.num_kv_heads, 0, manifest.head_dim)
    with pytest.raises(ValueError, match="fewer than one block"):
        np.save(tmp_path / "short.npy", np.arange(5))
        read_calibration_tokens(tmp_path / "short.npy", plan.checkpoint, block=16)


def _build_engines(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "build" / "build_engines.py"), *argv],
                          capture_output=True, text=True, timeout=120)


def test_build_script_dry_run_and_help(tiny):
    plan, _ = tiny
    plan_file = str(plan.checkpoint / "partition_plan.json")
    done = _build_engines("--plan", plan_file, "--target", "cloud", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "cloud_04_06.plan" in done.stdout and "profile block" in done.stdout
    help_text = _build_engines("--help").stdout
    assert "--target {cloud,jetson}" in help_text and "--timing-cache" in help_text and "--int8" in help_text


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt imports here: the missing-TensorRT path cannot be shown")
def test_without_tensorrt_the_build_exits_2_and_says_where_to_build(tiny):
    plan, _ = tiny
    done = _build_engines("--plan", str(plan.checkpoint / "partition_plan.json"), "--target", "jetson")
    assert done.returncode == 2
    for words in ("TensorRT is not installed here", "JetPack", "nvcr.io/nvidia/tensorrt", "--runner onnx"):
        assert words in done.stderr, done.stderr
    from edge_runtime.runners import load_runner

    with pytest.raises(TensorRTUnavailable, match="`--runner onnx`.*`--runner torch` work"):
        load_runner("tensorrt", plan)


@pytest.mark.skipif(not HAS_TENSORRT, reason=NO_TENSORRT)
def test_tensorrt_engines_build_and_give_onnx_tokens(tiny, tmp_path):
    """Where TensorRT and a GPU exist: build the jetson engines for a tiny model and decode with them."""
    if not torch.cuda.is_available():
        pytest.skip("tensorrt imports but there is no CUDA GPU to build on")
    from edge_runtime.session import DecodingSession
    from edge_runtime.runners import load_runner
    from plugin.split.edge import EdgePartition
    from plugin.export.onnx import export_plan

    plan, _ = tiny
    onnx_dir = tmp_path / "onnx"
    export_plan(plan, onnx_dir)
    engines = tmp_path / "engines"
    done = _build_engines("--plan", str(plan.checkpoint / "partition_plan.json"), "--target", "jetson",
                          "--onnx-dir", str(onnx_dir), "--out", str(engines), "--fp32",
                          "--timing-cache", str(tmp_path / "timing.cache"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "timing.cache").is_file()
    prompt = [5, 17, 33, 2, 71]
    ref = DecodingSession(EdgePartition(load_runner("onnx", plan, onnx_dir=onnx_dir), plan), None, "standalone",
                          threshold=1.0).generate(prompt, 12)
    got = DecodingSession(EdgePartition(load_runner("tensorrt", plan, engine_dir=engines), plan), None, "standalone",
                          threshold=1.0).generate(prompt, 12)
    assert got.token_ids == ref.token_ids
