//! The CPUID the guest sees.

use thinvisor_abi::{CPUID_HYPERVISOR_BIT, CPUID_SIGNATURE};

/// One CPUID answer.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Where the real answers come from: the CPU in the hypervisor, a table in
/// tests.
pub type CpuidSource = fn(leaf: u32, subleaf: u32) -> CpuidResult;

/// First leaf of the range reserved for hypervisors.
pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;
/// Last leaf of that range.
const HYPERVISOR_LEAF_END: u32 = 0x4000_00FF;

/// CPUID.1:ECX.VMX (Intel SDM vol. 2A, table 3-10).
const LEAF1_ECX_VMX: u32 = 1 << 5;
/// CPUID.8000_0001h:ECX.SVM (AMD APM vol. 3, appendix E.4.2).
const EXT1_ECX_SVM: u32 = 1 << 2;
/// Extended leaf with the SVM features (AMD APM vol. 3, E.4.9).
const SVM_FEATURES_LEAF: u32 = 0x8000_000A;
/// CPUID.1:ECX.XSAVE and CPUID.1:ECX.OSXSAVE, the copy of CR4.OSXSAVE
/// (Intel SDM vol. 2A, table 3-10; AMD APM vol. 3, E.3.2).
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
/// CPUID.(EAX=7,ECX=0):ECX.PKU and .OSPKE, the copy of CR4.PKE (Intel
/// SDM vol. 2A, table 3-8; AMD APM vol. 3, E.3.6).
const LEAF7_ECX_PKU: u32 = 1 << 3;
const LEAF7_ECX_OSPKE: u32 = 1 << 4;
/// CR4.OSXSAVE and CR4.PKE (Intel SDM vol. 3A, 2.5).
const CR4_OSXSAVE: u64 = 1 << 18;
const CR4_PKE: u64 = 1 << 22;

/// Pass-through with the edits every guest of thinvisor sees.
#[derive(Clone, Copy)]
pub struct CpuidPolicy {
    source: CpuidSource,
}

impl CpuidPolicy {
    pub const fn new(source: CpuidSource) -> Self {
        Self { source }
    }

    /// The guest's answer for `leaf`/`subleaf`, given the guest's CR4.
    ///
    /// Two bits are copies of CR4 bits, and the source answers with the
    /// host's CR4 (on VT-x the host sets CR4.OSXSAVE to execute the
    /// guest's XSETBV): OSXSAVE and OSPKE are taken from `guest_cr4`
    /// instead, as the processor would report them to the guest.
    pub fn query(&self, leaf: u32, subleaf: u32, guest_cr4: u64) -> CpuidResult {
        match leaf {
            1 => {
                let mut r = (self.source)(leaf, subleaf);
                // Tell the guest it runs on a hypervisor, and hide the
                // virtualization extension it cannot use (no nesting).
                r.ecx = (r.ecx | CPUID_HYPERVISOR_BIT) & !LEAF1_ECX_VMX;
                r.ecx = mirror(
                    r.ecx,
                    LEAF1_ECX_XSAVE,
                    LEAF1_ECX_OSXSAVE,
                    guest_cr4 & CR4_OSXSAVE,
                );
                r
            }
            7 if subleaf == 0 => {
                let mut r = (self.source)(leaf, subleaf);
                r.ecx = mirror(r.ecx, LEAF7_ECX_PKU, LEAF7_ECX_OSPKE, guest_cr4 & CR4_PKE);
                r
            }
            0x8000_0001 => {
                let mut r = (self.source)(leaf, subleaf);
                r.ecx &= !EXT1_ECX_SVM;
                r
            }
            SVM_FEATURES_LEAF => CpuidResult::default(),
            HYPERVISOR_LEAF => {
                let word = |i: usize| {
                    u32::from_le_bytes([
                        CPUID_SIGNATURE[i],
                        CPUID_SIGNATURE[i + 1],
                        CPUID_SIGNATURE[i + 2],
                        CPUID_SIGNATURE[i + 3],
                    ])
                };
                CpuidResult {
                    eax: HYPERVISOR_LEAF,
                    ebx: word(0),
                    ecx: word(4),
                    edx: word(8),
                }
            }
            l if l > HYPERVISOR_LEAF && l <= HYPERVISOR_LEAF_END => CpuidResult::default(),
            _ => (self.source)(leaf, subleaf),
        }
    }
}

