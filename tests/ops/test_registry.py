"""Per-call dispatch: explicit backend > KPT_BACKEND > autotune database > static priority.

A small op with fake backends on a fake device type exercises the registry alone.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

import kpt.autotune
from kpt.ops import _registry
from kpt.ops._registry import Backend, BackendUnavailable, NoBackendError, Op, Problem


def _runner(name):
    def run(call, config):
        call["ran"] = (name, config)

    return run


def _broken_build(call, config):
    raise BackendUnavailable("build failed: error: expected ';'")


def make_op(name="toy", available=None, supports=None, fast_run=None) -> Op:
    available = available or {}
    supports = supports or {}
    backends = tuple(
        Backend(
            name=b,
            device_types=frozenset({"fakedev"}),
            dtypes=frozenset({torch.float16, torch.float32}),
            run=(fast_run if b == "fast" and fast_run else _runner(b)),
            available=lambda b=b: available.get(b),
            supports=lambda p, b=b: supports.get(b, lambda _p: [])(p),
            configs=lambda p, b=b: [{"variant": f"{b}-default"}, {"variant": f"{b}-other"}],
        )
        for b in ("fast", "medium", "reference")
    )
    return Op(name=name, backends=backends,
              priority={"fakedev": ("fast", "medium", "reference")},
              bucket=lambda p: f"n{p['n']}")


def problem(n=8, dtype=torch.float32, device_type="fakedev") -> Problem:
    return Problem(device_type, 0, dtype, (("n", n),))


@pytest.fixture(autouse=True)
def _no_database(monkeypatch):
    monkeypatch.setattr(kpt.autotune, "lookup", lambda op, p, bucket: None)
    yield
    for name in ("toy", "toy2", "toy3"):  # ops register themselves by name: forget the toys
        _registry._OPS.pop(name, None)


def test_static_priority_takes_first_backend_without_reasons():
    op = make_op(supports={"fast": lambda p: ["n must be even"] if p["n"] % 2 else []})
    assert op.choose(problem(8))[0].name == "fast"
    backend, config = op.choose(problem(7))
    assert backend.name == "medium" and config == {"variant": "medium-default"}


def test_prefer_hook_puts_its_backends_first_for_its_problems_only():
    op = make_op(supports={"medium": lambda p: ["n must be even"] if p["n"] % 2 else []})
    op.prefer = lambda p: ("medium",) if p["n"] > 100 else ()
    assert op.static_choice(problem(n=200))[0].name == "medium"
    assert op.static_choice(problem(n=8))[0].name == "fast"
    # A preferred backend that cannot run the problem is skipped like any other.
    assert op.static_choice(problem(n=201))[0].name == "fast"
    op.prefer = lambda p: ("nope",)
    with pytest.raises(ValueError, match="toy: prefer names unknown backends"):
        op.static_choice(problem())


def test_no_backend_error_lists_every_backends_reasons():
    op = make_op(supports={b: (lambda p: ["too big"]) for b in ("fast", "medium", "reference")})
    with pytest.raises(NoBackendError) as info:
        op.choose(problem(dtype=torch.float16))
    text = str(info.value)
    assert "toy: no backend can run this call" in text
    for name in ("fast", "medium", "reference"):
        assert f"  {name}: too big" in text
    with pytest.raises(NoBackendError, match="dtype bfloat16 not in"):
        op.choose(problem(dtype=torch.bfloat16))


def test_explicit_backend_wins_and_raises_with_reasons_when_it_cannot_run():
    op = make_op(available={"medium": "nvcc not found"})
    assert op.choose(problem(), backend="reference")[0].name == "reference"
    with pytest.raises(ValueError, match="backend 'medium' cannot run this call: nvcc not found"):
        op.choose(problem(), backend="medium")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        op.choose(problem(), backend="nope")


def test_env_backend_global_and_per_op(monkeypatch):
    op = make_op()
    monkeypatch.setenv("KPT_BACKEND", "medium")
    assert op.choose(problem())[0].name == "medium"
    monkeypatch.setenv("KPT_BACKEND", "other_op=fast,toy=reference")
    assert op.choose(problem())[0].name == "reference"
    monkeypatch.setenv("KPT_BACKEND", "other_op=fast")
    assert op.choose(problem())[0].name == "fast"


def test_env_backend_that_cannot_run_falls_back_with_warning_or_raises_when_strict(
        monkeypatch, caplog):
    op = make_op(available={"medium": "hipcc not found"})
    monkeypatch.setenv("KPT_BACKEND", "medium")
    with caplog.at_level(logging.WARNING, logger="kpt"):
        assert op.choose(problem())[0].name == "fast"
    assert "hipcc not found" in caplog.text and "falling back" in caplog.text
    op.clear_cache()
    monkeypatch.setenv("KPT_STRICT", "1")
    with pytest.raises(NoBackendError, match="KPT_STRICT=1"):
        op.choose(problem())


def test_unavailable_first_priority_is_a_fallback_and_strict_forbids_it(monkeypatch, caplog):
    op = make_op(available={"fast": "no GPU compiler"})
    with caplog.at_level(logging.WARNING, logger="kpt"):
        assert op.choose(problem())[0].name == "medium"
    assert "skipping backend 'fast': no GPU compiler" in caplog.text
    op.clear_cache()
    monkeypatch.setenv("KPT_STRICT", "1")
    with pytest.raises(NoBackendError, match="no GPU compiler"):
        op.choose(problem())


def test_unsupported_problem_is_not_a_fallback(monkeypatch):
    # A backend that does not handle this size is ordinary dispatch, even under KPT_STRICT.
    monkeypatch.setenv("KPT_STRICT", "1")
    op = make_op(supports={"fast": lambda p: ["n > 4 only"] if p["n"] <= 4 else []})
    assert op.choose(problem(2))[0].name == "medium"


def test_tuned_choice_is_used_and_an_unusable_one_falls_back(monkeypatch):
    op = make_op(available={"fast": "build failed"})
    tuned = {"n8": ("reference", {"variant": "tuned"}), "n16": ("fast", {"variant": "x"})}
    monkeypatch.setattr(kpt.autotune, "lookup", lambda name, p, bucket: tuned.get(bucket))
    assert op.choose(problem(8)) == (op.backend("reference"), {"variant": "tuned"})
    assert op.choose(problem(16))[0].name == "medium"  # tuned backend unavailable here
    assert op.choose(problem(16), backend="reference")[0].name == "reference"


def test_decisions_are_cached_per_problem(monkeypatch):
    calls = []
    op = make_op(supports={"fast": lambda p: calls.append(p) or []})
    for _ in range(5):
        op.choose(problem(8))
    op.choose(problem(9))
    assert len(calls) == 2
    lookups = []
    monkeypatch.setattr(kpt.autotune, "lookup", lambda *a: lookups.append(a))
    op.clear_cache()
    for _ in range(3):
        op.choose(problem(8))
    assert len(lookups) == 1


def test_backend_failing_at_first_use_is_marked_unavailable_and_dispatch_moves_on(caplog):
    op = make_op(fast_run=_broken_build)
    call: dict = {}
    with caplog.at_level(logging.WARNING, logger="kpt"):
        assert op.launch(problem(), call) == "medium"
    assert call["ran"] == ("medium", {"variant": "medium-default"})
    assert "build failed" in op.reasons("fast", problem())[-1]
    assert "expected ';'" in caplog.text
    with pytest.raises(ValueError, match="backend 'fast' cannot run this call: build failed"):
        op.launch(problem(), call, backend="fast")


def test_a_check_that_raises_is_a_reason_not_a_crash():
    def broken_available():
        raise ImportError("No module named 'triton'")

    op = make_op()
    bad = Op(name="toy2", backends=(
        Backend(name="k", device_types=frozenset({"fakedev"}), dtypes=frozenset({torch.float32}),
                run=_runner("k"), available=broken_available),
        op.backend("reference")), priority={"fakedev": ("k", "reference")}, bucket=str)
    assert bad.choose(problem())[0].name == "reference"
    assert "ImportError: No module named 'triton'" in bad.reasons("k", problem())[0]


def test_cpu_problems_never_touch_the_database(monkeypatch):
    monkeypatch.setattr(kpt.autotune, "lookup", lambda *a: pytest.fail("database consulted"))
    op = Op(name="toy3", backends=(Backend(name="reference", device_types=frozenset({"cpu"}),
                                           dtypes=frozenset({torch.float32}),
                                           run=_runner("reference")),),
            priority={"cpu": ("reference",)}, bucket=str)
    assert op.choose(problem(device_type="cpu"))[0].name == "reference"


@pytest.mark.parametrize("value", [None, "", "cuda", " triton ", "ä=1,b"])
def test_getenv_reads_what_os_environ_holds(monkeypatch, value):
    """The per-call environment read (os.environ's mapping, read directly) sees every change
    made through os.environ, as os.environ.get does."""
    from kpt.ops._common import getenv

    name = "KPT_TEST_GETENV"
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    assert getenv(name, "dflt") == os.environ.get(name, "dflt")
    monkeypatch.setenv(name, "changed")
    assert getenv(name) == "changed"
    monkeypatch.delenv(name)
    assert getenv(name, "gone") == "gone"
