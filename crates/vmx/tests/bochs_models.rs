//! Negotiation against the real capability MSRs of Bochs 2.7's Intel models
//! (values and how they were obtained: `common/mod.rs`).

mod common;

use common::{satisfies, Model, HASWELL_4770, ICELAKE_U, MODELS, SKYLAKE_X, TIGERLAKE};
use thinvisor_vmx::caps::{
    cr_fixed, describe, entry, exit, msr, negotiate, pin, proc, proc2, Controls, EferPath,
    EferPreference, VmxCapabilities,
};

fn controls(model: &Model, pref: EferPreference) -> Controls {
    negotiate(&model.caps(), pref).unwrap_or_else(|e| panic!("{}: {e}", model.name))
}

/// Every chosen word against the MSR that governs it (TRUE_* on these
/// models, since they all set IA32_VMX_BASIC bit 55), and against the
/// allowed-1 settings of the plain MSR too.
fn check_words(model: &Model, c: &Controls) {
    let r = |m| model.rdmsr(m).unwrap();
    let name = model.name;
    assert!(
        satisfies(r(msr::IA32_VMX_TRUE_PINBASED_CTLS), c.pinbased),
        "{name} pin"
    );
    assert!(
        satisfies(r(msr::IA32_VMX_TRUE_PROCBASED_CTLS), c.procbased),
        "{name} proc"
    );
    assert!(
        satisfies(r(msr::IA32_VMX_PROCBASED_CTLS2), c.procbased2),
        "{name} proc2"
    );
    assert!(
        satisfies(r(msr::IA32_VMX_TRUE_EXIT_CTLS), c.exit),
        "{name} exit"
    );
    assert!(
        satisfies(r(msr::IA32_VMX_TRUE_ENTRY_CTLS), c.entry),
        "{name} entry"
    );
    for (m, v) in [
        (msr::IA32_VMX_PINBASED_CTLS, c.pinbased),
        (msr::IA32_VMX_PROCBASED_CTLS, c.procbased),
        (msr::IA32_VMX_EXIT_CTLS, c.exit),
        (msr::IA32_VMX_ENTRY_CTLS, c.entry),
    ] {
        assert_eq!(v & !((r(m) >> 32) as u32), 0, "{name} {m:#x}");
    }
}

#[test]
fn all_models_read_completely() {
    for model in MODELS {
        let caps = model.caps();
        assert!(caps.uses_true_msrs(), "{}", model.name);
        assert!(
            caps.procbased2.is_some() && caps.ept_vpid.is_some(),
            "{}",
            model.name
        );
        assert!(
            caps.true_pinbased.is_some() && caps.true_entry.is_some(),
            "{}",
            model.name
        );
        assert_eq!(caps.vmcs_size(), 0x1000, "{}", model.name);
        assert_eq!(caps.vmcs_memory_type(), 6, "{}: write-back", model.name);
        assert_eq!(common::CPUID_1_ECX & (1 << 5), 1 << 5, "CPUID.1:ECX.VMX");
    }
    assert_eq!(SKYLAKE_X.caps().revision_id(), 0x2b);
    assert_eq!(HASWELL_4770.caps().revision_id(), 0x2b);
    assert_eq!(ICELAKE_U.caps().revision_id(), 4);
    assert_eq!(TIGERLAKE.caps().revision_id(), 4);
}

#[test]
fn all_models_negotiate_with_vmcs_efer_controls_under_auto() {
    for model in MODELS {
        let c = controls(model, EferPreference::Auto);
        check_words(model, &c);
        assert_eq!(c.efer, EferPath::VmcsControls, "{}", model.name);
        assert_ne!(c.entry & entry::LOAD_IA32_EFER, 0);
        assert_eq!(
            c.exit & (exit::SAVE_IA32_EFER | exit::LOAD_IA32_EFER),
            exit::SAVE_IA32_EFER | exit::LOAD_IA32_EFER
        );
    }
}

#[test]
fn all_models_use_msr_areas_when_asked() {
    for model in MODELS {
        let c = controls(model, EferPreference::MsrArea);
        check_words(model, &c);
        assert_eq!(c.efer, EferPath::MsrAreas, "{}", model.name);
        assert_eq!(c.entry & entry::LOAD_IA32_EFER, 0);
        assert_eq!(c.exit & (exit::SAVE_IA32_EFER | exit::LOAD_IA32_EFER), 0);
        // Nothing else changes.
        let auto = controls(model, EferPreference::Auto);
        assert_eq!(
            Controls {
                efer: EferPath::MsrAreas,
                exit: auto.exit & !(exit::SAVE_IA32_EFER | exit::LOAD_IA32_EFER),
                entry: auto.entry & !entry::LOAD_IA32_EFER,
                ..auto
            },
            c
        );
    }
}

