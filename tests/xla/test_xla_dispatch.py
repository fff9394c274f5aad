"""The ``xla`` backend as dispatch and ``python -m kpt.info`` see it on a PJRT CPU device: it
is the choice for every op, in its XLA form, and the Pallas form's reason says why not."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

pytest.importorskip("torch_xla", reason="torch_xla is not installed: tests/xla run in .venv-xla "
                    "(bash scripts/setup_xla.sh)")

import torch_xla  # noqa: E402

from kpt.info import backend_rows, example_problem  # noqa: E402
from kpt.ops._registry import all_ops  # noqa: E402

DEV = torch_xla.device()
# Every registered op with an xla backend, by the kpt.backends.xla module that implements it.
MODULES = {"flash_attention": "flash_attention", "flash_attention_backward": "flash_attention",
           "flex_attention": "flex_attention", "paged_attention": "paged_attention",
           "append_paged_kv": "paged_attention", "rmsnorm_qkv_rope": "rmsnorm_qkv_rope",
           "fp8_gemm": "fp8_gemm", "int4_gemm": "int4_gemm", "moe_route": "moe",
           "fused_moe": "moe"}


def test_every_listed_op_declares_xla():
    declared = {name for name, op in all_ops().items()
                if any(b.name == "xla" for b in op.backends)}
    assert set(MODULES) <= declared


@pytest.mark.parametrize("name", sorted(MODULES))
def test_dispatch_chooses_the_xla_form(name):
    op = all_ops()[name]
    problem = example_problem(op, DEV, torch.bfloat16)
    if name == "fp8_gemm":
        assert problem.dtype == torch.float8_e4m3fn
    chosen, config = op.static_choice(problem)
    assert (chosen.name, config) == ("xla", {"kernel": "xla"})


@pytest.mark.parametrize("name", sorted(set(MODULES.values())))
def test_pallas_form_has_a_reason_here(name):
    module = importlib.import_module(f"kpt.backends.xla.{name}")
    op = all_ops()[next(op for op, mod in MODULES.items() if mod == name)]
    reasons = module.pallas_reason(example_problem(op, DEV, torch.bfloat16))
    assert reasons, f"{name}: no reason, yet the Pallas form cannot run on a CPU PJRT device"
    if name == "flash_attention":
        assert reasons[0] == "torch_xla's Pallas kernels need a TPU (the PJRT device is CPU)"


def test_info_rows_on_the_xla_device():
    rows = {(op, backend): status for op, backend, status in backend_rows(DEV)}
    for name in MODULES:
        assert rows[(name, "xla")] == "ok"


def test_pallas_flash_glue_with_a_stand_in_kernel(monkeypatch):
    """The Pallas form's plumbing (layout, GQA, lse = m + log l) with a PyTorch stand-in for
    torch_xla's ``fa_custom_forward`` (JAX's TPU kernel cannot run here): what the TPU path
    computes, short of the kernel itself."""
    import torch_xla.experimental.custom_kernel as ck

    from kpt.backends.xla import flash_attention as xla_flash
    from kpt.ops import flash_attention
    from kpt.ops.flash_attention import Call

    def stand_in(q, k, v, causal, q_seg, kv_seg, sm_scale, ab, spec, mesh, ctx_grad):
        assert q.shape == k.shape == v.shape and q_seg is None and all(ctx_grad)
        s = (q.float() @ k.float().transpose(-1, -2)) * sm_scale
        if causal:  # top-left, as JAX's kernel
            s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
        m = s.amax(-1)
        p = torch.exp(s - m[..., None])
        l = p.sum(-1)  # noqa: E741 - the kernel's name
        o = (p / l[..., None]) @ v.float()
        return o.to(q.dtype), q, k, v, l, m, None

    monkeypatch.setattr(ck, "fa_custom_forward", stand_in)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 128, 4, 64, generator=gen).to(torch.bfloat16)
    k = torch.randn(2, 128, 2, 64, generator=gen).to(torch.bfloat16)
    v = torch.randn(2, 128, 2, 64, generator=gen).to(torch.bfloat16)
    want, want_lse = flash_attention(q, k, v, causal=True, return_lse=True, backend="reference")
    qx, kx, vx = q.to(DEV), k.to(DEV), v.to(DEV)
    call = Call(qx, kx, vx, None, None, 128, 128, 64**-0.5, -1, 0, 0.0,
                torch.empty_like(qx), torch.empty(2, 4, 128, device=DEV))
    xla_flash.run(call, {"kernel": "pallas"})
    assert (call.out.cpu().float() - want.float()).norm() / want.float().norm() < 2**-7
    assert (call.lse.cpu() - want_lse).abs().max() < 1e-4


def test_pallas_comes_first_where_it_can_run(monkeypatch):
    from kpt.backends import xla
    from kpt.backends.xla import flash_attention as xla_flash

    monkeypatch.setattr(xla, "pallas_unavailable", lambda: None)
    op = all_ops()["flash_attention"]
    square = example_problem(op, DEV, torch.bfloat16)  # causal, 16 tokens
    assert xla_flash.configs(square) == [{"kernel": "xla"}]  # 16 is not a multiple of 128
    big = dataclasses.replace(square, dims=tuple(
        (k, 128 if k in ("seqlen_q", "seqlen_k") else v) for k, v in square.dims))
    assert xla_flash.configs(big) == [{"kernel": "pallas"}, {"kernel": "xla"}]
