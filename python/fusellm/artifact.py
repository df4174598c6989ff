"""The one artifact protocol: how every stage output is decided, built, committed and locked.

An *artifact* is what one stage (or one piece of the miniature, or one training run of
``fusellm run``) writes: a directory, or a file with its sidecars. It carries a manifest (the
directory's ``fusellm_manifest.json``, or ``FILE.fusellm_manifest.json`` beside a file) that
records the stage, the *key* (a JSON object of every input fingerprint and setting that changes
the output), whether the output is complete, and the fingerprint of the output's own files.

**The decision** (:meth:`Artifact.decide`), made under the artifact's lock:

- ``absent``: nothing there (or an empty directory, or only temporaries): build it;
- ``done``: complete, with this key, and its files are the ones recorded: skip it (and say so,
  :meth:`Artifact.skipped`);
- ``resume``: a resumable artifact (built in place: extraction shards, training checkpoints,
  evaluated models) begun with this key but not complete: continue over its partial output;
- *stale*: made from other inputs, by another stage, or changed after it was written. With
  ``on_stale="refuse"`` (what the commands do without ``--overwrite``) this raises
  :class:`~fusellm.StaleArtifactError` naming the key fields that differ and ``--overwrite``;
  with ``on_stale="replace"`` (``overwrite=True``, and what ``fusellm run`` passes) the decision
  is ``replace``: build it again, replacing the old output.

A directory that holds files but no manifest is not a fusellm output: it is refused with an
:class:`~fusellm.InputError` whatever the policy, unless the caller owns the path
(``owned=True``: the pipeline's own training and evaluation outputs), where it counts as stale.

**The commit.** An atomic artifact is built under a temporary sibling name and renamed into place
with its manifest (:meth:`Artifact.build`; :func:`fusellm.io.atomic_dir`), so a reader sees the old
output or the new one, never a torn one; the temporaries of killed builders are removed first. A
resumable artifact is built in place (:meth:`Artifact.building`): an incomplete manifest is
written before the work (after removing what killed writers left inside), and
:meth:`Artifact.complete` records completion and the output fingerprint at the end. The manifest
records the seconds the build took (:func:`build_seconds`).

**The lock.** :meth:`Artifact.build` and :meth:`Artifact.building` hold an exclusive ``flock`` on
``.NAME.lock`` beside the output for the whole build (and decide again under it): a second
process building the same output fails at once with a one-line :class:`~fusellm.LockedError`
naming the holder's pid. Workers that share one resumable output (extraction shards ``i/N``) lock
their own slot. The lock file is removed with the lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FuseLLMError, InputError, StaleArtifactError
from .io import (
    MANIFEST_NAME,
    atomic_dir,
    atomic_write_json,
    fingerprint_files,
    is_tmp_name,
    read_json_object,
    remove_dead_temporaries,
    remove_stale_temporaries,
)

__all__ = [
    "ON_STALE",
    "Artifact",
    "Decision",
    "build_seconds",
    "fusellm_version",
    "is_complete",
    "output_sha256",
    "stale_policy",
]

logger = logging.getLogger(__name__)

#: What to do with an output made from other inputs: refuse it, or replace it.
ON_STALE = ("refuse", "replace")


def fusellm_version() -> str:
    """The installed fusellm version (recorded in every manifest)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fusellm")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


def check_on_stale(on_stale: Any) -> str:
    """``on_stale`` checked against :data:`ON_STALE`."""
    if on_stale not in ON_STALE:
        raise InputError(f"on_stale must be one of {list(ON_STALE)}, got {on_stale!r}")
    return str(on_stale)


def stale_policy(overwrite: Any, on_stale: str | None) -> str:
    """The policy of a stage called with ``overwrite`` (the commands' ``--overwrite``) and an
    explicit ``on_stale`` (which wins when given)."""
    if on_stale is not None:
        return check_on_stale(on_stale)
    if not isinstance(overwrite, bool):
        raise InputError(f"overwrite must be True or False, got {overwrite!r}")
    return "replace" if overwrite else "refuse"


@dataclass
class Decision:
    """What :meth:`Artifact.decide` found: ``state`` is ``"absent"``, ``"done"``, ``"resume"`` or
    ``"replace"``; ``manifest`` the manifest found (``None`` when there was none); ``changed``
    what made a replaced artifact stale."""

    state: str
    #: The policy it was made under (:data:`ON_STALE`).
    policy: str = "refuse"
    manifest: dict[str, Any] | None = None
    changed: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.state == "done"


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


