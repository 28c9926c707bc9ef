//! Boot mode "resume": the loader that started thinvisor (thinvisor.efi
//! under UEFI, the test guest's `loader` mode) continues as the guest,
//! after its call, as if nothing had happened (crates/boot's `resume`).
//!
//! The multiboot2 information's resume tag decides, whatever `boot=`
//! says. thinvisor takes only the block the loader reserved from its
//! firmware (main.rs gives the frame allocator nothing else), moves
//! itself there, and runs the loader in the pass-through layout: the
//! nested tables map all memory 1:1 but thinvisor's block, and no memory
//! map is edited (the firmware's own already has the block allocated).
//! The boot processor enters the guest in the loader's 64-bit state;
//! the application processors wait in the host for the guest's INIT and
//! SIPI, as in the other pass-through modes.

use log::info;
use thinvisor_boot::resume::ResumeState;
use thinvisor_boot::{BootInfo, MAX_REGIONS};
use thinvisor_memory::{read_linear, Access, GuestLinearAddr, PagingRegs, PassthroughMemory};
use thinvisor_vmm::initial::LoaderRegs;
use thinvisor_vmm::{InitialState, MsrState, ResumedState, Seg};

use crate::{mem, passthrough, GuestLayout, GuestMemory, GuestSetup};

/// The loader's registers as the neutral decoder takes them.
fn loader_regs(r: &ResumeState) -> LoaderRegs {
    LoaderRegs {
        rip: r.rip,
        rflags: r.rflags,
        cr0: r.cr0,
        cr3: r.cr3,
        cr4: r.cr4,
        efer: r.efer,
        dr7: r.dr7,
        gdt: (r.gdt_base, r.gdt_limit),
        idt: (r.idt_base, r.idt_limit),
        selectors: r.selectors,
        fs_base: r.fs_base,
        gs_base: r.gs_base,
        msrs: MsrState {
            pat: r.pat,
            kernel_gs_base: r.kernel_gs_base,
            star: r.star,
            lstar: r.lstar,
            cstar: r.cstar,
            sfmask: r.sfmask,
            sysenter_cs: r.sysenter_cs,
            sysenter_esp: r.sysenter_esp,
            sysenter_eip: r.sysenter_eip,
        },
    }
}

/// The checked state, kept for the whole run: [`InitialState`] refers to
/// it (and the vCPU keeps its start for a later INIT).
static STATE: spin::Once<ResumedState> = spin::Once::new();

/// The loader as the guest: pass-through memory and its own 64-bit state,
/// the hidden parts of its segments read from its GDT.
pub fn guest(
    boot: &BootInfo,
    hidden: mem::Reserved,
    r: &ResumeState,
) -> (GuestSetup, &'static GuestMemory) {
    let (top, memory) = passthrough::guest_memory(boot, hidden);
    let regs = loader_regs(r);
    // The GDT's base is a linear address: translated through the loader's
    // own page tables (its CR3), which are in memory it keeps. Every range
    // the firmware's map lists, of any type, may hold them (UEFI keeps its
    // GDT and page tables in boot-services memory, which a loader that
    // keeps the firmware running does not call available); never
    // thinvisor's block, never what the map does not list (device memory).
    let mut ranges = [const { 0..0 }; MAX_REGIONS];
    let end = mem::direct_map_end();
    for (slot, region) in ranges.iter_mut().zip(boot.memory_map()) {
        *slot = region.start.min(end)..region.end().min(end);
    }
    let own = hidden.start..hidden.end;
    let block = core::slice::from_ref(&own);
    // SAFETY: every range is clipped to the direct map, which maps all of
    // it writable; this view only reads, during boot, while no guest runs
    // and nothing else of thinvisor's touches those bytes; thinvisor's own
    // block is excluded.
    let view = unsafe { PassthroughMemory::new(mem::phys_to_virt(0), &ranges, block) };
    let paging = PagingRegs {
        cr0: r.cr0,
        cr3: r.cr3,
        cr4: r.cr4,
        efer: r.efer,
    };
    let mut read = |la: u64, buf: &mut [u8]| {
        read_linear(&view, &paging, GuestLinearAddr::new(la), buf, Access::READ).is_ok()
    };
    let state = match ResumedState::new(&regs, &mut read) {
        Ok(s) => STATE.call_once(|| s),
        Err(e) => boot_error!("resume: {e}"),
    };
    let cs = state.segments[Seg::Cs as usize];
    info!(
        "resume: the loader continues as the guest at {:#x}:{:#x} (CR3 {:#x}, GDT {:#x}, TR {:#x}, interrupts {}); thinvisor's {:#x}..{:#x} hidden",
        cs.selector,
        state.rip,
        state.cr3,
        state.gdt.0,
        r.selectors[Seg::Tr as usize],
        if state.rflags & (1 << 9) != 0 { "on" } else { "off" },
        hidden.start,
        hidden.end
    );
    let guest = GuestSetup {
        memory: GuestLayout::Passthrough { top, hidden },
        initial: InitialState::resumed(state, r.gprs),
    };
    (guest, memory)
}
