//! The MSR permission map (AMD APM vol. 2, 15.11): 8 KiB, two bits per MSR
//! (read intercept, then write intercept) for three ranges of MSRs;
//! accesses to MSRs outside the ranges are always intercepted.

/// Size of the map in bytes (two 4 KiB pages, page-aligned).
pub const MSRPM_SIZE: usize = 8192;

/// The ranges the map covers and the byte offset of each range's bits.
const RANGES: [(u32, usize); 3] = [
    (0x0000_0000, 0x0000),
    (0xC000_0000, 0x0800),
    (0xC001_0000, 0x1000),
];
/// MSRs per range.
const RANGE_LEN: u32 = 0x2000;

/// MSRs of the SVM extension itself: VM_CR (0xC001_0114), IGNNE, SMM_CTL,
/// VM_HSAVE_PA (0xC001_0117) and SVM_KEY. A guest that wrote VM_HSAVE_PA
/// would point the host save area at memory of its choosing; the others
/// control whether SVM can be used at all.
pub const PROTECTED_MSRS: [u32; 5] = [
    0xC001_0114,
    0xC001_0115,
    0xC001_0116,
    0xC001_0117,
    0xC001_0118,
];

/// Byte and bit of `msr`'s read-intercept bit (its write bit is the next).
fn position(msr: u32) -> Option<(usize, u8)> {
    RANGES.iter().find_map(|&(first, byte_base)| {
        let offset = msr.checked_sub(first).filter(|&o| o < RANGE_LEN)? as usize;
        Some((byte_base + offset * 2 / 8, (offset * 2 % 8) as u8))
    })
}

/// Intercept reads and/or writes of `msr`. Returns false for an MSR outside
/// the map's ranges (always intercepted anyway).
pub fn intercept(map: &mut [u8; MSRPM_SIZE], msr: u32, read: bool, write: bool) -> bool {
    let Some((byte, bit)) = position(msr) else {
        return false;
    };
    map[byte] |= (u8::from(read) | (u8::from(write) << 1)) << bit;
    true
}

/// Whether an access to `msr` exits.
pub fn is_intercepted(map: &[u8; MSRPM_SIZE], msr: u32, write: bool) -> bool {
    position(msr).is_none_or(|(byte, bit)| map[byte] >> (bit + u8::from(write)) & 1 != 0)
}

/// Fill `map` with thinvisor's policy: every MSR passes through except
/// [`PROTECTED_MSRS`] and EFER, whose SVME bit the backend hides
/// ([`crate::efer`]).
pub fn init(map: &mut [u8; MSRPM_SIZE]) {
    map.fill(0);
    for msr in PROTECTED_MSRS {
        intercept(map, msr, true, true);
    }
    intercept(map, crate::efer::MSR_EFER, true, true);
    // The x2APIC ICR: thinvisor starts the processors it holds.
    intercept(map, thinvisor_vmm::apic::X2APIC_ICR_MSR, false, true);
    // The APIC base and the MTRRs: their writes are checked
    // (thinvisor_vmm::guard).
    for msr in thinvisor_vmm::guard::GUARDED_MSRS {
        intercept(map, msr, false, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_the_manual() {
        // APM 15.11: MSR 0 at bit 0; 0xC000_0000 at byte 0x800; 0xC001_0000 at 0x1000.
        assert_eq!(position(0), Some((0, 0)));
        assert_eq!(position(3), Some((0, 6)));
        assert_eq!(position(0x1FFF), Some((0x7FF, 6)));
        assert_eq!(position(0xC000_0080), Some((0x800 + 0x20, 0)));
        assert_eq!(position(0xC001_0117), Some((0x1045, 6)));
        assert_eq!(position(0x2000), None);
        assert_eq!(position(0xC001_2000), None);
    }

    #[test]
    fn policy_protects_only_the_svm_msrs() {
        let mut map = [0u8; MSRPM_SIZE];
        init(&mut map);
        for msr in PROTECTED_MSRS {
            assert!(is_intercepted(&map, msr, false));
            assert!(is_intercepted(&map, msr, true));
        }
        for msr in [
            0x10,
            0x277,
            0xC000_0081,
            0xC000_0100,
            0xC001_0113,
            0xC001_0119,
        ] {
            assert!(!is_intercepted(&map, msr, false), "{msr:#x}");
            assert!(!is_intercepted(&map, msr, true), "{msr:#x}");
        }
        assert!(is_intercepted(&map, 0x4000_0000, false));
        assert!(is_intercepted(&map, crate::efer::MSR_EFER, false));
        assert!(is_intercepted(&map, crate::efer::MSR_EFER, true));
        // The x2APIC ICR: writes only.
        assert!(is_intercepted(&map, 0x830, true));
        assert!(!is_intercepted(&map, 0x830, false));
        // The guarded MSRs (APIC base, MTRRs): writes only.
        for msr in thinvisor_vmm::guard::GUARDED_MSRS {
            assert!(is_intercepted(&map, msr, true), "{msr:#x}");
            assert!(!is_intercepted(&map, msr, false), "{msr:#x}");
        }
        assert_eq!(
            map.iter().map(|b| b.count_ones()).sum::<u32>(),
            13 + thinvisor_vmm::guard::GUARDED_MSRS.len() as u32
        );
    }
}
