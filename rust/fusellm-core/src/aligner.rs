//! Re-expression of a blend (source) model's top-K distributions on the base (target) tokens.
//!
//! For every base position the aligner decides which blend position, if any, predicts the same
//! continuation, then walks that position's top-K (highest logit first) and maps each blend id to a
//! base id through the token strings (blend marker swapped for the base marker; in `Soft` mode
//! then through the vocabulary map). Two policies:
//!
//! - `compat` (the reference pipeline, spec section 6): MinED pairing, a position is used only if
//!   it is paired with exactly one blend token whose string equals the base token (or maps to it),
//!   duplicates keep the first (highest) logit, unmatched positions get a one-hot row on the
//!   CURRENT base token.
//! - default: the same pairing rules (or offset pairing), duplicates merged by summing their
//!   probabilities (logsumexp of logits; exact at temperature 1), unmatched positions get a one-hot
//!   row on the NEXT base token (what position `t` actually predicts) or are masked.
//!
//! In both, top-K ids that have no token string (padded vocabularies) are dropped and counted.
//! Per-position work is a few table look-ups per top-K entry: the string-to-id work is done once per
//! vocabulary when the aligner is built.

use crate::dtw::{mined_dtw, strip_marker, surface_len, Interned};
use crate::error::{Error, Result, Side};
use crate::offsets::{match_ends_into, validate_offsets, NO_MATCH};
use crate::prefetch::{byte_range, Prefetcher};
use rustc_hash::FxHashMap;

/// "No id" in the per-vocabulary tables: the string is not a base token.
pub const NONE: u32 = u32::MAX;
/// "No string" in the target tables: the blend id has no token string.
pub const UNKNOWN: u32 = u32::MAX - 1;

/// Position status codes in [`SeqOutput::status`].
pub mod status {
    /// The row holds the source distribution.
    pub const MATCHED: u8 = 0;
    /// The position was matched but no top-K entry exists in the base vocabulary (hard mode).
    pub const EMPTY: u8 = 1;
    /// The row is a one-hot fallback (current token in compat mode, next token by default).
    pub const FALLBACK: u8 = 2;
    /// The position has no target (masked fallback, or next-token fallback at the last position).
    pub const MASKED: u8 = 3;
}

/// A vocabulary: the string of every id (`None` where an id has no string).
#[derive(Debug, Clone)]
pub struct Vocab {
    strings: Vec<Option<String>>,
    index: FxHashMap<String, u32>,
    canon: Vec<u32>,
    /// Every id has a string (no holes): an id is known iff it is in range.
    complete: bool,
}

impl Vocab {
    /// Builds the string index; where two ids share a string, the lowest id represents it.
    pub fn new(strings: Vec<Option<String>>) -> Result<Self> {
        if strings.len() >= UNKNOWN as usize {
            return Err(Error::Value(format!(
                "vocabulary of {} entries is too large",
                strings.len()
            )));
        }
        let mut index: FxHashMap<String, u32> = FxHashMap::default();
        index.reserve(strings.len());
        let mut canon = vec![NONE; strings.len()];
        for (id, s) in strings.iter().enumerate() {
            if let Some(s) = s {
                let c = *index.entry(s.clone()).or_insert(id as u32);
                canon[id] = c;
            }
        }
        let complete = strings.iter().all(Option::is_some);
        Ok(Vocab {
            strings,
            index,
            canon,
            complete,
        })
    }

    pub fn len(&self) -> usize {
        self.strings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.strings.is_empty()
    }

    /// The string of `id`, if the id exists and has one.
    pub fn get(&self, id: usize) -> Option<&str> {
        self.strings.get(id).and_then(|s| s.as_deref())
    }

    /// The lowest id whose string is `s`.
    pub fn id_of(&self, s: &str) -> Option<u32> {
        self.index.get(s).copied()
    }

    /// All strings, in id order.
    pub fn strings(&self) -> &[Option<String>] {
        &self.strings
    }
}

/// How base positions are paired with blend positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// MinED dynamic time warping over token strings (the reference).
    Mined,
    /// Equal end offsets in the shared text.
    Offsets,
}

/// How blend token strings become base tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabMode {
    /// Exact string match (marker swapped) only ("EM").
    Hard,
    /// Exact match, else through the vocabulary map ("MinED").
    Soft,
}

/// What a base position without a source distribution receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// One-hot on the current base token (the reference, a known defect).
    Current,
    /// One-hot on the next base token; the last position is masked.
    Next,
    /// No target at all.
    Mask,
}

/// One sequence pair to align. Flat arrays, row-major.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    pub base_ids: &'a [i32],
    pub blend_ids: &'a [i32],
    /// `[blend_ids.len(), k]` top-K ids of the blend model.
    pub topk_ids: &'a [i32],
    /// `[blend_ids.len(), k]` matching logits.
    pub topk_logits: &'a [f32],
    pub k: usize,
    /// `[base_ids.len(), 2]` character spans (offsets method only).
    pub base_offsets: Option<&'a [i64]>,
    /// `[blend_ids.len(), 2]` character spans (offsets method only).
    pub blend_offsets: Option<&'a [i64]>,
}