class Artifact:
    """One stage output (module docstring).

    Args:
        path: the output: a directory, or a file when ``files`` is given.
        stage: the stage that writes it (``"split"``, ``"extract"``, ``"train"``, ...).
        key: everything that changes the output (JSON-serializable).
        files: for a file artifact, the names of the files beside ``path`` that make it up
            (``path``'s own name included); ``None`` for a directory.
        fingerprint: glob patterns, relative to a directory artifact, of the files its output
            fingerprint covers (default: every file below it).
        resumable: built in place (:meth:`building`, :meth:`complete`) instead of atomically.
        owned: content without a manifest is the caller's own leftover (stale), not a foreign
            directory (refused).
        describe: what "the same inputs" means here, for the skip message.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        stage: str,
        key: Mapping[str, Any],
        *,
        files: Sequence[str] | None = None,
        fingerprint: Sequence[str] | None = None,
        resumable: bool = False,
        owned: bool = False,
        describe: str = "the same inputs and settings",
    ) -> None:
        self.path = Path(path)
        self.stage = stage
        self.key = _plain(dict(key))
        self.files = None if files is None else tuple(files)
        if self.files is not None and self.path.name not in self.files:
            raise InputError(f"the files of {self.path} must include {self.path.name!r}")
        self.patterns = None if fingerprint is None else tuple(fingerprint)
        self.resumable = resumable
        self.owned = owned
        self.describe = describe
        self._t0: tuple[float, float] | None = None
        #: Content digests the stage computed while writing (:meth:`known_digest`).
        self._digests: dict[str, tuple[int, str]] = {}

    # --- where things are ------------------------------------------------------------------------

    @property
    def is_dir(self) -> bool:
        return self.files is None

    @property
    def manifest_path(self) -> Path:
        if self.is_dir:
            return self.path / MANIFEST_NAME
        return self.path.with_name(f"{self.path.name}.{MANIFEST_NAME}")

    def lock_path(self, slot: str | None = None) -> Path:
        suffix = "" if slot is None else f".{slot}"
        return self.path.with_name(f".{self.path.name}.lock{suffix}")

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or ``None`` if there is none (an unreadable one raises InputError)."""
        return read_json_object(self.manifest_path)

    def output_files(self, root: Path | None = None) -> list[Path]:
        """The files the output fingerprint covers (below ``root``, default the artifact)."""
        if not self.is_dir:
            base = root or self.path.parent
            return [base / n for n in self.files or () if (base / n).is_file()]
        base = root or self.path
        if not base.is_dir():
            return []
        if self.patterns is None:
            found = {p for p in base.rglob("*") if p.is_file()}
        else:
            found = {p for pat in self.patterns for p in base.glob(pat) if p.is_file()}
        return sorted(
            p
            for p in found
            if p.name != MANIFEST_NAME
            and not any(is_tmp_name(part) for part in p.relative_to(base).parts)
        )

    def known_digest(self, name: str, size: int, sha256: str) -> None:
        """Records the SHA-256 of an output file the stage just wrote (``name`` relative to the
        output), so that the output fingerprint does not read it again."""
        self._digests[name] = (int(size), str(sha256))

    def output_fingerprint(
        self, previous: Mapping[str, Any] | None = None, root: Path | None = None
    ) -> dict[str, Any]:
        files = self.output_files(root)
        base = root or (self.path if self.is_dir else self.path.parent)
        return fingerprint_files(files, root=base, previous=previous, digests=self._digests)

    # --- the decision ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, decision: Decision, slot: str | None = None) -> Iterator[Decision]:
        """Holds the exclusive lock on this output (``slot``: a worker's share of a resumable
        one) and yields the decision made again under it (another process may have changed the
        output since ``decision`` was made)."""
        from .io import exclusive_lock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        what = f"the {self.stage} output"
        with exclusive_lock(self.path, what, lock_file=self.lock_path(slot), remove=True):
            yield self.decide(decision.policy)

    def _has_content(self) -> bool:
        if not self.is_dir:
            return any((self.path.parent / n).exists() for n in self.files or ())
        if not self.path.exists():
            return False
        if not self.path.is_dir():
            raise InputError(f"{self.path} exists and is not a directory")
        return any(not is_tmp_name(p.name) for p in self.path.iterdir())

    def decide(self, on_stale: str) -> Decision:
        """The decision (module docstring). Raises :class:`StaleArtifactError` for a stale output
        with ``on_stale="refuse"``, :class:`InputError` for a directory that is not a fusellm
        output (or a file artifact's path that is a directory)."""
        on_stale = check_on_stale(on_stale)
        if not self.is_dir and self.path.is_dir():
            raise InputError(f"{self.path} is a directory; give a file path")
        if self.is_dir and self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.path} exists and is not a directory")
        try:
            manifest = self.read_manifest()
        except InputError as e:
            return self._stale(on_stale, None, ["manifest"], f"has an unreadable manifest ({e})")
        if manifest is None:
            if not self._has_content():
                return Decision("absent", on_stale)
            if self.is_dir and not self.owned:
                raise InputError(
                    f"{self.path} is not empty and holds no fusellm manifest: choose another "
                    "output directory"
                )
            return self._stale(on_stale, None, ["manifest"], "has no fusellm manifest")
        if manifest.get("stage") != self.stage:
            what = f"holds the output of stage {manifest.get('stage')!r}, not {self.stage!r}"
            return self._stale(on_stale, manifest, ["stage"], what)
        changed = _diff(manifest.get("key") or {}, self.key)
        if changed:
            return self._stale(on_stale, manifest, changed)
        if not manifest.get("complete"):
            if self.resumable:
                return Decision("resume", on_stale, manifest)
            return self._stale(on_stale, manifest, ["complete"], "is incomplete")
        return self._check_output(on_stale, manifest)

    def _check_output(self, on_stale: str, manifest: dict[str, Any]) -> Decision:
        recorded = manifest.get("output")
        if not isinstance(recorded, dict) or not recorded.get("sha256"):
            # Complete with this key, from before outputs were fingerprinted: record it now.
            manifest["output"] = self.output_fingerprint()
            atomic_write_json(self.manifest_path, manifest)
            return Decision("done", on_stale, manifest)
        try:
            fp = self.output_fingerprint(previous=recorded)
        except InputError as e:
            what = f"has unreadable files ({e})"
            return self._stale(on_stale, manifest, ["output"], what)
        if fp["sha256"] != recorded["sha256"]:
            what = "was changed after it was written (its files are not the recorded ones)"
            return self._stale(on_stale, manifest, ["output"], what)
        if fp != recorded:  # same content, new modification times: remember them
            manifest["output"] = fp
            atomic_write_json(self.manifest_path, manifest)
        return Decision("done", on_stale, manifest)

    def _stale(
        self,
        on_stale: str,
        manifest: dict[str, Any] | None,
        changed: list[str],
        what: str | None = None,
    ) -> Decision:
        """``changed``: the key fields that differ (or what else made it stale, ``what``)."""
        if what is None:
            what = f"was made from other inputs (differs in: {', '.join(changed)})"
        if on_stale == "refuse":
            raise StaleArtifactError(
                f"{self.path} {what}; choose another output or pass overwrite=True (--overwrite) "
                "to replace it"
            )
        logger.warning("%s %s: replacing it", self.path, what)
        return Decision("replace", on_stale, manifest, changed)

    def skipped(self) -> None:
        """Says that this output is up to date and was not rebuilt."""
        logger.info("%s is up to date (%s): skipped", self.path, self.describe)

    # --- atomic artifacts ------------------------------------------------------------------------

    def _manifest(self, fields: Mapping[str, Any], output: dict[str, Any], complete: bool) -> dict:
        manifest = {
            "stage": self.stage,
            "fusellm_version": fusellm_version(),
            **fields,
            "key": self.key,
            "complete": complete,
            "output": output,
        }
        if self._t0 is not None and complete:
            manifest["seconds"] = round(time.perf_counter() - self._t0[0], 3)
            manifest["cpu_seconds"] = round(time.process_time() - self._t0[1], 3)
        return manifest

    @contextlib.contextmanager
    def build(self, decision: Decision, fields: dict[str, Any]) -> Iterator[Path]:
        """Yields a temporary directory to build the output in (for a file artifact: to write its
        ``files`` into, by name); on success commits it with its manifest (``fields`` plus the
        stage, key, completion, output fingerprint and build seconds; the block may still fill
        ``fields``). On failure the old output is left as it was."""
        if decision.state not in ("absent", "replace"):
            raise FuseLLMError(f"{self.path}: cannot build an output that is {decision.state}")
        self._t0 = (time.perf_counter(), time.process_time())
        with self._locked(decision):
            if self.is_dir:
                with atomic_dir(self.path, overwrite=self.path.exists()) as tmp:
                    yield tmp
                    fp = self.output_fingerprint(root=tmp)
                    atomic_write_json(tmp / MANIFEST_NAME, self._manifest(fields, fp, True))
            else:
                with self._file_build(fields) as tmp:
                    yield tmp

    @contextlib.contextmanager
    def _file_build(self, fields: dict[str, Any]) -> Iterator[Path]:
        remove_stale_temporaries(self.path)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-build")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
            missing = [n for n in self.files or () if not (tmp / n).is_file()]
            if missing:
                raise FuseLLMError(f"{self.path}: the build wrote no {missing}")
            fp = self.output_fingerprint(root=tmp)
            self.manifest_path.unlink(missing_ok=True)  # a torn commit reads as stale
            for n in self.files or ():
                os.replace(tmp / n, self.path.parent / n)
            atomic_write_json(self.manifest_path, self._manifest(fields, fp, True))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # --- resumable artifacts ---------------------------------------------------------------------

    def clear(self) -> None:
        """Removes the output (every file of a file artifact; a directory's whole content)."""
        self.manifest_path.unlink(missing_ok=True)
        if not self.is_dir:
            for n in self.files or ():
                (self.path.parent / n).unlink(missing_ok=True)
        elif self.path.is_dir():
            for p in self.path.iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()

    @contextlib.contextmanager
    def building(
        self, decision: Decision, fields: Mapping[str, Any], *, slot: str | None = None
    ) -> Iterator[Decision]:
        """Builds a resumable output in place for the block, under its lock (``slot``: this
        worker's share): a replaced output is removed, an incomplete manifest (``fields``, the
        stage and the key) is written unless resuming, and what killed writers left inside is
        removed. Yields the decision made under the lock; the block calls :meth:`complete` when
        the output is whole."""
        if decision.state not in ("absent", "replace", "resume"):
            raise FuseLLMError(f"{self.path}: cannot build an output that is {decision.state}")
        with self._locked(decision, slot) as current:
            if current.state == "done":  # completed by another process meanwhile
                yield current
                return
            self._begin(current, fields)
            yield current

    def _begin(self, decision: Decision, fields: Mapping[str, Any]) -> None:
        self._t0 = (time.perf_counter(), time.process_time())
        if decision.state == "replace":
            self.clear()
        if self.is_dir:
            self.path.mkdir(parents=True, exist_ok=True)
            remove_dead_temporaries(self.path)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.path)
        current = self.read_manifest()
        if current is None or current.get("key") != self.key or current.get("stage") != self.stage:
            atomic_write_json(self.manifest_path, self._manifest(fields, {}, False))

    def complete(self, fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Completes a resumable output: its manifest (the one :meth:`building` wrote, updated with
        ``fields``) records completion and the output fingerprint. Returns the manifest."""
        current = self.read_manifest() or {}
        merged = {k: v for k, v in current.items() if k not in ("seconds", "cpu_seconds")}
        merged.update(fields or {})
        for k in ("stage", "fusellm_version", "key", "complete", "output"):
            merged.pop(k, None)
        manifest = self._manifest(merged, self.output_fingerprint(), True)
        if self._t0 is None:
            for k in ("seconds", "cpu_seconds"):
                if k in current:
                    manifest[k] = current[k]
        atomic_write_json(self.manifest_path, manifest)
        return manifest


def _plain(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), so keys compare equal."""
    import json

    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _manifest_of(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    p = Path(path)
    where = p / MANIFEST_NAME if p.is_dir() else p.with_name(f"{p.name}.{MANIFEST_NAME}")
    try:
        return read_json_object(where)
    except InputError:
        return None


def is_complete(path: str | os.PathLike[str], stage: str | None = None) -> bool:
    """Whether ``path`` holds a complete artifact (of ``stage``, when given)."""
    m = _manifest_of(path)
    return bool(m and m.get("complete") and (stage is None or m.get("stage") == stage))


def output_sha256(path: str | os.PathLike[str]) -> str:
    """The recorded output fingerprint of the complete artifact at ``path``."""
    m = _manifest_of(path)
    sha = ((m or {}).get("output") or {}).get("sha256") if m and m.get("complete") else None
    if not sha:
        raise FuseLLMError(f"{path} holds no complete fusellm output")
    return str(sha)


def build_seconds(path: str | os.PathLike[str]) -> tuple[float, float]:
    """The wall and CPU seconds the artifact at ``path`` took to build (0 when not recorded)."""
    m = _manifest_of(path) or {}
    return float(m.get("seconds") or 0.0), float(m.get("cpu_seconds") or 0.0)
