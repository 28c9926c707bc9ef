//! Capability sets derived from a Bochs model by taking features away.

mod common;

use common::{satisfies, SKYLAKE_X};
use std::cell::RefCell;
use thinvisor_vmx::caps::{
    describe, entry, ept_vpid, exit, msr, negotiate, proc, proc2, ControlWord, EferPath,
    EferPreference, NegotiationError, VmxCapabilities,
};

fn base() -> VmxCapabilities {
    SKYLAKE_X.caps()
}

/// Clear allowed-1 bits of a control capability word.
fn forbid(cap: u64, bits: u32) -> u64 {
    cap & !(u64::from(bits) << 32)
}

fn with_proc2_forbidden(bits: u32) -> VmxCapabilities {
    let mut c = base();
    c.procbased2 = c.procbased2.map(|v| forbid(v, bits));
    c
}

fn with_ept_cap_cleared(bits: u64) -> VmxCapabilities {
    let mut c = base();
    c.ept_vpid = c.ept_vpid.map(|v| v & !bits);
    c
}

fn err(caps: &VmxCapabilities) -> NegotiationError {
    negotiate(caps, EferPreference::Auto).expect_err("negotiation should fail")
}

#[test]
fn no_ept_is_an_error_naming_ept() {
    let e = err(&with_proc2_forbidden(proc2::ENABLE_EPT));
    assert_eq!(e.word, ControlWord::Secondary);
    assert_eq!(e.missing, u64::from(proc2::ENABLE_EPT));
    assert_eq!(
        e.to_string(),
        "VT-x secondary controls: EPT (bit 1) not supported"
    );
}

#[test]
fn no_unrestricted_guest_is_an_error() {
    let e = err(&with_proc2_forbidden(proc2::UNRESTRICTED_GUEST));
    assert_eq!(
        e.to_string(),
        "VT-x secondary controls: unrestricted guest (bit 7) not supported"
    );
}

#[test]
fn no_secondary_controls_at_all_is_an_error() {
    // The MSR cannot be read: no secondary control is allowed.
    let mut caps = base();
    caps.procbased2 = None;
    let e = err(&caps);
    assert_eq!(e.word, ControlWord::Secondary);
    assert_eq!(
        e.to_string(),
        "VT-x secondary controls: EPT (bit 1), unrestricted guest (bit 7) not supported"
    );

    // "Activate secondary controls" may not be 1: read() does not even try
    // PROCBASED_CTLS2 or EPT_VPID_CAP, and the primary word fails.
    let asked = RefCell::new(Vec::new());
    let caps = VmxCapabilities::read(|m| {
        asked.borrow_mut().push(m);
        let v = SKYLAKE_X.rdmsr(m)?;
        Some(match m {
            msr::IA32_VMX_PROCBASED_CTLS | msr::IA32_VMX_TRUE_PROCBASED_CTLS => {
                forbid(v, proc::ACTIVATE_SECONDARY)
            }
            _ => v,
        })
    });
    assert!(!asked.borrow().contains(&msr::IA32_VMX_PROCBASED_CTLS2));
    assert!(!asked.borrow().contains(&msr::IA32_VMX_EPT_VPID_CAP));
    assert_eq!(caps.procbased2, None);
    assert_eq!(caps.ept_vpid, None);
    let e = err(&caps);
    assert_eq!(e.word, ControlWord::Primary);
    assert_eq!(
        e.to_string(),
        "VT-x primary processor-based controls: activate secondary controls (bit 31) not supported"
    );
}

#[test]
fn missing_primary_or_exit_requirements() {
    let mut caps = base();
    caps.true_procbased = caps
        .true_procbased
        .map(|v| forbid(v, proc::HLT_EXITING | proc::USE_MSR_BITMAPS));
    let e = err(&caps);
    assert_eq!(e.word, ControlWord::Primary);
    assert_eq!(
        e.to_string(),
        "VT-x primary processor-based controls: HLT exiting (bit 7), MSR bitmaps (bit 28) not supported"
    );

    let mut caps = base();
    caps.true_exit = caps
        .true_exit
        .map(|v| forbid(v, exit::HOST_ADDRESS_SPACE_SIZE));
    let e = err(&caps);
    assert_eq!(e.word, ControlWord::Exit);
    assert!(e.to_string().contains("(bit 9) not supported"), "{e}");
}

