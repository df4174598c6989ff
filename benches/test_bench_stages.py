"""Stage speed against the kernels they wrap (issue: one stage layer, stages at kernel speed).

Setup: the built-in miniature (``fusellm.miniature``, default scale): its fusion set repeated
``REPEAT`` times (each copy's documents with ids of their own), split (11,028 rows, about 1.45 M
target tokens, more than the issue's 1.25 M) and extracted by its three models (a Llama target
and GPT-NeoX and MPT sources, each with its own tokenizer), K = 10, and the surface vocabulary
maps, so that the stages read real extraction shards. Then, in one process:

- ``align_dataset`` (offsets, soft, 2 sources) end to end, I/O included, against the kernel on
  the same arrays: ``Aligner.align_batch`` (one array per sequence) and ``Aligner.align_flat``
  (flat values and row offsets, what the stage calls): target tokens per second of each, and the
  kernel's share of the stage's time;
- ``pack_dataset`` (concat) end to end, in its default plan layout (block boundaries only) and
  in the copy layout, against ``fusellm.pack`` on the same flat columns; and how fast the
  training collator reads blocks from each layout's output.

Run: ``python -m pytest benches/test_bench_stages.py --benchmark-only -s`` (the setup takes
about 7 minutes on 2 cores, longer than the per-test timeout, which this module raises).
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fusellm
from corpus import report

datasets = pytest.importorskip("datasets")
pytest.importorskip("torch")

from fusellm.stages import align_dataset, pack_dataset, run_vocab_map  # noqa: E402
from fusellm.stages.extract import extract_topk  # noqa: E402
from models import quiet  # noqa: E402

BLOCK = 256  # the miniature's block size
REPEAT = 3  # copies of the fusion set: a stage's fixed costs (maps, setup) weigh as at scale
# The module's setup (building the miniature, extracting 11 k rows three times) takes longer than
# the project's 600 s per-test timeout on 2 cores; the first test carries it.
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from fusellm.miniature import prepare_miniature
    from fusellm.stages.split import run_split

    root = tmp_path_factory.mktemp("stages")
    with quiet():
        mini = prepare_miniature(root / "mini", seed=0, scale="default", progress=False)
        models = {"target": mini.target, **mini.sources}
        docs = datasets.load_from_disk(str(mini.train_data))
        docs = datasets.concatenate_datasets(
            [docs.map(lambda r, i=i: {"id": f"{r['id']}/{i}"}) for i in range(REPEAT)]
        )
        split = root / "split"
        run_split(docs, split, [str(p) for p in models.values()], block_size=BLOCK)
        extracts = {}
        for name, path in models.items():
            extracts[name] = root / "extract" / name
            extract_topk(split, path, extracts[name], top_k=10, progress=False)
        maps = {}
        for src, path in mini.sources.items():
            maps[src] = root / "maps" / f"{src}.json"
            run_vocab_map(mini.target, path, maps[src])
    return {"root": root, "extracts": extracts, "maps": maps, "models": models}


def sources_of(setup: dict[str, Any]) -> list[str]:
    return [n for n in setup["models"] if n != "target"]


def _kernel_inputs(setup: dict[str, Any]) -> dict[str, Any]:
    """The arrays align_batch reads, from the extraction shards (outside the timing)."""

    def rows(path: Path) -> Any:
        return datasets.load_from_disk(str(path)).with_format("numpy")

    base = rows(setup["extracts"]["target"])
    out = {"base_ids": list(base["input_ids"]), "base_spans": list(base["token_spans"])}
    for src in sources_of(setup):
        ds = rows(setup["extracts"][src])
        out[src] = {
            "ids": list(ds["input_ids"]),
            "spans": list(ds["token_spans"]),
            "indices": list(ds["per_step_indices"]),
            "logits": [np.asarray(x, np.float32) for x in ds["per_step_logits"]],
        }
    return out


def test_align_stage_vs_kernel(benchmark: Any, setup: dict[str, Any]) -> None:
    ex = setup["extracts"]
    sources = {src: ex[src] for src in sources_of(setup)}
    maps = {src: str(p) for src, p in setup["maps"].items()}
    out = setup["root"] / "aligned"
    stage_times: list[float] = []

    def stage() -> Any:
        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        with quiet():
            r = align_dataset(ex["target"], sources, out, vocab_maps=maps, progress=False)
        stage_times.append(time.perf_counter() - t0)
        return r

    stage()  # warm-up: imports, tokenizer parsing
    stage_times.clear()
    report_ = benchmark.pedantic(stage, rounds=3, iterations=1)
    tokens = report_.base_positions

    arrays = _kernel_inputs(setup)
    from fusellm.loading import load_tokenizer

    base_vocab = fusellm.tokenizer_vocab(load_tokenizer(setup["models"]["target"]))
    aligners = {}
    for src in sources_of(setup):
        blend_vocab = fusellm.tokenizer_vocab(load_tokenizer(setup["models"][src]))
        vm = fusellm.VocabMap.load(setup["maps"][src], base_vocab, blend_vocab)
        aligners[src] = fusellm.Aligner(
            base_vocab,
            blend_vocab,
            base_marker=fusellm.tokenizer_marker(base_vocab),
            blend_marker=fusellm.tokenizer_marker(blend_vocab),
            vocab_map=vm,
        )
    flat = {k: _flat(v) for k, v in arrays.items() if k.startswith("base")}
    flat.update({src: {k: _flat(v) for k, v in arrays[src].items()} for src in aligners})

    def per_sequence() -> None:
        for src, a in aligners.items():
            s = arrays[src]
            a.align_batch(
                arrays["base_ids"],
                s["ids"],
                s["indices"],
                s["logits"],
                method="offsets",
                vocab="soft",
                base_offsets=arrays["base_spans"],
                blend_offsets=s["spans"],
            )

    def flat_batch() -> None:  # the entry point the stage calls, one batch per source
        for src, a in aligners.items():
            s = flat[src]
            a.align_flat(
                flat["base_ids"][1],
                flat["base_ids"][0],
                s["ids"][1],
                s["ids"][0],
                s["indices"][1],
                s["logits"][1],
                method="offsets",
                vocab="soft",
                base_offsets=flat["base_spans"][1],
                blend_offsets=s["spans"][1],
            )

    kernel_times: dict[str, list[float]] = {"align_batch": [], "align_flat": []}
    for _ in range(3):
        for name, run in (("align_batch", per_sequence), ("align_flat", flat_batch)):
            t0 = time.perf_counter()
            run()
            kernel_times[name].append(time.perf_counter() - t0)
    stage_s = statistics.median(stage_times)
    kernel_s = statistics.median(kernel_times["align_batch"])
    flat_s = statistics.median(kernel_times["align_flat"])
    report(
        "align stage vs align_batch / align_flat (offsets, soft, 2 sources)",
        target_tokens=tokens,
        stage_s=round(stage_s, 3),
        stage_tokens_per_s=round(tokens / stage_s),
        kernel_s=round(kernel_s, 3),
        kernel_tokens_per_s=round(tokens / kernel_s),
        kernel_share=round(kernel_s / stage_s, 3),
        flat_kernel_s=round(flat_s, 3),
        flat_kernel_tokens_per_s=round(tokens / flat_s),
        flat_kernel_share=round(flat_s / stage_s, 3),
    )
    benchmark.extra_info.update(
        kernel_share=kernel_s / stage_s,
        flat_kernel_share=flat_s / stage_s,
        stage_tokens_per_s=tokens / stage_s,
    )


def _flat(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Row offsets and concatenated values of per-row arrays (an Arrow list column's layout)."""
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    return offsets, np.ascontiguousarray(np.concatenate(rows))


