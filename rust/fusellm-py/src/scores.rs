//! Bindings of `fusellm_core::scores` (used by `python/fusellm/diagnostics.py`).

use crate::{to_py, type_error, Size};
use fusellm_core as core;
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

type Scores<'py> = (
    Bound<'py, PyArray1<bool>>,
    Bound<'py, PyArray1<bool>>,
    Option<Bound<'py, PyArray1<f64>>>,
);

/// Per position `(top1, coverage, ce)` of `[N, K]` rows against the next tokens `[N]`.
#[pyfunction]
#[pyo3(signature = (ids, values, next_ids, vocab_size, logprobs))]
fn next_token_scores<'py>(
    py: Python<'py>,
    ids: PyReadonlyArray2<'py, i32>,
    values: PyReadonlyArray2<'py, f32>,
    next_ids: PyReadonlyArray1<'py, i64>,
    vocab_size: Size,
    logprobs: bool,
) -> PyResult<Scores<'py>> {
    if ids.shape() != values.shape() {
        return Err(type_error(format!(
            "ids have shape {:?} but values have {:?}",
            ids.shape(),
            values.shape()
        )));
    }
    let k = ids.shape()[1];
    let (i, v, n) = (
        crate::values(&ids, "ids")?,
        crate::values(&values, "values")?,
        crate::values(&next_ids, "next_ids")?,
    );
    let out = py
        .detach(|| core::next_token_scores(i, v, k, n, vocab_size.0, logprobs))
        .map_err(to_py)?;
    Ok((
        out.top1.into_pyarray(py),
        out.coverage.into_pyarray(py),
        out.ce.map(|ce| ce.into_pyarray(py)),
    ))
}

/// `(Σ p, Σ p · !kept)` over a source's own top-K log-probabilities.
#[pyfunction]
#[pyo3(signature = (values, kept))]
fn topk_mass(
    py: Python<'_>,
    values: PyReadonlyArray2<'_, f32>,
    kept: PyReadonlyArray2<'_, bool>,
) -> PyResult<(f64, f64)> {
    if values.shape() != kept.shape() {
        return Err(type_error(format!(
            "values have shape {:?} but kept has {:?}",
            values.shape(),
            kept.shape()
        )));
    }
    let (v, k) = (
        crate::values(&values, "values")?,
        crate::values(&kept, "kept")?,
    );
    py.detach(|| core::topk_mass(v, k)).map_err(to_py)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(next_token_scores, m)?)?;
    m.add_function(wrap_pyfunction!(topk_mass, m)?)?;
    Ok(())
}