#[test]
fn ept_capabilities_required() {
    for (bit, text) in [
        (ept_vpid::PAGE_WALK_4, "4-level page walk (bit 6)"),
        (
            ept_vpid::MEMORY_TYPE_WB,
            "write-back paging structures (bit 14)",
        ),
        (ept_vpid::INVEPT, "INVEPT (bit 20)"),
    ] {
        let e = err(&with_ept_cap_cleared(bit));
        assert_eq!(e.word, ControlWord::EptVpid);
        assert_eq!(e.missing, bit);
        assert_eq!(
            e.to_string(),
            format!("VT-x EPT capabilities: {text} not supported")
        );
    }
    let e = err(&with_ept_cap_cleared(
        ept_vpid::INVEPT_SINGLE | ept_vpid::INVEPT_ALL,
    ));
    assert_eq!(
        e.to_string(),
        "VT-x EPT capabilities: single-context or all-context INVEPT (bit 25 or 26) not supported"
    );
    // Without the MSR, everything EPT needs is missing.
    let mut caps = base();
    caps.ept_vpid = None;
    let e = err(&caps);
    assert_eq!(e.word, ControlWord::EptVpid);
    assert_eq!(
        e.to_string(),
        "VT-x EPT capabilities: single-context or all-context INVEPT (bit 25 or 26), \
         4-level page walk (bit 6), write-back paging structures (bit 14), INVEPT (bit 20) not supported"
    );
}

#[test]
fn one_invept_type_is_enough() {
    for (gone, single, all) in [
        (ept_vpid::INVEPT_SINGLE, false, true),
        (ept_vpid::INVEPT_ALL, true, false),
    ] {
        let c = negotiate(&with_ept_cap_cleared(gone), EferPreference::Auto).unwrap();
        assert_eq!((c.invept_single, c.invept_all), (single, all));
    }
}

#[test]
fn large_pages_and_ad_follow_the_capability() {
    let c = negotiate(
        &with_ept_cap_cleared(ept_vpid::PAGES_2M | ept_vpid::PAGES_1G | ept_vpid::ACCESSED_DIRTY),
        EferPreference::Auto,
    )
    .unwrap();
    assert!(!c.ept_2m && !c.ept_1g && !c.ept_ad);
    let text = describe(&c).to_string();
    assert!(text.contains("2M pages no, 1G pages no, A/D no"), "{text}");
}

#[test]
fn no_vpid_is_fine() {
    let variants = [
        with_proc2_forbidden(proc2::ENABLE_VPID),
        with_ept_cap_cleared(ept_vpid::INVVPID),
        with_ept_cap_cleared(ept_vpid::INVVPID_SINGLE | ept_vpid::INVVPID_ALL),
    ];
    for caps in variants {
        let c = negotiate(&caps, EferPreference::Auto).unwrap();
        assert!(!c.vpid);
        assert_eq!(c.procbased2 & proc2::ENABLE_VPID, 0);
        assert!(!c.invvpid_single && !c.invvpid_all);
        assert_ne!(c.procbased2 & proc2::ENABLE_EPT, 0);
        assert!(describe(&c).to_string().contains("VPID off"));
    }
    // One INVVPID type is enough.
    let c = negotiate(
        &with_ept_cap_cleared(ept_vpid::INVVPID_SINGLE),
        EferPreference::Auto,
    )
    .unwrap();
    assert!(c.vpid && !c.invvpid_single && c.invvpid_all);
}

#[test]
fn desired_secondary_controls_are_dropped_quietly() {
    let gone = proc2::ENABLE_RDTSCP | proc2::ENABLE_INVPCID | proc2::ENABLE_XSAVES;
    let c = negotiate(&with_proc2_forbidden(gone), EferPreference::Auto).unwrap();
    assert_eq!(c.procbased2 & gone, 0);
    assert_ne!(c.procbased2 & proc2::UNRESTRICTED_GUEST, 0);
}

#[test]
fn efer_controls_only_as_a_complete_set() {
    let exit_efer = exit::SAVE_IA32_EFER | exit::LOAD_IA32_EFER;
    type Edit = fn(&mut VmxCapabilities);
    let edits: [(&str, Edit); 4] = [
        ("all three", |c| {
            c.true_exit = c
                .true_exit
                .map(|v| forbid(v, exit::SAVE_IA32_EFER | exit::LOAD_IA32_EFER));
            c.exit = forbid(c.exit, exit::SAVE_IA32_EFER | exit::LOAD_IA32_EFER);
            c.true_entry = c.true_entry.map(|v| forbid(v, entry::LOAD_IA32_EFER));
            c.entry = forbid(c.entry, entry::LOAD_IA32_EFER);
        }),
        ("entry load", |c| {
            c.true_entry = c.true_entry.map(|v| forbid(v, entry::LOAD_IA32_EFER));
        }),
        ("exit save", |c| {
            c.true_exit = c.true_exit.map(|v| forbid(v, exit::SAVE_IA32_EFER));
        }),
        ("exit load", |c| {
            c.true_exit = c.true_exit.map(|v| forbid(v, exit::LOAD_IA32_EFER));
        }),
    ];
    for (what, edit) in edits {
        let mut caps = base();
        edit(&mut caps);
        for pref in [EferPreference::Auto, EferPreference::MsrArea] {
            let c = negotiate(&caps, pref).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(c.efer, EferPath::MsrAreas, "{what} {pref:?}");
            assert_eq!(c.exit & exit_efer, 0, "{what}");
            assert_eq!(c.entry & entry::LOAD_IA32_EFER, 0, "{what}");
            assert!(satisfies(caps.true_exit.unwrap(), c.exit));
            assert!(satisfies(caps.true_entry.unwrap(), c.entry));
        }
    }
}

