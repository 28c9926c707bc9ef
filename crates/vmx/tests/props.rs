//! Properties of `adjust` and `negotiate` over arbitrary capability words.

mod common;

use common::satisfies;
use proptest::prelude::*;
use thinvisor_vmx::caps::{
    adjust, cr_fixed, describe, negotiate, EferPreference, Missing, VmxCapabilities,
};

/// A capability word as real CPUs report it: allowed-0 a subset of allowed-1.
fn consistent_cap() -> impl Strategy<Value = u64> {
    (any::<u32>(), any::<u32>()).prop_map(|(a0, a1)| (u64::from(a1 | a0) << 32) | u64::from(a0))
}

/// Any 64-bit word, plus the consistent kind more often.
fn any_cap() -> impl Strategy<Value = u64> {
    prop_oneof![any::<u64>(), consistent_cap(), Just(0u64), Just(u64::MAX)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn adjust_respects_the_capability(cap in any_cap(), desired: u32, required: u32) {
        let (must, may) = (cap as u32, (cap >> 32) as u32);
        match adjust(cap, desired, required) {
            Ok(v) => {
                prop_assert!(satisfies(cap, v));
                prop_assert_eq!(v & required, required);
                // Desired bits are kept exactly where allowed.
                prop_assert_eq!(v & desired, desired & may);
                // Nothing set that nobody asked for and the CPU did not force.
                prop_assert_eq!(v & !(desired | required | must), 0);
            }
            Err(Missing(m)) => {
                prop_assert_ne!(m, 0);
                prop_assert_eq!(m, (required | must) & !may);
            }
        }
    }

    /// On words real CPUs report, Err exactly when a required bit is not
    /// allowed-1, naming exactly those bits.
    #[test]
    fn adjust_fails_exactly_on_required_not_allowed(cap in consistent_cap(), desired: u32, required: u32) {
        let may = (cap >> 32) as u32;
        let result = adjust(cap, desired, required);
        if required & !may != 0 {
            prop_assert_eq!(result, Err(Missing(required & !may)));
        } else {
            prop_assert!(result.is_ok());
        }
    }

    #[test]
    fn cr_fixed_obeys_both_masks(value: u64, fixed0: u64, fixed1 in any::<u64>()) {
        let fixed1 = fixed1 | fixed0; // consistent, as the CPU reports
        let v = cr_fixed(value, fixed0, fixed1);
        prop_assert_eq!(v & fixed0, fixed0);
        prop_assert_eq!(v & !fixed1, 0);
        prop_assert_eq!(v & fixed1 & !fixed0, value & fixed1 & !fixed0);
    }

    /// Arbitrary capabilities never make negotiation panic, and whatever it
    /// chooses satisfies the words it was chosen from.
    #[test]
    fn negotiate_never_violates_capabilities(
        basic: u64,
        words in proptest::array::uniform4(any_cap()),
        trues in proptest::array::uniform4(proptest::option::of(any_cap())),
        proc2 in proptest::option::of(any_cap()),
        ept in proptest::option::of(any::<u64>()),
        msr_area: bool,
    ) {
        let caps = VmxCapabilities {
            basic,
            pinbased: words[0],
            procbased: words[1],
            exit: words[2],
            entry: words[3],
            procbased2: proc2,
            ept_vpid: ept,
            true_pinbased: trues[0],
            true_procbased: trues[1],
            true_exit: trues[2],
            true_entry: trues[3],
            ..VmxCapabilities::default()
        };
        let pref = if msr_area { EferPreference::MsrArea } else { EferPreference::Auto };
        match negotiate(&caps, pref) {
            Ok(c) => {
                let pick = |t: Option<u64>, p: u64| if caps.uses_true_msrs() { t.unwrap_or(p) } else { p };
                prop_assert!(satisfies(pick(caps.true_pinbased, caps.pinbased), c.pinbased));
                prop_assert!(satisfies(pick(caps.true_procbased, caps.procbased), c.procbased));
                prop_assert!(satisfies(caps.procbased2.unwrap_or(0), c.procbased2));
                prop_assert!(satisfies(pick(caps.true_exit, caps.exit), c.exit));
                prop_assert!(satisfies(pick(caps.true_entry, caps.entry), c.entry));
                prop_assert!(!c.invvpid_single || c.vpid);
                let _ = describe(&c).to_string();
            }
            Err(e) => {
                prop_assert_ne!(e.missing, 0);
                let _ = e.to_string();
            }
        }
    }
}
