"""kpt inside HuggingFace transformers models.

Importing this module registers ``"kpt"`` as a transformers attention implementation, so
``from_pretrained(..., attn_implementation="kpt")`` and ``model.set_attn_implementation("kpt")``
run kpt's ``flash_attention`` (padding masks become varlen sequences; see
``kpt.integrations._hf_attention``). ``patch(model)`` goes further, per one table
``{model_type: {module path pattern: replacement}}`` applied by one generic patcher::

    handle = kpt.integrations.hf.patch(model)   # or patch(model, backend="triton")
    with kpt.integrations.hf.patch(model): ...  # the handle is a context manager
    handle.unpatch()                            # restores the model exactly

``patch(model, kv_cache="paged")`` also makes ``generate`` keep its KV cache in pages
(``PagedCache``, read by kpt's ``paged_attention``; see ``kpt.integrations._hf_paged``).
``supported()`` lists what each model type gets. A patched model stays the user's model: the
same parameter objects, the same ``state_dict()`` keys and values, ``save_pretrained`` and an
optimizer created before ``patch`` keep working, and gradients reach the original parameters.
The exception is ``patch(model, quantize="fp8" | "int4", **options)``, which swaps the attention
and MLP projections for ``kpt.nn.FP8Linear`` / ``Int4Linear`` (inference only, their weights
are buffers; ``unpatch`` puts the original modules back; see ``patch``).
"""

from __future__ import annotations

import fnmatch
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

try:
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("kpt.integrations.hf needs transformers: pip install 'kpt[hf]'") from err

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kpt.integrations import _hf_attention, _hf_moe, _hf_paged
from kpt.integrations._hf_paged import PagedCache
from kpt.integrations._undo import Bound, Restore
from kpt.nn.quantized import (
    QUANTIZED_LINEARS,
    FP8Linear,
    Int4Linear,
    QuantizedExperts,
    weight_bytes,
)
from kpt.ops.rmsnorm_qkv_rope import (
    _scaling_key,
    rmsnorm_qkv_rope,
    rope_from_hf_config,
    rope_inv_freq,
)
from kpt.quant.gptq import Calibrator, gptq_fp8, gptq_int4

log = logging.getLogger("kpt")

_hf_attention.register()

Undo = Callable[[], None]


# ---- the fused attention input path (RMSNorm -> QKV -> q/k norm -> RoPE) -----------------------


