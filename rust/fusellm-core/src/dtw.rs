//! MinED dynamic time warping between two token sequences, exact and pruned.
//!
//! The reference definition (blend tokens `x`, base tokens `y`, `c(i, j)` the Levenshtein distance
//! between the marker-stripped strings):
//!
//! ```text
//! D[-1][-1] = 0, D[-1][j] = D[i][-1] = +inf otherwise
//! D[i][j]   = c(i, j) + min(D[i-1][j], D[i][j-1], D[i-1][j-1])
//! ```
//!
//! followed by a backtrack from `(n-1, m-1)` that moves to the smallest of diag, up, left (ties in
//! that order) and finally records `(0, 0)`.
//!
//! Three things make it fast without changing a single output bit:
//! - tokens are interned, so each distinct pair of strings is measured once, all pairs up front
//!   by the vectorized all-pairs kernel of [`crate::levenshtein::AllPairs`] (lazily, pair by
//!   pair, when there are more than 2^24 pairs);
//! - an upper bound `U` is taken from a valid warping path built from cumulative character counts
//!   (tight when both sides tokenized the same text);
//! - cells whose value exceeds `U` are treated as `+inf` (PrunedDTW, Silva and Batista 2016). Every
//!   cell on an optimal path has `D <= U`, every cell with `D <= U` is computed exactly from
//!   predecessors with `D <= U`, and a neighbour with `D > U` can never tie with the minimum the
//!   backtrack picks, so the result and its tie-breaking are those of the full matrix. Each row is
//!   stored only over its window of finite cells, so work and memory follow the cells near the
//!   path rather than `n * m`.
//!
//! Trade-off: the pruning pays off when the sequences describe the same text. For unrelated
//! sequences `U` is loose and the cost approaches the full `O(n * m)` matrix (still exact).

use crate::error::{Error, Result};
use crate::levenshtein::{levenshtein, AllPairs, Encoded, PatternSet};
use rustc_hash::FxHashMap;

const INF: u32 = u32::MAX;

/// Allocations reused across the pairs one thread aligns: the cost table, the match-mask tables
/// (of the all-pairs kernel, or of the lazy one for tables too large to fill) and the DP band.
/// Fresh multi-megabyte allocations per pair cost page faults and allocator work, and serialize
/// threads in the kernel; reusing them keeps a pair's work in user space. Buffers above
/// [`KEEP_BYTES`] are released after use.
#[derive(Default)]
struct Scratch {
    dense: Vec<u16>,
    peq: Vec<u64>,
    text_peq: Vec<u64>,
    vals: Vec<u32>,
    vals16: Vec<u16>,
    all: AllPairs,
}

/// Largest buffer a thread keeps between pairs.
const KEEP_BYTES: usize = 64 << 20;

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

impl Scratch {
    fn take() -> Scratch {
        SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()))
    }

    fn give(self) {
        fn keep<T>(v: Vec<T>) -> Vec<T> {
            if v.capacity() * std::mem::size_of::<T>() <= KEEP_BYTES {
                v
            } else {
                Vec::new()
            }
        }
        let kept = Scratch {
            dense: keep(self.dense),
            peq: keep(self.peq),
            text_peq: keep(self.text_peq),
            vals: keep(self.vals),
            vals16: keep(self.vals16),
            all: self.all,
        };
        SCRATCH.with(|s| *s.borrow_mut() = kept);
    }
}

/// Largest `n * m` accepted: MinED is quadratic in the worst case (its band then holds every
/// cell, at most 4 bytes each: 1 GiB at this bound; two sequences of 16,384 tokens).
pub const MAX_CELLS: u64 = 1 << 28;
/// The longest token (code points, markers stripped) MinED aligns: the edit distance of two
/// tokens costs the product of their lengths, so a few tokens of thousands of characters would
/// take minutes. Real vocabularies' longest tokens have about 128.
pub const MAX_TOKEN_CHARS: usize = 256;

/// A base-to-blend alignment: `blend[offsets[j]..offsets[j + 1]]` are the ascending blend
/// positions paired with base position `j`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alignment {
    pub offsets: Vec<u32>,
    pub blend: Vec<u32>,
}

impl Alignment {
    /// Blend positions paired with base position `j`.
    pub fn for_base(&self, j: usize) -> &[u32] {
        &self.blend[self.offsets[j] as usize..self.offsets[j + 1] as usize]
    }

    /// Number of base positions.
    pub fn base_len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The alignment as one list per base position.
    pub fn to_lists(&self) -> Vec<Vec<u32>> {
        (0..self.base_len())
            .map(|j| self.for_base(j).to_vec())
            .collect()
    }
}

/// A token sequence as indices into a table of distinct (already marker-stripped) strings, plus
/// a per-position "guide" length (the token's surface length in bytes, roughly) used only to find
/// an upper bound; it never changes the result.
#[derive(Debug, Clone, Default)]
pub struct Interned<'a> {
    pub ids: Vec<u32>,
    pub strings: Vec<&'a [char]>,
    pub guide: Vec<u32>,
}

