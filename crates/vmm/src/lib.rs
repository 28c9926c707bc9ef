//! The architecture-neutral core of thinvisor.
//!
//! A vendor backend (SVM, VMX) implements [`Vcpu`]: it enters the guest and
//! reports each exit as a neutral [`Exit`]. Everything here, from the exit
//! dispatch table to the VMM calls and their services, sees only that trait,
//! so it runs as ordinary host tests against a fake vCPU.
#![no_std]

pub mod apic;
pub mod bios;
pub mod cpuid;
pub mod dbgsh;
#[cfg(feature = "emulate")]
pub mod emulate;
pub mod events;
pub mod exit;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
pub mod guard;
pub mod guest_log;
pub mod initial;
pub mod iomap;
pub mod log_ring;
pub mod pci;
pub mod services;
pub mod signals;
pub mod stats;
pub mod vcpu;
pub mod vmmcall;

#[cfg(test)]
mod tests;

pub use exit::{
    handle_exit, run_guest, Action, DeviceWrite, FaultVerdict, NestedFaults, Platform, StopReason,
    POWER_PORTS,
};
pub use initial::{GuestKind, InitialState, MsrState, ResumedState, Seg, SegmentState, StartMode};
pub use signals::HostSignals;
pub use vcpu::{CpuMode, Event, Exit, Gpr, NestedFault, Vcpu};
pub use vmmcall::{CallContext, CallOutcome, Registry, VmmCallFn};

use services::{Services, VmmLog};

/// What every virtual processor of one virtual machine shares: fixed at
/// start-up or behind its own lock, so any processor's exit path reads it
/// without a global lock.
pub struct Vm {
    /// The VMM-call functions, by number.
    pub registry: Registry,
    /// State of the services behind the calls.
    pub services: Services,
    /// The CPUID the guest sees, derived from the real one.
    pub cpuid: cpuid::CpuidPolicy,
    /// What nested page faults mean (None: the isolated layout, where
    /// every one is outside guest RAM).
    pub nested_faults: Option<&'static dyn NestedFaults>,
    /// The intercepted ports' side (None: they are stepped over).
    pub platform: Option<&'static dyn Platform>,
    /// thinvisor's own block [start, end) of host-physical memory, which
    /// guest MSR writes must leave alone (crate::guard).
    pub reserved: Option<(u64, u64)>,
}

impl Vm {
    /// A VM with the standard services registered (docs/vmm-call.md).
    pub fn new(cpuid: cpuid::CpuidPolicy, log: &'static VmmLog) -> Self {
        let mut registry = Registry::new();
        services::register_all(&mut registry);
        Self {
            registry,
            services: Services::new(log),
            cpuid,
            nested_faults: None,
            platform: None,
            reserved: None,
        }
    }
}

/// The core's state for one virtual processor: the VM it belongs to and
/// what only this processor changes.
pub struct Vmm<'vm> {
    /// The shared VM.
    pub vm: &'vm Vm,
    /// Bounds the page faults a VMM call may inject.
    pub fault_retry: vmmcall::FaultRetry,
    /// This processor's CPUID answers (some name the processor).
    pub cpuid_cache: cpuid::CpuidCache<'vm>,
}

impl<'vm> Vmm<'vm> {
    /// A virtual processor of `vm`.
    pub fn new(vm: &'vm Vm) -> Self {
        Self {
            vm,
            fault_retry: vmmcall::FaultRetry::default(),
            cpuid_cache: cpuid::CpuidCache::new(&vm.cpuid),
        }
    }
}