/// The base-side rows of one sequence: `ids`/`logits` are `[L_base, k]`, padded with `-1` and
/// `-inf`, each row sorted by descending logit.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqOutput {
    pub ids: Vec<i32>,
    pub logits: Vec<f32>,
    pub status: Vec<u8>,
    pub k: usize,
    /// Top-K entries dropped because the blend id has no token string.
    pub num_unknown: u64,
    /// Top-K entries dropped because their string is not a base token (after mapping).
    pub num_unmapped: u64,
    /// Top-K entries whose base id repeats an earlier entry's: merged into it (probabilities
    /// summed) by default, dropped in compat mode.
    pub num_duplicates: u64,
}

/// The aligner of one (base, blend) tokenizer pair.
#[derive(Debug, Clone)]
pub struct Aligner {
    base: Vocab,
    blend: Vocab,
    base_marker: String,
    blend_marker: String,
    blend_byte_level: bool,
    compat: bool,
    fallback: Fallback,
    /// swapped blend string -> base id of its mapped string (NONE if that is not a base token)
    map: FxHashMap<String, u32>,
    hard_target: Vec<u32>,
    map_target: Vec<u32>,
    soft_target: Vec<u32>,
    /// The same tables as `u16` when the base vocabulary allows (half the cache footprint: the
    /// look-ups of top-K ids into a 150k-entry table are the hot loop's memory traffic).
    hard_target16: Option<Vec<u16>>,
    soft_target16: Option<Vec<u16>>,
    base_stripped: Vec<Vec<char>>,
    blend_stripped: Vec<Vec<char>>,
    base_guide: Vec<u32>,
    blend_guide: Vec<u32>,
}

impl Aligner {
    /// Builds the per-vocabulary tables.
    ///
    /// `vocab_map` maps marker-swapped blend strings to base strings (the reference's mapping
    /// file); `compat` selects the reference behaviour, which forces the current-token fallback.
    pub fn new(
        base: Vocab,
        blend: Vocab,
        base_marker: &str,
        blend_marker: &str,
        vocab_map: Option<Vec<(String, String)>>,
        compat: bool,
        fallback: Fallback,
    ) -> Result<Self> {
        for (name, marker) in [("base_marker", base_marker), ("blend_marker", blend_marker)] {
            if marker.is_empty() {
                return Err(Error::Value(format!(
                    "{name} is empty; use the tokenizer's word-boundary marker (\"▁\" or \"Ġ\")"
                )));
            }
        }
        if base.is_empty() || blend.is_empty() {
            return Err(Error::Value(format!(
                "vocabularies must not be empty (base {}, blend {})",
                base.len(),
                blend.len()
            )));
        }
        let swap = |s: &str| s.replace(blend_marker, base_marker);
        let mut map: FxHashMap<String, u32> = FxHashMap::default();
        if let Some(pairs) = vocab_map {
            map.reserve(pairs.len());
            for (k, v) in pairs {
                let target = base.id_of(&v).unwrap_or(NONE);
                map.insert(k, target);
            }
        }
        let nb = blend.len();
        // Ids without a string are UNKNOWN in the walk tables, so one look-up per top-K entry
        // tells both "no string" and "not a base token" apart.
        let mut hard_target = vec![UNKNOWN; nb];
        let mut map_target = vec![NONE; nb];
        let mut soft_target = vec![UNKNOWN; nb];
        for id in 0..nb {
            if let Some(s) = blend.get(id) {
                let t = swap(s);
                hard_target[id] = base.id_of(&t).unwrap_or(NONE);
                match map.get(&t) {
                    Some(&target) => {
                        map_target[id] = target;
                        soft_target[id] = target;
                    }
                    None => soft_target[id] = hard_target[id],
                }
            }
        }
        let strip_all = |v: &Vocab, marker: &str| -> Vec<Vec<char>> {
            v.strings()
                .iter()
                .map(|s| {
                    s.as_deref()
                        .map_or_else(Vec::new, |s| strip_marker(s, marker))
                })
                .collect()
        };
        let guide_all = |v: &Vocab, marker: &str| -> Vec<u32> {
            v.strings()
                .iter()
                .map(|s| s.as_deref().map_or(0, |s| surface_len(s, marker)))
                .collect()
        };
        // Padded with UNKNOWN to a power of two, for the masked look-ups of `fill_row`.
        let compact = |t: &[u32]| -> Option<Vec<u16>> {
            (base.len() < usize::from(u16::MAX - 1)).then(|| {
                let mut c: Vec<u16> = t.iter().map(|&v| narrow(v)).collect();
                c.resize(t.len().next_power_of_two(), narrow(UNKNOWN));
                c
            })
        };
        Ok(Aligner {
            hard_target16: compact(&hard_target),
            soft_target16: compact(&soft_target),
            base_stripped: strip_all(&base, base_marker),
            blend_stripped: strip_all(&blend, blend_marker),
            base_guide: guide_all(&base, base_marker),
            blend_guide: guide_all(&blend, blend_marker),
            base,
            blend,
            base_marker: base_marker.to_string(),
            blend_marker: blend_marker.to_string(),
            blend_byte_level: blend_marker == "Ġ",
            compat,
            fallback: if compat { Fallback::Current } else { fallback },
            map,
            hard_target,
            map_target,
            soft_target,
        })
    }

