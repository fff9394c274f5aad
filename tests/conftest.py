"""Test set-up shared by every test directory.

Without a GPU, Triton kernels run under its interpreter; the variable must be set before any
kernel is decorated, i.e. before kpt imports a ``_triton`` module, so it is set here.
"""

import os
from collections import Counter

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _isolated_kpt_state(tmp_path_factory, monkeypatch):
    """Each test sees an empty autotune database of its own and fresh dispatch caches."""
    from kpt.autotune import invalidate

    root = tmp_path_factory.mktemp("kpt-state")
    monkeypatch.setenv("KPT_AUTOTUNE_DB", str(root / "autotune.db"))
    for name in ("KPT_BACKEND", "KPT_STRICT"):
        monkeypatch.delenv(name, raising=False)
    invalidate()
    yield
    invalidate()


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def skip_reasons(reports) -> Counter:
    """Skipped test reports counted by reason (location and the "Skipped: " prefix dropped)."""
    reasons: Counter = Counter()
    for report in reports:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr
        reason = str(reason).strip().removeprefix("Skipped: ").splitlines() or [""]
        reasons[reason[0]] += 1
    return reasons


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Why tests were skipped, by reason and count, above pytest's closing counts line: on a
    CPU machine most GPU tests skip, and a reader should see that those are all of them."""
    reasons = skip_reasons(terminalreporter.stats.get("skipped", []))
    if not reasons:
        return
    terminalreporter.write_sep("-", f"{sum(reasons.values())} skipped, by reason")
    for reason, count in sorted(reasons.items(), key=lambda item: (-item[1], item[0])):
        terminalreporter.write_line(f"{count:6d}  {reason}")
