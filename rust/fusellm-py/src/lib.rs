//! Thin PyO3 bindings of `fusellm-core` (module `fusellm._native`).
//!
//! Only conversion lives here: numpy arrays in (borrowed, no copy), the interpreter detached around
//! every core call, results moved into numpy arrays, core errors mapped to the Python exception
//! hierarchy of `fusellm.errors`. The user-facing API, its defaults and its dtype coercions are in
//! `python/fusellm/`.

use fusellm_core as core;
use numpy::ndarray::Array2;
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt, PyType};

mod pack;
mod scores;
mod vocab;

use scores::{ValueSlice, Values};

/// An exception of the `fusellm.errors` hierarchy (`InputError` is a `ValueError`,
/// `InputTypeError` a `TypeError`); the builtin base class if that module cannot be imported.
fn fusellm_error(class: &str, msg: String) -> PyErr {
    Python::attach(|py| {
        let cls = py
            .import("fusellm.errors")
            .and_then(|m| m.getattr(class))
            .ok()
            .and_then(|c| c.cast_into::<PyType>().ok());
        match cls {
            Some(cls) => PyErr::from_type(cls, msg),
            None if class == "InputTypeError" => PyTypeError::new_err(msg),
            None => PyValueError::new_err(msg),
        }
    })
}

fn input_error(msg: String) -> PyErr {
    fusellm_error("InputError", msg)
}

pub(crate) fn type_error(msg: String) -> PyErr {
    fusellm_error("InputTypeError", msg)
}

/// Maps a core error to `fusellm.errors.InputError`.
pub(crate) fn to_py(err: core::Error) -> PyErr {
    input_error(err.to_string())
}

/// A non-negative integer argument (a size, a count): a Python int beyond `usize` (negative or
/// too large) is an `InputError`, a non-int an `InputTypeError`, never PyO3's `OverflowError`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Size(pub usize);

impl<'a, 'py> FromPyObject<'a, 'py> for Size {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(v) = obj.extract::<usize>() {
            return Ok(Size(v));
        }
        if obj.is_instance_of::<PyInt>() {
            let text = obj
                .str()
                .map_or_else(|_| "?".to_string(), |t| t.to_string());
            return Err(input_error(format!(
                "an integer argument must be in [0, 2**64), got {text}"
            )));
        }
        let name = obj
            .get_type()
            .name()
            .map_or_else(|_| "?".to_string(), |n| n.to_string());
        Err(type_error(format!("expected an int, got {name}")))
    }
}

fn parse<T: Copy>(what: &str, value: &str, options: &[(&str, T)]) -> PyResult<T> {
    options
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            input_error(format!("{what} must be one of {names:?}, got {value:?}"))
        })
}

/// MinED base-to-blend alignment of two token-string sequences.
#[pyfunction]
#[pyo3(signature = (base_tokens, blend_tokens, base_marker, blend_marker))]
fn mined_base_to_blend(
    py: Python<'_>,
    base_tokens: Vec<String>,
    blend_tokens: Vec<String>,
    base_marker: &str,
    blend_marker: &str,
) -> PyResult<Vec<Vec<u32>>> {
    py.detach(|| {
        let base: Vec<&str> = base_tokens.iter().map(String::as_str).collect();
        let blend: Vec<&str> = blend_tokens.iter().map(String::as_str).collect();
        core::mined_base_to_blend(&base, &blend, base_marker, blend_marker).map(|a| a.to_lists())
    })
    .map_err(to_py)
}

/// The thread count a batch runs on when none is given (`FUSELLM_NUM_THREADS`, else
/// `RAYON_NUM_THREADS`, else the available cores).
#[pyfunction]
fn default_num_threads() -> usize {
    core::batch::default_num_threads()
}

/// The native aligner of one tokenizer pair (see `fusellm.Aligner`).
#[pyclass(frozen, module = "fusellm._native", name = "Aligner")]
struct Aligner {
    inner: core::Aligner,
}

/// A core output whose length is not rows x K (a bug, reported rather than a panic).
fn shape_error(e: numpy::ndarray::ShapeError) -> PyErr {
    PyValueError::new_err(format!(
        "internal error: aligned rows have the wrong size ({e})"
    ))
}

type AlignedRow<'py> = (
    Bound<'py, PyArray2<i32>>,
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray1<u8>>,
    u64,
    u64,
    u64,
);

