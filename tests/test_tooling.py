"""What a newcomer meets first: the test run's skip summary, the demo without transformers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_skips_are_summarised_by_reason_above_pytests_counts(tmp_path):
    (tmp_path / "test_some.py").write_text(textwrap.dedent('''
        import pytest

        @pytest.mark.parametrize("n", [1, 2])
        def test_gpu(n):
            pytest.skip("needs a CUDA device")

        @pytest.mark.skip(reason="hipcc not found")
        def test_hip():
            pass

        def test_runs():
            pass
    '''))
    done = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                 str(tmp_path)], cwd=tmp_path)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    start = next(i for i, ln in enumerate(lines) if "3 skipped, by reason" in ln)
    assert [ln.split(None, 1) for ln in lines[start + 1:start + 3]] == [
        ["2", "needs a CUDA device"], ["1", "hipcc not found"]]
    assert lines[-1].startswith("1 passed, 3 skipped in")


def test_the_demo_without_transformers_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['transformers'] = None; from kpt.demo import main; "
            "sys.exit(main(['--config', 'demo-llama']))")
    done = _run(["-c", code], cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.strip().splitlines() == [done.stdout.strip()]  # one line
    assert "pip install 'kpt[hf]'" in done.stdout
