//! Levenshtein distance over Unicode code points.
//!
//! Tokens are short, so the common case is a pattern of at most 64 code points, for which the
//! bit-parallel algorithm of Myers (1999), in Hyyrö's formulation for the global edit distance,
//! computes one DP column per text character in a handful of word operations. Longer patterns
//! fall back to the classic two-row dynamic programme. Common prefixes and suffixes are trimmed
//! first (they never change the distance), which leaves most token pairs with a few characters.

/// Edit distance (unit insert, delete, substitute) between two code-point slices.
pub fn levenshtein(a: &[char], b: &[char]) -> u32 {
    let (a, b) = trim_common(a, b);
    if a.is_empty() {
        return b.len() as u32;
    }
    if b.is_empty() {
        return a.len() as u32;
    }
    // The shorter string is the bit-parallel pattern.
    let (pattern, text) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    if pattern.len() <= 64 {
        myers64(pattern, text)
    } else {
        classic(pattern, text)
    }
}

/// Edit distance between two `str`s, counted in code points.
pub fn levenshtein_str(a: &str, b: &str) -> u32 {
    if a == b {
        return 0;
    }
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    levenshtein(&a, &b)
}

fn trim_common<'a>(mut a: &'a [char], mut b: &'a [char]) -> (&'a [char], &'a [char]) {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    a = &a[prefix..];
    b = &b[prefix..];
    let suffix = a
        .iter()
        .rev()
        .zip(b.iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    (&a[..a.len() - suffix], &b[..b.len() - suffix])
}

/// Distances between every string of one set ("patterns") and every string of another ("texts").
///
/// Characters are renumbered into a dense local alphabet once, and every string of at most 64
/// code points, on both sides, gets its match-mask table (`alphabet` words) once. A distance then
/// runs the bit-parallel recurrence over the shorter of the two strings, one table load and about
/// a dozen word operations per character. Strings longer than 64 code points on both sides use
/// [`levenshtein`]. Built only when the tables stay small (see [`PatternSet::new`]).
pub struct PatternSet<'a> {
    patterns: &'a [&'a [char]],
    alphabet: usize,
    peq: Vec<u64>,
    text_peq: Vec<u64>,
    pattern_codes: Vec<Encoded>,
}

/// A string encoded in the alphabet of a [`PatternSet`].
pub type Encoded = Vec<u16>;

