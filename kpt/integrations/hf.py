"""``patch(model)``: swap kpt kernels into a HuggingFace transformers model, and undo it.

One table says what to replace per ``model_type``; one generic patcher applies it::

    handle = kpt.integrations.hf.patch(model)   # or patch(model, backend="triton")
    ...
    handle.unpatch()

Today's replacement fuses each decoder layer's input RMSNorm, q/k/v projections, Qwen3's q/k
norms and RoPE into one ``rmsnorm_qkv_rope`` call; attention itself, the KV cache and the MLP stay
HF's. The q/k/v projections are re-pointed at views of the fused weight, so memory does not grow
and ``unpatch`` restores the original modules exactly.
"""

from __future__ import annotations

import fnmatch
import logging
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kpt.nn.rmsnorm_qkv_rope import RMSNormQKVRoPE
from kpt.ops.rmsnorm_qkv_rope import _scaling_key, rope_from_hf_config

log = logging.getLogger("kpt")


def _fused_decoder_forward(self: nn.Module, hidden_states: torch.Tensor,
                           attention_mask: torch.Tensor | None = None,
                           position_ids: torch.Tensor | None = None,
                           past_key_values: Any = None, use_cache: bool | None = False,
                           position_embeddings: Any = None, cache: Any = None,
                           **kwargs: Any) -> torch.Tensor:
    """A Llama-style decoder layer whose attention input path runs as one fused op. The KV
    cache arrives as ``cache`` from transformers 5.24 on, as ``past_key_values`` before."""
    kv_cache = cache if cache is not None else past_key_values
    if position_ids is None:
        # The layer's own forward, with the cache under the name the caller used.
        if cache is not None:
            kwargs["cache"] = cache
        elif past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        return type(self).forward(self, hidden_states, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=use_cache,
                                  position_embeddings=position_embeddings, **kwargs)
    attn = self.self_attn
    residual = hidden_states
    q, k, v = self.kpt_qkv(hidden_states, position_ids)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kv_cache is not None:
        k, v = kv_cache.update(k, v, attn.layer_idx)
    attention = _attention_function(attn)
    out, _ = attention(
        attn, q, k, v, attention_mask,
        dropout=0.0 if not attn.training else attn.attention_dropout,
        scaling=attn.scaling,
        sliding_window=getattr(attn, "sliding_window", None),
        **kwargs,
    )
    out = attn.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous())
    hidden_states = residual + out
    residual = hidden_states
    hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
    return residual + hidden_states


def _attention_function(attn: nn.Module) -> Callable[..., Any]:
    impl = getattr(attn.config, "_attn_implementation", "eager") or "eager"
    if impl == "eager":
        return sys.modules[type(attn).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[impl]


def _layer_reasons(layer: nn.Module, config: Any) -> list[str]:
    reasons = []
    for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
        if not hasattr(layer, name):
            reasons.append(f"layer has no {name}")
    attn = getattr(layer, "self_attn", None)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx"):
        if attn is not None and not hasattr(attn, name):
            reasons.append(f"self_attn has no {name}")
    try:
        _scaling_key(rope_from_hf_config(config.to_dict())[1])
    except ValueError as err:
        reasons.append(str(err))
    return reasons


def _patch_decoder_layer(layer: nn.Module, config: Any, backend: str | None) -> Callable[[], None]:
    """Fuse one decoder layer's attention input path; returns the function that undoes it."""
    attn = layer.self_attn
    fused = RMSNormQKVRoPE.from_hf(layer.input_layernorm, attn, config, backend=backend)
    # Share parameters instead of duplicating them: the norms are the same objects, and q/k/v
    # become views of the fused projection.
    fused.norm_weight = layer.input_layernorm.weight
    if fused.q_norm_weight is not None:
        fused.q_norm_weight, fused.k_norm_weight = attn.q_norm.weight, attn.k_norm.weight
    originals = {name: getattr(attn, name).weight for name in ("q_proj", "k_proj", "v_proj")}
    original_bias = {name: getattr(attn, name).bias for name in ("q_proj", "k_proj", "v_proj")}
    start = 0
    for name in ("q_proj", "k_proj", "v_proj"):
        rows = originals[name].shape[0]
        proj = getattr(attn, name)
        proj.weight = nn.Parameter(fused.qkv_weight.data[start : start + rows],
                                   requires_grad=originals[name].requires_grad)
        if fused.qkv_bias is not None:
            proj.bias = nn.Parameter(fused.qkv_bias.data[start : start + rows],
                                     requires_grad=original_bias[name].requires_grad)
        start += rows
    layer.kpt_qkv = fused
    layer.forward = types.MethodType(_fused_decoder_forward, layer)

    def undo() -> None:
        for name in ("q_proj", "k_proj", "v_proj"):
            proj = getattr(attn, name)
            with torch.no_grad():
                originals[name].copy_(proj.weight)
                if original_bias[name] is not None:
                    original_bias[name].copy_(proj.bias)
            proj.weight = originals[name]
            proj.bias = original_bias[name]
        del layer.kpt_qkv
        del layer.forward

    return undo


# model_type -> {module path pattern: replacement}
PATCHES: dict[str, dict[str, Callable[[nn.Module, Any, str | None], Callable[[], None]]]] = {
    model_type: {"model.layers.*": _patch_decoder_layer}
    for model_type in ("llama", "mistral", "qwen2", "qwen3")
}


@dataclass
class PatchHandle:
    """What ``patch`` changed: ``patched`` module paths, ``skipped`` {path: reasons}."""

    model: nn.Module
    patched: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def unpatch(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.patched.clear()
        if getattr(self.model, "_kpt_patch", None) is self:
            del self.model._kpt_patch


def patch(model: nn.Module, *, backend: str | None = None, strict: bool = False) -> PatchHandle:
    """Swap kpt kernels into ``model`` in place; returns a handle whose ``unpatch()`` undoes it.

    Modules that cannot be patched are left alone and listed in ``handle.skipped`` with their
    reasons (``strict=True`` raises instead). A model type kpt has no table entry for raises.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PATCHES:
        raise ValueError(f"kpt.integrations.hf.patch: model_type {model_type!r} is not supported "
                         f"(supported: {sorted(PATCHES)})")
    if getattr(model, "_kpt_patch", None) is not None:
        raise ValueError("kpt.integrations.hf.patch: model is already patched; unpatch first")
    handle = PatchHandle(model)
    for path, module in model.named_modules():
        for pattern, replace in PATCHES[model_type].items():
            if not fnmatch.fnmatchcase(path, pattern) or "." in path[len(pattern) - 1 :]:
                continue
            reasons = _layer_reasons(module, config)
            if reasons:
                if strict:
                    raise ValueError(f"kpt.integrations.hf.patch: {path}: " + "; ".join(reasons))
                handle.skipped[path] = reasons
                continue
            handle._undo.append(replace(module, config, backend))
            handle.patched.append(path)
    model._kpt_patch = handle
    log.info("kpt: patched %d modules of %s (%d skipped)", len(handle.patched), model_type,
             len(handle.skipped))
    return handle


def unpatch(model: nn.Module) -> None:
    """Undo ``patch(model)``; a no-op when the model is not patched."""
    handle = getattr(model, "_kpt_patch", None)
    if handle is not None:
        handle.unpatch()
