"""kpt.integrations.hf's paged KV cache (``PagedCache``, ``patch(model, kv_cache="paged")``) on
tiny random-weight models built from configs (no downloads).

float32 on the CPU: the paged path runs kpt's reference kernels (Triton's interpreter where a
test forces it), which differ from HF's SDPA over a DynamicCache in summation order only. Logit
tolerances are a few float32 ulps of values of order 1 (1e-5, as in test_hf.py); a pad that is
attended, a token stored at the wrong slot or a page mixed up moves logits by ~1e-1.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers")

import kpt.integrations.hf as kpt_hf  # noqa: E402
from kpt.integrations import _hf_attention  # noqa: E402
from tests.integrations.test_hf import TOL, VOCAB, padded_batch, tiny  # noqa: E402

CACHE_KW = "cache" if "cache" in inspect.signature(
    transformers.LlamaForCausalLM.forward).parameters else "past_key_values"
FAMILIES = ("llama", "qwen2", "mistral")  # mistral: a sliding window of 4 that cuts
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shared_prompt.py"


@pytest.fixture
def kpt_calls():
    _hf_attention.calls.clear()
    yield _hf_attention.calls
    _hf_attention.calls.clear()


def _generate(model, ids, mask, **extra):
    return model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False,
                          pad_token_id=0, **extra)


@pytest.mark.parametrize("page_size", [1, 16, 5], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_left_padding_matches_dynamic_cache(family, page_size, kpt_calls,
                                                           monkeypatch):
    """Greedy tokens of a left-padded batch equal HF's DynamicCache + SDPA; 5 divides none of
    the lengths (rows of 9, 3 and 7 real prompt tokens, then 9 new ones)."""
    model = tiny(family)
    ids, mask = padded_batch([9, 3, 7], left=True, seed=3)
    made = []
    original = kpt_hf.PagedCache._start
    monkeypatch.setattr(kpt_hf.PagedCache, "_start", lambda self, *a: made.append(self)
                        or original(self, *a))
    with torch.no_grad():
        want = _generate(model, ids, mask)
        with kpt_hf.patch(model, kv_cache="paged"):
            pages = {"cache_config": {"page_size": page_size}}
            got = _generate(model, ids, mask, **pages)
            single = _generate(model, ids[1:2, -3:], mask[1:2, -3:], **pages)
    assert torch.equal(got, want)
    assert torch.equal(single[0], want[1, -12:])  # the short row alone, without its pads
    assert [c.page_size for c in made] == [page_size, page_size]
    # 8 decode steps after the prefill, per layer and generate call; the prefill attends
    # over the new keys in hand (kpt's varlen path)
    assert kpt_calls["paged_decode"] == 2 * 8 * 2 and kpt_calls["varlen"] == 2
    assert made[0].lengths == [9 + 8, 3 + 8, 7 + 8]  # pads were never stored


def _forward(model, cache, ids, mask, start):
    positions = (torch.arange(start, start + ids.shape[1])[None].expand(ids.shape[0], -1)
                 if mask is None else
                 (mask.cumsum(-1) - 1).clamp(min=0)[:, start:start + ids.shape[1]])
    window = None if mask is None else mask[:, : start + ids.shape[1]]
    return model(ids, attention_mask=window, position_ids=positions, use_cache=True,
                 **{CACHE_KW: cache}).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_manual_chunked_prefill_and_decode_logits_match(family, kpt_calls):
    """A left-padded batch fed in chunks (the first chunk all pads in one row, so the second is
    that row's prefill while the others continue), then decode steps: the logits of every real
    token equal HF's DynamicCache + SDPA ones."""
    model = tiny(family)
    lengths, total, chunks = [10, 3, 7], 10, [(0, 6), (6, 10)]
    ids, mask = padded_batch(lengths, total, seed=5, left=True)
    steps = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(6))
    mask = torch.cat([mask, torch.ones(3, 4, dtype=mask.dtype)], 1)
    ids = torch.cat([ids, steps], 1)
    chunks += [(c, c + 1) for c in range(total, total + 4)]

    def run(cache):
        return torch.cat([_forward(model, cache, ids[:, a:b], mask, a) for a, b in chunks], 1)

    with torch.no_grad():
        want = run(transformers.DynamicCache(config=model.config))
        with kpt_hf.patch(model):
            cache = kpt_hf.PagedCache(model.config, page_size=4, num_pages=2)  # grows
            got = run(cache)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], **TOL)
    assert kpt_calls["paged_prefill"] == 2 and kpt_calls["paged_decode"] == 2 * 4
    assert cache.lengths == [14, 7, 11] and cache.get_seq_length() == 14
    assert cache.num_pages >= sum(-(-n // 4) for n in cache.lengths)
    assert cache.kv_bytes() == sum(len(p) for p in cache.pages) * 4 * 2 * 16 * 4 * 2 * 2


def test_shared_prefix_and_copies_match_one_cache_per_request(kpt_calls):
    """share_prefix (cascade_attention) and batch_repeat_interleave (paged copies) give each
    request the logits of its whole sequence run through HF's DynamicCache."""
    model = tiny("qwen2")
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, VOCAB, (1, 21), generator=gen)  # 21: a partial last page
    own = torch.randint(0, VOCAB, (3, 4), generator=gen)
    n = own.shape[0]

    def run(cache, layout):
        prefill = _forward(model, cache, prompt, None, 0)
        if layout == "share":
            cache.share_prefix(n)
        elif layout == "copy":
            cache.batch_repeat_interleave(n)
        else:
            cache.batch_repeat_interleave(n)
        out = [_forward(model, cache, own[:, :3], None, 21)]
        out += [_forward(model, cache, own[:, 3:4], None, 24)]
        return prefill, torch.cat(out, 1)

    with torch.no_grad():
        want_prefill, want = run(transformers.DynamicCache(config=model.config), "dynamic")
        with kpt_hf.patch(model):
            shared = kpt_hf.PagedCache(model.config, page_size=8)
            got_prefill, got_shared = run(shared, "share")
            assert kpt_calls["cascade"] == 2 * 2 and not kpt_calls["paged_decode"]
            copied = kpt_hf.PagedCache(model.config, page_size=8)
            _, got_copied = run(copied, "copy")
    torch.testing.assert_close(got_prefill, want_prefill, **TOL)
    torch.testing.assert_close(got_shared, want, **TOL)
    torch.testing.assert_close(got_copied, want, **TOL)
    page = 8 * 2 * 16 * 4 * 2 * 2  # slots x kv heads x dim x fp32 x (k, v) x layers
    assert shared.kv_bytes() == (3 + n * 1) * page  # the prompt's 3 pages once
    assert copied.kv_bytes() == n * 4 * page  # 25 tokens in 4 pages, per request


def test_rewind_forgets_decode_steps():
    model = tiny("llama")
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(8))
    step = torch.randint(0, VOCAB, (2, 1), generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), kpt_hf.patch(model):
        cache = kpt_hf.PagedCache(model.config, page_size=4)
        _forward(model, cache, ids, None, 0)
        first = _forward(model, cache, step, None, 6)
        _forward(model, cache, step, None, 7)
        _forward(model, cache, step, None, 8)
        free = len(cache.free)
        cache.rewind(6)
        # 9 tokens in 3 pages of 4 -> 6 in 2: one page per row back to the pool
        assert len(cache.free) == free + 2 and cache.lengths == [6, 6]
        again = _forward(model, cache, step, None, 6)
        with pytest.raises(ValueError, match="PagedCache.rewind"):
            cache.rewind(9)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_unpatch_restores_generate_and_state_dict(kpt_calls):
    model = tiny("llama")
    ids, mask = padded_batch([5, 3], left=True, seed=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    with torch.no_grad():
        handle = kpt_hf.patch(model, kv_cache="paged")
        assert "_prepare_cache_for_generation" in vars(model)
        assert model.state_dict().keys() == state.keys()
        _generate(model, ids, mask)
        assert kpt_calls["paged_decode"]
        handle.unpatch()
        kpt_calls.clear()
        _generate(model, ids, mask)
    assert not kpt_calls  # HF's own path again
    assert "_prepare_cache_for_generation" not in vars(model)
    assert model.config._attn_implementation == "sdpa"
    assert list(model.parameters()) == params
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_user_cache_and_beam_search_keep_their_caches(kpt_calls):
    model = tiny("llama")
    ids, mask = padded_batch([5, 3], left=True, seed=2)
    with torch.no_grad(), kpt_hf.patch(model, kv_cache="paged"):
        want = _generate(model, ids, mask, num_beams=2)  # beams reorder rows: DynamicCache
        assert not kpt_calls["paged_decode"]
        got = _generate(model, ids, mask, **{CACHE_KW: transformers.DynamicCache(
            config=model.config)})
        assert not kpt_calls["paged_decode"]
    assert want.shape == got.shape


def test_bad_arguments_raise_naming_the_function():
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"kpt\.integrations\.hf\.patch: kv_cache"):
        kpt_hf.patch(model, kv_cache="bogus")
    assert not hasattr(model, "_kpt_patch") and model.config._attn_implementation == "sdpa"
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=96))
    with pytest.raises(ValueError, match=r"patch: kv_cache='paged' is for models that generate"):
        kpt_hf.patch(bert, kv_cache="paged")
    assert not hasattr(bert, "_kpt_patch")  # a failed patch leaves nothing behind
    for bad in ({"page_size": 0}, {"page_size": 300}, {"num_pages": 0}):
        with pytest.raises(ValueError, match="PagedCache"):
            kpt_hf.PagedCache(model.config, **bad)
    # the cache is read by kpt's attention only: another implementation would ignore its pages
    with torch.no_grad(), pytest.raises(ValueError, match="PagedCache.*'sdpa'"):
        model(torch.ones(1, 3, dtype=torch.long),
              **{CACHE_KW: kpt_hf.PagedCache(model.config)})


