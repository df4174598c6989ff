//! Levenshtein distance over Unicode code points.
//!
//! Tokens are short, so the common case is a pattern of at most 64 code points, for which the
//! bit-parallel algorithm of Myers (1999), in Hyyrö's formulation for the global edit distance,
//! computes one DP column per text character in a handful of word operations. Longer patterns
//! fall back to the classic two-row dynamic programme. Common prefixes and suffixes are trimmed
//! first (they never change the distance), which leaves most token pairs with a few characters.
//!
//! [`AllPairs`] runs the same recurrence for every pair of two string sets at once, one pattern
//! per lane of a vector register.

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

/// Every distance between a set of texts and a set of patterns, computed eagerly.
///
/// [`PatternSet::distance`] answers one pair at a time; when most pairs of two small sets are
/// needed (MinED's cost table), it is cheaper to run the bit-parallel recurrence for *all*
/// patterns at once: each pattern is a lane of a machine word (16 bits for patterns of up to 16
/// code points, 64 bits up to 64), the match masks of every lane for one text character form one
/// contiguous row, and a text character advances every lane with the same dozen element-wise
/// operations. Those loops carry nothing between lanes, so the compiler vectorizes them (eight
/// 16-bit lanes per SSE2 register, sixteen in the AVX2 build chosen at run time). Empty
/// patterns, longer patterns and very long texts are measured pair by pair with
/// [`levenshtein`].
///
/// The struct holds the work buffers, so that a thread reuses them from call to call.
#[derive(Default)]
pub struct AllPairs {
    texts: Coded,
    text_index: Vec<u32>,
    patterns: Coded,
    short: Lanes<u16>,
    medium: Lanes<u64>,
}

/// Texts longer than this are measured pair by pair, which keeps 16-bit lane scores exact.
/// (Tests use small limits so that every path runs.)
#[cfg(not(test))]
const LANE_TEXT_MAX: usize = 32_000;
#[cfg(test)]
const LANE_TEXT_MAX: usize = 64;

/// Largest match-mask table built at once, in bytes; more lanes than fit are run in chunks (of
/// at least 16 lanes).
#[cfg(not(test))]
const LANE_TABLE_BYTES: usize = 4 << 20;
#[cfg(test)]
const LANE_TABLE_BYTES: usize = 256;

impl AllPairs {
    /// Fills `out[t * patterns.len() + p]` with the distance between `texts[t]` and
    /// `patterns[p]`, plus one; 0 where that does not fit 16 bits (callers measure those pairs
    /// themselves). `out.len()` must be `texts.len() * patterns.len()`.
    pub fn fill(&mut self, texts: &[&[char]], patterns: &[&[char]], out: &mut [u16]) {
        let np = patterns.len();
        assert_eq!(out.len(), texts.len() * np, "AllPairs::fill: output size");
        let store = |d: u32| u16::try_from(d + 1).unwrap_or(0);
        // Patterns of at most 64 code points are coded; longer ones are left empty (no lane runs
        // them), and so are their characters.
        let mut alphabet = Alphabet::default();
        self.patterns.clear();
        for p in patterns {
            let lane = if p.len() <= 64 { *p } else { &[] };
            self.patterns.push(lane.iter().map(|&c| alphabet.insert(c)));
        }
        self.texts.clear();
        self.text_index.clear();
        for (i, t) in texts.iter().enumerate() {
            if t.len() <= LANE_TEXT_MAX {
                self.texts.push(t.iter().map(|&c| alphabet.code(c)));
                self.text_index.push(i as u32);
            }
        }
        let lane_texts = Texts {
            coded: &self.texts,
            index: &self.text_index,
            rows: alphabet.len + 1,
        };
        // Every pattern has a 16-bit lane, in order, so that results are stored as contiguous
        // runs; lanes of patterns that are empty or longer than 16 code points are placeholders
        // whose results are overwritten below.
        let all: Vec<u32> = (0..np as u32).collect();
        self.short.run(&all, &self.patterns, &lane_texts, np, out);
        let medium: Vec<u32> = all
            .iter()
            .copied()
            .filter(|&k| (17..=64).contains(&patterns[k as usize].len()))
            .collect();
        self.medium
            .run(&medium, &self.patterns, &lane_texts, np, out);
        for (k, p) in patterns.iter().enumerate() {
            if p.is_empty() || p.len() > 64 {
                for (t, text) in texts.iter().enumerate() {
                    out[t * np + k] = store(levenshtein(text, p));
                }
            }
        }
        // Texts too long for 16-bit lane scores, which the lanes skipped.
        for (t, text) in texts.iter().enumerate() {
            if text.len() > LANE_TEXT_MAX {
                for (k, p) in patterns.iter().enumerate() {
                    out[t * np + k] = store(levenshtein(text, p));
                }
            }
        }
    }
}

