"""The families the layer loop runs: how each one's config.json and weight names map onto it.

One section per family, as vLLM keeps one file per architecture: a reader that turns config.json
into a `ModelConfig` with the family's block features (what layers.py builds), and a weight map
from the checkpoint's tensors to the layer loop's parameters. Every field of a config is accounted
for: read and implemented, listed as leaving the forward pass alone (metadata, decoding defaults,
training-only settings), or refused with one line that names it, before anything runs. Fields no
reader lists are refused too: a checkpoint from a newer transformers may carry one that matters.
Missing fields take the defaults of transformers' own config class for that architecture.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Protocol, TYPE_CHECKING

import numpy as np

from plugin.model.config import LayerAttention, ModelConfig, Rope

if TYPE_CHECKING:  # the readers run without torch (an edge reads config.json); only the weight maps hand tensors on
    import torch


class CheckpointError(ValueError):
    """A checkpoint directory this project cannot load (one line that says why)."""


# Fields that do not change what the model computes, whatever their value.
METADATA = {
    "_name_or_path", "_model_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype",
    "dtype", "bos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "use_cache", "initializer_range",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "tokenizer_class", "chunk_size_feed_forward", "attn_implementation", "_attn_implementation_autoset",
    # decoding defaults of transformers' generate(); this project's decoding takes its own
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature", "top_k", "top_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "num_return_sequences", "task_specific_params",
}
_MISSING = object()


class ConfigFields:
    """A config.json consumed field by field; `done()` refuses whatever no reader took."""

    def __init__(self, raw: dict[str, Any]):
        self.raw = raw
        self.model_type = raw.get("model_type")
        self._left = {name for name in raw if name not in METADATA}

    def take(self, name: str, default: Any = _MISSING) -> Any:
        """A field the reader implements; `default` is transformers' default (none: the field is required)."""
        self._left.discard(name)
        value = self.raw.get(name, default)
        if value is _MISSING:
            raise CheckpointError(f"config.json of this {self.model_type} checkpoint lacks the field {name!r}")
        return value

    def expect(self, name: str, implemented: tuple, default: Any) -> Any:
        """A field whose other values would change the computation in a way the layer loop does not implement."""
        value = self.take(name, default)
        if value not in implemented:
            raise CheckpointError(f"config.json: {name} = {value!r} is not implemented for {self.model_type} "
                                  f"(implemented: {', '.join(repr(v) for v in implemented)})")
        return value

    def ignore(self, *names: str) -> None:
        """Fields of this architecture that only matter in training (dropout) or for other tasks."""
        self._left.difference_update(names)

    def done(self) -> None:
        if self._left:
            name = sorted(self._left)[0]
            raise CheckpointError(f"config.json: field {name!r} (= {self.raw[name]!r}) is not implemented for "
                                  f"{self.model_type}; refusing rather than ignoring it")


def _eos(f: ConfigFields, default: Any) -> tuple[int, ...]:
    eos = f.take("eos_token_id", default)
    return tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())


def _rope(f: ConfigFields, params: dict, where: str, max_positions: int) -> Rope:
    """A rotary embedding from Hugging Face rope parameters (rope_theta included): default, linear or llama3."""
    params = dict(params)
    kind = params.pop("rope_type", params.pop("type", "default"))
    theta = float(params.pop("rope_theta"))
    partial = params.pop("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise CheckpointError(f"config.json: {where}.partial_rotary_factor = {partial!r} is not implemented "
                              f"for {f.model_type} (implemented: 1.0)")

    def need(key: str) -> float:
        if key not in params:
            raise CheckpointError(f"config.json: {where} of rope_type {kind!r} lacks {key!r}")
        return float(params.pop(key))

    if kind == "default":
        rope = Rope(theta)
    elif kind == "linear":
        rope = Rope(theta, "linear", need("factor"))
    elif kind == "llama3":
        rope = Rope(theta, "llama3", need("factor"), need("low_freq_factor"), need("high_freq_factor"),
                    int(params.pop("original_max_position_embeddings", max_positions)))
    else:
        raise CheckpointError(f"config.json: {where}.rope_type = {kind!r} is not implemented for {f.model_type} "
                              "(implemented: 'default', 'linear', 'llama3')")
    if params:
        name = sorted(params)[0]
        raise CheckpointError(f"config.json: {where}.{name} (= {params[name]!r}) is not implemented for "
                              f"rope_type {kind!r}; refusing rather than ignoring it")
    return rope


