//! What happens when the guest must be given an event while another one is
//! still being delivered: the exception classes and the double-fault rule
//! (Intel SDM vol. 3A, 6.15, "Exception and Interrupt Reference", table
//! 6-5; AMD APM vol. 2, 8.2.9 "#DF").
//!
//! A backend that finds an event queued for re-delivery (VT-x IDT-vectoring
//! information, SVM EXITINTINFO) when a handler injects another asks
//! [`combine`] what the processor would have done.

use crate::vcpu::Event;

/// How an exception combines with one raised while it was delivered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Class {
    /// Everything else: handled one after the other.
    Benign,
    /// #DE, #TS, #NP, #SS, #GP (and #VC/#CP on processors that have them).
    Contributory,
    /// #PF.
    PageFault,
    /// #DF itself.
    DoubleFault,
}

/// The class of exception `vector`.
pub fn class(vector: u8) -> Class {
    match vector {
        0 | 10 | 11 | 12 | 13 | 21 | 29 => Class::Contributory,
        14 => Class::PageFault,
        8 => Class::DoubleFault,
        _ => Class::Benign,
    }
}

/// The outcome of a second event raised while the first was delivered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Combined {
    /// Deliver `now`; if `later` is set, deliver it at the next entry that
    /// has no other event (an interrupt or NMI the exception interrupted).
    Serial { now: Event, later: Option<Event> },
    /// The two make a double fault.
    DoubleFault,
    /// A fault while delivering a double fault: the processor shuts down.
    Shutdown,
}

/// `pending` was being delivered when `new` arose. Exceptions combine by
/// table 6-5; an interrupt or NMI being delivered stays pending behind the
/// exception.
pub fn combine(pending: Event, new: Event) -> Combined {
    let vector = |e: Event| match e {
        Event::Exception { vector, .. } => Some(vector),
        Event::PageFault { .. } => Some(14),
        Event::Nmi | Event::ExternalInterrupt { .. } => None,
    };
    let (Some(first), Some(second)) = (vector(pending), vector(new)) else {
        return match vector(new) {
            // An exception while an interrupt or NMI was delivered: the
            // exception first, the interrupt after it.
            Some(_) => Combined::Serial {
                now: new,
                later: Some(pending),
            },
            // Two asynchronous events: the one being delivered goes first.
            None => Combined::Serial {
                now: pending,
                later: Some(new),
            },
        };
    };
    match (class(first), class(second)) {
        (Class::DoubleFault, Class::Contributory | Class::PageFault) => Combined::Shutdown,
        (Class::Contributory, Class::Contributory)
        | (Class::PageFault, Class::Contributory | Class::PageFault) => Combined::DoubleFault,
        // Benign on either side: handled serially; the first exception
        // recurs when its instruction runs again, so only the new one is
        // delivered now.
        _ => Combined::Serial {
            now: new,
            later: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exc(vector: u8) -> Event {
        Event::Exception {
            vector,
            error_code: None,
        }
    }
    const PF: Event = Event::PageFault {
        error_code: 2,
        address: 0x1000,
    };

    #[test]
    fn double_fault_table() {
        assert_eq!(combine(exc(13), exc(11)), Combined::DoubleFault);
        assert_eq!(combine(PF, PF), Combined::DoubleFault);
        assert_eq!(combine(PF, exc(13)), Combined::DoubleFault);
        // Contributory first, then #PF: serial (table 6-5).
        assert_eq!(
            combine(exc(13), PF),
            Combined::Serial {
                now: PF,
                later: None
            }
        );
        assert_eq!(combine(exc(8), exc(13)), Combined::Shutdown);
        assert_eq!(combine(exc(8), PF), Combined::Shutdown);
        assert_eq!(
            combine(exc(3), exc(13)),
            Combined::Serial {
                now: exc(13),
                later: None
            }
        );
        assert_eq!(
            combine(exc(13), exc(6)),
            Combined::Serial {
                now: exc(6),
                later: None
            }
        );
    }

    #[test]
    fn interrupts_are_kept() {
        let irq = Event::ExternalInterrupt { vector: 0x30 };
        assert_eq!(
            combine(irq, exc(13)),
            Combined::Serial {
                now: exc(13),
                later: Some(irq)
            }
        );
        assert_eq!(
            combine(irq, Event::Nmi),
            Combined::Serial {
                now: irq,
                later: Some(Event::Nmi)
            }
        );
        assert_eq!(class(14), Class::PageFault);
        assert_eq!(class(1), Class::Benign);
    }
}
