"""kpt.integrations.hf on a GPU, against plain transformers on a tiny random bf16 Llama: one
decode step over HF's StaticCache captured in a CUDA graph and replayed, padded and packed
batches, and one training step's gradients.

Tolerances are relative to HF's own bf16 error: both paths are compared with the same model
(the same bf16 weights) run by HF in float32, and kpt's error may be at most twice HF's plus
0.2% (``ACCURACY``). Both round differently (kpt fuses the norm, projection and RoPE and keeps
float32 in between), so neither reproduces the other bit for bit, but a wrong mask, position or
key set moves the logits by tens of percent, far past that bound.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import Tensor

transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers")
import kpt.integrations.hf as kpt_hf  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device: kpt's GPU kernels, bf16 attention and CUDA graph capture")

DEVICE = "cuda"
# The KV cache keyword: ``cache`` from transformers 5.24 on, ``past_key_values`` before.
_FORWARD = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
CACHE_KW = "cache" if "cache" in _FORWARD else "past_key_values"
# kpt's relative error to float32 <= FACTOR x HF's own + FLOOR (see the module docstring).
FACTOR, FLOOR = 2.0, 2e-3
VOCAB = 512


def tiny_llama() -> torch.nn.Module:
    """2 layers, GQA 4/2 heads of 64, llama3 RoPE scaling; std 0.08 weights, so logits spread
    over a few units and greedy choices are rarely near-ties."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        initializer_range=0.08, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def float32_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same (bf16-valued) weights run in float32: the exact answer both paths approximate."""
    return copy.deepcopy(model).float()


def rel(a: Tensor, b: Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def assert_as_accurate(kpt: Tensor, hf: Tensor, exact: Tensor, what: str) -> None:
    err_kpt, err_hf = rel(kpt, exact), rel(hf, exact)
    assert err_kpt <= FACTOR * err_hf + FLOOR, (
        f"{what}: kpt is {err_kpt:.2e} off float32, HF's bf16 path {err_hf:.2e}")


def ragged(lengths: tuple[int, ...], seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).to(DEVICE) for n in lengths]


def rewind(cache, length: int) -> None:
    """A StaticCache writes at each layer's ``cumulative_length``: moving it back in place makes
    the next step overwrite what the warm-up steps wrote (the mask hides slots past it)."""
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)


@torch.no_grad()
def hf_greedy(model, prompt: Tensor, steps: int) -> tuple[list[Tensor], list[Tensor]]:
    """Plain HF, eager over a DynamicCache: the input token of each decode step (the first is
    the prompt's argmax) and the logits each step returns."""
    cache = transformers.DynamicCache(config=model.config)
    logits = model(prompt, use_cache=True, **{CACHE_KW: cache}).logits[:, -1]
    tokens, outputs = [logits.argmax(-1, keepdim=True)], []
    for i in range(steps):
        pos = torch.full_like(tokens[-1], prompt.shape[1] + i)
        logits = model(tokens[-1], position_ids=pos, use_cache=True,
                       **{CACHE_KW: cache}).logits[:, -1]
        outputs.append(logits)
        tokens.append(logits.argmax(-1, keepdim=True))
    return tokens, outputs


@torch.no_grad()
def teacher_forced(model, prompt: Tensor, tokens: list[Tensor]) -> list[Tensor]:
    """Logits of each decode step of ``model`` fed ``tokens`` (eager, DynamicCache)."""
    cache = transformers.DynamicCache(config=model.config)
    model(prompt, use_cache=True, **{CACHE_KW: cache})
    return [model(t, position_ids=torch.full_like(t, prompt.shape[1] + i), use_cache=True,
                  **{CACHE_KW: cache}).logits[:, -1] for i, t in enumerate(tokens)]


