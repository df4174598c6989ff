//! Bindings of `fusellm_core::pack` (used by `python/fusellm/pack.py`).

use crate::{parse, to_py, Size};
use fusellm_core as core;
use numpy::{IntoPyArray, PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::prelude::*;

/// A packing plan over rows given by their offsets (see `fusellm.pack`).
#[pyclass(frozen, module = "fusellm._native", name = "PackPlan")]
struct PackPlan {
    inner: core::PackPlan,
}

fn contiguous<'a, T>(r: Result<&'a [T], numpy::AsSliceError>, what: &str) -> PyResult<&'a [T]> {
    r.map_err(|_| crate::type_error(format!("{what} must be a C-contiguous array")))
}

/// Cuts `src` into a new numpy array (numpy's allocator: large buffers get huge pages, which
/// halves the cost of first touching them).
fn gather<'py, T: numpy::Element + Copy + Send + Sync>(
    plan: &core::PackPlan,
    py: Python<'py>,
    src: PyReadonlyArray1<'py, T>,
    width: usize,
) -> PyResult<Bound<'py, PyArray1<T>>> {
    let src = contiguous(src.as_slice(), "column")?;
    // checked before the allocation, whose size the caller's width drives
    let len = plan.check_column(src.len(), width).map_err(to_py)?;
    let out = PyArray1::<T>::zeros(py, len, false);
    {
        let mut rw = out.readwrite();
        let dst = rw
            .as_slice_mut()
            .map_err(|_| crate::type_error("output buffer is not contiguous".to_string()))?;
        py.detach(|| plan.gather_into(src, width, dst))
            .map_err(to_py)?;
    }
    Ok(out)
}

#[pymethods]
impl PackPlan {
    #[new]
    #[pyo3(signature = (row_offsets, block_size, mode))]
    fn new(
        py: Python<'_>,
        row_offsets: PyReadonlyArray1<'_, i64>,
        block_size: Size,
        mode: &str,
    ) -> PyResult<Self> {
        let block_size = block_size.0;
        let mode = parse(
            "mode",
            mode,
            &[
                ("concat", core::PackMode::Concat),
                ("bfd", core::PackMode::Bfd),
            ],
        )?;
        let offsets = contiguous(row_offsets.as_slice(), "offsets")?;
        let inner = py
            .detach(|| core::PackPlan::new(offsets, block_size, mode))
            .map_err(to_py)?;
        Ok(PackPlan { inner })
    }

    #[getter]
    fn num_blocks(&self) -> usize {
        self.inner.num_blocks()
    }

    #[getter]
    fn num_tokens(&self) -> usize {
        self.inner.num_tokens()
    }

    #[getter]
    fn block_offsets<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        self.inner.block_offsets.clone().into_pyarray(py)
    }

    #[getter]
    fn block_segments<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        self.inner.block_segs.clone().into_pyarray(py)
    }

    #[getter]
    fn segment_rows<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        self.inner.seg_row.clone().into_pyarray(py)
    }

    #[getter]
    fn segment_starts<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        self.inner.seg_start.clone().into_pyarray(py)
    }

    #[getter]
    fn segment_lengths<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        self.inner.seg_len.clone().into_pyarray(py)
    }

    /// Cuts one flat column of 1-byte values (`width` per token) with the plan.
    fn gather_u8<'py>(
        &self,
        py: Python<'py>,
        src: PyReadonlyArray1<'py, u8>,
        width: Size,
    ) -> PyResult<Bound<'py, PyArray1<u8>>> {
        gather(&self.inner, py, src, width.0)
    }

    /// Cuts one flat column of 2-byte values (`width` per token) with the plan.
    fn gather_u16<'py>(
        &self,
        py: Python<'py>,
        src: PyReadonlyArray1<'py, u16>,
        width: Size,
    ) -> PyResult<Bound<'py, PyArray1<u16>>> {
        gather(&self.inner, py, src, width.0)
    }

    /// Cuts one flat column of 4-byte values (`width` per token) with the plan.
    fn gather_u32<'py>(
        &self,
        py: Python<'py>,
        src: PyReadonlyArray1<'py, u32>,
        width: Size,
    ) -> PyResult<Bound<'py, PyArray1<u32>>> {
        gather(&self.inner, py, src, width.0)
    }

    /// Cuts one flat column of 8-byte values (`width` per token) with the plan.
    fn gather_u64<'py>(
        &self,
        py: Python<'py>,
        src: PyReadonlyArray1<'py, u64>,
        width: Size,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        gather(&self.inner, py, src, width.0)
    }

    /// Token-weighted mean of a per-row score over every block.
    fn block_means<'py>(
        &self,
        py: Python<'py>,
        scores: PyReadonlyArray1<'py, f64>,
        nan: &str,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let nan = parse(
            "nan_scores",
            nan,
            &[
                ("propagate", core::NanScores::Propagate),
                ("omit", core::NanScores::Omit),
            ],
        )?;
        let scores = contiguous(scores.as_slice(), "scores")?;
        let inner = &self.inner;
        let out = py
            .detach(|| inner.block_means(scores, nan))
            .map_err(to_py)?;
        Ok(out.into_pyarray(py))
    }

    /// Position of every output token inside its row piece.
    fn position_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<i32>>> {
        let inner = &self.inner;
        let ids = py.detach(|| inner.position_ids()).map_err(to_py)?;
        Ok(ids.into_pyarray(py))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PackPlan>()?;
    Ok(())
}