class _FusedInput:
    """What a patched attention module needs to run its input path as one ``rmsnorm_qkv_rope``
    call: references to the layer's own modules (no parameters of its own) and RoPE settings."""

    def __init__(self, layer: nn.Module, config: Any, rotary_dim: int, backend: str | None):
        attn = layer.self_attn
        self.norm, self.attn, self.backend = layer.input_layernorm, attn, backend
        theta, scaling, _ = rope_from_hf_config(config.to_dict())
        self.rope_theta, self.rope_scaling, self.rotary_dim = theta, scaling, rotary_dim
        self.head_dim = attn.head_dim
        self.num_q_heads = attn.q_proj.weight.shape[0] // attn.head_dim
        self.num_kv_heads = attn.k_proj.weight.shape[0] // attn.head_dim
        self.eps = float(getattr(self.norm, "variance_epsilon", getattr(self.norm, "eps", 1e-6)))
        self.projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        # Mistral reads its window from the config, Qwen2/3 from the module (None on full layers).
        self.sliding_window = (attn.sliding_window if hasattr(attn, "sliding_window")
                               else getattr(config, "sliding_window", None))

    def share_storage(self) -> Undo:
        """Point the q/k/v weights (and biases) at adjacent rows of one buffer each, keeping the
        parameter objects, so that the fused op reads them as one matrix without a copy (it
        checks per call; whatever re-points a parameter later, e.g. ``model.to(dtype)``, only
        costs a copy). The returned function gives each parameter its own storage back."""
        moved: list[nn.Parameter] = []
        for attr in ("weight", "bias"):
            params = [getattr(p, attr) for p in self.projections]
            if any(p is None for p in params):
                continue
            buffer = torch.cat([p.detach() for p in params])
            start = 0
            for p in params:
                moved.append(p)
                p.data = buffer[start:start + p.shape[0]]
                start += p.shape[0]

        return Restore(_own_storage, moved)

    def qkv(self, hidden_states: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.projections
        return rmsnorm_qkv_rope(
            hidden_states, self.norm.weight, (q.weight, k.weight, v.weight), position_ids,
            num_q_heads=self.num_q_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, eps=self.eps,
            qkv_bias=None if q.bias is None else (q.bias, k.bias, v.bias),
            q_norm_weight=None if self.q_norm is None else self.q_norm.weight,
            k_norm_weight=None if self.k_norm is None else self.k_norm.weight,
            rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
            rotary_dim=self.rotary_dim, backend=self.backend,
        )


class _NormInFusedOp(nn.Module):
    """Stands in for a patched layer's input norm, whose output feeds only the attention: it
    passes the hidden states through, since the attention's fused op normalises them. It holds
    the norm's own weight parameter under the same name, so ``parameters()`` and ``state_dict()``
    do not change. (A module rather than a patched ``forward``: transformers re-kernelizes hub-
    kernel layers such as ``LlamaRMSNorm`` on ``train()``/``eval()``, resetting their forward.)"""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight

    def forward(self, hidden_states: Tensor) -> Tensor:
        return hidden_states


def _fused_attention_forward(self: nn.Module, hidden_states: Tensor,
                             position_embeddings: Any = None, attention_mask: Tensor | None = None,
                             past_key_values: Any = None, cache: Any = None,
                             **kwargs: Any) -> tuple[Tensor, Any]:
    """A Llama-style attention module whose input path (the layer's RMSNorm, q/k/v projections,
    q/k norms, RoPE) runs as one fused op on the un-normalised hidden states; the KV cache,
    the attention implementation and the output projection stay HF's. The cache arrives as
    ``cache`` from transformers 5.24 on, as ``past_key_values`` before."""
    fused: _FusedInput = self._kpt_fused
    position_ids = kwargs.get("position_ids")
    kv_cache = cache if cache is not None else past_key_values
    if position_ids is None:  # nothing to rotate with: the module's own path, norm included
        if cache is not None:
            kwargs["cache"] = cache
        elif past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        normed = fused.norm(hidden_states)
        return type(self).forward(self, normed, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, **kwargs)
    q, k, v = fused.qkv(hidden_states, position_ids)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kv_cache is not None:
        k, v = kv_cache.update(k, v, self.layer_idx, kwargs=kwargs)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation,
        sys.modules[type(self).__module__].eager_attention_forward)
    if fused.sliding_window is not None:
        kwargs["sliding_window"] = fused.sliding_window
    if kv_cache is not None:
        # transformers reads packed sequences from position_ids only without a cache
        # (masking_utils); with one, every row is one sequence whatever its positions.
        kwargs[_hf_attention.CACHE_IN_USE] = True
    out, weights = attention(self, q, k, v, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **kwargs)
    out = self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous())
    return out, weights


def _rotary_module(model: nn.Module) -> nn.Module | None:
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "attention_scaling"):
            return module
    return None


def _fused_reasons(model: nn.Module, layer: nn.Module, config: Any) -> tuple[list[str], int]:
    """Why ``layer`` cannot run the fused input path (empty if it can), and its rotary dim."""
    reasons = []
    for name in ("input_layernorm", "self_attn"):
        if not hasattr(layer, name):
            reasons.append(f"layer has no {name}")
    norm = getattr(layer, "input_layernorm", None)
    if norm is not None and [n for n, _ in norm.named_parameters()] + [
            n for n, _ in norm.named_buffers()] != ["weight"]:
        reasons.append("input_layernorm holds more than a weight")
    attn = getattr(layer, "self_attn", None)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx"):
        if attn is not None and not hasattr(attn, name):
            reasons.append(f"self_attn has no {name}")
    if reasons:
        return reasons, 0
    quantized = [n for n in ("q_proj", "k_proj", "v_proj")
                 if isinstance(getattr(attn, n), QUANTIZED_LINEARS)]
    if quantized:
        # rmsnorm_qkv_rope multiplies by float q/k/v weights; fusing would bypass the quantized
        # projections, so the layer keeps HF's norm + (quantized) projections + RoPE instead.
        return [f"{'/'.join(quantized)} quantized: the fused rmsnorm_qkv_rope reads float "
                f"q/k/v weights"], 0
    if any(p.device.type == "meta" for p in layer.parameters()):
        reasons.append("parameters on the meta device (offloaded)")
    try:
        theta, scaling, _ = rope_from_hf_config(config.to_dict())
        _scaling_key(scaling)
    except (ValueError, KeyError, TypeError) as err:
        return [*reasons, f"RoPE: {err}"], 0
    rotary = _rotary_module(model)
    if rotary is None:
        return [*reasons, "no rotary embedding module with inv_freq found"], 0
    # The frequencies HF actually applies decide: this catches RoPE settings a model ignores
    # (e.g. partial_rotary_factor on Llama) or interprets differently.
    theirs = rotary.inv_freq
    rotary_dim = 2 * theirs.shape[-1]
    if rotary_dim > attn.head_dim:
        return [*reasons, f"rotary dim {rotary_dim} > head_dim {attn.head_dim}"], 0
    ours = rope_inv_freq(rotary_dim, theta, scaling, torch.device("cpu"))
    # A few float32 ulps apart when the model computed them on a GPU (its pow rounds
    # differently); a setting HF applies differently moves them by orders of magnitude more.
    tolerance = 1e-5 if theirs.dtype == torch.float32 else torch.finfo(theirs.dtype).eps
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        reasons.append(f"RoPE attention_scaling {rotary.attention_scaling} != 1")
    elif not torch.allclose(ours, theirs.detach().float().cpu(), rtol=tolerance, atol=0):
        reasons.append("the model's RoPE frequencies differ from kpt's for this config")
    return reasons, rotary_dim


