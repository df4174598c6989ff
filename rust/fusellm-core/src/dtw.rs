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
//! - tokens are interned, so each distinct pair of strings is measured once, lazily, with the
//!   bit-parallel Levenshtein of [`crate::levenshtein`];
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
use crate::levenshtein::levenshtein;
use rustc_hash::FxHashMap;

const INF: u32 = u32::MAX;

/// Largest `n * m` accepted: MinED is quadratic in the worst case.
pub const MAX_CELLS: u64 = 1 << 33;

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

/// A token sequence as indices into a table of distinct (already marker-stripped) strings.
#[derive(Debug, Clone, Default)]
pub struct Interned<'a> {
    pub ids: Vec<u32>,
    pub strings: Vec<&'a [char]>,
}

/// Strips every occurrence of `marker` and splits into code points.
pub fn strip_marker(token: &str, marker: &str) -> Vec<char> {
    if marker.is_empty() {
        token.chars().collect()
    } else {
        token.replace(marker, "").chars().collect()
    }
}

/// Interns plain strings (after marker stripping); `storage` owns the stripped strings.
pub fn intern_strings<'s>(stripped: &'s [Vec<char>]) -> Interned<'s> {
    let mut seen: FxHashMap<&'s [char], u32> = FxHashMap::default();
    let mut out = Interned::default();
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

/// Lazily filled table of distances between distinct strings.
struct Costs<'a> {
    xs: &'a [&'a [char]],
    ys: &'a [&'a [char]],
    dense: Vec<u16>, // distance + 1; 0 = not computed yet
    sparse: FxHashMap<(u32, u32), u32>,
    use_dense: bool,
}

impl<'a> Costs<'a> {
    fn new(xs: &'a [&'a [char]], ys: &'a [&'a [char]]) -> Self {
        let cells = xs.len() as u64 * ys.len() as u64;
        let use_dense = cells <= (1 << 24);
        Costs {
            xs,
            ys,
            dense: if use_dense {
                vec![0; cells as usize]
            } else {
                Vec::new()
            },
            sparse: FxHashMap::default(),
            use_dense,
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
            let d = levenshtein(self.xs[x as usize], self.ys[y as usize]);
            if d < u32::from(u16::MAX) {
                self.dense[k] = (d + 1) as u16;
            }
            d
        } else {
            let (xs, ys) = (self.xs, self.ys);
            *self
                .sparse
                .entry((x, y))
                .or_insert_with(|| levenshtein(xs[x as usize], ys[y as usize]))
        }
    }
}

/// Rows of the DP stored over their window of finite cells.
struct Band {
    lo: Vec<u32>,
    start: Vec<usize>,
    vals: Vec<u32>,
}

impl Band {
    #[inline]
    fn get(&self, i: usize, j: usize) -> u32 {
        let lo = self.lo[i] as usize;
        let len = self.start[i + 1] - self.start[i];
        if j < lo || j >= lo + len {
            INF
        } else {
            self.vals[self.start[i] + j - lo]
        }
    }
}

/// Cost of a valid warping path that follows cumulative character counts.
fn offset_path_cost(x: &Interned, y: &Interned, costs: &mut Costs) -> u64 {
    let (n, m) = (x.ids.len(), y.ids.len());
    let (mut i, mut j) = (0usize, 0usize);
    let mut ax = x.strings[x.ids[0] as usize].len();
    let mut by = y.strings[y.ids[0] as usize].len();
    let mut total = u64::from(costs.get(x.ids[0], y.ids[0]));
    while i + 1 < n || j + 1 < m {
        let step_i = j + 1 == m || (i + 1 < n && ax <= by);
        let step_j = i + 1 == n || (j + 1 < m && by <= ax);
        if step_i {
            i += 1;
            ax += x.strings[x.ids[i] as usize].len();
        }
        if step_j {
            j += 1;
            by += y.strings[y.ids[j] as usize].len();
        }
        total += u64::from(costs.get(x.ids[i], y.ids[j]));
    }
    total
}

