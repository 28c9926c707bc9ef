//! The guest-state area for a guest that starts in an [`InitialState`]:
//! one list of VMCS fields, written by [`crate::setup_vmcs`] for the
//! first entry and by [`crate::VmxVcpu`]'s `reset` after INIT and SIPI,
//! and checked on the host against [`crate::guest_check`].
//!
//! The rest is the caller's: EFER (the GUEST_IA32_EFER field or the MSR
//! area, by the negotiated path), the "IA-32e mode guest" entry control
//! ([`ia32e_entry`]), the activity state, the SYSENTER fields, which
//! INIT leaves alone ([`sysenter_fields`]), and the MSRs VT-x does not
//! switch at all ([`load_shared_msrs`]).

use crate::caps::entry;
use crate::vcpu::CrPolicy;
use crate::vmcs::VmcsField as F;
use thinvisor_vmm::{Gpr, InitialState, MsrState, Seg, StartMode};

/// How many fields [`guest_fields`] gives.
pub const GUEST_FIELDS: usize = 47;

/// The VMCS fields of one segment register: selector, base, limit,
/// access rights.
const fn segment_fields(which: Seg) -> [F; 4] {
    match which {
        Seg::Cs => [
            F::GUEST_CS_SELECTOR,
            F::GUEST_CS_BASE,
            F::GUEST_CS_LIMIT,
            F::GUEST_CS_AR_BYTES,
        ],
        Seg::Ss => [
            F::GUEST_SS_SELECTOR,
            F::GUEST_SS_BASE,
            F::GUEST_SS_LIMIT,
            F::GUEST_SS_AR_BYTES,
        ],
        Seg::Ds => [
            F::GUEST_DS_SELECTOR,
            F::GUEST_DS_BASE,
            F::GUEST_DS_LIMIT,
            F::GUEST_DS_AR_BYTES,
        ],
        Seg::Es => [
            F::GUEST_ES_SELECTOR,
            F::GUEST_ES_BASE,
            F::GUEST_ES_LIMIT,
            F::GUEST_ES_AR_BYTES,
        ],
        Seg::Fs => [
            F::GUEST_FS_SELECTOR,
            F::GUEST_FS_BASE,
            F::GUEST_FS_LIMIT,
            F::GUEST_FS_AR_BYTES,
        ],
        Seg::Gs => [
            F::GUEST_GS_SELECTOR,
            F::GUEST_GS_BASE,
            F::GUEST_GS_LIMIT,
            F::GUEST_GS_AR_BYTES,
        ],
        Seg::Tr => [
            F::GUEST_TR_SELECTOR,
            F::GUEST_TR_BASE,
            F::GUEST_TR_LIMIT,
            F::GUEST_TR_AR_BYTES,
        ],
        Seg::Ldtr => [
            F::GUEST_LDTR_SELECTOR,
            F::GUEST_LDTR_BASE,
            F::GUEST_LDTR_LIMIT,
            F::GUEST_LDTR_AR_BYTES,
        ],
    }
}

/// The guest-state fields for a guest that starts in `initial` (SDM vol.
/// 3C, 25.4): control registers through `policy` (the real registers
/// keep the bits VMX fixes; the CR0 read shadow shows the real CR0, NE
/// included, so that ordinary read-modify-write sequences never exit —
/// except for a resumed 64-bit state, which reads back exactly what its
/// loader had (a guest write that keeps NE as it reads does not exit);
/// the CR4 shadow the guest's own value, VMXE hidden), DR7, RSP, RIP,
/// RFLAGS, every segment with its access rights (unusable bit for a
/// null selector's), GDTR, IDTR, no blocking and no pending debug
/// exception. The SYSENTER MSRs are [`sysenter_fields`].
pub fn guest_fields(initial: &InitialState, policy: &CrPolicy) -> [(F, u64); GUEST_FIELDS] {
    let cr0_real = policy.real_cr0(initial.cr0());
    let cr4 = initial.cr4();
    let (gdt_base, gdt_limit) = initial.gdt();
    let (idt_base, idt_limit) = initial.idt();
    let mut out = [(F::GUEST_CR0, 0); GUEST_FIELDS];
    let fixed = [
        (F::GUEST_CR0, cr0_real),
        (
            F::CR0_READ_SHADOW,
            if matches!(initial.mode, StartMode::Long64(_)) {
                initial.cr0()
            } else {
                cr0_real
            },
        ),
        (F::GUEST_CR3, initial.cr3()),
        (F::GUEST_CR4, policy.real_cr4(cr4)),
        (F::CR4_READ_SHADOW, cr4),
        (F::GUEST_DR7, initial.dr7()),
        (F::GUEST_RSP, initial.gpr(Gpr::Rsp)),
        (F::GUEST_RIP, initial.rip()),
        (F::GUEST_RFLAGS, initial.rflags()),
        (F::GUEST_GDTR_BASE, gdt_base),
        (F::GUEST_GDTR_LIMIT, gdt_limit.into()),
        (F::GUEST_IDTR_BASE, idt_base),
        (F::GUEST_IDTR_LIMIT, idt_limit.into()),
        (F::GUEST_INTERRUPTIBILITY_INFO, 0),
        (F::GUEST_PENDING_DBG_EXCEPTIONS, 0),
    ];
    out[..fixed.len()].copy_from_slice(&fixed);
    let mut i = fixed.len();
    for which in Seg::ALL {
        let s = initial.segment(which);
        let [sel, base, limit, ar] = segment_fields(which);
        for (field, value) in [
            (sel, u64::from(s.selector)),
            (base, s.base),
            (limit, u64::from(s.limit)),
            (ar, u64::from(s.vmx_access_rights())),
        ] {
            out[i] = (field, value);
            i += 1;
        }
    }
    debug_assert_eq!(i, GUEST_FIELDS);
    out
}