def _own_storage(params: list[nn.Parameter]) -> None:
    """Give each parameter its own storage back (undoes ``_FusedInput.share_storage``)."""
    for p in params:
        p.data = p.data.clone()


def _fuse_attention_input(model: nn.Module, layer: nn.Module, config: Any,
                          backend: str | None) -> Undo | list[str]:
    """Run ``layer``'s RMSNorm + q/k/v projections (+ q/k norms) + RoPE as one fused op."""
    reasons, rotary_dim = _fused_reasons(model, layer, config)
    if reasons:
        return reasons
    fused = _FusedInput(layer, config, rotary_dim, backend)
    attn, norm = layer.self_attn, layer.input_layernorm
    restore_storage = fused.share_storage()
    attn._kpt_fused = fused
    attn.forward = Bound(_fused_attention_forward, attn)
    layer.input_layernorm = _NormInFusedOp(norm)
    return Restore(_unfuse_attention_input, layer, attn, norm, restore_storage)


def _unfuse_attention_input(layer: nn.Module, attn: nn.Module, norm: nn.Module,
                            restore_storage: Undo) -> None:
    layer.input_layernorm = norm
    vars(attn).pop("forward", None)
    vars(attn).pop("_kpt_fused", None)
    restore_storage()


def _use_kpt_attention(model: nn.Module, module: nn.Module, config: Any,
                       backend: str | None) -> Undo | list[str]:
    """Switch the model's attention implementation to ``"kpt"``."""
    previous = config._attn_implementation
    set_impl = getattr(model, "set_attn_implementation", None)
    try:
        if set_impl is not None:
            set_impl(_hf_attention.NAME)
        else:
            config._attn_implementation = _hf_attention.NAME
    except (ValueError, NotImplementedError) as err:
        return [f"attention implementation cannot be set: {err}"]
    tagged = []
    if backend is not None:
        for sub in model.modules():
            if hasattr(sub, "is_causal") and hasattr(sub, "config"):
                setattr(sub, _hf_attention.BACKEND_ATTR, backend)
                tagged.append(sub)

    return Restore(_restore_attention, model, config, tagged, previous)


def _restore_attention(model: nn.Module, config: Any, tagged: list[nn.Module],
                       previous: Any) -> None:
    for sub in tagged:
        delattr(sub, _hf_attention.BACKEND_ATTR)
    set_impl = getattr(model, "set_attn_implementation", None)
    if set_impl is not None:
        set_impl(previous)
    else:
        config._attn_implementation = previous


@dataclass(frozen=True)
class Replacement:
    """One entry of the patch table: what it replaces, and the function that does it for one
    matching module (returning its undo function, or the reasons it cannot)."""

    what: str
    apply: Callable[[nn.Module, nn.Module, Any, str | None], Undo | list[str]]


ATTENTION = Replacement("attention -> kpt flash_attention (varlen for padded and packed "
                        "batches)", _use_kpt_attention)
FUSED_INPUT = Replacement("input RMSNorm + q/k/v projections + q/k norm + RoPE -> one "
                          "rmsnorm_qkv_rope call", _fuse_attention_input)