/// Strips every occurrence of `marker` and splits into code points.
pub fn strip_marker(token: &str, marker: &str) -> Vec<char> {
    let mut one = marker.chars();
    match (one.next(), one.next()) {
        (None, _) => token.chars().collect(),
        (Some(m), None) => token.chars().filter(|&c| c != m).collect(),
        _ => token.replace(marker, "").chars().collect(),
    }
}

/// Approximate number of text bytes a token stands for: byte-level (`Ġ`) vocabularies spell one
/// byte per character; SentencePiece (`▁`) spells `<0xHH>` for one byte and `▁` for a space.
pub fn surface_len(token: &str, marker: &str) -> u32 {
    match marker {
        "Ġ" => token.chars().count() as u32,
        "▁" => {
            let b = token.as_bytes();
            if b.len() == 6 && token.starts_with("<0x") && b[5] == b'>' {
                1
            } else {
                token
                    .chars()
                    .map(|c| if c == '▁' { 1 } else { c.len_utf8() as u32 })
                    .sum()
            }
        }
        _ => token.chars().count() as u32,
    }
}

/// Interns plain strings (after marker stripping); `guide` gives each position's guide length.
pub fn intern_strings<'s>(stripped: &'s [Vec<char>], guide: Vec<u32>) -> Interned<'s> {
    let mut seen: FxHashMap<&'s [char], u32> = FxHashMap::default();
    let mut out = Interned {
        guide,
        ..Interned::default()
    };
    for s in stripped {
        let next = out.strings.len() as u32;
        let id = *seen.entry(s.as_slice()).or_insert_with(|| {
            out.strings.push(s.as_slice());
            next
        });
        out.ids.push(id);
    }
    out
}

/// Largest table of distinct-string pairs kept dense (32 MiB of `u16`). Tests use a small limit,
/// so that their larger cases take the sparse path.
#[cfg(not(test))]
const DENSE_MAX_CELLS: u64 = 1 << 24;
#[cfg(test)]
const DENSE_MAX_CELLS: u64 = 150;

/// Table of distances between distinct strings: dense and filled up front, or sparse and filled
/// lazily.
struct Costs<'a> {
    xs: &'a [&'a [char]],
    ys: &'a [&'a [char]],
    xkey: Vec<Key>,
    ykey: Vec<Key>,
    fast: Option<(PatternSet<'a>, Vec<Encoded>)>,
    dense: Vec<u16>, // distance + 1; 0 = not computed yet
    sparse: FxHashMap<(u32, u32), u32>,
    use_dense: bool,
}

impl<'a> Costs<'a> {
    fn new(xs: &'a [&'a [char]], ys: &'a [&'a [char]]) -> Self {
        Self::in_scratch(xs, ys, &mut Scratch::default())
    }

    /// Builds the table in `scratch`'s allocations (taken; [`Costs::release`] returns them).
    ///
    /// A table of at most 2^24 cells is filled eagerly by the all-pairs kernel: the DP band
    /// around the path needs a large share of all distinct pairs (about a third on 2048-token
    /// texts), and the kernel measures every pair for a fraction of what one lazy look-up and
    /// measurement costs. Larger tables are filled lazily, through a hash map.
    fn in_scratch(xs: &'a [&'a [char]], ys: &'a [&'a [char]], scratch: &mut Scratch) -> Self {
        let cells = xs.len() as u64 * ys.len() as u64;
        let use_dense = cells <= DENSE_MAX_CELLS;
        let mut dense = std::mem::take(&mut scratch.dense);
        dense.clear();
        let fast = if use_dense {
            dense.resize(cells as usize, 0);
            scratch.all.fill(xs, ys, &mut dense);
            None
        } else {
            let (peq, text_peq) = (
                std::mem::take(&mut scratch.peq),
                std::mem::take(&mut scratch.text_peq),
            );
            PatternSet::with_buffers(ys, xs, 1 << 21, peq, text_peq)
        };
        Costs {
            xs,
            ys,
            xkey: xs.iter().map(|s| Key::new(s)).collect(),
            ykey: ys.iter().map(|s| Key::new(s)).collect(),
            fast,
            dense,
            sparse: FxHashMap::default(),
            use_dense,
        }
    }

    /// Returns the reusable allocations to `scratch`.
    fn release(self, scratch: &mut Scratch) {
        scratch.dense = self.dense;
        if let Some((set, _)) = self.fast {
            (scratch.peq, scratch.text_peq) = set.into_buffers();
        }
    }

    /// The distance if it is below `limit`; otherwise some value `>= limit` (a lower bound,
    /// which spares the exact computation).
    #[inline]
    fn get_below(&mut self, x: u32, y: u32, limit: u32) -> u32 {
        let lb = self.xkey[x as usize].lower(&self.ykey[y as usize]);
        if lb >= limit {
            lb
        } else {
            self.get(x, y)
        }
    }

    #[inline]
    fn get(&mut self, x: u32, y: u32) -> u32 {
        if self.use_dense {
            let k = x as usize * self.ys.len() + y as usize;
            let v = self.dense[k];
            if v != 0 {
                return u32::from(v) - 1;
            }
            self.fill(k, x, y)
        } else {
            if let Some(&d) = self.sparse.get(&(x, y)) {
                return d;
            }
            let d = self.compute(x, y);
            self.sparse.insert((x, y), d);
            d
        }
    }

    #[inline]
    fn compute(&self, x: u32, y: u32) -> u32 {
        distance(&self.fast, self.xs, self.ys, x, y)
    }

    #[cold]
    fn fill(&mut self, k: usize, x: u32, y: u32) -> u32 {
        let d = self.compute(x, y);
        if d < u32::from(u16::MAX) {
            self.dense[k] = (d + 1) as u16;
        }
        d
    }
}

