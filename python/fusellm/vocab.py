"""Vocabulary mapping: every source ("blend") token string to a target ("base") token.

The key of a blend token ``x`` is ``t``, ``x`` with the blend marker replaced by the base marker
(``Ġthe`` -> ``▁the``); the map covers the whole blend vocabulary. Three methods:

- ``method="exact"``: ``t`` itself when it is a base token, otherwise unmapped.
- ``method="mined"`` (the reference "default" map, spec section 5): ``t`` when it is a base
  token, otherwise the base token with the smallest Levenshtein distance to ``t`` over code
  points, markers included, ties to the lowest base id. Bit-identical to the brute-force
  definition, but answered by an exact index instead of ``|V_blend| x |V_base|`` distances:
  exact keys by hashing; strings within up to four edits from deletion neighbourhoods (every
  string within ``k`` edits shares a string with the query after at most ``k`` deletions on each
  side); the rest by a best-first search of a trie of the base vocabulary that carries one
  Levenshtein DP row per node and skips subtrees whose lower bound (from the row, the remaining
  lengths and the query characters absent below) cannot beat the best (distance, id) so far.
  Trade-off: the work per token grows with its distance to the base vocabulary; long tokens with
  no close match (code identifiers, CJK byte pieces) cost the most, and the deletion index takes
  memory (about 2.6 million keys for a 32k base vocabulary).
- ``method="surface"`` (recommended for new pipelines): compare what the tokens stand for, not
  how they are spelled. Both vocabularies are decoded to bytes (``Ġ`` vocabularies through the
  GPT-2 byte-to-unicode table, so ``Ċ`` is a newline and ``âĢĶ`` an em dash; ``▁`` vocabularies
  with ``▁`` as a space and byte-fallback pieces ``<0xHH>`` as the byte ``HH``). A blend token
  whose bytes equal those of a base token maps to it: among several, the base string equal to
  ``t``, else one that is not a ``<0xHH>`` piece, else the lowest id. Without a surface match,
  MinED as above. This fixes the reference's ``Ċ`` -> ``<0x0A>``-style misses (defect 3).
  Control tokens (``<s>``, ``<|endoftext|>``) are read literally.

The map is a function of ``t``, so it round-trips through the reference pipeline's mapping file,
a plain JSON object ``{t: base string}`` (:meth:`VocabMap.save` writes exactly that, loadable by
``json.load``). fusellm's own metadata (method, markers, statistics, a SHA-256 of each
vocabulary and of the map file) goes to a sidecar ``<path>.meta.json``, so the mapping file stays
exactly the reference format while :meth:`VocabMap.load` can refuse a map built for other
vocabularies (:class:`~fusellm.errors.StaleArtifactError`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from . import _native
from .checks import check_marker, check_num_threads, vocab_list
from .errors import InputError, InputTypeError, StaleArtifactError
from .io import atomic_write_bytes

__all__ = [
    "MAP_EXACT",
    "MAP_MINED",
    "MAP_SURFACE",
    "MAP_UNMAPPED",
    "VocabMap",
    "vocab_checksum",
]

#: The blend token has no target.
MAP_UNMAPPED = 0
#: Its marker-swapped string is a base token.
MAP_EXACT = 1
#: A different base string with the same decoded bytes (``method="surface"``).
MAP_SURFACE = 2
#: The nearest base string by edit distance (at least 1).
MAP_MINED = 3

MapMethod = Literal["exact", "mined", "surface"]
_METHODS = ("exact", "mined", "surface")
_FORMAT = "fusellm.vocab_map"
_VERSION = 1


def vocab_checksum(vocab: Sequence[str | None]) -> str:
    """SHA-256 (hex) of a vocabulary: every id's string in id order, ``None`` included."""
    h = hashlib.sha256()
    h.update(len(vocab).to_bytes(8, "little"))
    for s in vocab:
        if s is None:
            h.update(b"\xff" * 8)
        else:
            b = s.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


#: The sidecar's keys and what each holds (a corrupt file is refused naming the key).
_META_KEYS: dict[str, Any] = {
    "method": str,
    "base_marker": str,
    "blend_marker": str,
    "map_sha256": str,
    "base_vocab": dict,
    "blend_vocab": dict,
}