#[test]
fn basic_bit_55_clear_ignores_true_msrs() {
    let mut caps = base();
    caps.basic &= !(1 << 55);
    // TRUE values that would forbid everything: they must not be consulted.
    caps.true_pinbased = Some(0);
    caps.true_procbased = Some(0);
    caps.true_exit = Some(0);
    caps.true_entry = Some(0);
    assert!(!caps.uses_true_msrs());
    let c = negotiate(&caps, EferPreference::Auto).unwrap();
    assert!(satisfies(caps.pinbased, c.pinbased));
    assert!(satisfies(caps.procbased, c.procbased));
    assert!(satisfies(caps.exit, c.exit));
    assert!(satisfies(caps.entry, c.entry));
    // The plain MSR forces the default1 CR3 exits on.
    let cr3 = proc::CR3_LOAD_EXITING | proc::CR3_STORE_EXITING;
    assert_eq!(c.procbased & cr3, cr3);
    assert_eq!(c.efer, EferPath::VmcsControls);

    // And read() does not touch them.
    let asked = RefCell::new(Vec::new());
    let caps = VmxCapabilities::read(|m| {
        asked.borrow_mut().push(m);
        let v = SKYLAKE_X.rdmsr(m)?;
        Some(if m == msr::IA32_VMX_BASIC {
            v & !(1 << 55)
        } else {
            v
        })
    });
    let asked = asked.into_inner();
    for m in msr::IA32_VMX_TRUE_PINBASED_CTLS..=msr::IA32_VMX_TRUE_ENTRY_CTLS {
        assert!(!asked.contains(&m), "{m:#x} read");
    }
    assert_eq!(caps.true_pinbased, None);
    assert_eq!(caps.true_entry, None);
}

#[test]
fn missing_true_msrs_fall_back_to_plain_ones() {
    let caps = VmxCapabilities::read(|m| match m {
        msr::IA32_VMX_TRUE_PINBASED_CTLS..=msr::IA32_VMX_TRUE_ENTRY_CTLS => None,
        _ => SKYLAKE_X.rdmsr(m),
    });
    assert!(caps.uses_true_msrs());
    assert_eq!(caps.true_procbased, None);
    let c = negotiate(&caps, EferPreference::Auto).unwrap();
    assert!(satisfies(caps.procbased, c.procbased));
    assert!(satisfies(caps.exit, c.exit));
    assert!(satisfies(caps.entry, c.entry));
    assert!(satisfies(caps.pinbased, c.pinbased));
    assert_eq!(c.efer, EferPath::VmcsControls);

    // Only one of them missing: the others are still used.
    let mut caps = base();
    caps.true_procbased = None;
    let c = negotiate(&caps, EferPreference::Auto).unwrap();
    assert!(satisfies(caps.procbased, c.procbased));
    assert!(satisfies(caps.true_exit.unwrap(), c.exit));
    assert_eq!(
        c.exit & exit::SAVE_DEBUG_CONTROLS,
        exit::SAVE_DEBUG_CONTROLS
    );
}

#[test]
fn nothing_readable_fails_cleanly() {
    let caps = VmxCapabilities::read(|_| None);
    assert_eq!(caps, VmxCapabilities::default());
    assert_eq!(caps.revision_id(), 0);
    let e = err(&caps);
    // The first word negotiated with a required bit (NMI exiting).
    assert_eq!(e.word, ControlWord::Pinbased);
    let _ = e.to_string();

    let all_ones = VmxCapabilities::read(|_| Some(u64::MAX));
    assert_eq!(all_ones.revision_id(), 0x7fff_ffff);
    // Every allowed-0 bit forced and allowed: negotiation succeeds with all
    // bits set, and nothing panics.
    let c = negotiate(&all_ones, EferPreference::MsrArea).unwrap();
    assert_eq!(c.procbased, u32::MAX);
    assert_eq!(c.efer, EferPath::VmcsControls, "forced on by the CPU");
    let _ = describe(&c).to_string();
}
