//! fusellm-core: the CPU kernels of FuseLLM knowledge fusion, in pure Rust.
//!
//! - [`levenshtein`]: edit distance over code points (bit-parallel).
//! - [`dtw`]: exact, pruned MinED dynamic time warping between token sequences.
//! - [`offsets`]: linear-time alignment by shared end offsets.
//! - [`aligner`]: re-expression of top-K distributions on the target's tokens and vocabulary.
//! - [`batch`]: fork-safe rayon pools and batch entry points.
//! - [`flat`]: ragged batches in flat buffers (values + row offsets), as a stage reads them.
//! - [`vocab_map`]: exact MinED / surface vocabulary maps.
//! - [`pack`]: packing rows into training blocks (reference concat, best-fit decreasing).
//! - [`logit`]: stored row values (`f32`, `f16`) and their conversions.
//! - [`scores`]: next-token scores of top-K rows (the teacher diagnostics of alignment).
//!
//! No Python here: the bindings live in `fusellm-py`.

pub mod aligner;
pub mod batch;
pub mod dtw;
pub mod error;
pub mod flat;
pub mod levenshtein;
pub mod logit;
pub mod offsets;
pub mod pack;
mod prefetch;
pub mod scores;
pub mod vocab_map;

pub use aligner::{Aligner, Fallback, Method, SeqInput, SeqOutput, Vocab, VocabMode};
pub use dtw::{mined_base_to_blend, Alignment};
pub use error::{Error, Result, Side};
pub use flat::{align_flat, BatchCounts, FlatBatch, FlatOutput};
pub use logit::{f16, narrow_f16, widen, Logit};
pub use pack::{NanScores, PackMode, PackPlan};
pub use scores::{teacher_sums, topk_mass, Rows, ScoreRows, Source, Sums, TeacherSums};
pub use vocab_map::{build_vocab_map, MapMethod, NearestIndex, VocabMapping};
