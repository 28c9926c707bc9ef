//! The hypervisor's own GDT with a TSS. VT-x requires a non-null host TR
//! (Intel SDM vol. 3C, 26.2.3); the TSS is otherwise unused (no privilege
//! changes, no IST stacks).

use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;

static TSS: TaskStateSegment = TaskStateSegment::new();

/// The selectors of the loaded GDT.
#[derive(Clone, Copy, Debug)]
pub struct Selectors {
    pub code: SegmentSelector,
    pub data: SegmentSelector,
    pub tss: SegmentSelector,
}

static GDT: Once<(GlobalDescriptorTable, Selectors)> = Once::new();

/// Build and load the GDT, reload the segment registers and TR. Once:
/// LTR marks the TSS busy, and a second LTR of it would fault.
pub fn init() -> Selectors {
    let (gdt, selectors) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(&TSS));
        (gdt, Selectors { code, data, tss })
    });
    gdt.load();
    // SAFETY: the selectors name the descriptors just loaded; the TSS is
    // 'static.
    unsafe {
        CS::set_reg(selectors.code);
        DS::set_reg(selectors.data);
        ES::set_reg(selectors.data);
        SS::set_reg(selectors.data);
        load_tss(selectors.tss);
    }
    *selectors
}

/// The loaded GDT's selectors and the linear addresses of the GDT and the
/// TSS, for VT-x host state. None before [`init`].
pub fn current() -> Option<(Selectors, u64, u64)> {
    let (gdt, selectors) = GDT.get()?;
    Some((*selectors, gdt as *const _ as u64, &TSS as *const _ as u64))
}
