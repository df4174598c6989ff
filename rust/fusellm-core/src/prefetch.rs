//! Software prefetching of the next sequence's inputs while the current one is aligned.
//!
//! A batch streams every input array through the cache once. Validation reads a sequence's
//! arrays just before its rows are built, and on its own it waits on memory for a quarter of the
//! time. Spreading cache-line prefetches of sequence `i + 1` over the rows of sequence `i`
//! overlaps that traffic with the row work instead.

/// Bytes per cache line.
const LINE: usize = 64;

/// A cursor over a few byte ranges, issuing a fixed number of line prefetches per step so that
/// the ranges are covered in `steps` steps.
pub(crate) struct Prefetcher {
    ranges: [(*const i8, usize); 6],
    range: usize,
    offset: usize,
    per_step: usize,
}

impl Prefetcher {
    /// A prefetcher over `ranges` (start and length in bytes), to be stepped `steps` times.
    pub(crate) fn new(ranges: [(*const i8, usize); 6], steps: usize) -> Self {
        let total: usize = ranges.iter().map(|r| r.1).sum();
        let lines = total.div_ceil(LINE);
        Prefetcher {
            ranges,
            range: 0,
            offset: 0,
            per_step: lines.div_ceil(steps.max(1)),
        }
    }

    /// A prefetcher that does nothing.
    pub(crate) fn none() -> Self {
        Prefetcher {
            ranges: [(std::ptr::null(), 0); 6],
            range: 6,
            offset: 0,
            per_step: 0,
        }
    }

    /// Issues the next lines' prefetches.
    #[inline(always)]
    pub(crate) fn step(&mut self) {
        for _ in 0..self.per_step {
            let Some(&(start, len)) = self.ranges.get(self.range) else {
                return;
            };
            if self.offset >= len {
                self.range += 1;
                self.offset = 0;
                continue;
            }
            prefetch(start.wrapping_add(self.offset));
            self.offset += LINE;
        }
    }
}

/// The start and length in bytes of a slice, as [`Prefetcher::new`] takes them.
pub(crate) fn byte_range<T>(s: &[T]) -> (*const i8, usize) {
    (s.as_ptr().cast(), std::mem::size_of_val(s))
}

/// A prefetch hint for the line holding `p`; never faults, whatever `p` is.
#[inline(always)]
fn prefetch(p: *const i8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing into the program and cannot fault (any address is
    // allowed); SSE, which provides it, is part of every x86_64 target.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
