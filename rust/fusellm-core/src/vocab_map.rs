//! Vocabulary mapping: every blend (source) token string to a base (target) token.
//!
//! The key of a blend token `x` is `t`, `x` with the blend marker replaced by the base marker.
//! Three methods:
//!
//! - [`MapMethod::Exact`]: `t` itself when it is a base token, else unmapped.
//! - [`MapMethod::Mined`] (the reference "default" map, spec section 5): `t` when it is a base
//!   token, else the base token `y` with the smallest Levenshtein distance `lev(t, y)` over code
//!   points, markers included, ties to the lowest base id.
//! - [`MapMethod::Surface`]: first the base token whose DECODED SURFACE BYTES equal those of `x`
//!   (byte-level `Ġ` vocabularies through the GPT-2 byte-to-unicode table, SentencePiece `▁`
//!   vocabularies with `▁` as a space and `<0xHH>` as the byte `HH`, see [`surface_bytes`]), so
//!   `Ċ` maps to `<0x0A>` and `âĢĶ` to `—`; among several, the base string equal to `t`, else a
//!   token that is not a `<0xHH>` byte piece, else the lowest id. Without a surface match, MinED.
//!
//! The map is a function of `t`: blend ids with the same key share one target, so it can be saved
//! as the reference pipeline's JSON object `{t: base string}` without losing anything.
//!
//! # Exact MinED, fast
//!
//! The brute-force definition measures `|V_blend| x |V_base|` distances (4.9 billion for Qwen onto
//! Mistral). [`NearestIndex`] gives bit-identical answers with a small fraction of that work, in
//! three tiers:
//!
//! 1. exact keys are answered by one hash look-up;
//! 2. close matches come from deletion neighbourhoods: every string within `k` edits of the query
//!    shares a string with it obtained by deleting at most `k` characters from each (a
//!    substitution is one deletion on each side). The index holds, for every base string, the
//!    hashes of its variants with up to 4 deletions (fewer if that would exceed a key budget);
//!    stage `j` looks up the query's variants with exactly `j` deletions and measures the
//!    candidates exactly. After stage `j` every base string within `j` edits has been measured,
//!    so a best distance `<= j` is final, ties included. Queries with many characters that are
//!    rare in the base vocabulary skip this tier (they are never close);
//! 3. everything else is a best-first branch and bound over a trie of the base vocabulary. A
//!    node carries the Levenshtein DP row of the query against its prefix (shared prefixes are
//!    measured once), the range of suffix lengths below it, the characters on the edges below it
//!    (a 256-bit mask) and the lowest base id below it. Its lower bound is
//!    `min_i row[i] + f_i`, `f_i` bounding `lev(query[i..], s)` over the suffixes `s` below from
//!    their lengths and the query characters that occur nowhere below
//!    (`lev(u, s) >= max(|u|, |s|) - common(u, s)`). The frontier is a heap ordered by
//!    (bound, lowest id below): the search stops when the next entry can neither beat the best
//!    distance nor tie it with a lower id, so the answer, ties included, is the brute force's.
//!    The candidate found by tier 2, if any, seeds the search.
//!
//! Trade-off: the work per query grows with its distance to the base vocabulary. Most tokens are
//! a few edits from a base token (tier 2, a few microseconds); long tokens with no close match
//! (code identifiers, CJK byte pieces) go to tier 3 and cost up to a few milliseconds, since many
//! subtrees can still hold a string at the best distance. The deletion index costs memory (about
//! 2.6 million keys for Mistral's 32k tokens). [`nearest_brute_force`] keeps the literal
//! definition for tests and benchmarks.

use crate::batch::par_map;
use crate::error::{Error, Result};
use crate::levenshtein::levenshtein;
use rustc_hash::FxHashMap;

const NONE: u32 = u32::MAX;

/// How blend tokens are mapped to base tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapMethod {
    /// Marker-swapped exact string match only.
    Exact,
    /// Exact match, else the nearest base string by Levenshtein distance (the reference).
    Mined,
    /// Equal decoded surface bytes, else MinED.
    Surface,
}

/// How a blend token got its target, in [`VocabMapping::kinds`].
pub mod kind {
    /// No target (no token string, or no exact match in `Exact` mode, or an empty base).
    pub const UNMAPPED: u8 = 0;
    /// The marker-swapped string is a base token.
    pub const EXACT: u8 = 1;
    /// A different base string with the same decoded surface bytes.
    pub const SURFACE: u8 = 2;
    /// The nearest base string by edit distance (distance at least 1).
    pub const MINED: u8 = 3;
}

/// A vocabulary map over blend ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VocabMapping {
    /// Base id per blend id (the lowest id of the target string), `-1` when unmapped.
    pub base_ids: Vec<i32>,
    /// [`kind`] code per blend id.
    pub kinds: Vec<u8>,
    /// `lev(t, target)` per blend id (0 for exact matches, also measured for surface matches),
    /// `u32::MAX` when unmapped.
    pub distances: Vec<u32>,
}

/// Replaces every occurrence of the blend marker by the base marker.
pub fn swap_marker(token: &str, blend_marker: &str, base_marker: &str) -> String {
    if blend_marker.is_empty() || blend_marker == base_marker {
        token.to_string()
    } else {
        token.replace(blend_marker, base_marker)
    }
}

// ---------------------------------------------------------------------------------------------
// Surface bytes

/// GPT-2's byte-to-unicode table, inverted: code point -> byte.
fn byte_level_decoder() -> FxHashMap<char, u8> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut table = FxHashMap::default();
    let mut extra = 0u32;
    for b in 0u32..256 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table.insert(char::from_u32(c).unwrap_or('\0'), b as u8);
    }
    table
}

