"""``patch(model, quantize=...)`` on tiny random-weight models built from configs (no
downloads): which projections are swapped, how the fused input path steps aside, unpatch,
options and errors. Quality on real weights: test_quant_quality.py."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers")

import kpt.integrations.hf as kpt_hf  # noqa: E402
from kpt.nn import FP8Linear, Int4Linear  # noqa: E402
from kpt.ops.int4_gemm import dequantize_int4  # noqa: E402
from kpt.quant import Calibrator, gptq_fp8, rtn_fp8  # noqa: E402
from tests.integrations.test_hf import VOCAB, padded_batch, tiny, tiny_bert  # noqa: E402

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def snapshot(model):
    return dict(model.named_modules()), dict(model.named_parameters())


def assert_restored(model, modules, params):
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    assert all(p is params[n] for n, p in model.named_parameters())
    assert not any(isinstance(m, (FP8Linear, Int4Linear)) for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2"])
@pytest.mark.parametrize(("options", "cls"), [
    ({"quantize": "fp8"}, FP8Linear),
    ({"quantize": "fp8", "weight_granularity": "block"}, FP8Linear),
    ({"quantize": "int4", "group_size": 32}, Int4Linear),
])
@torch.no_grad()
def test_quantized_projections_replace_float_ones_and_unpatch_restores(family, options, cls,
                                                                       caplog):
    model = tiny(family)
    ids, mask = padded_batch([7, 5])
    want = model(ids, attention_mask=mask).logits
    dequantized = copy.deepcopy(model)
    modules, params = snapshot(model)
    with caplog.at_level(logging.INFO, logger="kpt"):
        handle = kpt_hf.patch(model, **options)
    paths = [f"model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS]
    assert all(isinstance(model.get_submodule(p), cls) for p in paths)
    assert set(paths) <= set(handle.patched)
    assert isinstance(model.lm_head, torch.nn.Linear)  # only the projections
    before, after = handle.weight_bytes
    assert before == sum(modules[p].weight.nbytes + (0 if modules[p].bias is None else
                                                     modules[p].bias.nbytes) for p in paths)
    assert after < before / 3
    assert f"quantized 14 projections to {options['quantize']}" in caplog.text
    if family != "gemma2":  # the fused input path reads float q/k/v: it steps aside
        for i in range(2):
            assert "quantized: the fused rmsnorm_qkv_rope reads float q/k/v weights" in (
                handle.skipped[f"model.layers.{i}"][0])
    got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    if cls is Int4Linear:  # W4A16: exactly the float model holding the dequantized weights
        for p in paths:
            q = model.get_submodule(p)
            dequantized.get_submodule(p).weight.copy_(dequantize_int4(
                q.packed, q.scales, q.zeros, group_size=q.group_size))
        torch.testing.assert_close(got[real], dequantized(ids, attention_mask=mask).logits[real],
                                   rtol=1e-4, atol=1e-5)
    # Random weights: fp8 is about 4% off per projection, int4 g32 about 8%
    # (test_quantized.py); HF's init (std 0.02) leaves logits near 0, which these relative
    # differences amplify (measured up to 25%, Gemma 2 int4): this catches a wrong layer, not
    # precision; the nn tests and test_quant_quality.py measure that.
    assert rel(got[real], want[real]) < 0.35
    handle.unpatch()
    assert_restored(model, modules, params)
    assert torch.equal(model(ids, attention_mask=mask).logits, want)


@torch.no_grad()
def test_skipped_projections_keep_the_fused_input_path_where_qkv_stay_float():
    # hidden 64 is not a multiple of int4 group 128: q/k/v/o/gate/up stay float, the fused input
    # path still runs; the down projections (in 96) cannot take group 64 either.
    model = tiny("llama", intermediate_size=128)
    with kpt_hf.patch(model, quantize="int4", group_size=128) as handle:
        assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
        assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
        assert "model.layers.0" in handle.patched  # the fused input path
        assert "group_size = 128" in handle.skipped["model.layers.0.self_attn.q_proj"][0]
        model(torch.randint(0, VOCAB, (1, 5)))
    with pytest.raises(ValueError, match="patch: model.layers.0.self_attn.q_proj: Int4Linear"):
        kpt_hf.patch(model, quantize="int4", group_size=128, strict=True)
    assert getattr(model, "_kpt_patch", None) is None
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)


@torch.no_grad()
def test_bert_attention_and_feed_forward_linears_are_quantized():
    model = tiny_bert()
    ids, mask = padded_batch([9, 4, 6])
    want = model(ids, attention_mask=mask).last_hidden_state
    modules, params = snapshot(model)
    with kpt_hf.patch(model, quantize="fp8") as handle:
        quantized = [p for p, m in model.named_modules() if isinstance(m, FP8Linear)]
        assert len(quantized) == 12 and "pooler.dense" not in quantized
        assert "encoder.layer.1.attention.output.dense" in quantized
        got = model(ids, attention_mask=mask).last_hidden_state
        assert handle.patched[-1] == ""  # the attention too
    real = mask.bool()
    assert rel(got[real], want[real]) < 0.05  # LayerNorm after each block keeps it small
    assert_restored(model, modules, params)


def test_static_fp8_calibrates_one_scale_per_projection():
    model = tiny("llama")
    ids, mask = padded_batch([7, 5])
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        with kpt_hf.patch(model, quantize="fp8", activation="static",
                          calibration={"input_ids": ids, "attention_mask": mask}):
            q = model.model.layers[1].mlp.down_proj
            assert q.activation == "static" and q.input_scale > 0
            got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel(got[real], want[real]) < 0.15


def test_quantized_model_is_inference_only():
    model = tiny("llama")
    with kpt_hf.patch(model, quantize="int4", group_size=32):
        with pytest.raises(RuntimeError, match="Int4Linear is inference only"):
            model(torch.randint(0, VOCAB, (1, 5)))


def test_bad_quantize_arguments_raise_before_any_change():
    model = tiny("llama")
    modules, params = snapshot(model)
    with pytest.raises(ValueError, match="patch: quantize must be None or one of"):
        kpt_hf.patch(model, quantize="int8")
    with pytest.raises(TypeError, match="patch: unexpected keyword arguments"):
        kpt_hf.patch(model, group_size=32)
    with pytest.raises(TypeError, match=r"quantize='fp8' takes"):
        kpt_hf.patch(model, quantize="fp8", group_size=32)
    with pytest.raises(ValueError, match="calibration"):
        kpt_hf.patch(model, quantize="fp8", activation="static")
    with pytest.raises(ValueError, match="patch: quantize='int4': group_size must be one of"):
        kpt_hf.patch(model, quantize="int4", group_size=100)
    with pytest.raises(ValueError, match="patch: quantize='fp8': weight_granularity"):
        kpt_hf.patch(model, quantize="fp8", weight_granularity="tensor")
    assert getattr(model, "_kpt_patch", None) is None
    assert_restored(model, modules, params)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_int4_from_calibration_inputs(act_order):
    model = tiny("llama")
    ids, mask = padded_batch([7, 5])
    calibration = {"input_ids": torch.randint(0, VOCAB, (4, 16),
                                              generator=torch.Generator().manual_seed(3))}
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        with kpt_hf.patch(model, quantize="int4", group_size=32, method="gptq",
                          act_order=act_order, calibration=calibration) as handle:
            layer = model.model.layers[1].mlp.down_proj
            assert isinstance(layer, Int4Linear) and (layer.g_idx is not None) == act_order
            assert len([p for p in handle.patched if p.endswith("_proj")]) == 14
            got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel(got[real], want[real]) < 0.35  # as RTN above: a wrong layer, not precision


def test_sequential_gptq_calibrates_each_layer_after_the_ones_before():
    """sequential=True: one calibration run per quantized layer, each seeing the layers before
    it already quantized (so its Hessian, and the result, differ from the one-pass run), the
    same layers quantized, the logits as close to the float model."""
    model = tiny("llama")
    ids, mask = padded_batch([7, 5])
    runs = []
    calibration = {"input_ids": torch.randint(0, VOCAB, (4, 16),
                                              generator=torch.Generator().manual_seed(3))}

    def count(m):
        runs.append(1)
        m(**calibration)

    got = {}
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        for sequential in (False, True):
            runs.clear()
            with kpt_hf.patch(model, quantize="int4", group_size=32, method="gptq",
                              sequential=sequential, clip=True, calibration=count) as handle:
                got[sequential] = model(ids, attention_mask=mask).logits
                patched = len([p for p in handle.patched if p.endswith("_proj")])
            assert patched == 14
            assert len(runs) == (14 if sequential else 1)
    real = mask.bool()
    assert not torch.equal(got[True], got[False])
    for logits in got.values():
        assert rel(logits[real], want[real]) < 0.35  # as the one-pass test above


@pytest.mark.parametrize(("options", "match"), [
    (dict(quantize="int4", method="gptq"), "calibration .* exactly when method='gptq'"),
    (dict(quantize="int4", act_order=True), "act_order only with method='gptq'"),
    (dict(quantize="int4", method="awq"), "method must be one of"),
    (dict(quantize="fp8", method="gptq"), "quantize='fp8' takes calibration .* method='gptq'"),
    (dict(quantize="fp8", act_order=True), "quantize='fp8' takes act_order only with"),
    (dict(quantize="fp8", method="awq"), "quantize='fp8': method must be one of"),
    (dict(quantize="int4", damp=0.1), "takes damp only with method='gptq'"),
    (dict(quantize="int4", sequential=True), "takes sequential only with method='gptq'"),
    (dict(quantize="int4", clip=True), "takes clip only with method='gptq'"),
    (dict(quantize="int4", method="gptq", calibration={}, sequential=1),
     "sequential must be True or False"),
    (dict(quantize="int4", method="gptq", calibration={}, damp=-1.0),
     "damp must be a number >= 0"),
])
def test_gptq_options_are_checked_before_any_change(options, match):
    model = tiny("llama")
    with pytest.raises(ValueError, match=match):
        kpt_hf.patch(model, **options)
    assert getattr(model, "_kpt_patch", None) is None


@pytest.mark.parametrize("granularity", ["row", "block"])
@pytest.mark.parametrize("activation", ["dynamic", "static"])
def test_gptq_fp8_from_calibration_inputs(granularity, activation):
    """method='gptq' with fp8: the layers hold kpt.quant.gptq_fp8's codes (not the
    round-to-nearest ones) for the Hessians of the calibration pass, which also gives the static
    activation scales; the model stays close to the float one."""
    model = tiny("llama")
    ids, mask = padded_batch([7, 5])
    calibration = {"input_ids": torch.randint(0, VOCAB, (4, 16),
                                              generator=torch.Generator().manual_seed(3))}
    down = model.model.layers[1].mlp.down_proj
    with Calibrator(model, ["model.layers.1.mlp.down_proj"]) as cal, torch.no_grad():
        model(**calibration)
    w8, scale = gptq_fp8(down.weight.detach(), cal.hessian("model.layers.1.mlp.down_proj"),
                         granularity)
    rtn8, _ = rtn_fp8(down.weight.detach(), granularity)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        with kpt_hf.patch(model, quantize="fp8", weight_granularity=granularity,
                          activation=activation, method="gptq", calibration=calibration):
            layer = model.model.layers[1].mlp.down_proj
            assert isinstance(layer, FP8Linear) and layer.activation == activation
            assert torch.equal(layer.weight8, w8.view(torch.uint8))
            assert not torch.equal(layer.weight8, rtn8.view(torch.uint8))
            torch.testing.assert_close(layer.weight_scale, scale)
            if activation == "static":
                assert float(layer.input_scale) > 0
            got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel(got[real], want[real]) < 0.15  # as RTN fp8 above: a wrong layer, not precision
