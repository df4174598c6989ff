# Hand-written stub of the Rust extension; checked by `python -m mypy.stubtest fusellm._native`.
from typing import final

import numpy as np
import numpy.typing as npt

__version__: str
_debug: bool
MAX_THREADS: int

def mined_base_to_blend(
    base_tokens: list[str],
    blend_tokens: list[str],
    base_marker: str,
    blend_marker: str,
) -> list[list[int]]: ...
def default_num_threads() -> int: ...
def teacher_sums(
    next_ids: npt.NDArray[np.int64],
    domains: npt.NDArray[np.int64],
    num_domains: int,
    vocab_size: int,
    logprobs: bool,
    ref_ids: npt.NDArray[np.int32],
    ref_values: npt.NDArray[np.float16] | npt.NDArray[np.float32],
    sources: list[
        tuple[
            npt.NDArray[np.int32],
            npt.NDArray[np.float16] | npt.NDArray[np.float32],
            npt.NDArray[np.uint8],
        ]
    ],
) -> tuple[list[list[float]], list[list[list[float]]]]: ...
def topk_mass(
    values: npt.NDArray[np.float16] | npt.NDArray[np.float32],
    ids: npt.NDArray[np.int32],
    known: npt.NDArray[np.bool_],
) -> tuple[float, float]: ...

@final
class Aligner:
    def __new__(
        cls,
        base_vocab: list[str | None],
        blend_vocab: list[str | None],
        base_marker: str,
        blend_marker: str,
        vocab_map: list[tuple[str, str]] | None,
        compat: bool,
        fallback: str,
    ) -> Aligner: ...
    @property
    def base_vocab_size(self) -> int: ...
    @property
    def blend_vocab_size(self) -> int: ...
    @property
    def compat(self) -> bool: ...
    @property
    def fallback(self) -> str: ...
    def targets(self, vocab: str) -> npt.NDArray[np.int32]: ...
    def align_batch(
        self,
        base_ids: list[npt.NDArray[np.int32]],
        blend_ids: list[npt.NDArray[np.int32]],
        topk_ids: list[npt.NDArray[np.int32]],
        topk_logits: list[npt.NDArray[np.float32]],
        base_offsets: list[npt.NDArray[np.int64]] | None,
        blend_offsets: list[npt.NDArray[np.int64]] | None,
        method: str,
        vocab: str,
        num_threads: int | None,
    ) -> list[
        tuple[
            npt.NDArray[np.int32],
            npt.NDArray[np.float32],
            npt.NDArray[np.uint8],
            int,
            int,
            int,
        ]
    ]: ...
    def align_flat(
        self,
        base_ids: npt.NDArray[np.int32],
        base_rows: npt.NDArray[np.int64],
        blend_ids: npt.NDArray[np.int32],
        blend_rows: npt.NDArray[np.int64],
        topk_ids: npt.NDArray[np.int32],
        topk_logits: npt.NDArray[np.float16] | npt.NDArray[np.float32],
        base_offsets: npt.NDArray[np.int64] | None,
        blend_offsets: npt.NDArray[np.int64] | None,
        method: str,
        vocab: str,
        num_threads: int | None,
        logits_dtype: str,
    ) -> tuple[
        npt.NDArray[np.int32],
        npt.NDArray[np.float16] | npt.NDArray[np.float32],
        npt.NDArray[np.uint8],
        dict[str, int | None],
    ]: ...

def build_vocab_map(
    base_vocab: list[str | None],
    blend_vocab: list[str | None],
    base_marker: str,
    blend_marker: str,
    method: str,
    num_threads: int | None,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.uint8], npt.NDArray[np.int32]]: ...
def describe_vocab_map(
    base_vocab: list[str | None],
    blend_vocab: list[str | None],
    base_marker: str,
    blend_marker: str,
    pairs: list[tuple[str, str]],
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.uint8], npt.NDArray[np.int32]]: ...
def nearest_brute_force(
    base_vocab: list[str | None],
    queries: list[str],
    num_threads: int | None,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]: ...
def nearest_indexed(
    base_vocab: list[str | None],
    queries: list[str],
    num_threads: int | None,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]: ...
def surface_bytes(token: str, marker: str) -> bytes | None: ...

@final
class PackPlan:
    def __new__(
        cls, row_offsets: npt.NDArray[np.int64], block_size: int, mode: str
    ) -> PackPlan: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def block_offsets(self) -> npt.NDArray[np.int64]: ...
    @property
    def block_segments(self) -> npt.NDArray[np.int64]: ...
    @property
    def segment_rows(self) -> npt.NDArray[np.int64]: ...
    @property
    def segment_starts(self) -> npt.NDArray[np.int64]: ...
    @property
    def segment_lengths(self) -> npt.NDArray[np.int64]: ...
    def gather_u8(self, src: npt.NDArray[np.uint8], width: int) -> npt.NDArray[np.uint8]: ...
    def gather_u16(self, src: npt.NDArray[np.uint16], width: int) -> npt.NDArray[np.uint16]: ...
    def gather_u32(self, src: npt.NDArray[np.uint32], width: int) -> npt.NDArray[np.uint32]: ...
    def gather_u64(self, src: npt.NDArray[np.uint64], width: int) -> npt.NDArray[np.uint64]: ...
    def block_means(self, scores: npt.NDArray[np.float64], nan: str) -> npt.NDArray[np.float64]: ...
    def position_ids(self) -> npt.NDArray[np.int32]: ...