/// Decodes vocabulary strings of one tokenizer family into the bytes they stand for.
#[derive(Debug, Clone)]
pub struct SurfaceDecoder {
    kind: SurfaceKind,
    table: FxHashMap<char, u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SurfaceKind {
    ByteLevel,
    SentencePiece,
    Plain,
}

impl SurfaceDecoder {
    /// The decoder for a vocabulary whose word-boundary marker is `marker`: `"Ġ"` byte-level,
    /// `"▁"` SentencePiece, anything else plain UTF-8.
    pub fn for_marker(marker: &str) -> Self {
        let kind = match marker {
            "Ġ" => SurfaceKind::ByteLevel,
            "▁" => SurfaceKind::SentencePiece,
            _ => SurfaceKind::Plain,
        };
        SurfaceDecoder {
            kind,
            table: if kind == SurfaceKind::ByteLevel {
                byte_level_decoder()
            } else {
                FxHashMap::default()
            },
        }
    }

    /// See [`surface_bytes`].
    pub fn decode(&self, token: &str) -> Option<Vec<u8>> {
        match self.kind {
            SurfaceKind::ByteLevel => token.chars().map(|c| self.table.get(&c).copied()).collect(),
            SurfaceKind::SentencePiece => Some(match byte_piece(token) {
                Some(b) => vec![b],
                None => token.replace('▁', " ").into_bytes(),
            }),
            SurfaceKind::Plain => Some(token.as_bytes().to_vec()),
        }
    }
}

/// The byte of a SentencePiece byte-fallback piece `<0xHH>`.
pub fn byte_piece(token: &str) -> Option<u8> {
    let b = token.as_bytes();
    if b.len() == 6
        && token.starts_with("<0x")
        && b[5] == b'>'
        && b[3].is_ascii_hexdigit()
        && b[4].is_ascii_hexdigit()
    {
        u8::from_str_radix(&token[3..5], 16).ok()
    } else {
        None
    }
}

/// The bytes a vocabulary string stands for. Byte-level (`marker == "Ġ"`): every code point
/// through the inverse GPT-2 byte-to-unicode table (`None` if one is not in it, e.g. an added
/// token spelled with other characters). SentencePiece (`"▁"`): `<0xHH>` is the byte `HH`,
/// otherwise the UTF-8 of the string with `▁` read as a space. Other markers: the UTF-8 as is.
/// Control tokens (`<s>`, `<|endoftext|>`) are read literally.
pub fn surface_bytes(token: &str, marker: &str) -> Option<Vec<u8>> {
    SurfaceDecoder::for_marker(marker).decode(token)
}

// ---------------------------------------------------------------------------------------------
// Trie index

/// Bits of the character masks: 255 characters get a bit of their own, every other character
/// shares the last one.
const SHARED_BIT: u8 = 255;

type CharMask = [u64; 4];

fn mask_has(m: &CharMask, bit: u8) -> bool {
    m[usize::from(bit >> 6)] & (1u64 << (bit & 63)) != 0
}

fn mask_set(m: &mut CharMask, bit: u8) {
    m[usize::from(bit >> 6)] |= 1u64 << (bit & 63);
}

/// One trie node: everything a search reads about a child, in one cache line.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Node {
    /// Characters on the edges strictly below the node.
    below: CharMask,
    /// Children: `first_child..first_child + num_children`, the `num_internal` ones with
    /// children of their own first, then the leaves; each group sorted by character.
    first_child: u32,
    num_children: u32,
    num_internal: u32,
    /// Base id ending at the node (lowest id of that string), or NONE.
    term: u32,
    /// Lowest base id strictly below the node.
    min_id_below: u32,
    /// Shortest / longest suffix length strictly below the node (at least 1 when it has children).
    lo_below: u32,
    hi_below: u32,
    ch: char,
}

/// The base vocabulary as a trie of code points, for exact nearest-string queries.
#[derive(Debug, Clone)]
pub struct NearestIndex {
    nodes: Vec<Node>,
    /// The edge character of every node (for binary searches among leaves).
    ch: Vec<char>,
    /// At the positions of a node's leaf children: those leaves in increasing id order.
    leaf_by_id: Vec<u32>,
    /// Character -> mask bit (absent: [`SHARED_BIT`]).
    bit_of: FxHashMap<char, u8>,
    max_len: usize,
    /// The indexed strings (distinct, with their lowest id), for verification.
    strings: Vec<(Vec<char>, u32)>,
    /// Deletion neighbourhoods: hash of a string with up to [`DEL_K`] characters deleted ->
    /// range of `del_entries` (indices into `strings`).
    del_keys: FxHashMap<u64, (u32, u32)>,
    del_entries: Vec<u32>,
    /// Deletions per base string in `del_keys` (0: no deletion index).
    del_k: usize,
    /// Characters found in at least [`RARE`] indexed strings.
    common: rustc_hash::FxHashSet<char>,
}

/// A character in fewer base strings than this is rare: a query with more than `k` rare
/// characters is unlikely to be within `k` edits, so it goes to the trie directly (both paths
/// are exact; this only picks the cheaper one).
const RARE: u32 = 16;

/// Largest distance answered from the deletion neighbourhoods (fewer when the base vocabulary
/// would need more than [`DEL_BUDGET`] keys).
const DEL_K: usize = 4;
/// Most keys in the deletion index.
const DEL_BUDGET: u64 = 4_000_000;
/// Most candidates one stage of a deletion search may measure.
const DEL_MAX_CANDIDATES: usize = 2048;
/// Longest base string in the deletion index; a query uses it only if every string within its
/// `k` edits is short enough to be there.
const DEL_MAX_LEN: usize = 24;
/// Shortest key kept in the deletion index: shorter keys would match too many strings. A query
/// of `n` code points is looked up with `min(k, n - DEL_MIN_KEY)` deletions.
const DEL_MIN_KEY: usize = 3;

