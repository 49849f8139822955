"""Config fields: each one implemented or refused, in one line naming it, before anything runs (both CLIs too).

Also what the readers implement beyond the exactness tests: rope frequencies as transformers computes
them, older config formats, per-layer windows, an untied LM head.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from edge_runtime.cloud_only import CloudOnlySession
from edge_runtime.torch_runner import TorchRunner
from edge_runtime.session import DecodingSession
from plugin.model.architectures import CheckpointError, config_from_dict
from plugin.model.checkpoint import load_model, read_config
from plugin.model.layers import rope_inv_freq
from plugin.protocol.errors import ErrorCode, ProtocolError
from plugin.split.edge import EdgePartition
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan
from tests.tiny_models import save_tiny

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, dict]:
    """kind -> config.json of a tiny checkpoint as transformers saves it."""
    out = {}
    for kind in ("llama", "gemma3", "mistral", "gpt2", "qwen3", "olmo2"):
        path = tmp_path_factory.mktemp(kind)
        save_tiny(kind, path)
        out[kind] = json.loads((path / "config.json").read_text())
    return out


REFUSED = [  # (kind, fields changed, the field the message must name)
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type"),
    ("llama", {"rope_parameters": {**LLAMA3_ROPE, "beta_fast": 32}}, "beta_fast"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("llama", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ("llama", {"some_future_field": 1}, "some_future_field"),
    ("llama", {"sliding_window": 16}, "sliding_window"),  # LlamaConfig has none: a Mistral saved as llama
    ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3", {"hidden_activation": "gelu"}, "hidden_activation"),
    ("gemma3", {"layer_types": ["chunked_attention"] * 6}, "layer_types"),
    ("mistral", {"sliding_window": 0}, "sliding_window"),
    ("mistral", {"layer_types": ["full_attention"] * 6}, "layer_types"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("gpt2", {"activation_function": "relu"}, "activation_function"),
    ("qwen3", {"hidden_act": "gelu"}, "hidden_act"),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_type"),
    ("qwen3", {"layer_types": ["chunked_attention"] * 6}, "layer_types"),
    ("olmo2", {"hidden_act": "gelu"}, "hidden_act"),
    ("olmo2", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("olmo2", {"sliding_window": 16}, "sliding_window"),  # Olmo2Config has none
    ("gpt2", {"model_type": "falcon"}, "model_type"),
]


@pytest.mark.parametrize("kind, change, field", REFUSED, ids=[f"{k}-{f}" for k, _, f in REFUSED])
def test_unimplemented_fields_are_refused_in_one_line(configs, kind, change, field):
    with pytest.raises(CheckpointError) as refused:
        config_from_dict({**configs[kind], **change})
    message = str(refused.value)
    assert field in message and "\n" not in message, message


def test_fields_that_leave_the_computation_alone_are_accepted(configs):
    extra = {"torch_dtype": "bfloat16", "attention_dropout": 0.1, "pretraining_tp": 2, "id2label": {"0": "a"},
             "_name_or_path": "x", "max_length": 20}
    assert config_from_dict({**configs["llama"], **extra}) == config_from_dict(configs["llama"])


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0}],
                         ids=["llama3", "linear"])
def test_rope_frequencies_are_transformers_own(rope):
    hf_cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=32, rope_parameters=dict(rope))
    expected, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
    cfg = config_from_dict(hf_cfg.to_dict())
    ours = rope_inv_freq(cfg.attention[0].rope, 32)
    assert torch.equal(ours, expected)
    plain = config_from_dict(LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=32).to_dict())
    assert not torch.equal(ours, rope_inv_freq(plain.attention[0].rope, 32))


def test_llama31_config_in_the_older_format():
    """Llama 3.1's config.json as published: rope_theta and rope_scaling at the top level."""
    raw = {**LlamaConfig(num_hidden_layers=2).to_dict(), "rope_theta": 500_000.0,
           "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}}
    del raw["rope_parameters"]
    rope = config_from_dict(raw).attention[0].rope
    assert (rope.scaling, rope.theta, rope.factor, rope.original_max_positions) == ("llama3", 500_000.0, 8.0, 64)


def test_gemma3_config_in_the_older_format():
    """Gemma 3's text config as published (4B): rope_theta, rope_local_base_freq, rope_scaling for the global layers."""
    raw = {**Gemma3TextConfig(num_hidden_layers=12).to_dict(), "rope_theta": 1_000_000.0,
           "rope_local_base_freq": 10_000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
           "sliding_window_pattern": 6}
    del raw["rope_parameters"], raw["layer_types"]
    cfg = config_from_dict(raw)
    assert [a.window is None for a in cfg.attention] == [(i + 1) % 6 == 0 for i in range(12)]
    local, glob = cfg.attention[0].rope, cfg.attention[5].rope
    assert (local.theta, local.scaling) == (10_000.0, "default")
    assert (glob.theta, glob.scaling, glob.factor) == (1_000_000.0, "linear", 8.0)


@pytest.mark.parametrize("config_class, biases", [(Qwen2Config, (True, False)), (Qwen3Config, (False, False))],
                         ids=["qwen2", "qwen3"])
def test_qwen_sliding_layers_follow_transformers_layer_types(config_class, biases):
    hf_cfg = config_class(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, use_sliding_window=True,
                          sliding_window=8, max_window_layers=2)
    cfg = config_from_dict(hf_cfg.to_dict())
    assert [a.window for a in cfg.attention] == [8 if t == "sliding_attention" else None for t in hf_cfg.layer_types]
    assert [a.window for a in cfg.attention] == [None, None, 8, 8]
    assert (cfg.bias_qkv, cfg.bias_out) == biases


def test_untied_lm_head_is_loaded(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=96, tie_word_embeddings=False, initializer_range=0.08))
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.float64)
    assert not read_config(tmp_path).tie_embeddings and model.lm_head.weight is not model.embed.weight
    ids = torch.tensor([[3, 14, 15, 92, 6]])
    seq = model.new_sequence(0, 2)
    positions = torch.arange(5)[None]
    with torch.no_grad():
        h = model.run_layers(model.embed_tokens(ids, positions), positions, 0, 2, [seq])
        torch.testing.assert_close(model.exit_logits(h, 2), hf.double()(ids).logits, rtol=1e-6, atol=1e-6)