#[inline]
fn distance(
    fast: &Option<(PatternSet, Vec<Encoded>)>,
    xs: &[&[char]],
    ys: &[&[char]],
    x: u32,
    y: u32,
) -> u32 {
    let text = xs[x as usize];
    match fast {
        Some((set, enc)) => set.distance(y as usize, x as usize, text, &enc[x as usize]),
        None => levenshtein(text, ys[y as usize]),
    }
}

/// A DP value as stored in the band: `u32`, or `u16` when the bound leaves every kept value below
/// 65,534 (half the memory traffic of the pass's largest buffer). A pruned cell is stored as the
/// type's maximum, which loads as a value no kept cell reaches.
trait Stored: Copy {
    fn store(v: u32) -> Self;
    fn load(self) -> u32;
}

impl Stored for u32 {
    #[inline(always)]
    fn store(v: u32) -> Self {
        v
    }
    #[inline(always)]
    fn load(self) -> u32 {
        self
    }
}

impl Stored for u16 {
    #[inline(always)]
    fn store(v: u32) -> Self {
        v.min(u32::from(u16::MAX)) as u16
    }
    #[inline(always)]
    fn load(self) -> u32 {
        u32::from(self)
    }
}

/// Largest bound for which the band stores `u16` values: kept values are below `bound + 1`,
/// so they stay below `u16::MAX`, the pruned marker. (Tests use a small limit, so that both
/// widths run.)
#[cfg(not(test))]
const U16_BOUND: u32 = u16::MAX as u32 - 2;
#[cfg(test)]
const U16_BOUND: u32 = 8;

/// Rows of the DP stored over their window of finite cells.
struct Band<V> {
    lo: Vec<u32>,
    start: Vec<usize>,
    vals: Vec<V>,
}

impl<V: Stored> Band<V> {
    #[inline]
    fn get(&self, i: usize, j: usize) -> u32 {
        let lo = self.lo[i] as usize;
        let len = self.start[i + 1] - self.start[i];
        if j < lo || j >= lo + len {
            INF
        } else {
            self.vals[self.start[i] + j - lo].load()
        }
    }
}

/// A valid warping path that follows the cumulative guide lengths of both sides (it stays near
/// the optimum when both sequences tokenize the same text), as the column range it visits in
/// each row.
fn guide_path(x: &Interned, y: &Interned) -> Vec<(u32, u32)> {
    let (n, m) = (x.ids.len(), y.ids.len());
    let (mut i, mut j) = (0usize, 0usize);
    let mut ax = u64::from(x.guide[0]);
    let mut by = u64::from(y.guide[0]);
    let mut rows = vec![(0u32, 0u32); n];
    // Move to whichever neighbour keeps the two cumulative lengths closest (ties: diagonal),
    // which tolerates a constant shift such as SentencePiece's dummy prefix space.
    while i + 1 < n || j + 1 < m {
        let gx = x.guide.get(i + 1).map(|&g| ax + u64::from(g));
        let gy = y.guide.get(j + 1).map(|&g| by + u64::from(g));
        let (step_i, step_j) = match (gx, gy) {
            (Some(nx), Some(ny)) => {
                let d_diag = nx.abs_diff(ny);
                let d_up = nx.abs_diff(by);
                let d_left = ax.abs_diff(ny);
                if d_diag <= d_up && d_diag <= d_left {
                    (true, true)
                } else {
                    (d_up <= d_left, d_up > d_left)
                }
            }
            (Some(_), None) => (true, false),
            _ => (false, true),
        };
        if step_i {
            i += 1;
            ax += u64::from(x.guide[i]);
            rows[i] = (j as u32, j as u32);
        }
        if step_j {
            j += 1;
            by += u64::from(y.guide[j]);
        }
        rows[i].1 = j as u32;
    }
    rows
}