# model_type -> {module path pattern ("" is the model itself): replacement}
PATCHES: dict[str, dict[str, Replacement]] = {
    **{model_type: {"": ATTENTION, "model.layers.*": FUSED_INPUT}
       for model_type in ("llama", "mistral", "qwen2", "qwen3")},
    # Gemma 2's norms scale by (1 + weight) and BERT's are LayerNorms after attention: only the
    # attention runs through kpt (soft-cap and sliding windows included for Gemma 2).
    "gemma2": {"": ATTENTION},
    "bert": {"": ATTENTION},
    # MoE families: the sparse blocks' routers and experts (kpt.integrations._hf_moe); layers
    # whose mlp is dense are listed in skipped. DeepSeek-V3's attention is MLA: HF's runs.
    **{model_type: {"": ATTENTION, "model.layers.*": FUSED_INPUT,
                    "model.layers.*.mlp": Replacement(_hf_moe.WHAT[model_type],
                                                      _hf_moe.patch_block)}
       for model_type in ("qwen3_moe", "qwen2_moe", "mixtral")},
    "deepseek_v3": {"model.layers.*.mlp": Replacement(_hf_moe.WHAT["deepseek_v3"],
                                                      _hf_moe.patch_block)},
}


def supported() -> dict[str, dict[str, str]]:
    """``{model_type: {module path pattern: what kpt replaces there}}``."""
    return {mt: {pattern: r.what for pattern, r in table.items()} for mt, table in PATCHES.items()}


@dataclass
class PatchHandle:
    """What ``patch`` changed: ``patched`` module paths ("" is the model), ``skipped``
    {path: reasons}; with ``quantize``, ``weight_bytes`` = (before, after) bytes of the
    quantized projections' weights (and biases). ``unpatch()`` (or leaving a ``with`` block)
    undoes it."""

    model: nn.Module
    patched: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    weight_bytes: tuple[int, int] | None = None
    _undo: list[Undo] = field(default_factory=list, repr=False)

    def unpatch(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.patched.clear()
        if getattr(self.model, "_kpt_patch", None) is self:
            del self.model._kpt_patch

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unpatch()


# ---- quantized projections (patch(model, quantize=...)) ----------------------------------------

_DECODER_PROJECTIONS = (*(f"layers.*.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj",
                                                                "o_proj")),
                        *(f"layers.*.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")))
# model_type -> path patterns of the projections quantize= replaces, matched against the end of a
# module path (so that a base model and one with a head, "model."/"bert." in front, both match).
QUANTIZED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    **{model_type: _DECODER_PROJECTIONS
       for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma2")},
    "bert": tuple(f"encoder.layer.*.{n}" for n in (
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "intermediate.dense", "output.dense")),
    # MoE families: attention, dense MLPs and shared experts; the routed experts (3-D
    # parameters, not nn.Linear) are QUANTIZED_EXPERTS' business.
    **{model_type: (*_DECODER_PROJECTIONS,
                    *(f"layers.*.mlp.shared_expert.{n}"
                      for n in ("gate_proj", "up_proj", "down_proj")))
       for model_type in ("qwen3_moe", "qwen2_moe", "mixtral")},
}
# model_type -> path pattern of the routed experts modules (transformers 5's fused experts:
# gate_up_proj (E, 2I, H), down_proj (E, H, I)) that quantize= swaps for QuantizedExperts.
QUANTIZED_EXPERTS: dict[str, str] = {model_type: "layers.*.mlp.experts"
                                     for model_type in ("qwen3_moe", "qwen2_moe", "mixtral")}
QUANTIZE = {"fp8": FP8Linear, "int4": Int4Linear}
ALIGN_CHECK = 256  # layer sizes every option takes: _check_quantize checks the options alone
QUANTIZE_OPTIONS = {"fp8": ("weight_granularity", "activation", "fp8_dtype", "method",
                            "act_order", "damp", "sequential", "calibration", "experts"),
                    "int4": ("group_size", "symmetric", "method", "act_order", "damp",
                             "sequential", "clip", "calibration",
                             "experts")}
METHODS = ("rtn", "gptq")


def _tail_matches(path: str, pattern: str) -> bool:
    parts, wanted = path.split("."), pattern.split(".")
    return len(parts) >= len(wanted) and all(
        fnmatch.fnmatchcase(part, want) for part, want in zip(parts[-len(wanted):], wanted))


