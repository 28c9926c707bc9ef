//! What the core does with each exit: one small named function per kind.

use crate::vcpu::{Event, Exit, Gpr, NestedFault, Vcpu};
use crate::{vmmcall, Vmm};
use thinvisor_memory::GuestPhysAddr;

/// What the backend should do after an exit has been handled.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Action {
    /// Enter the guest again.
    Resume,
    /// Stop running this guest.
    Stop(StopReason),
}

/// Why a guest stopped for good.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum StopReason {
    /// HLT with nothing that could wake the guest (no interrupts are
    /// delivered to an isolated guest yet).
    Halted { rip: u64 },
    /// Shutdown: the guest triple-faulted.
    Shutdown { rip: u64 },
    /// The guest touched guest-physical memory it does not have.
    BadMemory { fault: NestedFault, rip: u64 },
    /// The processor would not enter the guest.
    EntryFailed { code: u64 },
    /// An exit the VMM has no handler for.
    Unhandled { code: u64, rip: u64 },
}

/// Run `vcpu` until its guest stops, handling every exit on the way.
pub fn run_guest<V: Vcpu>(vmm: &mut Vmm<'_>, vcpu: &mut V) -> StopReason {
    let mut until_poll = POLL_EVERY;
    loop {
        let action = vcpu.run_then(
            #[inline(always)]
            |vcpu, exit| handle_exit(vmm, vcpu, exit),
        );
        if let Action::Stop(reason) = action {
            return reason;
        }
        until_poll -= 1;
        if until_poll == 0 {
            until_poll = POLL_EVERY;
            if let Some(p) = vmm.vm.platform {
                p.poll_devices();
            }
        }
    }
}

/// The exit dispatch table. Each arm names the one function that handles
/// that kind of exit; the compiler turns the match into a jump table.
/// Inlined: where a backend calls it with a constant kind
/// ([`Vcpu::run_then`]) it folds to that kind's handler.
#[inline(always)]
pub fn handle_exit<V: Vcpu>(vmm: &mut Vmm<'_>, vcpu: &mut V, exit: Exit) -> Action {
    match exit {
        Exit::VmmCall => on_vmm_call(vmm, vcpu),
        Exit::Cpuid => on_cpuid(vmm, vcpu),
        Exit::Hlt => on_hlt(vcpu),
        Exit::Shutdown => on_shutdown(vcpu),
        Exit::NestedPageFault(fault) => on_nested_page_fault(vmm, vcpu, fault),
        Exit::Msr {
            msr: crate::apic::X2APIC_ICR_MSR,
            write: true,
        } => on_x2apic_icr(vmm, vcpu),
        Exit::Msr { msr, write: true } if crate::guard::is_guarded(msr) => {
            on_guarded_msr_write(vmm, vcpu, msr)
        }
        Exit::Msr { msr, write } => on_protected_msr(vcpu, msr, write),
        Exit::VirtualizationInstruction | Exit::InvalidOpcode => on_invalid_opcode(vcpu),
        Exit::Io {
            port,
            size,
            input,
            string,
        } => on_io(vmm, vcpu, port, size, input, string),
        Exit::Init => on_init(vmm, vcpu),
        Exit::Sipi { vector } => on_sipi(vcpu, vector),
        Exit::EntryFailed { code } => Action::Stop(StopReason::EntryFailed { code }),
        Exit::Unknown { code } => Action::Stop(StopReason::Unhandled {
            code,
            rip: vcpu.rip(),
        }),
    }
}

/// VMCALL/VMMCALL: dispatch on the function number; the dispatcher steps
/// over the instruction, or leaves it to run again after a page fault.
fn on_vmm_call<V: Vcpu>(vmm: &mut Vmm<'_>, vcpu: &mut V) -> Action {
    if let Some(p) = vmm.vm.platform {
        p.poll_devices();
    }
    vmmcall::dispatch(vmm, vcpu);
    Action::Resume
}

/// CPUID: the real processor's answer, edited by the policy (hypervisor
/// bit, thinvisor's leaf 0x40000000, no nested virtualization, the
/// guest's own CR4.OSXSAVE and CR4.PKE).
#[inline(always)]
fn on_cpuid<V: Vcpu>(vmm: &mut Vmm<'_>, vcpu: &mut V) -> Action {
    let leaf = vcpu.gpr(Gpr::Rax) as u32;
    let subleaf = vcpu.gpr(Gpr::Rcx) as u32;
    let r = vmm.cpuid_cache.query(leaf, subleaf, || vcpu.cr4());
    vcpu.set_gpr(Gpr::Rax, r.rax);
    vcpu.set_gpr(Gpr::Rbx, r.rbx);
    vcpu.set_gpr(Gpr::Rcx, r.rcx);
    vcpu.set_gpr(Gpr::Rdx, r.rdx);
    vcpu.skip_instruction();
    Action::Resume
}

