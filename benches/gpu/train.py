#!/usr/bin/env python
"""Fusion training step vs plain CLM step on one GPU: throughput and peak memory.

Self-contained: needs torch and transformers; uses DeepSpeed ZeRO-2 (the configuration fusellm
ships, ``fusellm/configs/zero2.json``) when ``deepspeed`` is importable and plain PyTorch (bf16
autocast, fused AdamW) otherwise, and says which path ran. The fusion loss is fusellm's
(``fusellm/fuse.py``); it is loaded from this checkout when the fusellm package (with its Rust
extension) is not installed.

Model: a Llama of a few hundred million parameters built from a config (no weights downloaded),
32k vocabulary, sequences of 2048 tokens, 3 teacher candidates with K = 10, MinCE. Both variants
run in the same process on the same model and batch, interleaved, so the ratio is fair.

    python benches/gpu/train.py                      # one GPU, < 5 minutes on an H100
    python benches/gpu/train.py --device cpu --tiny  # a smoke test anywhere
    python benches/gpu/train.py --no-deepspeed       # force the plain PyTorch path

Prints one line per figure and a final JSON object. Target: fusion / CLM throughput >= 0.95.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]


def load_fusion_loss() -> tuple[Any, str]:
    """fusellm's fusion_loss: from the installed package, else from this checkout's source."""
    try:
        from fusellm.fuse import fusion_loss

        return fusion_loss, "installed fusellm"
    except ImportError:
        pkg_dir = REPO / "python" / "fusellm"
        pkg = types.ModuleType("fusellm")
        pkg.__path__ = [str(pkg_dir)]  # a namespace for fuse.py and errors.py, no __init__
        sys.modules["fusellm"] = pkg
        for name in ("errors", "fuse"):
            spec = importlib.util.spec_from_file_location(f"fusellm.{name}", pkg_dir / f"{name}.py")
            assert spec is not None
            assert spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            sys.modules[f"fusellm.{name}"] = mod
            spec.loader.exec_module(mod)
        return sys.modules["fusellm.fuse"].fusion_loss, f"source {pkg_dir / 'fuse.py'}"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="a tiny model and batch (smoke test)")
    p.add_argument("--no-deepspeed", action="store_true", help="plain PyTorch even if importable")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default 4; tiny 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per block (default 2048)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per variant")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    return p.parse_args()


def build_model(args: argparse.Namespace, device: torch.device) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.tiny:
        cfg = dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        )
        cfg.update(num_key_value_heads=2, vocab_size=4096)
    else:  # ~375M parameters: 24 layers of 1024, untied 32k embeddings
        cfg = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24)
        cfg.update(num_attention_heads=16, num_key_value_heads=16, vocab_size=32000)
    attn = "sdpa"
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        attn = "flash_attention_2"
    config = LlamaConfig(max_position_embeddings=args.seq, attn_implementation=attn, **cfg)
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, attn


def batch(args: argparse.Namespace, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, seq, c, k = args.batch, args.seq, 3, 10
    logits = torch.sort(torch.randn(b, c, seq, k, generator=g) * 2, -1, descending=True)[0]
    out = {
        "input_ids": torch.randint(0, vocab, (b, seq), generator=g),
        "attention_mask": torch.ones(b, seq, dtype=torch.long),
        "teacher_ids": torch.randint(0, vocab, (b, c, seq, k), generator=g, dtype=torch.int32),
        "teacher_logits": logits,
        "teacher_scores": torch.rand(b, c, generator=g) + 1.0,
    }
    return {key: v.to(device) for key, v in out.items()}


def setup_deepspeed(model: Any, args: argparse.Namespace, bf16: bool) -> Any:
    import deepspeed

    for key, val in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, val)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    config = json.loads((REPO / "python" / "fusellm" / "configs" / "zero2.json").read_text())
    config.pop("_comment", None)
    # The "auto" values, as the Trainer fills them.
    config.update(
        train_micro_batch_size_per_gpu=args.batch,
        gradient_accumulation_steps=1,
        train_batch_size=args.batch,
        gradient_clipping=1.0,
        zero_allow_untested_optimizer=True,
    )
    config["bf16"] = {"enabled": bf16}
    config["fp16"] = {"enabled": False}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def main() -> int:
    args = parse()
    if args.seq is None:
        args.seq = 256 if args.tiny else 2048
    if args.batch is None:
        args.batch = 2 if args.tiny else 4
    if args.steps is None:
        args.steps = 4 if args.tiny else 20
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu", file=sys.stderr)
        return 2
    bf16 = device.type == "cuda"
    fusion_loss, loss_src = load_fusion_loss()
    t_start = time.perf_counter()
    model, attn = build_model(args, device)
    n_params = sum(p.numel() for p in model.parameters())
    data = batch(args, model.config.vocab_size, device)

    use_ds = not args.no_deepspeed and importlib.util.find_spec("deepspeed") is not None
    if use_ds:
        engine = setup_deepspeed(model, args, bf16)
        path = f"deepspeed {__import__('deepspeed').__version__} ZeRO-2" + (
            ", bf16" if bf16 else ""
        )
        forward = engine

        def update(loss: torch.Tensor) -> None:
            engine.backward(loss)
            engine.step()

    else:
        why = "--no-deepspeed" if args.no_deepspeed else "deepspeed not importable"
        path = f"plain PyTorch ({why})" + (", bf16 autocast" if bf16 else ", float32")
        fused = device.type == "cuda"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=fused)

        def forward(**kw: Any) -> Any:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return model(**kw)

        def update(loss: torch.Tensor) -> None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    def clm_step() -> float:
        loss = forward(
            input_ids=data["input_ids"],
            attention_mask=data["attention_mask"],
            labels=data["input_ids"],
        ).loss
        update(loss)
        return float(loss.detach())

    def fusion_step() -> float:
        logits = forward(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        loss = fusion_loss(
            logits,
            data["input_ids"],
            data["attention_mask"],
            data["teacher_ids"],
            data["teacher_logits"],
            data["teacher_scores"],
        ).loss
        del logits
        update(loss)
        return float(loss.detach())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    steps = {"clm": clm_step, "fusion": fusion_step}
    for f in steps.values():  # warm-up (kernels, allocator, DeepSpeed buckets)
        f()
        f()
    sync()
    times: dict[str, list[float]] = {k: [] for k in steps}
    peaks: dict[str, int] = {}
    losses: dict[str, float] = {}
    rounds = max(1, args.steps // 2)
    for name in steps:  # peak memory per variant
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        losses[name] = steps[name]()
        sync()
        if device.type == "cuda":
            peaks[name] = torch.cuda.max_memory_allocated()
    for _ in range(rounds):  # interleaved blocks of 2 steps
        for name, f in steps.items():
            for _ in range(2):
                sync()
                t0 = time.perf_counter()
                f()
                sync()
                times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: tokens / v for k, v in med.items()}
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "path": path,
        "fusion_loss_from": loss_src,
        "attention": attn,
        "params_M": round(n_params / 1e6, 1),
        "batch": args.batch,
        "seq": args.seq,
        "candidates": 3,
        "k": 10,
        "clm_tokens_per_s": round(tps["clm"]),
        "fusion_tokens_per_s": round(tps["fusion"]),
        "throughput_ratio": round(tps["fusion"] / tps["clm"], 4),
        "clm_step_ms": round(med["clm"] * 1e3, 2),
        "fusion_step_ms": round(med["fusion"] * 1e3, 2),
        "clm_loss": round(losses["clm"], 4),
        "fusion_loss": round(losses["fusion"], 4),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if peaks:
        result["clm_peak_GiB"] = round(peaks["clm"] / 2**30, 3)
        result["fusion_peak_GiB"] = round(peaks["fusion"] / 2**30, 3)
        result["memory_ratio"] = round(peaks["fusion"] / peaks["clm"], 4)
    for key, val in result.items():
        print(f"{key:>22}: {val}")
    ok = result["throughput_ratio"] >= 0.95
    print(f"{'target':>22}: fusion/CLM throughput >= 0.95: {'PASS' if ok else 'FAIL'}")
    print(json.dumps(result))
    if use_ds:
        import deepspeed.comm as dist

        if dist.is_initialized():
            dist.barrier()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
