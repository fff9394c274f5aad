"""The README's main job, ``python -m kpt.demo``, on the CPU with a bundled config."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="the demo builds a transformers model")

from kpt.demo import BUNDLED, load_config, main, run  # noqa: E402


@pytest.mark.parametrize("config", BUNDLED)
def test_demo_patches_the_model_and_matches_hf(config):
    rows = dict(run(config, torch.device("cpu"), new_tokens=4))
    assert rows["patched layers"] == str(load_config(config)["num_hidden_layers"])
    assert rows["greedy tokens equal to HF"].startswith("1/1 sequences")
    # float32 on the CPU: only the projection's summation order can differ from HF.
    assert float(rows["logits, relative difference to HF"]) < 1e-5


def test_demo_command_runs(capsys):
    assert main(["--device", "cpu", "--new-tokens", "2"]) == 0
    assert "rmsnorm_qkv_rope T=128" in capsys.readouterr().out
