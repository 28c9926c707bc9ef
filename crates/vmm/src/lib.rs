//! The architecture-neutral core of thinvisor.
//!
//! A vendor backend (SVM, VMX) implements [`Vcpu`]: it enters the guest and
//! reports each exit as a neutral [`Exit`]. Everything here, from the exit
//! dispatch table to the VMM calls and their services, sees only that trait,
//! so it runs as ordinary host tests against a fake vCPU.
#![no_std]

pub mod bios;
pub mod cpuid;
pub mod exit;
pub mod initial;
pub mod log_ring;
pub mod services;
pub mod stats;
pub mod vcpu;
pub mod vmmcall;

#[cfg(test)]
mod tests;

pub use exit::{handle_exit, run_guest, Action, StopReason};
pub use initial::{GuestKind, InitialState, SegmentState, StartMode};
pub use vcpu::{CpuMode, Event, Exit, Gpr, NestedFault, Vcpu};
pub use vmmcall::{CallContext, CallOutcome, Registry, VmmCallFn};

use services::{Services, VmmLog};

/// The state the core keeps for one virtual machine.
pub struct Vmm {
    /// The VMM-call functions, by number.
    pub registry: Registry,
    /// State of the services behind the calls.
    pub services: Services,
    /// The CPUID the guest sees, derived from the real one.
    pub cpuid: cpuid::CpuidPolicy,
    /// Bounds the page faults a VMM call may inject.
    pub fault_retry: vmmcall::FaultRetry,
}

impl Vmm {
    /// A VMM with the standard services registered (SPEC.md section 3).
    pub fn new(cpuid: cpuid::CpuidPolicy, log: &'static VmmLog) -> Self {
        let mut registry = Registry::new();
        services::register_all(&mut registry);
        Self {
            registry,
            services: Services::new(log),
            cpuid,
            fault_retry: vmmcall::FaultRetry::default(),
        }
    }
}
