"""Quality of ``patch(model, quantize=...)`` on real weights, on the CPU: SmolLM2-135M
perplexity and all-MiniLM-L6-v2 sentence embeddings, quantized against float32.

On the CPU ``fp8_gemm`` and ``int4_gemm`` run their reference backends, which compute exactly
what the GPU kernels compute (dequantised operands, float32 accumulation): this measures
quality, not speed. Each model loads once per module; each configuration is measured once and
kept, so the table at the end (printed in the test output) costs nothing more.

GPTQ rows (``patch(..., method="gptq")``, ``kpt.quant.gptq_int4`` / ``gptq_fp8``, Hessians
from one calibration pass through the float model) calibrate on text the scores never see:
SmolLM2 on tokens 512..1023 of the bundled text, MiniLM on paragraphs 3..10 of it.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers")

import kpt.integrations.hf as kpt_hf  # noqa: E402
from kpt.integrations import bundled  # noqa: E402
from kpt.integrations.bundled import sentence_embeddings  # noqa: E402
from kpt.nn.quantized import QUANTIZED_LINEARS  # noqa: E402
from tests.integrations.test_real_weights import (  # noqa: E402
    SENTENCES,
    needs_minilm,
    needs_smollm2,
)


def _smollm2_calibration(model, tokenizer) -> dict:
    ids = tokenizer(bundled.EVAL_TEXT, add_special_tokens=False, return_tensors="pt").input_ids
    return {"input_ids": ids[:, MAX_TOKENS : 2 * MAX_TOKENS], "use_cache": False}


def _minilm_calibration(model, tokenizer) -> dict:
    return dict(tokenizer(bundled.EVAL_TEXT.split("\n\n")[3:11], padding=True,
                          truncation=True, max_length=256, return_tensors="pt"))


def _minilm_calibration_wide(model, tokenizer) -> dict:
    """Every paragraph of the bundled text but the one SENTENCES scores (index 2)."""
    paragraphs = bundled.EVAL_TEXT.split("\n\n")
    return dict(tokenizer([p for i, p in enumerate(paragraphs) if i != 2], padding=True,
                          truncation=True, max_length=256, return_tensors="pt"))


def _own_calibration(model, tokenizer) -> dict:
    """Each model's calibration text above (for configurations both models measure)."""
    is_bert = model.config.model_type == "bert"
    return (_minilm_calibration if is_bert else _smollm2_calibration)(model, tokenizer)


# The first 512 tokens of bundled.EVAL_TEXT, one window: a quantized perplexity takes about
# 20 s on the shared 2-core CI machine (the whole 2,247-token text takes about 40 s).
MAX_TOKENS = 512

CONFIGS: dict[str, dict | None] = {
    "float32": None,
    "fp8 row": {"quantize": "fp8"},
    "fp8 block": {"quantize": "fp8", "weight_granularity": "block"},
    "fp8 gptq row": {"quantize": "fp8", "method": "gptq", "calibration": _own_calibration},
    "fp8 gptq block": {"quantize": "fp8", "weight_granularity": "block", "method": "gptq",
                       "calibration": _own_calibration},
    # SmolLM2's hidden size, 576, is not a multiple of 128: with g128 only the down projections
    # (in_features 1536) are quantized, the other projections are skipped with that reason.
    "int4 rtn g128": {"quantize": "int4", "group_size": 128},
    "int4 rtn g64": {"quantize": "int4", "group_size": 64},
    "int4 rtn g32": {"quantize": "int4", "group_size": 32},
    # act_order: without it GPTQ does worse than RTN on SmolLM2 out of sample (+29% against
    # +23%; +5.3% when calibrated on the scored tokens themselves), with it better (+17%).
    "int4 gptq g64": {"quantize": "int4", "group_size": 64, "method": "gptq", "act_order": True,
                      "calibration": _smollm2_calibration},
    # damp 0.1: 8 paragraphs (~1,500 tokens) leave the 1536-wide FFN Hessians ill-conditioned;
    # at the default 0.01 GPTQ g128 fell below RTN g128 on MiniLM (0.942 against 0.949).
    "int4 gptq g128": {"quantize": "int4", "group_size": 128, "method": "gptq",
                       "act_order": True, "damp": 0.1, "calibration": _minilm_calibration},
    # GPTQ as the paper runs it (sequential: each layer calibrated with those before it already
    # quantized) plus a clipped range per group, on ~60 paragraphs: MiniLM's INT4 row.
    "int4 gptq g32 seq clip": {"quantize": "int4", "group_size": 32, "method": "gptq",
                               "act_order": True, "damp": 0.1, "sequential": True,
                               "clip": True, "calibration": _minilm_calibration_wide},
}

