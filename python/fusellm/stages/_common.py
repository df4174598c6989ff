"""What the dataset stages share: argument checks, input fingerprints, and reading
``save_to_disk`` datasets record batch by record batch as flat numpy views of their Arrow
buffers (values plus row offsets, never lists of lists)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FuseLLMError, InputError, InputTypeError

#: Per-candidate columns of an aligned dataset: ``{name}_ids``, ``{name}_logits``, ...
CANDIDATE_SUFFIXES = ("ids", "logits", "metric_ce", "num_tokens")
#: The files of a ``save_to_disk`` dataset that define its content.
DATA_PATTERNS = ("data-*.arrow", "state.json", "dataset_info.json")
#: Shard compressions the stages write.
COMPRESSIONS = ("zstd", "lz4", None)


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

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
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
