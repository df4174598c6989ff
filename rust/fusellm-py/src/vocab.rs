//! Bindings of `fusellm_core::vocab_map` (used by `python/fusellm/vocab.py`).

use crate::{parse, to_py, Size};
use fusellm_core as core;
use fusellm_core::vocab_map;
use numpy::{IntoPyArray, PyArray1};
use pyo3::prelude::*;

type MapArrays<'py> = (
    Bound<'py, PyArray1<i32>>,
    Bound<'py, PyArray1<u8>>,
    Bound<'py, PyArray1<i32>>,
);

fn map_arrays(py: Python<'_>, m: core::VocabMapping) -> MapArrays<'_> {
    let dist: Vec<i32> = m
        .distances
        .iter()
        .map(|&d| if d == u32::MAX { -1 } else { d as i32 })
        .collect();
    (
        m.base_ids.into_pyarray(py),
        m.kinds.into_pyarray(py),
        dist.into_pyarray(py),
    )
}

/// (base id, distance) per query, `-1` where the base has no string at all.
type Nearest<'py> = (Bound<'py, PyArray1<i32>>, Bound<'py, PyArray1<i32>>);

fn nearest_arrays(py: Python<'_>, found: Vec<Option<(u32, u32)>>) -> Nearest<'_> {
    let ids: Vec<i32> = found
        .iter()
        .map(|f| f.map_or(-1, |(i, _)| i as i32))
        .collect();
    let dist: Vec<i32> = found
        .iter()
        .map(|f| f.map_or(-1, |(_, d)| d as i32))
        .collect();
    (ids.into_pyarray(py), dist.into_pyarray(py))
}

/// Builds a vocabulary map: (base id per blend id, kind per blend id, distance per blend id).
#[pyfunction]
#[pyo3(signature = (base_vocab, blend_vocab, base_marker, blend_marker, method, num_threads))]
fn build_vocab_map<'py>(
    py: Python<'py>,
    base_vocab: Vec<Option<String>>,
    blend_vocab: Vec<Option<String>>,
    base_marker: &str,
    blend_marker: &str,
    method: &str,
    num_threads: Option<Size>,
) -> PyResult<MapArrays<'py>> {
    let num_threads = num_threads.map(|n| n.0);
    let method = parse(
        "method",
        method,
        &[
            ("exact", core::MapMethod::Exact),
            ("mined", core::MapMethod::Mined),
            ("surface", core::MapMethod::Surface),
        ],
    )?;
    let m = py
        .detach(|| {
            core::build_vocab_map(
                &base_vocab,
                &blend_vocab,
                base_marker,
                blend_marker,
                method,
                num_threads,
            )
        })
        .map_err(to_py)?;
    Ok(map_arrays(py, m))
}

/// Describes an existing `{t: base string}` map over the blend ids (same arrays as
/// `build_vocab_map`).
#[pyfunction]
#[pyo3(signature = (base_vocab, blend_vocab, base_marker, blend_marker, pairs))]
fn describe_vocab_map<'py>(
    py: Python<'py>,
    base_vocab: Vec<Option<String>>,
    blend_vocab: Vec<Option<String>>,
    base_marker: &str,
    blend_marker: &str,
    pairs: Vec<(String, String)>,
) -> PyResult<MapArrays<'py>> {
    let m = py
        .detach(|| {
            vocab_map::describe_vocab_map(
                &base_vocab,
                &blend_vocab,
                base_marker,
                blend_marker,
                &pairs,
            )
        })
        .map_err(to_py)?;
    Ok(map_arrays(py, m))
}

/// Nearest base id and distance of every query by the literal definition (scan every base id).
#[pyfunction]
#[pyo3(signature = (base_vocab, queries, num_threads))]
fn nearest_brute_force<'py>(
    py: Python<'py>,
    base_vocab: Vec<Option<String>>,
    queries: Vec<String>,
    num_threads: Option<Size>,
) -> (Bound<'py, PyArray1<i32>>, Bound<'py, PyArray1<i32>>) {
    let num_threads = num_threads.map(|n| n.0);
    let found = py.detach(|| vocab_map::nearest_brute_force(&base_vocab, &queries, num_threads));
    nearest_arrays(py, found)
}

/// Nearest base id and distance of every query through the index (same answers as the brute
/// force).
#[pyfunction]
#[pyo3(signature = (base_vocab, queries, num_threads))]
fn nearest_indexed<'py>(
    py: Python<'py>,
    base_vocab: Vec<Option<String>>,
    queries: Vec<String>,
    num_threads: Option<Size>,
) -> PyResult<Nearest<'py>> {
    let num_threads = num_threads.map(|n| n.0);
    let found = py
        .detach(|| {
            let index = core::NearestIndex::new(&base_vocab, &queries, num_threads)?;
            Ok(vocab_map::nearest_indexed(&index, &queries, num_threads))
        })
        .map_err(to_py)?;
    Ok(nearest_arrays(py, found))
}

/// The bytes a vocabulary string stands for (`None` if it has no byte reading).
#[pyfunction]
fn surface_bytes(token: &str, marker: &str) -> Option<Vec<u8>> {
    vocab_map::surface_bytes(token, marker)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(build_vocab_map, m)?)?;
    m.add_function(wrap_pyfunction!(describe_vocab_map, m)?)?;
    m.add_function(wrap_pyfunction!(nearest_brute_force, m)?)?;
    m.add_function(wrap_pyfunction!(nearest_indexed, m)?)?;
    m.add_function(wrap_pyfunction!(surface_bytes, m)?)?;
    Ok(())
}