    pub fn base_vocab(&self) -> &Vocab {
        &self.base
    }

    pub fn blend_vocab(&self) -> &Vocab {
        &self.blend
    }

    pub fn compat(&self) -> bool {
        self.compat
    }

    pub fn fallback(&self) -> Fallback {
        self.fallback
    }

    /// Base id (lowest id of its string) each blend id maps to in `mode`; `NONE` if its string
    /// is not a base token, `UNKNOWN` if it has no string.
    pub fn targets(&self, mode: VocabMode) -> &[u32] {
        match mode {
            VocabMode::Hard => &self.hard_target,
            VocabMode::Soft => &self.soft_target,
        }
    }

    /// Checks one sequence; `seq` numbers it in error messages.
    pub fn validate(&self, seq: usize, inp: &SeqInput, method: Method) -> Result<()> {
        self.check(seq, inp, method).map(|_| ())
    }

    /// Validates and aligns one sequence; `seq` numbers it in error messages.
    pub fn align(
        &self,
        seq: usize,
        inp: &SeqInput,
        method: Method,
        mode: VocabMode,
    ) -> Result<SeqOutput> {
        self.align_before(seq, inp, None, method, mode)
    }

    /// [`Aligner::align`], prefetching the inputs of `next` (the sequence to be aligned after
    /// this one on the same thread) into the cache while this one's rows are built.
    pub fn align_before(
        &self,
        seq: usize,
        inp: &SeqInput,
        next: Option<&SeqInput>,
        method: Method,
        mode: VocabMode,
    ) -> Result<SeqOutput> {
        let in_range = self.check(seq, inp, method)?;
        let prefetcher = match next {
            Some(n) => Prefetcher::new(
                [
                    byte_range(n.topk_ids),
                    byte_range(n.topk_logits),
                    byte_range(n.base_ids),
                    byte_range(n.blend_ids),
                    byte_range(n.base_offsets.unwrap_or_default()),
                    byte_range(n.blend_offsets.unwrap_or_default()),
                ],
                inp.base_ids.len(),
            ),
            None => Prefetcher::none(),
        };
        self.align_checked(inp, method, mode, in_range, prefetcher)
    }

    /// [`Aligner::validate`], also telling whether every top-K id is below the blend vocabulary's
    /// size (the scan that rejects negative ids finds out at little extra cost).
    fn check(&self, seq: usize, inp: &SeqInput, method: Method) -> Result<bool> {
        let (m, n) = (inp.base_ids.len(), inp.blend_ids.len());
        if m == 0 {
            return Err(Error::EmptySequence {
                seq,
                side: Side::Base,
            });
        }
        if n == 0 {
            return Err(Error::EmptySequence {
                seq,
                side: Side::Blend,
            });
        }
        if inp.k == 0 {
            return Err(Error::Shape(format!(
                "sequence {seq}: top-K arrays have K = 0 columns; K must be at least 1"
            )));
        }
        if inp.topk_ids.len() != n * inp.k || inp.topk_logits.len() != n * inp.k {
            return Err(Error::Shape(format!(
                "sequence {seq}: top-K ids have {} values and logits {}, but the blend sequence \
                 has {n} tokens x K = {} (expected {})",
                inp.topk_ids.len(),
                inp.topk_logits.len(),
                inp.k,
                n * inp.k
            )));
        }
        check_ids(seq, Side::Base, inp.base_ids, &self.base)?;
        check_ids(seq, Side::Blend, inp.blend_ids, &self.blend)?;
        // Branch-free scans first (they vectorize); locate the culprit only on failure.
        let (any_bits, in_range) = self.scan_topk_ids(inp.topk_ids);
        if any_bits < 0 {
            let flat = inp.topk_ids.iter().position(|&id| id < 0).unwrap_or(0);
            return Err(Error::Value(format!(
                "sequence {seq}: blend top-K id {} at position {}, rank {} is negative",
                inp.topk_ids[flat],
                flat / inp.k,
                flat % inp.k
            )));
        }
        // NaN and +inf fail `v < inf`; -inf (padding: no probability) passes.
        let bad = |v: &f32| v.is_nan() | (*v == f32::INFINITY);
        let any_bad = inp.topk_logits.iter().fold(false, |acc, v| acc | bad(v));
        if let Some(flat) = any_bad
            .then(|| inp.topk_logits.iter().position(bad))
            .flatten()
        {
            return Err(Error::BadLogit {
                seq,
                pos: flat / inp.k,
                rank: flat % inp.k,
                value: inp.topk_logits[flat],
            });
        }
        // MinED ignores offsets if they are given.
        if method == Method::Offsets {
            if self.compat {
                return Err(Error::Value(
                    "compat=\"fusellm\" reproduces the reference MinED pipeline; use \
                     method=\"mined\" with it"
                        .to_string(),
                ));
            }
            let (Some(bo), Some(lo)) = (inp.base_offsets, inp.blend_offsets) else {
                return Err(Error::Value(format!(
                    "sequence {seq}: method=\"offsets\" needs base_offsets and blend_offsets"
                )));
            };
            // The names are only formatted into an error.
            validate_offsets(bo, format_args!("sequence {seq}: base_offsets"))?;
            validate_offsets(lo, format_args!("sequence {seq}: blend_offsets"))?;
            if bo.len() != 2 * m || lo.len() != 2 * n {
                return Err(Error::Shape(format!(
                    "sequence {seq}: offsets have {} base and {} blend rows, but the sequences \
                     have {m} base and {n} blend tokens",
                    bo.len() / 2,
                    lo.len() / 2
                )));
            }
        }
        Ok(in_range)
    }

