//! Guest MSR writes that would reach thinvisor's own memory through the
//! processor (docs/security.md, "Guest-controlled state").
//!
//! A pass-through guest owns most MSRs, but a few change how the physical
//! processor decodes physical addresses, thinvisor's included:
//!
//! - IA32_APIC_BASE moves the local APIC's 4 KiB MMIO window (Intel SDM
//!   vol. 3A, 11.4.4; AMD APM vol. 2, 16.3.1). Over thinvisor's block, the
//!   processor's own accesses there would reach the APIC, not memory.
//! - The MTRRs set the memory type of physical ranges for every access
//!   the processor makes (SDM vol. 3A, 11.11). Write-combining memory is
//!   weakly ordered (SDM vol. 3A, 11.3): stores may be combined, delayed
//!   and reordered, which breaks the ordering thinvisor's spin locks and
//!   shared counters rely on. The other types (UC, WT, WP, WB) keep
//!   stores in order and coherent between processors; UC only makes
//!   thinvisor slower, and operating systems make everything UC for a
//!   moment whenever they change the MTRRs (MTRRdefType.E cleared, SDM
//!   vol. 3A, 11.11.7.2), so it must pass.
//!
//! - IA32_PAT gives the memory type of each page-table cache setting
//!   (SDM vol. 3A, 11.12). thinvisor maps its memory with entry 0 (PAT,
//!   PCD, PWT all 0), so entry 0 must not become write-combining either.
//!   Under SVM with nested paging the guest has a PAT of its own (G_PAT,
//!   APM vol. 2, 15.25.8) and its writes are not intercepted; VT-x
//!   without the PAT load/save controls shares the processor's PAT with
//!   thinvisor, so there its writes are checked ([`VMX_GUARDED_MSRS`]).
//!
//! - The x2APIC local vector table entries with a delivery mode (CMCI,
//!   thermal, performance counters, LINT0, LINT1; SDM vol. 3A, 11.5.1)
//!   may deliver INIT: a real INIT, which would reset the processor out
//!   of thinvisor on SVM (docs/security.md, "INIT and SIPI"). The xAPIC
//!   page's equivalents are watched by the hypervisor's APIC emulation.
//!
//! - IA32_MISC_ENABLE (Intel; its CPUID-limit, XD-disable and MONITOR
//!   bits, SDM vol. 4, table 2-2) and the CPUID feature MSRs (AMD,
//!   C001_1004h and C001_1005h) change what CPUID answers. Their writes
//!   are not refused; they exit so that the processor's cached CPUID
//!   answers ([`crate::cpuid::CpuidCache`]) are dropped.
//!
//! Their writes exit; a write that keeps thinvisor's block clear of the
//! APIC window and of write-combining is done for the guest, any other
//! raises #GP(0), as a processor refuses a value it does not support.

use thinvisor_memory::mtrr::{
    MemoryType, MtrrMsrs, Mtrrs, FIXED_MTRR_MSRS, IA32_MTRR_DEF_TYPE, IA32_MTRR_PHYSBASE0,
    MAX_VARIABLE_MTRRS,
};

/// IA32_APIC_BASE (SDM vol. 4, table 2-2).
pub const IA32_APIC_BASE: u32 = 0x1B;

/// The x2APIC LVT MSRs whose entries have a delivery mode (SDM vol. 3A,
/// table 11-6): CMCI, thermal, performance counters, LINT0, LINT1.
pub const X2APIC_LVT_MSRS: [u32; 5] = [0x82F, 0x833, 0x834, 0x835, 0x836];
/// An LVT entry's delivery mode INIT (bits 10:8 = 101).
const LVT_MODE_INIT: u64 = 5;

/// IA32_MISC_ENABLE (SDM vol. 4, table 2-2) and AMD's CPUID feature MSRs
/// for leaves 1 and 8000_0001h (BKDG/PPR, MSRC001_1004 and
/// MSRC001_1005): writes change CPUID's answers.
pub const CPUID_MSRS: [u32; 3] = [0x1A0, 0xC001_1004, 0xC001_1005];