def _window(f: ConfigFields, name: str, default: int | None) -> int | None:
    window = f.take(name, default)
    if window is not None and (not isinstance(window, int) or window < 1):
        raise CheckpointError(f"config.json: {name} = {window!r} is not implemented for {f.model_type} "
                              "(implemented: a positive number of positions, or null)")
    return window


def _layer_types(f: ConfigFields, types: list[str], layers: int) -> list[str]:
    if len(types) != layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise CheckpointError(f"config.json: layer_types must name {layers} layers, each 'sliding_attention' or "
                              f"'full_attention'; got {types!r} for {f.model_type}")
    return types


def _sizes(f: ConfigFields, kv_heads: int | None = None, head_dim: int | None = None,
           norm_eps: float = 1e-6) -> dict[str, Any]:
    """The sizes every config.json but GPT-2's names alike; the arguments are the family's defaults
    (None: as many KV heads as heads, hidden_size / heads per head)."""
    heads, hidden = f.take("num_attention_heads"), f.take("hidden_size")
    return dict(vocab_size=f.take("vocab_size"), hidden_size=hidden, num_layers=f.take("num_hidden_layers"),
                num_heads=heads, num_kv_heads=f.take("num_key_value_heads", kv_heads) or heads,
                head_dim=f.take("head_dim", head_dim) or hidden // heads,
                intermediate_size=f.take("intermediate_size"), norm_eps=f.take("rms_norm_eps", norm_eps))


def _llama_style(f: ConfigFields, max_positions: int, eos: int | None, kv_heads: int | None = None,
                 head_dim: int | None = None, norm_eps: float = 1e-6) -> tuple[dict[str, Any], Rope]:
    """What Llama, Mistral, Qwen and OLMo 2 configs name alike: the sizes, SiLU, one rotary for every layer
    (the arguments are the family's defaults). Returns ModelConfig fields and the rotary."""
    fields = dict(**_sizes(f, kv_heads, head_dim, norm_eps), eos_token_ids=_eos(f, eos),
                  max_positions=f.take("max_position_embeddings", max_positions),
                  tie_embeddings=f.take("tie_word_embeddings", False))
    f.expect("hidden_act", ("silu", "swish"), "silu")
    f.ignore("attention_dropout")
    # transformers' priority: rope_scaling (older configs) over rope_parameters; rope_theta fills in the base
    scaling, params = f.take("rope_scaling", None), f.take("rope_parameters", None)
    params = dict(scaling or params or {})
    params.setdefault("rope_theta", f.take("rope_theta", 10000.0))
    params.setdefault("partial_rotary_factor", f.take("partial_rotary_factor", 1.0))
    return fields, _rope(f, params, "rope_scaling" if scaling else "rope_parameters", fields["max_positions"])


def _qwen_windows(f: ConfigFields, layers: int) -> list[int | None]:
    """Qwen2Config and Qwen3Config: sliding_window applies only with use_sliding_window, on sliding_attention layers."""
    window = _window(f, "sliding_window", 4096)
    if not f.take("use_sliding_window", False):
        window = None
    first_local = f.take("max_window_layers", 28)
    types = f.take("layer_types", None) or [
        "sliding_attention" if window is not None and i >= first_local else "full_attention" for i in range(layers)]
    return [window if t == "sliding_attention" else None for t in _layer_types(f, types, layers)]