    /// The OR of all top-K ids (negative if any is) and whether all are below the blend
    /// vocabulary's size (meaningful when none is negative).
    fn scan_topk_ids(&self, ids: &[i32]) -> (i32, bool) {
        let size = i32::try_from(self.blend.len()).unwrap_or(i32::MAX);
        let (bits, beyond) = ids.iter().fold((0i32, 0u32), |(bits, beyond), &id| {
            (bits | id, beyond + u32::from(id >= size))
        });
        (bits, beyond == 0)
    }

    /// Base-to-blend pairing: for each base position the single paired blend position whose
    /// distribution may be used, or `NO_MATCH`; `exact` tells whether the pairing already implies
    /// a match (offsets) or still needs the token-string check (MinED).
    fn pair(&self, inp: &SeqInput, method: Method, scratch: &mut PairScratch) -> Result<bool> {
        match method {
            Method::Offsets => {
                match_ends_into(
                    inp.base_offsets.unwrap_or_default(),
                    inp.blend_offsets.unwrap_or_default(),
                    &mut scratch.pairing,
                    &mut scratch.at_end,
                );
                Ok(true)
            }
            Method::Mined => {
                let x = intern_ids(inp.blend_ids, &self.blend_stripped, &self.blend_guide);
                let y = intern_ids(inp.base_ids, &self.base_stripped, &self.base_guide);
                let al = mined_dtw(&x, &y)?;
                scratch.pairing.clear();
                scratch
                    .pairing
                    .extend((0..inp.base_ids.len()).map(|j| match al.for_base(j) {
                        [one] => *one,
                        _ => NO_MATCH,
                    }));
                Ok(false)
            }
        }
    }

    /// Whether base position `i` (id `base_id`) may take blend token `blend_id`'s distribution
    /// (spec section 6, including the byte-level first-token rule).
    fn tokens_match(&self, i: usize, base_id: u32, blend_id: u32, mode: VocabMode) -> bool {
        let canon = self.base.canon[base_id as usize];
        if i == 0 && self.blend_byte_level {
            let b = self.base.get(base_id as usize).unwrap_or_default();
            let s = self.blend.get(blend_id as usize).unwrap_or_default();
            let mut t = s.replace(&self.blend_marker, &self.base_marker);
            if b.starts_with(&self.base_marker) && !t.starts_with(&self.base_marker) {
                t.insert_str(0, &self.base_marker);
                return b == t || (mode == VocabMode::Soft && self.map.get(&t) == Some(&canon));
            }
        }
        self.hard_target[blend_id as usize] == canon
            || (mode == VocabMode::Soft && self.map_target[blend_id as usize] == canon)
    }

    /// Aligns one validated sequence.
    pub fn align_one(&self, inp: &SeqInput, method: Method, mode: VocabMode) -> Result<SeqOutput> {
        let (_, in_range) = self.scan_topk_ids(inp.topk_ids);
        self.align_checked(inp, method, mode, in_range, Prefetcher::none())
    }

    fn align_checked(
        &self,
        inp: &SeqInput,
        method: Method,
        mode: VocabMode,
        topk_in_range: bool,
        mut prefetcher: Prefetcher,
    ) -> Result<SeqOutput> {
        // Without ids that lack a string (a complete vocabulary, all top-K ids in range), every
        // dropped entry is an unmapped one: no per-entry counting.
        let clean = self.blend.complete && topk_in_range;
        // The pairing's buffers are reused from one sequence to the next on each thread.
        let mut scratch = PAIR_SCRATCH.take();
        let exact = self.pair(inp, method, &mut scratch);
        let out = exact
            .map(|exact| self.rows_of(inp, &scratch.pairing, exact, mode, clean, &mut prefetcher));
        PAIR_SCRATCH.set(scratch);
        out
    }

    /// The output rows of one sequence, given its pairing.
    fn rows_of(
        &self,
        inp: &SeqInput,
        pairing: &[u32],
        exact: bool,
        mode: VocabMode,
        clean: bool,
        prefetcher: &mut Prefetcher,
    ) -> SeqOutput {
        let table16 = match mode {
            VocabMode::Hard => self.hard_target16.as_deref(),
            VocabMode::Soft => self.soft_target16.as_deref(),
        };
        // Rows of up to 16 entries are built in fixed-size buffers (no bounds checks in the hot
        // loop, whole-buffer copies into the output); wider rows in buffers of their own width.
        let rows = Rows {
            inp,
            pairing,
            exact,
            mode,
            clean,
        };
        match (table16, inp.k <= SMALL_K) {
            (Some(t), true) => self.rows(&rows, t, Small::default(), prefetcher),
            (Some(t), false) => self.rows(&rows, t, Wide::new(inp.k), prefetcher),
            (None, true) => self.rows(&rows, self.targets(mode), Small::default(), prefetcher),
            (None, false) => self.rows(&rows, self.targets(mode), Wide::new(inp.k), prefetcher),
        }
    }

