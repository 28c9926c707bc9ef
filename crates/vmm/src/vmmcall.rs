//! The VMM-call dispatcher (docs/vmm-call.md): function 0 looks a name
//! up, numbers from 1 on are the functions registered at start-up.

use crate::services::Services;
use crate::vcpu::{Event, Gpr, Vcpu};
use crate::Vmm;
use thinvisor_abi::{insn, FN_LOOKUP, NAME_MAX_BYTES, NO_FUNCTION};
use thinvisor_memory::{read_linear, with_cstr, Access, GuestLinearAddr};

/// What a VMM-call function sees: the calling vCPU and the services' state.
pub struct CallContext<'a> {
    pub vcpu: &'a mut dyn Vcpu,
    pub services: &'a Services,
    /// The functions, by number (for services that name them).
    pub registry: &'a Registry,
}

/// How a VMM-call function finished.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CallOutcome {
    /// The results are in the registers; the guest continues after the
    /// call instruction.
    Return,
    /// A guest page the call needs is not present: deliver this #PF to the
    /// guest (CR2 = `la`) and run the call instruction again once the
    /// guest OS has paged it in (docs/vmm-call.md, `log_read`).
    PageFault {
        la: GuestLinearAddr,
        error_code: u32,
    },
}

/// A VMM-call function. It reads its arguments from the vCPU's registers
/// and writes its results there; registers it does not return in must be
/// left as they are.
pub type VmmCallFn = fn(&mut CallContext<'_>) -> CallOutcome;

/// How often the same call may fault on the same page before it fails: a
/// guest OS that does not page the memory in must not loop forever.
pub const MAX_FAULTS_PER_PAGE: u32 = 3;

/// What a call returns in RAX when its page faults were not resolved.
pub const FAULTS_UNRESOLVED: u64 = u64::MAX;

/// The last fault a call injected, to bound the retries.
#[derive(Clone, Copy, Default, Debug)]
pub struct FaultRetry {
    /// RIP and CR3 of the call instruction and the faulting address.
    key: Option<(u64, u64, u64)>,
    count: u32,
}

/// How many functions can be registered. BitVisor's whole tree registers
/// fewer than ten.
pub const MAX_FUNCTIONS: usize = 32;

/// Why a registration was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RegisterError {
    Full,
    Duplicate,
    /// Empty, longer than a lookup can read, or containing NUL.
    BadName,
}

#[derive(Clone, Copy)]
struct Entry {
    name: &'static str,
    function: VmmCallFn,
    /// [`head`] of the name: with its length, the whole of a name of up
    /// to 8 bytes (every standard name but `log_set_buf`).
    head: u64,
}

/// Buckets of the name index: twice the functions, so at least half are
/// empty and every probe ends after a few steps.
const BUCKETS: usize = 2 * MAX_FUNCTIONS;

// Numbers are kept in the index as bytes.
const _: () = assert!(MAX_FUNCTIONS < 256 && BUCKETS.is_power_of_two());

/// The first 8 bytes of `name`, little-endian, zero-padded: at most two
/// overlapping loads (of 8, 4, 2 or 1 bytes), no loop.
#[inline(always)]
fn head(name: &[u8]) -> u64 {
    fn piece<const K: usize>(s: &[u8], at: usize) -> u64 {
        let mut b = [0u8; 8];
        if let Some(p) = s.get(at..at + K) {
            b[..K].copy_from_slice(p);
        }
        u64::from_le_bytes(b)
    }
    let n = name.len();
    match n {
        0 => 0,
        1 => piece::<1>(name, 0),
        // The first K bytes and the last K bytes, overlapping in the
        // middle where the two agree.
        2..=3 => piece::<2>(name, 0) | piece::<2>(name, n - 2) << (8 * (n - 2)),
        4..=7 => piece::<4>(name, 0) | piece::<4>(name, n - 4) << (8 * (n - 4)),
        _ => piece::<8>(name, 0),
    }
}

/// The index bucket a name starts probing at: a multiplicative hash of
/// its first 8 bytes and its length.
#[inline(always)]
fn bucket(head: u64, len: usize) -> usize {
    // Fibonacci hashing: the top bits of the product.
    ((head ^ len as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - BUCKETS.trailing_zeros()))
        as usize
}

