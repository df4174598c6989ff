"""Shared I/O helpers of the pipeline stages: atomic writes, fingerprints, manifests, inputs.

Every stage reads the previous stage's dataset from disk and writes its own, so each output must
be either complete or absent, and must say what it was made from:

- :func:`atomic_write_bytes` / :func:`atomic_write_json` write a temporary file next to the target
  (same file system), ``fsync`` it, then ``os.replace`` it onto the target: a reader sees the old
  file or the new one, never a torn one. :func:`atomic_dir` does the same for a whole directory.
- :func:`fingerprint_files` hashes files (SHA-256 of relative names, sizes and content digests);
  :func:`model_fingerprint` / :func:`tokenizer_fingerprint` select the files that define a model
  (config and weights) or a tokenizer. A previous result can be reused when every file's size and
  modification time are unchanged, so restarts do not re-hash many gigabytes of weights.
- :func:`fingerprint_dataset` hashes a dataset's CONTENT (schema and values), independently of how
  its Arrow table is chunked or whether it was loaded from JSONL, Parquet or ``save_to_disk``.
- :func:`read_manifest`: the JSON manifest every stage leaves in its output directory (written,
  and decided on, by the one artifact protocol, :mod:`fusellm.artifact`).
- :func:`exclusive_lock` and :func:`remove_stale_temporaries` / :func:`remove_dead_temporaries`:
  the lock of an output or work directory, and the cleanup after killed writers.
- :func:`load_text_dataset` opens the inputs the stages accept (a ``datasets.Dataset``, a
  ``save_to_disk`` directory, JSONL / JSON / Parquet / Arrow files, a directory of text files, a
  list of strings).
- :func:`write_arrow_shard` / :func:`write_dataset_metadata` write ``save_to_disk``-compatible
  shards one at a time (optionally compressed), so ``datasets.load_from_disk`` reads the result.

Heavy dependencies (pyarrow, datasets) are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import FuseLLMError, InputError, InputTypeError

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_NAME",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "file_sha256",
    "fingerprint_dataset",
    "fingerprint_files",
    "load_text_dataset",
    "model_fingerprint",
    "read_json_object",
    "read_manifest",
    "tokenizer_fingerprint",
    "write_arrow_shard",
    "write_dataset_metadata",
]

#: File name of the manifest each stage writes into its output directory.
MANIFEST_NAME = "fusellm_manifest.json"

_CHUNK = 1 << 20
_FP_WINDOW = 16384
_TMP_MARK = ".tmp-"

#: Files that define a model's outputs: its configuration and its weights.
MODEL_FILE_PATTERNS = (
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)
#: Files that define a tokenizer's behaviour.
TOKENIZER_FILE_PATTERNS = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
)


# --- atomic writes -------------------------------------------------------------------------------


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's live process
        return True
    return True


def _dead_writer(name: str, prefix: str) -> bool:
    """Whether a temporary name ``PREFIX<pid>-...`` was written by a process that no longer
    runs."""
    pid = name[len(prefix) :].split("-", 1)[0]
    return pid.isdigit() and not _pid_alive(int(pid))


def _remove_path(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Removes the temporary siblings of ``path`` (``.NAME.tmp-PID-...``) left by killed
    processes: those whose process no longer runs. Returns what was removed."""
    target = Path(path)
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    prefix = f".{target.name}{_TMP_MARK}"
    for p in target.parent.iterdir():
        if p.name.startswith(prefix) and _dead_writer(p.name, prefix):
            _remove_path(p)
            removed.append(p)
    return removed


def remove_dead_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Removes every temporary file or directory below ``directory`` (any ``.NAME.tmp-PID-...``)
    whose writing process no longer runs: what a killed writer left inside an output that is
    built in place. Returns what was removed."""
    root = Path(directory)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for p in sorted(root.rglob(f"*{_TMP_MARK}*")):
        if not is_tmp_name(p.name) or not p.exists():
            continue
        name = p.name
        prefix = name[: name.index(_TMP_MARK) + len(_TMP_MARK)]
        if _dead_writer(name, prefix):
            _remove_path(p)
            removed.append(p)
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (temporary sibling, fsync, rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = _tmp_sibling(target)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_json(
    path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, sort_keys: bool = True
) -> Path:
    """Writes ``obj`` as JSON (UTF-8, trailing newline) atomically; keys sorted by default."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, allow_nan=True)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Builds a directory under a temporary name and renames it onto ``path`` on success.

    Yields the temporary directory (a sibling of ``path``). If the block raises, the temporary
    directory is removed and ``path`` is left as it was. If ``path`` exists when the block ends,
    it is replaced when ``overwrite`` is true, else :class:`FileExistsError` is raised (the
    existence is also checked on entry, before any work is done).
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = _tmp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} appeared while it was being written")
            trash = _tmp_sibling(target)
            os.replace(target, trash)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_tmp_name(name: str) -> bool:
    """Whether a file name is one of the temporary names written by this module."""
    return name.startswith(".") and _TMP_MARK in name


