"""``RMSNormQKVRoPE``: a decoder layer's input norm, q/k/v projections, q/k norms and RoPE."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kpt.ops.rmsnorm_qkv_rope import rmsnorm_qkv_rope, rope_from_hf_config


class RMSNormQKVRoPE(nn.Module):
    """(Residual add +) RMSNorm -> fused QKV projection -> optional q/k norm -> RoPE.

    ``forward(x, positions, residual=None)`` returns ``(q, k, v)`` shaped (..., heads, head_dim)
    or ``(q, k, v, new_residual)``, through the fused op on whichever backend dispatch (or
    ``backend``) picks, in training as in inference: the op is differentiable in the input,
    the residual and every parameter.
    """

    def __init__(
        self,
        hidden_size: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        eps: float = 1e-6,
        bias: bool = False,
        qk_norm: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: Mapping[str, Any] | None = None,
        rotary_dim: int | None = None,
        rope_style: str = "neox",
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for arg, value in (("hidden_size", hidden_size), ("num_q_heads", num_q_heads),
                           ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        for arg, value in (("bias", bias), ("qk_norm", qk_norm)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: {arg} must be a bool, got {value!r}")
        if rope_scaling is not None and not isinstance(rope_scaling, Mapping):
            raise TypeError(f"{name}: rope_scaling must be a dict (HF's rope_scaling) or None, "
                            f"got {type(rope_scaling).__name__}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{name}: dtype must be a floating-point torch.dtype, got {dtype!r}")
        factory = {"device": device, "dtype": dtype}
        n_out = (num_q_heads + 2 * num_kv_heads) * head_dim
        self.hidden_size, self.head_dim = hidden_size, head_dim
        self.num_q_heads, self.num_kv_heads = num_q_heads, num_kv_heads
        self.eps, self.rope_style, self.backend = eps, rope_style, backend
        self.rotary_dim = head_dim if rotary_dim is None else rotary_dim
        self.rope_theta = rope_theta
        self.rope_scaling = dict(rope_scaling) if rope_scaling else None
        self.norm_weight = nn.Parameter(torch.ones(hidden_size, **factory))
        self.qkv_weight = nn.Parameter(torch.empty(n_out, hidden_size, **factory))
        self.qkv_bias = nn.Parameter(torch.zeros(n_out, **factory)) if bias else None
        self.q_norm_weight = nn.Parameter(torch.ones(head_dim, **factory)) if qk_norm else None
        self.k_norm_weight = nn.Parameter(torch.ones(head_dim, **factory)) if qk_norm else None
        nn.init.normal_(self.qkv_weight, std=hidden_size**-0.5)

    @classmethod
    def from_hf(cls, norm: nn.Module, attn: nn.Module, config: Any = None,
                backend: str | None = None, rotary_dim: int | None = None) -> RMSNormQKVRoPE:
        """Build from a HF decoder layer's ``input_layernorm`` and ``self_attn`` (Llama, Mistral,
        Qwen2, Qwen3 and alike: ``q_proj``/``k_proj``/``v_proj``, optional ``q_norm``/``k_norm``).
        The q/k/v weights are concatenated (copied) into one projection. ``rotary_dim``: the
        features the model really rotates per head (``2 * rotary_emb.inv_freq.numel()``);
        by default what the model's own rotary embedding class computes from ``attn.config``
        (a config's ``partial_rotary_factor`` is not enough: HF's Llama ignores it and rotates
        every feature), and the config's ``partial_rotary_factor`` only where the attention's
        module has no single such class."""
        if type(norm).__name__.startswith("Gemma"):
            raise ValueError(f"RMSNormQKVRoPE.from_hf: {type(norm).__name__} scales by "
                             f"(1 + weight); this op's RMSNorm scales by weight")
        config = config if config is not None else attn.config
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        theta, scaling, partial = rope_from_hf_config(cfg)
        head_dim = attn.head_dim
        weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        has_bias = attn.q_proj.bias is not None
        qk_norm = getattr(attn, "q_norm", None) is not None
        module = cls(
            weight.shape[1],
            attn.q_proj.weight.shape[0] // head_dim,
            attn.k_proj.weight.shape[0] // head_dim,
            head_dim,
            eps=float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))),
            bias=has_bias,
            qk_norm=qk_norm,
            rope_theta=theta,
            rope_scaling=scaling,
            rotary_dim=(_hf_rotary_dim(attn) or int(head_dim * partial)) if rotary_dim is None
            else rotary_dim,
            backend=backend,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            module.norm_weight.copy_(norm.weight)
            module.qkv_weight.copy_(weight)
            if has_bias:
                module.qkv_bias.copy_(
                    torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
            if qk_norm:
                module.q_norm_weight.copy_(attn.q_norm.weight)
                module.k_norm_weight.copy_(attn.k_norm.weight)
        return module

    def forward(self, x: Tensor, positions: Tensor, residual: Tensor | None = None):
        return rmsnorm_qkv_rope(
            x, self.norm_weight, self.qkv_weight, positions,
            num_q_heads=self.num_q_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, eps=self.eps, qkv_bias=self.qkv_bias,
            q_norm_weight=self.q_norm_weight, k_norm_weight=self.k_norm_weight,
            rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
            rotary_dim=self.rotary_dim, rope_style=self.rope_style, residual=residual,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, heads={self.num_q_heads}/{self.num_kv_heads}, "
                f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
                f"qk_norm={self.q_norm_weight is not None}, bias={self.qkv_bias is not None}")


def _hf_rotary_dim(attn: nn.Module) -> int | None:
    """Features per head that the HF model of ``attn`` rotates: twice the inverse frequencies
    its rotary embedding class (``<Model>RotaryEmbedding`` of the attention's module) computes
    from the layer's config; None where there is no single such class or it cannot be built
    from that config alone."""
    config = getattr(attn, "config", None)
    module = sys.modules.get(type(attn).__module__)
    if config is None or module is None:
        return None
    found = [c for name, c in vars(module).items() if name.endswith("RotaryEmbedding")
             and isinstance(c, type) and issubclass(c, nn.Module)]
    if len(found) != 1:
        return None
    try:
        with torch.device("cpu"):
            inv_freq = found[0](config=config).inv_freq
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError):
        return None  # another constructor or a config it cannot read: the config's factor
    return 2 * inv_freq.numel()
