//! Naming the field behind a failed VM entry.
//!
//! When VM entry fails its guest-state checks the processor only says
//! "invalid guest state" (exit reason 33). Re-running the most common of
//! those checks (Intel SDM vol. 3C, 27.3.1) on a snapshot of the VMCS turns
//! that into the field and the rule, for the boot log.

/// The guest-state fields the checks below look at.
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestState {
    pub cr0: u64,
    pub cr4: u64,
    pub efer: u64,
    pub rflags: u64,
    pub entry_controls: u64,
    pub secondary_controls: u64,
    pub cs_ar: u64,
    pub ss_ar: u64,
    /// DS, ES, FS, GS.
    pub data_ar: [u64; 4],
    pub tr_ar: u64,
    pub tr_limit: u64,
    pub ldtr_ar: u64,
    pub activity_state: u64,
    pub interruptibility: u64,
    pub link_pointer: u64,
    /// IA32_VMX_CR0_FIXED0/1 and CR4_FIXED0/1.
    pub cr0_fixed: (u64, u64),
    pub cr4_fixed: (u64, u64),
}

const CR0_PE: u64 = 1 << 0;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_PCIDE: u64 = 1 << 17;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const ENTRY_IA32E: u64 = 1 << 9;
const ENTRY_LOAD_EFER: u64 = 1 << 15;
const UNRESTRICTED_GUEST: u64 = 1 << 7;
/// Access-rights bits (SDM vol. 3C, table 25-2).
const AR_TYPE: u64 = 0xF;
const AR_S: u64 = 1 << 4;
const AR_P: u64 = 1 << 7;
const AR_L: u64 = 1 << 13;
const AR_DB: u64 = 1 << 14;
const AR_G: u64 = 1 << 15;
const AR_UNUSABLE: u64 = 1 << 16;