def _check_quantize(quantize: str | None, options: dict[str, Any]) -> None:
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"kpt.integrations.hf.patch: quantize must be None or one of "
                         f"{tuple(QUANTIZE)}, got {quantize!r}")
    allowed = QUANTIZE_OPTIONS.get(quantize, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"kpt.integrations.hf.patch: unexpected keyword arguments {unknown} "
                        f"(quantize={quantize!r} takes {list(allowed)})")
    if quantize is not None and options.get("method", "rtn") not in METHODS:
        raise ValueError(f"kpt.integrations.hf.patch: quantize={quantize!r}: method must be one "
                         f"of {METHODS}, got {options['method']!r}")
    gptq = options.get("method", "rtn") == "gptq"
    if not isinstance(options.get("experts", True), bool):
        raise ValueError(f"kpt.integrations.hf.patch: quantize={quantize!r} takes experts=True "
                         f"or False, got {options['experts']!r}")
    for name in ("act_order", "damp", "sequential", "clip"):
        if not gptq and name in options:
            raise ValueError(f"kpt.integrations.hf.patch: quantize={quantize!r} takes {name} "
                             f"only with method='gptq'")
    for name in ("sequential", "clip"):
        if not isinstance(options.get(name, False), bool):
            raise ValueError(f"kpt.integrations.hf.patch: quantize={quantize!r}: {name} must be "
                             f"True or False, got {options[name]!r}")
    damp = options.get("damp", 0.01)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
        raise ValueError(f"kpt.integrations.hf.patch: quantize={quantize!r}: damp must be a "
                         f"number >= 0, got {damp!r}")
    if quantize == "fp8":
        static = options.get("activation", "dynamic") == "static"
        if (static or gptq) != ("calibration" in options):
            raise ValueError("kpt.integrations.hf.patch: quantize='fp8' takes calibration (model "
                             "inputs, or a function of the model) exactly when activation="
                             "'static' or method='gptq'")
        reasons = FP8Linear.reasons(ALIGN_CHECK, ALIGN_CHECK, options.get(
            "weight_granularity", "row"), options.get("activation", "dynamic"),
            options.get("fp8_dtype", torch.float8_e4m3fn))
    elif quantize == "int4":
        if gptq != ("calibration" in options):
            raise ValueError("kpt.integrations.hf.patch: quantize='int4' takes calibration "
                             "(model inputs, or a function of the model), and act_order, "
                             "exactly when method='gptq'")
        reasons = Int4Linear.reasons(ALIGN_CHECK, ALIGN_CHECK, options.get("group_size", 128),
                                     options.get("symmetric", False))
    else:
        reasons = []
    if reasons:
        raise ValueError(f"kpt.integrations.hf.patch: quantize={quantize!r}: " + "; ".join(reasons))


