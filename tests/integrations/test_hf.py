"""kpt.integrations.hf on tiny random-weight models built from configs (no downloads).

float32 on the CPU: the patched paths run kpt's reference (and, where asked, Triton-interpreter)
kernels, which differ from HF's modules only in summation order. Logit tolerances are therefore a
few float32 ulps of values of order 1 (1e-5); a masking or RoPE bug moves logits by ~1e-1.
"""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers")

import kpt.integrations.hf as kpt_hf  # noqa: E402
from kpt.integrations import _hf_attention  # noqa: E402
from kpt.ops.rmsnorm_qkv_rope import SPEC  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-5}
VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=256)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"attention_bias": True}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
    # A window shorter than the sequences, so that it cuts.
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                {"sliding_window": 4}),
    "qwen2-sliding": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                      {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               {"sliding_window": 4, "attn_logit_softcapping": 5.0,
                "query_pre_attn_scalar": 16}),
}
FUSED = ("llama", "qwen2", "qwen3", "mistral", "qwen2-sliding")


def tiny(family: str, attn: str | None = None, dtype=torch.float32, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    attn = attn or ("eager" if family == "gemma2" else "sdpa")  # Gemma 2's soft-cap: no SDPA
    config = config_cls(**{**SMALL, **extra, **overrides}, attn_implementation=attn)
    torch.manual_seed(0)
    model = model_cls(config).to(dtype).eval()
    with torch.no_grad():  # HF's init leaves biases at 0; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def padded_batch(lengths, total=None, seed=0, left=False):
    gen = torch.Generator().manual_seed(seed)
    total = total or max(lengths)
    ids = torch.randint(0, VOCAB, (len(lengths), total), generator=gen)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        if left:
            mask[row, total - n:] = 1
        else:
            mask[row, :n] = 1
    return ids, mask


@pytest.fixture
def kpt_calls():
    _hf_attention.calls.clear()
    yield _hf_attention.calls
    _hf_attention.calls.clear()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_model_matches_hf_on_padded_batches_and_unpatch_restores(family, kpt_calls):
    model = tiny(family)
    ids, mask = padded_batch([9, 4, 7, 1])
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        full = model(ids).logits
        state = {k: v.clone() for k, v in model.state_dict().items()}
        params = list(model.parameters())
        implementation = model.config._attn_implementation
        handle = kpt_hf.patch(model)
        assert not handle.skipped
        assert ("model.layers.0" in handle.patched) == (family in FUSED)
        assert model.config._attn_implementation == "kpt"
        padded = model(ids, attention_mask=mask).logits
        unpadded = model(ids).logits
        handle.unpatch()
        after = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(padded[real], before[real], **TOL)  # pad rows are don't-care
    torch.testing.assert_close(unpadded, full, **TOL)
    assert kpt_calls["varlen"] == 2 and kpt_calls["flash"] == 2  # the kpt paths really ran
    assert not any(k.startswith("fallback") for k in kpt_calls)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert model.config._attn_implementation == implementation
    assert list(model.parameters()) == params  # the same objects, in order
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for layer in model.model.layers:
        assert "forward" not in vars(layer.self_attn) and "forward" not in vars(
            layer.input_layernorm)
        proj = layer.self_attn
        # each weight has its own storage again, as before patching
        assert proj.q_proj.weight.untyped_storage().data_ptr() != \
            proj.k_proj.weight.untyped_storage().data_ptr()


def test_fused_op_runs_once_per_layer_on_the_weights_in_place(monkeypatch):
    model = tiny("qwen2")
    weights = []
    original = SPEC.launch_keyed
    monkeypatch.setattr(SPEC, "launch_keyed", lambda key, make, call, *rest: weights.append(
        (call.qkv_weight.data_ptr(), call.qkv_bias.data_ptr())) or original(key, make, call,
                                                                              *rest))
    with torch.no_grad(), kpt_hf.patch(model):
        model(torch.randint(0, VOCAB, (2, 5)))
        # the kernel reads the layer's own q/k/v parameters: no copy of the weights per call
        assert weights == [(layer.self_attn.q_proj.weight.data_ptr(),
                            layer.self_attn.q_proj.bias.data_ptr())
                           for layer in model.model.layers]
    assert not hasattr(model, "_kpt_patch")  # the context manager unpatched


def test_mode_changes_while_patched_keep_the_patch():
    """transformers re-kernelizes hub-kernel layers (RMSNorm) on train()/eval(); the patch must
    survive that, and unpatch restore the original modules."""
    model = tiny("llama")
    norms = [layer.input_layernorm for layer in model.model.layers]
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        want = model(ids).logits
        with kpt_hf.patch(model):
            model.train()
            model.eval()
            got = model(ids).logits
    torch.testing.assert_close(got, want, **TOL)
    assert [layer.input_layernorm for layer in model.model.layers] == norms


def test_padding_never_leaks_into_real_tokens():
    """Each row of a right-padded batch equals that sequence run alone."""
    model = tiny("llama")
    ids, mask = padded_batch([8, 3, 6])
    with torch.no_grad(), kpt_hf.patch(model):
        batch = model(ids, attention_mask=mask).logits
        for row, n in enumerate([8, 3, 6]):
            alone = model(ids[row : row + 1, :n]).logits[0]
            torch.testing.assert_close(batch[row, :n], alone, **TOL)


@pytest.mark.parametrize("how", ["position_ids", "flash_kwargs"])
def test_packed_sequences_do_not_attend_across_boundaries(how, kpt_calls):
    model = tiny("qwen3")
    lengths = [5, 3, 6]
    seqs = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    packed = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    # use_cache=False, as in training with DataCollatorWithFlattening: transformers reads packed
    # sequences from position_ids only without a cache (test_position_ids_split_...)
    kwargs = {"position_ids": positions, "use_cache": False}
    if how == "flash_kwargs":  # what DataCollatorWithFlattening(return_flash_attn_kwargs=True) adds
        cu = torch.tensor([0, 5, 8, 14], dtype=torch.int32)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6, max_length_k=6)
    with torch.no_grad(), kpt_hf.patch(model):
        out = model(packed, **kwargs).logits[0]
        start = 0
        for seq in seqs:
            alone = model(seq[None]).logits[0]
            torch.testing.assert_close(out[start : start + len(seq)], alone, **TOL)
            start += len(seq)
    assert kpt_calls["packed"] == 2


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generation_matches_hf(family, cache):
    model = tiny(family)
    ids, mask = padded_batch([6, 3], left=True, seed=3)
    options = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    if cache == "static":
        options["cache_implementation"] = "static"
    with torch.no_grad():
        expected = model.generate(ids, **options)
        with kpt_hf.patch(model):
            got = model.generate(ids, **options)
            single = model.generate(ids[:1], **{**options, "attention_mask": mask[:1]})
    assert torch.equal(got, expected)
    assert torch.equal(single, expected[:1])


