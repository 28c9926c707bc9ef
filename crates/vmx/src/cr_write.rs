//! The checks MOV to CR0/CR3/CR4 makes before it writes, for the writes
//! the hypervisor emulates.
//!
//! A MOV to CR0/CR4 that touches a bit the hypervisor owns (CR0.NE,
//! CR4.VMXE) exits, and the exit takes priority over the instruction's own
//! general-protection checks (Intel SDM vol. 3C, 26.1.1: only the faults
//! listed there come first). So the hypervisor makes those checks: a
//! write the processor would refuse gets #GP(0) and changes nothing,
//! instead of reaching the VMCS and failing the next VM entry. The rules
//! are those of Intel SDM vol. 2B, "MOV—Move to/from Control Registers"
//! (protected-mode and 64-bit-mode exceptions), vol. 3A, 2.5 (the control
//! registers), 4.1.1 and 4.10.1 (paging modes, PCIDs) and 10.8.5
//! (IA-32e mode activation). The guest sees a processor without VMX, so
//! CR4.VMXE is a reserved bit to it.

use core::fmt;

const CR0_PE: u64 = 1 << 0;
const CR0_WP: u64 = 1 << 16;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const CR4_VMXE: u64 = 1 << 13;
const CR4_PCIDE: u64 = 1 << 17;
const CR4_CET: u64 = 1 << 23;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// CR3 bit 63 with CR4.PCIDE set: "do not invalidate the PCID's TLB
/// entries"; it is not stored in CR3 (SDM vol. 3A, 4.10.4.1).
const CR3_NO_FLUSH: u64 = 1 << 63;

/// The guest's state a MOV to CR is checked against, as the guest sees it
/// (CR4 without the hypervisor's VMXE).
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestCrs {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// 64-bit mode (EFER.LMA and CS.L): only there is the operand 64 bits.
    pub long64: bool,
}

/// What this processor allows.
#[derive(Clone, Copy, Debug)]
pub struct CrLimits {
    /// CR4 bits the processor supports (IA32_VMX_CR4_FIXED1), VMXE not
    /// among them: the guest sees no VMX.
    pub cr4_valid: u64,
    /// CR3 bits that must be 0 in IA-32e mode: those at and above
    /// MAXPHYADDR (CPUID.80000008H:EAX[7:0]), bit 63 apart.
    pub cr3_reserved: u64,
}

impl CrLimits {
    /// The limits from IA32_VMX_CR4_FIXED1 and the physical-address width.
    pub fn new(cr4_fixed1: u64, maxphyaddr: u8) -> Self {
        let width = u32::from(maxphyaddr.clamp(32, 52));
        Self {
            cr4_valid: cr4_fixed1 & !CR4_VMXE,
            cr3_reserved: !((1u64 << width) - 1) & !CR3_NO_FLUSH,
        }
    }
}

/// Why a MOV to CR raises #GP(0).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CrFault(pub &'static str);

impl fmt::Display for CrFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// MOV of `operand` (the full source register) to CR`cr` (0, 3 or 4): the
/// value the register takes, or the reason for #GP(0). Outside 64-bit
/// mode the operand is the register's low 32 bits.
pub fn mov_to_cr(cr: u8, operand: u64, cur: &GuestCrs, limits: &CrLimits) -> Result<u64, CrFault> {
    let value = if cur.long64 {
        operand
    } else {
        operand & 0xFFFF_FFFF
    };
    match cr {
        0 => check_cr0(value, cur).map(|()| value),
        3 => check_cr3(value, cur, limits),
        4 => check_cr4(value, cur, limits).map(|()| value),
        _ => Err(CrFault("not CR0, CR3 or CR4")),
    }
}