/// `ecx` with its `os_bit` set exactly when the feature (`feature_bit`) is
/// reported and the guest has enabled it (`enabled` != 0): the guest
/// cannot set the CR4 bit of a feature the processor lacks.
fn mirror(ecx: u32, feature_bit: u32, os_bit: u32, enabled: u64) -> u32 {
    if ecx & feature_bit != 0 && enabled != 0 {
        ecx | os_bit
    } else {
        ecx & !os_bit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_ones(_: u32, _: u32) -> CpuidResult {
        CpuidResult {
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
        }
    }

    #[test]
    fn leaf1_sets_hypervisor_bit_and_hides_vmx() {
        let r = CpuidPolicy::new(all_ones).query(1, 0, 0);
        assert_ne!(r.ecx & CPUID_HYPERVISOR_BIT, 0);
        assert_eq!(r.ecx & LEAF1_ECX_VMX, 0);
        assert_eq!(r.edx, !0);
    }

    #[test]
    fn svm_is_hidden() {
        let p = CpuidPolicy::new(all_ones);
        assert_eq!(p.query(0x8000_0001, 0, 0).ecx & EXT1_ECX_SVM, 0);
        assert_eq!(p.query(SVM_FEATURES_LEAF, 0, 0), CpuidResult::default());
    }

    #[test]
    fn signature_leaf_spells_thinvisor() {
        let r = CpuidPolicy::new(all_ones).query(HYPERVISOR_LEAF, 0, 0);
        let mut sig = [0u8; 12];
        sig[0..4].copy_from_slice(&r.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
        sig[8..12].copy_from_slice(&r.edx.to_le_bytes());
        assert_eq!(&sig, b"thinvisor\0\0\0");
        assert_eq!(r.eax, HYPERVISOR_LEAF);
        assert_eq!(
            CpuidPolicy::new(all_ones).query(0x4000_0001, 0, 0),
            CpuidResult::default()
        );
    }

    #[test]
    fn other_leaves_pass_through() {
        let r = CpuidPolicy::new(all_ones).query(7, 0, 0);
        assert_eq!(r.ebx, !0);
    }

    #[test]
    fn os_bits_follow_the_guests_cr4_not_the_hosts() {
        let p = CpuidPolicy::new(all_ones);
        // The host's CR4.OSXSAVE (all ones here) does not show through.
        assert_eq!(p.query(1, 0, 0).ecx & LEAF1_ECX_OSXSAVE, 0);
        assert_ne!(p.query(1, 0, CR4_OSXSAVE).ecx & LEAF1_ECX_OSXSAVE, 0);
        assert_eq!(p.query(7, 0, 0).ecx & LEAF7_ECX_OSPKE, 0);
        assert_ne!(p.query(7, 0, CR4_PKE).ecx & LEAF7_ECX_OSPKE, 0);
        // Other subleaves of 7 pass through untouched.
        assert_eq!(p.query(7, 1, 0).ecx, !0);
        // Without XSAVE/PKU there is nothing to enable.
        fn bare(_: u32, _: u32) -> CpuidResult {
            CpuidResult::default()
        }
        let p = CpuidPolicy::new(bare);
        assert_eq!(p.query(1, 0, CR4_OSXSAVE).ecx & LEAF1_ECX_OSXSAVE, 0);
        assert_eq!(p.query(7, 0, CR4_PKE).ecx & LEAF7_ECX_OSPKE, 0);
    }
}
