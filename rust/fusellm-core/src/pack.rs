//! Packing rows (documents) into fixed-size training blocks.
//!
//! Rows arrive as flat per-token columns plus row offsets (`row r` is tokens
//! `offsets[r]..offsets[r + 1]`). A [`PackPlan`] describes every block as a list of segments (a row
//! and a token range inside it); every per-token column is then cut with the same plan
//! ([`PackPlan::gather`]), every per-row score becomes its token-weighted block mean
//! ([`PackPlan::block_means`]).
//!
//! Two plans:
//!
//! - [`PackMode::Concat`], the reference packing (spec section 2, stage 4): rows are
//!   concatenated in order and cut every `block_size` tokens; the last, shorter block is kept. A
//!   row can span two blocks, and a block mixes documents without any boundary, so attention
//!   crosses documents. Output tokens are the input tokens, in order; O(rows + blocks) planning,
//!   then one contiguous copy per column.
//! - [`PackMode::Bfd`]: best-fit decreasing bin packing that never splits a row: rows are taken
//!   longest first (ties: lower row first) and each goes to the open block with the least room
//!   that still fits it (ties: the older block). O(rows · log blocks). Best fit decreasing is not
//!   guaranteed to beat first fit on every input, so first fit in row order is computed too and
//!   kept in the rare case it needs fewer blocks: the plan never uses more blocks than either.
//!   Inside a block, rows keep their input order; blocks are ordered by their first row.
//!   [`PackPlan::position_ids`] restart at 0 at every row, so attention can be kept inside
//!   documents. Rows longer than `block_size` are an error (split them first: stage 1 does).
//!
//! Empty rows carry no tokens and no score weight; they appear in no segment.

use crate::error::{try_reserve, Error, Result};
use std::collections::BTreeSet;

/// How rows are packed into blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackMode {
    /// The reference: concatenate, cut every `block_size` tokens, keep the remainder.
    Concat,
    /// Best-fit decreasing, rows never split (first fit if that needs fewer blocks).
    Bfd,
}

/// What a NaN score does to its block's mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NanScores {
    /// The block mean is NaN (what the reference's arithmetic gives).
    Propagate,
    /// NaN rows are left out of the mean (NaN only if every row of the block is NaN).
    Omit,
}

/// Blocks as segments of rows. Segment `s` is tokens `seg_start[s]..seg_start[s] + seg_len[s]`
/// of row `seg_row[s]` (start relative to the row); block `b` is segments
/// `block_segs[b]..block_segs[b + 1]` and output tokens `block_offsets[b]..block_offsets[b + 1]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackPlan {
    pub block_offsets: Vec<i64>,
    pub block_segs: Vec<i64>,
    pub seg_row: Vec<i64>,
    pub seg_start: Vec<i64>,
    pub seg_len: Vec<i64>,
    /// The input row offsets (validated).
    pub row_offsets: Vec<i64>,
}

/// Checks row offsets: at least one entry, starting at 0, non-decreasing.
pub fn validate_row_offsets(offsets: &[i64]) -> Result<()> {
    if offsets.is_empty() {
        return Err(Error::Shape(
            "offsets must hold num_rows + 1 entries (at least [0])".to_string(),
        ));
    }
    if offsets[0] != 0 {
        return Err(Error::Value(format!(
            "offsets must start at 0, got {}",
            offsets[0]
        )));
    }
    if let Some(r) = offsets.windows(2).position(|w| w[1] < w[0]) {
        return Err(Error::Value(format!(
            "offsets must be non-decreasing: row {r} ends at {} before it starts at {}",
            offsets[r + 1],
            offsets[r]
        )));
    }
    Ok(())
}

