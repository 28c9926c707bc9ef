//! VM exits counted per reason, per virtual processor: which exits a guest
//! really takes, and how many (the exit table printed when a run ends).
//!
//! Each vCPU owns its counters, so counting is one increment in memory only
//! that processor writes: no lock, no atomic read-modify-write on the exit
//! path. Backends name their own reasons (an SVM exit code, a VT-x basic
//! exit reason), folded into [`EXIT_SLOTS`] slots by the backend.

/// Slots per vCPU: enough for VT-x's basic exit reasons (below 80) and
/// SVM's exit codes below 0x90 plus a few folded ones.
pub const EXIT_SLOTS: usize = 160;

/// Exit counts of one vCPU.
#[derive(Clone, Debug)]
pub struct ExitStats {
    counts: [u64; EXIT_SLOTS],
}

impl Default for ExitStats {
    fn default() -> Self {
        Self {
            counts: [0; EXIT_SLOTS],
        }
    }
}

impl ExitStats {
    /// Count one exit in `slot`; out-of-range slots count in the last one
    /// (a backend bug must not make the exit path panic).
    #[inline(always)]
    pub fn record(&mut self, slot: usize) {
        let slot = slot.min(EXIT_SLOTS - 1);
        // In range by the line above; `get_mut` keeps the path panic-free.
        if let Some(c) = self.counts.get_mut(slot) {
            *c = c.wrapping_add(1);
        }
    }

    /// The count in `slot`.
    pub fn count(&self, slot: usize) -> u64 {
        self.counts.get(slot).copied().unwrap_or(0)
    }

    /// Every exit counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, &c| a.wrapping_add(c))
    }

    /// The slots that counted something, with their counts, most frequent
    /// first.
    pub fn nonzero(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        let mut order = [0u8; EXIT_SLOTS];
        for (i, o) in order.iter_mut().enumerate() {
            *o = i as u8;
        }
        order.sort_unstable_by_key(|&i| core::cmp::Reverse(self.count(i.into())));
        order
            .into_iter()
            .map(usize::from)
            .map(move |i| (i, self.count(i)))
            .take_while(|&(_, c)| c != 0)
    }
}

/// Log the exit table of one vCPU: `exits on CPU n: total T` then one line
/// per reason, `  NAME (slot S): COUNT`, most frequent first.
pub fn log_table<V: crate::Vcpu + ?Sized>(cpu: u32, vcpu: &V) {
    let Some(stats) = vcpu.exit_stats() else {
        return;
    };
    log::info!("VM exits on CPU {cpu}: {} in all", stats.total());
    for (slot, count) in stats.nonzero() {
        log::info!("  {:<28} {count}", vcpu.exit_name(slot));
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn counts_and_orders() {
        let mut s = ExitStats::default();
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
    }
}
