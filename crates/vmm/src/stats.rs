//! VM exits counted per reason, per virtual processor: which exits a guest
//! really takes, and how many (the exit table printed when a run ends).
//!
//! Each vCPU owns its counters, so counting is one increment in memory only
//! that processor writes: no lock, no atomic read-modify-write on the exit
//! path (a relaxed load and store: other processors may read the counts
//! while the owner counts, so they are atomics, but only the owner writes). Backends name their own reasons (an SVM exit code, a VT-x basic
//! exit reason), folded into [`EXIT_SLOTS`] slots by the backend.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Slots per vCPU: enough for VT-x's basic exit reasons (below 80) and
/// SVM's exit codes below 0x90 plus a few folded ones.
pub const EXIT_SLOTS: usize = 160;

/// VMM-call slots per vCPU: function 0 (the lookup), every number the
/// registry can hand out, and one for numbers that name no function.
pub const CALL_SLOTS: usize = crate::vmmcall::MAX_FUNCTIONS + 2;
/// The slot that counts calls of numbers no function has.
pub const CALL_SLOT_UNKNOWN: usize = CALL_SLOTS - 1;

/// Exit counts of one vCPU, and the VMM calls among them by function.
#[derive(Debug)]
pub struct ExitStats {
    counts: [AtomicU64; EXIT_SLOTS],
    calls: [AtomicU64; CALL_SLOTS],
}

impl Default for ExitStats {
    fn default() -> Self {
        Self {
            counts: [const { AtomicU64::new(0) }; EXIT_SLOTS],
            calls: [const { AtomicU64::new(0) }; CALL_SLOTS],
        }
    }
}

impl ExitStats {
    /// Count one exit in `slot`; out-of-range slots count in the last one
    /// (a backend bug must not make the exit path panic).
    #[inline(always)]
    pub fn record(&self, slot: usize) {
        let slot = slot.min(EXIT_SLOTS - 1);
        // In range by the line above; `get` keeps the path panic-free.
        if let Some(c) = self.counts.get(slot) {
            c.store(c.load(Relaxed).wrapping_add(1), Relaxed);
        }
    }

    /// Count one exit whose raw reason is its own slot when it is below
    /// [`EXIT_SLOTS`] (one compare on the exit path), and `fold(reason)`'s
    /// slot otherwise.
    #[inline(always)]
    pub fn record_reason(&self, reason: u32, fold: impl FnOnce(u32) -> usize) {
        match self.counts.get(reason as usize) {
            Some(c) => c.store(c.load(Relaxed).wrapping_add(1), Relaxed),
            None => self.record(fold(reason)),
        }
    }

    /// Count one VMM call of function `number` (as the dispatcher read it
    /// from RAX); numbers past the registry's range count as unknown.
    #[inline(always)]
    pub fn record_call(&self, number: u64) {
        let slot = usize::try_from(number).map_or(CALL_SLOT_UNKNOWN, |n| n.min(CALL_SLOT_UNKNOWN));
        if let Some(c) = self.calls.get(slot) {
            c.store(c.load(Relaxed).wrapping_add(1), Relaxed);
        }
    }

    /// The calls counted in call slot `slot` (function `slot`, or
    /// [`CALL_SLOT_UNKNOWN`]).
    pub fn calls(&self, slot: usize) -> u64 {
        self.calls.get(slot).map_or(0, |c| c.load(Relaxed))
    }

    /// The first slot at or after `from` that counted an exit.
    pub fn next_nonzero(&self, from: usize) -> Option<(usize, u64)> {
        (from..EXIT_SLOTS)
            .map(|s| (s, self.count(s)))
            .find(|&(_, c)| c != 0)
    }

    /// The count in `slot`.
    pub fn count(&self, slot: usize) -> u64 {
        self.counts.get(slot).map_or(0, |c| c.load(Relaxed))
    }

    /// Every exit counted.
    pub fn total(&self) -> u64 {
        self.counts
            .iter()
            .fold(0u64, |a, c| a.wrapping_add(c.load(Relaxed)))
    }

    /// The slots that counted something, with their counts, most frequent
    /// first.
    pub fn nonzero(&self) -> impl Iterator<Item = (usize, u64)> {
        // One snapshot: the owner may go on counting meanwhile.
        let mut snapshot = [(0usize, 0u64); EXIT_SLOTS];
        for (i, s) in snapshot.iter_mut().enumerate() {
            *s = (i, self.count(i));
        }
        snapshot.sort_unstable_by_key(|&(_, c)| core::cmp::Reverse(c));
        snapshot.into_iter().take_while(|&(_, c)| c != 0)
    }
}

/// Log the exit table of one vCPU: `exits on CPU n: total T` then one line
/// per reason, `  NAME (slot S): COUNT`, most frequent first.
pub fn log_table(cpu: u32, stats: &ExitStats, name: fn(usize) -> &'static str) {
    log::info!("VM exits on CPU {cpu}: {} in all", stats.total());
    for (slot, count) in stats.nonzero() {
        log::info!("  {:<28} {count}", name(slot));
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn counts_and_orders() {
        let s = ExitStats::default();
        for _ in 0..3 {
            s.record(10);
        }
        s.record(2);
        s.record(usize::MAX);
        assert_eq!(s.count(10), 3);
        assert_eq!(s.count(EXIT_SLOTS - 1), 1);
        assert_eq!(s.total(), 5);
        let v: Vec<_> = s.nonzero().collect();
        assert_eq!(v[0], (10, 3));
        assert_eq!(v.len(), 3);
        assert_eq!(ExitStats::default().nonzero().count(), 0);
        assert_eq!(s.next_nonzero(0), Some((2, 1)));
        assert_eq!(s.next_nonzero(3), Some((10, 3)));
        assert_eq!(s.next_nonzero(EXIT_SLOTS), None);
    }

    #[test]
    fn counts_calls_by_number() {
        let s = ExitStats::default();
        s.record_call(0);
        s.record_call(1);
        s.record_call(1);
        s.record_call(crate::vmmcall::MAX_FUNCTIONS as u64);
        s.record_call(crate::vmmcall::MAX_FUNCTIONS as u64 + 1);
        s.record_call(u64::MAX);
        assert_eq!(s.calls(0), 1);
        assert_eq!(s.calls(1), 2);
        assert_eq!(s.calls(crate::vmmcall::MAX_FUNCTIONS), 1);
        assert_eq!(s.calls(CALL_SLOT_UNKNOWN), 2);
        assert_eq!(s.calls(CALL_SLOTS), 0);
        // Calls are not exits of their own: the backend counts the exit.
        assert_eq!(s.total(), 0);
    }
}