def test_tied_lm_head_is_one_parameter(tmp_path):
    save_tiny("gemma3", tmp_path)
    model = load_model(tmp_path, dtype=torch.float64)
    assert model.lm_head.weight is model.embed.weight and model.dtype == torch.float64


@pytest.fixture(scope="module")
def refused_plans(tmp_path_factory, configs) -> dict[str, Path]:
    """Checkpoints an independent check found served silently wrong before: now refused by read_config."""
    plans = {}
    for name, change in {"hidden_act": {"hidden_act": "gelu"},
                         "rope_type": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}}.items():
        path = tmp_path_factory.mktemp(name)
        save_tiny("llama", path)
        (path / "config.json").write_text(json.dumps({**configs["llama"], **change}))
        PartitionPlan(path, 4, (2, 4)).save(path / "partition_plan.json")
        plans[name] = path / "partition_plan.json"
    return plans


@pytest.mark.parametrize("field", ["hidden_act", "rope_type"])
@pytest.mark.parametrize("cli", ["ce-collm configs", "ce-collm-edge generate"])
def test_both_clis_refuse_before_anything_runs(refused_plans, tmp_path, cli, field):
    plan = str(refused_plans[field])
    cmd = {"ce-collm configs": ["plugin.cli", "configs", "--plan", plan, "--out", str(tmp_path / "repo")],
           "ce-collm-edge generate": ["edge_runtime.cli", "generate", "--mode", "standalone", "--plan", plan,
                                      "--prompt", "x"]}[cli]
    done = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and field in done.stderr, done.stderr[-2000:]
    assert f"{field} = " in done.stderr  # the refusal's own line, with the value that is not implemented
    assert not (tmp_path / "repo").exists()  # nothing written


def test_a_context_past_gpt2s_learned_positions_is_refused_naming_the_limit(tmp_path):
    """GPT-2 has n_positions learned positions (the tiny one 256): the cloud's max_context is capped to them, so
    a longer context is LIMIT_EXCEEDED (not "re-send with START", which could only fail again), and the edge
    stops with one line naming them instead of an IndexError."""
    save_tiny("gpt2", tmp_path)
    save_tiny("llama", tmp_path / "rotary")
    assert read_config(tmp_path).position_limit == 256 and read_config(tmp_path / "rotary").position_limit is None
    with pytest.raises(ProtocolError) as refused:
        CloudOnlySession(LocalCloud(load_model(tmp_path)), sequence_id=1).generate([1] * 250, 10)
    assert refused.value.code is ErrorCode.LIMIT_EXCEEDED and "limit of 256" in str(refused.value)
    edge = EdgePartition(TorchRunner(load_model(tmp_path, range(0, 4))), PartitionPlan(tmp_path, 4, (2, 4), 1.0))
    with pytest.raises(ValueError, match="past the model's 256 learned positions"):
        DecodingSession(edge, None, "standalone").generate([1] * 250, 10)