    /// The output rows of one sequence, given its pairing and the target table of `mode`.
    #[inline(always)]
    fn rows<T: Cell, B: RowBuf>(
        &self,
        rows: &Rows,
        table: &[T],
        mut buf: B,
        prefetcher: &mut Prefetcher,
    ) -> SeqOutput {
        let Rows {
            inp,
            pairing,
            exact,
            mode,
            clean,
        } = *rows;
        // Masked look-ups need a table whose length is a power of two (the `u16` tables are
        // padded to one) and covers every id.
        let clean = clean && table.len().is_power_of_two() && table.len() >= self.blend.len();
        let (m, k) = (inp.base_ids.len(), inp.k);
        let slack = buf.ids().len() - k;
        let mut out = SeqOutput {
            ids: Vec::with_capacity(m * k + slack),
            logits: Vec::with_capacity(m * k + slack),
            status: Vec::with_capacity(m),
            k,
            num_unknown: 0,
            num_unmapped: 0,
            num_duplicates: 0,
        };
        let mut order: Vec<usize> = (0..k).collect();
        let merge = !self.compat;
        // A one-hot row holds probability 1: log-probability 0 (the reference stores logit 1.0,
        // which a softmax over the one entry also reads as probability 1).
        let fallback_value = if self.compat { 1.0 } else { 0.0 };
        for (i, &j) in pairing.iter().enumerate() {
            prefetcher.step();
            let base_id = inp.base_ids[i] as u32;
            let matched = j != NO_MATCH
                && (exact || self.tokens_match(i, base_id, inp.blend_ids[j as usize] as u32, mode));
            buf.clear();
            let row_status = if matched {
                let j = j as usize;
                let src_ids = &inp.topk_ids[j * k..(j + 1) * k];
                let src_logits = &inp.topk_logits[j * k..(j + 1) * k];
                let (len, invalid, unknown, duplicates) = match (is_descending(src_logits), clean) {
                    (true, true) => {
                        let entries = src_ids.iter().copied().zip(src_logits.iter().copied());
                        fill_row::<T, B, true>(table, entries, &mut buf, merge)
                    }
                    (true, false) => {
                        let entries = src_ids.iter().copied().zip(src_logits.iter().copied());
                        fill_row::<T, B, false>(table, entries, &mut buf, merge)
                    }
                    (false, _) => {
                        descending_order(src_logits, &mut order);
                        let entries = order.iter().map(|&r| (src_ids[r], src_logits[r]));
                        fill_row::<T, B, false>(table, entries, &mut buf, merge)
                    }
                };
                out.num_unknown += unknown;
                out.num_unmapped += invalid - unknown;
                out.num_duplicates += duplicates;
                if len > 0 {
                    status::MATCHED
                } else {
                    status::EMPTY
                }
            } else {
                let target = match self.fallback {
                    Fallback::Current => Some(base_id),
                    Fallback::Next => inp.base_ids.get(i + 1).map(|&x| x as u32),
                    Fallback::Mask => None,
                };
                match target {
                    Some(t) => {
                        buf.put(0, t as i32, fallback_value);
                        status::FALLBACK
                    }
                    None => status::MASKED,
                }
            };
            // The whole buffer is copied (a fixed size for small rows), the slack cut off.
            let end = out.ids.len() + k;
            out.ids.extend_from_slice(buf.ids());
            out.logits.extend_from_slice(buf.logits());
            out.ids.truncate(end);
            out.logits.truncate(end);
            out.status.push(row_status);
        }
        out
    }
}

/// A target-table cell: a base id, or one of two markers for [`NONE`] and [`UNKNOWN`].
trait Cell: Copy {
    /// The cell's marker for [`UNKNOWN`]; the one for [`NONE`] is one above, and every valid base
    /// id is below both.
    const UNKNOWN: u32;
    /// The cell's value, zero-extended.
    fn raw(self) -> u32;
}

impl Cell for u32 {
    const UNKNOWN: u32 = UNKNOWN;
    #[inline(always)]
    fn raw(self) -> u32 {
        self
    }
}

impl Cell for u16 {
    const UNKNOWN: u32 = u16::MAX as u32 - 1;
    #[inline(always)]
    fn raw(self) -> u32 {
        u32::from(self)
    }
}

/// The `u16` form of a target-table cell whose base ids are below `u16::MAX - 1`.
fn narrow(v: u32) -> u16 {
    match v {
        NONE => u16::MAX,
        UNKNOWN => u16::MAX - 1,
        v => v as u16,
    }
}

/// Working space of [`Aligner::pair`].
#[derive(Default)]
struct PairScratch {
    pairing: Vec<u32>,
    at_end: Vec<u32>,
}

thread_local! {
    static PAIR_SCRATCH: std::cell::Cell<PairScratch> = std::cell::Cell::new(PairScratch::default());
}

