//! What the host tells one vCPU between two of its entries: the NMIs the
//! host's NMI handler caught on its processor, and an INIT another
//! processor sent it.
//!
//! Both arrive asynchronously, so both are atomics the backend looks at on
//! its entry path. The NMI count is the one thing it reads on every entry
//! (one relaxed load); the INIT flag is read only when that count is not
//! zero, which is why posting an INIT always comes with an NMI (the
//! sender's kick, see `hypervisor/src/apic.rs`): the common entry pays
//! nothing for INIT emulation.
//!
//! Why INIT is emulated at all (docs/security.md, "INIT and SIPI"): a real
//! INIT reaching a processor that runs a guest either resets it out of the
//! hypervisor (SVM without an INIT intercept, and QEMU even with one) or
//! stays pending and exits again after every entry (Bochs 2.7, both
//! vendors). thinvisor therefore never lets the guest's INIT IPIs reach
//! the hardware: it marks the target here and kicks it with an NMI, and
//! the target stops at its next entry as if the INIT had arrived.

use core::sync::atomic::{AtomicU32, Ordering};

/// One processor's signals, owned by the host (one per processor, for the
/// whole run) and lent to its vCPU.
#[derive(Debug, Default)]
pub struct HostSignals {
    /// NMIs taken on this processor that the guest has not been given
    /// yet (the host's NMI handler increments it).
    pub nmis: AtomicU32,
    /// Nonzero once another processor (or this one) sent INIT; cleared by
    /// the host when the processor starts waiting for its SIPI.
    pub init: AtomicU32,
    /// NMIs the host itself sent this processor (INIT kicks, SIPI
    /// wake-ups), counted before they are sent: a restart waits until as
    /// many have arrived, so that none reaches the restarted guest.
    pub kicks: AtomicU32,
}

impl HostSignals {
    pub const fn new() -> Self {
        Self {
            nmis: AtomicU32::new(0),
            init: AtomicU32::new(0),
            kicks: AtomicU32::new(0),
        }
    }

    /// Mark an INIT for this processor. The caller then makes sure an NMI
    /// follows (an NMI IPI to another processor, [`Self::kick_self`] for
    /// its own): the backend looks at the flag only when NMIs wait.
    pub fn post_init(&self) {
        self.init.store(1, Ordering::Release);
    }

    /// The NMI that makes this processor's own next entry look at its
    /// flags (an INIT it sent itself).
    pub fn kick_self(&self) {
        self.kicks.fetch_add(1, Ordering::AcqRel);
        self.nmis.fetch_add(1, Ordering::AcqRel);
    }

    /// Count an NMI the host is about to send this processor.
    pub fn expect_kick(&self) {
        self.kicks.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether every NMI the host sent has arrived (or more NMIs than
    /// that: the guest's own can be among them).
    pub fn kicks_arrived(&self) -> bool {
        self.nmis.load(Ordering::Acquire) >= self.kicks.load(Ordering::Acquire)
    }

    /// Whether an INIT waits: called on the entry path when [`Self::nmis`]
    /// is not zero.
    #[inline]
    pub fn init_posted(&self) -> bool {
        self.init.load(Ordering::Acquire) != 0
    }

    /// Take the INIT flag (true if it was set), when the processor starts
    /// waiting for a SIPI.
    pub fn take_init(&self) -> bool {
        self.init.swap(0, Ordering::AcqRel) != 0
    }

    /// Forget every NMI that waits and every kick: INIT resets the
    /// processor, and the host's kicks are not the guest's. Call once
    /// [`Self::kicks_arrived`] (or after giving up on a lost one).
    pub fn drop_nmis(&self) {
        self.kicks.store(0, Ordering::Release);
        self.nmis.store(0, Ordering::Release);
    }

    /// Take one waiting NMI for the guest, if any.
    #[inline]
    pub fn take_nmi(&self) -> bool {
        self.nmis.load(Ordering::Relaxed) != 0
            && self
                .nmis
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_seen_once_and_nmis_are_counted() {
        let s = HostSignals::new();
        assert!(!s.init_posted());
        assert!(!s.take_nmi());
        s.post_init();
        s.kick_self();
        assert!(s.init_posted());
        assert!(s.take_init());
        assert!(!s.take_init());
        assert!(s.take_nmi());
        assert!(!s.take_nmi());
        s.kick_self();
        s.kick_self();
        s.drop_nmis();
        assert!(!s.take_nmi());
        // A kick sent but not arrived yet: not all arrived until its NMI
        // is counted.
        s.expect_kick();
        assert!(!s.kicks_arrived());
        s.nmis.fetch_add(1, Ordering::AcqRel);
        assert!(s.kicks_arrived());
        s.drop_nmis();
        assert!(s.kicks_arrived() && !s.take_nmi());
    }
}
