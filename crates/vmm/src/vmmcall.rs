//! The VMM-call dispatcher (SPEC.md section 3): function 0 looks a name
//! up, numbers from 1 on are the functions registered at start-up.

use crate::services::Services;
use crate::vcpu::{Gpr, Vcpu};
use crate::Vmm;
use thinvisor_abi::{FN_LOOKUP, NAME_MAX_BYTES, NO_FUNCTION};
use thinvisor_memory::{read_cstr, GuestLinearAddr};

/// What a VMM-call function sees: the calling vCPU and the services' state.
pub struct CallContext<'a> {
    pub vcpu: &'a mut dyn Vcpu,
    pub services: &'a mut Services,
}

/// A VMM-call function. It reads its arguments from the vCPU's registers
/// and writes its results there; registers it does not return in must be
/// left as they are.
pub type VmmCallFn = fn(&mut CallContext<'_>);

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
}

/// Registered functions; number n is slot n - 1.
pub struct Registry {
    entries: [Option<Entry>; MAX_FUNCTIONS],
    len: usize,
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
        let slot = self.entries.get_mut(self.len).ok_or(RegisterError::Full)?;
        *slot = Some(Entry { name, function });
        self.len += 1;
        Ok(self.len as u64)
    }

    /// The number registered for `name` (exact, case-sensitive), or 0.
    pub fn lookup(&self, name: &[u8]) -> u64 {
        self.entries[..self.len]
            .iter()
            .position(|e| e.is_some_and(|e| e.name.as_bytes() == name))
            .map_or(NO_FUNCTION, |i| i as u64 + 1)
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
pub fn dispatch<V: Vcpu>(vmm: &mut Vmm, vcpu: &mut V) {
    let rax = vcpu.gpr(Gpr::Rax);
    let number = if vcpu.mode().long64 {
        rax
    } else {
        rax & 0xFFFF_FFFF
    };
    if number == FN_LOOKUP {
        let result = lookup_by_name(&vmm.registry, vcpu);
        vcpu.set_gpr(Gpr::Rax, result);
        return;
    }
    match vmm.registry.function(number) {
        Some(function) => function(&mut CallContext {
            vcpu,
            services: &mut vmm.services,
        }),
        None => vcpu.set_gpr(Gpr::Rax, NO_FUNCTION),
    }
}

/// Function 0: RBX = guest-linear address of a NUL-terminated name, read
/// through the guest's own page tables. Unreadable, too long or unknown
/// names all give 0, as in BitVisor.
fn lookup_by_name<V: Vcpu>(registry: &Registry, vcpu: &V) -> u64 {
    let mut address = vcpu.gpr(Gpr::Rbx);
    if !vcpu.mode().long64 {
        address &= 0xFFFF_FFFF;
    }
    let mut name = [0u8; NAME_MAX_BYTES];
    match read_cstr(
        vcpu.memory(),
        &vcpu.paging(),
        GuestLinearAddr::new(address),
        &mut name,
    ) {
        Ok(len) => name.get(..len).map_or(NO_FUNCTION, |n| registry.lookup(n)),
        Err(_) => NO_FUNCTION,
    }
}
