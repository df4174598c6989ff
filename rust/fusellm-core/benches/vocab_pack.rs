//! Criterion benchmarks of the vocabulary map and the packing kernels, on synthetic data:
//! a SentencePiece-like base vocabulary (`▁` words and pieces) and a byte-level-like blend
//! vocabulary (`Ġ` words, pieces, and byte-spelled non-ASCII runs), each blend token mapped by the
//! exact index and, on a sample, by the brute-force definition (checked equal); packing 4M-token
//! int32 columns in the reference (concat) and best-fit-decreasing modes.
//!
//! `cargo bench -p fusellm-core --bench vocab_pack` (the real Qwen -> Mistral pair is measured by
//! `benches/test_bench_vocab_pack.py`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fusellm_core::pack::{PackMode, PackPlan};
use fusellm_core::vocab_map::{nearest_brute_force, nearest_indexed, NearestIndex};
use fusellm_core::{build_vocab_map, MapMethod};
use std::hint::black_box;

mod common;
use common::Rng;

const SYLLABLES: &[&str] = &[
    "the", "an", "in", "er", "on", "at", "re", "st", "ing", "ion", "al", "ed", "ou", "is", "ar",
    "es", "or", "en", "ment", "tion", "ly", "pro", "con", "ab", "ex", "é", "ü", "ß",
];
const BYTE_CHARS: &[char] = &['ä', 'å', 'æ', 'ç', '¸', 'Ń', 'ĸ', 'ĩ', 'Ģ', '½', 'Ĥ', 'ı'];

fn word(rng: &mut Rng, syllables: u64) -> String {
    (0..1 + rng.below(syllables))
        .map(|_| SYLLABLES[rng.below(SYLLABLES.len() as u64) as usize])
        .collect()
}

fn vocabularies(n_base: usize, n_blend: usize) -> (Vec<Option<String>>, Vec<Option<String>>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let base = (0..n_base)
        .map(|i| {
            let w = word(&mut rng, 3);
            Some(if i % 3 == 0 { w } else { format!("▁{w}") })
        })
        .collect();
    let blend = (0..n_blend)
        .map(|i| {
            Some(match i % 5 {
                0 => (0..3 + rng.below(6))
                    .map(|_| BYTE_CHARS[rng.below(BYTE_CHARS.len() as u64) as usize])
                    .collect(),
                1 | 2 => format!("Ġ{}", word(&mut rng, 4)),
                _ => word(&mut rng, 3),
            })
        })
        .collect();
    (base, blend)
}

fn refuse_debug() {
    if cfg!(debug_assertions) {
        eprintln!("refusing to benchmark a debug build");
        std::process::exit(2);
    }
}

fn bench_vocab_map(c: &mut Criterion) {
    refuse_debug();
    let (base, blend) = vocabularies(8000, 40_000);
    let keys: Vec<String> = blend
        .iter()
        .flatten()
        .map(|s| s.replace('Ġ', "▁"))
        .collect();
    let sample: Vec<String> = keys.iter().step_by(200).cloned().collect();
    let index = NearestIndex::new(&base, &keys, Some(1)).unwrap();
    assert_eq!(
        nearest_indexed(&index, &sample, Some(1)),
        nearest_brute_force(&base, &sample, Some(1))
    );
    let mut g = c.benchmark_group("vocab_map");
    g.sample_size(10);
    g.throughput(Throughput::Elements(blend.len() as u64));
    g.bench_with_input(
        BenchmarkId::new("mined_1_thread", blend.len()),
        &(),
        |b, _| {
            b.iter(|| {
                build_vocab_map(
                    black_box(&base),
                    black_box(&blend),
                    "▁",
                    "Ġ",
                    MapMethod::Mined,
                    Some(1),
                )
                .unwrap()
            })
        },
    );
    g.throughput(Throughput::Elements(sample.len() as u64));
    g.bench_with_input(
        BenchmarkId::new("indexed_sample", sample.len()),
        &(),
        |b, _| b.iter(|| nearest_indexed(black_box(&index), black_box(&sample), Some(1))),
    );
    g.bench_with_input(
        BenchmarkId::new("brute_force_sample", sample.len()),
        &(),
        |b, _| b.iter(|| nearest_brute_force(black_box(&base), black_box(&sample), Some(1))),
    );
    g.finish();
}

fn bench_pack(c: &mut Criterion) {
    refuse_debug();
    let mut rng = Rng(7);
    let mut offsets = vec![0i64];
    while *offsets.last().unwrap_or(&0) < 4_000_000 {
        let next = offsets.last().unwrap_or(&0) + 50 + rng.below(1950) as i64;
        offsets.push(next.min(4_000_000));
    }
    let n = *offsets.last().unwrap_or(&0) as usize;
    let ids: Vec<i32> = (0..n as i32).collect();
    let mut g = c.benchmark_group("pack");
    g.sample_size(20);
    g.throughput(Throughput::Elements(n as u64));
    for (name, mode) in [("concat", PackMode::Concat), ("bfd", PackMode::Bfd)] {
        g.bench_with_input(BenchmarkId::new(name, n), &(), |b, _| {
            b.iter(|| {
                let plan = PackPlan::new(black_box(&offsets), 2048, mode).unwrap();
                plan.gather(black_box(&ids), 1).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_vocab_map, bench_pack);
criterion_main!(benches);
