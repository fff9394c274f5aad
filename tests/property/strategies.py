"""Shared pieces of the property suite: hypothesis settings, tensor layouts, and the one
contract every public function is held to.

The contract (project issue 27): called with any input, a public function either raises a
``ValueError`` / ``TypeError`` whose message names it, or returns what the reference backend
returns for the same input (within the op's documented tolerance). Anything else, another
exception type, an error that does not say which op failed, a crash or a different answer,
is a bug. Hangs are ruled out by construction: every size drawn here is tiny.

Reproducibility: every property runs with ``derandomize=True`` and no example database, so
CI draws the same examples on every run (a failure is a failure of this commit, not of luck),
and with ``deadline=None`` (the Triton interpreter's first call of a kernel is slow).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

HALF = (torch.float16, torch.bfloat16)
# Error types the contract allows; the message must also name the op.
NAMED_ERRORS = (ValueError, TypeError)


def props(max_examples: int) -> settings:
    """Reproducible settings for one property (see the module docstring)."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                               HealthCheck.data_too_large],
    )


# ---- the contract -----------------------------------------------------------------------------


def _names(op: str | Sequence[str]) -> tuple[str, ...]:
    return (op,) if isinstance(op, str) else tuple(op)


def named_error_or_result(fn: Callable[[], Any], op: str | Sequence[str]) -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, message)`` when ``fn`` raised a ValueError / TypeError
    naming ``op`` (any of the names). Any other exception fails the test, saying why."""
    try:
        return fn(), None
    except NAMED_ERRORS as err:
        message = str(err)
        assert any(name in message for name in _names(op)), (
            f"{type(err).__name__} does not name {op!r}: {message}")
        return None, message
    except Exception as err:  # noqa: BLE001 - the point: anything else is a bug
        pytest.fail(f"obscure {type(err).__name__} instead of a ValueError/TypeError naming "
                    f"{op!r}: {err}")


def expect_named_error(fn: Callable[[], Any], op: str | Sequence[str], what: str = "") -> str:
    """``fn()`` must raise a ValueError / TypeError naming ``op``; returns the message."""
    result, message = named_error_or_result(fn, op)
    assert message is not None, (f"{what or 'bad input'} was accepted: returned "
                                 f"{type(result).__name__} instead of a ValueError/TypeError "
                                 f"naming {op!r}")
    return message


def check_close(reason: str | None) -> None:
    """``kpt.ops._common.compare``-style result: None or the reason they differ."""
    assert reason is None, reason


def same_specials(name: str, got, want) -> None:
    """``got`` has NaN, +inf and -inf exactly where ``want`` has them (the overflow rule of
    kpt/ops/flash_attention/reference.py)."""
    import torch

    got, want = got.detach().cpu(), want.detach().cpu()
    for what, where in (("NaN", torch.isnan), ("+inf", torch.isposinf),
                        ("-inf", torch.isneginf)):
        assert torch.equal(where(got), where(want)), f"{name}: {what} at other places"


def check_specials(name: str, got, want, rtol: float, atol: float) -> None:
    """:func:`same_specials`, and the finite values within rtol / atol elementwise."""
    import torch

    same_specials(name, got, want)
    got, want = got.detach().cpu(), want.detach().cpu()
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=rtol, atol=atol, msg=name)


# ---- tensors ----------------------------------------------------------------------------------

# How an input tensor is laid out in memory. The values seen by the op are those of the view,
# and the reference is always called on the very same view, so a layout may change values
# ("broadcast" repeats one slice) without changing what is compared.
LAYOUTS = ("contiguous", "padded_rows", "strided_last", "broadcast", "reversed_dims")


def random_tensor(gen: torch.Generator, shape: Sequence[int], dtype: torch.dtype,
                  scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)


def relayout(t: torch.Tensor, layout: str, dim: int = 0) -> torch.Tensor:
    """A view of ``t``'s shape (and dtype) in another memory layout:

    * ``padded_rows``: rows of a wider buffer (last dim contiguous, outer strides padded);
    * ``strided_last``: every other element of the last dim (stride 2);
    * ``broadcast``: dim ``dim`` expanded from size 1 (stride 0; values repeat along it);
    * ``reversed_dims``: a permuted copy permuted back (no dim contiguous in the usual order).

    The padding around ``padded_rows`` / ``strided_last`` views is NaN, so a kernel that reads
    outside the view it was given shows up in its output.
    """
    if t.dim() == 0 or t.numel() == 0 or layout == "contiguous":
        return t
    if layout == "padded_rows":
        big = torch.full((*t.shape[:-1], t.shape[-1] + 3), float("nan"), dtype=t.dtype)
        big[..., : t.shape[-1]] = t
        return big[..., : t.shape[-1]]
    if layout == "strided_last":
        big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "broadcast":
        dim = dim % t.dim()
        return t.narrow(dim, 0, 1).expand(t.shape)
    if layout == "reversed_dims":
        order = list(range(t.dim()))[::-1]
        return t.permute(order).contiguous().permute(order)
    raise AssertionError(layout)


# ---- strategies -------------------------------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)
layouts = st.sampled_from(LAYOUTS)
