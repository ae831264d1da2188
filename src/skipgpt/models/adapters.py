"""Architecture adapters: find the decoder layers, attention, MLP and norms of a HF causal LM.

A model is supported when its config's model_type is one whose layers skipgpt reproduces (SUPPORTED_TYPES)
and its layers have the expected parts: a pre-norm decoder layer with `self_attn` (separate q/k/v/o
projections), `mlp`, `input_layernorm` and `post_attention_layernorm` is the LLaMA shape (Llama 2/3,
Mistral, Qwen2, Qwen3, SmolLM2); one that also has `pre_feedforward_layernorm`/`post_feedforward_layernorm`
is the Gemma-2/3 "sandwich" shape. Structure alone is not enough: LLaMA-shaped relatives scale the
residual (Granite), clip q/k/v (OLMo), rotate interleaved pairs or part of each head (Helium, StableLM,
GLM) or leave RoPE out of some layers (SmolLM3), which the routed layer would silently get wrong.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..routing.sparsity import ModuleCosts

SUPPORTED = "Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2 (LLaMA-shaped) and Gemma 2/3 (sandwich norms)"
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text")  # config.model_type


@dataclass
class LayerParts:
    """The pieces of one decoder layer that routing needs. Sandwich models normalise module outputs too."""

    layer: nn.Module
    attn: nn.Module
    mlp: nn.Module
    attn_norm: nn.Module
    mlp_norm: nn.Module
    attn_out_norm: nn.Module | None = None
    mlp_out_norm: nn.Module | None = None

    @property
    def sandwich(self) -> bool:
        return self.attn_out_norm is not None


def unwrap(model: nn.Module) -> nn.Module:
    """The HF causal LM inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def find_decoder(model: nn.Module) -> nn.Module:
    model = unwrap(model)
    decoder = getattr(model, "model", None)
    if isinstance(getattr(getattr(decoder, "language_model", None), "layers", None), nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__} is a multimodal model; skipgpt routes text-only causal LMs (for Gemma 3, "
            f"the gemma3_text checkpoints such as gemma-3-1b, loaded as Gemma3ForCausalLM)"
        )
    if decoder is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__}: no decoder with a `layers` list found; skipgpt supports {SUPPORTED}"
        )
    return decoder


def _need(obj: nn.Module, name: str, where: str) -> nn.Module:
    sub = getattr(obj, name, None)
    if not isinstance(sub, nn.Module):
        raise UnsupportedModelError(f"{where} has no `{name}` module; skipgpt supports {SUPPORTED}")
    return sub


def layer_parts(layer: nn.Module, index: int) -> LayerParts:
    where = f"decoder layer {index} ({type(layer).__name__})"
    attn = _need(layer, "self_attn", where)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        _need(attn, proj, f"{where}.self_attn")
    mlp = _need(layer, "mlp", where)
    input_norm = _need(layer, "input_layernorm", where)
    post_attn = _need(layer, "post_attention_layernorm", where)
    pre_ff = getattr(layer, "pre_feedforward_layernorm", None)
    post_ff = getattr(layer, "post_feedforward_layernorm", None)
    if pre_ff is not None or post_ff is not None:
        if not (isinstance(pre_ff, nn.Module) and isinstance(post_ff, nn.Module)):
            raise UnsupportedModelError(f"{where} has only one feed-forward norm; skipgpt supports {SUPPORTED}")
        return LayerParts(layer, attn, mlp, input_norm, pre_ff, attn_out_norm=post_attn, mlp_out_norm=post_ff)
    return LayerParts(layer, attn, mlp, input_norm, post_attn)


def find_layers(model: nn.Module) -> list[LayerParts]:
    kind = getattr(unwrap(model).config, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        raise UnsupportedModelError(f"model type {kind!r} is not supported; skipgpt supports {SUPPORTED}")
    decoder = find_decoder(model)
    if len(decoder.layers) == 0:
        raise UnsupportedModelError("the model has no decoder layers")
    return [layer_parts(layer, i) for i, layer in enumerate(decoder.layers)]


def _numel(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n)


def _weight_numel(linear: nn.Module) -> int:
    return _numel(linear)


def module_costs(model: nn.Module, layers: list[LayerParts], forecaster_params: int = 0,
                 router_params: int = 0) -> ModuleCosts:
    """Parameters and FLOPs of every module; a skipped token is charged `forecaster_params` (and twice as
    many FLOPs) for the forecaster that stands in for the module (0 = plain skip), and every token whose routers
    decide `router_params` per module (twice as many FLOPs) for its two routers."""
    config = unwrap(model).config
    rows = []
    for p in layers:
        a = p.attn
        heads = config.num_attention_heads
        head_dim = getattr(a, "head_dim", config.hidden_size // heads)
        q_o = _weight_numel(a.q_proj) + _weight_numel(a.o_proj)
        k_v = _weight_numel(a.k_proj) + _weight_numel(a.v_proj)
        attn_params = _numel(a) + _numel(p.attn_norm) + _numel(p.attn_out_norm)
        mlp_params = _numel(p.mlp) + _numel(p.mlp_norm) + _numel(p.mlp_out_norm)
        # Gemma 2/3 and Qwen2/3 name each layer's window on its attention module; Mistral's applies to all
        window = getattr(a, "sliding_window", None) if hasattr(a, "sliding_window") else getattr(
            config, "sliding_window", None)
        rows.append((attn_params, mlp_params, 2.0 * q_o, 2.0 * k_v, 4.0 * heads * head_dim, 2.0 * _numel(p.mlp),
                     forecaster_params, 2.0 * forecaster_params, float(window or "inf"), 2.0 * router_params,
                     4.0 * router_params))
    t = torch.tensor(rows, dtype=torch.float64)
    return ModuleCosts(*(t[:, i].contiguous() for i in range(t.shape[1])))


def fingerprint(model: nn.Module, samples: int = 256) -> str:
    """A cheap identity of the base weights: names, shapes and a strided sample of values.

    Values are rounded to bfloat16 so the same weights loaded in fp32, fp16-free bf16 or dequantised
    from GGUF agree; LoRA parameters and PEFT name prefixes are ignored, so a base with an adapter
    attached keeps the fingerprint of the base.
    """
    h = hashlib.sha256()
    for name, param in sorted(unwrap(model).named_parameters(), key=lambda kv: kv[0]):
        if "lora_" in name:
            continue
        name = name.replace(".base_layer", "")
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step][:samples].to("cpu", torch.bfloat16).float()
        h.update(f"{name}:{tuple(param.shape)};".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
