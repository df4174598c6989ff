//! Stored logits: `f32`, or `f16` as the stages store top-K rows (extraction writes its rows in
//! float16, alignment its merged rows in `logits_dtype`).
//!
//! The kernels that read rows are generic over [`Logit`], so a stage hands them the column it
//! read without widening it first. [`widen`] and [`narrow_f16`] are the two conversions a stage
//! needs around the aligner (which merges in `f32`): widening is exact, narrowing rounds to
//! nearest and refuses a finite value that would round to infinity.

use crate::error::{Error, Result};
pub use half::f16;
use half::slice::HalfFloatSliceExt;
use std::sync::OnceLock;

/// A row value the kernels can read.
pub trait Logit: Copy + Send + Sync + 'static {
    /// The value as `f32` (exact for both types).
    fn to_f32(self) -> f32;
    /// `e^v` in `f64`, for the row sums: within a few ulp of `f64::exp` (`f32`, [`fast_exp`]),
    /// or exactly `f64::exp` of the value (`f16`, one table entry per bit pattern).
    fn exp_f64(self) -> f64;
}

impl Logit for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline(always)]
    fn exp_f64(self) -> f64 {
        fast_exp(f64::from(self))
    }
}

/// `f64::exp` of every `f16` bit pattern (512 KiB, built on first use).
fn exp_table() -> &'static [f64] {
    static TABLE: OnceLock<Box<[f64]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| f64::from(f16::from_bits(b).to_f32()).exp())
            .collect()
    })
}

impl Logit for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[inline(always)]
    fn exp_f64(self) -> f64 {
        exp_table()[usize::from(self.to_bits())]
    }
}

/// `e^x` for row sums: exact to a few ulp for `x` in `[-708, 709]`, `0` below (probabilities
/// under `1e-307` add nothing to a sum of at most `k` terms), `inf` above. Evaluated without a
/// library call (a range reduction by `ln 2` and a degree-13 polynomial), so that the
/// exponentials of a chunk of entries overlap (measured: `topk_mass` over 4.8 M entries 143 ms ->
/// 32 ms against `f64::exp`).
#[inline(always)]
pub(crate) fn fast_exp(x: f64) -> f64 {
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
/// of entries are independent, so they are computed side by side before `f` sees them.
#[inline]
pub(crate) fn for_each_exp<V: Logit>(values: &[V], mut f: impl FnMut(usize, f64)) {
    const CHUNK: usize = 8;
    for (c, chunk) in values.chunks(CHUNK).enumerate() {
        let mut e = [0.0f64; CHUNK];
        for (slot, &v) in e.iter_mut().zip(chunk) {
            *slot = v.exp_f64();
        }
        for (i, &p) in e.iter().take(chunk.len()).enumerate() {
            f(c * CHUNK + i, p);
        }
    }
}

/// The values as `f32` (exact; eight at a time with F16C where the CPU has it).
pub fn widen(values: &[f16]) -> Vec<f32> {
    let mut out = vec![0.0f32; values.len()];
    values.convert_to_f32_slice(&mut out);
    out
}

/// The values rounded to the nearest `f16`; a finite value that rounds to infinity (`|v| >=
/// 65520`) is an error naming it. Infinities and NaN keep their meaning (`-inf` is padding).
pub fn narrow_f16(values: &[f32]) -> Result<Vec<f16>> {
    let mut out = vec![f16::ZERO; values.len()];
    out.convert_from_f32_slice(values);
    let overflow = |(h, v): (&f16, &f32)| h.to_bits() & 0x7fff == 0x7c00 && v.is_finite();
    if let Some(j) = out.iter().zip(values).position(overflow) {
        return Err(Error::Value(format!(
            "a merged logit ({:?}) overflows float16; use logits_dtype='float32'",
            values[j]
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_f16_table_is_f64_exp_of_every_value() {
        for b in (0..=u16::MAX)
            .step_by(7)
            .chain([0x7c00, 0xfc00, 0x7e00, 0x8000])
        {
            let h = f16::from_bits(b);
            let want = f64::from(h.to_f32()).exp();
            let got = h.exp_f64();
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h}: {got} vs {want}"
            );
        }
        assert_eq!(f16::NEG_INFINITY.exp_f64(), 0.0);
    }

    #[test]
    fn narrowing_refuses_exactly_the_values_that_overflow() {
        // 65504 is the largest f16; from 65520 on a finite value rounds to infinity.
        let ok = [65504.0f32, 65519.99, -65519.99, f32::NEG_INFINITY, -1.5];
        let got = narrow_f16(&ok).unwrap();
        assert_eq!(got[0], f16::MAX);
        assert_eq!(got[1], f16::MAX);
        assert_eq!(got[2], f16::MIN);
        assert!(got[3].is_infinite() && got[3] < f16::ZERO);
        assert_eq!(widen(&got[3..]), vec![f32::NEG_INFINITY, -1.5]);
        for bad in [65520.0f32, -65520.0, 1e30] {
            let err = narrow_f16(&[0.0, bad]).unwrap_err();
            assert!(err.to_string().contains(&format!("({bad:?})")), "{err}");
        }
    }
}