/// Half-width of the band around the guide path searched for an upper bound.
const GUIDE_BAND: u32 = 8;

/// Cost of the best warping path inside a band of [`GUIDE_BAND`] columns around the guide path:
/// a valid path, hence an upper bound on the optimum, and usually equal to it.
fn banded_cost(x: &Interned, y: &Interned, costs: &mut Costs) -> u64 {
    let m = y.ids.len();
    let rows = guide_path(x, y);
    let mut prev: Vec<u64> = Vec::new();
    let mut cur: Vec<u64> = Vec::new();
    let (mut plo, mut phi) = (0usize, 0usize); // previous row's columns, exclusive end
    for (i, &(glo, ghi)) in rows.iter().enumerate() {
        let lo = glo.saturating_sub(GUIDE_BAND) as usize;
        let hi = ((ghi + GUIDE_BAND) as usize + 1).min(m);
        // Keep the band monotone so the guide path's own cells are always inside.
        let lo = if i == 0 {
            0
        } else {
            lo.max(plo).min(glo as usize)
        };
        cur.clear();
        for j in lo..hi {
            let up = if i > 0 && j >= plo && j < phi {
                prev[j - plo]
            } else {
                u64::MAX
            };
            let diag = if i > 0 && j > plo && j - 1 < phi {
                prev[j - 1 - plo]
            } else {
                u64::MAX
            };
            let left = if j > lo { cur[j - 1 - lo] } else { u64::MAX };
            let best = if i == 0 && j == 0 {
                0
            } else {
                up.min(diag).min(left)
            };
            let v = if best == u64::MAX {
                u64::MAX
            } else {
                best + u64::from(costs.get(x.ids[i], y.ids[j]))
            };
            cur.push(v);
        }
        std::mem::swap(&mut prev, &mut cur);
        plo = lo;
        phi = hi;
    }
    debug_assert_eq!(phi, m);
    prev[m - 1 - plo]
}

/// Length and character signature of a string, for a cheap lower bound of edit distances.
#[derive(Clone, Copy)]
struct Key {
    len: u32,
    sig: u64,
}

impl Key {
    fn new(s: &[char]) -> Self {
        let sig = s.iter().fold(0u64, |acc, &c| {
            acc | 1u64 << ((u32::from(c).wrapping_mul(0x9E37_79B1)) >> 26)
        });
        Key {
            len: s.len() as u32,
            sig,
        }
    }

    /// A lower bound of the edit distance: the length difference, and the number of signature
    /// bits (each standing for at least one distinct character) that one string has and the
    /// other lacks, since every occurrence of such a character needs its own edit.
    #[inline]
    fn lower(&self, other: &Key) -> u32 {
        let a = (self.sig & !other.sig).count_ones();
        let b = (other.sig & !self.sig).count_ones();
        self.len.abs_diff(other.len).max(a).max(b)
    }
}

/// Lower bounds on the cost of the rest of a path: `rows[i]` sums, over blend positions `>= i`,
/// the smallest distance of that token to any base token of the sequence (every later row is
/// visited at least once); `cols[j]` likewise over base positions. `rows[n] = cols[m] = 0`.
struct SuffixBounds {
    rows: Vec<u32>,
    cols: Vec<u32>,
}

/// Smallest distance from each distinct string of `a` to any distinct string of `b`, through
/// `cost(ai, bi)`; 0 for strings that `b` holds exactly. Candidates are tried in order of length
/// difference, which is a lower bound of the distance, so most of the row is never computed.
fn nearest(a: &[&[char]], b: &[&[char]], mut cost: impl FnMut(u32, u32, u32) -> u32) -> Vec<u32> {
    let exact: rustc_hash::FxHashSet<&[char]> = b.iter().copied().collect();
    let mut by_len: Vec<(u32, u32)> = b
        .iter()
        .enumerate()
        .map(|(k, s)| (s.len() as u32, k as u32))
        .collect();
    by_len.sort_unstable();
    a.iter()
        .enumerate()
        .map(|(ai, s)| {
            if exact.contains(s) {
                return 0;
            }
            let la = s.len() as u32;
            let mut best = u32::MAX;
            // Walk outwards from the first candidate of length >= la.
            let mid = by_len.partition_point(|&(l, _)| l < la);
            let (mut lo, mut hi) = (mid, mid);
            loop {
                let dl = (lo > 0).then(|| la - by_len[lo - 1].0);
                let dh = (hi < by_len.len()).then(|| by_len[hi].0 - la);
                let (d, k) = match (dl, dh) {
                    (Some(dl), Some(dh)) if dl <= dh => {
                        lo -= 1;
                        (dl, by_len[lo].1)
                    }
                    (_, Some(dh)) => {
                        hi += 1;
                        (dh, by_len[hi - 1].1)
                    }
                    (Some(dl), None) => {
                        lo -= 1;
                        (dl, by_len[lo].1)
                    }
                    (None, None) => break,
                };
                if d >= best {
                    break;
                }
                best = best.min(cost(ai as u32, k, best));
                if best <= 1 {
                    break; // no exact match exists, so 1 is the floor
                }
            }
            best
        })
        .collect()
}

