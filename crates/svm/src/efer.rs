//! The guest's EFER on SVM. VMRUN requires EFER.SVME in the guest state
//! (APM vol. 2, 15.5.1), yet the guest must see a processor without SVM:
//! reads and writes of EFER are intercepted, SVME is hidden from reads and
//! kept set underneath whatever the guest writes.

/// EFER bits (APM vol. 2, 3.1.7).
pub const SCE: u64 = 1 << 0;
pub const LME: u64 = 1 << 8;
pub const LMA: u64 = 1 << 10;
pub const NXE: u64 = 1 << 11;
pub const SVME: u64 = 1 << 12;
pub const LMSLE: u64 = 1 << 13;
pub const FFXSR: u64 = 1 << 14;
pub const TCE: u64 = 1 << 15;

/// EFER's MSR number.
pub const MSR_EFER: u32 = 0xC000_0080;

/// The bits a guest may write on this processor: SCE and LME always (a
/// 64-bit processor), the others when CPUID reports them (Fn8000_0001:
/// EDX.NX, EDX.FFXSR, ECX.TCE).
pub fn writable_bits(ext1_ecx: u32, ext1_edx: u32) -> u64 {
    let mut bits = SCE | LME;
    if ext1_edx & (1 << 20) != 0 {
        bits |= NXE;
    }
    if ext1_edx & (1 << 25) != 0 {
        bits |= FFXSR;
    }
    if ext1_ecx & (1 << 17) != 0 {
        bits |= TCE;
    }
    bits
}

/// What RDMSR EFER returns to the guest.
pub fn guest_view(real: u64) -> u64 {
    real & !SVME
}

/// The real EFER after the guest writes `value`, or None when the write
/// must raise #GP: a bit this processor does not let the guest set (SVME
/// included: the guest's processor has no SVM), or a change of LME while
/// paging is on (APM vol. 2, 14.6.1). LMA is the processor's and keeps its
/// value whatever is written there.
pub fn after_write(real: u64, value: u64, writable: u64, paging: bool) -> Option<u64> {
    if value & !(writable | LMA) != 0 {
        return None;
    }
    if paging && (value ^ real) & LME != 0 {
        return None;
    }
    Some((value & writable) | (real & LMA) | SVME)
}

/// The bits an EFER write set that VMRUN then refused (the entry failed
/// with VMEXIT_INVALID right after it): the bits it turned on, SVME and LMA
/// aside (thinvisor's and the processor's). The guest may not set them any
/// more; the write is answered with #GP.
pub fn refused_by_vmrun(before: u64, after: u64) -> u64 {
    after & !before & !(SVME | LMA)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = SCE | LME | NXE | FFXSR | TCE;

    #[test]
    fn reads_hide_svme() {
        assert_eq!(guest_view(SVME | LME | LMA | NXE), LME | LMA | NXE);
    }

    #[test]
    fn writes_keep_svme_and_lma() {
        let real = SVME | LME | LMA;
        assert_eq!(
            after_write(real, LME | NXE | SCE, ALL, true),
            Some(real | NXE | SCE)
        );
        // Writing LMA's bit changes nothing.
        assert_eq!(after_write(SVME, LMA, ALL, false), Some(SVME));
        assert_eq!(after_write(real, LME, ALL, true), Some(real));
    }

    #[test]
    fn refused_writes_raise_gp() {
        // SVME itself, reserved bits, bits the CPU lacks.
        assert_eq!(after_write(SVME, SVME, ALL, false), None);
        assert_eq!(after_write(SVME, 1 << 1, ALL, false), None);
        assert_eq!(after_write(SVME, 1 << 63, ALL, false), None);
        assert_eq!(after_write(SVME, NXE, SCE | LME, false), None);
        // LME may not change while paging is on.
        assert_eq!(after_write(SVME, LME, ALL, true), None);
        assert_eq!(after_write(SVME | LME | LMA, 0, ALL, true), None);
        assert_eq!(after_write(SVME, LME, ALL, false), Some(SVME | LME));
    }

    #[test]
    fn bits_refused_by_vmrun_are_the_ones_turned_on() {
        let before = SVME | LME | LMA | NXE;
        assert_eq!(refused_by_vmrun(before, before | TCE), TCE);
        assert_eq!(
            refused_by_vmrun(before, (before | TCE | SCE) & !NXE),
            TCE | SCE
        );
        // Bits turned off, SVME and LMA are never blamed.
        assert_eq!(refused_by_vmrun(before, SVME | LME | LMA), 0);
        assert_eq!(refused_by_vmrun(LME, LME | LMA | SVME), 0);
    }

    #[test]
    fn writable_bits_follow_cpuid() {
        assert_eq!(writable_bits(0, 0), SCE | LME);
        assert_eq!(writable_bits(1 << 17, (1 << 20) | (1 << 25)), ALL);
    }
}