class Tensors(Protocol):
    """A checkpoint's tensors by name (checkpoint.py reads them from its safetensors files)."""

    def names(self) -> set[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


WeightMap = Callable[[Tensors, ModelConfig, range], "dict[str, torch.Tensor]"]  # our parameter name -> tensor


def _biases(cfg: ModelConfig) -> set[str]:
    return ({"attn.q_proj", "attn.k_proj", "attn.v_proj"} if cfg.bias_qkv else set()) | (
        {"attn.o_proj"} if cfg.bias_out else set()) | (
        {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} if cfg.bias_mlp else set())


def _model_layers(layer_names: Callable[[int], dict[str, str]]) -> WeightMap:
    """The weight map of a transformers decoder under `model.`: embeddings, final norm, and per layer
    `layer_names(i)`, our module -> the checkpoint's (biases as the config says)."""

    def weights(t: Tensors, cfg: ModelConfig, layers: range) -> dict[str, torch.Tensor]:
        state = {"embed.weight": t.get("model.embed_tokens.weight"), "final_norm.weight": t.get("model.norm.weight")}
        for i in layers:
            names = layer_names(i)
            state.update({f"layers.{i}.{ours}.weight": t.get(theirs + ".weight") for ours, theirs in names.items()})
            state.update({f"layers.{i}.{ours}.bias": t.get(names[ours] + ".bias") for ours in _biases(cfg)})
        return state

    return weights


# -- Llama, Qwen2, Mistral: RMSNorm before attention and MLP, SwiGLU, rotary ---------------------------
LLAMA_BLOCK: dict[str, Any] = dict(  # the block features the other families vary
    norm="rms", norm_offset=0.0, norm_weight_in_float=False, pre_norms=True, post_norms=False, qk_norm=None,
    mlp_gated=True, mlp_activation="silu", learned_positions=False)


def read_llama_family(f: ConfigFields) -> ModelConfig:
    mt = f.model_type
    fields, rope = _llama_style(f, {"llama": 2048, "mistral": 131072, "qwen2": 32768}[mt], None)
    f.ignore("pretraining_tp")  # tensor-parallel slicing, the same product
    windows: list[int | None] = [None] * fields["num_layers"]
    if mt == "mistral":  # one window on every layer (MistralConfig's default: 4096)
        windows = [_window(f, "sliding_window", 4096)] * fields["num_layers"]
    elif mt == "qwen2":
        windows = _qwen_windows(f, fields["num_layers"])
    bias_attn = {"llama": f.take("attention_bias", False), "mistral": False, "qwen2": True}[mt]
    return ModelConfig(
        arch="llama", **fields, **LLAMA_BLOCK, attention=tuple(LayerAttention(rope, w) for w in windows),
        bias_qkv=bias_attn, bias_out=bias_attn and mt == "llama",
        bias_mlp=f.take("mlp_bias", False) if mt == "llama" else False, attn_scale=None, embed_scale=None,
    )


def _projections(p: str) -> dict[str, str]:
    """Our module name -> the checkpoint's, for the attention's and the MLP's projections of the layer at `p`."""
    return {
        "attn.q_proj": p + "self_attn.q_proj", "attn.k_proj": p + "self_attn.k_proj",
        "attn.v_proj": p + "self_attn.v_proj", "attn.o_proj": p + "self_attn.o_proj",
        "mlp.gate_proj": p + "mlp.gate_proj", "mlp.up_proj": p + "mlp.up_proj", "mlp.down_proj": p + "mlp.down_proj",
    }


def llama_layer_weights(i: int) -> dict[str, str]:
    """Our module name -> the checkpoint's, for layer i."""
    p = f"model.layers.{i}."
    return {**_projections(p), "norm1": p + "input_layernorm", "norm2": p + "post_attention_layernorm"}


# -- Gemma 3 (text): (1 + w) RMSNorm, q/k norms, sandwich norms, GELU gate, local and global layers -------
GEMMA3_BLOCK = LLAMA_BLOCK | dict(norm_offset=1.0, norm_weight_in_float=True, post_norms=True, qk_norm="head",
                                  mlp_activation="gelu_tanh")


def read_gemma3(f: ConfigFields) -> ModelConfig:
    sizes = _sizes(f, kv_heads=4, head_dim=256)
    layers, hidden = sizes["num_layers"], sizes["hidden_size"]
    max_positions = f.take("max_position_embeddings", 131072)
    f.expect("hidden_activation", ("gelu_pytorch_tanh",), "gelu_pytorch_tanh")
    f.expect("final_logit_softcapping", (None,), None)
    f.expect("attn_logit_softcapping", (None,), None)
    f.expect("use_bidirectional_attention", (False, None), False)
    f.ignore("attention_dropout", "cache_implementation")  # cache_implementation: how HF stores KV, not what
    # before layer_types, every pattern-th layer was global; transformers re-derives _sliding_window_pattern
    pattern = f.take("sliding_window_pattern", 6)
    f.ignore("_sliding_window_pattern")
    types = _layer_types(f, f.take("layer_types", None) or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)], layers)
    window = _window(f, "sliding_window", 4096)
    if window is None and "sliding_attention" in types:
        raise CheckpointError("config.json: sliding_window = None is not implemented for gemma3_text "
                              "(its sliding_attention layers need a window)")
    # Gemma3TextConfig: rope_parameters per layer type, or (older configs) rope_theta / rope_local_base_freq
    # with rope_scaling applying to the global layers only
    nested = dict(f.take("rope_parameters", None) or {})
    scaling = f.take("rope_scaling", None)
    global_params = {**(nested.pop("full_attention", None) or {}), **(scaling or {})}
    local_params = dict(nested.pop("sliding_attention", None) or {})
    if nested:
        raise CheckpointError(f"config.json: rope_parameters.{sorted(nested)[0]} is not implemented for gemma3_text "
                              "(implemented: full_attention, sliding_attention)")
    global_params.setdefault("rope_theta", f.take("rope_theta", 1_000_000.0))
    local_params.setdefault("rope_theta", f.take("rope_local_base_freq", 10_000.0))
    ropes = {"full_attention": _rope(f, global_params, "rope_parameters.full_attention", max_positions),
             "sliding_attention": _rope(f, local_params, "rope_parameters.sliding_attention", max_positions)}
    bias = f.take("attention_bias", False)
    return ModelConfig(
        arch="gemma3", **sizes, max_positions=max_positions,
        attention=tuple(LayerAttention(ropes[t], window if t == "sliding_attention" else None) for t in types),
        eos_token_ids=_eos(f, 1), tie_embeddings=f.take("tie_word_embeddings", True), **GEMMA3_BLOCK,
        bias_qkv=bias, bias_out=bias, bias_mlp=False, attn_scale=f.take("query_pre_attn_scalar", 256) ** -0.5,
        embed_scale=float(np.float32(math.sqrt(hidden))),  # as Gemma3TextScaledWordEmbedding
    )