impl SuffixBounds {
    fn new(x: &Interned, y: &Interned, costs: &mut Costs) -> Self {
        let (xmin, ymin) = if costs.use_dense {
            costs.dense_minima()
        } else {
            (
                nearest(&x.strings, &y.strings, |a, b, lim| {
                    costs.get_below(a, b, lim)
                }),
                nearest(&y.strings, &x.strings, |b, a, lim| {
                    costs.get_below(a, b, lim)
                }),
            )
        };
        let suffix = |ids: &[u32], mins: &[u32]| -> Vec<u32> {
            let mut out = vec![0u32; ids.len() + 1];
            for k in (0..ids.len()).rev() {
                out[k] = out[k + 1].saturating_add(mins[ids[k] as usize]);
            }
            out
        };
        SuffixBounds {
            rows: suffix(&x.ids, &xmin),
            cols: suffix(&y.ids, &ymin),
        }
    }

    fn zero(n: usize, m: usize) -> Self {
        SuffixBounds {
            rows: vec![0; n + 1],
            cols: vec![0; m + 1],
        }
    }
}

/// Costs of one blend string against base strings: a row of the dense table, or the sparse map.
enum RowCosts<'r, 'a> {
    Dense {
        row: &'r mut [u16],
        fast: &'r Option<(PatternSet<'a>, Vec<Encoded>)>,
        xs: &'a [&'a [char]],
        ys: &'a [&'a [char]],
        xkey: Key,
        ykey: &'r [Key],
        x: u32,
    },
    Sparse(&'r mut Costs<'a>, u32),
}

impl RowCosts<'_, '_> {
    #[inline(always)]
    fn get(&mut self, y: u32) -> u32 {
        self.get_below(y, u32::MAX)
    }

    /// As [`Costs::get_below`]: a cached distance, else the out-of-line miss path.
    #[inline(always)]
    fn get_below(&mut self, y: u32, limit: u32) -> u32 {
        if let RowCosts::Dense { row, .. } = self {
            let v = row[y as usize];
            if v != 0 {
                return u32::from(v) - 1;
            }
        }
        self.miss(y, limit)
    }

    /// The distance, computed (and cached) unless a lower bound shows it is `>= limit`.
    #[cold]
    #[inline(never)]
    fn miss(&mut self, y: u32, limit: u32) -> u32 {
        match self {
            RowCosts::Dense {
                row,
                fast,
                xs,
                ys,
                xkey,
                ykey,
                x,
            } => {
                let lb = xkey.lower(&ykey[y as usize]);
                if lb >= limit {
                    return lb;
                }
                let d = distance(fast, xs, ys, *x, y);
                if d < u32::from(u16::MAX) {
                    row[y as usize] = (d + 1) as u16;
                }
                d
            }
            RowCosts::Sparse(costs, x) => costs.get_below(*x, y, limit),
        }
    }
}

impl<'a> Costs<'a> {
    /// Row and column minima of the filled dense table: for each blend string the smallest
    /// distance to any base string, and the reverse. A cell left at 0 (a distance too large
    /// for 16 bits) counts as 65,535, a lower bound of it.
    fn dense_minima(&self) -> (Vec<u32>, Vec<u32>) {
        let ny = self.ys.len();
        let mut cols = vec![u16::MAX; ny];
        let rows = self
            .dense
            .chunks_exact(ny)
            .map(|row| {
                let mut least = u16::MAX;
                for (c, &v) in cols.iter_mut().zip(row) {
                    let d = v.wrapping_sub(1);
                    *c = (*c).min(d);
                    least = least.min(d);
                }
                u32::from(least)
            })
            .collect();
        (rows, cols.into_iter().map(u32::from).collect())
    }

    fn row_costs(&mut self, x: u32) -> RowCosts<'_, 'a> {
        if self.use_dense {
            let ny = self.ys.len();
            RowCosts::Dense {
                row: &mut self.dense[x as usize * ny..(x as usize + 1) * ny],
                fast: &self.fast,
                xs: self.xs,
                ys: self.ys,
                xkey: self.xkey[x as usize],
                ykey: &self.ykey,
                x,
            }
        } else {
            RowCosts::Sparse(self, x)
        }
    }
}