def test_forced_triton_backend_paged_decode(kpt_calls):
    pytest.importorskip("triton", reason="the triton backend needs triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton on a CPU: interpreter
    model = tiny("qwen2", dtype=torch.bfloat16).to(device)  # Triton's kernels take fp16/bf16
    ids, mask = (t.to(device) for t in padded_batch([6, 3], left=True, seed=4))
    step = torch.tensor([[5], [7]], device=device)
    with torch.no_grad():
        dynamic = transformers.DynamicCache(config=model.config)
        _forward(model, dynamic, ids, mask, 0)
        mask1 = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        want = _forward(model, dynamic, step, mask1, 6)
        with kpt_hf.patch(model, backend="triton"):
            cache = kpt_hf.PagedCache(model.config, page_size=4)
            _forward(model, cache, ids, mask, 0)
            got = _forward(model, cache, step, mask1, 6)
    # bf16 through two layers: one bf16 ulp (2^-8 relative) of a rounding elsewhere propagates
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
    assert kpt_calls["paged_decode"] == 2


def test_shared_prompt_example_small_mode(monkeypatch):
    spec = importlib.util.spec_from_file_location("shared_prompt_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # its dataclasses look it up
    spec.loader.exec_module(example)
    report = example.run(["--small"])
    assert report.equal and report.ok  # float32: the same tokens, no near-tie allowance
    assert report.cascade.kv_bytes < report.naive.kv_bytes
    assert report.cascade.paths.get("cascade") and report.naive.paths.get("paged_decode")
    assert "tokens equal: yes" in report.table()