/// Forward DP keeping only cells with `D <= bound`. Returns `None` if some row has no such cell
/// (impossible when `bound` is the cost of a valid path).
fn pruned_forward(x: &Interned, y: &Interned, costs: &mut Costs, bound: u32) -> Option<Band> {
    let (n, m) = (x.ids.len(), y.ids.len());
    let mut band = Band {
        lo: Vec::with_capacity(n),
        start: Vec::with_capacity(n + 1),
        vals: Vec::new(),
    };
    band.start.push(0);
    let mut cur: Vec<u32> = Vec::new();
    // Row 0: only left moves from (0, 0).
    let xi = x.ids[0];
    let mut acc = 0u32;
    for &yj in &y.ids {
        let v = acc.saturating_add(costs.get(xi, yj));
        if v > bound {
            break;
        }
        cur.push(v);
        acc = v;
    }
    if cur.is_empty() {
        return None;
    }
    band.lo.push(0);
    band.vals.extend_from_slice(&cur);
    band.start.push(band.vals.len());

    for i in 1..n {
        let xi = x.ids[i];
        let plo = band.lo[i - 1] as usize;
        let (ps, pe) = (band.start[i - 1], band.start[i]);
        let phi = plo + (pe - ps); // exclusive
        cur.clear();
        let mut left = INF;
        let mut j = plo;
        while j < m {
            let up = if j < phi { band.vals[ps + j - plo] } else { INF };
            let diag = if j > plo && j - 1 < phi {
                band.vals[ps + j - 1 - plo]
            } else {
                INF
            };
            let best = up.min(diag).min(left);
            let v = if best == INF {
                INF
            } else {
                let v = best.saturating_add(costs.get(xi, y.ids[j]));
                if v > bound {
                    INF
                } else {
                    v
                }
            };
            cur.push(v);
            left = v;
            j += 1;
            if j > phi && v == INF {
                break;
            }
        }
        let first = cur.iter().position(|&v| v != INF)?;
        let last = cur.iter().rposition(|&v| v != INF)?;
        band.lo.push((plo + first) as u32);
        band.vals.extend_from_slice(&cur[first..=last]);
        band.start.push(band.vals.len());
    }
    Some(band)
}

/// Backtrack with the reference tie order (diag, up, left), then group by base position.
fn backtrack(band: &Band, n: usize, m: usize) -> Alignment {
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
    let mut costs = Costs::new(&x.strings, &y.strings);
    let bound = offset_path_cost(x, y, &mut costs).min(u64::from(INF - 1)) as u32;
    let band = match pruned_forward(x, y, &mut costs, bound) {
        Some(band) => band,
        // Unreachable for a valid bound; an unpruned pass keeps the result exact regardless.
        None => pruned_forward(x, y, &mut costs, INF - 1).ok_or_else(|| {
            Error::Value("MinED alignment: path costs overflow 32 bits".to_string())
        })?,
    };
    Ok(backtrack(&band, n, m))
}

/// MinED DTW on token strings: strips each side's marker, interns, aligns.
pub fn mined_base_to_blend(
    base_tokens: &[&str],
    blend_tokens: &[&str],
    base_marker: &str,
    blend_marker: &str,
) -> Result<Alignment> {
    let xs: Vec<Vec<char>> = blend_tokens
        .iter()
        .map(|t| strip_marker(t, blend_marker))
        .collect();
    let ys: Vec<Vec<char>> = base_tokens
        .iter()
        .map(|t| strip_marker(t, base_marker))
        .collect();
    mined_dtw(&intern_strings(&xs), &intern_strings(&ys))
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
                let up = if i > 0 { band.vals[(i - 1) * m + j] } else { INF };
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
            align(&["▁The", "▁cat", "▁s", "at", "."], &["The", "Ġcat", "Ġsat", "."]),
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
        assert_eq!(align(&["▁a", "b", "c"], &["x"]), vec![vec![0], vec![0], vec![0]]);
        assert!(mined_base_to_blend(&[], &["a"], "▁", "Ġ").is_err());
        assert!(mined_base_to_blend(&["a"], &[], "▁", "Ġ").is_err());
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
            let xs: Vec<Vec<char>> = blend.iter().map(|t| strip_marker(t, "Ġ")).collect();
            let ys: Vec<Vec<char>> = base.iter().map(|t| strip_marker(t, "▁")).collect();
            let (x, y) = (intern_strings(&xs), intern_strings(&ys));
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
            let xs: Vec<Vec<char>> = blend.iter().map(|t| strip_marker(t, "Ġ")).collect();
            let ys: Vec<Vec<char>> = base.iter().map(|t| strip_marker(t, "▁")).collect();
            let (x, y) = (intern_strings(&xs), intern_strings(&ys));
            prop_assert_eq!(mined_dtw(&x, &y).unwrap(), mined_dtw_full(&x, &y).unwrap());
        }
    }
}