/// Forward DP keeping only cells with `D <= bound`. Returns `None` if some row has no such cell
/// (impossible when `bound` is the cost of a valid path).
///
/// A cell's cost is looked up (and its distance computed) only if the cell can still be finite:
/// its best predecessor plus the length difference of the two strings (a lower bound on their
/// distance) must not exceed `bound`.
fn pruned_forward<V: Stored>(
    x: &Interned,
    y: &Interned,
    costs: &mut Costs,
    bound: u32,
    suffix: &SuffixBounds,
    mut vals: Vec<V>,
) -> Option<Band<V>> {
    let (n, m) = (x.ids.len(), y.ids.len());
    vals.clear();
    // A cell (i, j) is kept iff D + max(rows[i + 1], cols[j + 1]) <= bound, i.e. D < limit.
    let limit = |lb: u32| (bound + 1).saturating_sub(lb);
    let col_limit: Vec<u32> = suffix.cols[1..].iter().map(|&lb| limit(lb)).collect();
    let mut band = Band {
        lo: Vec::with_capacity(n),
        start: Vec::with_capacity(n + 1),
        vals,
    };
    band.start.push(0);
    let mut cur: Vec<u32> = Vec::new();
    // Row 0: only left moves from (0, 0).
    {
        let mut rc = costs.row_costs(x.ids[0]);
        let row_limit = limit(suffix.rows[1]);
        let mut acc = 0u32;
        for (&yj, &cl) in y.ids.iter().zip(&col_limit) {
            let v = acc.saturating_add(rc.get(yj));
            if v >= row_limit.min(cl) {
                break;
            }
            cur.push(v);
            acc = v;
        }
    }
    if cur.is_empty() {
        return None;
    }
    band.lo.push(0);
    band.vals.extend(cur.iter().map(|&v| V::store(v)));
    band.start.push(band.vals.len());

    for i in 1..n {
        let xi = x.ids[i];
        let plo = band.lo[i - 1] as usize;
        let prev = &band.vals[band.start[i - 1]..band.start[i]];
        let phi = plo + prev.len(); // exclusive
        let mut rc = costs.row_costs(xi);
        let row_limit = limit(suffix.rows[i + 1]);
        cur.clear();
        cur.resize(phi - plo, INF);
        // Columns plo..phi: up and diag from the previous row, left from this one.
        let mut left = INF;
        let mut diag = INF;
        for (((cell, &up), &yj), &cl) in cur
            .iter_mut()
            .zip(prev)
            .zip(&y.ids[plo..phi])
            .zip(&col_limit[plo..phi])
        {
            let up = up.load();
            let best = up.min(diag).min(left);
            diag = up;
            let lim = row_limit.min(cl);
            // A cached distance is read as is; a missing one is computed only if its lower
            // bound does not already rule the cell out.
            left = if best >= lim {
                INF
            } else {
                let v = best + rc.get_below(yj, lim - best);
                if v >= lim {
                    INF
                } else {
                    v
                }
            };
            *cell = left;
        }
        // Columns phi..m: diag once (from the previous row's last cell), then left only.
        let mut j = phi;
        while j < m {
            let best = diag.min(left);
            diag = INF;
            let lim = row_limit.min(col_limit[j]);
            if best >= lim {
                break;
            }
            let v = best + rc.get_below(y.ids[j], lim - best);
            if v >= lim {
                break;
            }
            cur.push(v);
            left = v;
            j += 1;
        }
        let first = cur.iter().position(|&v| v != INF)?;
        let last = cur.iter().rposition(|&v| v != INF)?;
        band.lo.push((plo + first) as u32);
        band.vals
            .extend(cur[first..=last].iter().map(|&v| V::store(v)));
        band.start.push(band.vals.len());
    }
    Some(band)
}

/// Backtrack with the reference tie order (diag, up, left), then group by base position.
fn backtrack<V: Stored>(band: &Band<V>, n: usize, m: usize) -> Alignment {
    let mut pairs: Vec<(u32, u32)> = Vec::with_capacity(n + m);
    let (mut i, mut j) = (n - 1, m - 1);
    while i > 0 || j > 0 {
        pairs.push((i as u32, j as u32));
        let diag = if i > 0 && j > 0 {
            band.get(i - 1, j - 1)
        } else {
            INF
        };
        let up = if i > 0 { band.get(i - 1, j) } else { INF };
        let left = if j > 0 { band.get(i, j - 1) } else { INF };
        if i > 0 && j > 0 && diag <= up && diag <= left {
            i -= 1;
            j -= 1;
        } else if i > 0 && (up <= left || j == 0) {
            i -= 1;
        } else {
            j -= 1;
        }
    }
    pairs.push((0, 0));
    let mut offsets = vec![0u32; m + 1];
    for &(_, pj) in &pairs {
        offsets[pj as usize + 1] += 1;
    }
    for k in 0..m {
        offsets[k + 1] += offsets[k];
    }
    let mut fill = offsets.clone();
    let mut blend = vec![0u32; pairs.len()];
    for &(pi, pj) in pairs.iter().rev() {
        let slot = &mut fill[pj as usize];
        blend[*slot as usize] = pi;
        *slot += 1;
    }
    Alignment { offsets, blend }
}