def _check_meta(meta: dict[str, Any], path: Path) -> None:
    for key, kind in _META_KEYS.items():
        if not isinstance(meta.get(key), kind):
            raise StaleArtifactError(
                f"{path} is not a valid fusellm vocabulary-map sidecar: {key!r} must be a "
                f"{kind.__name__}, got {meta.get(key)!r}: rebuild the map"
            )
    cap = meta.get("max_distance")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise StaleArtifactError(f"{path}: 'max_distance' must be a positive int or null")


def _check_max_distance(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"max_distance must be a positive int or None, got {value!r}")
    return value


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


class VocabMap:
    """A map from every blend token to a base token (see the module docstring).

    Build one with :meth:`build`, read one with :meth:`load` (fusellm files) or :meth:`from_dict`
    (a reference mapping such as ``json.load(open("blending_to_base_mapping.json"))``), and pass
    it to :class:`fusellm.Aligner` as ``vocab_map``.

    Attributes:
        base_ids: ``int32 [len(blend_vocab)]`` base id per blend id (``-1``: unmapped).
        kinds: ``uint8`` per blend id: :data:`MAP_UNMAPPED`, :data:`MAP_EXACT`,
            :data:`MAP_SURFACE` or :data:`MAP_MINED`.
        distances: ``int32`` Levenshtein distance between the key and its target (``-1``:
            unmapped).
        method: ``"exact"``, ``"mined"``, ``"surface"``, or ``"imported"`` (:meth:`from_dict`).
        max_distance: the cap on edit-distance mappings it was built with (``None``: no cap).
    """

    def __init__(
        self,
        base_vocab: list[str | None],
        blend_vocab: list[str | None],
        base_marker: str,
        blend_marker: str,
        method: str,
        arrays: tuple[npt.NDArray[np.int32], npt.NDArray[np.uint8], npt.NDArray[np.int32]],
    ) -> None:
        self._base_vocab = base_vocab
        self._blend_vocab = blend_vocab
        self.base_marker = base_marker
        self.blend_marker = blend_marker
        self.method = method
        base_ids, kinds, distances = arrays
        for a in (base_ids, kinds, distances):
            a.flags.writeable = False
        self.base_ids = base_ids
        self.kinds = kinds
        self.distances = distances
        self._dict: dict[str, str] | None = None
        self._checksums: tuple[str, str] | None = None
        self._content_sha256: str | None = None
        self.max_distance: int | None = None

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        base_vocab: Sequence[str | None],
        blend_vocab: Sequence[str | None],
        *,
        base_marker: str,
        blend_marker: str,
        method: MapMethod = "mined",
        num_threads: int | None = None,
        max_distance: int | None = None,
    ) -> VocabMap:
        """Maps every blend token onto the base vocabulary.

        Args:
            base_vocab: the string of every base id, in id order (``None`` for ids without one).
            blend_vocab: the same for the blend tokenizer.
            base_marker: the base tokenizer's word-boundary marker (``"▁"`` or ``"Ġ"``).
            blend_marker: the blend tokenizer's marker.
            method: ``"exact"``, ``"mined"`` (reference) or ``"surface"`` (module docstring).
            num_threads: worker threads (default: ``FUSELLM_NUM_THREADS`` or all cores); the
                result does not depend on it. The interpreter is released during the work.
            max_distance: leave unmapped every token whose nearest base string is more than
                this many edits away (``None``: no cap). A far-fetched neighbour (Qwen's long
                code tokens reach distance 112 on Mistral's vocabulary) names another token;
                unmapped, the entry's probability goes to the row's tail instead.
        """
        if method not in _METHODS:
            raise InputError(f"method must be one of {list(_METHODS)}, got {method!r}")
        base = vocab_list(base_vocab, "base_vocab")
        blend = vocab_list(blend_vocab, "blend_vocab")
        bm = check_marker(base_marker, "base_marker")
        xm = check_marker(blend_marker, "blend_marker")
        cap = _check_max_distance(max_distance)
        base_ids, kinds, distances = _native.build_vocab_map(
            base, blend, bm, xm, method, check_num_threads(num_threads)
        )
        if cap is not None:
            far = (kinds == MAP_MINED) & (distances > cap)
            base_ids[far], kinds[far], distances[far] = -1, MAP_UNMAPPED, -1
        vm = cls(base, blend, bm, xm, method, (base_ids, kinds, distances))
        vm.max_distance = cap
        return vm

    @classmethod
    def from_dict(
        cls,
        mapping: Mapping[str, str],
        base_vocab: Sequence[str | None],
        blend_vocab: Sequence[str | None],
        *,
        base_marker: str,
        blend_marker: str,
    ) -> VocabMap:
        """Wraps an existing ``{t: base string}`` map (e.g. the reference pipeline's file).

        Keys that are not the key of any blend token are ignored; blend tokens whose key is
        missing are unmapped; a value that is not a base token is an :class:`InputError`.
        """
        if not isinstance(mapping, Mapping):
            raise InputTypeError(f"mapping must be a dict, got {type(mapping).__name__}")
        pairs = list(mapping.items())
        for k, v in pairs:
            if not isinstance(k, str) or not isinstance(v, str):
                raise InputTypeError(f"mapping must map str to str, got {k!r}: {v!r}")
        base = vocab_list(base_vocab, "base_vocab")
        blend = vocab_list(blend_vocab, "blend_vocab")
        bm = check_marker(base_marker, "base_marker")
        xm = check_marker(blend_marker, "blend_marker")
        arrays = _native.describe_vocab_map(base, blend, bm, xm, pairs)
        return cls(base, blend, bm, xm, "imported", arrays)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        base_vocab: Sequence[str | None],
        blend_vocab: Sequence[str | None],
    ) -> VocabMap:
        """Reads a map written by :meth:`save`, for the vocabularies it will be used with.

        Raises:
            StaleArtifactError: the sidecar ``<path>.meta.json`` is missing or unreadable, the
                map file changed after the sidecar was written, or either vocabulary differs
                from the one the map was built for (different checksum).
        """
        path = Path(path)
        meta_path = _meta_path(path)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StaleArtifactError(
                f"{path} has no fusellm metadata ({meta_path.name}); to use a reference mapping "
                "file, pass json.load(...) to VocabMap.from_dict"
            ) from None
        except (OSError, ValueError) as e:
            raise StaleArtifactError(f"cannot read {meta_path}: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise StaleArtifactError(f"{meta_path} is not a fusellm vocabulary-map sidecar")
        if meta.get("version") != _VERSION:
            raise StaleArtifactError(
                f"{meta_path} has format version {meta.get('version')!r}; this fusellm reads "
                f"version {_VERSION}: rebuild the map"
            )
        _check_meta(meta, meta_path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise StaleArtifactError(f"cannot read {path}: {e}") from e
        if hashlib.sha256(raw).hexdigest() != meta.get("map_sha256"):
            raise StaleArtifactError(
                f"{path} changed after its metadata was written (checksum mismatch): rebuild "
                "the map or save it again"
            )
        base = vocab_list(base_vocab, "base_vocab")
        blend = vocab_list(blend_vocab, "blend_vocab")
        sums = []
        for side, vocab in (("base", base), ("blend", blend)):
            want = meta.get(f"{side}_vocab", {})
            got = vocab_checksum(vocab)
            sums.append(got)
            if got != want.get("sha256"):
                raise StaleArtifactError(
                    f"{path} was built for a different {side} vocabulary ({want.get('size')} "
                    f"entries, sha256 {str(want.get('sha256'))[:12]}...) than the one given "
                    f"({len(vocab)} entries, sha256 {got[:12]}...): rebuild the map"
                )
        try:
            mapping = json.loads(raw.decode("utf-8"))
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError
            raise StaleArtifactError(f"{path} is not a JSON vocabulary map: {e}") from None
        if not isinstance(mapping, dict):
            raise StaleArtifactError(
                f"{path} holds a JSON {type(mapping).__name__}, not a map of token strings"
            )
        vm = cls.from_dict(
            mapping,
            base,
            blend,
            base_marker=meta["base_marker"],
            blend_marker=meta["blend_marker"],
        )
        vm.method = str(meta.get("method", "imported"))
        vm.max_distance = meta.get("max_distance")
        vm._checksums = (sums[0], sums[1])  # verified above
        vm._content_sha256 = meta["map_sha256"]  # the bytes read, which the map round-trips
        return vm

    # -- output ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, str]:
        """The reference JSON content: marker-swapped blend string -> base string.

        Keys appear in blend id order; unmapped blend tokens are absent.
        """
        if self._dict is None:
            base, bm, xm = self._base_vocab, self.base_marker, self.blend_marker
            out: dict[str, str] = {}
            for x, b in zip(self._blend_vocab, self.base_ids.tolist(), strict=True):
                if x is None or b < 0:
                    continue
                t = x.replace(xm, bm) if xm != bm else x
                if t not in out:
                    y = base[b]
                    assert y is not None
                    out[t] = y
            self._dict = out
        return dict(self._dict)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes ``path`` (the reference JSON object) and ``<path>.meta.json`` atomically.

        Each file is written under a temporary name and renamed into place; the sidecar holds a
        checksum of the map file, so a crash between the two renames is detected by
        :meth:`load`.
        """
        path = Path(path)
        data = self._content()
        self._content_sha256 = hashlib.sha256(data).hexdigest()
        base_sum, blend_sum = self.checksums
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "method": self.method,
            "max_distance": self.max_distance,
            "base_marker": self.base_marker,
            "blend_marker": self.blend_marker,
            "base_vocab": {"size": len(self._base_vocab), "sha256": base_sum},
            "blend_vocab": {"size": len(self._blend_vocab), "sha256": blend_sum},
            "map_sha256": self.content_sha256,
            "stats": self.stats(),
        }
        atomic_write_bytes(path, data)
        atomic_write_bytes(
            _meta_path(path),
            json.dumps(meta, ensure_ascii=False, indent=2).encode("utf-8"),
        )

    def _content(self) -> bytes:
        """The map file's bytes, as :meth:`save` writes them."""
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=0).encode("utf-8")

    @property
    def content_sha256(self) -> str:
        """SHA-256 of the map file's content (:meth:`save`'s, recorded in its sidecar)."""
        if self._content_sha256 is None:
            self._content_sha256 = hashlib.sha256(self._content()).hexdigest()
        return self._content_sha256

    @property
    def checksums(self) -> tuple[str, str]:
        """:func:`vocab_checksum` of the base and of the blend vocabulary."""
        if self._checksums is None:
            self._checksums = (
                vocab_checksum(self._base_vocab),
                vocab_checksum(self._blend_vocab),
            )
        return self._checksums

    def stats(self) -> dict[str, Any]:
        """Counts over blend ids: ``exact``, ``surface``, ``mined`` (with ``by_distance``, the
        mined tokens per edit distance), ``unmapped``, and ``blend_tokens`` in total."""
        kinds = np.bincount(self.kinds, minlength=4)
        mined = self.distances[self.kinds == MAP_MINED]
        d, n = np.unique(mined, return_counts=True)
        return {
            "blend_tokens": len(self._blend_vocab),
            "exact": int(kinds[MAP_EXACT]),
            "surface": int(kinds[MAP_SURFACE]),
            "mined": int(kinds[MAP_MINED]),
            "by_distance": {str(int(k)): int(v) for k, v in zip(d, n, strict=True)},
            "unmapped": int(kinds[MAP_UNMAPPED]),
        }

    # -- dict-like access -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._mapping())

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping())

    def __contains__(self, key: object) -> bool:
        return key in self._mapping()

    def __getitem__(self, key: str) -> str:
        return self._mapping()[key]

    def _mapping(self) -> dict[str, str]:
        if self._dict is None:
            self.to_dict()
        assert self._dict is not None
        return self._dict

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"VocabMap(method={self.method!r}, blend_tokens={s['blend_tokens']}, "
            f"exact={s['exact']}, surface={s['surface']}, mined={s['mined']}, "
            f"unmapped={s['unmapped']})"
        )