fn hash_chars(s: &[char], deleted: &[usize]) -> u64 {
    let mut h = ((s.len() - deleted.len()) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut del = deleted.iter().peekable();
    for (i, &c) in s.iter().enumerate() {
        if del.peek() == Some(&&i) {
            del.next();
            continue;
        }
        h = (h.rotate_left(5) ^ u64::from(u32::from(c))).wrapping_mul(0x517C_C1B7_2722_0A95);
    }
    h ^ (h >> 29)
}

/// Hashes of `s` with every choice of up to `k` deleted positions whose result keeps at least
/// [`DEL_MIN_KEY`] characters (duplicates possible).
fn deletion_keys(s: &[char], k: usize, out: &mut Vec<u64>) {
    fn rec(s: &[char], from: usize, k: usize, deleted: &mut Vec<usize>, out: &mut Vec<u64>) {
        out.push(hash_chars(s, deleted));
        if k == 0 || s.len() - deleted.len() <= DEL_MIN_KEY {
            return;
        }
        for i in from..s.len() {
            deleted.push(i);
            rec(s, i + 1, k - 1, deleted, out);
            deleted.pop();
        }
    }
    if s.len() >= DEL_MIN_KEY {
        rec(s, 0, k, &mut Vec::with_capacity(k), out);
    }
}

/// Hashes of `s` with every choice of exactly `j` deleted positions (duplicates possible).
fn deletion_keys_exact(s: &[char], j: usize, out: &mut Vec<u64>) {
    fn rec(s: &[char], from: usize, j: usize, deleted: &mut Vec<usize>, out: &mut Vec<u64>) {
        if j == 0 {
            out.push(hash_chars(s, deleted));
            return;
        }
        for i in from..=s.len() - j {
            deleted.push(i);
            rec(s, i + 1, j - 1, deleted, out);
            deleted.pop();
        }
    }
    if s.len() >= j + DEL_MIN_KEY {
        rec(s, 0, j, &mut Vec::with_capacity(j), out);
    }
}

/// A running (id, distance) minimum, ties to the lowest id.
trait Best {
    fn is_none_or_better(&self, d: u32, id: u32) -> bool;
}

impl Best for Option<(u32, u32)> {
    fn is_none_or_better(&self, d: u32, id: u32) -> bool {
        match *self {
            None => true,
            Some((bid, bd)) => d < bd || (d == bd && id < bid),
        }
    }
}

/// Number of keys [`deletion_keys`] gives for a string of `len` code points.
fn num_deletion_keys(len: usize, k: usize) -> u64 {
    let mut total = 0u64;
    let mut comb = 1u64; // C(len, j)
    for j in 0..=k.min(len) {
        if len - j < DEL_MIN_KEY {
            break;
        }
        total += comb;
        comb = comb * (len - j) as u64 / (j + 1) as u64;
    }
    total
}

/// A frontier entry: (lower bound, lowest id below, node, depth, row slot).
type Frontier = (u32, u32, u32, u32, u32);

/// Reusable buffers of one searching thread.
#[derive(Debug, Default)]
pub struct Scratch {
    /// Query code points, their mask bits, its distinct characters (sorted), and for each
    /// distinct mask bit the query positions that carry it (queries of at most 64 code points).
    q: Vec<char>,
    qbit: Vec<u8>,
    qchars: Vec<char>,
    qbit_pos: Vec<(u8, u64)>,
    /// Frontier, best first: (lower bound, lowest id below, node, depth, row slot); slot `k`'s DP
    /// row is `rows[k * w..(k + 1) * w]`, free slots are listed in `free`.
    heap: std::collections::BinaryHeap<std::cmp::Reverse<Frontier>>,
    rows: Vec<u32>,
    free: Vec<u32>,
    cur: Vec<u32>,
    /// The row of a child whose character occurs nowhere in the query (shared by all of them).
    mism: Vec<u32>,
    leaf_row: Vec<u32>,
    /// Deletion keys of the query and the candidates they find.
    keys: Vec<u64>,
    cands: Vec<u32>,
}

/// The trie under construction, one array per field.
struct Builder {
    ch: Vec<char>,
    first_child: Vec<u32>,
    num_children: Vec<u32>,
    num_internal: Vec<u32>,
    leaf_by_id: Vec<u32>,
    term: Vec<u32>,
    min_id_below: Vec<u32>,
    lo_below: Vec<u32>,
    hi_below: Vec<u32>,
    below: Vec<CharMask>,
}

impl NearestIndex {
    /// Indexes every base string (ids with `None` are left out; a repeated string keeps its
    /// lowest id). `hint` are (some of) the queries to come: their most frequent characters get
    /// a mask bit of their own, which sharpens the pruning; any hint, even none, gives the same
    /// answers.
    pub fn new(
        base: &[Option<String>],
        hint: &[String],
        num_threads: Option<usize>,
    ) -> Result<Self> {
        if base.len() >= NONE as usize {
            return Err(Error::Value(format!(
                "base vocabulary of {} entries is too large",
                base.len()
            )));
        }
        let mut seen: FxHashMap<&str, u32> = FxHashMap::default();
        let mut entries: Vec<(Vec<char>, u32)> = Vec::with_capacity(base.len());
        for (id, s) in base.iter().enumerate() {
            if let Some(s) = s {
                if !seen.contains_key(s.as_str()) {
                    seen.insert(s.as_str(), id as u32);
                    entries.push((s.chars().collect(), id as u32));
                }
            }
        }
        entries.sort_unstable();
        // Mask bits: the most frequent characters of the hint (else of the base).
        let mut freq: FxHashMap<char, u64> = FxHashMap::default();
        if hint.is_empty() {
            entries
                .iter()
                .flat_map(|(s, _)| s)
                .for_each(|&c| *freq.entry(c).or_default() += 1);
        } else {
            hint.iter()
                .flat_map(|s| s.chars())
                .for_each(|c| *freq.entry(c).or_default() += 1);
        }
        let mut by_freq: Vec<(u64, char)> = freq.into_iter().map(|(c, n)| (n, c)).collect();
        by_freq.sort_unstable_by(|a, b| b.cmp(a));
        let bit_of: FxHashMap<char, u8> = by_freq
            .iter()
            .take(usize::from(SHARED_BIT))
            .enumerate()
            .map(|(bit, &(_, c))| (c, bit as u8))
            .collect();

        let mut idx = Builder {
            ch: vec!['\0'],
            first_child: vec![0],
            num_children: vec![0],
            num_internal: vec![0],
            leaf_by_id: vec![0],
            term: vec![NONE],
            min_id_below: vec![NONE],
            lo_below: vec![0],
            hi_below: vec![0],
            below: vec![[0; 4]],
        };
        let bit = |c: char| bit_of.get(&c).copied().unwrap_or(SHARED_BIT);
        // Breadth-first: a node's children get consecutive indices, all above the node's.
        let mut queue: std::collections::VecDeque<(usize, usize, usize, usize)> =
            std::collections::VecDeque::new();
        queue.push_back((0, 0, entries.len(), 0));
        while let Some((node, mut lo, hi, depth)) = queue.pop_front() {
            // Sorted: the string equal to the prefix (if any) comes first.
            if lo < hi && entries[lo].0.len() == depth {
                idx.term[node] = entries[lo].1;
                lo += 1;
            }
            idx.first_child[node] = idx.ch.len() as u32;
            // (char, start, end, leaf) per child
            let mut groups: Vec<(char, usize, usize, bool)> = Vec::new();
            let mut start = lo;
            while start < hi {
                let c = entries[start].0[depth];
                let mut end = start + 1;
                while end < hi && entries[end].0[depth] == c {
                    end += 1;
                }
                let leaf = end == start + 1 && entries[start].0.len() == depth + 1;
                groups.push((c, start, end, leaf));
                start = end;
            }
            groups.sort_by_key(|g| g.3); // stable: internal children first, each group by char
            let first = idx.ch.len();
            for &(c, start, end, leaf) in &groups {
                idx.ch.push(c);
                idx.first_child.push(0);
                idx.num_children.push(0);
                idx.num_internal.push(0);
                idx.leaf_by_id.push(0);
                idx.term.push(NONE);
                idx.min_id_below.push(NONE);
                idx.lo_below.push(0);
                idx.hi_below.push(0);
                idx.below.push([0; 4]);
                idx.num_children[node] += 1;
                if !leaf {
                    idx.num_internal[node] += 1;
                }
                queue.push_back((idx.ch.len() - 1, start, end, depth + 1));
            }
            let leaves = first + idx.num_internal[node] as usize..idx.ch.len();
            let mut by_id: Vec<(u32, u32)> = leaves
                .clone()
                .map(|c| (entries[groups[c - first].1].1, c as u32))
                .collect();
            by_id.sort_unstable();
            for (slot, (_, c)) in leaves.zip(by_id) {
                idx.leaf_by_id[slot] = c;
            }
        }
        // Bottom-up summaries (children have higher indices than their parent).
        for node in (0..idx.ch.len()).rev() {
            let (f, n) = (
                idx.first_child[node] as usize,
                idx.num_children[node] as usize,
            );
            let (mut min_id, mut lo, mut hi, mut mask) = (NONE, u32::MAX, 0, [0u64; 4]);
            for c in f..f + n {
                let child_lo = if idx.term[c] != NONE {
                    0
                } else {
                    idx.lo_below[c]
                };
                min_id = min_id.min(idx.term[c]).min(idx.min_id_below[c]);
                lo = lo.min(child_lo + 1);
                hi = hi.max(idx.hi_below[c] + 1);
                for (m, b) in mask.iter_mut().zip(&idx.below[c]) {
                    *m |= b;
                }
                mask_set(&mut mask, bit(idx.ch[c]));
            }
            idx.min_id_below[node] = min_id;
            idx.lo_below[node] = if n == 0 { 0 } else { lo };
            idx.hi_below[node] = hi;
            idx.below[node] = mask;
        }
        let nodes = (0..idx.ch.len())
            .map(|i| Node {
                below: idx.below[i],
                first_child: idx.first_child[i],
                num_children: idx.num_children[i],
                num_internal: idx.num_internal[i],
                term: idx.term[i],
                min_id_below: idx.min_id_below[i],
                lo_below: idx.lo_below[i],
                hi_below: idx.hi_below[i],
                ch: idx.ch[i],
            })
            .collect();
        // Deletion neighbourhoods.
        let del_k = (1..=DEL_K)
            .rev()
            .find(|&k| {
                entries
                    .iter()
                    .filter(|(s, _)| s.len() <= DEL_MAX_LEN)
                    .map(|(s, _)| num_deletion_keys(s.len(), k))
                    .sum::<u64>()
                    <= DEL_BUDGET
            })
            .unwrap_or(0);
        const CHUNK: usize = 1024;
        let mut pairs: Vec<(u64, u32)> = par_map(entries.len().div_ceil(CHUNK), num_threads, |c| {
            let mut out: Vec<(u64, u32)> = Vec::new();
            let mut keys: Vec<u64> = Vec::new();
            let end = ((c + 1) * CHUNK).min(entries.len());
            for (e, (chars, _)) in entries.iter().enumerate().take(end).skip(c * CHUNK) {
                if del_k == 0 || chars.len() > DEL_MAX_LEN {
                    continue;
                }
                keys.clear();
                deletion_keys(chars, del_k, &mut keys);
                keys.sort_unstable();
                keys.dedup();
                out.extend(keys.iter().map(|&k| (k, e as u32)));
            }
            out
        })
        .concat();
        pairs.sort_unstable();
        let unique = pairs.windows(2).filter(|w| w[0].0 != w[1].0).count() + 1;
        let mut del_keys: FxHashMap<u64, (u32, u32)> = FxHashMap::default();
        del_keys.reserve(unique);
        let mut start = 0usize;
        while start < pairs.len() {
            let mut end = start + 1;
            while end < pairs.len() && pairs[end].0 == pairs[start].0 {
                end += 1;
            }
            del_keys.insert(pairs[start].0, (start as u32, (end - start) as u32));
            start = end;
        }
        let mut char_count: FxHashMap<char, u32> = FxHashMap::default();
        for (chars, _) in &entries {
            let mut distinct = chars.clone();
            distinct.sort_unstable();
            distinct.dedup();
            for c in distinct {
                *char_count.entry(c).or_default() += 1;
            }
        }
        let common = char_count
            .into_iter()
            .filter(|&(_, n)| n >= RARE)
            .map(|(c, _)| c)
            .collect();
        Ok(NearestIndex {
            common,
            nodes,
            ch: idx.ch,
            leaf_by_id: idx.leaf_by_id,
            bit_of,
            max_len: entries.iter().map(|(s, _)| s.len()).max().unwrap_or(0),
            del_entries: pairs.into_iter().map(|(_, e)| e).collect(),
            del_keys,
            del_k,
            strings: entries,
        })
    }

    fn bit(&self, c: char) -> u8 {
        self.bit_of.get(&c).copied().unwrap_or(SHARED_BIT)
    }

    /// True when the index holds no string.
    pub fn is_empty(&self) -> bool {
        self.nodes[0].term == NONE && self.nodes[0].min_id_below == NONE
    }

    /// The nearest string if one is within `k` edits, from the deletion neighbourhoods:
    /// every string within `j` edits of the query shares a string with it obtained by deleting
    /// at most `j` characters from each. Stage `j` looks up the query's keys with exactly `j`
    /// deletions and measures the candidates exactly; after it, every string within `j` edits
    /// has been measured, so a best distance `<= j` is the answer, ties included.
    ///
    /// Returns the best candidate measured and whether it is proven to be the answer. A stage
    /// with more than [`DEL_MAX_CANDIDATES`] candidates ends the search (the trie is cheaper).
    fn nearest_within_k(
        &self,
        q: &[char],
        k: usize,
        keys: &mut Vec<u64>,
        cands: &mut Vec<u32>,
    ) -> (Option<(u32, u32)>, bool) {
        let mut best: Option<(u32, u32)> = None;
        for j in 0..=k {
            keys.clear();
            deletion_keys_exact(q, j, keys);
            keys.sort_unstable();
            keys.dedup();
            cands.clear();
            for key in keys.iter() {
                if let Some(&(start, len)) = self.del_keys.get(key) {
                    cands.extend_from_slice(
                        &self.del_entries[start as usize..(start + len) as usize],
                    );
                }
            }
            if cands.len() > DEL_MAX_CANDIDATES {
                return (best, false);
            }
            cands.sort_unstable();
            cands.dedup();
            for &e in cands.iter() {
                let (y, id) = (&self.strings[e as usize].0, self.strings[e as usize].1);
                let d = levenshtein(q, y);
                if best.is_none_or_better(d, id) {
                    best = Some((id, d));
                }
            }
            if best.is_some_and(|(_, d)| d as usize <= j) {
                return (best, true);
            }
        }
        (best, false)
    }

    /// Longest indexed string, in code points.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The base id nearest to `query` by Levenshtein distance over code points, ties to the
    /// lowest id, with the distance; `None` if the index is empty.
    ///
    /// Depth-first over the trie with one DP row per node (`row[i] = lev(query[..i], prefix)`).
    /// A subtree is skipped when a lower bound of its distances exceeds the best so far, or
    /// equals it while the subtree holds no lower id. The bound is `min_i row[i] + f_i`, with
    /// `f_i` a lower bound of `lev(query[i..], s)` over the suffixes `s` below the node: from
    /// their length range and the query characters that occur on no edge below
    /// (`lev(u, s) >= max(|u|, |s|) - common(u, s)`).
    pub fn nearest(&self, query: &str, scratch: &mut Scratch) -> Option<(u32, u32)> {
        if self.is_empty() {
            return None;
        }
        let Scratch {
            q,
            qbit,
            qchars,
            qbit_pos,
            heap,
            rows,
            free,
            cur,
            mism,
            leaf_row,
            keys,
            cands,
        } = scratch;
        q.clear();
        q.extend(query.chars());
        let n = q.len();
        let w = n + 1;
        qbit.clear();
        qbit.extend(q.iter().map(|&c| self.bit(c)));
        qchars.clear();
        qchars.extend_from_slice(q);
        qchars.sort_unstable();
        qchars.dedup();
        let mut seed: Option<(u32, u32)> = None;
        let k = self.del_k.min(n.saturating_sub(DEL_MIN_KEY));
        if k > 0
            && n + k <= DEL_MAX_LEN
            && q.iter().filter(|c| !self.common.contains(c)).count() <= k
            && n <= self.max_len + k
        {
            let (found, exact) = self.nearest_within_k(q, k, keys, cands);
            if exact {
                return found;
            }
            seed = found;
        }
        qbit_pos.clear();
        if n <= 64 {
            for (i, &b) in qbit.iter().enumerate() {
                match qbit_pos.iter_mut().find(|(x, _)| *x == b) {
                    Some((_, m)) => *m |= 1u64 << i,
                    None => qbit_pos.push((b, 1u64 << i)),
                }
            }
        }
        // A measured candidate (if any) is a valid starting point: only better ones replace it.
        let (mut best, mut best_id) = seed.map_or((u32::MAX, u32::MAX), |(id, d)| (d, id));
        let root_term = self.nodes[0].term;
        if root_term != NONE && seed.is_none_or_better(n as u32, root_term) {
            (best, best_id) = (n as u32, root_term);
        }
        heap.clear();
        rows.clear();
        free.clear();
        rows.extend(0..w as u32);
        heap.push(std::cmp::Reverse((0, self.nodes[0].min_id_below, 0, 0, 0)));
        cur.resize(w, 0);
        mism.resize(w, 0);
        leaf_row.resize(w, 0);
        while let Some(std::cmp::Reverse((lb, sub_min, node, depth, slot))) = heap.pop() {
            if prune(lb, sub_min, best, best_id) {
                // Every node left has a larger (bound, lowest id): none can win.
                break;
            }
            let nd = &self.nodes[node as usize];
            let at = slot as usize * w;
            cur.copy_from_slice(&rows[at..at + w]);
            free.push(slot);
            let f = nd.first_child as usize;
            let internal = f..f + nd.num_internal as usize;
            let leaves = internal.end..f + nd.num_children as usize;
            let d = depth + 1;
            // The row of every child whose character occurs nowhere in the query.
            mism_row(cur, mism, d);
            let mism_min = mism.iter().copied().min().unwrap_or(0);
            // Leaves first: they only need their distance, and may lower the best.
            if !leaves.is_empty() {
                let leaf_chars = &self.ch[leaves.clone()];
                for &qc in qchars.iter() {
                    if let Ok(k) = leaf_chars.binary_search(&qc) {
                        step_row(cur, leaf_row, d, q, qc);
                        let (dist, t) = (leaf_row[n], self.nodes[leaves.start + k].term);
                        if dist < best || (dist == best && t < best_id) {
                            (best, best_id) = (dist, t);
                        }
                    }
                }
                // Every other leaf is at the same distance: only the lowest id can matter.
                let dist = mism[n];
                if dist <= best {
                    for &c in &self.leaf_by_id[leaves] {
                        let t = self.nodes[c as usize].term;
                        if !(dist < best || t < best_id) {
                            break;
                        }
                        if qchars.binary_search(&self.ch[c as usize]).is_err() {
                            (best, best_id) = (dist, t);
                            break;
                        }
                    }
                }
            }
            let mut qpos = 0usize;
            for c in internal {
                let nd = &self.nodes[c];
                let ch = nd.ch;
                while qpos < qchars.len() && qchars[qpos] < ch {
                    qpos += 1;
                }
                let occurs = qpos < qchars.len() && qchars[qpos] == ch;
                let sub_min = nd.min_id_below;
                let (row, row_min): (&mut [u32], u32) = if occurs {
                    let m = step_row(cur, leaf_row, d, q, ch);
                    (leaf_row, m)
                } else {
                    (mism, mism_min)
                };
                if nd.term != NONE {
                    let dist = row[n];
                    if dist < best || (dist == best && nd.term < best_id) {
                        (best, best_id) = (dist, nd.term);
                    }
                }
                if prune(row_min, sub_min, best, best_id) {
                    continue;
                }
                let bound = bound(nd, row, qbit, qbit_pos);
                if prune(bound, sub_min, best, best_id) {
                    continue;
                }
                let slot = match free.pop() {
                    Some(k) => k,
                    None => {
                        rows.resize(rows.len() + w, 0);
                        (rows.len() / w - 1) as u32
                    }
                };
                let at = slot as usize * w;
                rows[at..at + w].copy_from_slice(row);
                heap.push(std::cmp::Reverse((bound, sub_min, c as u32, d, slot)));
            }
        }
        Some((best_id, best))
    }
}

/// Lower bound of `lev(query, prefix(c) + s)` over the suffixes `s` strictly below `c`:
/// `min_i row[i] + f_i`, `f_i` bounding `lev(query[i..], s)` by `max(|u|, |s|) - common`,
/// where `common <= |u| - miss_i` (`miss_i`: characters of `u = query[i..]` on no edge
/// below `c`) and `common <= |s|`, minimised over the suffix lengths below `c`.
fn bound(nd: &Node, row: &[u32], qbit: &[u8], qbit_pos: &[(u8, u64)]) -> u32 {
    let n = qbit.len();
    let (lo, hi, below) = (nd.lo_below, nd.hi_below, &nd.below);
    let f = |u: u32, miss: u32| {
        miss.max(u.saturating_sub(hi))
            .max((lo + miss).saturating_sub(u))
    };
    let mut bound = u32::MAX;
    if n <= 64 {
        let mut absent = 0u64;
        for &(b, pos) in qbit_pos {
            if !mask_has(below, b) {
                absent |= pos;
            }
        }
        let mut miss = absent.count_ones();
        for (i, &r) in row.iter().enumerate() {
            bound = bound.min(r + f((n - i) as u32, miss));
            if i < 64 {
                miss -= ((absent >> i) & 1) as u32;
            }
        }
    } else {
        let mut miss = 0u32;
        for i in (0..=n).rev() {
            if i < n && !mask_has(below, qbit[i]) {
                miss += 1;
            }
            bound = bound.min(row[i] + f((n - i) as u32, miss));
        }
    }
    bound
}

/// Whether a subtree with lower bound `lb` and lowest id `sub_min` can be skipped.
#[inline]
fn prune(lb: u32, sub_min: u32, best: u32, best_id: u32) -> bool {
    lb > best || (lb == best && sub_min >= best_id)
}

/// The DP row one trie level down, along an edge labelled `ch`; returns its minimum.
#[inline]
fn step_row(prev: &[u32], row: &mut [u32], d: u32, q: &[char], ch: char) -> u32 {
    let mut left = d;
    let mut min = d;
    row[0] = d;
    for (((out, &diag), &up), &qc) in row[1..].iter_mut().zip(prev).zip(&prev[1..]).zip(q) {
        left = (diag + u32::from(qc != ch)).min(up + 1).min(left + 1);
        min = min.min(left);
        *out = left;
    }
    min
}

/// The DP row along an edge whose character occurs nowhere in the query.
#[inline]
fn mism_row(prev: &[u32], row: &mut [u32], d: u32) {
    let mut left = d;
    row[0] = d;
    for ((out, &diag), &up) in row[1..].iter_mut().zip(prev).zip(&prev[1..]) {
        left = diag.min(up).min(left) + 1;
        *out = left;
    }
}

/// The literal definition: for each query, the base id with the smallest `lev(query, base[id])`,
/// scanning ids in order and keeping the first minimum. `None` if no base id has a string.
pub fn nearest_brute_force(
    base: &[Option<String>],
    queries: &[String],
    num_threads: Option<usize>,
) -> Vec<Option<(u32, u32)>> {
    let base_chars: Vec<Option<Vec<char>>> = base
        .iter()
        .map(|s| s.as_ref().map(|s| s.chars().collect()))
        .collect();
    par_map(queries.len(), num_threads, |qi| {
        let q: Vec<char> = queries[qi].chars().collect();
        let mut best: Option<(u32, u32)> = None;
        for (id, y) in base_chars.iter().enumerate() {
            if let Some(y) = y {
                let d = levenshtein(&q, y);
                match best {
                    Some((_, b)) if d >= b => {}
                    _ => best = Some((id as u32, d)),
                }
            }
        }
        best
    })
}

/// Indexed exact nearest neighbours of many queries (same answers as [`nearest_brute_force`]).
pub fn nearest_indexed(
    index: &NearestIndex,
    queries: &[String],
    num_threads: Option<usize>,
) -> Vec<Option<(u32, u32)>> {
    const CHUNK: usize = 64;
    let chunks = queries.len().div_ceil(CHUNK);
    par_map(chunks, num_threads, |c| {
        let mut scratch = Scratch::default();
        queries[c * CHUNK..((c + 1) * CHUNK).min(queries.len())]
            .iter()
            .map(|q| index.nearest(q, &mut scratch))
            .collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect()
}

// ---------------------------------------------------------------------------------------------
// Building maps

fn check_markers(base_marker: &str, blend_marker: &str) -> Result<()> {
    for (name, marker) in [("base_marker", base_marker), ("blend_marker", blend_marker)] {
        if marker.is_empty() {
            return Err(Error::Value(format!(
                "{name} is empty; use the tokenizer's word-boundary marker (\"▁\" or \"Ġ\")"
            )));
        }
    }
    Ok(())
}

/// Lowest base id per string.
fn base_index(base: &[Option<String>]) -> FxHashMap<&str, u32> {
    let mut index: FxHashMap<&str, u32> = FxHashMap::default();
    index.reserve(base.len());
    for (id, s) in base.iter().enumerate() {
        if let Some(s) = s {
            index.entry(s.as_str()).or_insert(id as u32);
        }
    }
    index
}

/// Distinct keys `t` in order of first blend id, and the key index of every blend id (NONE for
/// ids without a string).
fn blend_keys(
    blend: &[Option<String>],
    base_marker: &str,
    blend_marker: &str,
) -> (Vec<String>, Vec<usize>, Vec<u32>) {
    let mut keys: Vec<String> = Vec::new();
    let mut first: Vec<usize> = Vec::new();
    let mut seen: FxHashMap<String, u32> = FxHashMap::default();
    let mut of_id = vec![NONE; blend.len()];
    for (id, s) in blend.iter().enumerate() {
        if let Some(s) = s {
            let t = swap_marker(s, blend_marker, base_marker);
            let k = *seen.entry(t.clone()).or_insert_with(|| {
                keys.push(t);
                first.push(id);
                (keys.len() - 1) as u32
            });
            of_id[id] = k;
        }
    }
    (keys, first, of_id)
}

/// Spreads per-key results over blend ids.
fn spread(of_id: &[u32], per_key: &[(u32, u8, u32)]) -> VocabMapping {
    let n = of_id.len();
    let mut out = VocabMapping {
        base_ids: vec![-1; n],
        kinds: vec![kind::UNMAPPED; n],
        distances: vec![u32::MAX; n],
    };
    for (id, &k) in of_id.iter().enumerate() {
        if k != NONE {
            let (target, knd, dist) = per_key[k as usize];
            if target != NONE {
                out.base_ids[id] = target as i32;
                out.kinds[id] = knd;
                out.distances[id] = dist;
            }
        }
    }
    out
}

/// Builds the map of every blend id (see the module documentation for the methods).
pub fn build_vocab_map(
    base: &[Option<String>],
    blend: &[Option<String>],
    base_marker: &str,
    blend_marker: &str,
    method: MapMethod,
    num_threads: Option<usize>,
) -> Result<VocabMapping> {
    check_markers(base_marker, blend_marker)?;
    if base.len() > i32::MAX as usize || blend.len() > i32::MAX as usize {
        return Err(Error::Value(
            "vocabularies must have fewer than 2**31 entries".to_string(),
        ));
    }
    let index = base_index(base);
    let (keys, first, of_id) = blend_keys(blend, base_marker, blend_marker);
    let mut per_key: Vec<(u32, u8, u32)> = vec![(NONE, kind::UNMAPPED, u32::MAX); keys.len()];
    // Surface matches first (Surface only).
    if method == MapMethod::Surface {
        let base_dec = SurfaceDecoder::for_marker(base_marker);
        let blend_dec = SurfaceDecoder::for_marker(blend_marker);
        // surface -> preferred base id: the first id, replaced once by a non-byte-piece token
        let mut by_surface: FxHashMap<Vec<u8>, u32> = FxHashMap::default();
        for (id, s) in base.iter().enumerate() {
            let Some(s) = s else { continue };
            let Some(bytes) = base_dec.decode(s) else {
                continue;
            };
            match by_surface.entry(bytes) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(id as u32);
                }
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    let cur = base[*e.get() as usize].as_deref().unwrap_or_default();
                    if base_marker == "▁" && byte_piece(cur).is_some() && byte_piece(s).is_none()
                    {
                        e.insert(id as u32);
                    }
                }
            }
        }
        for (k, t) in keys.iter().enumerate() {
            let x = blend[first[k]].as_deref().unwrap_or_default();
            let Some(bytes) = blend_dec.decode(x) else {
                continue;
            };
            let Some(&cand) = by_surface.get(&bytes) else {
                continue;
            };
            // The exact string wins among equal surfaces.
            let exact = index.get(t.as_str()).copied().filter(|&e| {
                base[e as usize]
                    .as_deref()
                    .and_then(|s| base_dec.decode(s))
                    .as_deref()
                    == Some(bytes.as_slice())
            });
            per_key[k] = match exact {
                Some(e) => (e, kind::EXACT, 0),
                None => {
                    let y: Vec<char> = base[cand as usize]
                        .as_deref()
                        .unwrap_or_default()
                        .chars()
                        .collect();
                    let tc: Vec<char> = t.chars().collect();
                    (cand, kind::SURFACE, levenshtein(&tc, &y))
                }
            };
        }
    }
    // Exact string matches.
    let mut pending: Vec<usize> = Vec::new();
    for (k, t) in keys.iter().enumerate() {
        if per_key[k].0 != NONE {
            continue;
        }
        match index.get(t.as_str()) {
            Some(&id) => per_key[k] = (id, kind::EXACT, 0),
            None => pending.push(k),
        }
    }
    // Nearest strings.
    if method != MapMethod::Exact && !pending.is_empty() {
        // In string order, consecutive queries walk the same parts of the index (warm caches).
        pending.sort_unstable_by(|&a, &b| keys[a].cmp(&keys[b]));
        let queries: Vec<String> = pending.iter().map(|&k| keys[k].clone()).collect();
        let nearest = NearestIndex::new(base, &queries, num_threads)?;
        let found = nearest_indexed(&nearest, &queries, num_threads);
        for (&k, f) in pending.iter().zip(found) {
            if let Some((id, dist)) = f {
                per_key[k] = (id, kind::MINED, dist);
            }
        }
    }
    Ok(spread(&of_id, &per_key))
}