/// Codes of the characters of the lane patterns, from 1 (0 stands for any other character).
/// Code points below 512 (ASCII, Latin-1, the byte-level alphabets) are looked up in an array,
/// the others in a hash map.
struct Alphabet {
    low: [u32; 512],
    high: rustc_hash::FxHashMap<char, u32>,
    len: usize,
}

impl Default for Alphabet {
    fn default() -> Self {
        Alphabet {
            low: [0; 512],
            high: rustc_hash::FxHashMap::default(),
            len: 0,
        }
    }
}

impl Alphabet {
    /// The code of `c`, assigned on first sight.
    fn insert(&mut self, c: char) -> u32 {
        let slot = match self.low.get_mut(c as usize) {
            Some(slot) => slot,
            None => self.high.entry(c).or_insert(0),
        };
        if *slot == 0 {
            self.len += 1;
            *slot = self.len as u32;
        }
        *slot
    }

    /// The code of `c`, 0 if no pattern holds it.
    #[inline]
    fn code(&self, c: char) -> u32 {
        match self.low.get(c as usize) {
            Some(&code) => code,
            None => self.high.get(&c).copied().unwrap_or(0),
        }
    }
}

/// Strings as character codes: `codes[starts[i]..starts[i + 1]]` for string `i`.
#[derive(Default)]
struct Coded {
    codes: Vec<u32>,
    starts: Vec<usize>,
}

impl Coded {
    fn clear(&mut self) {
        self.codes.clear();
        self.starts.clear();
        self.starts.push(0);
    }

    fn push(&mut self, codes: impl Iterator<Item = u32>) {
        self.codes.extend(codes);
        self.starts.push(self.codes.len());
    }

    #[inline]
    fn get(&self, i: usize) -> &[u32] {
        &self.codes[self.starts[i]..self.starts[i + 1]]
    }
}

/// The texts that the lanes run over (those of at most [`LANE_TEXT_MAX`] code points): coded
/// text `t` is text number `index[t]`; `rows` character codes in all.
struct Texts<'a> {
    coded: &'a Coded,
    index: &'a [u32],
    rows: usize,
}

/// A machine word used as one lane of the all-pairs recurrence.
trait Word:
    Copy
    + Default
    + Eq
    + std::ops::BitAnd<Output = Self>
    + std::ops::BitOr<Output = Self>
    + std::ops::BitXor<Output = Self>
    + std::ops::Not<Output = Self>
    + std::ops::Shl<u32, Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    const ONES: Self;
    fn add(self, other: Self) -> Self;
    fn sub(self, other: Self) -> Self;
    fn from_len(len: usize) -> Self;
    fn to_u32(self) -> u32;
}

macro_rules! word {
    ($t:ty) => {
        impl Word for $t {
            const ZERO: Self = 0;
            const ONE: Self = 1;
            const ONES: Self = <$t>::MAX;
            #[inline(always)]
            fn add(self, other: Self) -> Self {
                self.wrapping_add(other)
            }
            #[inline(always)]
            fn sub(self, other: Self) -> Self {
                self.wrapping_sub(other)
            }
            #[inline(always)]
            fn from_len(len: usize) -> Self {
                len as $t
            }
            #[inline(always)]
            fn to_u32(self) -> u32 {
                self as u32
            }
        }
    };
}
word!(u16);
word!(u64);

