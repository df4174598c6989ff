//! Criterion benchmarks of the alignment kernels on synthetic but realistic token sequences:
//! one English-like text cut two ways (SentencePiece-style `▁` pieces against byte-level `Ġ`
//! pieces, different word splits, newlines spelled `<0x0A>` against `Ċ`).
//!
//! `cargo bench -p fusellm-core --bench align`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fusellm_core::dtw::{intern_strings, mined_dtw, mined_dtw_full, strip_marker, surface_len};
use fusellm_core::levenshtein::{levenshtein, AllPairs, PatternSet};
use fusellm_core::offsets::{match_ends, match_ends_merge};
use std::hint::black_box;

mod common;
use common::Rng;

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "fusion",
    "model",
    "token",
    "alignment",
    "language",
    "distribution",
    "knowledge",
    "training",
    "a",
    "to",
    "in",
    "is",
    "that",
    "vocabulary",
    "probability",
    "source",
    "target",
    "with",
    "teacher",
    "student",
    "loss",
    "sequence",
    "dynamic",
    "warping",
    "1850",
    "(see",
    "Table",
    "3),",
    "edit",
    "distance",
    "unbelievable",
    "naïve",
    "café",
    "—",
    "x",
];

/// A text of `words` words cut into (tokens, end offsets in chars) for one marker style.
fn segment(words: &[&str], marker: &str, seed: u64) -> (Vec<String>, Vec<i64>) {
    let mut rng = Rng(seed);
    let (mut toks, mut ends) = (Vec::new(), Vec::new());
    let mut pos = 0i64;
    for (k, w) in words.iter().enumerate() {
        let newline = k % 37 == 36;
        let chars: Vec<char> = w.chars().collect();
        let cut = if chars.len() > 3 {
            rng.below(chars.len() as u64 - 1) as usize
        } else {
            0
        };
        let lead = if k == 0 { 0 } else { 1 };
        let head: String = chars[..cut.max(1).min(chars.len())].iter().collect();
        let tail: String = chars[cut.max(1).min(chars.len())..].iter().collect();
        if cut == 0 || tail.is_empty() {
            toks.push(format!("{marker}{w}"));
            pos += lead + chars.len() as i64;
            ends.push(pos);
        } else {
            toks.push(format!("{marker}{head}"));
            pos += lead + head.chars().count() as i64;
            ends.push(pos);
            toks.push(tail.clone());
            pos += tail.chars().count() as i64;
            ends.push(pos);
        }
        if newline {
            toks.push(if marker == "▁" { "<0x0A>" } else { "Ċ" }.to_string());
            pos += 1;
            ends.push(pos);
        }
    }
    (toks, ends)
}

fn text(n_words: usize) -> Vec<&'static str> {
    let mut rng = Rng(42);
    (0..n_words)
        .map(|_| WORDS[rng.below(WORDS.len() as u64) as usize])
        .collect()
}

/// Marker-stripped strings and guide lengths of a token list.
type Prepared = (Vec<Vec<char>>, Vec<u32>);

fn prepared(tokens: &[String], marker: &str) -> Prepared {
    tokens
        .iter()
        .map(|t| (strip_marker(t, marker), surface_len(t, marker)))
        .unzip()
}

/// A text of `n_words` words segmented twice, as a blend (`Ġ`) and a base (`▁`) tokenizer
/// would, prepared for interning.
fn two_segmentations(n_words: usize) -> (Prepared, Prepared) {
    let words = text(n_words);
    let (base, _) = segment(&words, "▁", 7);
    let (blend, _) = segment(&words, "Ġ", 11);
    (prepared(&blend, "Ġ"), prepared(&base, "▁"))
}

fn bench_mined(c: &mut Criterion) {
    if cfg!(debug_assertions) {
        eprintln!("warning: benchmarking a debug build; numbers are meaningless");
    }
    let ((xs, xg), (ys, yg)) = two_segmentations(1500);
    let (x, y) = (intern_strings(&xs, xg), intern_strings(&ys, yg));
    assert_eq!(mined_dtw(&x, &y).unwrap(), mined_dtw_full(&x, &y).unwrap());
    let mut g = c.benchmark_group("mined_dtw");
    g.sample_size(20);
    g.throughput(Throughput::Elements(y.ids.len() as u64));
    g.bench_with_input(BenchmarkId::new("pruned", y.ids.len()), &(), |b, _| {
        b.iter(|| mined_dtw(black_box(&x), black_box(&y)).unwrap())
    });
    g.bench_with_input(BenchmarkId::new("full_matrix", y.ids.len()), &(), |b, _| {
        b.iter(|| mined_dtw_full(black_box(&x), black_box(&y)).unwrap())
    });
    g.finish();
}

fn bench_offsets(c: &mut Criterion) {
    let words = text(20_000);
    let (_, be) = segment(&words, "▁", 7);
    let (_, xe) = segment(&words, "Ġ", 11);
    let flat = |ends: &[i64]| -> Vec<i64> {
        let mut prev = 0;
        ends.iter()
            .flat_map(|&e| {
                let s = prev;
                prev = e;
                [s, e]
            })
            .collect()
    };
    let (bo, xo) = (flat(&be), flat(&xe));
    let mut g = c.benchmark_group("offsets");
    g.throughput(Throughput::Elements(be.len() as u64));
    g.bench_function("match_ends", |b| {
        b.iter(|| match_ends(black_box(&bo), black_box(&xo)))
    });
    // The two-pointer merge, the baseline of the table-indexed pass above.
    g.bench_function("match_ends_merge", |b| {
        b.iter(|| match_ends_merge(black_box(&bo), black_box(&xo)))
    });
    g.finish();
}

fn bench_levenshtein(c: &mut Criterion) {
    let a: Vec<char> = "probability".chars().collect();
    let b: Vec<char> = "probabilities".chars().collect();
    c.bench_function("levenshtein/11x13", |bch| {
        bch.iter(|| levenshtein(black_box(&a), black_box(&b)))
    });
}

/// MinED's cost table: every distance between the distinct strings of two segmentations of one
/// text, by the all-pairs lane kernel and, as its baseline, pair by pair with the per-pair
/// bit-parallel kernel over the same precomputed match masks.
fn bench_cost_table(c: &mut Criterion) {
    let ((xs, xg), (ys, yg)) = two_segmentations(1500);
    let (x, y) = (intern_strings(&xs, xg), intern_strings(&ys, yg));
    let (texts, patterns) = (&x.strings, &y.strings);
    let mut g = c.benchmark_group("cost_table");
    g.throughput(Throughput::Elements((texts.len() * patterns.len()) as u64));
    let mut all = AllPairs::default();
    let mut out = vec![0u16; texts.len() * patterns.len()];
    g.bench_function("all_pairs", |b| {
        b.iter(|| all.fill(black_box(texts), black_box(patterns), &mut out))
    });
    let (set, enc) = PatternSet::new(patterns, texts, 1 << 24).unwrap();
    g.bench_function("pair_by_pair", |b| {
        b.iter(|| {
            for (t, text) in texts.iter().enumerate() {
                for p in 0..patterns.len() {
                    out[t * patterns.len() + p] = set.distance(p, t, text, &enc[t]) as u16 + 1;
                }
            }
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_mined,
    bench_offsets,
    bench_levenshtein,
    bench_cost_table
);
criterion_main!(benches);