/// MinED DTW of interned blend tokens `x` against interned base tokens `y`.
///
/// Bit-identical to the reference definition for all inputs; errors on empty sequences and on
/// sequences whose product of lengths exceeds [`MAX_CELLS`].
pub fn mined_dtw(x: &Interned, y: &Interned) -> Result<Alignment> {
    let (n, m) = (x.ids.len(), y.ids.len());
    if n == 0 || m == 0 {
        return Err(Error::Value(format!(
            "MinED alignment needs non-empty sequences (blend length {n}, base length {m})"
        )));
    }
    if n as u64 * m as u64 > MAX_CELLS {
        return Err(Error::Value(format!(
            "MinED alignment of {n} x {m} tokens exceeds {MAX_CELLS} cells; split the text or use \
             method=\"offsets\""
        )));
    }
    for (side, seq) in [("blend", x), ("base", y)] {
        if let Some(at) = seq.ids.iter().position(|&id| {
            seq.strings
                .get(id as usize)
                .is_some_and(|s| s.len() > MAX_TOKEN_CHARS)
        }) {
            let len = seq.strings[seq.ids[at] as usize].len();
            return Err(Error::Value(format!(
                "MinED alignment: the {side} token at position {at} has {len} code points \
                 (markers stripped); tokens of at most {MAX_TOKEN_CHARS} are aligned (real \
                 vocabularies stay far below): use method=\"offsets\""
            )));
        }
    }
    let mut scratch = Scratch::take();
    let mut costs = Costs::in_scratch(&x.strings, &y.strings, &mut scratch);
    let bound = banded_cost(x, y, &mut costs).min(u64::from(INF - 1)) as u32;
    let suffix = SuffixBounds::new(x, y, &mut costs);
    let result = if bound <= U16_BOUND {
        let vals = std::mem::take(&mut scratch.vals16);
        forward_backtrack(x, y, &mut costs, bound, &suffix, vals).map(|(al, vals)| {
            scratch.vals16 = vals;
            al
        })
    } else {
        let vals = std::mem::take(&mut scratch.vals);
        forward_backtrack(x, y, &mut costs, bound, &suffix, vals).map(|(al, vals)| {
            scratch.vals = vals;
            al
        })
    };
    // Unreachable for a valid bound; an unpruned pass keeps the result exact regardless.
    let result = result
        .or_else(|| {
            let zero = SuffixBounds::zero(n, m);
            forward_backtrack::<u32>(x, y, &mut costs, INF - 1, &zero, Vec::new()).map(|r| r.0)
        })
        .ok_or_else(|| Error::Value("MinED alignment: path costs overflow 32 bits".to_string()));
    costs.release(&mut scratch);
    scratch.give();
    result
}

/// The pruned pass and its backtrack; also returns the band's value buffer, for reuse.
fn forward_backtrack<V: Stored>(
    x: &Interned,
    y: &Interned,
    costs: &mut Costs,
    bound: u32,
    suffix: &SuffixBounds,
    vals: Vec<V>,
) -> Option<(Alignment, Vec<V>)> {
    let band = pruned_forward(x, y, costs, bound, suffix, vals)?;
    let al = backtrack(&band, x.ids.len(), y.ids.len());
    Some((al, band.vals))
}

/// MinED DTW on token strings: strips each side's marker, interns, aligns.
pub fn mined_base_to_blend(
    base_tokens: &[&str],
    blend_tokens: &[&str],
    base_marker: &str,
    blend_marker: &str,
) -> Result<Alignment> {
    let prepare = |tokens: &[&str], marker: &str| -> (Vec<Vec<char>>, Vec<u32>) {
        tokens
            .iter()
            .map(|t| (strip_marker(t, marker), surface_len(t, marker)))
            .unzip()
    };
    let (xs, xg) = prepare(blend_tokens, blend_marker);
    let (ys, yg) = prepare(base_tokens, base_marker);
    mined_dtw(&intern_strings(&xs, xg), &intern_strings(&ys, yg))
}

