extern crate std;
use super::*;
use std::boxed::Box;
use std::string::ToString;
use std::vec;
use std::vec::Vec;

#[test]
fn multiboot_entry() {
    let s = InitialState::multiboot(0x10_0010, 0x2BAD_B002, 0x9000);
    assert_eq!(s.rip(), 0x10_0010);
    assert_eq!(s.gpr(Gpr::Rax), 0x2BAD_B002);
    assert_eq!(s.gpr(Gpr::Rbx), 0x9000);
    assert_eq!(s.cr0(), 0x11);
    let cs = s.code_segment();
    assert_eq!((cs.selector, cs.base, cs.limit), (0x08, 0, 0xFFFF_FFFF));
    assert_eq!(cs.access, 0xC09B);
    assert_eq!(cs.svm_attrib(), 0xC9B);
    assert_eq!(s.data_segment().selector, 0x10);
    assert_eq!(s.data_segment().svm_attrib(), 0xC93);
}

#[test]
fn linux_entry() {
    let s = InitialState::linux32(0x100_0000, 0x7000);
    assert_eq!(s.code_segment().selector, 0x10);
    assert_eq!(s.data_segment().selector, 0x18);
    assert_eq!(s.gpr(Gpr::Rsi), 0x7000);
    for r in [Gpr::Rbp, Gpr::Rdi, Gpr::Rbx] {
        assert_eq!(s.gpr(r), 0);
    }
}

#[test]
fn real_mode_entries() {
    let s = InitialState::boot_sector(0x80);
    assert_eq!((s.rip(), s.cr0(), s.gpr(Gpr::Rdx)), (0x7C00, 0x10, 0x80));
    let cs = s.code_segment();
    assert_eq!(
        (cs.selector, cs.base, cs.limit, cs.access),
        (0, 0, 0xFFFF, 0x9B)
    );
    let s = InitialState::sipi(0x9A);
    let cs = s.code_segment();
    assert_eq!((cs.selector, cs.base, s.rip()), (0x9A00, 0x9_A000, 0));
    assert_eq!(s.data_segment().svm_attrib(), 0x93);
}

#[test]
fn made_up_starts_have_reset_values() {
    for s in [
        InitialState::multiboot(0x10_0000, 0x2BAD_B002, 0),
        InitialState::boot_sector(0x80),
    ] {
        assert_eq!((s.cr3(), s.cr4(), s.efer(), s.dr7()), (0, 0, 0, 0x400));
        assert_eq!((s.rflags(), s.cpl(), s.long_mode()), (2, 0, false));
        assert_eq!(s.idt(), (0, 0x3FF));
        assert_eq!(s.segment(Seg::Tr), SegmentState::no_tss());
        let ldtr = s.segment(Seg::Ldtr);
        assert!(!ldtr.usable());
        assert_eq!(ldtr.vmx_access_rights(), 1 << 16);
        assert_eq!(s.msrs(), MsrState::POWER_ON);
        assert!(!s.sets_msrs());
        for seg in [Seg::Ss, Seg::Es, Seg::Fs, Seg::Gs] {
            assert_eq!(s.segment(seg), s.data_segment());
        }
    }
    // After INIT: GDTR and IDTR limit 0xFFFF (SDM vol. 3A, table 9-1).
    let s = InitialState::sipi(0x10);
    assert_eq!((s.gdt(), s.idt()), ((0, 0xFFFF), (0, 0xFFFF)));
    assert_eq!(SegmentState::no_tss().vmx_access_rights(), 0x8B);
    assert_eq!(SegmentState::no_tss().svm_attrib(), 0x8B);
}