impl<'a> PatternSet<'a> {
    /// Builds the tables for `patterns` and `texts`; also returns the encoded texts. `None` if the
    /// tables would exceed `max_words` 64-bit words or the alphabet exceeds 65,535 characters.
    pub fn new(
        patterns: &'a [&'a [char]],
        texts: &[&[char]],
        max_words: usize,
    ) -> Option<(Self, Vec<Encoded>)> {
        Self::with_buffers(patterns, texts, max_words, Vec::new(), Vec::new())
    }

    /// As [`PatternSet::new`], building the two tables in the given buffers (reused allocations;
    /// their contents are overwritten). [`PatternSet::into_buffers`] hands them back.
    pub fn with_buffers(
        patterns: &'a [&'a [char]],
        texts: &[&[char]],
        max_words: usize,
        peq_buffer: Vec<u64>,
        text_peq_buffer: Vec<u64>,
    ) -> Option<(Self, Vec<Encoded>)> {
        let mut ids: rustc_hash::FxHashMap<char, u16> = rustc_hash::FxHashMap::default();
        let encode = |s: &[char], ids: &mut rustc_hash::FxHashMap<char, u16>| -> Option<Encoded> {
            s.iter()
                .map(|c| {
                    let next = ids.len();
                    if next >= usize::from(u16::MAX) && !ids.contains_key(c) {
                        return None;
                    }
                    Some(*ids.entry(*c).or_insert(next as u16))
                })
                .collect()
        };
        let pattern_codes: Vec<Encoded> = patterns
            .iter()
            .map(|p| encode(p, &mut ids))
            .collect::<Option<_>>()?;
        let texts: Vec<Encoded> = texts
            .iter()
            .map(|t| encode(t, &mut ids))
            .collect::<Option<_>>()?;
        let alphabet = ids.len().max(1);
        if alphabet.checked_mul(patterns.len() + texts.len())? > max_words {
            return None;
        }
        let tables = |strings: &[Encoded], mut peq: Vec<u64>| -> Vec<u64> {
            peq.clear();
            peq.resize(alphabet * strings.len(), 0);
            for (p, codes) in strings.iter().enumerate() {
                if codes.len() <= 64 {
                    let row = &mut peq[p * alphabet..(p + 1) * alphabet];
                    for (i, &c) in codes.iter().enumerate() {
                        row[usize::from(c)] |= 1u64 << i;
                    }
                }
            }
            peq
        };
        let peq = tables(&pattern_codes, peq_buffer);
        let text_peq = tables(&texts, text_peq_buffer);
        Some((
            PatternSet {
                patterns,
                alphabet,
                peq,
                text_peq,
                pattern_codes,
            },
            texts,
        ))
    }

    /// The two table allocations, for reuse by [`PatternSet::with_buffers`].
    pub fn into_buffers(self) -> (Vec<u64>, Vec<u64>) {
        (self.peq, self.text_peq)
    }

    /// Edit distance between pattern `p` and text `t`, given as code points and encoded (the
    /// `t`-th string returned by [`PatternSet::new`]).
    #[inline]
    pub fn distance(&self, p: usize, t: usize, text: &[char], encoded: &[u16]) -> u32 {
        let pattern = self.patterns[p];
        let (m, n) = (pattern.len(), text.len());
        if m == 0 || n == 0 {
            return m.max(n) as u32;
        }
        // Run over the shorter string with the longer one's match masks (one word operation
        // group per character). On equal lengths, and when only the text fits a word, use the
        // text's masks: callers vary the pattern fastest (a DP row fixes the text), so that
        // table row stays in cache across calls.
        let text_masks = (n, t, self.pattern_codes[p].as_slice());
        let (rows, row, len, codes) = if n <= 64 && (m <= n || m > 64) {
            (&self.text_peq, text_masks.1, text_masks.0, text_masks.2)
        } else if m <= 64 {
            (&self.peq, p, m, encoded)
        } else {
            return levenshtein(pattern, text);
        };
        let table = &rows[row * self.alphabet..(row + 1) * self.alphabet];
        bit_parallel(table, len, codes)
    }
}

/// Myers / Hyyrö recurrence: distance between a string of `len` (1..=64) code points, given by its
/// match-mask `table`, and the string `codes`.
#[inline]
fn bit_parallel(table: &[u64], len: usize, codes: &[u16]) -> u32 {
    // Bits above `len` hold garbage, but carries only move upwards, so the bit that is read
    // (`last`) never depends on them: no masking needed.
    let last: u64 = 1u64 << (len - 1);
    let (mut pv, mut mv) = (u64::MAX, 0u64);
    let mut score = len as u32;
    for &c in codes {
        let eq = table.get(usize::from(c)).copied().unwrap_or(0);
        let xv = eq | mv;
        let xh = ((eq & pv).wrapping_add(pv) ^ pv) | eq;
        let ph = mv | !(xh | pv);
        let mh = pv & xh;
        score += u32::from(ph & last != 0);
        score -= u32::from(mh & last != 0);
        let ph = (ph << 1) | 1;
        let mh = mh << 1;
        pv = mh | !(xv | ph);
        mv = ph & xv;
    }
    score
}

/// Myers / Hyyrö bit-vector edit distance; `pattern.len()` must be in 1..=64.
fn myers64(pattern: &[char], text: &[char]) -> u32 {
    let m = pattern.len();
    debug_assert!((1..=64).contains(&m));
    // Pattern alphabet with one match mask per distinct character (linear scan: tokens are tiny).
    let mut chars: [char; 64] = ['\0'; 64];
    let mut masks: [u64; 64] = [0; 64];
    let mut distinct = 0usize;
    for (i, &c) in pattern.iter().enumerate() {
        match chars[..distinct].iter().position(|&d| d == c) {
            Some(k) => masks[k] |= 1u64 << i,
            None => {
                chars[distinct] = c;
                masks[distinct] = 1u64 << i;
                distinct += 1;
            }
        }
    }
    let full: u64 = if m == 64 { u64::MAX } else { (1u64 << m) - 1 };
    let last: u64 = 1u64 << (m - 1);
    let mut pv: u64 = full;
    let mut mv: u64 = 0;
    let mut score = m as u32;
    for &c in text {
        let eq = chars[..distinct]
            .iter()
            .position(|&d| d == c)
            .map_or(0, |k| masks[k]);
        let xv = eq | mv;
        let xh = ((eq & pv).wrapping_add(pv) ^ pv) | eq;
        let mut ph = mv | !(xh | pv);
        let mut mh = pv & xh;
        if ph & last != 0 {
            score += 1;
        }
        if mh & last != 0 {
            score -= 1;
        }
        ph = (ph << 1) | 1;
        mh <<= 1;
        pv = (mh | !(xv | ph)) & full;
        mv = ph & xv & full;
    }
    score
}

