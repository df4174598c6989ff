//! Offset alignment: both sides tokenized the same text, each token carries its character span.
//!
//! Position `t` of a causal LM predicts the text that follows the END of token `t`. A base position
//! can therefore take a source distribution exactly when a source token ends at the same character
//! offset: both then predict the same continuation. Where several tokens of one side end at the same
//! offset (the byte pieces of one multi-byte character, zero-width tokens), only the LAST of them is
//! followed by the next text, so only that one is paired. A single two-pointer pass, O(n + m).
//!
//! Trade-off against MinED: exact and linear, but it needs offsets from the same text on both
//! sides, and positions whose ends do not coincide get no distribution (MinED always pairs them).

use crate::error::{Error, Result};

/// Marker for "no blend position" in [`match_ends`].
pub const NO_MATCH: u32 = u32::MAX;

/// Checks that `offsets` (flat `[start, end]` pairs) is well formed: `0 <= start <= end` and
/// non-decreasing ends. `what` names the array in the error.
pub fn validate_offsets(offsets: &[i64], what: std::fmt::Arguments) -> Result<()> {
    if offsets.len() % 2 != 0 {
        return Err(Error::Shape(format!(
            "{what}: offsets must have shape [L, 2], got {} values",
            offsets.len()
        )));
    }
    // A branch-free scan first; locate the offending token only on failure. A token is bad
    // exactly when `start`, `end - start` or `end - previous end` is negative (in a valid prefix
    // all values are non-negative, so the first bad token's differences cannot overflow), and the
    // sign bits of all three, OR-ed over the array, tell whether any is. Each step reads the
    // previous end from the array, so nothing is carried between steps and the scan vectorizes.
    let first = match offsets {
        [s, e, ..] => s | e.wrapping_sub(*s),
        _ => 0,
    };
    let rest = offsets
        .chunks_exact(2)
        .zip(offsets.get(2..).unwrap_or_default().chunks_exact(2))
        .fold(0i64, |acc, (before, pair)| {
            let (prev, s, e) = (before[1], pair[0], pair[1]);
            acc | s | e.wrapping_sub(s) | e.wrapping_sub(prev)
        });
    if (first | rest) >= 0 {
        return Ok(());
    }
    let mut prev_end = i64::MIN;
    for (pos, pair) in offsets.chunks_exact(2).enumerate() {
        let (s, e) = (pair[0], pair[1]);
        if s < 0 || e < s {
            return Err(Error::Value(format!(
                "{what}: token {pos} has offsets ({s}, {e}); need 0 <= start <= end"
            )));
        }
        if e < prev_end {
            return Err(Error::Value(format!(
                "{what}: token {pos} ends at {e}, before the previous token's end {prev_end}; \
                 offsets must be in text order"
            )));
        }
        prev_end = e;
    }
    Ok(())
}

/// For each base token, the blend position that ends at the same offset (the last such), or
/// [`NO_MATCH`]. Only the last base token among those sharing an end offset is matched.
/// Both inputs are flat `[start, end]` pairs that passed [`validate_offsets`].
///
/// Text offsets are dense (a few characters a token), so the blend side is indexed by end offset
/// in a table over the base side's span of ends: two straight passes instead of a merge whose
/// branches follow the text. Unusually sparse offsets take the merge, [`match_ends_merge`].
pub fn match_ends(base_offsets: &[i64], blend_offsets: &[i64]) -> Vec<u32> {
    let mut out = Vec::new();
    match_ends_into(base_offsets, blend_offsets, &mut out, &mut Vec::new());
    out
}

