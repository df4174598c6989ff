//! Ragged batches in flat buffers: what a dataset stage hands to the aligner in one call.
//!
//! A column of Arrow lists is two buffers: the values of every row one after the other, and the
//! row offsets (`offsets[r]..offsets[r + 1]` are row `r`'s values). [`FlatBatch`] takes a batch in
//! exactly that form (token ids, top-K rows and character spans of every row, with the row
//! offsets of each side), so a stage crosses into Rust once per batch with no per-row work in the
//! caller, and gets the base-side rows back as flat buffers of the same layout ([`FlatOutput`]),
//! with the batch's counts (statuses, dropped entries, exact spans) summed.
//!
//! The row offsets are validated here (they come from files): an inconsistent batch is an
//! [`Error`], never a panic. Each row is then aligned as [`Aligner::align_before`] aligns a
//! sequence, on a bounded rayon pool ([`crate::batch::par_map`]); the output does not depend on
//! the number of threads.

use crate::aligner::{status, Aligner, Method, SeqInput, SeqOutput, VocabMode};
use crate::batch::par_map;
use crate::error::{try_reserve, Error, Result};

/// A batch of sequence pairs in flat buffers: every row's values concatenated, laid out as one
/// [`SeqInput`] of all of them, and the row offsets of each side (`n + 1` each).
#[derive(Debug, Clone, Copy)]
pub struct FlatBatch<'a> {
    /// The rows' values, one after the other.
    pub values: SeqInput<'a>,
    /// Row offsets into the base ids (and the base spans and the output rows).
    pub base_rows: &'a [i64],
    /// Row offsets into the blend ids (and the top-K rows and the blend spans).
    pub blend_rows: &'a [i64],
}

/// The counts of a batch, summed over its rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCounts {
    /// Base positions by status ([`status`]); they sum to the batch's base positions.
    pub matched: u64,
    pub empty: u64,
    pub fallback: u64,
    pub masked: u64,
    /// Top-K entries dropped: the blend id has no token string.
    pub unknown_ids: u64,
    /// Top-K entries dropped: the string is not a base token.
    pub unmapped_ids: u64,
    /// Top-K entries merged into (or, compat, dropped for) an earlier one of the same base id.
    pub duplicate_ids: u64,
    /// Entries kept in matched rows.
    pub topk_entries: u64,
    /// Matched positions whose blend token has the base token's span (`None` without spans):
    /// the last blend token ending at or before the base token's end ends there and starts
    /// where the base token starts.
    pub exact_span: Option<u64>,
}

/// The base-side rows of a batch, every row's one after the other (as one [`SeqOutput`] of
/// all of them, indexed by the base row offsets), and the batch's counts.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatOutput {
    pub rows: SeqOutput,
    pub counts: BatchCounts,
}

/// Checks row offsets against the length of the values they index: `n + 1` offsets, from 0,
/// non-decreasing, ending at `len`.
fn check_rows(rows: &[i64], len: usize, n: usize, what: &str) -> Result<()> {
    if rows.len() != n + 1 {
        return Err(Error::Shape(format!(
            "{what} has {} row offsets; {} rows need {}",
            rows.len(),
            n,
            n + 1
        )));
    }
    if rows[0] != 0 {
        return Err(Error::Value(format!(
            "{what} must start at 0, got {}",
            rows[0]
        )));
    }
    if let Some(r) = rows.windows(2).position(|w| w[1] < w[0]) {
        return Err(Error::Value(format!(
            "{what} decrease at row {r} ({} then {})",
            rows[r],
            rows[r + 1]
        )));
    }
    let last = rows[n];
    if usize::try_from(last).ok() != Some(len) {
        return Err(Error::Shape(format!(
            "{what} end at {last}, but the values hold {len} items"
        )));
    }
    Ok(())
}

