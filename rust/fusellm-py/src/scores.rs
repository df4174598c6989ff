//! Bindings of `fusellm_core::scores` (used by `python/fusellm/diagnostics.py`), and the row
//! values of either stored dtype (`float16`, `float32`) that they and `Aligner.align_flat` take.

use crate::{to_py, type_error, values, Size};
use fusellm_core::{self as core, f16, ScoreRows};
use numpy::{PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

/// A `[N, K]` array of row values, `float16` or `float32`, borrowed as it is.
pub(crate) enum Values<'py> {
    F16(PyReadonlyArray2<'py, f16>),
    F32(PyReadonlyArray2<'py, f32>),
}

/// The values' slice, borrowed.
pub(crate) enum ValueSlice<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl<'py> Values<'py> {
    /// `obj` as `float16` or `float32` values, or an `InputTypeError` naming `what`.
    pub(crate) fn extract(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Self> {
        if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, f16>>() {
            return Ok(Values::F16(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, f32>>() {
            return Ok(Values::F32(a));
        }
        Err(type_error(format!(
            "{what} must be a 2-D float16 or float32 array"
        )))
    }

    pub(crate) fn shape(&self) -> &[usize] {
        match self {
            Values::F16(a) => a.shape(),
            Values::F32(a) => a.shape(),
        }
    }

    pub(crate) fn slice(&self, what: &str) -> PyResult<ValueSlice<'_>> {
        Ok(match self {
            Values::F16(a) => ValueSlice::F16(values(a, what)?),
            Values::F32(a) => ValueSlice::F32(values(a, what)?),
        })
    }
}

/// Rows of either dtype.
enum AnyRows<'a> {
    F16(core::Rows<'a, f16>),
    F32(core::Rows<'a, f32>),
}

impl<'a> AnyRows<'a> {
    fn new(ids: &'a [i32], v: ValueSlice<'a>, k: usize) -> Self {
        match v {
            ValueSlice::F16(values) => AnyRows::F16(core::Rows { ids, values, k }),
            ValueSlice::F32(values) => AnyRows::F32(core::Rows { ids, values, k }),
        }
    }

    fn rows(&self) -> &dyn ScoreRows {
        match self {
            AnyRows::F16(r) => r,
            AnyRows::F32(r) => r,
        }
    }
}

/// A candidate's `[N, K]` ids and values, checked against each other.
fn candidate<'a>(
    ids: &'a PyReadonlyArray2<'_, i32>,
    vals: &'a Values<'_>,
    what: &str,
) -> PyResult<AnyRows<'a>> {
    if ids.shape() != vals.shape() {
        return Err(type_error(format!(
            "{what}: ids have shape {:?} but values have {:?}",
            ids.shape(),
            vals.shape()
        )));
    }
    let k = ids.shape()[1];
    Ok(AnyRows::new(
        values(ids, &format!("{what} ids"))?,
        vals.slice(&format!("{what} values"))?,
        k,
    ))
}

/// One candidate's sums per slot (pool first, then each domain): `(n, with_next, top1,
/// coverage, ce, ref_top1, ref_coverage, ref_ce)`.
type SlotSums = Vec<[f64; 8]>;

fn slots(sums: &[core::Sums]) -> SlotSums {
    sums.iter()
        .map(|s| {
            [
                s.n,
                s.with_next,
                s.top1,
                s.coverage,
                s.ce,
                s.ref_top1,
                s.ref_coverage,
                s.ref_ce,
            ]
        })
        .collect()
}

/// The per-domain sums of the target's rows and of every source's aligned rows
/// (`sources`: `(ids, values, status)` each) against the next tokens.
#[pyfunction]
#[pyo3(signature = (next_ids, domains, num_domains, vocab_size, logprobs, ref_ids, ref_values, sources))]
#[allow(clippy::too_many_arguments)]
fn teacher_sums<'py>(
    py: Python<'py>,
    next_ids: PyReadonlyArray1<'py, i64>,
    domains: PyReadonlyArray1<'py, i64>,
    num_domains: Size,
    vocab_size: Size,
    logprobs: bool,
    ref_ids: PyReadonlyArray2<'py, i32>,
    ref_values: &Bound<'py, PyAny>,
    sources: Vec<(
        PyReadonlyArray2<'py, i32>,
        Bound<'py, PyAny>,
        PyReadonlyArray1<'py, u8>,
    )>,
) -> PyResult<(SlotSums, Vec<SlotSums>)> {
    let ref_values = Values::extract(ref_values, "ref values")?;
    let reference = candidate(&ref_ids, &ref_values, "ref")?;
    let src_values = sources
        .iter()
        .enumerate()
        .map(|(s, (_, v, _))| Values::extract(v, &format!("source {s} values")))
        .collect::<PyResult<Vec<_>>>()?;
    let mut rows = Vec::with_capacity(sources.len());
    let mut statuses = Vec::with_capacity(sources.len());
    for (s, ((ids, _, status), vals)) in sources.iter().zip(&src_values).enumerate() {
        rows.push(candidate(ids, vals, &format!("source {s}"))?);
        statuses.push(values(status, &format!("source {s} status"))?);
    }
    let (next, doms) = (values(&next_ids, "next_ids")?, values(&domains, "domains")?);
    let out = py
        .detach(|| {
            let srcs: Vec<core::Source> = rows
                .iter()
                .zip(&statuses)
                .map(|(r, &status)| core::Source {
                    rows: r.rows(),
                    status,
                })
                .collect();
            core::teacher_sums(
                next,
                doms,
                num_domains.0,
                vocab_size.0,
                logprobs,
                reference.rows(),
                &srcs,
            )
        })
        .map_err(to_py)?;
    Ok((
        slots(&out.reference),
        out.sources.iter().map(|s| slots(s)).collect(),
    ))
}

/// `(Σ p, Σ p · dropped)` over a source's own top-K log-probabilities (`known[id]`: the id's
/// entry is kept by the alignment).
#[pyfunction]
#[pyo3(signature = (values, ids, known))]
fn topk_mass<'py>(
    py: Python<'py>,
    values: &Bound<'py, PyAny>,
    ids: PyReadonlyArray2<'py, i32>,
    known: PyReadonlyArray1<'py, bool>,
) -> PyResult<(f64, f64)> {
    let vals = Values::extract(values, "values")?;
    if vals.shape() != ids.shape() {
        return Err(type_error(format!(
            "values have shape {:?} but ids have {:?}",
            vals.shape(),
            ids.shape()
        )));
    }
    let (v, i, k) = (
        vals.slice("values")?,
        crate::values(&ids, "ids")?,
        crate::values(&known, "known")?,
    );
    py.detach(|| match v {
        ValueSlice::F16(v) => core::topk_mass(v, i, k),
        ValueSlice::F32(v) => core::topk_mass(v, i, k),
    })
    .map_err(to_py)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(teacher_sums, m)?)?;
    m.add_function(wrap_pyfunction!(topk_mass, m)?)?;
    Ok(())
}
