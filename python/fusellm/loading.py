"""Loading tokenizers and models, and choosing devices and dtypes: one place for every stage.

Loading failures are typed :mod:`fusellm.errors` errors naming the offending path or value, in
one line (``transformers`` messages that span several lines are joined).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

from .errors import FuseLLMError, InputError, InputTypeError

__all__ = [
    "DTYPES",
    "TokenizerFile",
    "load_causal_lm",
    "load_model_config",
    "load_tokenizer",
    "load_tokenizer_file",
    "resolve_device",
    "torch_dtype",
]

#: The dtype names a stage accepts (``auto``: bfloat16 on CUDA where supported, else float16;
#: float32 on the CPU).
DTYPES = ("auto", "bfloat16", "float16", "float32")


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


@functools.lru_cache(maxsize=8)
def _tokenizer_from_dir(path: str, sha256: str) -> Any:
    """Tokenizers take seconds to parse (150k vocabularies): one per (path, content) and
    process."""
    del sha256  # part of the cache key only
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise InputError(f"cannot load a tokenizer from {path}: {_one_line(e)}") from e


def load_tokenizer(spec: Any, what: str = "tokenizer", *, fast: bool = False) -> Any:
    """A tokenizer from a directory, ``"bundled:NAME"`` (:mod:`fusellm.bundled`), or a tokenizer
    object (returned as is).

    Args:
        spec: the directory, the bundled name, or the tokenizer.
        what: how errors name it (``"source 'neox' tokenizer"``).
        fast: require a fast (Rust) tokenizer, which the offsets and the splitter need.
    """
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec)
        if text.startswith("bundled:"):
            from .bundled import load_tokenizer as load_bundled

            try:
                tok = load_bundled(text.split(":", 1)[1])
            except FuseLLMError as e:
                raise InputError(f"{what}: {e}") from e
        else:
            path = Path(text)
            if not path.is_dir():
                raise InputError(f"{what}: tokenizer directory {path} does not exist")
            from .io import tokenizer_fingerprint

            fp = tokenizer_fingerprint(path)
            try:
                tok = _tokenizer_from_dir(str(path.resolve()), fp["sha256"])
            except InputError as e:
                raise InputError(f"{what}: {e}") from e
    elif callable(getattr(spec, "convert_ids_to_tokens", None)):
        tok = spec
    else:
        raise InputTypeError(
            f"{what} must be a tokenizer directory, 'bundled:NAME' or a Hugging Face tokenizer, "
            f"got {type(spec).__name__}"
        )
    if fast and getattr(tok, "backend_tokenizer", None) is None:
        raise InputTypeError(f"{what}: {type(tok).__name__} is not a fast (Rust) tokenizer")
    return tok


class TokenizerFile:
    """A tokenizer directory's ``tokenizer.json``, read by ``tokenizers`` alone: the ids, their
    strings and the EOS string, without importing ``transformers`` or torch (seconds per
    process). What a stage that only reads stored ids needs of a tokenizer
    (:func:`load_tokenizer_file`); re-tokenizing text needs :func:`load_tokenizer`."""

    def __init__(self, backend: Any, eos_token: str | None) -> None:
        self._backend = backend
        self.eos_token = eos_token

    def __len__(self) -> int:
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._backend.id_to_token(i) for i in ids]


def _special_token(value: Any) -> str | None:
    """A tokenizer config's special token: a string or an ``AddedToken`` dict (``content``)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=8)
def _tokenizer_file(path: str, sha256: str) -> TokenizerFile | None:
    del sha256  # part of the cache key only
    import json

    import tokenizers

    root = Path(path)
    eos = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            eos = _special_token(json.loads((root / name).read_text("utf-8")).get("eos_token"))
        except (OSError, ValueError, AttributeError):
            continue
        if eos is not None:
            break
    try:
        return TokenizerFile(tokenizers.Tokenizer.from_file(str(root / "tokenizer.json")), eos)
    except Exception:  # not readable alone: the caller loads it in full
        return None


def load_tokenizer_file(spec: Any, what: str = "tokenizer") -> TokenizerFile | None:
    """The :class:`TokenizerFile` of a tokenizer directory that holds a ``tokenizer.json``;
    ``None`` for anything else (``"bundled:NAME"``, a tokenizer object, a directory without one,
    a file ``tokenizers`` cannot read), for which :func:`load_tokenizer` is the way. A caller
    checks the result against what it knows of the tokenizer (an extraction records its id count
    and EOS) and loads it in full where they differ."""
    if not isinstance(spec, (str, os.PathLike)) or str(spec).startswith("bundled:"):
        return None
    path = Path(spec)
    if not (path / "tokenizer.json").is_file():
        return None
    from .io import tokenizer_fingerprint

    try:
        fp = tokenizer_fingerprint(path)
    except InputError as e:
        raise InputError(f"{what}: {e}") from e
    return _tokenizer_file(str(path.resolve()), fp["sha256"])


def resolve_device(device: Any) -> Any:
    """``torch.device`` of ``device``; ``None``: this process's CUDA device (``LOCAL_RANK``) when
    CUDA is available, else the CPU."""
    import torch

    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise InputError(f"invalid device {device!r}: {_one_line(e)}") from e
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def torch_dtype(dtype: Any, device: Any) -> Any:
    """The ``torch.dtype`` of a name of :data:`DTYPES` (``None`` is ``"auto"``) on ``device``;
    a ``torch.dtype`` is returned as is."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = "auto" if dtype is None else dtype
    if name not in DTYPES:
        raise InputError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def load_model_config(model_dir: str | os.PathLike[str]) -> Any:
    """The ``AutoConfig`` of a model directory (it must exist and hold a ``config.json``)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise InputError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json: not a model directory")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise InputError(f"cannot read the model config in {path}: {_one_line(e)}") from e


def _attention_error(e: BaseException) -> bool:
    text = str(e).lower()
    return any(word in text for word in ("attn", "attention", "flash"))


def load_causal_lm(
    model_dir: str | os.PathLike[str],
    dtype: Any,
    device: Any,
    attn_implementation: str = "sdpa",
    *,
    progress: bool | None = None,
) -> tuple[Any, str]:
    """``AutoModelForCausalLM`` of a model directory, on ``device`` in eval mode, with the first
    attention kernel that loads of ``attn_implementation``, ``sdpa``, ``eager``. Returns the
    model and that kernel's name. ``progress``: the weight-loading bar (``None``: only on a
    terminal)."""
    path = Path(model_dir)
    load_model_config(path)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    quiet = progress is False or (progress is None and not sys.stderr.isatty())
    bars = hf_logging.is_progress_bar_enabled()
    tried = []
    for impl in dict.fromkeys([attn_implementation, "sdpa", "eager"]):
        try:
            if quiet:
                hf_logging.disable_progress_bar()
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, attn_implementation=impl, local_files_only=True
            )
        except (ValueError, ImportError) as e:
            if _attention_error(e):
                tried.append(f"{impl}: {_one_line(e)}")
                continue
            raise InputError(f"cannot load a causal LM from {path}: {_one_line(e)}") from e
        except Exception as e:
            raise InputError(f"cannot load a causal LM from {path}: {_one_line(e)}") from e
        finally:
            if quiet and bars:
                hf_logging.enable_progress_bar()
        return model.to(device).eval(), impl
    raise InputError(f"no attention implementation works for {path}: {tried}")