/// Checks that a flat buffer holds `width` values per item of a side with `items` items.
fn check_width(len: usize, items: usize, width: usize, what: &str) -> Result<()> {
    if items.checked_mul(width) != Some(len) {
        return Err(Error::Shape(format!(
            "{what} holds {len} values; {items} tokens x {width} need {}",
            items.saturating_mul(width)
        )));
    }
    Ok(())
}

impl FlatBatch<'_> {
    /// The number of rows.
    pub fn len(&self) -> usize {
        self.base_rows.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks the buffers' lengths and row offsets against each other.
    pub fn validate(&self) -> Result<()> {
        let (n, v) = (self.len(), &self.values);
        check_rows(self.base_rows, v.base_ids.len(), n, "base row offsets")?;
        check_rows(self.blend_rows, v.blend_ids.len(), n, "blend row offsets")?;
        if v.k == 0 {
            return Err(Error::Shape(
                "top-K arrays have K = 0 columns; K must be at least 1".to_string(),
            ));
        }
        let items = v.blend_ids.len();
        check_width(v.topk_ids.len(), items, v.k, "blend top-K ids")?;
        check_width(v.topk_logits.len(), items, v.k, "blend top-K logits")?;
        if let Some(o) = v.base_offsets {
            check_width(o.len(), v.base_ids.len(), 2, "base offsets")?;
        }
        if let Some(o) = v.blend_offsets {
            check_width(o.len(), items, 2, "blend offsets")?;
        }
        Ok(())
    }

    /// Row `r` as a [`SeqInput`] (the batch is valid).
    fn row(&self, r: usize) -> SeqInput<'_> {
        let span = |rows: &[i64]| rows[r] as usize..rows[r + 1] as usize;
        let (b, x) = (span(self.base_rows), span(self.blend_rows));
        let v = &self.values;
        let k = v.k;
        SeqInput {
            base_ids: &v.base_ids[b.clone()],
            blend_ids: &v.blend_ids[x.clone()],
            topk_ids: &v.topk_ids[x.start * k..x.end * k],
            topk_logits: &v.topk_logits[x.start * k..x.end * k],
            k,
            base_offsets: v.base_offsets.map(|o| &o[2 * b.start..2 * b.end]),
            blend_offsets: v.blend_offsets.map(|o| &o[2 * x.start..2 * x.end]),
        }
    }
}

/// Matched positions of one row whose blend token has the base token's span (see
/// [`BatchCounts::exact_span`]).
fn exact_spans(inp: &SeqInput, status_of: &[u8]) -> u64 {
    let (Some(base), Some(blend)) = (inp.base_offsets, inp.blend_offsets) else {
        return 0;
    };
    let blend_ends: Vec<i64> = blend.chunks_exact(2).map(|p| p[1]).collect();
    let mut exact = 0u64;
    for (span, &st) in base.chunks_exact(2).zip(status_of) {
        if st != status::MATCHED {
            continue;
        }
        let (start, end) = (span[0], span[1]);
        // The last blend token ending at or before `end` (ends are non-decreasing).
        let after = blend_ends.partition_point(|&e| e <= end);
        if let Some(j) = after.checked_sub(1) {
            exact += u64::from(blend_ends[j] == end && blend[2 * j] == start);
        }
    }
    exact
}

/// The counts of one aligned row.
fn row_counts(inp: &SeqInput, out: &SeqOutput, spans: bool) -> BatchCounts {
    let mut c = BatchCounts {
        unknown_ids: out.num_unknown,
        unmapped_ids: out.num_unmapped,
        duplicate_ids: out.num_duplicates,
        exact_span: spans.then(|| exact_spans(inp, &out.status)),
        ..BatchCounts::default()
    };
    for (row, &st) in out.ids.chunks_exact(out.k.max(1)).zip(&out.status) {
        match st {
            status::MATCHED => {
                c.matched += 1;
                c.topk_entries += row.iter().map(|&id| u64::from(id >= 0)).sum::<u64>();
            }
            status::EMPTY => c.empty += 1,
            status::FALLBACK => c.fallback += 1,
            _ => c.masked += 1,
        }
    }
    c
}