def test_pack_stage_vs_kernel(benchmark: Any, setup: dict[str, Any]) -> None:
    ex = setup["extracts"]
    aligned = setup["root"] / "aligned-pack"
    if not aligned.exists():
        with quiet():
            align_dataset(
                ex["target"],
                {src: ex[src] for src in sources_of(setup)},
                aligned,
                vocab_maps={src: str(p) for src, p in setup["maps"].items()},
                progress=False,
            )
    stage_times: dict[str, list[float]] = {"plan": [], "copy": []}
    reports = {}
    for layout in ("plan", "copy"):
        out = setup["root"] / f"packed-{layout}"

        def stage(layout: str = layout, out: Path = out) -> Any:
            if out.exists():
                shutil.rmtree(out)
            t0 = time.perf_counter()
            r = pack_dataset(aligned, out, block_size=BLOCK, layout=layout, progress=False)
            stage_times[layout].append(time.perf_counter() - t0)
            return r

        stage()  # warm-up (imports, page cache)
        stage_times[layout].clear()
        if layout == "plan":
            reports[layout] = benchmark.pedantic(stage, rounds=3, iterations=1)
        else:
            reports[layout] = min((stage() for _ in range(3)), key=lambda r: r.seconds)
    ds = datasets.load_from_disk(str(aligned)).with_format("numpy")
    lengths = np.array([len(x) for x in ds["input_ids"]], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    columns = {"input_ids": np.concatenate(list(ds["input_ids"]))}
    for c in ("ref", *sources_of(setup)):
        columns[f"{c}_ids"] = np.concatenate(list(ds[f"{c}_ids"]))
        columns[f"{c}_logits"] = np.concatenate(list(ds[f"{c}_logits"]))
    kernel_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fusellm.pack(columns, offsets, block_size=BLOCK)
        kernel_times.append(time.perf_counter() - t0)
    tokens = reports["plan"].tokens
    assert reports["copy"].tokens == tokens
    plan_s, copy_s = (statistics.median(stage_times[k]) for k in ("plan", "copy"))
    kernel_s = statistics.median(kernel_times)
    read = _training_reads(setup["root"], sources_of(setup))
    report(
        "pack stage (concat, 3 candidates): plan layout (default) and copy layout vs fusellm.pack",
        tokens=tokens,
        plan_stage_s=round(plan_s, 3),
        plan_tokens_per_s=round(tokens / plan_s),
        copy_stage_s=round(copy_s, 3),
        copy_tokens_per_s=round(tokens / copy_s),
        kernel_s=round(kernel_s, 4),
        kernel_tokens_per_s=round(tokens / kernel_s),
        copy_kernel_share=round(kernel_s / copy_s, 3),
        plan_speedup_over_copy=round(copy_s / plan_s, 1),
        **read,
    )
    benchmark.extra_info.update(plan_speedup_over_copy=copy_s / plan_s)


def _training_reads(root: Path, sources: list[str]) -> dict[str, float]:
    """Blocks per second that the training collator gets from each layout's output (batches of
    4 blocks, as the miniature trains), median of 3 passes over the first 200 blocks."""
    from fusellm.fuse import FusionCollator
    from fusellm.stages.pack import load_packed

    out = {}
    for layout in ("plan", "copy"):
        blocks = load_packed(root / f"packed-{layout}")
        if layout == "copy":
            blocks = blocks.with_format("numpy")
        domains = sorted(set(blocks.unique("domain"))) if "domain" in blocks.column_names else []
        collate = FusionCollator(sources, domains=domains)
        n = min(200, len(blocks))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for lo in range(0, n, 4):
                collate([blocks[i] for i in range(lo, min(lo + 4, n))])
            times.append(time.perf_counter() - t0)
        out[f"{layout}_training_blocks_per_s"] = round(n / statistics.median(times))
    return out


CODECS = [(None, None), ("lz4", None), ("zstd", 1), ("zstd", 3), ("zstd", 9)]


def test_shard_compression(benchmark: Any, setup: dict[str, Any], tmp_path: Path) -> None:
    """Which shard compression keeps up: the aligned dataset (the largest stage output, 3
    candidates) written and read back as one Arrow IPC stream per codec and level, the time of
    each against the uncompressed write in the same process, and its bytes per target token."""
    import pyarrow as pa

    aligned = setup["root"] / "aligned-codecs"
    if not aligned.exists():
        with quiet():
            align_dataset(
                setup["extracts"]["target"],
                {src: setup["extracts"][src] for src in sources_of(setup)},
                aligned,
                vocab_maps={src: str(p) for src, p in setup["maps"].items()},
                progress=False,
            )
    table = datasets.load_from_disk(str(aligned)).data.table.combine_chunks()
    tokens = int(pa.compute.sum(pa.compute.list_value_length(table.column("input_ids"))).as_py())
    raw = table.nbytes
    rows = []
    for codec, level in CODECS:
        comp = None if codec is None else pa.Codec(codec, compression_level=level)
        options = pa.ipc.IpcWriteOptions(compression=comp)
        path = tmp_path / f"{codec}-{level}.arrow"
        writes, reads = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            with (
                pa.OSFile(str(path), "wb") as sink,
                pa.ipc.new_stream(sink, table.schema, options=options) as writer,
            ):
                writer.write_table(table)
            writes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with pa.OSFile(str(path), "rb") as src:
                back = pa.ipc.open_stream(src).read_all()
            reads.append(time.perf_counter() - t0)
        assert back.equals(table)  # lossless, whatever the codec
        rows.append((codec, level, path.stat().st_size, min(writes), min(reads)))
    # the stages' default (lz4) under pytest-benchmark too
    options = pa.ipc.IpcWriteOptions(compression="lz4")

    def write_default() -> None:
        with (
            pa.OSFile(str(tmp_path / "default.arrow"), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema, options=options) as writer,
        ):
            writer.write_table(table)

    benchmark.pedantic(write_default, rounds=3, iterations=1)
    base_write = rows[0][3]
    for codec, level, size, w, r in rows:
        report(
            f"aligned shard, {codec or 'uncompressed'}{'' if level is None else f' level {level}'}",
            bytes_per_token=round(size / tokens, 1),
            size_ratio=round(size / raw, 3),
            write_mb_per_s=round(raw / w / 1e6),
            read_mb_per_s=round(raw / r / 1e6),
            write_vs_uncompressed=round(w / base_write, 2),
            write_tokens_per_s=round(tokens / w),
        )
