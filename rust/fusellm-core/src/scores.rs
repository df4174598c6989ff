//! Next-token scores of top-K rows: how well each row predicts the token that really follows,
//! summed per domain (the teacher diagnostics of alignment).
//!
//! A row holds at most `k` (id, value) entries; an entry is valid when its id is non-negative
//! and its value is above `-inf` (NaN is not). Against the next token `y` of its position:
//!
//! - `top1`: the row's first entry is valid and is `y`;
//! - `coverage`: some valid entry is `y`;
//! - `ce` (rows of log-probabilities only): `-ln p(y)`, with `p(y)` the summed probability of
//!   the entries that are `y`, or where none is, the row's tail `clip(1 - Σ p, 0, 1)` spread
//!   evenly over the `vocab_size - n` ids the row does not list (`n` its valid entries, at
//!   least 1). `p(y)` is floored at the smallest positive normal `f64`, so `ce` is finite.
//!
//! Every score is computed in `f64` from its row alone, in entry order; [`teacher_sums`] adds
//! them up position by position, in position order, so a shard's sums do not depend on how
//! many threads run. `fusellm.diagnostics` documents what the numbers mean.

use crate::aligner::status;
use crate::error::{Error, Result};
use crate::logit::{f16, for_each_exp, Logit};

/// Whether a stored value is a listed entry (above `-inf`; NaN is not).
trait Listed: Logit {
    fn listed(self) -> bool;
}

impl Listed for f32 {
    #[inline(always)]
    fn listed(self) -> bool {
        self > f32::NEG_INFINITY
    }
}

impl Listed for f16 {
    #[inline(always)]
    fn listed(self) -> bool {
        let b = self.to_bits();
        b != 0xfc00 && (b & 0x7fff) <= 0x7c00
    }
}

/// Top-K rows, row-major `[n, k]`.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a, V> {
    pub ids: &'a [i32],
    pub values: &'a [V],
    pub k: usize,
}

/// One position's scores: `(top1, coverage, ce)` (`ce` is 0 for raw logits).
type Score = (bool, bool, f64);

/// Rows of either stored dtype, scored position by position.
pub trait ScoreRows: Sync {
    /// The number of rows (positions).
    fn positions(&self) -> Result<usize>;
    /// The scores of row `pos` against `y` (the rows are checked).
    fn score(&self, pos: usize, y: i64, vocab_size: usize, logprobs: bool) -> Score;
}

impl<V: Listed> ScoreRows for Rows<'_, V> {
    fn positions(&self) -> Result<usize> {
        let (ids, values, k) = (self.ids.len(), self.values.len(), self.k);
        if ids != values {
            return Err(Error::Shape(format!(
                "row ids hold {ids} entries but row values hold {values}"
            )));
        }
        if k == 0 {
            return Err(Error::Shape("rows of k = 0 entries".to_string()));
        }
        if ids % k != 0 {
            return Err(Error::Shape(format!(
                "{ids} row entries are not whole rows of k = {k}"
            )));
        }
        Ok(ids / k)
    }

    #[inline]
    fn score(&self, pos: usize, y: i64, vocab_size: usize, logprobs: bool) -> Score {
        let k = self.k;
        let ids = &self.ids[pos * k..(pos + 1) * k];
        let values = &self.values[pos * k..(pos + 1) * k];
        // One pass: which entries are valid, how many are y, and (log-probabilities) the mass of
        // the valid ones and of those that are y, in entry order.
        let (mut listed, mut hits, mut hit_at) = (0usize, 0usize, 0usize);
        let (mut mass, mut hit_mass) = (0.0f64, 0.0f64);
        for (j, (&id, &v)) in ids.iter().zip(values).enumerate() {
            let valid = id >= 0 && v.listed();
            let is_y = valid && i64::from(id) == y;
            listed += usize::from(valid);
            hits += usize::from(is_y);
            if is_y {
                hit_at = j;
            }
            if logprobs {
                let p = v.exp_f64();
                mass += if valid { p } else { 0.0 };
                hit_mass += if is_y { p } else { 0.0 };
            }
        }
        let top1 = ids[0] >= 0 && values[0].listed() && i64::from(ids[0]) == y;
        if !logprobs {
            return (top1, hits > 0, 0.0);
        }
        let p_y = match hits {
            0 => {
                let rest = vocab_size.saturating_sub(listed).max(1) as f64;
                (1.0 - mass).clamp(0.0, 1.0) / rest
            }
            1 => {
                // -ln p(y) is the stored log-probability itself (no exp/ln round trip), unless
                // p(y) is below the floor
                let v = f64::from(values[hit_at].to_f32());
                if v >= LN_MIN_POSITIVE {
                    return (top1, true, -v);
                }
                hit_mass
            }
            _ => hit_mass,
        };
        (top1, hits > 0, -p_y.max(f64::MIN_POSITIVE).ln())
    }
}