def test_attn_implementation_kpt_without_patch(kpt_calls):
    config = transformers.LlamaConfig(**SMALL, attn_implementation="kpt")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids, mask = padded_batch([7, 5])
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        want = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("kpt")
        assert model.config._attn_implementation == "kpt"
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], **TOL)
    assert kpt_calls["varlen"] == 2


def tiny_bert() -> transformers.BertModel:
    """A 2-layer BertModel (random weights, seed 0) on the sdpa path."""
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=96,
                                     attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_bert_encoder_padded_batch(kpt_calls):
    model = tiny_bert()
    ids, mask = padded_batch([9, 4, 6])
    with torch.no_grad():
        want = model(ids, attention_mask=mask).last_hidden_state
        with kpt_hf.patch(model) as handle:
            assert handle.patched == [""]
            got = model(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], **TOL)
    assert kpt_calls["varlen"] == 2


def test_unexpressible_mask_falls_back_with_a_logged_reason(caplog, kpt_calls):
    model = tiny("llama", attn="kpt")
    ids = torch.randint(0, VOCAB, (1, 6))
    # An arbitrary additive 4-D mask (a bias per key), which no varlen layout expresses.
    bias = torch.linspace(-3.0, 0.0, 6).expand(1, 1, 6, 6).clone()
    bias = bias.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    _hf_attention._logged.clear()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="kpt"):
        got = model(ids, attention_mask=bias).logits
        model.set_attn_implementation("eager")
        want = model(ids, attention_mask=bias).logits
    torch.testing.assert_close(got, want, **TOL)
    assert "4-D attention mask" in caplog.text
    assert kpt_calls["fallback: a 4-D attention mask (kpt translates padding masks only)"] == 2


def _loss(model, ids, mask):
    return model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_training_gradients_reach_the_original_parameters(family):
    model = tiny(family).train()
    ids, mask = padded_batch([7, 5, 2], seed=1)
    want_loss = _loss(model, ids, mask)
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with kpt_hf.patch(model):
        got_loss = _loss(model, ids, mask)
        got_loss.backward()
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        # gradients are sums over tokens of products of O(1) terms: float32 summation order
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_optimizer_made_before_patch_trains_the_same_weights():
    """N AdamW steps with the patch applied after the optimizer was built give HF's losses."""
    steps = 4
    batches = [padded_batch([6, 4], seed=s) for s in range(steps)]

    def train(patched: bool) -> list[float]:
        model = tiny("qwen3").train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        handle = kpt_hf.patch(model) if patched else None
        losses = []
        for ids, mask in batches:
            loss = _loss(model, ids, mask)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        if handle is not None:
            handle.unpatch()
        final = {k: v.clone() for k, v in model.state_dict().items()}
        return losses, final

    want, want_state = train(False)
    got, got_state = train(True)
    # Adam normalises updates, so summation-order noise grows step by step; 1e-4 relative after
    # four steps at lr 1e-2 still separates a frozen or misrouted weight (loss off by >1e-2).
    assert got == pytest.approx(want, rel=1e-4)
    for key in want_state:
        torch.testing.assert_close(got_state[key], want_state[key], rtol=1e-3, atol=1e-4)