/// What [`Aligner::rows`] works from.
#[derive(Clone, Copy)]
struct Rows<'a> {
    inp: &'a SeqInput<'a>,
    /// Per base position, its blend position or [`NO_MATCH`].
    pairing: &'a [u32],
    /// The pairing implies a match (offsets); otherwise token strings are compared (MinED).
    exact: bool,
    mode: VocabMode,
    /// No top-K id lacks a string: dropped entries need no classifying.
    clean: bool,
}

/// Rows of at most this many entries use [`Small`] buffers.
const SMALL_K: usize = 16;

/// A row under construction: padding (`-1` ids, `-inf` logits) beyond the entries put so far.
trait RowBuf {
    /// Resets every slot to padding.
    fn clear(&mut self);
    /// Writes slot `at`, which is below the row's width.
    fn put(&mut self, at: usize, id: i32, logit: f32);
    /// The ids and logits of all slots.
    fn slots(&self) -> (&[i32], &[f32]);
    fn parts(&mut self) -> (&mut [i32], &mut [f32]);
    fn ids(&self) -> &[i32] {
        self.slots().0
    }
    fn logits(&self) -> &[f32] {
        self.slots().1
    }
    /// Whether two of the first `len` ids are equal.
    fn has_duplicate(&self, len: usize) -> bool {
        let ids = &self.ids()[..len];
        (1..len).any(|a| ids[..a].contains(&ids[a]))
    }
}

/// A row of up to [`SMALL_K`] entries in fixed-size arrays.
struct Small {
    ids: [i32; SMALL_K],
    logits: [f32; SMALL_K],
}

impl Default for Small {
    fn default() -> Self {
        Small {
            ids: [-1; SMALL_K],
            logits: [f32::NEG_INFINITY; SMALL_K],
        }
    }
}

impl RowBuf for Small {
    #[inline(always)]
    fn clear(&mut self) {
        *self = Small::default();
    }
    #[inline(always)]
    fn put(&mut self, at: usize, id: i32, logit: f32) {
        // `at` is below the width, so the mask keeps it unchanged (and the index provably in range).
        self.ids[at % SMALL_K] = id;
        self.logits[at % SMALL_K] = logit;
    }
    fn slots(&self) -> (&[i32], &[f32]) {
        (&self.ids, &self.logits)
    }
    fn parts(&mut self) -> (&mut [i32], &mut [f32]) {
        (&mut self.ids, &mut self.logits)
    }
    #[inline]
    fn has_duplicate(&self, len: usize) -> bool {
        // Each of the first `len` ids against the whole buffer, in fixed-width (vectorized)
        // passes: an id equals itself once, and the padding (-1) equals no valid id.
        let mut equal = 0u32;
        for &x in &self.ids[..len.min(SMALL_K)] {
            equal += self.ids.iter().map(|&y| u32::from(x == y)).sum::<u32>();
        }
        equal as usize != len
    }
}

/// A row of any width.
struct Wide {
    ids: Vec<i32>,
    logits: Vec<f32>,
}

impl Wide {
    fn new(k: usize) -> Self {
        Wide {
            ids: vec![-1; k],
            logits: vec![f32::NEG_INFINITY; k],
        }
    }
}

impl RowBuf for Wide {
    fn clear(&mut self) {
        self.ids.fill(-1);
        self.logits.fill(f32::NEG_INFINITY);
    }
    #[inline(always)]
    fn put(&mut self, at: usize, id: i32, logit: f32) {
        self.ids[at] = id;
        self.logits[at] = logit;
    }
    fn slots(&self) -> (&[i32], &[f32]) {
        (&self.ids, &self.logits)
    }
    fn parts(&mut self) -> (&mut [i32], &mut [f32]) {
        (&mut self.ids, &mut self.logits)
    }
}

/// Maps top-K `entries` (highest logit first) to base ids through `table` and writes the valid
/// ones, in order, to the front of a cleared row; returns the row's length, the number of entries
/// dropped as invalid, how many of those have no string, and how many duplicates were merged (or
/// dropped). `CLEAN` promises that every id has
/// a string and indexes the table, whose length is a power of two (no counting, masked look-ups).
/// The row ends sorted by descending logit, without duplicate ids: a duplicate merges into the
/// first occurrence by summing probabilities (`merge`) or is dropped (the reference keeps the
/// first).
///
/// The loop branches on nothing but the table bounds (checked unless `CLEAN`): every entry is
/// written at the current length, which only advances for a valid one (an invalid entry is
/// overwritten by the next, or left just past the end and reset to padding). Possible duplicates are flagged by a 64-bit filter of the ids
/// written (one bit per id, by a multiplicative hash); only a flagged row takes the exact pass of
/// [`dedup_row`].
#[inline(always)]
fn fill_row<T: Cell, B: RowBuf, const CLEAN: bool>(
    table: &[T],
    entries: impl ExactSizeIterator<Item = (i32, f32)>,
    buf: &mut B,
    merge: bool,
) -> (usize, u64, u64, u64) {
    let (mut len, mut filter, mut collide, mut unknown) = (0usize, 0u64, 0u64, 0u64);
    let mut invalid = 0u64;
    // With `CLEAN`, every id indexes the table, whose length is a power of two: the mask changes
    // no id and spares the bounds check.
    let mask = table.len().wrapping_sub(1);
    for (id, logit) in entries {
        let target = if CLEAN {
            table
                .get(id as usize & mask)
                .map_or(T::UNKNOWN, |c| c.raw())
        } else {
            table.get(id as usize).map_or(T::UNKNOWN, |c| c.raw())
        };
        let mapped = target < T::UNKNOWN;
        invalid += u64::from(!mapped);
        // A -inf entry holds no probability (padding): dropped, not counted.
        let valid = mapped & (logit > f32::NEG_INFINITY);
        if !CLEAN {
            unknown += u64::from(target == T::UNKNOWN);
        }
        // A multiplicative hash spreads the ids of frequent tokens (which cluster) over the bits.
        let bit = u64::from(valid) << (target.wrapping_mul(0x9E37_79B1) >> 26);
        collide |= filter & bit;
        filter |= bit;
        // `len` is below the number of entries read so far, so below the row's width.
        buf.put(len, target as i32, logit);
        len += usize::from(valid);
    }
    let (ids, logits) = buf.parts();
    if len < ids.len() {
        ids[len] = -1;
        logits[len] = f32::NEG_INFINITY;
    }
    let mut duplicates = 0;
    if collide != 0 && buf.has_duplicate(len) {
        let (ids, logits) = buf.parts();
        let kept = dedup_row(ids, logits, len, merge);
        duplicates = (len - kept) as u64;
        len = kept;
    }
    (len, invalid, unknown, duplicates)
}