# --- fingerprints --------------------------------------------------------------------------------


def _select(root: Path, patterns: Sequence[str]) -> list[Path]:
    found: set[Path] = set()
    for pattern in patterns:
        found.update(p for p in root.glob(pattern) if p.is_file())
    return sorted(found)


def fingerprint_files(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    root: str | os.PathLike[str] | None = None,
    patterns: Sequence[str] | None = None,
    previous: Mapping[str, Any] | None = None,
    digests: Mapping[str, tuple[int, str]] | None = None,
) -> dict[str, Any]:
    """SHA-256 over files: their names relative to ``root``, sizes and content digests (each
    file's own SHA-256), in name order.

    ``paths`` is a directory (every regular file below it, or those matching ``patterns`` at its
    top level) or an iterable of files. Returns ``{"sha256": hex, "files": [[name, size,
    mtime_ns], ...]}``. When ``previous`` (an earlier result) lists exactly the same names, sizes
    and modification times, its hash is reused without reading the files. ``digests`` maps names
    to ``(size, sha256 hex)`` that the caller computed while writing those files (a stage's
    shards); a file of that size is not read again.
    """
    if isinstance(paths, (str, os.PathLike)):
        base = Path(paths)
        if not base.is_dir():
            raise InputError(f"{base} is not a directory")
        files = (
            _select(base, patterns)
            if patterns is not None
            else sorted(p for p in base.rglob("*") if p.is_file())
        )
        root_path = base
    else:
        files = sorted(Path(p) for p in paths)
        root_path = Path(root) if root is not None else None
    entries: list[tuple[str, int, int, Path]] = []
    for f in files:
        try:
            st = f.stat()
        except OSError as e:
            raise InputError(f"cannot read {f}: {e}") from e
        name = f.relative_to(root_path).as_posix() if root_path is not None else f.name
        entries.append((name, st.st_size, st.st_mtime_ns, f))
    entries.sort(key=lambda e: e[0])
    listing = [[name, size, mtime] for name, size, mtime, _ in entries]
    if previous is not None and previous.get("files") == listing and previous.get("sha256"):
        return {"sha256": previous["sha256"], "files": listing}
    h = hashlib.sha256()
    for name, size, _, f in entries:
        known = (digests or {}).get(name)
        digest = known[1] if known is not None and known[0] == size else file_sha256(f)
        h.update(f"{name}\0{size}\0{digest}\0".encode())
    return {"sha256": h.hexdigest(), "files": listing}


def file_sha256(path: Path) -> str:
    """The SHA-256 (hex) of a file's content."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e}") from e
    return h.hexdigest()


def model_fingerprint(
    model_dir: str | os.PathLike[str], *, previous: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Fingerprint of a model directory: ``config.json`` and the weight files."""
    fp = fingerprint_files(model_dir, patterns=MODEL_FILE_PATTERNS, previous=previous)
    names = {f[0] for f in fp["files"]}
    if "config.json" not in names:
        raise InputError(f"{model_dir} has no config.json: not a model directory")
    return fp


