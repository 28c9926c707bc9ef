//! What each processor owns in the host: its stacks (the normal one and the
//! interrupt stacks of the TSS), its GDT and TSS (VT-x needs a usable host
//! TR; the IST stacks let an NMI, a double fault or a machine check that
//! hits the hypervisor run on a known-good stack), and the counters its
//! exception handlers leave for the exit path.
//!
//! The processor finds its own area through GS: IA32_GS_BASE points at it
//! while the host runs (SVM's VMLOAD restores it after each exit, VT-x loads
//! it from HOST_GS_BASE), and the area starts with a pointer to itself.

use core::mem::offset_of;
use thinvisor_vmm::HostSignals;

use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::model_specific::GsBase;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// Interrupt stack table slots (1-based in the IDT gate, 0-based here).
pub const IST_NMI: u16 = 0;
pub const IST_DOUBLE_FAULT: u16 = 1;
pub const IST_MACHINE_CHECK: u16 = 2;
/// Size of each interrupt stack.
pub const IST_SIZE: usize = 8 * 1024;

/// The selectors of a processor's GDT.
#[derive(Clone, Copy, Debug)]
pub struct Selectors {
    pub code: SegmentSelector,
    pub data: SegmentSelector,
    pub tss: SegmentSelector,
}

/// One processor's host state.
#[repr(C, align(64))]
pub struct PerCpu {
    /// The area's own address: `mov rax, gs:[0]` finds it.
    this: *const PerCpu,
    /// What the host tells this processor's vCPU: NMIs the host took that
    /// belong to the guest (an NMI that reaches the host arrived while
    /// this processor ran thinvisor's code on the guest's behalf, or
    /// exited), and an INIT the guest sent it (apic.rs emulates INIT).
    pub signals: HostSignals,
    /// 0 for the boot processor, then in the order processors came up.
    pub index: u32,
    /// The local APIC ID (CPUID leaf 1, EBX bits 31:24).
    pub apic_id: u32,
    gdt: GlobalDescriptorTable,
    tss: TaskStateSegment,
    selectors: Option<Selectors>,
}

/// Offset of the NMI count in [`PerCpu::signals`], for the NMI stub.
pub const NMI_PENDING_OFFSET: usize = offset_of!(PerCpu, signals.nmis);

/// The boot processor's area and interrupt stacks (the others come from
/// the heap).
static mut BSP: PerCpu = PerCpu::empty();
static mut BSP_IST: [[u8; IST_SIZE]; 3] = [[0; IST_SIZE]; 3];

impl PerCpu {
    const fn empty() -> Self {
        Self {
            this: core::ptr::null(),
            signals: HostSignals::new(),
            index: 0,
            apic_id: 0,
            gdt: GlobalDescriptorTable::new(),
            tss: TaskStateSegment::new(),
            selectors: None,
        }
    }

    /// The selectors and the linear addresses of the GDT and TSS, for VT-x
    /// host state.
    pub fn host_tables(&self) -> Option<(Selectors, u64, u64)> {
        Some((
            self.selectors?,
            &self.gdt as *const _ as u64,
            &self.tss as *const _ as u64,
        ))
    }

    /// This area's linear address, for HOST_GS_BASE.
    pub fn base(&self) -> u64 {
        self as *const _ as u64
    }
}

/// Set up `area` for the running processor: GS base, GDT with TSS, the
/// interrupt stacks at `ist` (three of [`IST_SIZE`] bytes), and load them.
/// The area and the stacks must live as long as the processor runs
/// thinvisor.
fn install(area: &'static mut PerCpu, ist: u64, index: u32) -> &'static PerCpu {
    area.this = area as *const PerCpu;
    area.index = index;
    area.apic_id = core::arch::x86_64::__cpuid(1).ebx >> 24;
    for slot in 0..3 {
        // Stacks grow down from one past their end, 16-byte aligned.
        let top = (ist + (slot as u64 + 1) * IST_SIZE as u64) & !0xF;
        area.tss.interrupt_stack_table[slot] = VirtAddr::new(top);
    }
    let mut gdt = GlobalDescriptorTable::new();
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    // SAFETY: the TSS is part of `area`, which is 'static.
    let tss_ref: &'static TaskStateSegment = unsafe { &*(&area.tss as *const TaskStateSegment) };
    let tss = gdt.append(Descriptor::tss_segment(tss_ref));
    area.gdt = gdt;
    area.selectors = Some(Selectors { code, data, tss });
    let area: &'static PerCpu = area;
    area.gdt.load();
    // SAFETY: the selectors name the descriptors just loaded; the TSS is
    // 'static and loaded once per processor (LTR marks it busy); GS base
    // points at this processor's own area.
    unsafe {
        CS::set_reg(code);
        DS::set_reg(data);
        ES::set_reg(data);
        SS::set_reg(data);
        load_tss(tss);
        GsBase::write(VirtAddr::new(area.base()));
    }
    area
}

/// The boot processor's area, installed. Called once, first thing.
pub fn init_bsp() -> &'static PerCpu {
    // SAFETY: called once on the boot processor before anything else uses
    // BSP; afterwards it is reached only through the shared reference
    // returned here (and GS).
    let area = unsafe { &mut *core::ptr::addr_of_mut!(BSP) };
    install(area, core::ptr::addr_of!(BSP_IST) as u64, 0)
}

/// An application processor's area and interrupt stacks, from the heap,
/// installed. None when the heap is exhausted.
pub fn init_ap(index: u32) -> Option<&'static PerCpu> {
    let size = core::mem::size_of::<PerCpu>() as u64;
    let area = crate::mem::alloc_zeroed(size.next_multiple_of(4096), 4096)?;
    let ist = crate::mem::alloc_zeroed(3 * IST_SIZE as u64, 4096)?;
    let area = crate::mem::phys_to_virt(area) as *mut PerCpu;
    // SAFETY: fresh heap pages, page-aligned (so aligned for PerCpu), used
    // only as this processor's area from now on.
    let area = unsafe {
        area.write(PerCpu::empty());
        &mut *area
    };
    Some(install(area, crate::mem::phys_to_virt(ist) as u64, index))
}

/// The size of one processor's area and interrupt stacks.
pub const fn area_size() -> usize {
    core::mem::size_of::<PerCpu>() + 3 * IST_SIZE
}

/// The running processor's area.
pub fn current() -> &'static PerCpu {
    let this: *const PerCpu;
    // SAFETY: GS base points at this processor's PerCpu from `install` on
    // (set before any other code runs), and its first field is `this`.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) this, options(nostack, readonly, preserves_flags));
        &*this
    }
}
