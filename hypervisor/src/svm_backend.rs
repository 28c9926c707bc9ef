//! Running the guest on AMD SVM.
//!
//! SVM has no wait-for-SIPI state, so the application processors, started
//! by thinvisor at boot (smp.rs), wait in the host until the guest starts
//! them: the local APIC's page is read-only in the nested tables, every
//! guest write to it is emulated (apic.rs), and an INIT/SIPI sent to one
//! of them is kept from the hardware and handed to that processor, which
//! then enters the guest in real mode at the SIPI's vector
//! (docs/architecture.md, "All processors").

use crate::{mem, percpu, GuestMemory, GuestSetup, PAGE};
use log::info;
use thinvisor_boot::BootInfo;
use thinvisor_memory::HostPhysAddr;
use thinvisor_svm::msrpm::{self, MSRPM_SIZE};
use thinvisor_svm::vmcb::Vmcb;
use thinvisor_svm::{SvmFeatures, SvmVcpu};
use thinvisor_vmm::{GuestKind, InitialState, Vmm};

/// What every processor's VMCB shares.
struct Shared {
    features: SvmFeatures,
    npt_root: HostPhysAddr,
    msrpm: u64,
    iopm: u64,
    kind: GuestKind,
}

static SHARED: spin::Once<Shared> = spin::Once::new();

pub fn run(
    features: &SvmFeatures,
    guest: &GuestSetup,
    memory: &'static GuestMemory,
    vmm: &mut Vmm<'_>,
    boot: &BootInfo,
) -> ! {
    info!(
        "AMD SVM: revision {}, {} ASIDs, nested paging, NRIPS {}, VMCB clean bits {}, decode assists {}",
        features.revision,
        features.asids,
        crate::yes_no(features.nrips),
        crate::yes_no(features.vmcb_clean),
        crate::yes_no(features.decode_assists)
    );
    // Nested walks use the processor's own page sizes: 1 GiB pages where
    // CPUID Fn8000_0001 EDX.Page1GB says so (APM 15.25.1).
    let huge_1g = core::arch::x86_64::__cpuid(0x8000_0001).edx & (1 << 26) != 0;
    info!(
        "nested paging: 2 MiB pages, 1 GiB pages {}",
        crate::yes_no(huge_1g)
    );
    crate::shell::note_processor();
    crate::shell::note(format_args!(
        "backend: AMD SVM (revision {}), nested paging with 4 KiB, 2 MiB{} pages",
        features.revision,
        if huge_1g { ", 1 GiB" } else { "" }
    ));
    crate::shell::note(format_args!(
        "ASID {} for the guest (of {}); NRIPS {}; VMCB clean bits {}; decode assists {}",
        thinvisor_svm::GUEST_ASID,
        features.asids,
        crate::yes_no(features.nrips),
        crate::yes_no(features.vmcb_clean),
        crate::yes_no(features.decode_assists)
    ));
    crate::shell::note(format_args!(
        "EFER: guest writes intercepted (SVME kept set under the guest)"
    ));
    let npt_root = guest.nested_tables(crate::passthrough::TableKind::Npt, huge_1g);
    let Some(msrpm) = mem::alloc_zeroed(MSRPM_SIZE as u64, PAGE) else {
        boot_error!("out of memory for the MSR permission map")
    };
    // SAFETY: a fresh, mapped 8 KiB block used only as this map.
    msrpm::init(unsafe { &mut *(mem::phys_to_virt(msrpm) as *mut [u8; MSRPM_SIZE]) });
    let shared = SHARED.call_once(|| Shared {
        features: *features,
        npt_root,
        msrpm,
        iopm: crate::platform::io_bitmap(3 * PAGE),
        kind: guest.kind(),
    });
    if guest.kind() == GuestKind::Passthrough {
        crate::apic::watch_icr();
        crate::ioapic::watch();
        crate::smp::start_aps(boot, ap_main);
    }
    virtualize_cpu(shared, &guest.initial, memory, vmm)
}

/// An application processor: SVM on, then wait in the host for the SIPI
/// the guest sends it, and enter the guest there.
fn ap_main(cpu: &'static percpu::PerCpu) -> ! {
    let Some(shared) = SHARED.get() else {
        crate::smp::stop_this_cpu("SVM state missing")
    };
    let (initial, mut vmm) = crate::smp::wait_for_guest_start(cpu);
    virtualize_cpu(
        shared,
        &initial,
        crate::passthrough::vcpu_memory(),
        &mut vmm,
    )
}

/// SVM on this processor, a VMCB for a guest starting in `initial`, and
/// the guest run until it stops. The same for every processor.
fn virtualize_cpu(
    shared: &Shared,
    initial: &InitialState,
    memory: &'static GuestMemory,
    vmm: &mut Vmm<'_>,
) -> ! {
    let (Some(vmcb), Some(hsave), Some(host_save)) = (
        mem::alloc_zeroed(PAGE, PAGE),
        mem::alloc_zeroed(PAGE, PAGE),
        mem::alloc_zeroed(PAGE, PAGE),
    ) else {
        boot_error!("out of memory for the VMCB")
    };
    // SAFETY: probe() succeeded and hsave is a page reserved for the CPU.
    unsafe { thinvisor_svm::enable(HostPhysAddr::new(hsave)) };
    // SAFETY: a zeroed, page-aligned page in the direct map, used only as
    // this VMCB.
    let vmcb_virt = unsafe { &mut *(mem::phys_to_virt(vmcb) as *mut Vmcb) };
    // SAFETY: vmcb and host_save are distinct fresh pages, vmcb_virt maps
    // vmcb, the nested tables map only the guest's memory, and the MSR map
    // protects the SVM MSRs.
    let mut vcpu = unsafe {
        SvmVcpu::new(
            &shared.features,
            vmcb_virt,
            HostPhysAddr::new(vmcb),
            HostPhysAddr::new(host_save),
            shared.npt_root,
            HostPhysAddr::new(shared.msrpm),
            HostPhysAddr::new(shared.iopm),
            memory,
            initial,
            shared.kind,
        )
    };
    let cpu = percpu::current();
    vcpu.take_host_signals_from(&cpu.signals);
    vcpu.watch_nested_generation(&crate::passthrough::GENERATION);
    crate::enter_guest(cpu, &mut vcpu, vmm, initial)
}
