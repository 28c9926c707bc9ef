//! Finding room for the guest's kernel and boot information in the usable
//! ranges of a [`crate::e820::GuestMap`], away from what is already placed.

use crate::{align_down, align_up};

/// Ranges already taken, or to be kept clear, at most this many.
pub(crate) const MAX_TAKEN: usize = crate::e820::MAX_AVOID + 4;

/// A small set of `[start, end)` ranges nothing new may overlap.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Taken {
    ranges: [(u64, u64); MAX_TAKEN],
    len: usize,
}

impl Taken {
    pub(crate) const fn new() -> Self {
        Taken {
            ranges: [(0, 0); MAX_TAKEN],
            len: 0,
        }
    }

    /// Adds `[start, end)`; empty ranges are ignored. `false` when full.
    pub(crate) fn push(&mut self, start: u64, end: u64) -> bool {
        if end <= start {
            return true;
        }
        match self.ranges.get_mut(self.len) {
            Some(slot) => {
                *slot = (start, end);
                self.len += 1;
                true
            }
            None => false,
        }
    }

    pub(crate) fn ranges(&self) -> &[(u64, u64)] {
        self.ranges.get(..self.len).unwrap_or(&[])
    }

    /// The lowest-starting taken range that overlaps `[start, end)`.
    pub(crate) fn overlap(&self, start: u64, end: u64) -> Option<(u64, u64)> {
        self.ranges()
            .iter()
            .copied()
            .filter(|&(s, e)| s < end && start < e)
            .min_by_key(|&(s, _)| s)
    }

    /// Calls `f` with each piece of `[start, end)` not covered by a taken
    /// range, from the lowest up.
    fn gaps(&self, start: u64, end: u64, mut f: impl FnMut(u64, u64)) {
        let mut sorted = self.ranges;
        let sorted = sorted.get_mut(..self.len).unwrap_or(&mut []);
        sorted.sort_unstable();
        let mut cur = start;
        for &(s, e) in sorted.iter() {
            if e <= cur {
                continue;
            }
            if s >= end {
                break;
            }
            if s > cur {
                f(cur, s);
            }
            cur = e;
        }
        if cur < end {
            f(cur, end);
        }
    }
}

/// What to find: `size` bytes aligned to `align` (a power of two) inside
/// `[lo, hi)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Want {
    pub size: u64,
    pub align: u64,
    pub lo: u64,
    pub hi: u64,
}

impl Want {
    /// The lowest address that fits.
    pub(crate) fn lowest(self, usable: &[(u64, u64)], taken: &Taken) -> Option<u64> {
        let mut best: Option<u64> = None;
        for &(s, e) in usable {
            let (s, e) = (s.max(self.lo), e.min(self.hi));
            if s >= e {
                continue;
            }
            taken.gaps(s, e, |gs, ge| {
                let fit = align_up(gs, self.align)
                    .filter(|&a| a.checked_add(self.size).is_some_and(|end| end <= ge));
                if let Some(a) = fit {
                    best = Some(best.map_or(a, |b| b.min(a)));
                }
            });
        }
        best
    }

    /// The highest address that fits.
    pub(crate) fn highest(self, usable: &[(u64, u64)], taken: &Taken) -> Option<u64> {
        let mut best: Option<u64> = None;
        for &(s, e) in usable {
            let (s, e) = (s.max(self.lo), e.min(self.hi));
            if s >= e {
                continue;
            }
            taken.gaps(s, e, |gs, ge| {
                let fit = ge
                    .checked_sub(self.size)
                    .map(|a| align_down(a, self.align))
                    .filter(|&a| a >= gs);
                if let Some(a) = fit {
                    best = Some(best.map_or(a, |b| b.max(a)));
                }
            });
        }
        best
    }
}
