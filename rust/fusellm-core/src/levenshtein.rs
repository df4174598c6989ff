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
        assert_eq!(levenshtein_str("héllo", "hello"), 1, "code points, not bytes");
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
