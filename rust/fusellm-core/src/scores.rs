//! Next-token scores of top-K rows: how well each row predicts the token that really follows.
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
//! Every value is computed in `f64` from its row alone, in entry order, so the result does not
//! depend on how a batch is cut or how many threads run. The aggregation (per domain) is the
//! caller's; `fusellm.diagnostics` documents what the numbers mean.
//!
//! The row sums take every entry's `exp`, which dominates the cost: [`for_each_exp`] evaluates it
//! without a library call (a range reduction by `ln 2` and a degree-13 polynomial, within a few
//! ulp of `f64::exp`; the tests bound it), a chunk of entries at a time so that their
//! polynomials overlap (measured: `topk_mass` over 4.8 M entries 143 ms -> 32 ms).
//! The probability of the next token itself uses `f64::exp`.

use crate::error::{Error, Result};

/// `e^x` for the `exp_sum` of a row: exact to a few ulp for `x` in `[-708, 709]`, `0` below
/// (probabilities under `1e-307` add nothing to a sum of at most `k` terms), `inf` above.
#[inline(always)]
fn fast_exp(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // round to nearest through the mantissa: 1.5 * 2^52
    const SHIFT: f64 = 6_755_399_441_055_744.0;
    let xc = x.clamp(-708.0, 709.0);
    let t = xc * LOG2E + SHIFT;
    let k = t - SHIFT;
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    // e^r for |r| <= ln(2)/2 by Horner: Taylor terms up to r^13 / 13!
    let mut p = 1.0 / 6_227_020_800.0;
    for c in [
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    // 2^k from the integer in t's low mantissa bits
    let ki = (t.to_bits() as i64).wrapping_sub(SHIFT.to_bits() as i64);
    let scale = f64::from_bits(((ki + 1023) as u64) << 52);
    if x < -708.0 {
        0.0
    } else if x > 709.0 {
        f64::INFINITY
    } else {
        p * scale
    }
}

/// Calls `f(j, e^v_j)` for every entry of `values`, in entry order. The exponentials of a chunk
/// of entries are independent, so they are computed side by side (the polynomial's latency
/// overlaps) before `f` sees them.
#[inline]
fn for_each_exp(values: &[f32], mut f: impl FnMut(usize, f64)) {
    const CHUNK: usize = 8;
    for (c, chunk) in values.chunks(CHUNK).enumerate() {
        let mut e = [0.0f64; CHUNK];
        for (slot, &v) in e.iter_mut().zip(chunk) {
            *slot = fast_exp(f64::from(v));
        }
        for (i, &p) in e.iter().take(chunk.len()).enumerate() {
            f(c * CHUNK + i, p);
        }
    }
}

/// Per position scores (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct NextTokenScores {
    pub top1: Vec<bool>,
    pub coverage: Vec<bool>,
    /// `None` for rows of raw logits, which do not know their tail.
    pub ce: Option<Vec<f64>>,
}

fn check_rows(ids: usize, values: usize, k: usize, next: usize) -> Result<()> {
    if ids != values {
        return Err(Error::Shape(format!(
            "row ids hold {ids} entries but row values hold {values}"
        )));
    }
    let want = next.checked_mul(k).ok_or_else(|| {
        Error::Value(format!(
            "{next} positions of k = {k} entries overflow a size"
        ))
    })?;
    if ids != want {
        return Err(Error::Shape(format!(
            "{next} positions of k = {k} entries need {want} row entries, got {ids}"
        )));
    }
    Ok(())
}

/// Scores `next.len()` rows of `k` entries (`ids`, `values`: row-major `[N, k]`) against the
/// next tokens `next` (`[N]`). `logprobs`: the values are log-probabilities (then `ce` is given).
pub fn next_token_scores(
    ids: &[i32],
    values: &[f32],
    k: usize,
    next: &[i64],
    vocab_size: usize,
    logprobs: bool,
) -> Result<NextTokenScores> {
    check_rows(ids.len(), values.len(), k, next.len())?;
    if logprobs && vocab_size == 0 {
        return Err(Error::Value("vocab_size must be at least 1".to_string()));
    }
    let n = next.len();
    let mut top1 = Vec::with_capacity(n);
    let mut coverage = Vec::with_capacity(n);
    let mut ce = if logprobs {
        Some(Vec::with_capacity(n))
    } else {
        None
    };
    for (pos, &y) in next.iter().enumerate() {
        let row_ids = &ids[pos * k..(pos + 1) * k];
        let row_values = &values[pos * k..(pos + 1) * k];
        let valid = |j: usize| row_ids[j] >= 0 && row_values[j] > f32::NEG_INFINITY;
        top1.push(k > 0 && valid(0) && i64::from(row_ids[0]) == y);
        let mut hit = false;
        let mut hit_mass = 0.0f64;
        let mut listed = 0usize;
        for j in 0..k {
            if valid(j) {
                listed += 1;
                if i64::from(row_ids[j]) == y {
                    hit = true;
                    if logprobs {
                        hit_mass += f64::from(row_values[j]).exp();
                    }
                }
            }
        }
        coverage.push(hit);
        if let Some(ce) = ce.as_mut() {
            let p_y = if hit {
                hit_mass
            } else {
                let rest = vocab_size.saturating_sub(listed).max(1) as f64;
                let mut mass = 0.0f64;
                for_each_exp(row_values, |j, p| {
                    if valid(j) {
                        mass += p;
                    }
                });
                (1.0 - mass).clamp(0.0, 1.0) / rest
            };
            ce.push(-p_y.max(f64::MIN_POSITIVE).ln());
        }
    }
    Ok(NextTokenScores { top1, coverage, ce })
}