# Largest perplexity increase over float32 each configuration may show: the measured one
# (README, "Quantized quality") plus about half again, to catch a regression, not noise (the
# computation is deterministic; the margin covers other CPUs' float32 summation orders).
# The "float32" model is SmolLM2's Q4_1 GGUF dequantised: its weights already lie on a 4-bit
# grid (groups of 32, fp16 scale and minimum), which int4 RTN, whose zero-point grid always
# holds 0, cannot reproduce, so int4 pays nearly a full rounding again (g32 no better than
# g64). Round-to-nearest FP8 misses the issue's +1% on this 135M model (e4m3 weights alone,
# activations left in float32, cost +1.6%); GPTQ's error feedback with the fp8 cast as its
# quantiser (kpt.quant.gptq_fp8) takes the weights' cost to about nothing: measured -0.24%
# (row) and +0.91% (block) with per-token / 1x128 activations, the bounds a little above.
PERPLEXITY_BOUND = {
    "fp8 row": 0.08,
    "fp8 block": 0.04,
    "fp8 gptq row": 0.01,
    # GPTQ on block-scaled fp8 weights is sensitive to the last bits of its calibration
    # activations: the same code measured +0.9% (2026-12-06), +2.3% with one thread and +2.6%
    # with two on another CPU (2026-12-07), where round to nearest stays at +2.04%.
    "fp8 gptq block": 0.035,
    "int4 rtn g128": 0.08,
    "int4 rtn g64": 0.30,
    "int4 rtn g32": 0.30,
    "int4 gptq g64": 0.25,
}
FP8_TARGET = 0.01  # the issue's: FP8 within +1% of float32 perplexity

_measured: dict[str, tuple[float, int, int, tuple[int, int] | None]] = {}
_cosines: dict[str, float] = {}


@pytest.fixture(scope="module")
def smollm2():
    return bundled.load_smollm2(torch.float32)


@pytest.fixture(scope="module")
def minilm():
    return bundled.load_minilm(torch.float32)


def _projections(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def measure(model, tokenizer, name: str, score) -> tuple:
    """(score, quantized projections, projections patch aimed at, weight bytes) of one config,
    checking that unpatch gives back the very same modules and parameters."""
    options = CONFIGS[name]
    if options is None:
        return score(model, tokenizer), 0, 0, None
    if callable(options.get("calibration")):
        options = {**options, "calibration": options["calibration"](model, tokenizer)}
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    with kpt_hf.patch(model, **options) as handle:
        quantized = sum(isinstance(m, QUANTIZED_LINEARS) for m in model.modules())
        aimed = quantized + sum(1 for p in handle.skipped if p in modules and isinstance(
            modules[p], torch.nn.Linear))
        value = score(model, tokenizer)
        assert quantized > 0
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules()), "unpatch swapped modules"
    assert all(p is params[n] for n, p in model.named_parameters()), "unpatch swapped params"
    return value, quantized, aimed, handle.weight_bytes


def smollm2_perplexity(smollm2, name: str) -> tuple:
    if name not in _measured:
        _measured[name] = measure(*smollm2, name, lambda m, t: bundled.perplexity(
            m, t, max_tokens=MAX_TOKENS))
    return _measured[name]


@needs_smollm2
@pytest.mark.slow
@pytest.mark.parametrize("name", list(PERPLEXITY_BOUND))
def test_smollm2_quantized_perplexity(smollm2, name):
    base = smollm2_perplexity(smollm2, "float32")[0]
    ppl, quantized, aimed, (before, after) = smollm2_perplexity(smollm2, name)
    # 30 layers x q/k/v/o/gate/up/down.
    assert aimed == 210, aimed
    assert quantized == (30 if name == "int4 rtn g128" else 210), quantized
    assert after < before / 3, (before, after)  # fp8: 1/4 of float32, int4 about 1/7
    assert 5 < base < 40, base
    assert ppl / base - 1 <= PERPLEXITY_BOUND[name], (name, ppl, base)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_gptq_beats_rtn(smollm2):
    gptq, rtn = (smollm2_perplexity(smollm2, f"int4 {m} g64")[0] for m in ("gptq", "rtn"))
    assert gptq < rtn, (gptq, rtn)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_fp8_meets_the_issue_target(smollm2):
    """The best FP8 configuration (GPTQ row weights with per-token activations) within +1%,
    and GPTQ better than round-to-nearest for per-row weight scales, where its gain (about 5%
    of perplexity) is far above the run-to-run spread. With 128x128 block scales GPTQ and
    round to nearest lie within that spread of each other (PERPLEXITY_BOUND's note), so no
    order is asserted there."""
    base = smollm2_perplexity(smollm2, "float32")[0]
    ppl = {name: smollm2_perplexity(smollm2, name)[0]
           for name in ("fp8 row", "fp8 block", "fp8 gptq row", "fp8 gptq block")}
    assert min(ppl.values()) / base - 1 <= FP8_TARGET, (ppl, base)
    assert ppl["fp8 gptq row"] < 0.97 * ppl["fp8 row"], ppl


