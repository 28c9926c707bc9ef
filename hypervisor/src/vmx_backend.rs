//! Running the guest on Intel VT-x.

use crate::{mem, percpu, GuestMemory, GuestSetup, PAGE};
use log::info;
use thinvisor_boot::BootInfo;
use thinvisor_vmm::{GuestKind, InitialState, Vmm};
use thinvisor_vmx::caps::{self, Controls, EferPreference, VmxCapabilities};
use thinvisor_vmx::msr_bitmap::{self, MSR_BITMAP_SIZE};
use thinvisor_vmx::{EferAreas, HostState, VmcsSetup, VmxVcpu};

/// What every processor's VMCS shares: the negotiated controls, the EPT
/// and the MSR bitmap.
struct Shared {
    caps: VmxCapabilities,
    controls: Controls,
    ept_root: u64,
    msr_bitmap: u64,
    io_bitmap: u64,
    kind: GuestKind,
}

static SHARED: spin::Once<Shared> = spin::Once::new();

pub fn run(
    caps: &VmxCapabilities,
    efer: EferPreference,
    guest: &GuestSetup,
    memory: &'static GuestMemory,
    vmm: &mut Vmm<'_>,
    boot: &BootInfo,
) -> ! {
    let controls = match caps::negotiate(caps, efer) {
        Ok(c) => c,
        Err(e) => boot_error!("{e}"),
    };
    info!(
        "Intel VT-x: VMCS revision {:#x}; {}",
        caps.revision_id(),
        caps::describe(&controls)
    );
    if !controls.ept_2m {
        boot_error!("VT-x: EPT without 2 MiB pages is not supported yet");
    }
    crate::shell::note_processor();
    crate::shell::note(format_args!(
        "backend: Intel VT-x (VMCS revision {:#x}), EPT with 4 KiB, 2 MiB{} pages, accessed/dirty flags {}",
        caps.revision_id(),
        if controls.ept_1g { ", 1 GiB" } else { "" },
        crate::yes_no(controls.ept_ad)
    ));
    crate::shell::note(format_args!(
        "VPID {}; unrestricted guest {}",
        if controls.vpid { "on" } else { "off" },
        crate::yes_no(controls.procbased2 & thinvisor_vmx::caps::proc2::UNRESTRICTED_GUEST != 0)
    ));
    crate::shell::note(format_args!(
        "EFER: {}",
        match controls.efer {
            thinvisor_vmx::caps::EferPath::VmcsControls => "loaded and saved by VMCS controls",
            thinvisor_vmx::caps::EferPath::MsrAreas => "switched through the MSR-load/store areas",
        }
    ));

    let ept_root = guest.nested_tables(crate::passthrough::TableKind::Ept, controls.ept_1g);
    let Some(bitmap) = mem::alloc_zeroed(PAGE, PAGE) else {
        boot_error!("out of memory for the MSR bitmap")
    };
    // SAFETY: a fresh, mapped, page-aligned page used only as the bitmap.
    msr_bitmap::init(unsafe { &mut *(mem::phys_to_virt(bitmap) as *mut [u8; MSR_BITMAP_SIZE]) });
    let shared = SHARED.call_once(|| Shared {
        caps: *caps,
        controls,
        ept_root: ept_root.as_u64(),
        msr_bitmap: bitmap,
        io_bitmap: crate::platform::io_bitmap(2 * PAGE),
        kind: guest.kind(),
    });
    if guest.kind() == GuestKind::Passthrough {
        // The other processors wait in the host for the INIT and SIPI the
        // guest sends them, as on SVM (apic.rs).
        crate::apic::watch_icr();
        crate::ioapic::watch();
        crate::smp::start_aps(boot, ap_main);
    }
    virtualize_cpu(shared, &guest.initial, false, memory, vmm)
}