fn check_cr0(value: u64, cur: &GuestCrs) -> Result<(), CrFault> {
    let fault = |why| Err(CrFault(why));
    if value >> 32 != 0 {
        return fault("CR0 bits 63:32 are reserved");
    }
    if value & CR0_PG != 0 && value & CR0_PE == 0 {
        return fault("CR0.PG set with CR0.PE clear");
    }
    if value & CR0_NW != 0 && value & CR0_CD == 0 {
        return fault("CR0.NW set with CR0.CD clear");
    }
    let was_paging = cur.cr0 & CR0_PG != 0;
    let paging = value & CR0_PG != 0;
    if !was_paging && paging && cur.efer & EFER_LME != 0 && cur.cr4 & CR4_PAE == 0 {
        return fault("IA-32e mode activated with CR4.PAE clear");
    }
    if was_paging && !paging {
        if cur.long64 {
            return fault("CR0.PG cleared in 64-bit mode");
        }
        if cur.cr4 & CR4_PCIDE != 0 {
            return fault("CR0.PG cleared with CR4.PCIDE set");
        }
    }
    if value & CR0_WP == 0 && cur.cr4 & CR4_CET != 0 {
        return fault("CR0.WP cleared with CR4.CET set");
    }
    Ok(())
}

fn check_cr4(value: u64, cur: &GuestCrs, limits: &CrLimits) -> Result<(), CrFault> {
    let fault = |why| Err(CrFault(why));
    if value & !limits.cr4_valid != 0 {
        return fault("a reserved CR4 bit (VMXE among them) set");
    }
    let ia32e = cur.efer & EFER_LMA != 0;
    if ia32e && value & CR4_PAE == 0 {
        return fault("CR4.PAE cleared in IA-32e mode");
    }
    if ia32e && (value ^ cur.cr4) & CR4_LA57 != 0 {
        return fault("CR4.LA57 changed in IA-32e mode");
    }
    if value & CR4_PCIDE != 0 && cur.cr4 & CR4_PCIDE == 0 {
        if !ia32e {
            return fault("CR4.PCIDE set outside IA-32e mode");
        }
        if cur.cr3 & 0xFFF != 0 {
            return fault("CR4.PCIDE set with CR3[11:0] nonzero");
        }
    }
    if value & CR4_CET != 0 && cur.cr0 & CR0_WP == 0 {
        return fault("CR4.CET set with CR0.WP clear");
    }
    Ok(())
}