/// Lanes of one word size: per lane, the pattern's last bit and length; per character of the
/// chunk's patterns, the match masks of all lanes (`local` maps a character code to its table
/// row, 0 being the row of characters no lane holds); and the running state.
#[derive(Default)]
struct Lanes<W> {
    local: Vec<u32>,
    table: Vec<W>,
    last: Vec<W>,
    len: Vec<W>,
    pv: Vec<W>,
    mv: Vec<W>,
    score: Vec<W>,
}

impl<W: Word> Lanes<W> {
    /// Runs the coded patterns `members` (ascending) against every text of `texts`, writing
    /// `distance + 1` into `out`. Patterns of 1 to `8 * size_of::<W>()` code points get their
    /// distances; lanes of other patterns hold placeholders, for the caller to overwrite.
    fn run(
        &mut self,
        members: &[u32],
        patterns: &Coded,
        texts: &Texts,
        np: usize,
        out: &mut [u16],
    ) {
        let bits = 8 * std::mem::size_of::<W>();
        let in_lane = |p: &[u32]| (1..=bits).contains(&p.len());
        // Chunks are sized as if every character had a row, which bounds the table whatever
        // the alphabet; the table itself only has rows for the chunk's own characters.
        let per_chunk = (LANE_TABLE_BYTES / (texts.rows * std::mem::size_of::<W>())).max(16);
        self.local.clear();
        self.local.resize(texts.rows, 0);
        for chunk in members.chunks(per_chunk) {
            let lanes = chunk.len();
            let mut rows = 1usize;
            for &k in chunk {
                let p = patterns.get(k as usize);
                for &c in p.iter().filter(|_| in_lane(p)) {
                    let row = &mut self.local[c as usize];
                    if *row == 0 {
                        *row = rows as u32;
                        rows += 1;
                    }
                }
            }
            self.table.clear();
            self.table.resize(rows * lanes, W::ZERO);
            self.last.clear();
            self.len.clear();
            for (lane, &k) in chunk.iter().enumerate() {
                let p = patterns.get(k as usize);
                if !in_lane(p) {
                    self.last.push(W::ONE);
                    self.len.push(W::ONE);
                    continue;
                }
                for (bit, &c) in p.iter().enumerate() {
                    let row = self.local[c as usize] as usize;
                    let cell = &mut self.table[row * lanes + lane];
                    *cell = *cell | (W::ONE << bit as u32);
                }
                self.last.push(W::ONE << (p.len() - 1) as u32);
                self.len.push(W::from_len(p.len()));
            }
            texts_pass(self, chunk, texts, np, out);
            for &k in chunk {
                for &c in patterns.get(k as usize) {
                    self.local[c as usize] = 0;
                }
            }
        }
    }
}

/// Runs one chunk of lanes over every text and stores the scores, with the widest vectors the
/// CPU offers: the same code, compiled once more for AVX2 (16 lanes of 16 bits a register
/// instead of SSE2's 8), is chosen at run time.
fn texts_pass<W: Word>(
    lanes: &mut Lanes<W>,
    chunk: &[u32],
    texts: &Texts,
    np: usize,
    out: &mut [u16],
) {
    #[cfg(target_arch = "x86_64")]
    if wide_vectors() {
        // SAFETY: the CPU supports AVX2, checked at run time just above.
        unsafe { texts_pass_avx2(lanes, chunk, texts, np, out) };
        return;
    }
    texts_pass_any(lanes, chunk, texts, np, out);
}

/// Whether to run the AVX2 build of [`texts_pass_any`].
#[cfg(target_arch = "x86_64")]
fn wide_vectors() -> bool {
    #[cfg(test)]
    if NARROW_ONLY.with(|n| n.get()) {
        return false;
    }
    std::arch::is_x86_feature_detected!("avx2")
}

#[cfg(all(test, target_arch = "x86_64"))]
thread_local! {
    /// Set by tests to run the baseline build of the lane pass.
    static NARROW_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// [`texts_pass_any`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn texts_pass_avx2<W: Word>(
    lanes: &mut Lanes<W>,
    chunk: &[u32],
    texts: &Texts,
    np: usize,
    out: &mut [u16],
) {
    texts_pass_any(lanes, chunk, texts, np, out);
}