/// The SYSENTER MSRs' guest-state fields (loaded on entry, saved on
/// exit): written at power-on and for a start that sets its MSRs; INIT
/// leaves them alone (SDM vol. 3A, table 9-1).
pub fn sysenter_fields(initial: &InitialState) -> [(F, u64); 3] {
    let m = initial.msrs();
    [
        (F::GUEST_SYSENTER_CS, m.sysenter_cs),
        (F::GUEST_SYSENTER_ESP, m.sysenter_esp),
        (F::GUEST_SYSENTER_EIP, m.sysenter_eip),
    ]
}

/// `entry_controls` with "IA-32e mode guest" as `initial` needs it: set
/// exactly when EFER.LMA is (SDM vol. 3C, 27.3.1.1).
pub fn ia32e_entry(entry_controls: u64, initial: &InitialState) -> u64 {
    let ia32e = u64::from(entry::IA32E_MODE_GUEST);
    if initial.long_mode() {
        entry_controls | ia32e
    } else {
        entry_controls & !ia32e
    }
}

/// MSR numbers (SDM vol. 4, table 2-2).
const IA32_PAT: u32 = 0x277;
const IA32_STAR: u32 = 0xC000_0081;
const IA32_LSTAR: u32 = 0xC000_0082;
const IA32_CSTAR: u32 = 0xC000_0083;
const IA32_FMASK: u32 = 0xC000_0084;
const IA32_KERNEL_GS_BASE: u32 = 0xC000_0102;

/// The MSRs of `msrs` that VT-x neither loads nor saves, as (MSR, value):
/// the SYSCALL MSRs and KernelGSBase, which thinvisor's host never uses
/// (no SYSCALL, no SWAPGS), and the PAT unless the "load IA32_PAT" entry
/// control gives the guest its own (`pat_in_vmcs`; thinvisor otherwise
/// shares it, its entry 0 checked, crate::msr_bitmap).
pub fn shared_msrs(msrs: &MsrState, pat_in_vmcs: bool) -> ([(u32, u64); 6], usize) {
    let list = [
        (IA32_KERNEL_GS_BASE, msrs.kernel_gs_base),
        (IA32_STAR, msrs.star),
        (IA32_LSTAR, msrs.lstar),
        (IA32_CSTAR, msrs.cstar),
        (IA32_FMASK, msrs.sfmask),
        (IA32_PAT, msrs.pat),
    ];
    (list, if pat_in_vmcs { 5 } else { 6 })
}