#[pymethods]
impl Aligner {
    #[new]
    // The Python constructor's keyword arguments, one to one.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (base_vocab, blend_vocab, base_marker, blend_marker, vocab_map, compat, fallback))]
    fn new(
        py: Python<'_>,
        base_vocab: Vec<Option<String>>,
        blend_vocab: Vec<Option<String>>,
        base_marker: &str,
        blend_marker: &str,
        vocab_map: Option<Vec<(String, String)>>,
        compat: bool,
        fallback: &str,
    ) -> PyResult<Self> {
        let fallback = parse(
            "fallback",
            fallback,
            &[
                ("current", core::Fallback::Current),
                ("next", core::Fallback::Next),
                ("mask", core::Fallback::Mask),
            ],
        )?;
        let inner = py
            .detach(|| {
                let base = core::Vocab::new(base_vocab)?;
                let blend = core::Vocab::new(blend_vocab)?;
                core::Aligner::new(
                    base,
                    blend,
                    base_marker,
                    blend_marker,
                    vocab_map,
                    compat,
                    fallback,
                )
            })
            .map_err(to_py)?;
        Ok(Aligner { inner })
    }

    #[getter]
    fn base_vocab_size(&self) -> usize {
        self.inner.base_vocab().len()
    }

    #[getter]
    fn blend_vocab_size(&self) -> usize {
        self.inner.blend_vocab().len()
    }

    #[getter]
    fn compat(&self) -> bool {
        self.inner.compat()
    }