/// The probability a source's own top-K rows hold (`values`: log-probabilities, row-major
/// `[rows, k]`), and the part of it on entries that `kept` marks false (sent to the tail):
/// `(Σ p, Σ p · !kept)` over every entry, summed in entry order.
pub fn topk_mass(values: &[f32], kept: &[bool]) -> Result<(f64, f64)> {
    if values.len() != kept.len() {
        return Err(Error::Shape(format!(
            "top-K values hold {} entries but kept holds {}",
            values.len(),
            kept.len()
        )));
    }
    let (mut total, mut dropped) = (0.0f64, 0.0f64);
    for_each_exp(values, |j, p| {
        total += p;
        if !kept[j] {
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

    #[test]
    fn scores_match_the_definition() {
        let nan = f32::NAN;
        let ninf = f32::NEG_INFINITY;
        // rows of k = 3: hit at rank 0, hit at rank 2, miss, padding, NaN, duplicate hits,
        // an invalid first entry equal to y, a row whose mass exceeds 1
        let ids = [
            5, 1, 2, /**/ 1, 2, 7, /**/ 1, 2, 3, /**/ 4, -1, -1, /**/ 9, 9, 3,
            /**/ 6, 6, 1, /**/ 8, 2, 3, /**/ 1, 2, 3,
        ];
        let lp = |p: f32| p.ln();
        let values = [
            lp(0.5),
            lp(0.2),
            lp(0.1),
            lp(0.3),
            lp(0.3),
            lp(0.1),
            lp(0.4),
            lp(0.3),
            lp(0.2),
            lp(0.9),
            ninf,
            ninf,
            nan,
            lp(0.2),
            lp(0.1),
            lp(0.25),
            lp(0.25),
            lp(0.1),
            ninf,
            lp(0.5),
            lp(0.1),
            lp(0.7),
            lp(0.6),
            lp(0.2),
        ];
        let next = [5, 7, 0, 4, 9, 6, 8, 0];
        let got = next_token_scores(&ids, &values, 3, &next, 10, true).unwrap();
        for (pos, &y) in next.iter().enumerate() {
            let r = pos * 3..pos * 3 + 3;
            let (t, c, ce) = oracle(&ids[r.clone()], &values[r], y, 10);
            assert_eq!(got.top1[pos], t, "top1 at {pos}");
            assert_eq!(got.coverage[pos], c, "coverage at {pos}");
            let g = got.ce.as_ref().unwrap()[pos];
            assert!(
                (g - ce).abs() <= 1e-12 * ce.abs().max(1.0),
                "ce at {pos}: {g} vs {ce}"
            );
        }
        // the duplicate hit sums, the over-full row has no tail (floored, finite)
        assert!((got.ce.as_ref().unwrap()[5] - (-(0.5f64).ln())).abs() < 1e-6);
        assert!(got.ce.as_ref().unwrap()[7].is_finite());
        let raw = next_token_scores(&ids, &values, 3, &next, 10, false).unwrap();
        assert_eq!(
            (raw.top1, raw.coverage, raw.ce),
            (got.top1, got.coverage, None)
        );
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(matches!(
            next_token_scores(&[1, 2], &[0.0], 2, &[1], 10, true),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            next_token_scores(&[1, 2, 3], &[0.0; 3], 2, &[1], 10, true),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            next_token_scores(&[], &[], usize::MAX, &[1, 2], 10, true),
            Err(Error::Value(_))
        ));
        assert!(matches!(
            next_token_scores(&[1], &[0.0], 1, &[1], 0, true),
            Err(Error::Value(_))
        ));
        assert!(matches!(
            topk_mass(&[0.0], &[true, false]),
            Err(Error::Shape(_))
        ));
        let empty = next_token_scores(&[], &[], 0, &[3], 10, true).unwrap();
        assert_eq!(empty.top1, vec![false]);
        assert!((empty.ce.unwrap()[0] - 10f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn fast_exp_is_within_a_few_ulp() {
        let ulps = |a: f64, b: f64| (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs();
        let mut worst = 0;
        let mut x = -708.0f64;
        while x <= 709.0 {
            worst = worst.max(ulps(fast_exp(x), x.exp()));
            x += 0.0137;
        }
        for x in [
            0.0,
            -0.0,
            -1e-300,
            1e-12,
            -0.346_573_590_279_972_7,
            0.346_573_590_279_972_7,
        ] {
            worst = worst.max(ulps(fast_exp(x), x.exp()));
        }
        assert!(worst <= 4, "{worst} ulp");
        assert_eq!(fast_exp(-800.0), 0.0);
        assert_eq!(fast_exp(f64::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(800.0), f64::INFINITY);
    }

    #[test]
    fn mass_sums_every_entry() {
        let values = [0.5f32.ln(), 0.25f32.ln(), f32::NEG_INFINITY, 0.125f32.ln()];
        let (total, dropped) = topk_mass(&values, &[true, false, false, false]).unwrap();
        assert!((total - 0.875).abs() < 1e-7);
        assert!((dropped - 0.375).abs() < 1e-7);
    }
}