/// Every MSR whose writes are checked: the APIC base, MTRRdefType, the
/// fixed-range and the variable-range MTRRs, the x2APIC LVT entries, the
/// MSRs that shape CPUID.
pub const GUARDED_MSRS: [u32; 2 + 11 + 2 * MAX_VARIABLE_MTRRS + 5 + 3] = {
    let mut all = [0u32; 2 + 11 + 2 * MAX_VARIABLE_MTRRS + 5 + 3];
    all[0] = IA32_APIC_BASE;
    all[1] = IA32_MTRR_DEF_TYPE;
    let mut i = 0;
    while i < 11 {
        all[2 + i] = FIXED_MTRR_MSRS[i];
        i += 1;
    }
    let mut n = 0;
    while n < 2 * MAX_VARIABLE_MTRRS {
        all[13 + n] = IA32_MTRR_PHYSBASE0 + n as u32;
        n += 1;
    }
    let mut l = 0;
    while l < X2APIC_LVT_MSRS.len() {
        all[13 + 2 * MAX_VARIABLE_MTRRS + l] = X2APIC_LVT_MSRS[l];
        l += 1;
    }
    let mut c = 0;
    while c < CPUID_MSRS.len() {
        all[18 + 2 * MAX_VARIABLE_MTRRS + c] = CPUID_MSRS[c];
        c += 1;
    }
    all
};

/// IA32_PAT (SDM vol. 4, table 2-2).
pub const IA32_PAT: u32 = 0x277;

/// What VT-x also checks: the PAT, which it shares with thinvisor.
pub const VMX_GUARDED_MSRS: [u32; 1] = [IA32_PAT];

/// Whether writes of `msr` are checked here (when intercepted).
pub fn is_guarded(msr: u32) -> bool {
    msr == IA32_APIC_BASE
        || msr == IA32_PAT
        || msr == IA32_MTRR_DEF_TYPE
        || FIXED_MTRR_MSRS.contains(&msr)
        || (IA32_MTRR_PHYSBASE0..IA32_MTRR_PHYSBASE0 + 2 * MAX_VARIABLE_MTRRS as u32).contains(&msr)
        || X2APIC_LVT_MSRS.contains(&msr)
        || CPUID_MSRS.contains(&msr)
}

/// Why a write is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The APIC window would overlap thinvisor's block.
    ApicOverThinvisor { base: u64 },
    /// The MTRRs would make (part of) thinvisor's block write-combining.
    WriteCombining { at: u64 },
    /// PAT entry 0, thinvisor's mappings' type, would be write-combining.
    PatEntry0WriteCombining,
    /// An x2APIC LVT entry would deliver INIT.
    LvtInit { msr: u32 },
}

impl core::fmt::Display for Refusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Refusal::ApicOverThinvisor { base } => {
                write!(
                    f,
                    "the local APIC window at {base:#x} would cover thinvisor's memory"
                )
            }
            Refusal::PatEntry0WriteCombining => {
                f.write_str("PAT entry 0, which thinvisor's mappings use, would be write-combining")
            }
            Refusal::LvtInit { msr } => write!(
                f,
                "x2APIC LVT entry {msr:#x} would deliver INIT, which would reset the processor"
            ),
            Refusal::WriteCombining { at } => write!(
                f,
                "thinvisor's memory at {at:#x} would become write-combining"
            ),
        }
    }
}

