"""Load a local Hugging Face checkpoint into the project's own layer loop. Nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from plugin.model.config import ModelConfig
from plugin.model.decoder import DecoderModel, ExitAdapter

LLAMA_STYLE = ("llama", "qwen2", "mistral")


class CheckpointError(ValueError):
    """A checkpoint directory this project cannot load."""


def read_config(checkpoint: str | Path) -> ModelConfig:
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: pass a local Hugging Face checkpoint directory")
    raw = json.loads(path.read_text())
    model_type = raw.get("model_type")
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    if model_type in LLAMA_STYLE:
        rope = raw.get("rope_parameters") or {"rope_theta": raw.get("rope_theta", 10000.0)}
        if rope.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
            raise CheckpointError(f"rope scaling {rope} is not supported yet; only default rotary embeddings")
        heads = raw["num_attention_heads"]
        return ModelConfig(
            arch="llama", vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"], num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            intermediate_size=raw["intermediate_size"], norm_eps=raw["rms_norm_eps"],
            rope_theta=float(rope["rope_theta"]), max_positions=raw.get("max_position_embeddings", 2048),
            eos_token_ids=eos_ids,
        )
    if model_type == "gpt2":
        hidden, heads = raw["n_embd"], raw["n_head"]
        return ModelConfig(
            arch="gpt2", vocab_size=raw["vocab_size"], hidden_size=hidden, num_layers=raw["n_layer"],
            num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
            intermediate_size=raw.get("n_inner") or 4 * hidden, norm_eps=raw["layer_norm_epsilon"],
            rope_theta=None, max_positions=raw["n_positions"], eos_token_ids=eos_ids,
        )
    raise CheckpointError(f"model_type {model_type!r} is not supported; supported: {LLAMA_STYLE + ('gpt2',)}")


class _Tensors:
    """Lazy access to the tensors of one or many safetensors files, by name."""

    def __init__(self, checkpoint: Path):
        index = checkpoint / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: checkpoint / f for name, f in weight_map.items()}
        elif (checkpoint / "model.safetensors").is_file():
            with safe_open(checkpoint / "model.safetensors", "pt") as f:
                self._files = {name: checkpoint / "model.safetensors" for name in f.keys()}
        else:
            raise CheckpointError(f"no model.safetensors (or index) in {checkpoint}; convert the weights to safetensors")
        self._open: dict[Path, object] = {}

    def names(self) -> set[str]:
        return set(self._files)

    def get(self, name: str) -> torch.Tensor:
        path = self._files.get(name)
        if path is None:
            raise CheckpointError(f"tensor {name!r} missing from the checkpoint")
        if path not in self._open:
            self._open[path] = safe_open(path, "pt")
        return self._open[path].get_tensor(name)


def _llama_weights(t: _Tensors, i: int) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."
    names = t.names()
    out = {
        "norm1.weight": t.get(p + "input_layernorm.weight"),
        "norm2.weight": t.get(p + "post_attention_layernorm.weight"),
    }
    for ours, theirs in [("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"),
                         ("attn.v_proj", "self_attn.v_proj"), ("attn.o_proj", "self_attn.o_proj"),
                         ("mlp.gate_proj", "mlp.gate_proj"), ("mlp.up_proj", "mlp.up_proj"),
                         ("mlp.down_proj", "mlp.down_proj")]:
        out[ours + ".weight"] = t.get(p + theirs + ".weight")
        if p + theirs + ".bias" in names:
            out[ours + ".bias"] = t.get(p + theirs + ".bias")
    return out


def _gpt2_weights(t: _Tensors, prefix: str, i: int) -> dict[str, torch.Tensor]:
    p = f"{prefix}h.{i}."
    # GPT-2's Conv1D stores [in, out]; nn.Linear wants [out, in].
    q, k, v = t.get(p + "attn.c_attn.weight").t().chunk(3, dim=0)
    qb, kb, vb = t.get(p + "attn.c_attn.bias").chunk(3)
    return {
        "norm1.weight": t.get(p + "ln_1.weight"), "norm1.bias": t.get(p + "ln_1.bias"),
        "norm2.weight": t.get(p + "ln_2.weight"), "norm2.bias": t.get(p + "ln_2.bias"),
        "attn.q_proj.weight": q, "attn.k_proj.weight": k, "attn.v_proj.weight": v,
        "attn.q_proj.bias": qb, "attn.k_proj.bias": kb, "attn.v_proj.bias": vb,
        "attn.o_proj.weight": t.get(p + "attn.c_proj.weight").t(), "attn.o_proj.bias": t.get(p + "attn.c_proj.bias"),
        "mlp.fc.weight": t.get(p + "mlp.c_fc.weight").t(), "mlp.fc.bias": t.get(p + "mlp.c_fc.bias"),
        "mlp.proj.weight": t.get(p + "mlp.c_proj.weight").t(), "mlp.proj.bias": t.get(p + "mlp.c_proj.bias"),
    }


def load_model(checkpoint: str | Path, layer_range: range | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", exit_adapters: str | Path | None = None) -> DecoderModel:
    """Build a DecoderModel holding `layer_range` (default: all layers) from a local checkpoint."""
    checkpoint = Path(checkpoint)
    cfg = read_config(checkpoint)
    layer_range = layer_range if layer_range is not None else range(cfg.num_layers)
    if layer_range.start < 0 or layer_range.stop > cfg.num_layers:
        raise CheckpointError(f"layers {layer_range} outside the checkpoint's {cfg.num_layers} layers")
    t = _Tensors(checkpoint)
    names = t.names()
    state: dict[str, torch.Tensor] = {}
    if cfg.arch == "gpt2":
        prefix = "transformer." if "transformer.wte.weight" in names else ""
        biases = {"bias_qkv": True, "bias_out": True}
        state["embed.weight"] = t.get(prefix + "wte.weight")
        state["pos_embed.weight"] = t.get(prefix + "wpe.weight")
        state["final_norm.weight"] = t.get(prefix + "ln_f.weight")
        state["final_norm.bias"] = t.get(prefix + "ln_f.bias")
        head = "lm_head.weight" if "lm_head.weight" in names else prefix + "wte.weight"
        for i in layer_range:
            state.update({f"layers.{i}.{k}": w for k, w in _gpt2_weights(t, prefix, i).items()})
    else:
        first = f"model.layers.{layer_range.start if len(layer_range) else 0}."
        biases = {
            "bias_qkv": first + "self_attn.q_proj.bias" in names,
            "bias_out": first + "self_attn.o_proj.bias" in names,
            "bias_mlp": first + "mlp.gate_proj.bias" in names,
        }
        state["embed.weight"] = t.get("model.embed_tokens.weight")
        state["final_norm.weight"] = t.get("model.norm.weight")
        head = "lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight"
        for i in layer_range:
            state.update({f"layers.{i}.{k}": w for k, w in _llama_weights(t, i).items()})
    state["lm_head.weight"] = t.get(head)
    with torch.device("meta"):
        model = DecoderModel(cfg, layer_range, biases)
    model.load_state_dict(state, strict=True, assign=True)
    if exit_adapters is not None:
        _load_exit_adapters(model, Path(exit_adapters))
    model.to(device=device, dtype=dtype)
    return model.eval()


def _load_exit_adapters(model: DecoderModel, path: Path) -> None:
    """Adapters are saved as `exit.<layer>.down.weight` / `exit.<layer>.up.weight`."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    layers = sorted({int(name.split(".")[1]) for name in tensors})
    for layer in layers:
        down = tensors[f"exit.{layer}.down.weight"]
        adapter = ExitAdapter(model.cfg.hidden_size, down.shape[0])
        adapter.load_state_dict({"down.weight": down, "up.weight": tensors[f"exit.{layer}.up.weight"]})
        model.exit_adapters[str(layer)] = adapter