/// Describes an existing map (the reference JSON object `{t: base string}`) over blend ids:
/// targets, kinds and distances, as [`build_vocab_map`] reports them. Keys that are not the key
/// of any blend token are ignored; a value that is not a base token is an error.
pub fn describe_vocab_map(
    base: &[Option<String>],
    blend: &[Option<String>],
    base_marker: &str,
    blend_marker: &str,
    pairs: &[(String, String)],
) -> Result<VocabMapping> {
    check_markers(base_marker, blend_marker)?;
    let index = base_index(base);
    let (keys, first, of_id) = blend_keys(blend, base_marker, blend_marker);
    let key_index: FxHashMap<&str, usize> = keys
        .iter()
        .enumerate()
        .map(|(k, t)| (t.as_str(), k))
        .collect();
    let base_dec = SurfaceDecoder::for_marker(base_marker);
    let blend_dec = SurfaceDecoder::for_marker(blend_marker);
    let mut per_key: Vec<(u32, u8, u32)> = vec![(NONE, kind::UNMAPPED, u32::MAX); keys.len()];
    for (t, y) in pairs {
        let Some(&target) = index.get(y.as_str()) else {
            return Err(Error::Value(format!(
                "the vocabulary map sends {t:?} to {y:?}, which is not a base token"
            )));
        };
        let Some(&k) = key_index.get(t.as_str()) else {
            continue;
        };
        per_key[k] = if t == y {
            (target, kind::EXACT, 0)
        } else {
            let x = blend[first[k]].as_deref().unwrap_or_default();
            let same_surface =
                blend_dec.decode(x).is_some() && blend_dec.decode(x) == base_dec.decode(y);
            let tc: Vec<char> = t.chars().collect();
            let yc: Vec<char> = y.chars().collect();
            let knd = if same_surface {
                kind::SURFACE
            } else {
                kind::MINED
            };
            (target, knd, levenshtein(&tc, &yc))
        };
    }
    Ok(spread(&of_id, &per_key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(xs: &[&str]) -> Vec<Option<String>> {
        xs.iter().map(|s| Some((*s).to_string())).collect()
    }

    #[test]
    fn surface_decoding() {
        assert_eq!(surface_bytes("Ġthe", "Ġ").unwrap(), b" the");
        assert_eq!(surface_bytes("Ċ", "Ġ").unwrap(), b"\n");
        assert_eq!(surface_bytes("âĢĶ", "Ġ").unwrap(), "—".as_bytes());
        assert_eq!(surface_bytes("▁the", "▁").unwrap(), b" the");
        assert_eq!(surface_bytes("<0x0A>", "▁").unwrap(), b"\n");
        assert_eq!(surface_bytes("<0xzz>", "▁").unwrap(), b"<0xzz>");
        assert_eq!(surface_bytes("▁", "Ġ"), None);
    }

    #[test]
    fn methods_on_a_small_pair() {
        let base = v(&["<0x0A>", "▁the", "▁a", "—", "x", "▁th"]);
        let blend = v(&["Ġthe", "Ċ", "âĢĶ", "Ġtha", "zz"]);
        let m = build_vocab_map(&base, &blend, "▁", "Ġ", MapMethod::Exact, Some(1)).unwrap();
        assert_eq!(m.base_ids, vec![1, -1, -1, -1, -1]);
        let m = build_vocab_map(&base, &blend, "▁", "Ġ", MapMethod::Mined, Some(1)).unwrap();
        // "▁tha": "▁the" (id 1) and "▁th" (id 5) are both at distance 1: the lowest id wins.
        assert_eq!(m.base_ids[3], 1);
        assert_eq!(m.kinds[3], kind::MINED);
        let m = build_vocab_map(&base, &blend, "▁", "Ġ", MapMethod::Surface, Some(1)).unwrap();
        assert_eq!(&m.base_ids[..3], &[1, 0, 3]);
        assert_eq!(&m.kinds[..3], &[kind::EXACT, kind::SURFACE, kind::SURFACE]);
        let pairs = vec![
            ("▁the".to_string(), "▁the".to_string()),
            ("Ċ".to_string(), "<0x0A>".to_string()),
            ("zz".to_string(), "x".to_string()),
        ];
        let d = describe_vocab_map(&base, &blend, "▁", "Ġ", &pairs).unwrap();
        assert_eq!(d.base_ids, vec![1, 0, -1, -1, 4]);
        assert_eq!(d.kinds, vec![kind::EXACT, kind::SURFACE, 0, 0, kind::MINED]);
        assert_eq!(d.distances[4], 2);
    }

    #[test]
    fn empty_base_and_none_strings() {
        let base: Vec<Option<String>> = vec![None, None];
        let blend = vec![Some("a".to_string()), None];
        let m = build_vocab_map(&base, &blend, "▁", "Ġ", MapMethod::Mined, Some(1)).unwrap();
        assert_eq!(m.base_ids, vec![-1, -1]);
        assert!(build_vocab_map(&base, &blend, "", "Ġ", MapMethod::Mined, None).is_err());
    }

    #[test]
    fn empty_string_in_base() {
        let base = v(&["abc", "", "zz"]);
        let idx = NearestIndex::new(&base, &[], None).unwrap();
        let mut s = Scratch::default();
        assert_eq!(idx.nearest("q", &mut s), Some((1, 1)));
        assert_eq!(idx.nearest("", &mut s), Some((1, 0)));
        assert_eq!(idx.nearest("ab", &mut s), Some((0, 1)));
    }

    proptest! {
        #[test]
        fn index_equals_brute_force(
            base in proptest::collection::vec(proptest::option::weighted(0.9, "[ab▁Ġc]{0,6}"), 1..60),
            queries in proptest::collection::vec("[ab▁Ġcd]{0,9}", 1..30),
        ) {
            let idx = NearestIndex::new(&base, &queries[..queries.len() / 2], Some(2)).unwrap();
            let fast = nearest_indexed(&idx, &queries, Some(2));
            let slow = nearest_brute_force(&base, &queries, Some(1));
            prop_assert_eq!(fast, slow);
        }
    }
}