/// An application processor: wait in the host for the SIPI the guest
/// sends it, then VMX on and the guest entered there.
///
/// (Leaving it in the guest in the wait-for-SIPI activity state would let
/// the guest's INIT and SIPI work natively, but an INIT sent to a processor
/// already waiting is held pending and arrives after the SIPI — and Bochs
/// never retires it; docs/architecture.md, "All processors".)
fn ap_main(cpu: &'static percpu::PerCpu) -> ! {
    let Some(shared) = SHARED.get() else {
        crate::smp::stop_this_cpu("VT-x state missing")
    };
    let (initial, mut vmm) = crate::smp::wait_for_guest_start(cpu);
    virtualize_cpu(
        shared,
        &initial,
        false,
        crate::passthrough::vcpu_memory(),
        &mut vmm,
    )
}

/// VMX on this processor, a VMCS for a guest starting in `initial` (or
/// waiting for a SIPI), and the guest run until it stops. The same for
/// every processor.
fn virtualize_cpu(
    shared: &Shared,
    initial: &InitialState,
    wait_for_sipi: bool,
    memory: &'static GuestMemory,
    vmm: &mut Vmm<'_>,
) -> ! {
    let (Some(vmxon), Some(vmcs), Some(areas)) = (
        mem::alloc_zeroed(PAGE, PAGE),
        mem::alloc_zeroed(PAGE, PAGE),
        mem::alloc_zeroed(PAGE, PAGE),
    ) else {
        boot_error!("out of memory for the VMCS")
    };
    // SAFETY: fresh, mapped, page-aligned pages, each used only as what it
    // is named for.
    let (vmxon_region, vmcs_region, areas_virt) = unsafe {
        (
            &mut *(mem::phys_to_virt(vmxon) as *mut [u8; 4096]),
            &mut *(mem::phys_to_virt(vmcs) as *mut [u8; 4096]),
            &mut *(mem::phys_to_virt(areas) as *mut EferAreas),
        )
    };
    // SAFETY: probe() succeeded; the VMXON region is a fresh page.
    if let Err(e) = unsafe { thinvisor_vmx::enable(&shared.caps, vmxon_region, vmxon) } {
        boot_error!("{e}");
    }
    let cpu = percpu::current();
    let Some((selectors, gdtr_base, tr_base)) = cpu.host_tables() else {
        boot_error!("internal error: the GDT is not loaded");
    };
    let host = HostState {
        cs: selectors.code.0,
        ds: selectors.data.0,
        tr: selectors.tss.0,
        tr_base,
        gdtr_base,
        gs_base: cpu.base(),
        idtr_base: x86_64::instructions::tables::sidt().base.as_u64(),
    };
    let setup = VmcsSetup {
        caps: &shared.caps,
        controls: &shared.controls,
        vmcs_region,
        vmcs_pa: vmcs,
        ept_root: shared.ept_root,
        msr_bitmap_pa: shared.msr_bitmap,
        io_bitmap_pa: shared.io_bitmap,
        efer_areas: Some((areas_virt, areas)),
        host,
        initial,
        kind: shared.kind,
        wait_for_sipi,
    };
    // SAFETY: VMX is on; every region is this processor's own or shared
    // read-only (EPT, MSR bitmap); the EPT maps only the guest's memory.
    let (policy, guest_efer) = match unsafe { thinvisor_vmx::setup_vmcs(setup) } {
        Ok(r) => r,
        Err(e) => boot_error!("VMCS setup: {e}"),
    };
    // SAFETY: VMX is on.
    if let Err(e) = unsafe { thinvisor_vmx::flush_guest_tlb(&shared.controls, shared.ept_root) } {
        boot_error!("{e}");
    }
    // SAFETY: setup_vmcs left this processor's VMCS current, and nothing
    // else loads another on this processor.
    let mut vcpu = unsafe { VmxVcpu::new(memory, guest_efer, policy, initial) };
    vcpu.take_host_signals_from(&cpu.signals);
    vcpu.watch_nested_generation(&crate::passthrough::GENERATION);
    crate::enter_guest(cpu, &mut vcpu, vmm, initial)
}