impl PackPlan {
    /// Plans the blocks of rows given by `row_offsets` (`num_rows + 1` entries, from 0,
    /// non-decreasing).
    pub fn new(row_offsets: &[i64], block_size: usize, mode: PackMode) -> Result<Self> {
        validate_row_offsets(row_offsets)?;
        if block_size == 0 || block_size > i64::MAX as usize {
            return Err(Error::Value(format!(
                "block_size must be a positive integer, got {block_size}"
            )));
        }
        let bs = block_size as i64;
        let mut plan = PackPlan {
            block_offsets: vec![0],
            block_segs: vec![0],
            seg_row: Vec::new(),
            seg_start: Vec::new(),
            seg_len: Vec::new(),
            row_offsets: row_offsets.to_vec(),
        };
        let lens: Vec<i64> = row_offsets.windows(2).map(|w| w[1] - w[0]).collect();
        // The plan's size comes from the offsets' VALUES (blocks = tokens / block_size), not
        // from data in memory: it is reserved up front, fallibly, before anything is planned.
        let rows = lens.iter().filter(|&&l| l > 0).count();
        let total = *row_offsets.last().unwrap_or(&0);
        let blocks = match mode {
            PackMode::Concat => (total as u64).div_ceil(bs as u64) as usize,
            PackMode::Bfd => rows,
        };
        let segs = match mode {
            PackMode::Concat => rows.saturating_add(blocks),
            PackMode::Bfd => rows,
        };
        let what = format!(
            "packing {total} tokens in {} rows into blocks of {bs}",
            lens.len()
        );
        try_reserve(&mut plan.block_offsets, blocks, &what)?;
        try_reserve(&mut plan.block_segs, blocks, &what)?;
        for v in [&mut plan.seg_row, &mut plan.seg_start, &mut plan.seg_len] {
            try_reserve(v, segs, &what)?;
        }
        match mode {
            PackMode::Concat => {
                let mut filled = 0i64; // tokens in the open block
                for (r, &len) in lens.iter().enumerate() {
                    let mut start = 0i64;
                    while start < len {
                        let take = (len - start).min(bs - filled);
                        plan.push_seg(r, start, take);
                        start += take;
                        filled += take;
                        if filled == bs {
                            plan.close_block();
                            filled = 0;
                        }
                    }
                }
                if filled > 0 {
                    plan.close_block();
                }
                debug_assert_eq!(*plan.block_offsets.last().unwrap_or(&0), total);
            }
            PackMode::Bfd => {
                if let Some(r) = lens.iter().position(|&l| l > bs) {
                    return Err(Error::Value(format!(
                        "row {r} has {} tokens, more than block_size {block_size}; the \
                         best-fit-decreasing mode never splits a row (split long documents \
                         first, or use mode=\"concat\")",
                        lens[r]
                    )));
                }
                let bfd = best_fit_decreasing(&lens, bs);
                let ff = first_fit(&lens, bs);
                let bins = if ff.len() < bfd.len() { ff } else { bfd };
                let mut bins: Vec<Vec<usize>> = bins
                    .into_iter()
                    .map(|mut rows| {
                        rows.sort_unstable();
                        rows
                    })
                    .collect();
                bins.sort_unstable_by_key(|rows| rows[0]);
                for rows in bins {
                    for r in rows {
                        plan.push_seg(r, 0, lens[r]);
                    }
                    plan.close_block();
                }
            }
        }
        Ok(plan)
    }

    fn push_seg(&mut self, row: usize, start: i64, len: i64) {
        self.seg_row.push(row as i64);
        self.seg_start.push(start);
        self.seg_len.push(len);
    }

    fn close_block(&mut self) {
        let segs = self.block_segs.last().copied().unwrap_or(0) as usize;
        let tokens: i64 = self.seg_len[segs..].iter().sum();
        let last = self.block_offsets.last().copied().unwrap_or(0);
        self.block_offsets.push(last + tokens);
        self.block_segs.push(self.seg_row.len() as i64);
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.block_offsets.len() - 1
    }

    /// Number of tokens in all blocks (the input tokens of non-empty rows).
    pub fn num_tokens(&self) -> usize {
        *self.block_offsets.last().unwrap_or(&0) as usize
    }