/// `ln` of the smallest positive normal `f64`, the floor of `p(y)`.
const LN_MIN_POSITIVE: f64 = -708.396_418_532_264_1;

/// A candidate's sums over the positions of one domain (or all of them).
///
/// The target's own rows: `n` positions with a next token, and their `top1`, `coverage`, `ce`.
/// A source: `with_next` positions with a next token, `n` of them matched (the row is the
/// source's own), and over those `n` the source's scores and the target's rows' (`ref_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sums {
    pub n: f64,
    pub with_next: f64,
    pub top1: f64,
    pub coverage: f64,
    pub ce: f64,
    pub ref_top1: f64,
    pub ref_coverage: f64,
    pub ref_ce: f64,
}

/// A source's aligned rows and their statuses (`[n]`, [`status`]).
pub struct Source<'a> {
    pub rows: &'a dyn ScoreRows,
    pub status: &'a [u8],
}

/// Per candidate, its [`Sums`]: index 0 pools every position, index `1 + d` is domain `d`.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherSums {
    pub reference: Vec<Sums>,
    pub sources: Vec<Vec<Sums>>,
}

/// Scores the target's own rows (`reference`) and every source's aligned rows at each position
/// against its next token (`next`, `-1`: none; those positions are not counted) and sums them
/// per domain (`domains`: each position's code in `[0, num_domains)`, or negative for none: then
/// it counts only in the pool). `logprobs`: the values are log-probabilities (`ce` is summed).
pub fn teacher_sums(
    next: &[i64],
    domains: &[i64],
    num_domains: usize,
    vocab_size: usize,
    logprobs: bool,
    reference: &dyn ScoreRows,
    sources: &[Source<'_>],
) -> Result<TeacherSums> {
    let n = next.len();
    let check = |what: &str, len: usize| {
        if len == n {
            Ok(())
        } else {
            Err(Error::Shape(format!(
                "{what} hold {len} positions but the next tokens {n}"
            )))
        }
    };
    check("the target's rows", reference.positions()?)?;
    check("the domain codes", domains.len())?;
    for (s, src) in sources.iter().enumerate() {
        check(&format!("source {s}'s rows"), src.rows.positions()?)?;
        check(&format!("source {s}'s statuses"), src.status.len())?;
    }
    if logprobs && vocab_size == 0 {
        return Err(Error::Value("vocab_size must be at least 1".to_string()));
    }
    if let Some(&d) = domains.iter().find(|&&d| d >= num_domains as i64) {
        return Err(Error::Value(format!(
            "domain code {d} is outside the {num_domains} domains"
        )));
    }
    let slots = num_domains + 1;
    let mut reference_sums = vec![Sums::default(); slots];
    let mut source_sums = vec![vec![Sums::default(); slots]; sources.len()];
    for (pos, &y) in next.iter().enumerate() {
        if y < 0 {
            continue;
        }
        let d = domains[pos];
        let (t, c, ce) = reference.score(pos, y, vocab_size, logprobs);
        at(&mut reference_sums, d, |s| {
            s.n += 1.0;
            s.top1 += f64::from(u8::from(t));
            s.coverage += f64::from(u8::from(c));
            s.ce += ce;
        });
        for (src, sums) in sources.iter().zip(&mut source_sums) {
            if src.status[pos] != status::MATCHED {
                at(sums, d, |s| s.with_next += 1.0);
                continue;
            }
            let (st, sc, sce) = src.rows.score(pos, y, vocab_size, logprobs);
            at(sums, d, |s| {
                s.with_next += 1.0;
                s.n += 1.0;
                s.top1 += f64::from(u8::from(st));
                s.coverage += f64::from(u8::from(sc));
                s.ce += sce;
                s.ref_top1 += f64::from(u8::from(t));
                s.ref_coverage += f64::from(u8::from(c));
                s.ref_ce += ce;
            });
        }
    }
    Ok(TeacherSums {
        reference: reference_sums,
        sources: source_sums,
    })
}

/// Applies `f` to the pool's sums and to domain `d`'s (none where `d` is negative).
#[inline(always)]
fn at(sums: &mut [Sums], d: i64, f: impl Fn(&mut Sums)) {
    f(&mut sums[0]);
    if let Ok(d) = usize::try_from(d) {
        f(&mut sums[1 + d]);
    }
}

/// The probability a source's own top-K rows hold (`values`: log-probabilities, row-major,
/// `ids` beside them), and the part of it on entries whose id the alignment drops (`known[id]`
/// false, or an id outside `known`): `(Σ p, Σ p · dropped)` over every entry, in entry order.
pub fn topk_mass<V: Logit>(values: &[V], ids: &[i32], known: &[bool]) -> Result<(f64, f64)> {
    if values.len() != ids.len() {
        return Err(Error::Shape(format!(
            "top-K values hold {} entries but the ids {}",
            values.len(),
            ids.len()
        )));
    }
    let (mut total, mut dropped) = (0.0f64, 0.0f64);
    for_each_exp(values, |j, p| {
        total += p;
        let kept = usize::try_from(ids[j])
            .ok()
            .and_then(|i| known.get(i))
            .copied()
            .unwrap_or(false);
        if !kept {
            dropped += p;
        }
    });
    Ok((total, dropped))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, position by position, written independently of the kernel's loop.
    fn oracle(ids: &[i32], values: &[f32], y: i64, vocab: usize) -> (bool, bool, f64) {
        let entries: Vec<(i64, f64)> = ids
            .iter()
            .zip(values)
            .filter(|(&i, &v)| i >= 0 && v > f32::NEG_INFINITY)
            .map(|(&i, &v)| (i64::from(i), f64::from(v).exp()))
            .collect();
        let top1 = ids.first().is_some_and(|&i| i64::from(i) == y)
            && values.first().is_some_and(|&v| v > f32::NEG_INFINITY);
        let hits: Vec<f64> = entries
            .iter()
            .filter(|(i, _)| *i == y)
            .map(|e| e.1)
            .collect();
        let p = if hits.is_empty() {
            let tail = (1.0 - entries.iter().map(|e| e.1).sum::<f64>()).clamp(0.0, 1.0);
            tail / (vocab.saturating_sub(entries.len()).max(1) as f64)
        } else {
            hits.iter().sum()
        };
        (top1, !hits.is_empty(), -p.max(f64::MIN_POSITIVE).ln())
    }

    // rows of k = 3: hit at rank 0, hit at rank 2, miss, padding, NaN, duplicate hits, an
    // invalid first entry equal to y, a row whose mass exceeds 1
    const IDS: [i32; 24] = [
        5, 1, 2, /**/ 1, 2, 7, /**/ 1, 2, 3, /**/ 4, -1, -1, /**/ 9, 9, 3,
        /**/ 6, 6, 1, /**/ 8, 2, 3, /**/ 1, 2, 3,
    ];
    const NEXT: [i64; 8] = [5, 7, 0, 4, 9, 6, 8, 0];

    fn values() -> Vec<f32> {
        let ninf = f32::NEG_INFINITY;
        [
            0.5, 0.2, 0.1, 0.3, 0.3, 0.1, 0.4, 0.3, 0.2, 0.9, 0.0, 0.0, -1.0, 0.2, 0.1, 0.25, 0.25,
            0.1, 0.0, 0.5, 0.1, 0.7, 0.6, 0.2,
        ]
        .iter()
        .map(|&p: &f32| {
            if p > 0.0 {
                p.ln()
            } else if p < 0.0 {
                f32::NAN
            } else {
                ninf
            }
        })
        .collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn row_scores_match_the_definition() {
        let v = values();
        let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
        let rows = Rows {
            ids: &IDS,
            values: &v[..],
            k: 3,
        };
        let rows16 = Rows {
            ids: &IDS,
            values: &v16[..],
            k: 3,
        };
        for (pos, &y) in NEXT.iter().enumerate() {
            let r = pos * 3..pos * 3 + 3;
            let (t, c, ce) = oracle(&IDS[r.clone()], &v[r.clone()], y, 10);
            let got = rows.score(pos, y, 10, true);
            assert_eq!((got.0, got.1), (t, c), "top1, coverage at {pos}");
            assert!(close(got.2, ce), "ce at {pos}: {} vs {ce}", got.2);
            // f16 rows: the same definition on the rounded values
            let wide: Vec<f32> = v16[r.clone()].iter().map(|h| h.to_f32()).collect();
            let (t, c, ce) = oracle(&IDS[r], &wide, y, 10);
            let got = rows16.score(pos, y, 10, true);
            assert_eq!((got.0, got.1), (t, c), "f16 top1, coverage at {pos}");
            assert!(close(got.2, ce), "f16 ce at {pos}: {} vs {ce}", got.2);
            assert_eq!(rows.score(pos, y, 10, false), (t, c, 0.0));
        }
        // the duplicate hit sums, the over-full row has no tail (floored, finite)
        assert!((rows.score(5, 6, 10, true).2 - (-(0.5f64).ln())).abs() < 1e-6);
        assert!(rows.score(7, 0, 10, true).2.is_finite());
    }

    #[test]
    fn sums_add_the_scores_per_domain() {
        let v = values();
        let rows = Rows {
            ids: &IDS,
            values: &v[..],
            k: 3,
        };
        // the target's rows: the same rows shifted by one position
        let ref_ids: Vec<i32> = IDS[3..].iter().chain(&IDS[..3]).copied().collect();
        let ref_vals: Vec<f32> = v[3..].iter().chain(&v[..3]).copied().collect();
        let reference = Rows {
            ids: &ref_ids,
            values: &ref_vals[..],
            k: 3,
        };
        let mut next = NEXT;
        next[3] = -1; // no next token: not counted
        let domains = [0, 1, 0, 1, -1, 1, 0, 0];
        let status = [0, 0, 2, 0, 0, 1, 0, 0];
        let src = [Source {
            rows: &rows,
            status: &status,
        }];
        let got = teacher_sums(&next, &domains, 2, 10, true, &reference, &src).unwrap();
        let score = |ids: &[i32], vals: &[f32], p: usize| {
            let r = p * 3..p * 3 + 3;
            oracle(&ids[r.clone()], &vals[r], next[p], 10)
        };
        for (slot, dom) in [(0usize, None), (1, Some(0)), (2, Some(1))] {
            let (mut want_ref, mut want_src) = (Sums::default(), Sums::default());
            for p in 0..8 {
                if next[p] < 0 || dom.is_some_and(|d| domains[p] != d) {
                    continue;
                }
                let (t, c, ce) = score(&ref_ids, &ref_vals, p);
                want_ref.n += 1.0;
                want_ref.top1 += f64::from(u8::from(t));
                want_ref.coverage += f64::from(u8::from(c));
                want_ref.ce += ce;
                want_src.with_next += 1.0;
                if status[p] == status::MATCHED {
                    let (st, sc, sce) = score(&IDS, &v, p);
                    want_src.n += 1.0;
                    want_src.top1 += f64::from(u8::from(st));
                    want_src.coverage += f64::from(u8::from(sc));
                    want_src.ce += sce;
                    want_src.ref_top1 += f64::from(u8::from(t));
                    want_src.ref_coverage += f64::from(u8::from(c));
                    want_src.ref_ce += ce;
                }
            }
            let (r, s) = (got.reference[slot], got.sources[0][slot]);
            assert_eq!(
                (r.n, r.top1, r.coverage),
                (want_ref.n, want_ref.top1, want_ref.coverage)
            );
            assert!(
                close(r.ce, want_ref.ce),
                "{slot}: {} vs {}",
                r.ce,
                want_ref.ce
            );
            assert_eq!(
                (
                    s.n,
                    s.with_next,
                    s.top1,
                    s.coverage,
                    s.ref_top1,
                    s.ref_coverage
                ),
                (
                    want_src.n,
                    want_src.with_next,
                    want_src.top1,
                    want_src.coverage,
                    want_src.ref_top1,
                    want_src.ref_coverage
                )
            );
            assert!(close(s.ce, want_src.ce) && close(s.ref_ce, want_src.ref_ce));
        }
        assert_eq!(got.reference[0].n, 7.0);
        assert_eq!(got.sources[0][0].n, 5.0);
    }

    #[test]
    fn the_floor_is_ln_of_the_smallest_normal() {
        assert_eq!(LN_MIN_POSITIVE, f64::MIN_POSITIVE.ln());
    }

    #[test]
    fn bad_shapes_are_errors() {
        let v = [0.0f32; 6];
        let rows = Rows {
            ids: &[1, 2, 3, 4, 5, 6],
            values: &v[..],
            k: 3,
        };
        let short = Rows {
            ids: &[1, 2],
            values: &v[..1],
            k: 1,
        };
        let uneven = Rows {
            ids: &[1, 2, 3, 4],
            values: &v[..4],
            k: 3,
        };
        let st = [0u8, 0];
        let sums = |next: &[i64], doms: &[i64], nd, r: &dyn ScoreRows, s: &[Source]| {
            teacher_sums(next, doms, nd, 10, true, r, s)
        };
        assert!(matches!(
            sums(&[1, 2], &[0, 0], 1, &short, &[]),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            sums(&[1, 2], &[0, 0], 1, &uneven, &[]),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            sums(&[1, 2], &[0], 1, &rows, &[]),
            Err(Error::Shape(_))
        ));
        let e = sums(&[1, 2], &[0, 3], 2, &rows, &[]).unwrap_err();
        assert!(e.to_string().contains("domain code 3"), "{e}");
        let src = [Source {
            rows: &rows,
            status: &st[..1],
        }];
        assert!(matches!(
            sums(&[1, 2], &[0, 0], 1, &rows, &src),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            teacher_sums(&[1, 2], &[0, 0], 1, 0, true, &rows, &[]),
            Err(Error::Value(_))
        ));
        assert!(matches!(
            topk_mass(&[0.0f32], &[1, 2], &[true]),
            Err(Error::Shape(_))
        ));
    }

    #[test]
    fn mass_sums_every_entry() {
        let values = [0.5f32.ln(), 0.25f32.ln(), f32::NEG_INFINITY, 0.125f32.ln()];
        // id 1 is dropped, 7 is outside the vocabulary, -1 is padding
        let ids = [0, 1, -1, 7];
        let (total, dropped) = topk_mass(&values, &ids, &[true, false, true]).unwrap();
        assert!((total - 0.875).abs() < 1e-7);
        assert!((dropped - 0.375).abs() < 1e-7);
        let v16: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
        // f16 rows: exactly the exponentials of the rounded values, in entry order
        let e: Vec<f64> = v16.iter().map(|h| f64::from(h.to_f32()).exp()).collect();
        assert_eq!(
            topk_mass(&v16, &ids, &[true, false, true]).unwrap(),
            (e[0] + e[1] + e[2] + e[3], e[1] + e[2] + e[3])
        );
    }
}