def test_static_cache_decode_step_replays_in_a_cuda_graph():
    model = tiny_llama()
    prompt = torch.stack(ragged((24, 24), seed=1))
    steps, context = 6, prompt.shape[1]
    hf_tokens, hf_logits = hf_greedy(model, prompt, steps)
    exact = teacher_forced(float32_twin(model), prompt, hf_tokens[:steps])
    with kpt_hf.patch(model), torch.no_grad():
        caches = [transformers.StaticCache(config=model.config, max_cache_len=48)
                  for _ in range(2)]
        for cache in caches:
            model(prompt, use_cache=True, **{CACHE_KW: cache})
        graph_cache, eager_cache = caches
        ids, pos = hf_tokens[0].clone(), torch.full_like(hf_tokens[0], context)

        def step() -> Tensor:
            return model(ids, position_ids=pos, use_cache=True,
                         **{CACHE_KW: graph_cache}).logits[:, -1]

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        rewind(graph_cache, context)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = step()
        confident = 0
        for i in range(steps):
            ids.copy_(hf_tokens[i])
            pos.fill_(context + i)
            graph.replay()
            eager = model(hf_tokens[i], position_ids=torch.full_like(ids, context + i),
                          use_cache=True, **{CACHE_KW: eager_cache}).logits[:, -1]
            # The graph replays the kernels of the eager call on the same inputs and cache
            # contents; only a launch-dependent reduction order could move a logit, by about
            # one bf16 rounding (2^-8 relative, 0.016 at the logits' size of ~4).
            torch.testing.assert_close(replayed, eager, rtol=2**-8, atol=2e-2)
            assert_as_accurate(replayed, hf_logits[i], exact[i], f"decode step {i}")
            # Greedy agreement: HF's next token wherever its top two logits are further apart
            # than the two paths' differences can bridge (the teacher-forced inputs are HF's
            # greedy tokens, so agreement at every step is greedy agreement).
            top2 = hf_logits[i].float().topk(2, dim=-1).values
            sure = (top2[:, 0] - top2[:, 1]) > 0.25
            confident += int(sure.sum())
            assert torch.equal(replayed.argmax(-1)[sure], hf_tokens[i + 1][:, 0][sure]), i
        assert confident > 0
        # Replays advance the static cache by one token each, like eager steps.
        assert int(graph_cache.layers[0].cumulative_length) == context + steps


def test_padded_and_packed_batches_match_hf():
    model = tiny_llama()
    lengths = (150, 64, 17)  # past one 128-key block, one block, a ragged tail
    seqs = ragged(lengths)
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long, device=DEVICE)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    packed = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(n, device=DEVICE) for n in lengths])[None]
    twin = float32_twin(model)
    with torch.no_grad():
        runs = {}
        for name, m in (("hf", model), ("exact", twin)):
            runs[name] = (m(ids, attention_mask=mask).logits,
                          [m(s[None]).logits[0] for s in seqs])
        with kpt_hf.patch(model):
            padded_kpt = model(ids, attention_mask=mask).logits
            packed_kpt = model(packed, position_ids=positions).logits[0]
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    for i, n in enumerate(lengths):
        hf_padded, hf_alone = runs["hf"][0][i, :n], runs["hf"][1][i]
        exact_padded, exact_alone = runs["exact"][0][i, :n], runs["exact"][1][i]
        assert_as_accurate(padded_kpt[i, :n], hf_padded, exact_padded, f"padded sequence {i}")
        # Packed: each sequence must see only itself, as when run alone.
        assert_as_accurate(packed_kpt[offsets[i] : offsets[i + 1]], hf_alone, exact_alone,
                           f"packed sequence {i}")


def test_training_step_gradients_match_hf():
    model = tiny_llama()
    lengths = (96, 41, 130)
    seqs = ragged(lengths, seed=2)
    ids = torch.zeros(len(seqs), max(lengths), dtype=torch.long, device=DEVICE)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    labels = ids.masked_fill(mask == 0, -100)

    def step(m) -> tuple[Tensor, dict[str, Tensor]]:
        m.zero_grad(set_to_none=True)
        loss = m(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        m.zero_grad(set_to_none=True)
        return loss.detach(), grads

    twin = float32_twin(model)
    hf_loss, hf_grads = step(model)
    exact_loss, exact_grads = step(twin)
    with kpt_hf.patch(model):
        kpt_loss, kpt_grads = step(model)
    assert_as_accurate(kpt_loss, hf_loss, exact_loss, "loss")
    # The patch keeps the parameter objects, so every gradient lands where HF's does.
    assert kpt_grads.keys() == hf_grads.keys() == exact_grads.keys()
    for name in hf_grads:
        assert_as_accurate(kpt_grads[name], hf_grads[name], exact_grads[name], name)
