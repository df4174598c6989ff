//! The one error type of the core. Every variant names the offending value, so the bindings can
//! turn it into a Python exception whose message a user can act on. Bad input is always an
//! `Err`, never a panic.

use thiserror::Error;

/// Which side of an alignment a value belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Base,
    Blend,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Base => "base",
            Side::Blend => "blend",
        })
    }
}

/// Errors of the core kernels.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum Error {
    /// A value had the wrong type or shape: the message says which and why.
    #[error("{0}")]
    Shape(String),
    /// A value was out of its domain: the message names it.
    #[error("{0}")]
    Value(String),
    /// An empty sequence where at least one token is needed.
    #[error("sequence {seq}: the {side} sequence is empty (at least one token is needed)")]
    EmptySequence { seq: usize, side: Side },
    /// A token id that the vocabulary has no string for.
    #[error(
        "sequence {seq}: {side} token id {id} at position {pos} is outside the {side} vocabulary \
         (size {vocab_size}) or has no token string"
    )]
    UnknownId {
        seq: usize,
        side: Side,
        pos: usize,
        id: i64,
        vocab_size: usize,
    },
    /// A NaN or `+inf` logit in a top-K row (`-inf` is padding: no probability).
    #[error(
        "sequence {seq}: blend top-K logit at position {pos}, rank {rank} is {value}: logits \
         must be finite (or -inf for padding); NaN and +inf give no probability"
    )]
    BadLogit {
        seq: usize,
        pos: usize,
        rank: usize,
        value: f32,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Reserves room for `n` more elements, or fails with an error naming `what`: for buffers whose
/// size comes from input VALUES (offsets, sizes) rather than from data already in memory, so
/// that an absurd size is an error, not an abort.
pub fn try_reserve<T>(v: &mut Vec<T>, n: usize, what: &str) -> Result<()> {
    v.try_reserve_exact(n).map_err(|_| {
        Error::Value(format!(
            "{what} needs {n} elements of {} bytes: more memory than can be allocated",
            std::mem::size_of::<T>()
        ))
    })
}

impl Error {
    /// True when the error is about types and shapes (Python `TypeError`/`ValueError` split).
    pub fn is_shape(&self) -> bool {
        matches!(self, Error::Shape(_))
    }
}