/// A descriptor's first 8 bytes (SDM vol. 3A, figure 3-8) from base,
/// raw 20-bit limit and access rights in [`SegmentState::access`]'s
/// layout.
fn desc(base: u32, limit: u32, access: u16) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    (limit & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (u64::from(access & 0xFF) << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (u64::from(access >> 12) << 52)
        | ((base >> 24) << 56)
}

/// The GDT OVMF runs with (MdeModulePkg's DxeIpl / UefiCpuPkg
/// CpuDxe): 0x30 flat data, 0x38 64-bit code, no TSS, no LDT; plus a
/// 64-bit TSS at 0x48 and an LDT at 0x58 for the tests.
const GDT_BASE: u64 = 0x7F_0000;
fn uefi_gdt() -> Vec<u8> {
    let mut entries = vec![
        0,
        desc(0, 0xF_FFFF, 0xC092),     // 0x08 linear data
        desc(0, 0xF_FFFF, 0xC09A),     // 0x10 linear code (not yet accessed)
        desc(0, 0xF_FFFF, 0xC092),     // 0x18 system data
        desc(0, 0xF_FFFF, 0xC09A),     // 0x20 system code
        0,                             // 0x28 spare
        desc(0, 0xF_FFFF, 0xC093),     // 0x30 data
        desc(0, 0xF_FFFF, 0xA09B),     // 0x38 64-bit code
        0,                             // 0x40 spare
        desc(0x1234_5000, 0x67, 0x89), // 0x48 available 64-bit TSS
        0xFFFF_FFFF,                   // its base 63:32
        desc(0x2000, 0xFFF, 0x82),     // 0x58 LDT
        0x1,
        desc(0, 0xF_FFFF, 0x4093), // 0x68 data, byte granular... and not present below
        desc(0, 0xF_FFFF, 0xC013), // 0x70 not present
        desc(0, 0xF_FFFF, 0xC09B), // 0x78 32-bit code
        desc(0, 0xF_FFFF, 0xC098), // 0x80 execute-only code
    ];
    entries.push(0);
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

fn reader(gdt: &[u8]) -> impl FnMut(u64, &mut [u8]) -> bool + '_ {
    move |la, buf| {
        let Some(off) = la.checked_sub(GDT_BASE) else {
            return false;
        };
        match usize::try_from(off)
            .ok()
            .and_then(|o| gdt.get(o..o.checked_add(buf.len())?))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

fn decode(which: Seg, selector: u16) -> Result<SegmentState, SegmentError> {
    let gdt = uefi_gdt();
    let limit = (gdt.len() - 1) as u16;
    let mut read = reader(&gdt);
    decode_segment(which, selector, (GDT_BASE, limit), &mut read)
}

#[test]
fn decodes_the_uefi_segments() {
    let cs = decode(Seg::Cs, 0x38).unwrap();
    assert_eq!((cs.selector, cs.base, cs.limit), (0x38, 0, 0xFFFF_FFFF));
    assert_eq!(cs.access, 0xA09B);
    assert_eq!(cs.svm_attrib(), 0xA9B);
    assert_eq!(cs.vmx_access_rights(), 0xA09B);
    let ss = decode(Seg::Ss, 0x30).unwrap();
    assert_eq!((ss.access, ss.limit, ss.dpl()), (0xC093, 0xFFFF_FFFF, 0));
    // Loading sets the accessed bit.
    assert_eq!(decode(Seg::Ds, 0x08).unwrap().access, 0xC093);
    // TR 0: OVMF loads no TSS; VT-x still needs a usable busy one.
    let tr = decode(Seg::Tr, 0).unwrap();
    assert_eq!((tr.base, tr.limit, tr.vmx_access_rights()), (0, 0x67, 0x8B));
    // LDTR 0: unusable.
    let ldtr = decode(Seg::Ldtr, 0).unwrap();
    assert_eq!(ldtr.vmx_access_rights() & (1 << 16), 1 << 16);
    assert_eq!(ldtr.svm_attrib() & 0x80, 0);
    // Null data selectors: unusable, DPL from the RPL.
    for which in [Seg::Ss, Seg::Ds, Seg::Es, Seg::Fs, Seg::Gs] {
        let s = decode(which, 0).unwrap();
        assert!(!s.usable(), "{which:?}");
        assert_eq!(s.vmx_access_rights(), 1 << 16);
    }
    assert_eq!(decode(Seg::Gs, 3).unwrap().dpl(), 3);
}

#[test]
fn decodes_system_descriptors_of_16_bytes() {
    let tr = decode(Seg::Tr, 0x48).unwrap();
    assert_eq!(tr.base, 0xFFFF_FFFF_1234_5000);
    assert_eq!((tr.limit, tr.access), (0x67, 0x8B)); // busy now
    let ldtr = decode(Seg::Ldtr, 0x58).unwrap();
    assert_eq!(
        (ldtr.base, ldtr.limit, ldtr.access),
        (0x1_0000_2000, 0xFFF, 0x82)
    );
    // Byte granularity keeps the raw limit.
    assert_eq!(decode(Seg::Ds, 0x68).unwrap().limit, 0xF_FFFF);
}

#[test]
fn refuses_what_a_register_cannot_hold() {
    use SegmentError as E;
    let wrong = |which, sel| matches!(decode(which, sel), Err(E::WrongType { .. }));
    assert_eq!(decode(Seg::Cs, 0), Err(E::Null));
    assert_eq!(decode(Seg::Cs, 3), Err(E::Null));
    assert_eq!(decode(Seg::Ds, 0x3C), Err(E::InLdt));
    assert_eq!(decode(Seg::Cs, 0x40), Err(E::NotPresent));
    assert_eq!(decode(Seg::Ds, 0x70), Err(E::NotPresent));
    assert_eq!(
        decode(Seg::Cs, 0x78),
        Err(E::Not64BitCode { access: 0xC09B })
    );
    assert!(wrong(Seg::Cs, 0x30));
    assert!(wrong(Seg::Ss, 0x38));
    assert!(wrong(Seg::Ds, 0x80)); // execute-only code
    assert!(wrong(Seg::Tr, 0x58));
    assert!(wrong(Seg::Ldtr, 0x48));
    assert!(wrong(Seg::Tr, 0x30));
    let gdt = uefi_gdt();
    // Beyond the limit: the TSS's second half is outside.
    assert_eq!(
        decode_segment(Seg::Tr, 0x48, (GDT_BASE, 0x4F), &mut reader(&gdt)),
        Err(E::BeyondGdt { limit: 0x4F })
    );
    assert_eq!(
        decode_segment(Seg::Cs, 0x38, (GDT_BASE, 0x3E), &mut reader(&gdt)),
        Err(E::BeyondGdt { limit: 0x3E })
    );
    assert_eq!(
        decode_segment(Seg::Cs, 0x38, (0x1000, 0xFFFF), &mut reader(&gdt)),
        Err(E::Unreadable { addr: 0x1038 })
    );
}

fn uefi_regs() -> LoaderRegs {
    let gdt_len = uefi_gdt().len() as u16;
    LoaderRegs {
        rip: 0x7E12_3456,
        rflags: 0x202,
        cr0: 0x8001_0033,
        cr3: 0x7FC0_1000,
        cr4: 0x668,
        efer: 0xD00,
        dr7: 0x400,
        gdt: (GDT_BASE, gdt_len - 1),
        idt: (0x7F_1000, 0xFFF),
        selectors: [0x38, 0x30, 0x30, 0x30, 0x30, 0x30, 0, 0],
        fs_base: 0x1000,
        gs_base: 0xFFFF_8000_0000_0000,
        msrs: MsrState {
            star: 0x0023_0010_0000_0000,
            lstar: 0xFFFF_FFFF_8100_0000,
            sysenter_cs: 0x10,
            ..MsrState::POWER_ON
        },
    }
}

fn resume(regs: &LoaderRegs) -> Result<ResumedState, ResumeRefusal> {
    let gdt = uefi_gdt();
    let mut read = reader(&gdt);
    ResumedState::new(regs, &mut read)
}

#[test]
fn a_uefi_state_resumes() {
    let regs = uefi_regs();
    let state: &'static ResumedState = Box::leak(Box::new(resume(&regs).unwrap()));
    let mut gprs = [0u64; 16];
    gprs[Gpr::Rsp as usize] = 0x7FF0_0000;
    gprs[Gpr::Rcx as usize] = 0x55;
    let s = InitialState::resumed(state, gprs);
    assert_eq!(s.rip(), 0x7E12_3456);
    assert_eq!(s.rflags(), 0x202);
    assert_eq!(
        (s.cr0(), s.cr3(), s.cr4(), s.efer()),
        (0x8001_0033, 0x7FC0_1000, 0x668, 0xD00)
    );
    assert!(s.long_mode());
    assert_eq!((s.gdt(), s.idt()), (regs.gdt, (0x7F_1000, 0xFFF)));
    assert_eq!(s.segment(Seg::Cs).access, 0xA09B);
    assert_eq!(s.segment(Seg::Fs).base, 0x1000);
    assert_eq!(s.segment(Seg::Gs).base, 0xFFFF_8000_0000_0000);
    assert_eq!(s.segment(Seg::Tr), SegmentState::no_tss());
    assert!(!s.segment(Seg::Ldtr).usable());
    assert_eq!(s.cpl(), 0);
    assert!(s.sets_msrs());
    assert_eq!(s.msrs().lstar, 0xFFFF_FFFF_8100_0000);
    assert_eq!(s.gpr(Gpr::Rcx), 0x55);
    assert_eq!(s.gpr(Gpr::Rsp), 0x7FF0_0000);
    assert_eq!(s.dr7(), 0x400);
    // RFLAGS bit 1 is always set.
    let r = resume(&LoaderRegs {
        rflags: 0x200,
        ..regs
    })
    .unwrap();
    assert_eq!(r.rflags, 0x202);
}

#[test]
fn hostile_loader_states_are_refused() {
    let ok = uefi_regs();
    let refused = |r: LoaderRegs| resume(&r).unwrap_err();
    assert_eq!(
        refused(LoaderRegs { efer: 0x900, ..ok }),
        ResumeRefusal::NotLongMode
    );
    assert_eq!(
        refused(LoaderRegs { cr0: 0x11, ..ok }),
        ResumeRefusal::NotLongMode
    );
    assert_eq!(
        refused(LoaderRegs { cr4: 0x648, ..ok }),
        ResumeRefusal::NotLongMode
    );
    assert!(matches!(
        refused(LoaderRegs { rip: 1 << 47, ..ok }),
        ResumeRefusal::NonCanonical { what: "RIP", .. }
    ));
    let msrs = MsrState {
        lstar: 0x8000_0000_0000_0000,
        ..ok.msrs
    };
    assert!(matches!(
        refused(LoaderRegs { msrs, ..ok }),
        ResumeRefusal::NonCanonical { what: "LSTAR", .. }
    ));
    assert!(matches!(
        refused(LoaderRegs {
            rflags: 0x2_0202,
            ..ok
        }),
        ResumeRefusal::Reserved { what: "RFLAGS", .. }
    ));
    assert!(matches!(
        refused(LoaderRegs { dr7: 1 << 32, ..ok }),
        ResumeRefusal::Reserved { what: "DR7", .. }
    ));
    for pat in [
        0x0007_0406_0007_0401,
        0x0007_0406_0007_0402,
        0x0807_0406_0007_0406,
    ] {
        let msrs = MsrState { pat, ..ok.msrs };
        assert_eq!(refused(LoaderRegs { msrs, ..ok }), ResumeRefusal::Pat(pat));
    }
    let mut selectors = ok.selectors;
    selectors[Seg::Cs as usize] = 0x3B;
    assert_eq!(
        refused(LoaderRegs { selectors, ..ok }),
        ResumeRefusal::NotRing0
    );
    selectors[Seg::Cs as usize] = 0x78;
    assert!(matches!(
        refused(LoaderRegs { selectors, ..ok }),
        ResumeRefusal::Segment {
            which: Seg::Cs,
            selector: 0x78,
            ..
        }
    ));
    // Every refusal is a sentence for the boot log.
    let s = refused(LoaderRegs { selectors, ..ok }).to_string();
    assert!(s.starts_with("the loader's CS (0x78): "), "{s}");
}

proptest::proptest! {
    /// Whatever the table and the selector, decoding ends without a
    /// panic, and what it gives a backend is loadable: a usable code or
    /// data segment is present and accessed, TR a present busy TSS, a
    /// null selector (but CS's) unusable.
    #[test]
    fn decoding_hostile_tables(
        table in proptest::collection::vec(proptest::num::u8::ANY, 0..160),
        selector in proptest::num::u16::ANY,
        limit in proptest::num::u16::ANY,
        which in 0usize..8,
    ) {
        let which = Seg::ALL[which];
        let got = decode_segment(which, selector, (GDT_BASE, limit), &mut reader(&table));
        if let Ok(s) = got {
            match which {
                Seg::Tr => {
                    proptest::prop_assert!(s.usable());
                    proptest::prop_assert_eq!(s.access & 0x1F, 0xB);
                }
                Seg::Ldtr if s.usable() => {
                    proptest::prop_assert_eq!(s.access & 0x1F, 0x2);
                }
                Seg::Cs => {
                    proptest::prop_assert!(s.usable());
                    proptest::prop_assert_eq!(s.access & 0x6019, 0x2019);
                }
                _ if s.usable() => {
                    proptest::prop_assert_eq!(s.access & 0x11, 0x11);
                }
                _ => {}
            }
            if selector & !3 == 0 && which != Seg::Tr {
                proptest::prop_assert!(!s.usable());
            }
        }
        if selector & !3 == 0 && which != Seg::Cs {
            proptest::prop_assert!(got.is_ok());
        }
    }

    /// A present data descriptor decodes to its fields, limit scaled by G.
    #[test]
    fn data_descriptors_round_trip(
        base in proptest::num::u32::ANY,
        limit in 0u32..0x10_0000,
        flags in 0u16..16,
        ty in proptest::sample::select(vec![0u16, 1, 2, 3, 4, 5, 6, 7, 0xA, 0xB, 0xE, 0xF]),
        dpl in 0u16..4,
    ) {
        let access = (flags << 12) | 0x90 | (dpl << 5) | ty;
        let mut gdt = vec![0u8; 8];
        gdt.extend_from_slice(&desc(base, limit, access).to_le_bytes());
        let s = decode_segment(Seg::Ds, 0x8 | dpl, (GDT_BASE, 15), &mut reader(&gdt)).unwrap();
        let limit = if flags & 8 != 0 { (limit << 12) | 0xFFF } else { limit };
        proptest::prop_assert_eq!((s.base, s.limit, s.access), (u64::from(base), limit, access | 1));
    }
}

proptest::proptest! {
    /// Any loader registers: a refusal or a state whose every value the
    /// backends can load (canonical bases, DR7 in 32 bits, RFLAGS bit 1,
    /// CPL 0), never a panic.
    #[test]
    fn hostile_loader_registers(
        words in proptest::array::uniform16(proptest::num::u64::ANY),
        selectors in proptest::array::uniform8(proptest::num::u16::ANY),
        limit in proptest::num::u16::ANY,
        near_uefi in proptest::bool::ANY,
    ) {
        let base = uefi_regs();
        let regs = if near_uefi {
            // Mostly the UEFI state, a few fields hostile.
            LoaderRegs {
                rflags: words[0] & 0x3F_FFFF,
                dr7: words[1] & 0x1_FFFF_FFFF,
                selectors: [selectors[0] & 0x7F, 0x30, 0x30, selectors[3] & 0x7F, 0x30, 0x30, selectors[6] & 0x7F, selectors[7] & 0x7F],
                msrs: MsrState { pat: words[2], ..base.msrs },
                ..base
            }
        } else {
            LoaderRegs {
                rip: words[0],
                rflags: words[1],
                cr0: words[2],
                cr3: words[3],
                cr4: words[4],
                efer: words[5],
                dr7: words[6],
                gdt: (GDT_BASE, limit),
                idt: (words[7], limit),
                selectors,
                fs_base: words[8],
                gs_base: words[9],
                msrs: MsrState {
                    pat: words[10],
                    kernel_gs_base: words[11],
                    star: words[12],
                    lstar: words[13],
                    cstar: words[14],
                    sfmask: words[15],
                    ..base.msrs
                },
            }
        };
        if let Ok(s) = resume(&regs) {
            proptest::prop_assert_eq!(s.dr7 >> 32, 0);
            proptest::prop_assert_eq!(s.rflags & 2, 2);
            proptest::prop_assert!(s.segments[Seg::Cs as usize].usable());
            proptest::prop_assert_eq!(s.segments[Seg::Ss as usize].dpl(), 0);
            proptest::prop_assert!(s.segments[Seg::Tr as usize].usable());
            proptest::prop_assert_ne!(s.msrs.pat & 7, 1);
        }
    }
}