/// The first rule `s` breaks, as "FIELD: rule", or None when these checks
/// find nothing (the failure is then in a check not modelled here).
pub fn first_violation(s: &GuestState) -> Option<&'static str> {
    let unrestricted = s.secondary_controls & UNRESTRICTED_GUEST != 0;
    let ia32e = s.entry_controls & ENTRY_IA32E != 0;
    // 27.3.1.1: control registers.
    let (f0, f1) = s.cr0_fixed;
    let must1 = if unrestricted {
        f0 & !(CR0_PE | CR0_PG)
    } else {
        f0
    };
    if s.cr0 & must1 != must1 || s.cr0 & !f1 & 0xFFFF_FFFF != 0 {
        return Some("GUEST_CR0: a bit fixed by IA32_VMX_CR0_FIXED0/1 has the wrong value");
    }
    if s.cr0 & CR0_PG != 0 && s.cr0 & CR0_PE == 0 {
        return Some("GUEST_CR0: PG is set without PE");
    }
    let (f0, f1) = s.cr4_fixed;
    if s.cr4 & f0 != f0 || s.cr4 & !f1 != 0 {
        return Some("GUEST_CR4: a bit fixed by IA32_VMX_CR4_FIXED0/1 has the wrong value");
    }
    if ia32e && (s.cr0 & CR0_PG == 0 || s.cr4 & CR4_PAE == 0) {
        return Some("VM_ENTRY_CONTROLS: IA-32e mode guest without CR0.PG and CR4.PAE");
    }
    if !ia32e && s.cr4 & CR4_PCIDE != 0 {
        return Some("GUEST_CR4: PCIDE set outside IA-32e mode");
    }
    if s.entry_controls & ENTRY_LOAD_EFER != 0 {
        if (s.efer & EFER_LMA != 0) != ia32e {
            return Some("GUEST_IA32_EFER: LMA differs from the IA-32e mode guest control");
        }
        if s.cr0 & CR0_PG != 0 && (s.efer & EFER_LME != 0) != ia32e {
            return Some("GUEST_IA32_EFER: LME differs from the IA-32e mode guest control while paging is on");
        }
    }
    // 27.3.1.2: segment registers.
    if s.tr_ar & AR_UNUSABLE != 0 || s.tr_ar & AR_P == 0 || s.tr_ar & AR_S != 0 {
        return Some("GUEST_TR_AR_BYTES: TR must be usable, present, a system segment");
    }
    match s.tr_ar & AR_TYPE {
        11 => {}
        3 if !ia32e => {}
        _ => {
            return Some(
                "GUEST_TR_AR_BYTES: TR must be a busy TSS (type 11, or 3 outside IA-32e mode)",
            )
        }
    }
    // Limit and granularity agree: a limit with any of bits 11:0 clear is
    // byte-granular, one above 0xFFFFF page-granular.
    if (s.tr_limit & 0xFFF != 0xFFF && s.tr_ar & AR_G != 0)
        || (s.tr_limit > 0xF_FFFF && s.tr_ar & AR_G == 0)
    {
        return Some("GUEST_TR_LIMIT: the limit does not agree with TR's granularity");
    }
    if s.ldtr_ar & AR_UNUSABLE == 0
        && (s.ldtr_ar & AR_TYPE != 2 || s.ldtr_ar & (AR_S | AR_P) != AR_P)
    {
        return Some("GUEST_LDTR_AR_BYTES: a usable LDTR must be a present LDT (type 2)");
    }
    if s.cs_ar & AR_UNUSABLE != 0 || s.cs_ar & AR_P == 0 || s.cs_ar & AR_S == 0 {
        return Some("GUEST_CS_AR_BYTES: CS must be usable, present, a code or data segment");
    }
    let cs_type = s.cs_ar & AR_TYPE;
    let code = matches!(cs_type, 9 | 11 | 13 | 15);
    if !(code || (unrestricted && cs_type == 3)) {
        return Some("GUEST_CS_AR_BYTES: CS type must be accessed code (or read/write data with unrestricted guest)");
    }
    if ia32e && s.cs_ar & AR_L != 0 && s.cs_ar & AR_DB != 0 {
        return Some("GUEST_CS_AR_BYTES: L and D/B both set in IA-32e mode");
    }
    if s.ss_ar & AR_UNUSABLE == 0 && !matches!(s.ss_ar & AR_TYPE, 3 | 7) {
        return Some("GUEST_SS_AR_BYTES: a usable SS must be a read/write data segment");
    }
    for ar in s.data_ar {
        if ar & AR_UNUSABLE != 0 {
            continue;
        }
        let ty = ar & AR_TYPE;
        if ty & 1 == 0 || (ty & 8 != 0 && ty & 2 == 0) || ar & (AR_S | AR_P) != AR_S | AR_P {
            return Some("GUEST_DS/ES/FS/GS_AR_BYTES: a usable data segment must be present, accessed, and readable if code");
        }
    }
    // 27.3.1.4 and 27.3.1.5: RFLAGS, activity, interruptibility.
    let rflags_reserved = (1 << 3) | (1 << 5) | (1 << 15) | !0x3F_FFFFu64;
    if s.rflags & 2 == 0 || s.rflags & rflags_reserved != 0 {
        return Some("GUEST_RFLAGS: bit 1 must be 1 and reserved bits 0");
    }
    if s.activity_state > 3 {
        return Some("GUEST_ACTIVITY_STATE: not one of active, HLT, shutdown, wait-for-SIPI");
    }
    if s.interruptibility & 3 == 3 {
        return Some("GUEST_INTERRUPTIBILITY_INFO: blocking by STI and by MOV SS at once");
    }
    // 27.3.1.5: the VMCS link pointer (no VMCS shadowing here).
    if s.link_pointer != u64::MAX {
        return Some("VMCS_LINK_POINTER: must be all ones");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The multiboot entry state thinvisor sets up (Bochs' fixed bits).
    fn entry_state() -> GuestState {
        GuestState {
            cr0: 0x31,
            cr4: 0x2000,
            efer: 0,
            rflags: 2,
            entry_controls: ENTRY_LOAD_EFER | 0x11FB,
            secondary_controls: UNRESTRICTED_GUEST,
            cs_ar: 0xC09B,
            ss_ar: 0xC093,
            data_ar: [0xC093; 4],
            tr_ar: 0x8B,
            tr_limit: 0x67,
            ldtr_ar: AR_UNUSABLE,
            activity_state: 0,
            interruptibility: 0,
            link_pointer: u64::MAX,
            cr0_fixed: (0x8000_0021, 0xFFFF_FFFF),
            cr4_fixed: (0x2000, 0x0037_27FF),
        }
    }

    #[test]
    fn the_entry_state_passes() {
        assert_eq!(first_violation(&entry_state()), None);
        // ... and so does a long-mode guest.
        let mut s = entry_state();
        s.cr0 |= CR0_PG;
        s.cr4 |= CR4_PAE;
        s.efer = EFER_LME | EFER_LMA;
        s.entry_controls |= ENTRY_IA32E;
        s.cs_ar = 0xA09B;
        assert_eq!(first_violation(&s), None);
    }

    #[test]
    fn each_broken_field_is_named() {
        type Breaks = fn(&mut GuestState);
        let cases: [(&str, Breaks); 17] = [
            ("GUEST_CR4", |s| s.cr4 |= CR4_PCIDE),
            ("GUEST_TR_LIMIT", |s| s.tr_ar |= AR_G),
            ("GUEST_DS/ES/FS/GS_AR_BYTES", |s| s.data_ar[2] = 0xC092),
            ("GUEST_DS/ES/FS/GS_AR_BYTES", |s| s.data_ar[3] = 0xC099),
            ("GUEST_CR0", |s| s.cr0 &= !0x20),
            ("GUEST_CR0", |s| s.cr0 = CR0_PG | 0x20),
            ("GUEST_CR4", |s| s.cr4 = 0),
            ("VM_ENTRY_CONTROLS", |s| s.entry_controls |= ENTRY_IA32E),
            ("GUEST_IA32_EFER", |s| s.efer = EFER_LMA),
            ("GUEST_TR_AR_BYTES", |s| s.tr_ar = 0x89),
            ("GUEST_TR_AR_BYTES", |s| s.tr_ar = AR_UNUSABLE),
            ("GUEST_LDTR_AR_BYTES", |s| s.ldtr_ar = 0x8B),
            ("GUEST_CS_AR_BYTES", |s| s.cs_ar = 0xC093 & !AR_P),
            ("GUEST_SS_AR_BYTES", |s| s.ss_ar = 0xC09B),
            ("GUEST_RFLAGS", |s| s.rflags = 0),
            ("GUEST_ACTIVITY_STATE", |s| s.activity_state = 9),
            ("VMCS_LINK_POINTER", |s| s.link_pointer = 0),
        ];
        for (field, breaks) in cases {
            let mut s = entry_state();
            breaks(&mut s);
            let found = first_violation(&s).unwrap_or("nothing");
            assert!(found.starts_with(field), "{field}: got {found}");
        }
    }

    #[test]
    fn unrestricted_guest_allows_paging_off_and_data_cs() {
        let mut s = entry_state();
        s.cr0 = 0x20;
        s.cs_ar = 0x93;
        assert_eq!(first_violation(&s), None);
        s.secondary_controls = 0;
        assert!(first_violation(&s).unwrap().starts_with("GUEST_CR0"));
    }
}
