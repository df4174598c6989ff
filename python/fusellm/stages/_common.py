"""What the dataset stages share: argument checks, input fingerprints, and reading
``save_to_disk`` datasets record batch by record batch as flat numpy views of their Arrow
buffers (values plus row offsets, never lists of lists)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FuseLLMError, InputError, InputTypeError

#: Per-candidate columns of an aligned dataset: ``{name}_ids``, ``{name}_logits``, ...
CANDIDATE_SUFFIXES = ("ids", "logits", "metric_ce", "num_tokens")
#: The files of a ``save_to_disk`` dataset that define its content.
DATA_PATTERNS = ("data-*.arrow", "state.json", "dataset_info.json")
#: Shard compressions the stages write.
COMPRESSIONS = ("lz4", "zstd", None)


# --- argument checks, fingerprints ---------------------------------------------------------------


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {list(choices)}, got {value!r}")


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def previous_fingerprints(out: Path) -> dict[str, Any]:
    from ..io import read_manifest

    try:
        m = read_manifest(out) if out.is_dir() else None
    except FuseLLMError:
        return {}
    return dict((m or {}).get("fingerprints", {}))


def files_fingerprint(path: Path, previous: Any) -> dict[str, Any]:
    from ..io import fingerprint_files

    return fingerprint_files(path, patterns=DATA_PATTERNS, previous=previous)


def input_fingerprint(
    src: Path, manifest: Mapping[str, Any] | None, previous: Mapping[str, Any] | None
) -> dict[str, Any]:
    """A stage input's fingerprint. For a complete fusellm output (an extraction, an alignment):
    the producing artifact's own output fingerprint, re-read only where the files' names, sizes
    or modification times are not the recorded ones, so a stage does not hash again what the
    stage before it hashed when it committed. For a dataset without a manifest: its data files'
    (``previous``: an earlier result, reused the same way)."""
    from ..artifact import Artifact

    recorded = (manifest or {}).get("output")
    if manifest and manifest.get("complete") and isinstance(recorded, dict):
        art = Artifact(src, str(manifest.get("stage")), manifest.get("key") or {})
        return art.output_fingerprint(previous=recorded)
    return files_fingerprint(src, previous)


# --- reading save_to_disk datasets batch by batch ------------------------------------------------


class DiskDataset:
    """A ``save_to_disk`` directory read record batch by record batch (memory-mapped Arrow
    streams; compressed shards are decompressed one batch at a time)."""

    def __init__(self, path: Path, what: str) -> None:
        import pyarrow as pa

        self.path = path
        try:
            state = json.loads((path / "state.json").read_text(encoding="utf-8"))
            names = [f["filename"] for f in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{what}: {path} is not a save_to_disk dataset ({e})") from e
        if state.get("_indices_data_files"):
            raise InputError(f"{what}: {path} holds an indices mapping; save it flattened")
        self.files = [path / n for n in names]
        missing = [str(f) for f in self.files if not f.is_file()]
        if missing:
            raise InputError(f"{what}: data file(s) missing: {missing[:3]}")
        if not self.files:
            raise InputError(f"{what}: {path} has no data files")
        try:
            self.schema = pa.ipc.open_stream(pa.memory_map(str(self.files[0]))).schema
        except (OSError, pa.ArrowInvalid) as e:
            raise InputError(f"{what}: cannot read {self.files[0]}: {e}") from e
        self.what = what

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def batches(self, columns: Sequence[str] | None = None) -> Iterator[Any]:
        """The record batches in order; with ``columns``, only those columns are read (the
        other columns' buffers are neither decompressed nor copied)."""
        import pyarrow as pa

        options, expected = None, self.schema
        if columns is not None:
            missing = [c for c in columns if c not in self.schema.names]
            if missing:
                raise InputError(f"{self.what}: {self.path} lacks column(s) {missing}")
            fields = sorted(self.schema.get_field_index(c) for c in set(columns))
            options = pa.ipc.IpcReadOptions(included_fields=fields)
            expected = pa.schema([self.schema.field(i) for i in fields], self.schema.metadata)
        for f in self.files:
            try:
                reader = pa.ipc.open_stream(pa.memory_map(str(f)), options=options)
                if reader.schema != expected:
                    raise InputError(f"{self.what}: {f.name} has another schema than the first")
                yield from reader
            except pa.ArrowInvalid as e:
                raise InputError(f"{self.what}: cannot read {f}: {e}") from e


def row_tables(batches: Iterator[Any], rows: int) -> Iterator[Any]:
    """Re-slices record batches into tables of exactly ``rows`` rows (the last may be shorter)."""
    import pyarrow as pa

    buf: list[Any] = []
    have = 0
    for b in batches:
        if b.num_rows == 0:
            continue
        buf.append(b)
        have += b.num_rows
        while have >= rows:
            t = pa.Table.from_batches(buf)
            yield t.slice(0, rows)
            rest = t.slice(rows)
            buf = rest.to_batches() if rest.num_rows else []
            have -= rows
    if have:
        yield pa.Table.from_batches(buf)


def arrow_array(col: Any) -> Any:
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):  # one chunk (the usual case) is taken as it is
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    else:
        arr = col
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    return arr