def _calibrate(model: nn.Module, targets: dict[str, nn.Linear], calibration: Any) -> dict[
        str, Tensor]:
    """The largest |input| each target saw while ``model`` ran ``calibration``."""
    amax: dict[str, Tensor] = {}

    def recorder(path: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen = args[0].detach().float().abs().amax()
            amax[path] = seen if path not in amax else torch.maximum(amax[path], seen)
        return record

    hooks = [m.register_forward_pre_hook(recorder(path)) for path, m in targets.items()]
    try:
        _run_calibration(model, calibration)
    finally:
        for hook in hooks:
            hook.remove()
    return amax


def _run_calibration(model: nn.Module, calibration: Any) -> None:
    with torch.no_grad():
        calibration(model) if callable(calibration) else model(**calibration)


def _quantize_projections(model: nn.Module, model_type: str, quantize: str,
                          options: dict[str, Any], backend: str | None,
                          handle: PatchHandle, strict: bool) -> None:
    """Replace the projections of ``QUANTIZED_PROJECTIONS[model_type]`` with quantized layers,
    recording undo functions, skips and weight bytes on ``handle``."""
    patterns = QUANTIZED_PROJECTIONS[model_type]
    targets = {path: m for path, m in model.named_modules()
               if path and any(_tail_matches(path, p) for p in patterns)}
    options = dict(options)
    calibration = options.pop("calibration", None)
    with_experts = options.pop("experts", True)
    cls = QUANTIZE[quantize]

    def shape_reasons(linear: nn.Linear) -> list[str]:
        sizes = (linear.in_features, linear.out_features)
        found = (FP8Linear.reasons(*sizes) if quantize == "fp8"
                 else Int4Linear.reasons(*sizes, options.get("group_size", 128)))
        return [f"{cls.__name__}: {reason}" for reason in found]

    linears = {p: m for p, m in targets.items()
               if isinstance(m, nn.Linear) and not shape_reasons(m)}
    seen: dict[str, Any] = {}
    amax: dict[str, Any] = {}
    gptq = options.pop("method", "rtn") == "gptq"
    act_order = options.pop("act_order", False)
    damp = options.pop("damp", 0.01)
    sequential = options.pop("sequential", False)
    clip = options.pop("clip", False)
    static = options.get("activation") == "static"
    hessians: dict[str, Tensor] = {}  # sequential: each layer's, from calibrate_one below
    if gptq and not sequential:  # the Hessians (and static fp8 amax) of one pass
        with Calibrator(model, list(linears)) as cal:
            if static:
                amax = _calibrate(model, linears, calibration)
            else:
                _run_calibration(model, calibration)
        seen = {p: None for p in cal.modules if cal.tokens(p)}
    elif calibration is not None and not gptq:  # fp8, static activations: each input's largest |x|
        seen = amax = _calibrate(model, linears, calibration)

    def calibrate_one(path: str, linear: nn.Linear) -> bool:
        """Sequential GPTQ: this layer's Hessian (and static amax) from one calibration run
        of the model as it is now, every earlier target already quantized; whether the
        calibration reached the layer."""
        with Calibrator(model, [path]) as one:
            if static:
                amax.update(_calibrate(model, {path: linear}, calibration))
            else:
                _run_calibration(model, calibration)
        if one.tokens(path):
            hessians[path] = one.hessian(path)
        return path in hessians

    def build(path: str, linear: nn.Linear) -> nn.Module:
        weight = linear.weight.detach()
        hessian = None
        if gptq:
            hessian = (hessians.pop(path) if sequential else cal.hessian(path)).to(weight.device)
        if quantize == "int4" and gptq:
            group_size = options.get("group_size", 128)
            q = gptq_int4(weight, hessian, group_size, options.get("symmetric", False),
                          act_order, damp, is_hessian=True, clip=clip)
            return Int4Linear.from_quantized(q.packed, q.scales, q.zeros, group_size=group_size,
                                             g_idx=q.g_idx, bias=linear.bias, backend=backend)
        extra: dict[str, Any] = {"sample_inputs": amax[path]} if static else {}
        if gptq:  # fp8
            extra["quantized"] = gptq_fp8(
                weight, hessian, options.get("weight_granularity", "row"),
                options.get("fp8_dtype", torch.float8_e4m3fn), act_order, damp, is_hessian=True)
        return cls.from_linear(linear, **options, **extra, backend=backend)
    before = after = 0
    for path, linear in targets.items():
        reasons = []
        if not isinstance(linear, nn.Linear):
            reasons.append(f"{type(linear).__name__} is not an nn.Linear")
        elif linear.weight.device.type == "meta":
            reasons.append("weight on the meta device (offloaded)")
        elif shape_reasons(linear):
            reasons.extend(shape_reasons(linear))
        elif gptq and sequential:
            if not calibrate_one(path, linear):
                reasons.append("the calibration inputs never reached it")
        elif calibration is not None and path not in seen:
            reasons.append("the calibration inputs never reached it")
        if not reasons:
            try:
                layer = build(path, linear)
            except ValueError as err:
                reasons.append(str(err))
        if _swap_module(model, handle, path, linear, None if reasons else layer, reasons,
                        strict):
            before, after = before + weight_bytes(linear), after + weight_bytes(layer)
    projections = len(handle.patched)
    if with_experts and model_type in QUANTIZED_EXPERTS:
        moved = _quantize_experts(model, QUANTIZED_EXPERTS[model_type], quantize, options,
                                  backend, handle, strict)
        before, after = before + moved[0], after + moved[1]
    handle.weight_bytes = (before, after)
    log.info("kpt: quantized %d projections to %s and %d routed-expert modules: %.1f MiB -> "
             "%.1f MiB of weights (%d skipped)", projections, quantize,
             len(handle.patched) - projections, before / 2**20, after / 2**20,
             len(handle.skipped))


def _quantize_experts(model: nn.Module, pattern: str, quantize: str, options: dict[str, Any],
                      backend: str | None, handle: PatchHandle,
                      strict: bool) -> tuple[int, int]:
    """Swap the routed experts modules matching ``pattern`` for ``QuantizedExperts`` (round to
    nearest: fp8 e4m3 with 128x128 block scales whatever the linears' options; int4 with the
    linears' ``group_size`` / ``symmetric``); (bytes before, bytes after)."""
    before = after = 0
    experts = [(path, m) for path, m in model.named_modules()
               if path and _tail_matches(path, pattern)]
    for path, module in experts:
        w13 = getattr(module, "gate_up_proj", None)
        reasons = []
        if isinstance(w13, Tensor) and w13.device.type == "meta":
            reasons.append("weights on the meta device (offloaded)")
        else:
            try:
                layer = QuantizedExperts.from_hf(
                    module, quantize, group_size=options.get("group_size", 128),
                    symmetric=options.get("symmetric", False), backend=backend)
            except ValueError as err:
                reasons.append(str(err))
        if _swap_module(model, handle, path, module, None if reasons else layer, reasons,
                        strict):
            before += sum(t.numel() * t.element_size() for t in module.parameters())
            after += weight_bytes(layer)
    return before, after


def _swap_module(model: nn.Module, handle: PatchHandle, path: str, old: nn.Module,
                 new: nn.Module | None, reasons: list[str], strict: bool) -> bool:
    """Put ``new`` at ``path`` in place of ``old`` (recorded for unpatch) and say True; with
    ``reasons``, list them in ``handle.skipped`` (or raise when ``strict``) and say False."""
    if reasons:
        if strict:
            raise ValueError(f"kpt.integrations.hf.patch: {path}: " + "; ".join(reasons))
        handle.skipped[path] = reasons
        return False
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, name, new)
    handle._undo.append(Restore(setattr, parent, name, old))
    handle.patched.append(path)
    return True