/// Registered functions; number n is slot n - 1.
pub struct Registry {
    entries: [Option<Entry>; MAX_FUNCTIONS],
    len: usize,
    /// A hash index of the names, so a lookup compares one name, not
    /// every one: [`bucket`] then linear probing; each bucket holds a
    /// number (slot + 1) or 0 when empty.
    index: [u8; BUCKETS],
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub const fn new() -> Self {
        Self {
            entries: [None; MAX_FUNCTIONS],
            len: 0,
            index: [0; BUCKETS],
        }
    }

    /// Register `function` under `name`; returns its number (>= 1).
    pub fn register(
        &mut self,
        name: &'static str,
        function: VmmCallFn,
    ) -> Result<u64, RegisterError> {
        if name.is_empty() || name.len() >= NAME_MAX_BYTES || name.as_bytes().contains(&0) {
            return Err(RegisterError::BadName);
        }
        if self.lookup(name.as_bytes()) != NO_FUNCTION {
            return Err(RegisterError::Duplicate);
        }
        let number = self.len + 1;
        let slot = self.entries.get_mut(self.len).ok_or(RegisterError::Full)?;
        // At most MAX_FUNCTIONS of the 2 * MAX_FUNCTIONS buckets are used,
        // so the probe finds an empty one.
        let head = head(name.as_bytes());
        let start = bucket(head, name.len());
        let free = (0..BUCKETS)
            .map(|i| (start + i) % BUCKETS)
            .find(|&b| self.index[b] == 0)
            .ok_or(RegisterError::Full)?;
        *slot = Some(Entry {
            name,
            function,
            head,
        });
        self.index[free] = number as u8;
        self.len = number;
        Ok(number as u64)
    }

    /// The number registered for `name` (exact, case-sensitive), or 0:
    /// the names in its probe sequence are compared, usually one, by
    /// length and first 8 bytes (all of a name of up to 8 bytes).
    pub fn lookup(&self, name: &[u8]) -> u64 {
        let head = head(name);
        let start = bucket(head, name.len());
        // Bounded even if the index were full.
        for b in start..start + BUCKETS {
            let number = self.index[b % BUCKETS];
            if number == 0 {
                break;
            }
            if let Some(Some(e)) = self.entries.get(usize::from(number) - 1) {
                if e.head == head && e.name.len() == name.len() {
                    if name.len() <= 8 {
                        return u64::from(number);
                    }
                    // A longer name: the rest of the probe out of line,
                    // so this loop stays a leaf.
                    return self.lookup_long(name, head, b, start + BUCKETS);
                }
            }
        }
        NO_FUNCTION
    }

    /// [`lookup`](Self::lookup) of a name over 8 bytes from bucket `from`
    /// (whose entry has the name's length and first 8 bytes) to `end`.
    #[inline(never)]
    fn lookup_long(&self, name: &[u8], head: u64, from: usize, end: usize) -> u64 {
        for b in from..end {
            let number = self.index[b % BUCKETS];
            if number == 0 {
                break;
            }
            if let Some(Some(e)) = self.entries.get(usize::from(number) - 1) {
                if e.head == head && e.name.as_bytes() == name {
                    return u64::from(number);
                }
            }
        }
        NO_FUNCTION
    }

    /// The function with number `number`, if one is registered.
    pub fn function(&self, number: u64) -> Option<VmmCallFn> {
        let index = usize::try_from(number.checked_sub(1)?).ok()?;
        self.entries
            .get(index)
            .copied()
            .flatten()
            .map(|e| e.function)
    }

    /// The name registered under `number`.
    pub fn name(&self, number: u64) -> Option<&'static str> {
        let index = usize::try_from(number.checked_sub(1)?).ok()?;
        self.entries.get(index).copied().flatten().map(|e| e.name)
    }

    /// (number, name) of every registered function.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &'static str)> + '_ {
        self.entries[..self.len]
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.map(|e| (i as u64 + 1, e.name)))
    }
}