    #[getter]
    fn fallback(&self) -> &'static str {
        match self.inner.fallback() {
            core::Fallback::Current => "current",
            core::Fallback::Next => "next",
            core::Fallback::Mask => "mask",
        }
    }

    /// Base id each blend id maps to (`-1`: none) in `vocab` mode ("hard" or "soft").
    fn targets<'py>(&self, py: Python<'py>, vocab: &str) -> PyResult<Bound<'py, PyArray1<i32>>> {
        let mode = parse_vocab(vocab)?;
        let out: Vec<i32> = self
            .inner
            .targets(mode)
            .iter()
            .map(|&t| {
                if t >= core::aligner::UNKNOWN {
                    -1
                } else {
                    t as i32
                }
            })
            .collect();
        Ok(out.into_pyarray(py))
    }

    #[pyo3(signature = (base_ids, blend_ids, topk_ids, topk_logits, base_offsets, blend_offsets, method, vocab, num_threads))]
    #[allow(clippy::too_many_arguments)]
    fn align_batch<'py>(
        &self,
        py: Python<'py>,
        base_ids: Vec<PyReadonlyArray1<'py, i32>>,
        blend_ids: Vec<PyReadonlyArray1<'py, i32>>,
        topk_ids: Vec<PyReadonlyArray2<'py, i32>>,
        topk_logits: Vec<PyReadonlyArray2<'py, f32>>,
        base_offsets: Option<Vec<PyReadonlyArray2<'py, i64>>>,
        blend_offsets: Option<Vec<PyReadonlyArray2<'py, i64>>>,
        method: &str,
        vocab: &str,
        num_threads: Option<Size>,
    ) -> PyResult<Vec<AlignedRow<'py>>> {
        let num_threads = num_threads.map(|n| n.0);
        let method = parse_method(method)?;
        let mode = parse_vocab(vocab)?;
        let n = base_ids.len();
        let counts = [
            ("blend_ids", blend_ids.len()),
            ("blend_topk_ids", topk_ids.len()),
            ("blend_topk_logits", topk_logits.len()),
            ("base_offsets", base_offsets.as_ref().map_or(n, Vec::len)),
            ("blend_offsets", blend_offsets.as_ref().map_or(n, Vec::len)),
        ];
        for (name, len) in counts {
            if len != n {
                return Err(input_error(format!(
                    "{name} has {len} sequences but base_ids has {n}"
                )));
            }
        }
        let mut inputs = Vec::with_capacity(n);
        for i in 0..n {
            let (ti, tl) = (&topk_ids[i], &topk_logits[i]);
            if ti.shape() != tl.shape() {
                return Err(input_error(format!(
                    "sequence {i}: blend_topk_ids has shape {:?} but blend_topk_logits has {:?}",
                    ti.shape(),
                    tl.shape()
                )));
            }
            inputs.push(core::SeqInput {
                base_ids: slice(base_ids[i].as_slice(), i, "base_ids")?,
                blend_ids: slice(blend_ids[i].as_slice(), i, "blend_ids")?,
                topk_ids: slice(ti.as_slice(), i, "blend_topk_ids")?,
                topk_logits: slice(tl.as_slice(), i, "blend_topk_logits")?,
                k: ti.shape()[1],
                base_offsets: match &base_offsets {
                    Some(v) => Some(slice(v[i].as_slice(), i, "base_offsets")?),
                    None => None,
                },
                blend_offsets: match &blend_offsets {
                    Some(v) => Some(slice(v[i].as_slice(), i, "blend_offsets")?),
                    None => None,
                },
            });
        }
        let inner = &self.inner;
        let outputs = py
            .detach(|| core::batch::align_batch(inner, &inputs, method, mode, num_threads))
            .map_err(to_py)?;
        outputs
            .into_iter()
            .map(|o| {
                let (ids, logits) = rows_2d(py, o.ids, o.logits, o.status.len(), o.k)?;
                Ok((
                    ids,
                    logits,
                    o.status.into_pyarray(py),
                    o.num_unknown,
                    o.num_unmapped,
                    o.num_duplicates,
                ))
            })
            .collect()
    }

    /// Aligns a batch given as flat buffers with row offsets (see `fusellm-core`'s `flat`).
    #[pyo3(signature = (base_ids, base_rows, blend_ids, blend_rows, topk_ids, topk_logits, base_offsets, blend_offsets, method, vocab, num_threads, logits_dtype))]
    #[allow(clippy::too_many_arguments)]
    fn align_flat<'py>(
        &self,
        py: Python<'py>,
        base_ids: PyReadonlyArray1<'py, i32>,
        base_rows: PyReadonlyArray1<'py, i64>,
        blend_ids: PyReadonlyArray1<'py, i32>,
        blend_rows: PyReadonlyArray1<'py, i64>,
        topk_ids: PyReadonlyArray2<'py, i32>,
        topk_logits: &Bound<'py, PyAny>,
        base_offsets: Option<PyReadonlyArray2<'py, i64>>,
        blend_offsets: Option<PyReadonlyArray2<'py, i64>>,
        method: &str,
        vocab: &str,
        num_threads: Option<Size>,
        logits_dtype: &str,
    ) -> PyResult<FlatRows<'py>> {
        let method = parse_method(method)?;
        let mode = parse_vocab(vocab)?;
        let half_out = parse(
            "logits_dtype",
            logits_dtype,
            &[("float32", false), ("float16", true)],
        )?;
        let topk_logits = Values::extract(topk_logits, "blend_topk_logits")?;
        if topk_ids.shape() != topk_logits.shape() {
            return Err(input_error(format!(
                "blend_topk_ids has shape {:?} but blend_topk_logits has {:?}",
                topk_ids.shape(),
                topk_logits.shape()
            )));
        }
        let (base_ids, blend_ids, topk_ids_s, base_rows, blend_rows) = (
            values(&base_ids, "base_ids")?,
            values(&blend_ids, "blend_ids")?,
            values(&topk_ids, "blend_topk_ids")?,
            values(&base_rows, "base_rows")?,
            values(&blend_rows, "blend_rows")?,
        );
        let (base_offsets, blend_offsets) = (
            spans(&base_offsets, "base_offsets")?,
            spans(&blend_offsets, "blend_offsets")?,
        );
        let logits_in = topk_logits.slice("blend_topk_logits")?;
        let k = topk_ids.shape()[1];
        let inner = &self.inner;
        let threads = num_threads.map(|n| n.0);
        let (out, half) = py
            .detach(|| {
                // float16 rows are widened for the aligner, which merges in float32
                let wide;
                let topk_logits = match logits_in {
                    ValueSlice::F32(v) => v,
                    ValueSlice::F16(v) => {
                        wide = core::widen(v);
                        &wide[..]
                    }
                };
                let batch = core::FlatBatch {
                    values: core::SeqInput {
                        base_ids,
                        blend_ids,
                        topk_ids: topk_ids_s,
                        topk_logits,
                        k,
                        base_offsets,
                        blend_offsets,
                    },
                    base_rows,
                    blend_rows,
                };
                let out = core::align_flat(inner, &batch, method, mode, threads)?;
                let half = match half_out {
                    true => Some(core::narrow_f16(&out.rows.logits)?),
                    false => None,
                };
                Ok::<_, core::Error>((out, half))
            })
            .map_err(to_py)?;
        let rows = out.rows;
        let (n, k) = (rows.status.len(), rows.k);
        let ids = Array2::from_shape_vec((n, k), rows.ids)
            .map_err(shape_error)?
            .into_pyarray(py);
        let logits = match half {
            Some(h) => Array2::from_shape_vec((n, k), h)
                .map_err(shape_error)?
                .into_pyarray(py)
                .into_any(),
            None => Array2::from_shape_vec((n, k), rows.logits)
                .map_err(shape_error)?
                .into_pyarray(py)
                .into_any(),
        };
        Ok((
            ids,
            logits,
            rows.status.into_pyarray(py),
            counts_dict(py, &out.counts)?,
        ))
    }
}