def tokenizer_fingerprint(
    tokenizer_dir: str | os.PathLike[str], *, previous: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Fingerprint of the tokenizer files in a directory."""
    fp = fingerprint_files(tokenizer_dir, patterns=TOKENIZER_FILE_PATTERNS, previous=previous)
    if not fp["files"]:
        raise InputError(f"{tokenizer_dir} holds no tokenizer files")
    return fp


def tokenizer_object_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of an in-memory fast tokenizer's serialized definition (and its EOS string)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    to_str = getattr(backend, "to_str", None)
    if to_str is None:
        raise InputTypeError(f"not a fast tokenizer: {type(tokenizer).__name__}")
    h = hashlib.sha256(to_str().encode("utf-8"))
    h.update(b"\0eos\0" + str(getattr(tokenizer, "eos_token", None)).encode("utf-8"))
    return h.hexdigest()


def fingerprint_dataset(dataset: Any, columns: Sequence[str] | None = None) -> str:
    """SHA-256 of a dataset's content: column names, Arrow types and values, in row order.

    Independent of the table's chunking and of memory layout (slices, offsets); a ``select`` or
    ``shuffle`` view is hashed in its visible order. ``dataset`` is a ``datasets.Dataset`` or a
    ``pyarrow.Table``. Rows are hashed in fixed windows of ``_FP_WINDOW`` rows, each window's
    columns serialized as Arrow IPC after combining chunks (the window is part of the definition).
    """
    import pyarrow as pa

    table = _as_arrow_table(dataset)
    if columns is not None:
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise InputError(f"no column(s) {missing} in the dataset ({table.column_names})")
        table = table.select(list(columns))
    h = hashlib.sha256()
    h.update(f"rows={table.num_rows}\0".encode())
    for field in table.schema:
        h.update(f"{field.name}:{field.type}\0".encode())
    options = pa.ipc.IpcWriteOptions(compression=None)
    for start in range(0, table.num_rows, _FP_WINDOW):
        part = table.slice(start, _FP_WINDOW)
        for name in table.column_names:
            array = part.column(name).combine_chunks()
            batch = pa.record_batch([array], names=[name])
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, batch.schema, options=options) as w:
                w.write_batch(batch)
            h.update(sink.getvalue())
    return h.hexdigest()


def _as_arrow_table(dataset: Any) -> Any:
    import pyarrow as pa

    if isinstance(dataset, pa.Table):
        return dataset
    try:
        import datasets
    except ImportError:  # pragma: no cover
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        if len(dataset) == 0:
            return dataset.data.table.slice(0, 0)
        # The "arrow" format honours an indices mapping (select / shuffle) and is zero-copy
        # for a plain memory-mapped dataset.
        return dataset.with_format("arrow")[:]
    raise InputTypeError(f"expected a datasets.Dataset or pyarrow.Table, got {type(dataset)}")


# --- manifests -----------------------------------------------------------------------------------


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON object stored in ``path``, or ``None`` if the file does not exist.

    Raises:
        InputError: the file cannot be read, is not valid JSON, or holds something other than an
            object (the message names the file).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise InputError(f"{path} does not hold a JSON object (got {type(obj).__name__})")
    return obj


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of a stage's output directory, or ``None`` if it has none."""
    return read_json_object(Path(directory) / MANIFEST_NAME)


# --- inputs --------------------------------------------------------------------------------------

_TEXT_SUFFIXES = {".jsonl", ".json", ".parquet", ".arrow", ".txt"}


def load_text_dataset(source: Any, *, text_column: str | None = "text") -> Any:
    """Opens a stage input as a ``datasets.Dataset`` and checks its text column.

    ``source`` is a ``datasets.Dataset``; a single-split ``DatasetDict``; a sequence of strings
    (column ``"text"``); or a path: a ``save_to_disk`` directory, a ``.jsonl`` / ``.json`` /
    ``.parquet`` / ``.arrow`` file, a ``.txt`` file (one document), or a directory of files, each
    read as one UTF-8 document (sorted by relative path; columns ``text`` and ``path``).
    Raises :class:`InputError` when the source cannot be read or lacks ``text_column``.
    """
    import datasets

    ds: Any
    if isinstance(source, datasets.Dataset):
        ds = source
    elif isinstance(source, datasets.DatasetDict):
        if len(source) != 1:
            raise InputError(
                f"the DatasetDict has splits {list(source)}: pass one split (e.g. ds['train'])"
            )
        ds = next(iter(source.values()))
    elif isinstance(source, (str, os.PathLike)):
        ds = _load_path(Path(source))
    elif isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        items = list(source)
        bad = [i for i, t in enumerate(items) if not isinstance(t, str)]
        if bad:
            raise InputTypeError(
                f"texts must be strings; item {bad[0]} is {type(items[bad[0]]).__name__}"
            )
        ds = datasets.Dataset.from_dict({text_column or "text": items})
    else:
        raise InputTypeError(
            f"cannot read a dataset from {type(source).__name__}: pass a datasets.Dataset, a path "
            "or a list of strings"
        )
    if text_column is not None and text_column not in ds.column_names:
        raise InputError(
            f"the dataset has no column {text_column!r} (columns: {ds.column_names}); "
            "choose the text column with text_column="
        )
    if text_column is not None:
        where = str(source) if isinstance(source, (str, os.PathLike)) else "the dataset"
        _check_utf8(ds, text_column, where)
    return ds


def _check_utf8(ds: Any, column: str, where: str) -> None:
    """Raise :class:`InputError` naming the row if a string column holds invalid UTF-8 (JSON
    readers pass raw bytes through; they would fail later, far from their source)."""
    import pyarrow as pa

    col = ds.data.column(column)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return
    start = 0
    for chunk in col.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid as e:
            m = re.search(r"index (\d+)", str(e))
            row = start + int(m.group(1)) if m else None
            at = f"row {row}" if row is not None else f"a row from {start} on"
            raise InputError(
                f"{where}: {at} of column {column!r} is not valid UTF-8 text ({e})"
            ) from None
        start += len(chunk)


def _load_path(path: Path) -> Any:
    import datasets

    if not path.exists():
        raise InputError(f"{path} does not exist")
    try:
        if path.is_dir():
            if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
                loaded = datasets.load_from_disk(str(path))
                return load_text_dataset(loaded, text_column=None)
            return _load_text_dir(path)
        suffix = path.suffix.lower()
        if suffix not in _TEXT_SUFFIXES:
            raise InputError(
                f"{path}: unknown input format {suffix!r} (expected a save_to_disk directory, a "
                "directory of text files, or .jsonl/.json/.parquet/.arrow/.txt)"
            )
        if suffix in (".jsonl", ".json"):
            return datasets.Dataset.from_json(str(path))
        if suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(path))
        if suffix == ".arrow":
            return datasets.Dataset.from_file(str(path))
        return datasets.Dataset.from_dict({"text": [_read_text(path)], "path": [path.name]})
    except FuseLLMError:
        raise
    except Exception as e:  # datasets/pyarrow raise many types for unreadable files
        raise InputError(f"cannot read a dataset from {path}: {type(e).__name__}: {e}") from e


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text: {e}") from e