fn check_cr3(value: u64, cur: &GuestCrs, limits: &CrLimits) -> Result<u64, CrFault> {
    if cur.efer & EFER_LMA == 0 {
        // Outside IA-32e mode CR3 is 32 bits (the operand already is)
        // with no reserved bits that fault.
        return Ok(value);
    }
    let value = if cur.cr4 & CR4_PCIDE != 0 {
        value & !CR3_NO_FLUSH
    } else {
        value
    };
    if value & (limits.cr3_reserved | CR3_NO_FLUSH) != 0 {
        return Err(CrFault("CR3 bits beyond the physical-address width set"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bochs' IA32_VMX_CR4_FIXED1 and a 39-bit physical-address width.
    fn limits() -> CrLimits {
        CrLimits::new(0x0037_27FF, 39)
    }

    /// 64-bit mode with 4-level paging, as the test guest runs its checks.
    fn long64() -> GuestCrs {
        GuestCrs {
            cr0: 0x8001_0033,
            cr3: 0x1000,
            cr4: 0x20,
            efer: EFER_LME | EFER_LMA,
            long64: true,
        }
    }

    /// 32-bit protected mode with paging off, as a multiboot guest starts.
    fn flat32() -> GuestCrs {
        GuestCrs {
            cr0: 0x11,
            ..GuestCrs::default()
        }
    }

    fn gp(cr: u8, value: u64, cur: &GuestCrs) -> bool {
        mov_to_cr(cr, value, cur, &limits()).is_err()
    }

    #[test]
    fn ordinary_writes_pass_unchanged() {
        let c = long64();
        for (cr, v) in [(0, c.cr0), (0, c.cr0 & !0x20), (0, c.cr0 | CR0_CD | CR0_NW)] {
            assert_eq!(mov_to_cr(cr, v, &c, &limits()), Ok(v), "CR{cr} {v:#x}");
        }
        assert_eq!(mov_to_cr(4, 0x6F0, &c, &limits()), Ok(0x6F0));
        assert_eq!(
            mov_to_cr(3, 0x7F_FFFF_F000, &c, &limits()),
            Ok(0x7F_FFFF_F000)
        );
        // Paging on, and IA-32e mode on with PAE, from the entry state.
        let mut c = flat32();
        assert!(!gp(0, 0x8000_0011, &c));
        c.efer = EFER_LME;
        c.cr4 = CR4_PAE;
        assert!(!gp(0, 0x8000_0011, &c));
    }

    #[test]
    fn cr0_combinations_the_processor_refuses() {
        let c = long64();
        assert!(gp(0, c.cr0 | 1 << 32, &c), "bits 63:32");
        assert!(gp(0, c.cr0 & !CR0_PE, &c), "PG without PE");
        assert!(gp(0, c.cr0 | CR0_NW, &c), "NW without CD");
        assert!(gp(0, c.cr0 & !CR0_PG, &c), "PG cleared in 64-bit mode");
        let mut c = flat32();
        c.efer = EFER_LME;
        assert!(gp(0, 0x8000_0011, &c), "IA-32e mode without PAE");
        // Compatibility mode may leave IA-32e mode, but not with PCIDs on.
        let mut c = long64();
        c.long64 = false;
        assert!(!gp(0, c.cr0 & !CR0_PG, &c));
        c.cr4 |= CR4_PCIDE;
        assert!(gp(0, c.cr0 & !CR0_PG, &c));
        let mut c = long64();
        c.cr4 |= CR4_CET;
        assert!(gp(0, c.cr0 & !CR0_WP, &c), "WP cleared under CET");
    }

    #[test]
    fn outside_64_bit_mode_the_operand_is_32_bits() {
        let c = flat32();
        assert_eq!(mov_to_cr(0, 0xDEAD_0000_0000_0031, &c, &limits()), Ok(0x31));
        assert_eq!(
            mov_to_cr(3, 0xFFFF_FFFF_0000_3000, &c, &limits()),
            Ok(0x3000)
        );
        assert_eq!(mov_to_cr(4, 1 << 40, &c, &limits()), Ok(0));
    }

    #[test]
    fn cr4_bits_the_processor_refuses() {
        let c = long64();
        assert!(gp(4, c.cr4 | CR4_VMXE, &c), "VMXE");
        assert!(gp(4, c.cr4 | 1 << 15, &c), "reserved bit 15");
        assert!(gp(4, c.cr4 | 1 << 32, &c), "bits 63:32");
        assert!(gp(4, 1 << 23, &c), "a bit this processor lacks (CET)");
        assert!(gp(4, c.cr4 & !CR4_PAE, &c), "PAE cleared in IA-32e mode");
        assert!(gp(4, c.cr4 | CR4_LA57, &c), "LA57 changed in IA-32e mode");
        assert!(!gp(4, c.cr4 | CR4_PCIDE, &c));
        let mut with_pcid = c;
        with_pcid.cr3 |= 1;
        assert!(gp(4, c.cr4 | CR4_PCIDE, &with_pcid), "PCIDE with CR3[11:0]");
        assert!(gp(4, CR4_PCIDE, &flat32()), "PCIDE outside IA-32e mode");
        let all = CrLimits::new(!0, 52);
        let mut no_wp = c;
        no_wp.cr0 &= !CR0_WP;
        assert!(mov_to_cr(4, c.cr4 | CR4_CET, &no_wp, &all).is_err());
        assert!(mov_to_cr(4, c.cr4 | CR4_CET, &c, &all).is_ok());
    }

    #[test]
    fn cr3_in_ia32e_mode_stays_within_the_physical_width() {
        let mut c = long64();
        assert!(gp(3, 1 << 39, &c));
        assert!(gp(3, CR3_NO_FLUSH, &c), "bit 63 without PCIDs");
        c.cr4 |= CR4_PCIDE;
        assert_eq!(
            mov_to_cr(3, CR3_NO_FLUSH | 0x5001, &c, &limits()),
            Ok(0x5001)
        );
    }
}