def gemma3_layer_weights(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        **_projections(p), "attn.q_norm": p + "self_attn.q_norm", "attn.k_norm": p + "self_attn.k_norm",
        "norm1": p + "input_layernorm", "post_attn_norm": p + "post_attention_layernorm",
        "norm2": p + "pre_feedforward_layernorm", "post_mlp_norm": p + "post_feedforward_layernorm",
    }


# -- Qwen3: the Llama block with a norm on each query and key head ------------------------------------
QWEN3_BLOCK = LLAMA_BLOCK | dict(qk_norm="head")


def read_qwen3(f: ConfigFields) -> ModelConfig:
    fields, rope = _llama_style(f, 32768, None, kv_heads=32, head_dim=128)
    bias = f.take("attention_bias", False)
    return ModelConfig(
        arch="qwen3", **fields, **QWEN3_BLOCK,
        attention=tuple(LayerAttention(rope, w) for w in _qwen_windows(f, fields["num_layers"])),
        bias_qkv=bias, bias_out=bias, bias_mlp=False, attn_scale=None, embed_scale=None,
    )


def qwen3_layer_weights(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {**llama_layer_weights(i), "attn.q_norm": p + "self_attn.q_norm", "attn.k_norm": p + "self_attn.k_norm"}


# -- OLMo 2: norms on the attention's and the MLP's output only, q/k norms over all heads at once -------
OLMO2_BLOCK = LLAMA_BLOCK | dict(norm_weight_in_float=True, pre_norms=False, post_norms=True, qk_norm="width")


def read_olmo2(f: ConfigFields) -> ModelConfig:
    fields, rope = _llama_style(f, 2048, 50279, norm_eps=1e-5)
    bias = f.take("attention_bias", False)
    return ModelConfig(
        arch="olmo2", **fields, **OLMO2_BLOCK, attention=(LayerAttention(rope),) * fields["num_layers"],
        bias_qkv=bias, bias_out=bias, bias_mlp=False, attn_scale=None, embed_scale=None,
    )


def olmo2_layer_weights(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        **_projections(p), "attn.q_norm": p + "self_attn.q_norm", "attn.k_norm": p + "self_attn.k_norm",
        "post_attn_norm": p + "post_attention_layernorm", "post_mlp_norm": p + "post_feedforward_layernorm",
    }


# -- GPT-2: LayerNorm, GELU MLP, learned positions -----------------------------------------------------
GPT2_BLOCK = LLAMA_BLOCK | dict(norm="layer", mlp_gated=False, mlp_activation="gelu_tanh", learned_positions=True)


def read_gpt2(f: ConfigFields) -> ModelConfig:
    hidden, heads, layers = f.take("n_embd"), f.take("n_head"), f.take("n_layer")
    f.expect("activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
    f.expect("scale_attn_weights", (True,), True)
    f.expect("scale_attn_by_inverse_layer_idx", (False,), False)
    f.expect("reorder_and_upcast_attn", (False,), False)
    f.expect("add_cross_attention", (False,), False)
    f.ignore("resid_pdrop", "embd_pdrop", "attn_pdrop", "n_ctx", "summary_type", "summary_use_proj",
             "summary_activation", "summary_proj_to_labels", "summary_first_dropout")  # summary_*: GPT2DoubleHeads
    return ModelConfig(
        arch="gpt2", vocab_size=f.take("vocab_size"), hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, intermediate_size=f.take("n_inner", None) or 4 * hidden,
        norm_eps=f.take("layer_norm_epsilon", 1e-5), max_positions=f.take("n_positions", 1024),
        attention=(LayerAttention(None),) * layers, eos_token_ids=_eos(f, 50256),
        tie_embeddings=f.take("tie_word_embeddings", True), **GPT2_BLOCK, bias_qkv=True, bias_out=True,
        bias_mlp=True, attn_scale=None, embed_scale=None,
    )


def gpt2_weights(t: Tensors, cfg: ModelConfig, layers: range) -> dict[str, torch.Tensor]:
    """GPT-2's names, under `transformer.` (GPT2LMHeadModel) or not (GPT2Model)."""
    prefix = "transformer." if "transformer.wte.weight" in t.names() else ""
    state = {"embed.weight": t.get(prefix + "wte.weight"), "pos_embed.weight": t.get(prefix + "wpe.weight"),
             "final_norm.weight": t.get(prefix + "ln_f.weight"), "final_norm.bias": t.get(prefix + "ln_f.bias")}
    for i in layers:
        state.update({f"layers.{i}.{name}": w for name, w in _gpt2_layer(t, f"{prefix}h.{i}.").items()})
    return state


def _gpt2_layer(t: Tensors, p: str) -> dict[str, torch.Tensor]:
    # GPT-2's Conv1D stores [in, out]; nn.Linear wants [out, in]. c_attn holds q, k and v.
    q, k, v = t.get(p + "attn.c_attn.weight").t().chunk(3, dim=0)
    qb, kb, vb = t.get(p + "attn.c_attn.bias").chunk(3)
    return {
        "norm1.weight": t.get(p + "ln_1.weight"), "norm1.bias": t.get(p + "ln_1.bias"),
        "norm2.weight": t.get(p + "ln_2.weight"), "norm2.bias": t.get(p + "ln_2.bias"),
        "attn.q_proj.weight": q, "attn.k_proj.weight": k, "attn.v_proj.weight": v,
        "attn.q_proj.bias": qb, "attn.k_proj.bias": kb, "attn.v_proj.bias": vb,
        "attn.o_proj.weight": t.get(p + "attn.c_proj.weight").t(), "attn.o_proj.bias": t.get(p + "attn.c_proj.bias"),
        "mlp.up_proj.weight": t.get(p + "mlp.c_fc.weight").t(), "mlp.up_proj.bias": t.get(p + "mlp.c_fc.bias"),
        "mlp.down_proj.weight": t.get(p + "mlp.c_proj.weight").t(), "mlp.down_proj.bias": t.get(p + "mlp.c_proj.bias"),
    }


READERS: dict[str, Callable[[ConfigFields], ModelConfig]] = {
    "llama": read_llama_family, "mistral": read_llama_family, "qwen2": read_llama_family,
    "gemma3_text": read_gemma3, "qwen3": read_qwen3, "olmo2": read_olmo2, "gpt2": read_gpt2,
}
WEIGHT_MAPS: dict[str, WeightMap] = {  # ModelConfig.arch -> its weight map
    "llama": _model_layers(llama_layer_weights), "gemma3": _model_layers(gemma3_layer_weights),
    "qwen3": _model_layers(qwen3_layer_weights), "olmo2": _model_layers(olmo2_layer_weights), "gpt2": gpt2_weights,
}


def config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a config.json, or one CheckpointError line naming the field that is not implemented."""
    model_type = raw.get("model_type")
    reader = READERS.get(model_type)
    if reader is None:
        raise CheckpointError(f"model_type {model_type!r} is not supported; supported: {sorted(READERS)}")
    f = ConfigFields(raw)
    f.expect("is_encoder_decoder", (False,), False)
    cfg = reader(f)
    f.done()
    return cfg


def partition_weights(t: Tensors, cfg: ModelConfig, layers: range) -> dict[str, torch.Tensor]:
    """The parameters of a DecoderModel holding `layers`, by our names, except a tied LM head."""
    return WEIGHT_MAPS[cfg.arch](t, cfg, layers)
