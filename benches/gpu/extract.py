#!/usr/bin/env python
"""GPU benchmark of fusellm's stage 2 (extract): extraction throughput vs the bare forward pass.

Self-contained: needs only torch, transformers and numpy. The fusellm sources are loaded from this
checkout (``python/fusellm``) without the Rust extension when fusellm is not installed. The model
is built from a config (no download): a Llama of a few hundred million parameters in bf16, with
random weights; rows are random token ids with split-like lengths (most near 2000, some shorter).

It times, over the SAME batches (rows sorted by length, a padded-token budget per batch):

1. bare forward: ``model(input_ids).logits`` for every batch (host->device copy included);
2. extraction engine (``fusellm.stages.extract.TopKEngine``): the same forward, exact top-K, float32
   cross-entropy (fused ``torch.compile`` reduction on CUDA), device->host copies overlapped with
   the next batch, per-row slicing on the host;
3. full pipeline (only if ``datasets`` and ``pyarrow`` are importable): ``extract_topk`` on the
   model saved to disk with a word-level tokenizer: tokenization, 1-2, assembly and
   zstd-compressed shard writing (background thread), versus the bare forward of its batches.

It prints the card, versions, tokens per second, the ratios (target: extraction >= 0.9x bare)
and the storage per token. Runs in well under 5 minutes on one H100.

    python benches/gpu/extract.py                    # CUDA, ~370M parameters
    python benches/gpu/extract.py --device cpu --tiny   # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def import_extract() -> Any:
    """``fusellm.stages.extract``: installed, or loaded from the checkout without
    ``fusellm/__init__`` (which needs the Rust extension)."""
    try:
        return importlib.import_module("fusellm.stages.extract")
    except Exception:
        sys.modules.pop("fusellm", None)
    pkg = types.ModuleType("fusellm")
    pkg.__path__ = [str(ROOT / "python" / "fusellm")]
    sys.modules["fusellm"] = pkg
    return importlib.import_module("fusellm.stages.extract")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model and few rows (smoke test)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rows", type=int, default=512, help="rows per timed pass")
    p.add_argument("--max-len", type=int, default=2000)
    p.add_argument("--max-tokens-per-batch", type=int, default=32768)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fused-ce", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--no-pipeline", action="store_true", help="skip the full-pipeline phase")
    p.add_argument("--time-budget", type=float, default=270.0, help="seconds; later phases skip")
    args = p.parse_args()
    if args.tiny:
        args.hidden, args.layers, args.heads, args.intermediate = 64, 2, 2, 128
        args.rows, args.max_len, args.max_tokens_per_batch = 24, 256, 2048
        args.repeats = min(args.repeats, 2)
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    import transformers

    attn = "sdpa"
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        attn = "flash_attention_2"
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device(device):
                model = transformers.AutoModelForCausalLM.from_config(
                    config, dtype=dtype, attn_implementation=attn
                )
        except (ImportError, ValueError):
            attn = "sdpa"
            with torch.device(device):
                model = transformers.AutoModelForCausalLM.from_config(
                    config, dtype=dtype, attn_implementation=attn
                )
    return model.eval(), attn


def make_rows(args: argparse.Namespace, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Split outputs: most rows are full blocks, the rest are document tails.
    full = rng.random(args.rows) < 0.7
    lengths = np.where(
        full,
        rng.integers(int(args.max_len * 0.95), args.max_len + 1, args.rows),
        rng.integers(16, args.max_len, args.rows),
    )
    return [rng.integers(2, args.vocab, n).astype(np.int64) for n in lengths]


def make_batches(fx: Any, rows: list[np.ndarray], args: argparse.Namespace, per_shard: int) -> Any:
    batches = []
    for s in range(0, len(rows), per_shard):
        part = rows[s : s + per_shard]
        plan = fx.plan_batches(
            [len(r) for r in part], args.max_tokens_per_batch, args.max_batch_size
        )
        batches += [fx.pad_batch([part[i] for i in b]) for b in plan]
    return batches


def time_bare(model: Any, batches: Any, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        for ids, _ in batches:
            x = torch.from_numpy(ids)
            if device.type == "cuda":
                x = x.pin_memory().to(device, non_blocking=True)
            _ = model(input_ids=x, use_cache=False).logits
    sync(device)
    return time.perf_counter() - t


def time_engine(engine: Any, batches: Any, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    for out in engine.run(batches):
        for j, n in enumerate(out.lengths.tolist()):  # what the writer reads per row
            out.logits[j, :n].sum(dtype=np.float32)
            out.ids[j, :n].max()
    sync(device)
    return time.perf_counter() - t


def card(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def pipeline_phase(
    fx: Any, model: Any, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict[str, float] | None:
    try:
        import datasets
        import pyarrow  # noqa: F401
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        log(f"full pipeline skipped ({e}); the engine figures above are the GPU-side ones")
        return None
    with tempfile.TemporaryDirectory(prefix="fusellm-gpu-bench-") as tmp:
        root = Path(tmp)
        vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, args.vocab)}}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(str(root / "model"))
            tok.save_pretrained(str(root / "model"))
        log("model saved for the pipeline phase")
        # Text whose tokenization is exactly the rows (minus the EOS extract appends).
        rows = make_rows(args, seed=7)
        texts = [" ".join(f"w{i}" for i in r[:-1]) for r in rows]
        ds = datasets.Dataset.from_dict({"text": texts})
        per_shard = 128
        kw = {
            "rows_per_shard": per_shard,
            "max_tokens_per_batch": args.max_tokens_per_batch,
            "max_batch_size": args.max_batch_size,
            "dtype": str(dtype).removeprefix("torch."),
            "device": device,
            "progress": False,
            "check_vocab": False,
            "fused_ce": {"auto": None, "on": True, "off": False}[args.fused_ce],
            "top_k": args.top_k,
        }
        fx.extract_topk(ds.select(range(min(16, len(ds)))), root / "model", root / "warm", **kw)
        eos_rows = [np.append(r[:-1], 1) for r in rows]
        batches = make_batches(fx, eos_rows, args, per_shard)
        bare, extract, report = [], [], None
        for rep in range(args.repeats):
            bare.append(time_bare(model, batches, device))
            report = fx.extract_topk(ds, root / "model", root / f"out{rep}", **kw)
            extract.append(report.process_seconds)
            with contextlib.suppress(OSError):
                import shutil

                shutil.rmtree(root / f"out{rep}")
        assert report is not None
        tokens = report.num_tokens
        return {
            "tokens": tokens,
            "bare_tps": tokens / min(bare),
            "extract_tps": tokens / min(extract),
            "ratio": min(bare) / min(extract),
            "bytes_per_token": report.bytes_written / max(tokens, 1),
            "ce_path": report.ce_path,
        }


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu --tiny for a smoke test", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fx = import_extract()
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    log(f"device: {card(device)}; {versions}")
    model, attn = build_model(args, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    log(f"model: llama {params / 1e6:.1f}M parameters, {dtype}, vocab {args.vocab}, attn {attn}")

    fused = {"auto": None, "on": True, "off": False}[args.fused_ce]
    engine = fx.TopKEngine(model, top_k=args.top_k, num_valid=args.vocab, fused_ce=fused)
    rows = make_rows(args, seed=1)
    batches = make_batches(fx, rows, args, per_shard=len(rows))
    tokens = sum(len(r) for r in rows)
    padded = sum(ids.size for ids, _ in batches)
    log(
        f"{len(rows)} rows, {tokens} tokens, {len(batches)} batches of <= "
        f"{args.max_tokens_per_batch} padded tokens / {args.max_batch_size} rows "
        f"(padding {100 * (padded - tokens) / padded:.1f}%)"
    )
    # Warm-up: kernels, allocator, and the compiled CE on a few shapes.
    warm = batches[:2] + batches[-1:]
    time_bare(model, warm, device)
    time_engine(engine, warm, device)
    log(f"warm-up done; CE path: {engine.ce_path}")

    bare, ext = [], []
    for rep in range(args.repeats):
        bare.append(time_bare(model, batches, device))
        ext.append(time_engine(engine, batches, device))
        log(f"pass {rep}: bare {bare[-1]:.2f} s, extraction engine {ext[-1]:.2f} s")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    eng_ratio = min(bare) / min(ext)
    print()
    print(f"card:               {card(device)}")
    print(f"model:              {params / 1e6:.1f}M params, {dtype}, attn {attn}, K={args.top_k}")
    print(
        f"batch:              <= {args.max_tokens_per_batch} padded tokens, "
        f"<= {args.max_batch_size} rows"
    )
    print(f"bare forward:       {tokens / min(bare):12.0f} tokens/s")
    print(
        f"extraction engine:  {tokens / min(ext):12.0f} tokens/s   ratio {eng_ratio:.3f} "
        f"(CE {engine.ce_path})"
    )
    if peak:
        print(f"peak GPU memory:    {peak:.1f} GiB")

    result = None
    if args.no_pipeline:
        pass
    elif time.perf_counter() - T0 > args.time_budget * 0.5:
        log("full pipeline skipped: over half the time budget is spent")
    else:
        result = pipeline_phase(fx, model, args, device, dtype)
    if result is not None:
        print(
            f"full pipeline:      {result['extract_tps']:12.0f} tokens/s   ratio "
            f"{result['ratio']:.3f} vs bare {result['bare_tps']:.0f} tokens/s "
            f"(CE {result['ce_path']}); {result['bytes_per_token']:.1f} bytes/token stored"
        )
    target = 0.9
    final = result["ratio"] if result is not None else eng_ratio
    verdict = "meets" if final >= target else "MISSES"
    print(f"verdict:            {verdict} the >= {target}x target ({final:.3f})")
    log("done")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    raise SystemExit(main())