/// Two-row dynamic programme, O(|a|·|b|) time, O(|a|) memory.
fn classic(a: &[char], b: &[char]) -> u32 {
    let mut row: Vec<u32> = (0..=a.len() as u32).collect();
    for (j, &cb) in b.iter().enumerate() {
        let mut diag = row[0];
        row[0] = j as u32 + 1;
        for (i, &ca) in a.iter().enumerate() {
            let sub = diag + u32::from(ca != cb);
            diag = row[i + 1];
            row[i + 1] = sub.min(row[i] + 1).min(diag + 1);
        }
    }
    row[a.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chars(s: &str) -> Vec<char> {
        s.chars().collect()
    }

    #[test]
    fn known_distances() {
        assert_eq!(levenshtein_str("kitten", "sitting"), 3);
        assert_eq!(levenshtein_str("", "abc"), 3);
        assert_eq!(levenshtein_str("abc", ""), 3);
        assert_eq!(levenshtein_str("flaw", "lawn"), 2);
        assert_eq!(
            levenshtein_str("héllo", "hello"),
            1,
            "code points, not bytes"
        );
        assert_eq!(levenshtein_str("âĢĶ", "—"), 3);
        assert_eq!(levenshtein_str("<0x0A>", "Ċ"), 6);
    }

    #[test]
    fn long_patterns_use_the_classic_path() {
        let a: String = "ab".repeat(70);
        let b: String = "ba".repeat(71);
        let (ca, cb) = (chars(&a), chars(&b));
        assert_eq!(levenshtein(&ca, &cb), classic(&ca, &cb));
        assert_eq!(levenshtein(&ca, &cb), 2);
    }

    proptest! {
        #[test]
        fn pattern_set_equals_dp(
            pats in prop::collection::vec("[abcé▁Ġ]{0,70}", 1..6),
            texts in prop::collection::vec("[abcdé▁]{0,70}", 1..6),
        ) {
            let pc: Vec<Vec<char>> = pats.iter().map(|s| chars(s)).collect();
            let tc: Vec<Vec<char>> = texts.iter().map(|s| chars(s)).collect();
            let pr: Vec<&[char]> = pc.iter().map(Vec::as_slice).collect();
            let tr: Vec<&[char]> = tc.iter().map(Vec::as_slice).collect();
            let (set, enc) = PatternSet::new(&pr, &tr, 1 << 20).unwrap();
            for (p, pat) in pc.iter().enumerate() {
                for (t, text) in tc.iter().enumerate() {
                    prop_assert_eq!(set.distance(p, t, text, &enc[t]), classic(pat, text));
                }
            }
        }

        #[test]
        fn bit_parallel_equals_dp(a in "[abcé▁Ġ]{0,70}", b in "[abcé▁Ġ]{0,70}") {
            let (ca, cb) = (chars(&a), chars(&b));
            let expect = if ca.is_empty() { cb.len() as u32 } else { classic(&ca, &cb) };
            prop_assert_eq!(levenshtein(&ca, &cb), expect);
            prop_assert_eq!(levenshtein(&cb, &ca), expect);
        }

        #[test]
        fn exactly_64_and_65(a in "[ab]{64,65}", b in "[ab]{60,70}") {
            let (ca, cb) = (chars(&a), chars(&b));
            prop_assert_eq!(levenshtein(&ca, &cb), classic(&ca, &cb));
        }
    }
}
