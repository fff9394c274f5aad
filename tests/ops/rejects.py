"""The shared check of the ops' bad-input tests: the error names the op, matches the expected
text, and nothing reached dispatch (no launch, no kernel)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def assert_rejected_before_launch(monkeypatch, spec, op: str, error: type[Exception],
                                  text: str, call: Callable[[], Any]) -> None:
    launched = []
    monkeypatch.setattr(spec, "launch", lambda *a, **kw: launched.append(a))
    monkeypatch.setattr(spec, "launch_keyed", lambda *a, **kw: launched.append(a))
    with pytest.raises(error, match=text) as info:
        call()
    assert op in str(info.value)
    assert not launched