/// HLT: an isolated guest gets no interrupts yet, so a halted guest can
/// never continue; stop it rather than spin.
fn on_hlt<V: Vcpu>(vcpu: &mut V) -> Action {
    Action::Stop(StopReason::Halted { rip: vcpu.rip() })
}

/// The I/O ports thinvisor intercepts: those through which the guest ends
/// or resets the machine, so that thinvisor reports the run (its exit
/// table) before they act: the keyboard controller's command port (0xFE
/// pulses reset) and the emulators' exit devices (QEMU's isa-debug-exit,
/// Bochs' shutdown port). The guest's ACPI PM1a control port, found in the
/// FADT, is added at boot. Everything else runs on the hardware. The reset
/// control register 0xCF9 is not watched: the bitmaps work per byte, and
/// every 32-bit PCI configuration access at 0xCF8 covers 0xCF9 (thousands
/// of exits in a Linux boot); a reset through it goes unreported.
pub const POWER_PORTS: [u16; 3] = [
    0x64,
    thinvisor_abi::QEMU_EXIT_PORT,
    thinvisor_abi::BOCHS_SHUTDOWN_PORT,
];

/// The machine around the guest: what an intercepted port does. The
/// hypervisor implements it (it reports the run's end before a port that
/// powers off or resets the machine acts, then performs the access).
pub trait Platform: Sync {
    /// OUT of `value` (`size` bytes) to `port`, on the guest's behalf.
    fn io_write(&self, port: u16, size: u8, value: u32);
    /// IN of `size` bytes from `port`, on the guest's behalf.
    fn io_read(&self, port: u16, size: u8) -> u32;
    /// WRMSR of the x2APIC interrupt command register (the one MSR write
    /// thinvisor watches outside its own: it starts processors), on the
    /// guest's behalf. False, with nothing done, when the local APIC is not
    /// in x2APIC mode: the processor raises #GP(0) for the MSR then (the
    /// intercept fires in either mode).
    fn x2apic_icr_write(&self, value: u64) -> bool;
    /// RDMSR on this processor; None when it raises #GP.
    fn msr_read(&self, msr: u32) -> Option<u64>;
    /// WRMSR on this processor, on the guest's behalf, of a value
    /// [`crate::guard`] let through; false when the processor raises #GP.
    fn msr_write(&self, msr: u32, value: u64) -> bool;
    /// MAXPHYADDR (CPUID 0x8000_0008 EAX[7:0]).
    fn max_phys_addr(&self) -> u8;
    /// Look at what devices reported (thinvisor: the IOMMUs' fault
    /// records), without blocking. thinvisor takes no interrupts of its
    /// own, so this is called from the exit path: before every VMM call
    /// (so a guest reading the log sees the faults its devices caused)
    /// and every [`POLL_EVERY`] exits of each processor.
    fn poll_devices(&self) {}
    /// This processor received INIT (another processor's IPI, which
    /// thinvisor emulates, or the hardware's INIT exit): wait in the host
    /// until the guest sends it a SIPI, and return its vector. None: the
    /// processor goes on where it was (thinvisor ignores INIT to the boot
    /// processor, see docs/security.md).
    fn wait_for_sipi(&self) -> Option<u8> {
        None
    }
}

/// Exits of one processor between two [`Platform::poll_devices`] calls.
pub const POLL_EVERY: u32 = 4096;

/// IN/OUT of an intercepted port: done for the guest through the platform,
/// so thinvisor can act first (its exit table before a power-off). String
/// forms (INS/OUTS) are not used on these ports by any firmware or OS
/// thinvisor knows; they are stepped over and logged.
fn on_io<V: Vcpu>(
    vmm: &Vmm<'_>,
    vcpu: &mut V,
    port: u16,
    size: u8,
    input: bool,
    string: bool,
) -> Action {
    let mask = match size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => 0xFFFF_FFFF,
    };
    match (vmm.vm.platform, string) {
        (Some(p), false) if input => {
            let value = u64::from(p.io_read(port, size) & mask);
            let rax = vcpu.gpr(Gpr::Rax);
            // IN to AL/AX keeps the rest of RAX; IN to EAX zero-extends.
            let rax = if size == 4 {
                value
            } else {
                (rax & !u64::from(mask)) | value
            };
            vcpu.set_gpr(Gpr::Rax, rax);
        }
        (Some(p), false) => p.io_write(port, size, vcpu.gpr(Gpr::Rax) as u32 & mask),
        _ => log::warn!(
            "guest {} port {port:#x} ({} bytes) not carried out",
            if string { "string I/O on" } else { "I/O on" },
            size
        ),
    }
    vcpu.skip_instruction();
    Action::Resume
}

