//! The MSR bitmap (Intel SDM vol. 3C, 25.6.9): 4 KiB, one bit per MSR for
//! reads of 0..0x1FFF, reads of 0xC000_0000..0xC000_1FFF, then the same
//! for writes. Accesses to MSRs outside both ranges always exit.

/// Size of the bitmap in bytes.
pub const MSR_BITMAP_SIZE: usize = 4096;

/// MSRs of the VMX extension the guest must not reach: the capability
/// MSRs (IA32_VMX_BASIC .. IA32_VMX_VMFUNC), which a processor without
/// VMX does not have, for reads and writes.
const VMX_CAPABILITY_MSRS: core::ops::RangeInclusive<u32> = 0x480..=0x491;
/// IA32_FEATURE_CONTROL and IA32_SMM_MONITOR_CTL: readable, but writes
/// would change how VMX may be used.
const WRITE_PROTECTED_MSRS: [u32; 2] = [0x3A, 0x9B];

/// Byte and bit of `msr`'s read bit; the write bit is 2048 bytes later.
fn position(msr: u32) -> Option<(usize, u8)> {
    let (base, offset) = match msr {
        0..=0x1FFF => (0, msr),
        0xC000_0000..=0xC000_1FFF => (1024, msr - 0xC000_0000),
        _ => return None,
    };
    Some((base + offset as usize / 8, (offset % 8) as u8))
}

/// Make reads and/or writes of `msr` exit. False for an MSR outside the
/// bitmap's ranges (those always exit).
pub fn intercept(map: &mut [u8; MSR_BITMAP_SIZE], msr: u32, read: bool, write: bool) -> bool {
    let Some((byte, bit)) = position(msr) else {
        return false;
    };
    if read {
        map[byte] |= 1 << bit;
    }
    if write {
        map[byte + 2048] |= 1 << bit;
    }
    true
}

/// Whether an access to `msr` exits.
pub fn is_intercepted(map: &[u8; MSR_BITMAP_SIZE], msr: u32, write: bool) -> bool {
    position(msr).is_none_or(|(byte, bit)| map[byte + if write { 2048 } else { 0 }] >> bit & 1 != 0)
}

/// thinvisor's policy: every MSR passes through except the VMX ones.
pub fn init(map: &mut [u8; MSR_BITMAP_SIZE]) {
    map.fill(0);
    for msr in VMX_CAPABILITY_MSRS {
        intercept(map, msr, true, true);
    }
    for msr in WRITE_PROTECTED_MSRS {
        intercept(map, msr, false, true);
    }
    // The x2APIC ICR: thinvisor starts the processors it holds.
    intercept(map, thinvisor_vmm::apic::X2APIC_ICR_MSR, false, true);
    // The APIC base and the MTRRs: their writes are checked
    // (thinvisor_vmm::guard).
    for msr in thinvisor_vmm::guard::GUARDED_MSRS {
        intercept(map, msr, false, true);
    }
    // The PAT is shared with thinvisor under VT-x (no PAT load/save
    // controls in use): its writes are checked too.
    for msr in thinvisor_vmm::guard::VMX_GUARDED_MSRS {
        intercept(map, msr, false, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_the_manual() {
        assert_eq!(position(0), Some((0, 0)));
        assert_eq!(position(0x3A), Some((7, 2)));
        assert_eq!(position(0x1FFF), Some((1023, 7)));
        assert_eq!(position(0xC000_0080), Some((1024 + 16, 0)));
        assert_eq!(position(0x2000), None);
        assert_eq!(position(0xC001_0117), None);
    }

    #[test]
    fn policy_protects_only_vmx_msrs() {
        let mut map = [0u8; MSR_BITMAP_SIZE];
        init(&mut map);
        assert!(is_intercepted(&map, 0x480, false));
        assert!(is_intercepted(&map, 0x491, true));
        assert!(!is_intercepted(&map, 0x3A, false));
        assert!(is_intercepted(&map, 0x3A, true));
        for msr in [
            0x10,
            0x174,
            0x47F,
            0x492,
            0xC000_0080,
            0xC000_0100,
            0xC000_0102,
        ] {
            assert!(!is_intercepted(&map, msr, false), "{msr:#x}");
            assert!(!is_intercepted(&map, msr, true), "{msr:#x}");
        }
        assert!(is_intercepted(&map, 0x4000_0000, false));
        // The x2APIC ICR: writes only.
        assert!(is_intercepted(&map, 0x830, true));
        assert!(!is_intercepted(&map, 0x830, false));
        // The guarded MSRs (APIC base, MTRRs, ...): writes only, where
        // the bitmap reaches (AMD's CPUID MSRs at C001_1004h lie outside
        // it: every access to them exits, and raises #GP on Intel).
        for msr in thinvisor_vmm::guard::GUARDED_MSRS {
            assert!(is_intercepted(&map, msr, true), "{msr:#x}");
            if position(msr).is_some() {
                assert!(!is_intercepted(&map, msr, false), "{msr:#x}");
            }
        }
    }
}