def list_column(col: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Row offsets (``int64 [n + 1]``) and the flat values of a ``list<T>`` or
    ``list<fixed_size_list<T, K>>`` column (values ``[N]`` or ``[N, K]``), as numpy views."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = arrow_array(col)
    if not isinstance(arr, (pa.ListArray, pa.LargeListArray)):
        raise InputTypeError(f"column {name!r} must hold lists, got {arr.type}")
    if arr.null_count:
        raise InputError(f"column {name!r} has {arr.null_count} null row(s)")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    inner = arr.flatten()
    if isinstance(inner, pa.ExtensionArray):
        inner = inner.storage
    if isinstance(inner, pa.FixedSizeListArray):
        k = inner.type.list_size
        if inner.null_count:
            raise InputError(f"column {name!r} has null positions")
        values = inner.flatten()
        if values.null_count:
            raise InputError(f"column {name!r} has null values")
        flat = values.to_numpy(zero_copy_only=False).reshape(-1, k)
    elif isinstance(inner, (pa.ListArray, pa.LargeListArray)):
        inner_len = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
        if inner.null_count or (inner_len.size and inner_len.min() != inner_len.max()):
            raise InputError(f"column {name!r}: rows of different widths K")
        k = int(inner_len[0]) if inner_len.size else 0
        flat = inner.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
    else:
        if inner.null_count:
            raise InputError(f"column {name!r} has null values")
        flat = inner.to_numpy(zero_copy_only=False)
    if flat.shape[0] != offsets[-1]:  # pragma: no cover - arrow invariant
        raise InputError(f"column {name!r}: inconsistent list offsets")
    return offsets, flat


def scalar_column(table: Any, name: str, dtype: Any) -> np.ndarray:
    arr = arrow_array(table.column(name))
    if arr.null_count:
        raise InputError(f"column {name!r} has {arr.null_count} null value(s)")
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=dtype)


def fixed_width(field_type: Any) -> int | None:
    """K of a ``list<fixed_size_list<T, K>>`` type (``None`` for other types)."""
    import pyarrow as pa

    t = field_type.storage_type if isinstance(field_type, pa.ExtensionType) else field_type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        v = t.value_type
        if isinstance(v, pa.ExtensionType):
            v = v.storage_type
        if pa.types.is_fixed_size_list(v):
            return int(v.list_size)
    return None


def nested(offsets: np.ndarray, values: np.ndarray) -> Any:
    """A ``list<fixed_size_list<K>>`` (values ``[N, K]``) or ``list<T>`` (values ``[N]``) array."""
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    inner = pa.FixedSizeListArray.from_arrays(flat, values.shape[1]) if values.ndim == 2 else flat
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), inner)


# --- sharded outputs: workers i/N over one directory ---------------------------------------------
#
# A sharded output is built in place (a resumable artifact, :mod:`fusellm.artifact`): shard ``s``
# always holds the rows ``[s R, (s + 1) R)``; it is written under a temporary name and renamed,
# then its sidecar (``shards/*.json``: rows, size, SHA-256 and what the stage records per shard)
# is written, and a shard is finished when both exist and agree in size. Worker ``i`` of ``N``
# (``shard="i/N"``, times the ranks of a torchrun launch) computes the shards ``s`` with
# ``s % N == i`` under a lock of its own slot; whoever finds every shard finished completes the
# output.

#: The directory of a sharded output's per-shard sidecars.
SHARD_SIDECARS = "shards"