/// INIT: the processor stops and waits for a SIPI (Intel SDM vol. 3A,
/// 9.4.4.1: how an operating system starts application processors, and
/// restarts one it took offline).
///
/// In the pass-through layout the platform does the waiting, in the host:
/// thinvisor emulates the guest's INIT and SIPI IPIs (the target learns of
/// the INIT through [`crate::HostSignals`]), so the SIPI never reaches the
/// hardware and only the host can say when it came. An isolated guest
/// waits in the hardware's own wait-for-SIPI state (VT-x), whose SIPI
/// exits.
fn on_init<V: Vcpu>(vmm: &Vmm<'_>, vcpu: &mut V) -> Action {
    let Some(platform) = vmm.vm.platform else {
        log::debug!("INIT at rip {:#x}: waiting for a SIPI", vcpu.rip());
        vcpu.wait_for_sipi();
        return Action::Resume;
    };
    if let Some(vector) = platform.wait_for_sipi() {
        vcpu.reset(&crate::InitialState::sipi(vector));
    }
    Action::Resume
}

/// SIPI: start in real mode at VV00:0000.
fn on_sipi<V: Vcpu>(vcpu: &mut V, vector: u8) -> Action {
    log::debug!(
        "SIPI with vector {vector:#x}: starting at {:#x}",
        u32::from(vector) << 12
    );
    vcpu.reset(&crate::InitialState::sipi(vector));
    Action::Resume
}

fn on_shutdown<V: Vcpu>(vcpu: &mut V) -> Action {
    Action::Stop(StopReason::Shutdown { rip: vcpu.rip() })
}

/// Carry out the store behind a refused write: decode the instruction,
/// hand its value to `device` (or drop it), retire it. A store during the
/// guest's own page walk or an instruction thinvisor does not emulate stops
/// the guest with the fault reported.
#[cfg(feature = "emulate")]
fn emulate_write<V: Vcpu>(
    vcpu: &mut V,
    fault: NestedFault,
    device: Option<&dyn DeviceWrite>,
) -> Action {
    use crate::emulate::{decode_write, EmulateError};
    use thinvisor_memory::TranslateError;
    let stop = |vcpu: &V| {
        Action::Stop(StopReason::BadMemory {
            fault,
            rip: vcpu.rip(),
        })
    };
    if !fault.write || fault.fetch || fault.in_page_walk {
        return stop(vcpu);
    }
    match decode_write(vcpu) {
        Ok(w) => {
            let old = device.map_or(0, |d| d.write(fault.gpa, w.size, w.value));
            w.finish(vcpu, old);
            Action::Resume
        }
        Err(EmulateError::Fetch(TranslateError::PageFault { la, error_code })) => {
            vcpu.inject(Event::PageFault {
                error_code,
                address: la.as_u64(),
            });
            Action::Resume
        }
        Err(e) => {
            log::error!(
                "write to guest-physical {:#x} not emulated: {e}",
                fault.gpa.as_u64()
            );
            stop(vcpu)
        }
    }
}

/// Without the decoder, a refused write stops the guest.
#[cfg(not(feature = "emulate"))]
fn emulate_write<V: Vcpu>(
    vcpu: &mut V,
    fault: NestedFault,
    _device: Option<&dyn DeviceWrite>,
) -> Action {
    Action::Stop(StopReason::BadMemory {
        fault,
        rip: vcpu.rip(),
    })
}

