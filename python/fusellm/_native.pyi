# Hand-written stub of the Rust extension; checked against it by `python -m mypy.stubtest fusellm._native`.
from typing import final

import numpy as np
import numpy.typing as npt

__version__: str
_debug: bool

def mined_base_to_blend(
    base_tokens: list[str],
    blend_tokens: list[str],
    base_marker: str,
    blend_marker: str,
) -> list[list[int]]: ...
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
        ]
    ]: ...
