"""The autotuner's hooks of moe_route and fused_moe: shapes from HF MoE configs (none from a
dense one), calls on fresh random inputs, checks that catch a wrong or unwritten output, and a
real tune on the CPU (reference and interpreted Triton) in which the Triton rows come out
valid."""

from __future__ import annotations

import pytest
import torch

from kpt.autotune import provenance
from kpt.autotune.timing import Timing
from kpt.autotune.tuner import tune
from kpt.ops.moe import ROUTE_SPEC, SPEC

QWEN3_MOE = {"model_type": "qwen3_moe", "hidden_size": 64, "moe_intermediate_size": 32,
             "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
             "hidden_act": "silu"}
MIXTRAL = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 48,
           "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_act": "silu"}
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "hidden_size": 64, "moe_intermediate_size": 32,
               "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
               "routed_scaling_factor": 2.5, "norm_topk_prob": True, "hidden_act": "silu"}
LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4}


def test_shapes_from_hf_configs():
    assert SPEC.tuning.shapes(LLAMA, [1, 16]) == []
    (q,) = SPEC.tuning.shapes(QWEN3_MOE, [3])
    assert (q["experts"], q["top_k"], q["intermediate"], q["scoring"], q["groups"]) == (
        8, 2, 32, "softmax", 1)
    (m,) = SPEC.tuning.shapes(MIXTRAL, [3])
    assert (m["experts"], m["intermediate"], m["renormalize"]) == (8, 48, True)
    (d,) = ROUTE_SPEC.tuning.shapes(DEEPSEEK_V3, [3])
    assert (d["scoring"], d["groups"], d["topk_groups"], d["bias"], d["scaling"]) == (
        "sigmoid", 4, 2, True, 2.5)
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        SPEC.tuning.shapes({**QWEN3_MOE, "hidden_act": "relu"}, [1])


@pytest.mark.parametrize("spec,config", [(SPEC, QWEN3_MOE), (ROUTE_SPEC, DEEPSEEK_V3)],
                         ids=["fused_moe", "moe_route"])
def test_checks_catch_wrong_and_unwritten_outputs(spec, config):
    tuning = spec.tuning
    (shape,) = tuning.shapes(config, [5])
    dtype = torch.bfloat16 if spec is SPEC else torch.float32
    call = tuning.make_call(shape, dtype, torch.device("cpu"), 1)
    expected = tuning.clone_outputs(call)
    spec.backend("reference").run(call, {})
    spec.backend("reference").run(expected, {})
    assert tuning.check(call, expected) is None
    tuning.poison(call)
    assert tuning.check(call, expected) is not None
    # Fresh random inputs per seed: another seed, other values.
    other = tuning.make_call(shape, dtype, torch.device("cpu"), 2)
    first = call.x if spec is SPEC else call.logits
    second = other.x if spec is SPEC else other.logits
    assert not torch.equal(first, second) and first.abs().sum() > 0


@pytest.mark.parametrize("spec,config,dtype", [(SPEC, QWEN3_MOE, torch.bfloat16),
                                               (ROUTE_SPEC, DEEPSEEK_V3, torch.float32)],
                         ids=["fused_moe", "moe_route"])
def test_tune_on_the_cpu_with_interpreted_triton(monkeypatch, spec, config, dtype):
    monkeypatch.setattr(provenance, "device_fingerprint", lambda device=None: "Test GPU")

    def once(fn, warmup_ms, rep_ms):  # the interpreter is slow: run once, a fixed time
        fn()
        return Timing(7.0, 0.0, 1)

    shapes = spec.tuning.shapes(config, [3])
    (result,) = tune(spec, shapes, dtype, "cpu", progress=False, timer=once)
    rows = [(r["backend"], r["valid"], r["error"]) for r in result.rows]
    triton = [row for row in rows if row[0] == "triton"]
    assert triton and any(valid for _, valid, _ in triton), rows
    assert all(valid or error for _, valid, error in rows)
    assert [name for name, _ in result.skipped] == ["cuda", "hip", "xla", "xpu"]