def _matches(path: str, pattern: str) -> bool:
    if pattern == "":
        return path == ""
    return fnmatch.fnmatchcase(path, pattern) and path.count(".") == pattern.count(".")


KV_CACHES = (None, "paged")


def patch(model: nn.Module, *, backend: str | None = None, strict: bool = False,
          kv_cache: str | None = None, quantize: str | None = None,
          **options: Any) -> PatchHandle:
    """Swap kpt kernels into ``model`` in place, per ``PATCHES[model.config.model_type]``.

    ``backend`` forces one kpt backend for every patched call (default: per-call dispatch).
    Modules that cannot be patched are left alone and listed in ``handle.skipped`` with their
    reasons (``strict=True`` raises instead). A model type without a table entry raises.
    ``kv_cache="paged"``: ``generate`` (greedy or sampling, without a cache of the caller's)
    keeps the KV cache in a ``PagedCache`` (16-token pages; ``generate(...,
    cache_config={"page_size": n})`` for others) and decodes through kpt's ``paged_attention``;
    a ``PagedCache`` can also be passed to the patched model directly.

    ``quantize="fp8"`` / ``"int4"`` replaces the projections of ``QUANTIZED_PROJECTIONS``
    (attention q/k/v/o and MLP gate/up/down; BERT's attention and feed-forward linears) with
    ``kpt.nn.FP8Linear`` / ``Int4Linear`` made by their ``from_linear``, taking ``options``:

    * fp8: ``weight_granularity`` ("row", default, or "block"), ``activation`` ("dynamic",
      default: per-token scales at each call; or "static": one scale per layer from
      ``calibration``, model inputs as a dict or a function of the model, run once here),
      ``fp8_dtype``, ``method`` as for int4 (``kpt.quant.gptq_fp8``);
    * int4: ``group_size`` (default 128), ``symmetric`` (default False), ``method``: "rtn"
      (default, round to nearest) or "gptq" (``kpt.quant.gptq_int4``, with Hessians from one
      run of ``calibration`` through the float model, and optionally ``act_order`` and
      ``damp``, the fraction of the mean Hessian diagonal added to it, default 0.01: raise it
      when the calibration holds few tokens for the layers' widths; ``clip=True``: each
      group's range chosen among its full range shrunk by up to 20 %, the smallest rounding
      error; ``sequential=True`` (both formats): the layers are quantized one at a time in
      module order, each Hessian from a fresh run of ``calibration`` through the model with
      the layers before it already quantized, as in the GPTQ paper: one calibration run per
      layer).

    MoE models (``QUANTIZED_EXPERTS``: qwen3_moe, qwen2_moe, mixtral) also get their routed
    experts swapped for ``kpt.nn.QuantizedExperts`` (``fused_moe`` with fp8 or int4 experts),
    unless ``experts=False``: always round to nearest (``method="gptq"`` applies to the linears
    only), fp8 as e4m3 with 128x128 block scales (DeepSeek-V3's format; ``weight_granularity``
    and ``fp8_dtype`` are the linears'), int4 with ``group_size`` and ``symmetric``.

    Projections whose shapes the layer does not take (fp8: features not multiples of 16; int4:
    in_features not a multiple of group_size; fp8 experts: an intermediate size not a multiple
    of 128) stay float, listed in ``skipped``. Quantized
    layers are inference only (run the model under ``torch.no_grad()``); a decoder layer whose
    q/k/v are quantized keeps HF's input path instead of the fused ``rmsnorm_qkv_rope`` (listed
    in ``skipped`` with that reason). ``handle.weight_bytes`` = (before, after). While patched,
    ``state_dict()`` holds the quantized buffers in place of those weights; the handle keeps
    the original ``nn.Linear`` modules, so host or device memory falls only once the handle and
    they are dropped, and ``unpatch()`` puts the same modules and parameters back.
    """
    _check_quantize(quantize, options)
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kpt.integrations.hf.patch: kv_cache must be one of {KV_CACHES}, got "
                         f"{kv_cache!r}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PATCHES:
        raise ValueError(f"kpt.integrations.hf.patch: model_type {model_type!r} is not supported "
                         f"(supported: {sorted(PATCHES)})")
    if getattr(model, "_kpt_patch", None) is not None:
        raise ValueError("kpt.integrations.hf.patch: model is already patched; unpatch first")
    on_meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if on_meta is not None:
        raise ValueError(f"kpt.integrations.hf.patch: parameter {on_meta!r} is on the meta device "
                         "(not loaded yet, or offloaded): patch a model whose weights are in "
                         "memory")
    if quantize is not None and model_type not in QUANTIZED_PROJECTIONS:
        raise ValueError(f"kpt.integrations.hf.patch: quantize={quantize!r} is not available for "
                         f"model_type {model_type!r} (available for: "
                         f"{sorted(QUANTIZED_PROJECTIONS)})")
    handle = PatchHandle(model)
    table = PATCHES[model_type]
    try:
        # Before the table: the fused input path then sees which q/k/v are quantized.
        if quantize is not None:
            _quantize_projections(model, model_type, quantize, options, backend, handle, strict)
        for path, module in model.named_modules():
            for pattern, replacement in table.items():
                if not _matches(path, pattern):
                    continue
                result = replacement.apply(model, module, config, backend)
                if callable(result):
                    handle._undo.append(result)
                    handle.patched.append(path)
                elif strict:
                    raise ValueError(f"kpt.integrations.hf.patch: {path or 'model'}: "
                                     + "; ".join(result))
                else:
                    handle.skipped[path] = result
        if kv_cache == "paged":
            handle._undo.append(_paged_generate(model, config))
    except BaseException:
        handle.unpatch()
        raise
    model._kpt_patch = handle
    log.info("kpt: patched %d modules of %s (%d skipped)", len(handle.patched), model_type,
             len(handle.skipped))
    return handle


def _paged_generate(model: nn.Module, config: Any) -> Undo:
    """``generate`` with a ``PagedCache``; the model's attention must be kpt's by now."""
    can_generate = getattr(model, "can_generate", None)
    if can_generate is None or not can_generate() or not hasattr(
            model, "_prepare_cache_for_generation"):
        raise ValueError(f"kpt.integrations.hf.patch: kv_cache='paged' is for models that "
                         f"generate; {type(model).__name__} does not")
    if config._attn_implementation != _hf_attention.NAME:
        raise ValueError(f"kpt.integrations.hf.patch: kv_cache='paged' needs kpt's attention, "
                         f"and the model's could not be switched ({config._attn_implementation!r})")
    return _hf_paged.use_in_generate(model)


def unpatch(model: nn.Module) -> None:
    """Undo ``patch(model)``; a no-op when the model is not patched."""
    handle = getattr(model, "_kpt_patch", None)
    if handle is not None:
        handle.unpatch()


__all__ = ["patch", "unpatch", "supported", "PatchHandle", "PATCHES", "PagedCache"]