/// Check a guest's WRMSR of guarded `msr` with `value`, given thinvisor's
/// block [start, end), the current MSRs (`rdmsr`; None for one that does
/// not exist) and MAXPHYADDR.
pub fn check_write(
    msr: u32,
    value: u64,
    reserved: (u64, u64),
    rdmsr: &mut dyn FnMut(u32) -> Option<u64>,
    max_phys_addr: u8,
) -> Result<(), Refusal> {
    if X2APIC_LVT_MSRS.contains(&msr) {
        return if (value >> 8) & 7 == LVT_MODE_INIT {
            Err(Refusal::LvtInit { msr })
        } else {
            Ok(())
        };
    }
    if CPUID_MSRS.contains(&msr) {
        // They do not decide how physical memory is reached.
        return Ok(());
    }
    let (start, end) = reserved;
    if start >= end {
        return Ok(());
    }
    if msr == IA32_APIC_BASE {
        // Bits 12..MAXPHYADDR-1 hold the base; the window is one page.
        let width = max_phys_addr.clamp(32, 52);
        let base = value & ((1u64 << width) - 1) & !0xFFF;
        return if base < end && base + 0x1000 > start {
            Err(Refusal::ApicOverThinvisor { base })
        } else {
            Ok(())
        };
    }
    if msr == IA32_PAT {
        // Entry 0 is bits 2:0; 1 = WC (SDM vol. 3A, table 11-10).
        return if value & 0x7 == 1 {
            Err(Refusal::PatEntry0WriteCombining)
        } else {
            Ok(())
        };
    }
    // The MTRRs as they are and as they would be after this write.
    let mut read = |m: u32| rdmsr(m).unwrap_or(0);
    let now = MtrrMsrs::read(&mut read, max_phys_addr);
    let mut after = now;
    let replaced = if msr == IA32_MTRR_DEF_TYPE {
        after.def_type = value;
        true
    } else if let Some(i) = FIXED_MTRR_MSRS.iter().position(|&m| m == msr) {
        after.fixed[i] = value;
        true
    } else {
        let n = (msr - IA32_MTRR_PHYSBASE0) as usize;
        match after.variable.get_mut(n / 2) {
            Some(pair) if n.is_multiple_of(2) => {
                pair.base = value;
                true
            }
            Some(pair) => {
                pair.mask = value;
                true
            }
            None => false,
        }
    };
    if !replaced {
        return Ok(());
    }
    let mtrrs = Mtrrs::new(&after);
    if mtrrs.uniform_type(start, end) == Some(MemoryType::WriteCombining) {
        return Err(Refusal::WriteCombining { at: start });
    }
    if mtrrs.uniform_type(start, end).is_none() {
        // Mixed: look at every page.
        if let Some(at) = (start..end)
            .step_by(0x1000)
            .find(|&pa| mtrrs.type_of(pa) == MemoryType::WriteCombining)
        {
            return Err(Refusal::WriteCombining { at });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x2apic_lvt_init_refused() {
        let mut none = |_| None;
        for msr in X2APIC_LVT_MSRS {
            assert!(is_guarded(msr));
            assert!(GUARDED_MSRS.contains(&msr));
            // INIT, masked or not, edge or level: refused.
            for value in [0x500, 0x1_0500, 0x8500] {
                assert_eq!(
                    check_write(msr, value, BLOCK, &mut none, 40),
                    Err(Refusal::LvtInit { msr })
                );
            }
            // Fixed, NMI, ExtINT, masked: as the guest asks.
            for value in [0x30, 0x400, 0x700, 0x1_0000] {
                assert_eq!(check_write(msr, value, BLOCK, &mut none, 40), Ok(()));
            }
        }
        assert!(!is_guarded(0x832), "the timer has no delivery mode");
    }

    /// thinvisor's block in the tests: 4 MiB at 508 MiB.
    const BLOCK: (u64, u64) = (0x1FC0_0000, 0x2000_0000);
    const MTRRCAP: u32 = 0xFE;

    /// A machine with MTRRs on, default WB, 8 variable pairs, no fixed
    /// ranges, variable pair 0 making [0xC000_0000, 4 GiB) UC.
    fn msrs(msr: u32) -> Option<u64> {
        match msr {
            MTRRCAP => Some(8),
            IA32_MTRR_DEF_TYPE => Some((1 << 11) | 6),
            0x200 => Some(0xC000_0000),
            0x201 => Some(0xF_C000_0000 | (1 << 11)),
            0x202..=0x20F => Some(0),
            _ => None,
        }
    }

    fn check(msr: u32, value: u64) -> Result<(), Refusal> {
        check_write(msr, value, BLOCK, &mut msrs, 36)
    }

    #[test]
    fn the_apic_window_stays_off_the_block() {
        let flags = (1 << 11) | (1 << 8);
        assert_eq!(check(IA32_APIC_BASE, 0xFEE0_0000 | flags), Ok(()));
        assert_eq!(
            check(IA32_APIC_BASE, BLOCK.0 | flags),
            Err(Refusal::ApicOverThinvisor { base: BLOCK.0 })
        );
        assert!(check(IA32_APIC_BASE, BLOCK.1 - 0x1000).is_err());
        // Just below and just above.
        assert_eq!(check(IA32_APIC_BASE, BLOCK.0 - 0x1000), Ok(()));
        assert_eq!(check(IA32_APIC_BASE, BLOCK.1), Ok(()));
        // Bits above MAXPHYADDR do not hide the base.
        assert!(check(IA32_APIC_BASE, (1 << 40) | BLOCK.0).is_err());
    }

    #[test]
    fn mtrr_writes_that_keep_the_block_ordered_pass() {
        // A new UC range elsewhere.
        assert_eq!(check(0x202, 0x8000_0000), Ok(()));
        assert_eq!(check(0x203, 0xF_F000_0000 | (1 << 11)), Ok(()));
        // Pair 0 widened over the block: UC there, slower but ordered.
        assert_eq!(check(0x200, 0), Ok(()));
        // MTRRs off for an update (everything UC), and back on.
        assert_eq!(check(IA32_MTRR_DEF_TYPE, 6), Ok(()));
        assert_eq!(check(IA32_MTRR_DEF_TYPE, (1 << 11) | 6), Ok(()));
        // Write-through and write-protected over the block.
        let with_base = |ty: u64| {
            move |m: u32| match m {
                0x202 => Some(BLOCK.0 | ty),
                other => msrs(other),
            }
        };
        for ty in [4, 5] {
            assert_eq!(
                check_write(
                    0x203,
                    0xF_FFC0_0000 | (1 << 11),
                    BLOCK,
                    &mut with_base(ty),
                    36
                ),
                Ok(()),
                "type {ty}"
            );
        }
    }

    #[test]
    fn write_combining_over_the_block_is_refused() {
        // Default WC (the block is under no variable range).
        assert_eq!(
            check(IA32_MTRR_DEF_TYPE, (1 << 11) | 1),
            Err(Refusal::WriteCombining { at: BLOCK.0 })
        );
        // A WC pair over the block's second 2 MiB: the first WC page.
        let mut with_base = |m: u32| match m {
            0x202 => Some((BLOCK.0 + 0x20_0000) | 1),
            other => msrs(other),
        };
        assert_eq!(
            check_write(0x203, 0xF_FFE0_0000 | (1 << 11), BLOCK, &mut with_base, 36),
            Err(Refusal::WriteCombining {
                at: BLOCK.0 + 0x20_0000
            })
        );
        // The same pair's base turned WC while its mask is valid.
        let mut valid_mask = |m: u32| match m {
            0x202 => Some(BLOCK.0),
            0x203 => Some(0xF_FFC0_0000 | (1 << 11)),
            other => msrs(other),
        };
        assert_eq!(
            check_write(0x202, BLOCK.0 | 1, BLOCK, &mut valid_mask, 36),
            Err(Refusal::WriteCombining { at: BLOCK.0 })
        );
    }

    #[test]
    fn pat_entry_0_stays_ordered() {
        // Linux's PAT: WB, WC, UC-, UC in entries 0-3, again in 4-7.
        assert_eq!(
            check(IA32_PAT, 0x0007_0106_0007_0106 & !0xFF | 0x06),
            Ok(())
        );
        assert_eq!(check(IA32_PAT, 0x0007_0406_0007_0400), Ok(()));
        assert_eq!(
            check(IA32_PAT, 0x0007_0406_0007_0401),
            Err(Refusal::PatEntry0WriteCombining)
        );
    }

    #[test]
    fn cpuid_msrs_are_let_through_whatever_the_value() {
        for msr in CPUID_MSRS {
            assert!(is_guarded(msr));
            for value in [0, !0, 1 << 22, 1 << 34] {
                assert_eq!(check(msr, value), Ok(()), "{msr:#x}");
            }
        }
    }

    #[test]
    fn the_list_matches_the_predicate() {
        assert!(is_guarded(IA32_PAT));
        for msr in GUARDED_MSRS {
            assert!(is_guarded(msr), "{msr:#x}");
        }
        for msr in [
            0x10,
            0x1A,
            0x1C,
            0x1FF,
            0x220,
            0x276,
            0x2FE,
            0x300,
            0xC000_0080,
        ] {
            assert!(!is_guarded(msr), "{msr:#x}");
        }
    }
}