/// Removes duplicate ids from the first `len` entries of a row (in descending logit order),
/// merging each into its first occurrence (`merge`: log-sum-exp of the logits) or dropping it;
/// re-pads the freed tail and re-sorts a merged row. Returns the new length.
fn dedup_row(ids: &mut [i32], logits: &mut [f32], len: usize, merge: bool) -> usize {
    let (mut kept, mut merged) = (0usize, false);
    for a in 0..len {
        let (id, logit) = (ids[a], logits[a]);
        match ids[..kept].iter().position(|&x| x == id) {
            Some(p) => {
                if merge {
                    logits[p] = logaddexp(logits[p], logit);
                    merged = true;
                }
            }
            None => {
                ids[kept] = id;
                logits[kept] = logit;
                kept += 1;
            }
        }
    }
    ids[kept..len].fill(-1);
    logits[kept..len].fill(f32::NEG_INFINITY);
    if merged {
        sort_row(&mut ids[..kept], &mut logits[..kept]);
    }
    kept
}

fn check_ids(seq: usize, side: Side, ids: &[i32], vocab: &Vocab) -> Result<()> {
    // Without holes, a branch-free range check (it vectorizes) clears the common case.
    let n = vocab.len() as u32;
    if vocab.complete && ids.iter().fold(true, |ok, &id| ok & ((id as u32) < n)) {
        return Ok(());
    }
    for (pos, &id) in ids.iter().enumerate() {
        // `canon` is NONE exactly for ids without a string (and a quarter of the size of
        // `strings`, which matters for cache misses over a 150k vocabulary).
        let known = usize::try_from(id)
            .ok()
            .and_then(|i| vocab.canon.get(i))
            .is_some_and(|&c| c != NONE);
        if !known {
            return Err(Error::UnknownId {
                seq,
                side,
                pos,
                id: i64::from(id),
                vocab_size: vocab.len(),
            });
        }
    }
    Ok(())
}

/// Interns a sequence of vocabulary ids (validated) against per-id stripped strings.
fn intern_ids<'a>(ids: &[i32], stripped: &'a [Vec<char>], guide: &[u32]) -> Interned<'a> {
    let mut local: FxHashMap<i32, u32> = FxHashMap::default();
    let mut out = Interned {
        ids: Vec::with_capacity(ids.len()),
        strings: Vec::new(),
        guide: ids.iter().map(|&id| guide[id as usize]).collect(),
    };
    for &id in ids {
        let next = out.strings.len() as u32;
        let l = *local.entry(id).or_insert_with(|| {
            out.strings.push(stripped[id as usize].as_slice());
            next
        });
        out.ids.push(l);
    }
    out
}

/// Whether a top-K row is already in non-increasing order (the common case).
#[inline]
fn is_descending(logits: &[f32]) -> bool {
    // No early exit: rows are short and almost always sorted, and the fold vectorizes.
    let next = logits.get(1..).unwrap_or_default();
    logits
        .iter()
        .zip(next)
        .fold(true, |ok, (a, b)| ok & (a >= b))
}