type Rows2d<'py> = (Bound<'py, PyArray2<i32>>, Bound<'py, PyArray2<f32>>);

/// Aligned `[rows, k]` ids and logits as numpy arrays, built 2-D at once (a reshape would make
/// a second array object per output); the vectors are moved, not copied.
fn rows_2d<'py>(
    py: Python<'py>,
    ids: Vec<i32>,
    logits: Vec<f32>,
    rows: usize,
    k: usize,
) -> PyResult<Rows2d<'py>> {
    Ok((
        Array2::from_shape_vec((rows, k), ids)
            .map_err(shape_error)?
            .into_pyarray(py),
        Array2::from_shape_vec((rows, k), logits)
            .map_err(shape_error)?
            .into_pyarray(py),
    ))
}

/// A flat batch's counts as a dict (`exact_span` is `None` without spans).
fn counts_dict<'py>(py: Python<'py>, c: &core::BatchCounts) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (name, v) in [
        ("matched", c.matched),
        ("empty", c.empty),
        ("fallback", c.fallback),
        ("masked", c.masked),
        ("unknown_ids", c.unknown_ids),
        ("unmapped_ids", c.unmapped_ids),
        ("duplicate_ids", c.duplicate_ids),
        ("topk_entries", c.topk_entries),
    ] {
        d.set_item(name, v)?;
    }
    d.set_item("exact_span", c.exact_span)?;
    Ok(d)
}

type FlatRows<'py> = (
    Bound<'py, PyArray2<i32>>,
    Bound<'py, PyAny>,
    Bound<'py, PyArray1<u8>>,
    Bound<'py, PyDict>,
);

/// A C-contiguous array's values, or an `InputTypeError` naming it.
pub(crate) fn values<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    a: &'a numpy::PyReadonlyArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| type_error(format!("{what} must be C-contiguous")))
}

/// `[N, 2]` character spans, or an `InputTypeError`.
fn spans<'a>(a: &'a Option<PyReadonlyArray2<'_, i64>>, what: &str) -> PyResult<Option<&'a [i64]>> {
    match a {
        None => Ok(None),
        Some(a) if a.shape()[1] != 2 => Err(type_error(format!(
            "{what} must have shape [N, 2], got {:?}",
            a.shape()
        ))),
        Some(a) => values(a, what).map(Some),
    }
}

fn slice<'a, T>(
    r: Result<&'a [T], numpy::AsSliceError>,
    seq: usize,
    what: &str,
) -> PyResult<&'a [T]> {
    r.map_err(|_| type_error(format!("sequence {seq}: {what} must be C-contiguous")))
}

fn parse_method(method: &str) -> PyResult<core::Method> {
    parse(
        "method",
        method,
        &[
            ("mined", core::Method::Mined),
            ("offsets", core::Method::Offsets),
        ],
    )
}

fn parse_vocab(vocab: &str) -> PyResult<core::VocabMode> {
    parse(
        "vocab",
        vocab,
        &[
            ("hard", core::VocabMode::Hard),
            ("soft", core::VocabMode::Soft),
        ],
    )
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("_debug", cfg!(debug_assertions))?;
    m.add("MAX_THREADS", core::batch::MAX_THREADS)?;
    m.add_function(wrap_pyfunction!(mined_base_to_blend, m)?)?;
    m.add_function(wrap_pyfunction!(default_num_threads, m)?)?;
    m.add_class::<Aligner>()?;
    vocab::register(m)?;
    pack::register(m)?;
    scores::register(m)?;
    Ok(())
}