/// The unpruned reference definition, for tests and benchmarks.
pub fn mined_dtw_full(x: &Interned, y: &Interned) -> Result<Alignment> {
    let (n, m) = (x.ids.len(), y.ids.len());
    if n == 0 || m == 0 {
        return Err(Error::Value("empty sequence".to_string()));
    }
    let mut costs = Costs::new(&x.strings, &y.strings);
    let mut band = Band {
        lo: vec![0; n],
        start: (0..=n).map(|i| i * m).collect(),
        vals: vec![INF; n * m],
    };
    for i in 0..n {
        for j in 0..m {
            let c = costs.get(x.ids[i], y.ids[j]);
            let best = if i == 0 && j == 0 {
                0
            } else {
                let up = if i > 0 {
                    band.vals[(i - 1) * m + j]
                } else {
                    INF
                };
                let left = if j > 0 { band.vals[i * m + j - 1] } else { INF };
                let diag = if i > 0 && j > 0 {
                    band.vals[(i - 1) * m + j - 1]
                } else {
                    INF
                };
                up.min(left).min(diag)
            };
            band.vals[i * m + j] = best + c;
        }
    }
    Ok(backtrack(&band, n, m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn align(base: &[&str], blend: &[&str]) -> Vec<Vec<u32>> {
        mined_base_to_blend(base, blend, "▁", "Ġ")
            .unwrap()
            .to_lists()
    }

    #[test]
    fn tokens_beyond_the_length_cap_are_an_error() {
        let long = "x".repeat(MAX_TOKEN_CHARS + 1);
        let ok = "x".repeat(MAX_TOKEN_CHARS);
        let err = mined_base_to_blend(&["▁a", &long], &["Ġa"], "▁", "Ġ").unwrap_err();
        assert!(
            err.to_string().contains("base token at position 1"),
            "{err}"
        );
        // The marker does not count.
        let marked = format!("Ġ{ok}");
        assert!(mined_base_to_blend(&["▁a"], &[&marked], "▁", "Ġ").is_ok());
    }

    #[test]
    fn worked_cases_of_the_spec() {
        assert_eq!(
            align(&["▁hello", "▁world"], &["Ġhel", "lo", "Ġworld"]),
            vec![vec![0, 1], vec![2]]
        );
        assert_eq!(
            align(&["▁hel", "lo", "▁world"], &["Ġhello", "Ġworld"]),
            vec![vec![0], vec![0], vec![1]]
        );
        assert_eq!(
            align(
                &["▁The", "▁cat", "▁s", "at", "."],
                &["The", "Ġcat", "Ġsat", "."]
            ),
            vec![vec![0], vec![1], vec![2], vec![2], vec![3]]
        );
        assert_eq!(
            align(&["▁", "1", "8", "5", "0", "▁x"], &["Ġ1850", "Ġx"]),
            vec![vec![0], vec![1], vec![1], vec![1], vec![1], vec![1]]
        );
    }

    #[test]
    fn length_one_and_empty() {
        assert_eq!(align(&["▁a"], &["Ġb"]), vec![vec![0]]);
        assert_eq!(
            align(&["▁a", "b", "c"], &["x"]),
            vec![vec![0], vec![0], vec![0]]
        );
        assert!(mined_base_to_blend(&[], &["a"], "▁", "Ġ").is_err());
        assert!(mined_base_to_blend(&["a"], &[], "▁", "Ġ").is_err());
    }

    fn prepared_owned(tokens: &[String], marker: &str) -> (Vec<Vec<char>>, Vec<u32>) {
        tokens
            .iter()
            .map(|t| (strip_marker(t, marker), surface_len(t, marker)))
            .unzip()
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            "[ab▁Ġ]{0,3}",
            "[a-e]{1,6}",
            "Ġ[a-c]{0,4}",
            "▁[a-c]{0,4}",
            "[é—x]{0,2}",
        ]
    }

    proptest! {
        #[test]
        fn pruned_equals_full(
            base in prop::collection::vec(token(), 1..40),
            blend in prop::collection::vec(token(), 1..40),
        ) {
            let (xs, xg) = prepared_owned(&blend, "Ġ");
            let (ys, yg) = prepared_owned(&base, "▁");
            let (x, y) = (intern_strings(&xs, xg), intern_strings(&ys, yg));
            prop_assert_eq!(mined_dtw(&x, &y).unwrap(), mined_dtw_full(&x, &y).unwrap());
        }

        #[test]
        fn same_text_two_segmentations(
            words in prop::collection::vec("[a-f]{1,7}", 1..60),
            cuts_a in prop::collection::vec(0usize..8, 60),
            cuts_b in prop::collection::vec(0usize..8, 60),
        ) {
            let seg = |cuts: &[usize], marker: &str| -> Vec<String> {
                let mut out = Vec::new();
                for (w, &c) in words.iter().zip(cuts) {
                    let c = c.min(w.len());
                    if c == 0 || c == w.len() {
                        out.push(format!("{marker}{w}"));
                    } else {
                        out.push(format!("{marker}{}", &w[..c]));
                        out.push(w[c..].to_string());
                    }
                }
                out
            };
            let blend = seg(&cuts_a, "Ġ");
            let base = seg(&cuts_b, "▁");
            let (xs, xg) = prepared_owned(&blend, "Ġ");
            let (ys, yg) = prepared_owned(&base, "▁");
            let (x, y) = (intern_strings(&xs, xg), intern_strings(&ys, yg));
            prop_assert_eq!(mined_dtw(&x, &y).unwrap(), mined_dtw_full(&x, &y).unwrap());
        }
    }
}