#[test]
fn policy_bits_on_every_model() {
    for model in MODELS {
        let c = controls(model, EferPreference::Auto);
        let name = model.name;
        // Interrupts go to the guest; NMIs exit (INIT emulation kicks
        // processors with them), virtualized.
        assert_eq!(c.pinbased & pin::EXTERNAL_INTERRUPT_EXITING, 0, "{name}");
        let nmi = pin::NMI_EXITING | pin::VIRTUAL_NMIS;
        assert_eq!(c.pinbased & nmi, nmi, "{name}");
        let want = proc::HLT_EXITING | proc::USE_MSR_BITMAPS | proc::ACTIVATE_SECONDARY;
        assert_eq!(c.procbased & want, want, "{name}");
        // Only the ports in the I/O bitmaps exit, never all of them.
        assert_ne!(c.procbased & proc::USE_IO_BITMAPS, 0, "{name}");
        assert_eq!(
            c.procbased & proc::UNCONDITIONAL_IO_EXITING,
            0,
            "{name}: no unconditional I/O exits"
        );
        // The TRUE MSR lets the default1 CR3 exits go.
        assert_eq!(
            c.procbased & (proc::CR3_LOAD_EXITING | proc::CR3_STORE_EXITING),
            0
        );
        let want2 = proc2::ENABLE_EPT | proc2::UNRESTRICTED_GUEST | proc2::ENABLE_RDTSCP;
        assert_eq!(c.procbased2 & want2, want2, "{name}");
        assert_ne!(c.exit & exit::HOST_ADDRESS_SPACE_SIZE, 0);
        assert_eq!(
            c.entry & entry::IA32E_MODE_GUEST,
            0,
            "{name}: set per entry"
        );
        assert_ne!(c.exit & exit::SAVE_DEBUG_CONTROLS, 0);
        assert_ne!(c.entry & entry::LOAD_DEBUG_CONTROLS, 0);
    }
}

#[test]
fn features_as_each_model_offers() {
    // (model, XSAVES allowed, INVPCID allowed)
    for (model, xsaves) in [
        (&SKYLAKE_X, true),
        (&ICELAKE_U, true),
        (&TIGERLAKE, true),
        (&HASWELL_4770, false),
    ] {
        let c = controls(model, EferPreference::Auto);
        let name = model.name;
        assert!(c.vpid, "{name}");
        assert_ne!(c.procbased2 & proc2::ENABLE_VPID, 0);
        assert!(c.ept_2m && c.ept_1g && c.ept_ad, "{name}");
        assert!(c.invept_single && c.invept_all, "{name}");
        assert!(c.invvpid_single && c.invvpid_all, "{name}");
        assert_ne!(c.procbased2 & proc2::ENABLE_INVPCID, 0, "{name}");
        assert_eq!(c.procbased2 & proc2::ENABLE_XSAVES != 0, xsaves, "{name}");
    }
}

#[test]
fn exact_words_for_skylake_and_haswell() {
    let sky = controls(&SKYLAKE_X, EferPreference::Auto);
    assert_eq!(
        (
            sky.pinbased,
            sky.procbased,
            sky.procbased2,
            sky.exit,
            sky.entry
        ),
        (0x3e, 0x9600_61f2, 0x0010_10aa, 0x0033_6fff, 0x91ff)
    );
    let has = controls(&HASWELL_4770, EferPreference::Auto);
    assert_eq!(
        (
            has.pinbased,
            has.procbased,
            has.procbased2,
            has.exit,
            has.entry
        ),
        (0x3e, 0x9600_61f2, 0x10aa, 0x0033_6fff, 0x91ff)
    );
}

#[test]
fn cr_fixed_with_model_values() {
    let caps: VmxCapabilities = SKYLAKE_X.caps();
    // CR0 fixed0 = PE | NE | PG: a guest CR0 of 0 comes out as 0x80000021.
    assert_eq!(cr_fixed(0, caps.cr0_fixed0, caps.cr0_fixed1), 0x8000_0021);
    // Unrestricted guest: only NE stays forced.
    assert_eq!(caps.guest_cr0_fixed0(true), 0x20);
    assert_eq!(caps.guest_cr0_fixed0(false), 0x8000_0021);
    // CR4: VMXE forced on; bits above the model's fixed1 cleared.
    assert_eq!(cr_fixed(0, caps.cr4_fixed0, caps.cr4_fixed1), 0x2000);
    assert_eq!(
        cr_fixed(u64::MAX, caps.cr4_fixed0, caps.cr4_fixed1),
        caps.cr4_fixed1
    );
    assert_eq!(cr_fixed(0x20, caps.cr4_fixed0, caps.cr4_fixed1), 0x2020);
}

#[test]
fn describe_mentions_the_choices() {
    let text = describe(&controls(&SKYLAKE_X, EferPreference::Auto)).to_string();
    assert!(text.contains("EFER via VMCS controls"), "{text}");
    assert!(text.contains("VPID on"), "{text}");
    assert!(text.contains("2M pages yes, 1G pages yes"), "{text}");
    let text = describe(&controls(&HASWELL_4770, EferPreference::MsrArea)).to_string();
    assert!(text.contains("EFER via MSR areas"), "{text}");
}