/// What the layout makes of a nested page fault.
#[derive(Clone, Copy)]
pub enum FaultVerdict {
    /// The address was ordinary guest-physical space not mapped yet (a
    /// 64-bit BAR above the memory map): it is mapped now; run again.
    Mapped,
    /// A write into the hypervisor's own memory, which the guest sees as
    /// read-only filler: the write is dropped and the instruction skipped.
    HiddenWrite,
    /// A write to a device page the hypervisor watches: the instruction is
    /// emulated, its store handed to the device.
    Device(&'static dyn DeviceWrite),
    /// Nothing the guest may reach.
    Outside,
}

/// A device page whose writes the hypervisor carries out itself.
pub trait DeviceWrite: Sync {
    /// Store `value` (`size` bytes) at `gpa` for the guest; return what
    /// the location held before (for XCHG).
    fn write(&self, gpa: GuestPhysAddr, size: u8, value: u64) -> u64;
}

/// The guest-physical layout behind nested page faults. The isolated
/// layout has none (every fault is outside guest RAM); the pass-through
/// layout maps lazily and hides the hypervisor.
pub trait NestedFaults: Sync {
    fn on_fault(&self, fault: &NestedFault) -> FaultVerdict;
}

/// In the isolated layout every guest-physical address outside guest RAM
/// is unbacked: there is no device model behind it, so the guest cannot
/// make progress. In the pass-through layout the layout decides.
fn on_nested_page_fault<V: Vcpu>(vmm: &Vmm<'_>, vcpu: &mut V, fault: NestedFault) -> Action {
    let verdict = vmm
        .vm
        .nested_faults
        .map_or(FaultVerdict::Outside, |l| l.on_fault(&fault));
    match verdict {
        FaultVerdict::Mapped => Action::Resume,
        FaultVerdict::HiddenWrite => {
            log::warn!(
                "guest write into thinvisor's memory at {:#x} (rip {:#x}) dropped",
                fault.gpa.as_u64(),
                vcpu.rip()
            );
            emulate_write(vcpu, fault, None)
        }
        FaultVerdict::Device(device) => emulate_write(vcpu, fault, Some(device)),
        FaultVerdict::Outside => Action::Stop(StopReason::BadMemory {
            fault,
            rip: vcpu.rip(),
        }),
    }
}

/// WRMSR to the x2APIC ICR (SDM vol. 3A, 11.12.9): EDX:EAX is the whole
/// command; the platform sends it, or starts a processor thinvisor holds.
/// The write raises #GP(0) as the processor's would when a reserved bit is
/// set or the APIC is in xAPIC mode (x2APIC MSRs exist only in x2APIC
/// mode): the hostile test guest's random WRMSR 0x830 in xAPIC mode made
/// thinvisor execute it in the host, where it faulted.
fn on_x2apic_icr<V: Vcpu>(vmm: &Vmm<'_>, vcpu: &mut V) -> Action {
    let value = (vcpu.gpr(Gpr::Rdx) << 32) | (vcpu.gpr(Gpr::Rax) & 0xFFFF_FFFF);
    let sent = match vmm.vm.platform {
        Some(p) if value & crate::apic::X2APIC_ICR_RESERVED == 0 => p.x2apic_icr_write(value),
        _ => false,
    };
    if !sent {
        return on_protected_msr(vcpu, crate::apic::X2APIC_ICR_MSR, true);
    }
    vcpu.skip_instruction();
    Action::Resume
}

/// A write of an MSR that decides how the processor reaches physical
/// memory, thinvisor's included (crate::guard): done for the guest unless
/// it would put the APIC window over thinvisor's block or change the
/// block's memory type; then #GP(0), as for a value the processor does
/// not support. Refusals are logged, the first few and then at powers of
/// two (a guest must not be able to flood the log).
fn on_guarded_msr_write<V: Vcpu>(vmm: &mut Vmm<'_>, vcpu: &mut V, msr: u32) -> Action {
    use core::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static REFUSED: AtomicU64 = AtomicU64::new(0);
    let value = (vcpu.gpr(Gpr::Rdx) << 32) | (vcpu.gpr(Gpr::Rax) & 0xFFFF_FFFF);
    let Some(p) = vmm.vm.platform else {
        return on_protected_msr(vcpu, msr, true);
    };
    if let Some(reserved) = vmm.vm.reserved {
        let checked = crate::guard::check_write(
            msr,
            value,
            reserved,
            &mut |m| p.msr_read(m),
            p.max_phys_addr(),
        );
        if let Err(why) = checked {
            let n = REFUSED.fetch_add(1, Relaxed) + 1;
            if n <= 8 || n.is_power_of_two() {
                log::warn!(
                    "guest WRMSR {msr:#x} = {value:#x} refused with #GP ({n} so far): {why}"
                );
            }
            vcpu.inject(Event::GP0);
            return Action::Resume;
        }
    }
    if p.msr_write(msr, value) {
        // Cheap, and some of these MSRs change CPUID's answers.
        vmm.cpuid_cache.clear();
        vcpu.skip_instruction();
    } else {
        vcpu.inject(Event::GP0);
    }
    Action::Resume
}

/// The intercepted MSRs belong to the virtualization extension (its host
/// save area, its enable bits): the guest sees a processor without them,
/// where RDMSR/WRMSR of an unimplemented MSR raise #GP(0) (Intel SDM vol.
/// 2B, RDMSR; AMD APM vol. 3, RDMSR).
fn on_protected_msr<V: Vcpu>(vcpu: &mut V, msr: u32, write: bool) -> Action {
    log::debug!(
        "guest {} of protected MSR {msr:#x}: #GP",
        if write { "write" } else { "read" }
    );
    vcpu.inject(Event::GP0);
    Action::Resume
}

/// The guest sees a processor without virtualization extensions, and its
/// own invalid opcodes behave as without a hypervisor.
fn on_invalid_opcode<V: Vcpu>(vcpu: &mut V) -> Action {
    vcpu.inject(Event::UD);
    Action::Resume
}
