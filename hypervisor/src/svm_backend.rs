//! Running the guest on AMD SVM.

use crate::{mem, GuestMemory, GuestSetup, PAGE};
use log::info;
use thinvisor_memory::HostPhysAddr;
use thinvisor_svm::msrpm::{self, MSRPM_SIZE};
use thinvisor_svm::vmcb::Vmcb;
use thinvisor_svm::{SvmFeatures, SvmVcpu};
use thinvisor_vmm::{run_guest, Vcpu, Vmm};

pub fn run(
    features: &SvmFeatures,
    guest: &GuestSetup,
    memory: &'static GuestMemory,
    vmm: &mut Vmm<'_>,
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
    let npt_root = guest.nested_tables(crate::passthrough::TableKind::Npt, huge_1g);

    let (Some(vmcb), Some(hsave), Some(host_save), Some(msrpm)) = (
        mem::alloc_zeroed(PAGE, PAGE),
        mem::alloc_zeroed(PAGE, PAGE),
        mem::alloc_zeroed(PAGE, PAGE),
        mem::alloc_zeroed(MSRPM_SIZE as u64, PAGE),
    ) else {
        boot_error!("out of memory for the VMCB")
    };
    // SAFETY: a fresh, mapped 8 KiB block used only as this map.
    msrpm::init(unsafe { &mut *(mem::phys_to_virt(msrpm) as *mut [u8; MSRPM_SIZE]) });
    // SAFETY: probe() succeeded and hsave is a page reserved for the CPU.
    unsafe { thinvisor_svm::enable(HostPhysAddr::new(hsave)) };
    // SAFETY: a zeroed, page-aligned page in the direct map, used only as
    // this VMCB.
    let vmcb_virt = unsafe { &mut *(mem::phys_to_virt(vmcb) as *mut Vmcb) };
    // SAFETY: vmcb and host_save are distinct fresh pages, vmcb_virt maps
    // vmcb, the nested tables map nothing but guest RAM, and the MSR map
    // protects the SVM MSRs.
    let mut vcpu = unsafe {
        SvmVcpu::new(
            features,
            vmcb_virt,
            HostPhysAddr::new(vmcb),
            HostPhysAddr::new(host_save),
            npt_root,
            HostPhysAddr::new(msrpm),
            HostPhysAddr::new(crate::platform::io_bitmap(3 * PAGE)),
            memory,
            &guest.initial,
            guest.kind(),
        )
    };
    vcpu.take_host_nmis_from(&crate::percpu::current().nmi_pending);
    mem::log_heap_use();
    info!("entering the guest at {:#x}", guest.initial.rip());
    let cpu = crate::percpu::current();
    if let Some(stats) = vcpu.exit_stats() {
        crate::platform::register_stats(cpu.index, stats, vcpu.exit_names());
    }
    // The run ends here, with the vCPU (and its registered counts) alive.
    crate::report_stop(run_guest(vmm, &mut vcpu))
}
