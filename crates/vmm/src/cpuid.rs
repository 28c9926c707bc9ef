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

/// A CPUID answer as the guest's registers get it: CPUID writes RAX,
/// RBX, RCX and RDX with their 32-bit results zero-extended (Intel SDM
/// vol. 2A, CPUID).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct CpuidRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
}

impl From<CpuidResult> for CpuidRegs {
    fn from(r: CpuidResult) -> Self {
        Self {
            rax: r.eax.into(),
            rbx: r.ebx.into(),
            rcx: r.ecx.into(),
            rdx: r.edx.into(),
        }
    }
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
        with_guest_cr4(
            leaf,
            subleaf,
            self.query_without_cr4(leaf, subleaf),
            guest_cr4,
        )
    }

    /// The answer before the CR4 copies are applied: what
    /// [`CpuidCache`] keeps.
    fn query_without_cr4(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        match leaf {
            1 => {
                let mut r = (self.source)(leaf, subleaf);
                // Tell the guest it runs on a hypervisor, and hide the
                // virtualization extension it cannot use (no nesting).
                r.ecx = (r.ecx | CPUID_HYPERVISOR_BIT) & !LEAF1_ECX_VMX;
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

/// Whether the answer for `leaf` reads CR4 (its OS bits are copies).
#[inline(always)]
fn reads_cr4(leaf: u32, subleaf: u32) -> bool {
    leaf == 1 || (leaf == 7 && subleaf == 0)
}

/// `r` with the OS bits that copy CR4 bits taken from the guest's CR4.
#[inline(always)]
fn with_guest_cr4(leaf: u32, subleaf: u32, mut r: CpuidResult, guest_cr4: u64) -> CpuidResult {
    if leaf == 1 {
        r.ecx = mirror(
            r.ecx,
            LEAF1_ECX_XSAVE,
            LEAF1_ECX_OSXSAVE,
            guest_cr4 & CR4_OSXSAVE,
        );
    } else if leaf == 7 && subleaf == 0 {
        r.ecx = mirror(r.ecx, LEAF7_ECX_PKU, LEAF7_ECX_OSPKE, guest_cr4 & CR4_PKE);
    }
    r
}

/// The leaf whose answers follow XCR0 and IA32_XSS (the XSAVE area's
/// sizes, Intel SDM vol. 2A, CPUID leaf 0DH): never cached.
const XSAVE_LEAF: u32 = 0xD;

/// Entries in a [`CpuidCache`] (a power of two): 2 KiB per processor,
/// on its stack.
const CACHE_ENTRIES: usize = 32;

/// One processor's CPUID answers, so the exit path runs no CPUID (issue
/// 11: a CPUID costs an exit of its own under a nesting hypervisor, and
/// tens of cycles on hardware).
///
/// Per vCPU, because some answers name the processor (the initial APIC
/// ID in leaf 1 and the x2APIC ID in leaves 0Bh and 1Fh). What it keeps
/// must not change while the guest runs: leaf 0Dh, which follows XCR0 and
/// IA32_XSS, is never kept; the bits that copy CR4 are applied at each
/// query; and the MSRs that change the answers (IA32_MISC_ENABLE on
/// Intel, the CPUID feature MSRs on AMD: [`crate::guard::CPUID_MSRS`])
/// have their writes intercepted, which [`clear`](Self::clear)s the cache.
///
/// Direct-mapped on leaf and subleaf, filled on a miss: a guest's garbage
/// ECX for a leaf without subleaves only costs a miss.
#[derive(Clone)]
pub struct CpuidCache<'p> {
    entries: [CachedAnswer; CACHE_ENTRIES],
    /// Where a miss is answered (read only then: the common path loads
    /// nothing for it).
    policy: &'p CpuidPolicy,
}

/// 64 bytes, so an entry's address is a shift away from its slot.
#[derive(Clone, Copy)]
#[repr(C)]
struct CachedAnswer {
    /// The leaf and subleaf; an empty slot `s` holds [`empty_key`]`(s)`,
    /// which no query reaching slot `s` has.
    leaf: u32,
    subleaf: u32,
    /// The answer with the OS bits that copy CR4 cleared, as registers.
    answer: CpuidRegs,
    /// Which OS bit of ECX the guest's CR4 may set, and the rotation that
    /// brings the CR4 bit it copies there.
    os_mask: u64,
    os_rotate: u32,
    _pad: [u32; 3],
}

/// The leaf and subleaf an empty slot holds: leaf `slot ^ 1`, subleaf 0,
/// whose own slot is `slot ^ 1`, never `slot` (see [`slot_of`]).
const fn empty_key(slot: usize) -> (u32, u32) {
    ((slot ^ 1) as u32, 0)
}

/// Where `leaf`/`subleaf` lives. Bits 31:27 fold into bits 4:0, so the
/// hypervisor (4000_0000h) and extended (8000_0000h) leaves land 8 and 16
/// slots away from the basic ones; a leaf below 32 lands on its own
/// number. The subleaf is not hashed (it is in the tag): the subleaves of
/// one leaf share its slot, so enumerating them misses each time, which
/// operating systems do a few times at boot, and the exit path saves
/// three instructions on every CPUID.
#[inline(always)]
fn slot_of(leaf: u32, _subleaf: u32) -> usize {
    (leaf ^ (leaf >> 27)) as usize % CACHE_ENTRIES
}

/// The rotations (left) that bring CR4.OSXSAVE (bit 18) to ECX bit 27
/// (leaf 1) and CR4.PKE (bit 22) to ECX bit 4 (leaf 7): a rotation and
/// the entry's one-bit `os_mask` pick the copy out of the whole CR4.
const OSXSAVE_ROTATE: u32 = 27 - 18;
const OSPKE_ROTATE: u32 = 64 - (22 - 4);

impl<'p> CpuidCache<'p> {
    /// An empty cache that answers misses from `policy`.
    pub fn new(policy: &'p CpuidPolicy) -> Self {
        let mut cache = Self {
            policy,
            entries: [CachedAnswer {
                leaf: 0,
                subleaf: 0,
                answer: CpuidRegs::default(),
                os_mask: 0,
                os_rotate: 0,
                _pad: [0; 3],
            }; CACHE_ENTRIES],
        };
        cache.clear();
        cache
    }

    /// The guest's answer, as [`CpuidPolicy::query`] gives it; `cr4` is
    /// called only for the leaves that copy CR4 bits.
    #[inline(always)]
    pub fn query(&mut self, leaf: u32, subleaf: u32, cr4: impl FnOnce() -> u64) -> CpuidRegs {
        let entry = &mut self.entries[slot_of(leaf, subleaf)];
        if entry.leaf != leaf || entry.subleaf != subleaf {
            *entry = Self::fill(self.policy, leaf, subleaf);
            if leaf == XSAVE_LEAF {
                // Answered, not kept.
                let filled = *entry;
                (entry.leaf, entry.subleaf) = empty_key(slot_of(leaf, subleaf));
                return Self::finish(&filled, cr4);
            }
        }
        Self::finish(entry, cr4)
    }

    #[inline(always)]
    fn finish(entry: &CachedAnswer, cr4: impl FnOnce() -> u64) -> CpuidRegs {
        let mut answer = entry.answer;
        if entry.os_mask != 0 {
            answer.rcx |= cr4().rotate_left(entry.os_rotate) & entry.os_mask;
        }
        answer
    }

    /// A miss: ask the policy (and the processor behind it).
    #[cold]
    #[inline(never)]
    fn fill(policy: &CpuidPolicy, leaf: u32, subleaf: u32) -> CachedAnswer {
        let mut answer = policy.query_without_cr4(leaf, subleaf);
        let mut os_mask = 0;
        let mut os_rotate = 0;
        if reads_cr4(leaf, subleaf) {
            let (feature, os_bit, rotate) = if leaf == 1 {
                (LEAF1_ECX_XSAVE, LEAF1_ECX_OSXSAVE, OSXSAVE_ROTATE)
            } else {
                (LEAF7_ECX_PKU, LEAF7_ECX_OSPKE, OSPKE_ROTATE)
            };
            os_rotate = rotate;
            // The OS bit is the guest's CR4 bit, not the host's; the guest
            // cannot set the CR4 bit of a feature the processor lacks.
            answer.ecx &= !os_bit;
            if answer.ecx & feature != 0 {
                os_mask = u64::from(os_bit);
            }
        }
        CachedAnswer {
            leaf,
            subleaf,
            answer: answer.into(),
            os_mask,
            os_rotate,
            _pad: [0; 3],
        }
    }

    /// Forget every answer: an MSR that shapes them was written.
    pub fn clear(&mut self) {
        for (slot, e) in self.entries.iter_mut().enumerate() {
            (e.leaf, e.subleaf) = empty_key(slot);
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

const _: () = assert!(core::mem::size_of::<CachedAnswer>() == 64);

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

    use core::sync::atomic::{AtomicU32, Ordering};

    /// Counts the CPUIDs it answers; every answer names its leaf and subleaf.
    static ASKED: AtomicU32 = AtomicU32::new(0);
    fn counting(leaf: u32, subleaf: u32) -> CpuidResult {
        ASKED.fetch_add(1, Ordering::Relaxed);
        CpuidResult {
            eax: leaf,
            ebx: subleaf,
            ecx: !0,
            edx: leaf ^ subleaf,
        }
    }

    #[test]
    fn the_cache_answers_as_the_policy_and_asks_the_processor_once() {
        let p = CpuidPolicy::new(counting);
        let mut cache = CpuidCache::new(&p);
        let leaves = [
            (0, 0),
            (1, 0),
            (2, 0),
            (4, 0),
            (5, 0),
            (7, 0),
            (6, 0),
            (0xB, 0),
            (0x4000_0000, 0),
            (0x4000_0001, 0),
            (0x8000_0000, 0),
            (0x8000_0001, 0),
            (0x8000_000A, 0),
            (0x8000_0008, 0),
        ];
        for cr4 in [0, CR4_OSXSAVE | CR4_PKE, !CR4_OSXSAVE, !CR4_PKE, !0, 0] {
            for &(leaf, subleaf) in &leaves {
                let want = p.query(leaf, subleaf, cr4);
                assert_eq!(
                    cache.query(leaf, subleaf, || cr4),
                    want.into(),
                    "{leaf:#x}.{subleaf}"
                );
            }
        }
        // Each leaf went to the processor once at most (ASKED is shared
        // with no other test): the first round filled the cache.
        let first = ASKED.load(Ordering::Relaxed);
        for &(leaf, subleaf) in &leaves {
            cache.query(leaf, subleaf, || 0);
        }
        assert_eq!(ASKED.load(Ordering::Relaxed), first);
        // After clear, the processor is asked again.
        cache.clear();
        cache.query(0, 0, || 0);
        assert_eq!(ASKED.load(Ordering::Relaxed), first + 1);
    }

    #[test]
    fn subleaves_sharing_a_slot_are_answered_each_their_own() {
        // Not `counting`: its count belongs to the test above.
        fn named(leaf: u32, subleaf: u32) -> CpuidResult {
            CpuidResult {
                eax: leaf,
                ebx: subleaf,
                ecx: leaf ^ subleaf,
                edx: 0,
            }
        }
        let p = CpuidPolicy::new(named);
        let mut cache = CpuidCache::new(&p);
        for (leaf, subleaf) in [(4, 0), (4, 1), (4, 0), (7, 0), (7, 1), (7, 0), (4, 2)] {
            assert_eq!(
                cache.query(leaf, subleaf, || 0),
                p.query(leaf, subleaf, 0).into(),
                "{leaf:#x}.{subleaf}"
            );
        }
    }

    #[test]
    fn an_empty_slot_holds_a_key_no_query_reaching_it_has() {
        for slot in 0..CACHE_ENTRIES {
            let (leaf, subleaf) = empty_key(slot);
            assert_ne!(slot_of(leaf, subleaf), slot);
        }
        // And an empty cache answers as the policy (the key of slot 1 is
        // leaf 0, subleaf 0, which lives in slot 0).
        let p = CpuidPolicy::new(all_ones);
        let mut cache = CpuidCache::new(&p);
        assert_eq!(cache.query(0, 0, || 0), p.query(0, 0, 0).into());
    }

    #[test]
    fn the_xsave_leaf_is_never_kept() {
        fn xcr0_sized(_: u32, subleaf: u32) -> CpuidResult {
            static SIZE: AtomicU32 = AtomicU32::new(0x240);
            CpuidResult {
                eax: subleaf,
                ebx: SIZE.fetch_add(0x40, Ordering::Relaxed),
                ecx: 0,
                edx: 0,
            }
        }
        let p = CpuidPolicy::new(xcr0_sized);
        let mut cache = CpuidCache::new(&p);
        let a = cache.query(XSAVE_LEAF, 0, || 0);
        let b = cache.query(XSAVE_LEAF, 0, || 0);
        assert_ne!(
            a.rbx, b.rbx,
            "leaf 0Dh follows XCR0 and must be asked each time"
        );
    }

    #[test]
    fn cr4_is_read_only_for_the_leaves_that_copy_it() {
        let p = CpuidPolicy::new(all_ones);
        let mut cache = CpuidCache::new(&p);
        for leaf in [0, 2, 7, 0x8000_0001] {
            let subleaf = u32::from(leaf == 7);
            cache.query(leaf, subleaf, || panic!("CR4 read for {leaf:#x}"));
        }
        let mut read = false;
        cache.query(1, 0, || {
            read = true;
            0
        });
        assert!(read);
    }
}
