"""Tiny causal LMs on the real bundled tokenizers, built from configs (no downloads).

:func:`build_tiny_model` saves a model AND its tokenizer into one directory (``save_pretrained``),
the layout ``fusellm.stages.extract`` reads. :data:`TINY_MODELS` lists the three used by the tests:

- ``llama``: LlamaConfig on Mistral's SentencePiece tokenizer (32,000 ids);
- ``neox``: GPTNeoXConfig on DeepSeek's byte-level BPE (129,280 ids);
- ``qwen2``: Qwen2Config on Qwen's byte-level BPE (151,851 ids) with a PADDED vocabulary of
  151,936 logits, whose padding rows are scaled up so that, unless they are excluded, the ids
  without a token would win the top-K.

(Session fixtures built from these live in the test files: a helper module imported by a test
cannot also be registered as a pytest plugin without an assertion-rewrite warning.)

Helpers compute the reference results directly (full logits of unpadded single-row passes).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HIDDEN = 32
LAYERS = 2
QWEN_PADDED_VOCAB = 151936


#: name -> build_tiny_model keyword arguments.
TINY_MODELS: dict[str, dict[str, Any]] = {
    "llama": {"kind": "llama", "tokenizer_name": "mistral"},
    "neox": {"kind": "gpt_neox", "tokenizer_name": "deepseek", "seed": 1},
    "qwen2": {
        "kind": "qwen2",
        "tokenizer_name": "qwen",
        "vocab_size": QWEN_PADDED_VOCAB,
        "boost_padding": True,
        "seed": 2,
    },
}


@dataclass(frozen=True)
class TinyModel:
    """A saved tiny model directory and what the tests need to know about it."""

    path: Path
    kind: str
    tokenizer_name: str
    vocab_size: int  # logits per position
    num_tokens: int  # len(tokenizer)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Third-party warnings raised while building/loading models are not under test here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _config(kind: str, vocab_size: int, tok: Any) -> Any:
    import transformers

    common = {
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "intermediate_size": 2 * HIDDEN,
        "max_position_embeddings": 1024,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "tie_word_embeddings": True,
    }
    if kind == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **common)
    if kind == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=2, **common)
    if kind == "gpt_neox":
        return transformers.GPTNeoXConfig(**common)
    raise ValueError(kind)


def build_tiny_model(
    kind: str,
    tokenizer_name: str,
    path: Path,
    *,
    vocab_size: int | None = None,
    boost_padding: bool = False,
    seed: int = 0,
) -> TinyModel:
    """Builds a tiny ``kind`` model on a bundled tokenizer and saves both into ``path``."""
    import torch
    import transformers

    from fusellm.bundled import load_tokenizer

    tok = load_tokenizer(tokenizer_name)
    n = len(tok)
    vocab = vocab_size or n
    torch.manual_seed(seed)
    with quiet():
        model = transformers.AutoModelForCausalLM.from_config(_config(kind, vocab, tok))
        with torch.no_grad():
            # Random init gives near-uniform logits; spread them so the top-K is well separated.
            emb = model.get_input_embeddings().weight
            emb.mul_(8.0)
            if boost_padding and vocab > n:
                emb[n:] *= 4.0
        model.save_pretrained(str(path))
        tok.save_pretrained(str(path))
    return TinyModel(path, kind, tokenizer_name, vocab, n)


def load(model: TinyModel) -> tuple[Any, Any]:
    """The saved model (float32, eval) and the bundled tokenizer it was saved with (cached per
    process; the tests check that the saved copy tokenizes identically)."""
    import transformers

    from fusellm.bundled import load_tokenizer

    with quiet():
        lm = transformers.AutoModelForCausalLM.from_pretrained(
            str(model.path), dtype="float32", attn_implementation="sdpa"
        ).eval()
    return lm, load_tokenizer(model.tokenizer_name)


def reference_row(lm: Any, ids: list[int], num_valid: int, k: int) -> dict[str, np.ndarray]:
    """Top-K (ids with a token only: logits, and log-probabilities over those ids) and CE of one
    unpadded single-row pass, from full logits in float64."""
    import torch

    with torch.inference_mode():
        logits = lm(input_ids=torch.tensor([ids])).logits[0].float()
        logits[:, num_valid:] = -float("inf")
        vals, idx = torch.topk(logits, k, dim=-1)
        all_lse = torch.logsumexp(logits.double(), dim=-1)
        lse = all_lse[:-1]
        target = logits[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].double()
        steps = lse - target
    return {
        "logits": vals.numpy(),
        "logprobs": (vals.double() - all_lse[:, None]).numpy(),
        "ids": idx.numpy(),
        "steps": steps.numpy(),
        "ce": float(steps.mean()) if len(ids) > 1 else float("nan"),
    }


def build_named(name: str, root: Path) -> TinyModel:
    """Builds one of :data:`TINY_MODELS` under ``root``; skips if its tokenizer is unavailable."""
    import pytest

    from fusellm import FuseLLMError

    try:
        return build_tiny_model(path=root / name, **TINY_MODELS[name])
    except FuseLLMError as e:  # the optional "tokenizers" extra is missing
        pytest.skip(f"bundled tokenizer unavailable: {e}")