def test_save_pretrained_while_patched_writes_the_unpatched_checkpoint(tmp_path):
    from safetensors.torch import load_file

    model = tiny("qwen2")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with kpt_hf.patch(model):
        model.save_pretrained(tmp_path / "patched")
    model.save_pretrained(tmp_path / "plain")
    patched = load_file(tmp_path / "patched" / "model.safetensors")
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    assert patched.keys() == plain.keys()
    for key, value in patched.items():
        assert torch.equal(value, plain[key]) and torch.equal(value, state[key]), key


def test_weights_edited_or_moved_after_patch_are_used():
    model = tiny("llama")
    plain = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad(), kpt_hf.patch(model):
        for m in (model, plain):  # in place: the patched model's shared buffer sees it
            m.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, **TOL)
        for m in (model, plain):  # re-points every parameter at new storage
            m.to(torch.bfloat16)
        # bf16 (u = 2^-8): the patched path rounds where HF rounds, up to summation order
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=3e-2, atol=3e-2)


def test_rope_settings_hf_ignores_are_followed():
    """Llama ignores partial_rotary_factor: the patch follows the model's real frequencies."""
    model = tiny("llama", partial_rotary_factor=0.5)
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        want = model(ids).logits
        with kpt_hf.patch(model) as handle:
            assert "model.layers.0" in handle.patched
            got = model(ids).logits
    torch.testing.assert_close(got, want, **TOL)


def test_unsupported_rope_is_skipped_with_reason_or_raises_when_strict():
    model = tiny("llama")
    model.config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    handle = kpt_hf.patch(model)
    assert handle.patched == [""]  # attention still runs through kpt
    assert set(handle.skipped) == {"model.layers.0", "model.layers.1"}
    assert all("yarn" in " ".join(r) for r in handle.skipped.values())
    handle.unpatch()
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="yarn"):
        kpt_hf.patch(model, strict=True)
    assert model.config._attn_implementation == "sdpa"  # a failed patch leaves nothing behind
    assert not hasattr(model, "_kpt_patch")


def test_patch_rejects_unknown_model_type_and_double_patch():
    model = tiny("llama")
    kpt_hf.patch(model)
    with pytest.raises(ValueError, match="already patched"):
        kpt_hf.patch(model)
    kpt_hf.unpatch(model)
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        kpt_hf.patch(model)


def test_supported_lists_what_each_family_gets():
    table = kpt_hf.supported()
    assert set(table) == {"llama", "mistral", "qwen2", "qwen3", "gemma2", "bert", "qwen3_moe",
                          "qwen2_moe", "mixtral", "deepseek_v3"}
    assert "rmsnorm_qkv_rope" in table["qwen3"]["model.layers.*"]
    assert table["bert"] == {"": table["llama"][""]}


