//! Running the guest on Intel VT-x.

use crate::{mem, percpu, GuestMemory, GuestSetup, PAGE};
use log::info;
use thinvisor_vmm::{run_guest, StopReason, Vmm};
use thinvisor_vmx::caps::{self, EferPreference, VmxCapabilities};
use thinvisor_vmx::msr_bitmap::{self, MSR_BITMAP_SIZE};
use thinvisor_vmx::{EferAreas, HostState, VmcsSetup, VmxVcpu};

pub fn run(
    caps: &VmxCapabilities,
    efer: EferPreference,
    guest: &GuestSetup,
    memory: &'static GuestMemory,
    vmm: &mut Vmm<'_>,
) -> StopReason {
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

    let ept_root = guest.nested_tables(crate::passthrough::TableKind::Ept, controls.ept_1g);

    let (Some(vmxon), Some(vmcs), Some(bitmap), Some(areas)) = (
        mem::alloc_zeroed(PAGE, PAGE),
        mem::alloc_zeroed(PAGE, PAGE),
        mem::alloc_zeroed(PAGE, PAGE),
        mem::alloc_zeroed(PAGE, PAGE),
    ) else {
        boot_error!("out of memory for the VMCS")
    };
    // SAFETY: fresh, mapped, page-aligned pages, each used only as what it
    // is named for.
    let (vmxon_region, vmcs_region, bitmap_virt, areas_virt) = unsafe {
        (
            &mut *(mem::phys_to_virt(vmxon) as *mut [u8; 4096]),
            &mut *(mem::phys_to_virt(vmcs) as *mut [u8; 4096]),
            &mut *(mem::phys_to_virt(bitmap) as *mut [u8; MSR_BITMAP_SIZE]),
            &mut *(mem::phys_to_virt(areas) as *mut EferAreas),
        )
    };
    msr_bitmap::init(bitmap_virt);
    // SAFETY: probe() succeeded; the VMXON region is a fresh page.
    if let Err(e) = unsafe { thinvisor_vmx::enable(caps, vmxon_region, vmxon) } {
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
        caps,
        controls: &controls,
        vmcs_region,
        vmcs_pa: vmcs,
        ept_root: ept_root.as_u64(),
        msr_bitmap_pa: bitmap,
        efer_areas: Some((areas_virt, areas)),
        host,
        initial: &guest.initial,
        kind: guest.kind(),
    };
    // SAFETY: VMX is on; every region is this guest's own; the EPT maps
    // only guest RAM.
    let (policy, guest_efer) = match unsafe { thinvisor_vmx::setup_vmcs(setup) } {
        Ok(r) => r,
        Err(e) => boot_error!("VMCS setup: {e}"),
    };
    // SAFETY: VMX is on.
    if let Err(e) = unsafe { thinvisor_vmx::flush_guest_tlb(&controls, ept_root.as_u64()) } {
        boot_error!("{e}");
    }
    // SAFETY: setup_vmcs left this guest's VMCS current, and nothing else
    // loads another.
    let mut vcpu = unsafe { VmxVcpu::new(memory, guest_efer, policy, &guest.initial) };
    vcpu.take_host_nmis_from(&crate::percpu::current().nmi_pending);
    mem::log_heap_use();
    info!("entering the guest at {:#x}", guest.initial.rip());
    let reason = run_guest(vmm, &mut vcpu);
    thinvisor_vmm::stats::log_table(0, &vcpu);
    reason
}