/// [`match_ends`] into `out`, with `at_end` as working space (both reused across calls by a
/// caller that aligns many sequences).
pub fn match_ends_into(
    base_offsets: &[i64],
    blend_offsets: &[i64],
    out: &mut Vec<u32>,
    at_end: &mut Vec<u32>,
) {
    let (m, n) = (base_offsets.len() / 2, blend_offsets.len() / 2);
    out.clear();
    if m == 0 || n == 0 {
        out.resize(m, NO_MATCH);
        return;
    }
    // Ends are non-decreasing: the base side's ends lie in [first, last].
    let (first, last) = (base_offsets[1], base_offsets[2 * m - 1]);
    let span = usize::try_from(last - first).unwrap_or(usize::MAX);
    if span > 16 * (m + n) + 1024 {
        out.extend(match_ends_merge(base_offsets, blend_offsets));
        return;
    }
    at_end.clear();
    at_end.resize(span + 1, NO_MATCH);
    for (j, pair) in blend_offsets.chunks_exact(2).enumerate() {
        // Ends outside the base span wrap to a large index and are skipped. A later blend token
        // with the same end overwrites an earlier one: the last one is kept.
        if let Some(slot) = at_end.get_mut((pair[1] - first) as usize) {
            *slot = j as u32;
        }
    }
    let ends = |i: usize| base_offsets[2 * i + 1];
    out.extend((0..m).map(|i| {
        let e = ends(i);
        let shared = i + 1 < m && ends(i + 1) == e;
        let j = at_end
            .get((e - first) as usize)
            .copied()
            .unwrap_or(NO_MATCH);
        if shared {
            NO_MATCH
        } else {
            j
        }
    }));
}

/// [`match_ends`] as a merge of the two sorted sequences of end offsets, O(n + m) whatever the
/// offsets' span.
pub fn match_ends_merge(base_offsets: &[i64], blend_offsets: &[i64]) -> Vec<u32> {
    let base_end = |i: usize| base_offsets[2 * i + 1];
    let blend_end = |j: usize| blend_offsets[2 * j + 1];
    let (m, n) = (base_offsets.len() / 2, blend_offsets.len() / 2);
    let mut out = vec![NO_MATCH; m];
    let mut j = 0usize;
    for (i, slot) in out.iter_mut().enumerate() {
        let e = base_end(i);
        if i + 1 < m && base_end(i + 1) == e {
            continue; // not the last base token ending here
        }
        while j < n && blend_end(j) < e {
            j += 1;
        }
        while j + 1 < n && blend_end(j + 1) == e {
            j += 1;
        }
        if j < n && blend_end(j) == e {
            *slot = j as u32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(spans: &[(i64, i64)]) -> Vec<i64> {
        spans.iter().flat_map(|&(s, e)| [s, e]).collect()
    }

    #[test]
    fn shared_and_unshared_ends() {
        // "hello world": base [hel][lo][ world], blend [hello][ wor][ld]
        let base = flat(&[(0, 3), (3, 5), (5, 11)]);
        let blend = flat(&[(0, 5), (5, 9), (9, 11)]);
        assert_eq!(match_ends(&base, &blend), vec![NO_MATCH, 0, 2]);
    }

    #[test]
    fn byte_pieces_pair_the_last() {
        // one character split in two pieces on the blend side, three on the base side
        let base = flat(&[(0, 1), (0, 1), (0, 1), (1, 2)]);
        let blend = flat(&[(0, 1), (0, 1), (1, 2)]);
        assert_eq!(match_ends(&base, &blend), vec![NO_MATCH, NO_MATCH, 1, 2]);
    }

    #[test]
    fn table_and_merge_agree() {
        // A small deterministic generator: random segmentations of one text, sometimes with
        // zero-width tokens, shared byte pieces, and offsets far apart (the merge path).
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        let (mut out, mut at_end) = (Vec::new(), Vec::new());
        for case in 0..500 {
            let scale = if case % 5 == 0 { 1000 } else { 1 };
            let mut side = || {
                let (mut pos, mut spans) = (next(3) as i64, Vec::new());
                for _ in 0..1 + next(40) {
                    let step = next(4) as i64 * scale;
                    spans.push((pos, pos + step));
                    pos += step;
                }
                flat(&spans)
            };
            let (base, blend) = (side(), side());
            let want = match_ends_merge(&base, &blend);
            assert_eq!(
                match_ends(&base, &blend),
                want,
                "case {case}: {base:?} / {blend:?}"
            );
            // Buffers reused from the previous cases leave nothing behind.
            match_ends_into(&base, &blend, &mut out, &mut at_end);
            assert_eq!(out, want, "case {case}, reused buffers");
        }
    }

    #[test]
    fn validation() {
        assert!(validate_offsets(&[0, 1, 1], format_args!("x")).is_err());
        assert!(validate_offsets(&flat(&[(0, 2), (1, 1)]), format_args!("x")).is_err());
        assert!(validate_offsets(&flat(&[(2, 1)]), format_args!("x")).is_err());
        assert!(validate_offsets(&flat(&[(0, 2), (0, 2), (2, 5)]), format_args!("x")).is_ok());
    }
}