def test_forced_triton_backend_matches(kpt_calls):
    pytest.importorskip("triton", reason="the triton backend needs triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton on a CPU: interpreter
    model = tiny("qwen3", dtype=torch.bfloat16).to(device)  # Triton's flash takes fp16/bf16
    ids, mask = (t.to(device) for t in padded_batch([6, 3]))
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        with kpt_hf.patch(model, backend="triton"):
            got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    # bf16 through two layers: the kernels round where HF rounds, but their fp32 sums run in
    # another order, so a value can land one bf16 ulp (2^-8 relative) away and propagate.
    torch.testing.assert_close(got[real].float(), want[real].float(), rtol=3e-2, atol=3e-2)
    assert kpt_calls["varlen"] == 2


def test_torch_compile_prefill_packed_and_static_cache_decode_fullgraph(kpt_calls):
    """dynamo traces the patched model (backend="eager": tracing, not codegen). Prefill has one
    graph break per layer, where kpt reads whether position_ids restart (a packed batch must
    not attend across sequences under compile either) or unpads a padded batch; a decode step
    is one full graph."""
    model = tiny("qwen3")
    ids = torch.randint(0, VOCAB, (2, 7))
    packed_ids = torch.randint(0, VOCAB, (1, 9))
    packed_pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    step_ids = torch.randint(0, VOCAB, (2, 1))
    step = dict(position_ids=torch.full((2, 1), 7), cache_position=torch.tensor([7]),
                use_cache=True)

    def decode(forward):
        cache = transformers.StaticCache(config=model.config, max_cache_len=16)
        model(ids, past_key_values=cache, use_cache=True)  # eager prefill fills the cache
        return forward(step_ids, past_key_values=cache, **step).logits

    padded_ids, padded_mask = padded_batch([7, 4])
    with torch.no_grad():
        want_prefill, want_step = model(ids).logits, decode(model.forward)
        want_padded = model(padded_ids, attention_mask=padded_mask).logits
        want_packed = torch.cat([model(packed_ids[:, a:b]).logits
                                 for a, b in ((0, 4), (4, 7), (7, 9))], dim=1)
        with kpt_hf.patch(model):
            compiled = torch.compile(model.forward, backend="eager")
            got_prefill = compiled(ids).logits
            got_packed = compiled(packed_ids, position_ids=packed_pos, use_cache=False).logits
            kpt_calls.clear()
            got_padded = compiled(padded_ids, attention_mask=padded_mask).logits
            # the padded batch ran kpt's varlen path (an eager region), not a dense fallback
            assert kpt_calls["varlen"] == 2 and not any(k.startswith("fallback")
                                                        for k in kpt_calls)
            got_step = decode(torch.compile(model.forward, backend="eager", fullgraph=True))
    real = padded_mask.bool()
    torch.testing.assert_close(got_padded[real], want_padded[real], **TOL)
    torch.testing.assert_close(got_prefill, want_prefill, **TOL)
    torch.testing.assert_close(got_packed, want_packed, **TOL)
    torch.testing.assert_close(got_step, want_step, **TOL)


@pytest.mark.parametrize("use_cache", [False, True], ids=["no cache", "cache"])
@pytest.mark.parametrize("positions", [[0, 1, 2, 3, 10, 11, 12], [0, 0, 1, 1, 2, 2, 3],
                                       [0, 1, 2, 0, 1, 2, 3]], ids=["gap", "repeats", "restart"])
def test_position_ids_split_sequences_as_transformers_does(positions, use_cache):
    """transformers starts a packed sequence wherever a position does not follow its
    predecessor, and only without a cache; a patched model does the same in both cases."""
    model = tiny("llama")
    ids = torch.randint(0, VOCAB, (1, 7))
    pos = torch.tensor([positions])
    with torch.no_grad():
        want = model(ids, position_ids=pos, use_cache=use_cache).logits
        with kpt_hf.patch(model):
            got = model(ids, position_ids=pos, use_cache=use_cache).logits
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_a_patched_model_deep_copies_and_pickles_with_its_patch(quantize):
    """The copy's handle undoes the copy, never the original; a pickled patched model loads,
    runs, generates through its paged cache and unpatches."""
    model = tiny("llama")
    ids = torch.randint(0, VOCAB, (2, 5))
    options = {} if quantize is None else {"quantize": quantize, "group_size": 32}
    with torch.no_grad():
        want = model(ids).logits
        handle = kpt_hf.patch(model, kv_cache="paged", **options)
        patched = model(ids).logits
        twin = copy.deepcopy(model)
        assert twin._kpt_patch is not handle and twin._kpt_patch.model is twin
        twin._kpt_patch.unpatch()
        assert twin.config._attn_implementation != "kpt"
        assert model.config._attn_implementation == "kpt"  # the original keeps its patch
        assert "_prepare_cache_for_generation" in vars(model)
        assert "_prepare_cache_for_generation" not in vars(twin)
        torch.testing.assert_close(model(ids).logits, patched, rtol=0, atol=0)
        if quantize is None:
            torch.testing.assert_close(twin(ids).logits, want, **TOL)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(loaded(ids).logits, patched, rtol=0, atol=0)
        tokens = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                 do_sample=False)
        assert tokens.shape == (2, 8)
        loaded._kpt_patch.unpatch()
        assert loaded.config._attn_implementation != "kpt"
        handle.unpatch()
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)


def test_output_attentions_is_not_silently_empty(caplog, monkeypatch):
    """kpt's kernels return no attention probabilities (like HF's sdpa): asking for them logs
    a warning that names the way to get them."""
    monkeypatch.setattr(_hf_attention, "_NO_WEIGHTS_WARNED", [])
    model = tiny("llama")
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad(), kpt_hf.patch(model), caplog.at_level(logging.WARNING, logger="kpt"):
        model(ids, output_attentions=True)
        model(ids, output_attentions=True)
    warned = [r for r in caplog.records if "output_attentions=True" in r.getMessage()]
    assert len(warned) == 1 and "eager" in warned[0].getMessage()


def test_patch_refuses_a_model_on_the_meta_device():
    with torch.device("meta"):
        model = tiny("llama")
    with pytest.raises(ValueError, match="patch: parameter .* is on the meta device"):
        kpt_hf.patch(model)
    assert getattr(model, "_kpt_patch", None) is None