    /// Cuts one per-token column with the plan: `src` holds `width` values per input token
    /// (row-major), the result `width` values per output token.
    pub fn gather<T: Copy + Default>(&self, src: &[T], width: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); self.num_tokens() * width];
        self.gather_into(src, width, &mut out)?;
        Ok(out)
    }

    /// [`PackPlan::gather`] into a caller-provided buffer of `num_tokens() * width` values.
    /// Checks that a column of `src_len` values holds `width` values per token of the rows;
    /// returns the number of values the blocks need (no allocation, no overflow).
    pub fn check_column(&self, src_len: usize, width: usize) -> Result<usize> {
        let total = *self.row_offsets.last().unwrap_or(&0) as usize;
        if total.checked_mul(width) != Some(src_len) {
            return Err(Error::Shape(format!(
                "a column holds {src_len} values, but the rows hold {total} tokens x {width} \
                 values per token"
            )));
        }
        // src_len = total * width did not overflow and num_tokens <= total
        Ok(self.num_tokens() * width)
    }

    pub fn gather_into<T: Copy>(&self, src: &[T], width: usize, out: &mut [T]) -> Result<()> {
        self.check_column(src.len(), width)?;
        if out.len() != self.num_tokens() * width {
            return Err(Error::Shape(format!(
                "the output buffer holds {} values, the blocks need {}",
                out.len(),
                self.num_tokens() * width
            )));
        }
        let mut s = 0;
        let mut at = 0;
        while s < self.seg_row.len() {
            // Merge runs of segments that are contiguous in the input (all of them in Concat).
            let begin = (self.row_offsets[self.seg_row[s] as usize] + self.seg_start[s]) as usize;
            let mut end = begin + self.seg_len[s] as usize;
            s += 1;
            while s < self.seg_row.len()
                && (self.row_offsets[self.seg_row[s] as usize] + self.seg_start[s]) as usize == end
            {
                end += self.seg_len[s] as usize;
                s += 1;
            }
            let n = (end - begin) * width;
            out[at..at + n].copy_from_slice(&src[begin * width..end * width]);
            at += n;
        }
        Ok(())
    }

    /// Token-weighted mean of a per-row score over every block, accumulated in segment order
    /// in `f64`: `sum(len_s * score[row_s]) / sum(len_s)`.
    pub fn block_means(&self, scores: &[f64], nan: NanScores) -> Result<Vec<f64>> {
        let rows = self.row_offsets.len() - 1;
        if scores.len() != rows {
            return Err(Error::Shape(format!(
                "a score column holds {} values for {rows} rows",
                scores.len()
            )));
        }
        Ok(self
            .block_segs
            .windows(2)
            .map(|w| {
                let (mut num, mut den) = (0.0f64, 0.0f64);
                for s in w[0] as usize..w[1] as usize {
                    let v = scores[self.seg_row[s] as usize];
                    if nan == NanScores::Omit && v.is_nan() {
                        continue;
                    }
                    let len = self.seg_len[s] as f64;
                    num += len * v;
                    den += len;
                }
                if den == 0.0 {
                    f64::NAN
                } else {
                    num / den
                }
            })
            .collect())
    }

    /// Position of every output token inside its segment (0 at the start of every row piece).
    pub fn position_ids(&self) -> Result<Vec<i32>> {
        let mut out = Vec::new();
        try_reserve(&mut out, self.num_tokens(), "position_ids")?;
        for &len in &self.seg_len {
            out.extend(0..len as i32);
        }
        Ok(out)
    }
}

/// Best-fit decreasing: rows by decreasing length (ties: lower row), each into the open bin with
/// the least room that fits it (ties: the older bin). Returns the rows of every bin.
fn best_fit_decreasing(lens: &[i64], cap: i64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).filter(|&r| lens[r] > 0).collect();
    order.sort_by_key(|&r| (std::cmp::Reverse(lens[r]), r));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    let mut room: BTreeSet<(i64, usize)> = BTreeSet::new();
    for r in order {
        let len = lens[r];
        match room.range((len, 0)..).next().copied() {
            Some((left, b)) => {
                room.remove(&(left, b));
                bins[b].push(r);
                if left - len > 0 {
                    room.insert((left - len, b));
                }
            }
            None => {
                bins.push(vec![r]);
                if cap - len > 0 {
                    room.insert((cap - len, bins.len() - 1));
                }
            }
        }
    }
    bins
}