def _load_text_dir(path: Path) -> Any:
    import datasets

    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise InputError(f"{path} holds no files")
    return datasets.Dataset.from_dict(
        {
            "text": [_read_text(p) for p in files],
            "path": [p.relative_to(path).as_posix() for p in files],
        }
    )


# --- save_to_disk-compatible shards --------------------------------------------------------------


def shard_file_name(index: int, num_shards: int) -> str:
    """The ``save_to_disk`` name of a shard: ``data-00003-of-00012.arrow``."""
    return f"data-{index:05d}-of-{num_shards:05d}.arrow"


def write_arrow_shard(
    table: Any, path: str | os.PathLike[str], *, compression: str | None
) -> dict[str, Any]:
    """Writes a ``pyarrow.Table`` atomically as an Arrow IPC stream (the ``save_to_disk`` format).

    ``compression`` is ``"lz4"``, ``"zstd"`` or ``None``; compressed shards are read by
    ``datasets.load_from_disk`` and ``Dataset.from_file`` like uncompressed ones but are
    decompressed into memory instead of being memory-mapped. Returns ``{"bytes", "sha256"}``.
    """
    import pyarrow as pa

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(target)
    options = pa.ipc.IpcWriteOptions(compression=compression)
    try:
        # Serialized in memory (the table is there already; compressed, the stream is smaller),
        # so that it is hashed without reading the file back.
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
            writer.write_table(table)
        data = memoryview(sink.getvalue())
        h = hashlib.sha256(data)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        size = len(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)
    return {"bytes": size, "sha256": h.hexdigest()}


def write_dataset_metadata(
    directory: str | os.PathLike[str],
    features: Any,
    data_files: Sequence[str],
    *,
    fingerprint: str,
    description: str = "",
) -> None:
    """Writes ``state.json`` and ``dataset_info.json`` so ``datasets.load_from_disk`` opens the
    shards ``data_files`` (names relative to ``directory``) as one dataset."""
    # The layout save_to_disk writes; only the first level of keys is sorted, because the order
    # of the features is the order of the columns.
    info_dict = {
        "citation": "",
        "description": description,
        "features": features.to_dict(),
        "homepage": "",
        "license": "",
    }
    state = {
        "_data_files": [{"filename": name} for name in data_files],
        "_fingerprint": fingerprint[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    atomic_write_json(Path(directory) / "dataset_info.json", info_dict, sort_keys=False)
    atomic_write_json(Path(directory) / "state.json", state)


# --- locks ---------------------------------------------------------------------------------------

LOCK_NAME = ".fusellm.lock"


@contextlib.contextmanager
def exclusive_lock(
    target: str | os.PathLike[str],
    what: str,
    *,
    lock_file: str | os.PathLike[str] | None = None,
    remove: bool = False,
) -> Iterator[Path]:
    """Holds an exclusive advisory lock (``flock``) on ``target`` for the block: on the file
    ``lock_file`` (default ``target/.fusellm.lock``, for a directory).

    The lock file records the holder (process id, host, start time, command line). A second
    holder gets a :class:`~fusellm.LockedError` at once, naming ``what`` and ``target`` and the
    first holder; the lock goes with its process, so a killed run leaves nothing to clean up (the
    stale file is reused). With ``remove``, the holder deletes the lock file when it is done (a
    process that opened the file just before is detected: its lock is on a deleted file, and it
    tries again on the new one).
    """
    import fcntl
    import socket
    import sys
    import time

    from .errors import LockedError

    path = Path(lock_file) if lock_file is not None else Path(target) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(
                f"{what} {Path(target)} is in use by another fusellm process ({holder}); "
                "wait for it to finish or stop it"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed this file: lock the new one
    else:  # pragma: no cover - a hundred holders came and went meanwhile
        raise LockedError(f"{what} {Path(target)}: could not take the lock {path}")
    try:
        info = (
            f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:200]}"
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode("utf-8"), 0)
        yield path
    finally:
        if remove:
            path.unlink(missing_ok=True)  # still locked: a newcomer sees the file gone
        os.close(fd)  # releases the lock