impl BatchCounts {
    fn add(&mut self, o: &BatchCounts) {
        self.matched += o.matched;
        self.empty += o.empty;
        self.fallback += o.fallback;
        self.masked += o.masked;
        self.unknown_ids += o.unknown_ids;
        self.unmapped_ids += o.unmapped_ids;
        self.duplicate_ids += o.duplicate_ids;
        self.topk_entries += o.topk_entries;
        self.exact_span = match (self.exact_span, o.exact_span) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
    }
}

/// Validates and aligns a flat batch; the error of the lowest failing row wins (its message
/// names the row as `sequence r`).
pub fn align_flat(
    aligner: &Aligner,
    batch: &FlatBatch,
    method: Method,
    mode: VocabMode,
    num_threads: Option<usize>,
) -> Result<FlatOutput> {
    batch.validate()?;
    let n = batch.len();
    let spans = method == Method::Offsets;
    let rows: Vec<Result<(SeqOutput, BatchCounts)>> = par_map(n, num_threads, |r| {
        let (inp, next) = (batch.row(r), (r + 1 < n).then(|| batch.row(r + 1)));
        let out = aligner.align_before(r, &inp, next.as_ref(), method, mode)?;
        let counts = row_counts(&inp, &out, spans);
        Ok((out, counts))
    });
    let (positions, k) = (batch.values.base_ids.len(), batch.values.k);
    let mut out = SeqOutput {
        ids: Vec::new(),
        logits: Vec::new(),
        status: Vec::new(),
        k,
        num_unknown: 0,
        num_unmapped: 0,
        num_duplicates: 0,
    };
    let mut counts = BatchCounts {
        exact_span: spans.then_some(0),
        ..BatchCounts::default()
    };
    try_reserve(&mut out.ids, positions * k, "the aligned ids")?;
    try_reserve(&mut out.logits, positions * k, "the aligned logits")?;
    try_reserve(&mut out.status, positions, "the aligned statuses")?;
    for row in rows {
        let (o, c) = row?;
        out.ids.extend_from_slice(&o.ids);
        out.logits.extend_from_slice(&o.logits);
        out.status.extend_from_slice(&o.status);
        counts.add(&c);
    }
    out.num_unknown = counts.unknown_ids;
    out.num_unmapped = counts.unmapped_ids;
    out.num_duplicates = counts.duplicate_ids;
    Ok(FlatOutput { rows: out, counts })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aligner::fixtures;
    use crate::aligner::Fallback;

    fn aligner() -> Aligner {
        fixtures::aligner(false, Fallback::Next)
    }

    /// Two rows: "the cat sat." twice, the second one's blend side one token shorter.
    struct Data {
        base_ids: Vec<i32>,
        base_rows: Vec<i64>,
        blend_ids: Vec<i32>,
        blend_rows: Vec<i64>,
        topk_ids: Vec<i32>,
        topk_logits: Vec<f32>,
        base_offsets: Vec<i64>,
        blend_offsets: Vec<i64>,
    }

    fn data() -> Data {
        let base_row = [0, 1, 2, 3, 4];
        let base_spans = [0, 3, 3, 7, 7, 9, 9, 11, 11, 12];
        let blend_row = [0, 1, 2, 3];
        let blend_spans = [0, 3, 3, 7, 7, 11, 11, 12];
        let topk = [1, 0, 2, 3, 3, 4, 0, 0];
        let logits = [2.0, 1.0, 3.0, 0.5, 1.0, 0.0, 5.0, 5.0];
        Data {
            base_ids: [base_row, base_row].concat(),
            base_rows: vec![0, 5, 10],
            blend_ids: [&blend_row[..], &blend_row[..3]].concat(),
            blend_rows: vec![0, 4, 7],
            topk_ids: [&topk[..], &topk[..6]].concat(),
            topk_logits: [&logits[..], &logits[..6]].concat(),
            base_offsets: [base_spans, base_spans].concat(),
            blend_offsets: [&blend_spans[..], &blend_spans[..6]].concat(),
        }
    }

    fn batch(d: &Data) -> FlatBatch<'_> {
        FlatBatch {
            values: SeqInput {
                base_ids: &d.base_ids,
                blend_ids: &d.blend_ids,
                topk_ids: &d.topk_ids,
                topk_logits: &d.topk_logits,
                k: 2,
                base_offsets: Some(&d.base_offsets),
                blend_offsets: Some(&d.blend_offsets),
            },
            base_rows: &d.base_rows,
            blend_rows: &d.blend_rows,
        }
    }

    /// `good` with other values.
    fn with<'a>(good: FlatBatch<'a>, f: impl FnOnce(&mut SeqInput<'a>)) -> FlatBatch<'a> {
        let mut b = good;
        f(&mut b.values);
        b
    }

    #[test]
    fn rows_and_counts_are_those_of_the_sequences() {
        let d = data();
        let b = batch(&d);
        let al = aligner();
        for threads in [1, 2, 3] {
            let out = align_flat(&al, &b, Method::Offsets, VocabMode::Hard, Some(threads)).unwrap();
            let (mut ids, mut status, mut matched) = (Vec::new(), Vec::new(), 0);
            for r in 0..2 {
                let o = al
                    .align(r, &b.row(r), Method::Offsets, VocabMode::Hard)
                    .unwrap();
                matched += o.status.iter().filter(|&&s| s == status::MATCHED).count() as u64;
                ids.extend(o.ids);
                status.extend(o.status);
            }
            assert_eq!(
                (out.rows.ids, out.rows.status),
                (ids, status),
                "{threads} threads"
            );
            let c = out.counts;
            assert_eq!(c.matched, matched);
            assert_eq!(c.matched + c.empty + c.fallback + c.masked, 10);
            // Row 0: ▁the, ▁cat and "." share their blend token's span; "at" ends with Ġsat
            // but starts later. Row 1 has no "." on the blend side.
            assert_eq!(c.exact_span, Some(3 + 2));
        }
    }

    #[test]
    fn inconsistent_offsets_are_errors() {
        let d = data();
        let al = aligner();
        let run = |b: &FlatBatch| align_flat(&al, b, Method::Offsets, VocabMode::Hard, Some(2));
        let good = batch(&d);
        let cases: Vec<(FlatBatch, &str)> = vec![
            (
                FlatBatch {
                    base_rows: &[0, 5],
                    ..good
                },
                "row offsets",
            ),
            (
                FlatBatch {
                    base_rows: &[1, 5, 10],
                    ..good
                },
                "start at 0",
            ),
            (
                FlatBatch {
                    blend_rows: &[0, 5, 4],
                    ..good
                },
                "decrease at row 1",
            ),
            (
                FlatBatch {
                    blend_rows: &[0, 4, 6],
                    ..good
                },
                "end at 6",
            ),
            (with(good, |v| v.topk_ids = &d.topk_ids[1..]), "top-K ids"),
            (
                with(good, |v| v.blend_offsets = Some(&d.blend_offsets[2..])),
                "blend offsets",
            ),
            (with(good, |v| v.k = 0), "K = 0"),
        ];
        for (b, want) in cases {
            let err = run(&b).unwrap_err().to_string();
            assert!(err.contains(want), "{err} (wanted {want})");
        }
        // A row's own error names the row.
        let mut bad = d.topk_logits.clone();
        bad[9] = f32::NAN;
        let b = with(good, |v| v.topk_logits = &bad);
        let err = run(&b).unwrap_err().to_string();
        assert!(err.contains("sequence 1") && err.contains("NaN"), "{err}");
    }
}