/// First fit in row order: each row into the oldest bin that fits it. A segment tree over the
/// bins' free room finds that bin in O(log bins).
fn first_fit(lens: &[i64], cap: i64) -> Vec<Vec<usize>> {
    let n = lens.iter().filter(|&&l| l > 0).count().max(1);
    let size = n.next_power_of_two();
    let mut tree = vec![0i64; 2 * size]; // max free room per subtree; unopened bins have 0
    let mut bins: Vec<Vec<usize>> = Vec::new();
    for (r, &len) in lens.iter().enumerate() {
        if len == 0 {
            continue;
        }
        let b = if tree[1] >= len {
            let mut i = 1;
            while i < size {
                i = if tree[2 * i] >= len { 2 * i } else { 2 * i + 1 };
            }
            i - size
        } else {
            bins.push(Vec::new());
            let b = bins.len() - 1;
            tree[size + b] = cap;
            b
        };
        bins[b].push(r);
        let mut i = size + b;
        tree[i] -= len;
        while i > 1 {
            i /= 2;
            tree[i] = tree[2 * i].max(tree[2 * i + 1]);
        }
    }
    bins
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn offsets(lens: &[i64]) -> Vec<i64> {
        let mut o = vec![0];
        for l in lens {
            o.push(o.last().unwrap() + l);
        }
        o
    }

    #[test]
    fn concat_cuts_and_keeps_the_remainder() {
        let o = offsets(&[3, 0, 5, 2]);
        let p = PackPlan::new(&o, 4, PackMode::Concat).unwrap();
        assert_eq!(p.block_offsets, vec![0, 4, 8, 10]);
        assert_eq!(p.seg_row, vec![0, 2, 2, 3]);
        assert_eq!(p.seg_start, vec![0, 0, 1, 0]);
        assert_eq!(p.seg_len, vec![3, 1, 4, 2]);
        let src: Vec<i32> = (0..20).collect();
        assert_eq!(p.gather(&src, 2).unwrap(), src);
        let m = p
            .block_means(&[1.0, 9.0, 2.0, 4.0], NanScores::Propagate)
            .unwrap();
        assert_eq!(m, vec![1.25, 2.0, 4.0]);
    }

    #[test]
    fn bfd_never_splits_and_restarts_positions() {
        let o = offsets(&[3, 5, 2, 4]);
        let p = PackPlan::new(&o, 7, PackMode::Bfd).unwrap();
        assert_eq!(p.num_blocks(), 2);
        assert_eq!(p.num_tokens(), 14);
        // longest first: 5 -> bin A, 4 -> bin B, 3 -> bin B, 2 -> bin A; rows keep their order
        // inside a bin, bins are ordered by their first row.
        assert_eq!(p.seg_row, vec![0, 3, 1, 2]);
        assert_eq!(
            p.position_ids().unwrap(),
            vec![0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1]
        );
        let src: Vec<i32> = (0..14).collect();
        assert_eq!(
            p.gather(&src, 1).unwrap(),
            vec![0, 1, 2, 10, 11, 12, 13, 3, 4, 5, 6, 7, 8, 9]
        );
        // first fit in row order would need 3 blocks here
        assert_eq!(first_fit(&[3, 5, 2, 4], 7).len(), 3);
        assert!(PackPlan::new(&o, 4, PackMode::Bfd).is_err());
    }

    #[test]
    fn bad_offsets_and_shapes() {
        assert!(PackPlan::new(&[], 4, PackMode::Concat).is_err());
        assert!(PackPlan::new(&[1, 2], 4, PackMode::Concat).is_err());
        assert!(PackPlan::new(&[0, 2, 1], 4, PackMode::Concat).is_err());
        assert!(PackPlan::new(&[0, 2], 0, PackMode::Concat).is_err());
        let p = PackPlan::new(&[0, 2], 4, PackMode::Concat).unwrap();
        assert!(p.gather(&[1i32, 2, 3], 1).is_err());
        assert!(p.block_means(&[1.0, 2.0], NanScores::Omit).is_err());
        let e = PackPlan::new(&[0], 4, PackMode::Bfd).unwrap();
        assert_eq!(e.num_blocks(), 0);
    }

    #[test]
    fn absurd_sizes_are_errors_not_aborts() {
        // 10^18 tokens in blocks of one: more blocks than memory can hold.
        let e = PackPlan::new(&[0, 1_000_000_000_000_000_000], 1, PackMode::Concat).unwrap_err();
        assert!(
            e.to_string().contains("more memory than can be allocated"),
            "{e}"
        );
        // One row of 10^18 tokens, whole: a plan of one block, but no room for its positions.
        let big = 1_000_000_000_000_000_000i64;
        let p = PackPlan::new(&[0, big], big as usize, PackMode::Bfd).unwrap();
        assert!(p.position_ids().is_err());
    }

    #[test]
    fn nan_policies() {
        let p = PackPlan::new(&offsets(&[2, 2]), 4, PackMode::Concat).unwrap();
        let s = [f64::NAN, 3.0];
        assert!(p.block_means(&s, NanScores::Propagate).unwrap()[0].is_nan());
        assert_eq!(p.block_means(&s, NanScores::Omit).unwrap(), vec![3.0]);
    }

    proptest! {
        #[test]
        fn plans_cover_every_token_once(
            lens in proptest::collection::vec(0i64..20, 0..40),
            bs in 1usize..25,
        ) {
            let o = offsets(&lens);
            let total = *o.last().unwrap() as usize;
            let src: Vec<u32> = (0..total as u32).collect();
            let c = PackPlan::new(&o, bs, PackMode::Concat).unwrap();
            prop_assert_eq!(c.gather(&src, 1).unwrap(), src.clone());
            prop_assert!(c.block_offsets.windows(2).all(|w| w[1] - w[0] <= bs as i64 && w[1] > w[0]));
            if lens.iter().all(|&l| l <= bs as i64) {
                let b = PackPlan::new(&o, bs, PackMode::Bfd).unwrap();
                let mut got = b.gather(&src, 1).unwrap();
                got.sort_unstable();
                prop_assert_eq!(got, src);
                prop_assert!(b.block_offsets.windows(2).all(|w| w[1] - w[0] <= bs as i64));
                prop_assert!(b.num_blocks() <= first_fit(&lens, bs as i64).len());
                prop_assert!(b.num_blocks() <= best_fit_decreasing(&lens, bs as i64).len());
            }
        }
    }
}