def parse_shard(shard: Any) -> tuple[int, int]:
    """``(i, N)`` from ``"i/N"`` or a pair (``None``: the whole output, ``(0, 1)``)."""
    if shard is None:
        return 0, 1
    if isinstance(shard, str):
        try:
            i_text, n_text = shard.split("/")
            i, n = int(i_text), int(n_text)
        except ValueError:
            raise InputError(f"shard must look like 'i/N', got {shard!r}") from None
    else:
        try:
            i, n = (int(v) for v in shard)
        except (TypeError, ValueError):
            raise InputError(f"shard must look like 'i/N' or (i, N), got {shard!r}") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"shard i/N needs 0 <= i < N, got {i}/{n}")
    return i, n


def worker_slot(shard: Any) -> tuple[int, int]:
    """``(worker, workers)`` from ``shard="i/N"`` and the torchrun environment (``RANK``,
    ``WORLD_SIZE``: each rank of worker ``i`` is a worker of its own)."""
    import os

    i, n = parse_shard(shard)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"bad RANK/WORLD_SIZE: {rank}/{world}")
    return i * world + rank, n * world


def worker_shards(slot: tuple[int, int], num_shards: int) -> list[int]:
    """The shards worker ``slot[0]`` of ``slot[1]`` computes."""
    return [s for s in range(num_shards) if s % slot[1] == slot[0]]


def shard_paths(out: Path, index: int, num_shards: int) -> tuple[Path, Path]:
    """A shard's data file and its sidecar."""
    from ..io import shard_file_name

    name = shard_file_name(index, num_shards)
    return out / name, out / SHARD_SIDECARS / (name[: -len(".arrow")] + ".json")


def shard_done(out: Path, index: int, num_shards: int) -> dict[str, Any] | None:
    """A finished shard's sidecar (``None`` if the shard is not finished)."""
    arrow, sidecar = shard_paths(out, index, num_shards)
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
        size = arrow.stat().st_size
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("bytes") == size else None


def write_shard(
    out: Path,
    index: int,
    num_shards: int,
    table: Any,
    compression: str | None,
    info: dict[str, Any],
    *,
    sort_keys: bool = True,
) -> dict[str, Any]:
    """Writes a shard's data file, then its sidecar: ``info`` with the file's ``bytes`` and
    ``sha256`` (``sort_keys=False`` keeps the keys' order; JSON floats read back exactly)."""
    from ..io import atomic_write_json, write_arrow_shard

    arrow, sidecar = shard_paths(out, index, num_shards)
    written = write_arrow_shard(table, arrow, compression=compression)
    info = {**info, "bytes": written["bytes"], "sha256": written["sha256"]}
    atomic_write_json(sidecar, info, sort_keys=sort_keys)
    return info


def note_shard_digests(art: Any, infos: Sequence[Mapping[str, Any]], num_shards: int) -> None:
    """Tells the artifact ``art`` the SHA-256 each shard was written with (``infos``: every
    shard's sidecar, in shard order), so that its output fingerprint does not read them again."""
    from ..io import shard_file_name

    for index, info in enumerate(infos):
        art.known_digest(shard_file_name(index, num_shards), info["bytes"], info["sha256"])


def finished_shards(
    out: Path, num_shards: int, rows_per_shard: int, num_rows: int, *, verify_hashes: bool = False
) -> list[dict[str, Any]]:
    """Every shard's sidecar, in shard order, checked: each shard holds its rows (and, with
    ``verify_hashes``, the recorded bytes). Raises :class:`FuseLLMError` listing missing shards,
    :class:`StaleArtifactError` for a shard that does not match its sidecar."""
    from ..errors import StaleArtifactError
    from ..io import file_sha256

    missing, infos = [], []
    for s in range(num_shards):
        info = shard_done(out, s, num_shards)
        if info is None:
            missing.append(s)
            continue
        want_start = s * rows_per_shard
        want_rows = min(rows_per_shard, num_rows - want_start)
        if info.get("row_start") != want_start or info.get("num_rows") != want_rows:
            raise StaleArtifactError(
                f"shard {s} holds rows {info.get('row_start')}+{info.get('num_rows')}, expected "
                f"{want_start}+{want_rows}"
            )
        if verify_hashes and file_sha256(shard_paths(out, s, num_shards)[0]) != info.get("sha256"):
            raise StaleArtifactError(f"shard {s} does not match its recorded SHA-256")
        infos.append(info)
    if missing:
        raise FuseLLMError(
            f"{out}: {len(missing)} of {num_shards} shard(s) missing: {missing[:20]}"
            + (" ..." if len(missing) > 20 else "")
        )
    if sum(i["num_rows"] for i in infos) != num_rows:
        raise StaleArtifactError(f"{out}: the shards do not hold the {num_rows} input rows")
    return infos