#[inline(always)]
fn texts_pass_any<W: Word>(
    l: &mut Lanes<W>,
    chunk: &[u32],
    texts: &Texts,
    np: usize,
    out: &mut [u16],
) {
    let lanes = chunk.len();
    // A chunk of consecutive patterns is stored as one run of each output row.
    let run = (chunk[lanes - 1] - chunk[0]) as usize + 1 == lanes;
    for (i, &t) in texts.index.iter().enumerate() {
        l.pv.clear();
        l.pv.resize(lanes, W::ONES);
        l.mv.clear();
        l.mv.resize(lanes, W::ZERO);
        l.score.clear();
        l.score.extend_from_slice(&l.len);
        for &code in texts.coded.get(i) {
            let row = l.local[code as usize] as usize;
            let eqs = &l.table[row * lanes..(row + 1) * lanes];
            step(eqs, &l.last, &mut l.pv, &mut l.mv, &mut l.score);
        }
        // Scores are at most max(pattern, text) <= LANE_TEXT_MAX code points.
        let row = &mut out[t as usize * np..(t as usize + 1) * np];
        if run {
            let first = chunk[0] as usize;
            for (o, &s) in row[first..first + lanes].iter_mut().zip(&l.score) {
                *o = s.to_u32() as u16 + 1;
            }
        } else {
            for (&k, &s) in chunk.iter().zip(&l.score) {
                row[k as usize] = s.to_u32() as u16 + 1;
            }
        }
    }
}

/// One text character for every lane (Myers / Hyyrö, as in [`bit_parallel`]).
#[inline(always)]
fn step<W: Word>(eqs: &[W], last: &[W], pv: &mut [W], mv: &mut [W], score: &mut [W]) {
    for ((((&eq, &last), pv), mv), score) in eqs
        .iter()
        .zip(last)
        .zip(pv.iter_mut())
        .zip(mv.iter_mut())
        .zip(score.iter_mut())
    {
        let (p, m) = (*pv, *mv);
        let xv = eq | m;
        let xh = ((eq & p).add(p) ^ p) | eq;
        let ph = m | !(xh | p);
        let mh = p & xh;
        let up = if ph & last == W::ZERO {
            W::ZERO
        } else {
            W::ONE
        };
        let down = if mh & last == W::ZERO {
            W::ZERO
        } else {
            W::ONE
        };
        *score = score.add(up).sub(down);
        let ph = (ph << 1) | W::ONE;
        let mh = mh << 1;
        *pv = mh | !(xv | ph);
        *mv = ph & xv;
    }
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
        fn all_pairs_equals_dp(
            // Lengths around the 16- and 64-code-point lane limits, empty strings included.
            pats in prop::collection::vec(prop_oneof![
                "[abcé▁Ġ]{0,5}", "[ab]{15,18}", "[abé]{62,67}"
            ], 0..40),
            texts in prop::collection::vec(prop_oneof!["[abcdé▁]{0,8}", "[ab]{60,70}"], 0..12),
        ) {
            let pc: Vec<Vec<char>> = pats.iter().map(|s| chars(s)).collect();
            let tc: Vec<Vec<char>> = texts.iter().map(|s| chars(s)).collect();
            let pr: Vec<&[char]> = pc.iter().map(Vec::as_slice).collect();
            let tr: Vec<&[char]> = tc.iter().map(Vec::as_slice).collect();
            let mut all = AllPairs::default();
            // Twice with one `AllPairs` (buffers reused from a previous call must not leak),
            // with the AVX2 build where the CPU has it, then with the baseline build.
            for narrow in [false, true] {
                #[cfg(target_arch = "x86_64")]
                NARROW_ONLY.with(|n| n.set(narrow));
                #[cfg(not(target_arch = "x86_64"))]
                let _ = narrow;
                let mut out = vec![7u16; tr.len() * pr.len()];
                all.fill(&tr, &pr, &mut out);
                for (t, text) in tc.iter().enumerate() {
                    for (p, pat) in pc.iter().enumerate() {
                        let want = if text.is_empty() { pat.len() as u32 } else { classic(text, pat) };
                        prop_assert_eq!(u32::from(out[t * pr.len() + p]), want + 1);
                    }
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