MINILM_CONFIGS = ("fp8 row", "fp8 block", "fp8 gptq row", "fp8 gptq block", "int4 rtn g128",
                  "int4 rtn g32", "int4 gptq g128", "int4 gptq g32 seq clip")
# Smallest cosine similarity to the float32 embeddings each configuration may show, every
# sentence. FP8: the issue's 0.99 (measured 0.9954-0.9970, GPTQ or not). INT4: RTN 0.949 g128,
# 0.967 g32 (zero-point; symmetric worse); GPTQ g128 0.959 from 8 paragraphs of calibration
# at damp 0.1; sequential GPTQ g32 with clipped groups 0.98012 (the issue's 0.98, checked by
# test_minilm_int4_meets_the_issue_target). The bounds sit about 0.01 below the measurements.
COSINE_BOUND = {"fp8 row": 0.99, "fp8 block": 0.99, "fp8 gptq row": 0.99,
                "fp8 gptq block": 0.99, "int4 rtn g128": 0.94,
                "int4 rtn g32": 0.955, "int4 gptq g128": 0.95, "int4 gptq g32 seq clip": 0.97}
INT4_COSINE_TARGET = 0.98


def minilm_cosine(minilm, name: str) -> float:
    """The smallest cosine similarity to float32 over SENTENCES, checked for coverage."""
    if name not in _cosines:
        model, tokenizer = minilm
        ref = sentence_embeddings(model, tokenizer, SENTENCES)
        emb, quantized, aimed, _ = measure(model, tokenizer, name, lambda m, t: (
            sentence_embeddings(m, t, SENTENCES)))
        assert quantized == aimed == 36, (quantized, aimed)  # 6 layers x q/k/v/o, FFN in, out
        _cosines[name] = (emb * ref).sum(-1).min().item()
    return _cosines[name]


@needs_minilm
@pytest.mark.parametrize("name", MINILM_CONFIGS)
def test_minilm_quantized_embeddings_stay_close(minilm, name):
    assert minilm_cosine(minilm, name) >= COSINE_BOUND[name], (name, _cosines[name])


@needs_minilm
def test_minilm_int4_gptq_beats_round_to_nearest_at_the_same_group_size(minilm):
    """The issue's GPTQ target, on the embeddings: GPTQ g128 above RTN g128."""
    gptq, rtn = minilm_cosine(minilm, "int4 gptq g128"), minilm_cosine(minilm, "int4 rtn g128")
    assert gptq > rtn, (gptq, rtn)


@needs_minilm
def test_minilm_int4_meets_the_issue_target(minilm):
    """Met by sequential GPTQ g32 with clipped groups, by a thin margin: 0.98012 measured (the
    same computation on another CPU's float32 kernels may move the last digits)."""
    best = max(minilm_cosine(minilm, name) for name in MINILM_CONFIGS if "int4" in name)
    assert best >= INT4_COSINE_TARGET, best


@needs_smollm2
@needs_minilm
@pytest.mark.slow
def test_print_quality_table(smollm2, minilm, capsys):
    """The table of README's "Quantized quality (CPU, real weights)" section."""
    for name in ("float32", *PERPLEXITY_BOUND):
        smollm2_perplexity(smollm2, name)
    for name in MINILM_CONFIGS:
        minilm_cosine(minilm, name)
    base = _measured["float32"][0]
    lines = [f"SmolLM2-135M perplexity, first {MAX_TOKENS} tokens of the bundled text; "
             f"all-MiniLM-L6-v2 min cosine to float32 over {len(SENTENCES)} sentences",
             f"{'config':<14} {'perplexity':>10} {'vs fp32':>8} {'quantized':>9} "
             f"{'weights MiB':>13} {'MiniLM cos':>10}"]
    for name in CONFIGS:
        ppl, quantized, aimed, sizes = _measured.get(name, (None, 0, 0, None))
        mib = "-" if sizes is None else f"{sizes[0] / 2**20:.0f}->{sizes[1] / 2**20:.0f}"
        cos = f"{_cosines[name]:.5f}" if name in _cosines else "-"
        vs = "-" if ppl is None else f"{100 * (ppl / base - 1):+.2f}%"
        lines.append(f"{name:<14} {'-' if ppl is None else f'{ppl:.3f}':>10} {vs:>8} "
                     f"{f'{quantized}/{aimed}' if aimed else '-':>9} {mib:>13} {cos:>10}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