/// Put the MSRs VT-x does not switch ([`shared_msrs`]) into this
/// processor, for a start that sets them.
///
/// # Safety
/// The values must be ones WRMSR accepts: canonical addresses in
/// KernelGSBase, LSTAR and CSTAR, SFMASK bits 63:32 clear, a PAT of
/// defined types (what `thinvisor_vmm::ResumedState::new` checks); the
/// PAT's entry 0 must not be write-combining (thinvisor's own mappings
/// use it).
pub unsafe fn load_shared_msrs(initial: &InitialState, pat_in_vmcs: bool) {
    if !initial.sets_msrs() {
        return;
    }
    let (list, n) = shared_msrs(&initial.msrs(), pat_in_vmcs);
    for &(msr, value) in &list[..n] {
        // SAFETY: the caller guarantees WRMSR accepts the value; none of
        // these MSRs is one the host relies on (see shared_msrs).
        unsafe { x86_64::registers::model_specific::Msr::new(msr).write(value) };
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::guest_check::{first_violation, GuestState};
    use std::boxed::Box;
    use std::vec::Vec;
    use thinvisor_vmm::initial::LoaderRegs;
    use thinvisor_vmm::ResumedState;

    /// Bochs' fixed CR0/CR4 bits (IA32_VMX_CR0_FIXED0/1, CR4_FIXED0/1).
    const BOCHS: CrPolicy = CrPolicy {
        cr0_must1: 0x8000_0021,
        cr0_may1: 0xFFFF_FFFF,
        cr4_must1: 0x2000,
        cr4_may1: 0x0037_27FF,
    };
    /// Entry controls as negotiated on Bochs' Skylake-X (load debug
    /// controls, load EFER, the default1 bits).
    const ENTRY: u64 = 0x11FB | (1 << 15);
    const UNRESTRICTED_GUEST: u64 = 1 << 7;

    fn value(fields: &[(F, u64)], field: F) -> u64 {
        fields
            .iter()
            .find(|(f, _)| *f == field)
            .map(|&(_, v)| v)
            .unwrap_or_else(|| panic!("field {:#x} not written", field.0))
    }

    /// What the guest-state checks see after [`guest_fields`] and the
    /// caller's EFER and entry control.
    fn checked(initial: &InitialState) -> (GuestState, [(F, u64); GUEST_FIELDS]) {
        let f = guest_fields(initial, &BOCHS);
        let state = GuestState {
            cr0: value(&f, F::GUEST_CR0),
            cr4: value(&f, F::GUEST_CR4),
            efer: initial.efer(),
            rflags: value(&f, F::GUEST_RFLAGS),
            entry_controls: ia32e_entry(ENTRY, initial),
            secondary_controls: UNRESTRICTED_GUEST,
            cs_ar: value(&f, F::GUEST_CS_AR_BYTES),
            ss_ar: value(&f, F::GUEST_SS_AR_BYTES),
            data_ar: [
                value(&f, F::GUEST_DS_AR_BYTES),
                value(&f, F::GUEST_ES_AR_BYTES),
                value(&f, F::GUEST_FS_AR_BYTES),
                value(&f, F::GUEST_GS_AR_BYTES),
            ],
            tr_ar: value(&f, F::GUEST_TR_AR_BYTES),
            tr_limit: value(&f, F::GUEST_TR_LIMIT),
            ldtr_ar: value(&f, F::GUEST_LDTR_AR_BYTES),
            activity_state: 0,
            interruptibility: value(&f, F::GUEST_INTERRUPTIBILITY_INFO),
            link_pointer: u64::MAX,
            cr0_fixed: (BOCHS.cr0_must1, BOCHS.cr0_may1),
            cr4_fixed: (BOCHS.cr4_must1, BOCHS.cr4_may1),
        };
        (state, f)
    }

    /// OVMF's GDT: 0x30 flat data, 0x38 64-bit code; no TSS, no LDT.
    fn uefi_gdt() -> Vec<u8> {
        [
            0u64,
            0x00CF_9200_0000_FFFF,
            0x00CF_9F00_0000_FFFF,
            0x00CF_9300_0000_FFFF,
            0x00CF_9A00_0000_FFFF,
            0,
            0x00CF_9300_0000_FFFF,
            0x00AF_9A00_0000_FFFF, // not yet accessed in memory
            0,
        ]
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect()
    }

    /// The state thinvisor.efi hands over under OVMF: CS 0x38 64-bit
    /// code, SS and DS 0x30, TR 0, CR0 0x80010033, CR4 0x668, EFER 0xD00.
    fn uefi_state() -> InitialState {
        let gdt = uefi_gdt();
        let regs = LoaderRegs {
            rip: 0x7E5A_1234,
            rflags: 0x246,
            cr0: 0x8001_0033,
            cr3: 0x7FC0_1000,
            cr4: 0x668,
            efer: 0xD00,
            dr7: 0x400,
            gdt: (0x7F9D_C000, (gdt.len() - 1) as u16),
            idt: (0x7F1A_0018, 0xFFF),
            selectors: [0x38, 0x30, 0x30, 0x30, 0x30, 0x30, 0, 0],
            fs_base: 0,
            gs_base: 0,
            msrs: MsrState::POWER_ON,
        };
        let mut read = |la: u64, buf: &mut [u8]| {
            let off = (la - 0x7F9D_C000) as usize;
            match gdt.get(off..off + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        };
        let state = ResumedState::new(&regs, &mut read).unwrap();
        let mut gprs = [0; 16];
        gprs[Gpr::Rsp as usize] = 0x7FF8_0F28;
        InitialState::resumed(Box::leak(Box::new(state)), gprs)
    }

    #[test]
    fn a_uefi_state_passes_the_entry_checks() {
        let initial = uefi_state();
        let (state, f) = checked(&initial);
        assert_eq!(first_violation(&state), None);
        assert_ne!(state.entry_controls & u64::from(entry::IA32E_MODE_GUEST), 0);
        assert_eq!(value(&f, F::GUEST_CR0), 0x8001_0033);
        assert_eq!(value(&f, F::CR0_READ_SHADOW), 0x8001_0033);
        assert_eq!(value(&f, F::GUEST_CR4), 0x2668); // VMXE for VMX
        assert_eq!(value(&f, F::CR4_READ_SHADOW), 0x668); // ...hidden
        assert_eq!(value(&f, F::GUEST_CR3), 0x7FC0_1000);
        assert_eq!(value(&f, F::GUEST_RIP), 0x7E5A_1234);
        assert_eq!(value(&f, F::GUEST_RSP), 0x7FF8_0F28);
        assert_eq!(value(&f, F::GUEST_RFLAGS), 0x246); // IF as the loader had it
        assert_eq!(value(&f, F::GUEST_CS_AR_BYTES), 0xA09B);
        assert_eq!(value(&f, F::GUEST_SS_AR_BYTES), 0xC093);
        assert_eq!(value(&f, F::GUEST_TR_AR_BYTES), 0x8B);
        assert_eq!(value(&f, F::GUEST_TR_LIMIT), 0x67);
        assert_eq!(value(&f, F::GUEST_LDTR_AR_BYTES), 1 << 16);
        assert_eq!(value(&f, F::GUEST_GDTR_BASE), 0x7F9D_C000);
        assert_eq!(value(&f, F::GUEST_IDTR_BASE), 0x7F1A_0018);
        assert_eq!(value(&f, F::GUEST_IDTR_LIMIT), 0xFFF);
        // Null FS and GS: unusable, which IA-32e mode allows.
        let uefi_null_fs = {
            let mut s = checked(&initial).0;
            s.data_ar[2] = 1 << 16;
            s
        };
        assert_eq!(first_violation(&uefi_null_fs), None);
    }

    #[test]
    fn every_made_up_start_passes_the_entry_checks() {
        for initial in [
            InitialState::multiboot(0x10_0000, 0x2BAD_B002, 0x9000),
            InitialState::linux32(0x100_0000, 0x7000),
            InitialState::boot_sector(0x80),
            InitialState::sipi(0x9A),
        ] {
            let (state, f) = checked(&initial);
            assert_eq!(first_violation(&state), None, "{initial:?}");
            assert_eq!(state.entry_controls & u64::from(entry::IA32E_MODE_GUEST), 0);
            assert_eq!(value(&f, F::GUEST_CR3), 0);
            assert_eq!(value(&f, F::GUEST_DR7), 0x400);
            assert_eq!(value(&f, F::GUEST_LDTR_AR_BYTES), 1 << 16);
        }
        let sipi = guest_fields(&InitialState::sipi(0x9A), &BOCHS);
        assert_eq!(value(&sipi, F::GUEST_GDTR_LIMIT), 0xFFFF);
        assert_eq!(value(&sipi, F::GUEST_CS_BASE), 0x9_A000);
    }

    #[test]
    fn shared_msrs_leave_the_pat_to_the_vmcs_when_it_can() {
        let m = MsrState {
            lstar: 0xFFFF_8000_0000_1000,
            ..MsrState::POWER_ON
        };
        let (list, n) = shared_msrs(&m, false);
        assert_eq!(n, 6);
        assert!(list[..n].contains(&(IA32_LSTAR, 0xFFFF_8000_0000_1000)));
        assert!(list[..n].contains(&(IA32_PAT, MsrState::POWER_ON.pat)));
        let (list, n) = shared_msrs(&m, true);
        assert!(list[..n].iter().all(|&(msr, _)| msr != IA32_PAT));
    }
}