/// Handle one VMM call: the function number is RAX in 64-bit mode and EAX
/// elsewhere (the upper half of RAX is not architecturally defined outside
/// 64-bit mode, so a 32-bit caller's stale bits must not pick a function).
/// Steps over the call instruction unless a page fault is injected
/// instead.
pub fn dispatch<V: Vcpu>(vmm: &mut Vmm<'_>, vcpu: &mut V) {
    let rax = vcpu.gpr(Gpr::Rax);
    let number = if vcpu.mode().long64 {
        rax
    } else {
        rax & 0xFFFF_FFFF
    };
    if let Some(stats) = vcpu.exit_stats() {
        stats.record_call(number);
    }
    // The table index; function 0 and unknown numbers leave the hot path.
    let outcome = match vmm.vm.registry.function(number) {
        Some(function) => function(&mut CallContext {
            vcpu,
            services: &vmm.vm.services,
            registry: &vmm.vm.registry,
        }),
        None => {
            lookup_or_refuse(&vmm.vm.registry, vcpu, number);
            CallOutcome::Return
        }
    };
    match outcome {
        CallOutcome::Return => {
            vmm.fault_retry = FaultRetry::default();
            vcpu.skip_instruction();
        }
        CallOutcome::PageFault { la, error_code } => {
            page_fault(vmm, vcpu, number, la, error_code);
        }
    }
}

/// Function 0 (a lookup), or a number nothing is registered under (RAX =
/// [`NO_FUNCTION`]).
#[inline(never)]
fn lookup_or_refuse<V: Vcpu>(registry: &Registry, vcpu: &mut V, number: u64) {
    let result = if number == FN_LOOKUP {
        lookup_by_name(registry, vcpu)
    } else {
        NO_FUNCTION
    };
    vcpu.set_gpr(Gpr::Rax, result);
}

/// A call needs a guest page that is not present: inject the #PF and let
/// the call instruction run again, at most [`MAX_FAULTS_PER_PAGE`] times
/// for the same instruction and page.
#[cold]
#[inline(never)]
fn page_fault<V: Vcpu>(
    vmm: &mut Vmm<'_>,
    vcpu: &mut V,
    number: u64,
    la: GuestLinearAddr,
    error_code: u32,
) {
    let key = Some((vcpu.rip(), vcpu.paging().cr3, la.as_u64()));
    let retry = &mut vmm.fault_retry;
    if retry.key == key {
        retry.count += 1;
    } else {
        *retry = FaultRetry { key, count: 1 };
    }
    if retry.count > MAX_FAULTS_PER_PAGE {
        log::debug!(
            "VMM call {number}: page {la} still not present after {MAX_FAULTS_PER_PAGE} faults"
        );
        *retry = FaultRetry::default();
        vcpu.set_gpr(Gpr::Rax, FAULTS_UNRESOLVED);
        vcpu.skip_instruction();
    } else {
        vcpu.inject(Event::PageFault {
            error_code,
            address: la.as_u64(),
        });
    }
}

/// Function 0: RBX = guest-linear address of a NUL-terminated name, read
/// through the guest's own page tables with the caller's privilege (a
/// CPL-3 caller cannot probe kernel pages by name). Unreadable, too long
/// or unknown names all give 0, as in BitVisor.
fn lookup_by_name<V: Vcpu>(registry: &Registry, vcpu: &V) -> u64 {
    let mode = vcpu.mode();
    let mut address = vcpu.gpr(Gpr::Rbx);
    if !mode.long64 {
        address &= 0xFFFF_FFFF;
    }
    let access = Access {
        write: false,
        user: mode.cpl == 3,
        fetch: false,
    };
    with_cstr::<NAME_MAX_BYTES, _, _>(
        vcpu.memory(),
        &vcpu.paging(),
        GuestLinearAddr::new(address),
        access,
        |name| registry.lookup(name),
    )
    .unwrap_or(NO_FUNCTION)
}

/// Whether the instruction at the guest's RIP is VMCALL or VMMCALL. Either
/// vendor's instruction raises #UD on the other vendor's processor; the
/// backends intercept #UD and ask this, so one guest binary works on both
/// (docs/vmm-call.md, Calling). The bytes are fetched as the guest would fetch
/// them (its paging, its privilege).
pub fn is_vmm_call_at_rip(vcpu: &dyn Vcpu) -> bool {
    let mode = vcpu.mode();
    let mut la = vcpu.rip_linear();
    if !mode.long64 {
        la &= 0xFFFF_FFFF;
    }
    let access = Access {
        write: false,
        user: mode.cpl == 3,
        fetch: true,
    };
    let mut bytes = [0u8; 3];
    read_linear(
        vcpu.memory(),
        &vcpu.paging(),
        GuestLinearAddr::new(la),
        &mut bytes,
        access,
    )
    .is_ok()
        && (bytes == insn::VMCALL || bytes == insn::VMMCALL)
}