/// Stable descending order of a top-K row.
fn descending_order(logits: &[f32], order: &mut [usize]) {
    for (r, o) in order.iter_mut().enumerate() {
        *o = r;
    }
    // NaN was rejected by validation; -0.0 and 0.0 compare equal and keep their order.
    order.sort_by(|&a, &b| {
        logits[b]
            .partial_cmp(&logits[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
}

/// Stable sort of a row by descending logit, in place (insertion sort: rows hold at most K
/// entries and are nearly sorted).
fn sort_row(ids: &mut [i32], logits: &mut [f32]) {
    for i in 1..ids.len() {
        let (id, l) = (ids[i], logits[i]);
        let mut j = i;
        // NaN was rejected by validation; `>` keeps equal logits (also -0.0 / 0.0) in order.
        while j > 0 && l > logits[j - 1] {
            ids[j] = ids[j - 1];
            logits[j] = logits[j - 1];
            j -= 1;
        }
        ids[j] = id;
        logits[j] = l;
    }
}

/// `ln(exp(a) + exp(b))` without overflow.
fn logaddexp(a: f32, b: f32) -> f32 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f32::NEG_INFINITY || hi == f32::INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// Test fixtures shared by the modules that align (`aligner`, `flat`).
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub(crate) fn vocab(v: &[&str]) -> Vocab {
        Vocab::new(v.iter().map(|s| Some(s.to_string())).collect()).unwrap()
    }

    /// base: ▁the ▁cat ▁s at .      blend: Ġthe Ġcat Ġsat . Ġdog the
    pub(crate) fn aligner(compat: bool, fallback: Fallback) -> Aligner {
        Aligner::new(
            vocab(&["▁the", "▁cat", "▁s", "at", "."]),
            vocab(&["Ġthe", "Ġcat", "Ġsat", ".", "Ġdog", "the"]),
            "▁",
            "Ġ",
            None,
            compat,
            fallback,
        )
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::aligner;
    use super::*;

    fn run(al: &Aligner, topk: &[i32], logits: &[f32], k: usize, method: Method) -> SeqOutput {
        let inp = SeqInput {
            base_ids: &[0, 1, 2, 3, 4],
            blend_ids: &[0, 1, 2, 3],
            topk_ids: topk,
            topk_logits: logits,
            k,
            base_offsets: Some(&[0, 3, 3, 7, 7, 9, 9, 11, 11, 12]),
            blend_offsets: Some(&[0, 3, 3, 7, 7, 11, 11, 12]),
        };
        al.validate(0, &inp, method).unwrap();
        al.align_one(&inp, method, VocabMode::Hard).unwrap()
    }

    #[test]
    fn compat_rows_follow_the_reference() {
        let al = aligner(true, Fallback::Next);
        // top-2 per blend position; position 1 holds a string that is no base token (Ġsat) and
        // an id without a string (99); position 3 a duplicate.
        let topk = [1, 0, 2, 99, 3, 4, 0, 0];
        let logits = [2.0, 1.0, 3.0, 0.5, 1.0, 0.0, 5.0, 4.0];
        let out = run(&al, &topk, &logits, 2, Method::Mined);
        // base ▁the <- Ġthe (match): ids [1, 0]; ▁cat <- Ġcat: Ġsat is not a base token, 99 unknown.
        assert_eq!(&out.ids[0..2], &[1, 0]);
        assert_eq!(&out.ids[2..4], &[-1, -1]);
        assert_eq!(out.status[1], status::EMPTY);
        // ▁s and at both pair with Ġsat: one-hot on the CURRENT token.
        assert_eq!((out.ids[4], out.logits[4]), (2, 1.0));
        assert_eq!((out.ids[6], out.logits[6]), (3, 1.0));
        assert_eq!(out.status[2], status::FALLBACK);
        // "." <- ".": duplicates keep the first logit.
        assert_eq!((&out.ids[8..10], out.logits[8]), (&[0, -1][..], 5.0));
        assert_eq!((out.num_unknown, out.num_unmapped), (1, 1));
    }

    #[test]
    fn default_merges_and_falls_back_on_the_next_token() {
        let al = aligner(false, Fallback::Next);
        let topk = [1, 0, 2, 99, 3, 4, 0, 0];
        let logits = [2.0, 1.0, 3.0, 0.5, 1.0, 0.0, 5.0, 5.0];
        let out = run(&al, &topk, &logits, 2, Method::Mined);
        assert_eq!((out.ids[4], out.ids[6]), (3, 4), "next base token");
        let merged = out.logits[8];
        assert!((merged - (5.0 + std::f32::consts::LN_2)).abs() < 1e-6);
        // offsets: ▁s (ends at 9) has no blend token ending there; "at" ends with Ġsat at 11.
        let out = run(&al, &topk, &logits, 2, Method::Offsets);
        assert_eq!(out.status[2], status::FALLBACK);
        assert_eq!(
            (out.status[3], out.ids[6], out.ids[7]),
            (status::MATCHED, 4, -1)
        );
        assert_eq!(out.status[4], status::MATCHED);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let al = aligner(false, Fallback::Mask);
        let inp = SeqInput {
            base_ids: &[0, 7],
            blend_ids: &[0],
            topk_ids: &[0],
            topk_logits: &[f32::NAN],
            k: 1,
            base_offsets: None,
            blend_offsets: None,
        };
        let err = al.validate(3, &inp, Method::Mined).unwrap_err();
        assert!(
            err.to_string().contains("base token id 7 at position 1"),
            "{err}"
        );
        let inp = SeqInput {
            base_ids: &[0],
            ..inp
        };
        let err = al.validate(3, &inp, Method::Mined).unwrap_err();
        assert!(err.to_string().contains("NaN"), "{err}");
        assert!(
            al.validate(0, &inp, Method::Offsets).is_err(),
            "offsets missing"
        );
    }
}
