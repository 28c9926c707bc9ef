//! thinvisor: boot, find the guest, run it under the hardware's
//! virtualization extension, report how it ended.
#![no_std]
#![no_main]

/// Log a boot error and stop with the boot-error status.
macro_rules! boot_error {
    ($($arg:tt)*) => {{
        log::error!($($arg)*);
        log::error!("cannot start the guest; stopping");
        crate::power::end_run(thinvisor_abi::exit_code::BOOT_ERROR)
    }};
}

mod apic;
mod chain;
mod entry;
mod idt;
mod ioapic;
mod iommu;
mod mem;
mod msr;
mod passthrough;
mod pci;
mod percpu;
mod platform;
mod power;
mod resume;
mod serial;
mod shell;
mod smp;
mod svm_backend;
mod vmx_backend;

use core::fmt::Write;
use log::{error, info, warn};
use thinvisor_abi::exit_code;
use thinvisor_boot::alloc::FrameAllocator;
use thinvisor_boot::cmdline::{BootMode, EferMode, Layout};
use thinvisor_boot::resume::ResumeState;
use thinvisor_boot::{cmdline, guest, multiboot1, multiboot2};
use thinvisor_boot::{BootInfo, MemKind, MAX_MODULES};
use thinvisor_memory::nested::{NestedPageTable, EPT_WRITE_BACK, NPT};
use thinvisor_memory::{
    GuestPhysAddr, GuestPhysMemory, HostPhysAddr, IsolatedMemory, PassthroughMemory,
    PhysAccessError, PhysWindow,
};
use thinvisor_vmm::cpuid::{CpuidPolicy, CpuidResult};
use thinvisor_vmm::{GuestKind, InitialState, StopReason, Vm, Vmm};
use thinvisor_vmx::caps::EferPreference;

const SIZE_2M: u64 = 2 << 20;
const SIZE_1G: u64 = 1 << 30;
pub(crate) const PAGE: u64 = 4096;

/// The one virtual machine: what every processor's exit path shares.
pub(crate) static VM: spin::Once<Vm> = spin::Once::new();

/// Called by the entry code in long mode with the loader's EAX and EBX.
pub extern "C" fn thinvisor_main(magic: u32, info_pa: u32) -> ! {
    serial::init_logging(log::LevelFilter::Info);
    percpu::init_bsp();
    idt::init();
    let boot = read_boot_info(magic, u64::from(info_pa));
    let options = match cmdline::parse(boot.cmdline(), &mut |token, why| {
        warn!("command line: {token}: {why}")
    }) {
        Ok(o) => o,
        Err(e) => boot_error!("command line: {e}"),
    };
    log::set_max_level(options.log_level);
    info!("thinvisor {} starting", env!("CARGO_PKG_VERSION"));
    info!("command line: \"{}\"", boot.cmdline());
    log_memory_map(&boot);

    // A loader that runs before thinvisor and continues under it passes
    // its state in a resume tag: that decides the boot mode.
    let resume = boot.resume().copied();
    if let Some(r) = &resume {
        info!(
            "boot mode: resume (the loader's resume tag; boot= and layout= do not apply): the loader continues at {:#x} as the guest; thinvisor takes only its block {:#x}..{:#x}",
            r.rip, r.block_start, r.block_end
        );
    }
    // ACPI before anything is written to memory: the RSDP the loader gave
    // may be a copy inside the boot information.
    let rsdp = loader_rsdp(&boot, resume.as_ref());
    LOADER_RSDP.call_once(|| rsdp);
    match thinvisor_boot::acpi::pm1a_control_port_at(&mem::DirectMapReader, rsdp) {
        Some(port) => {
            log::debug!("ACPI PM1a control register at port {port:#x}: watched for power-off");
            platform::PM1A_CONTROL.store(port, core::sync::atomic::Ordering::Relaxed);
        }
        None => log::debug!("no ACPI PM1a control port found"),
    }
    // Before relocation: an AMD-Vi device table grows thinvisor's block.
    let iommu_extra = iommu::discover(options.iommu, rsdp);
    let (mut frames, align) = match &resume {
        Some(r) => (resume_frames(&boot, r), PAGE),
        None => (frame_allocator(&boot), SIZE_2M),
    };
    let reserved = match mem::relocate(&mut frames, available_end(&boot), iommu_extra, align) {
        Ok(r) => r,
        Err(e) => match &resume {
            Some(r) => boot_error!(
                "resume: the loader's block {:#x}..{:#x} ({} KiB) is too small: thinvisor needs {} KiB of it below 4 GiB, outside its own image and the boot information ({e})",
                r.block_start,
                r.block_end,
                (r.block_end - r.block_start) >> 10,
                mem::block_size(iommu_extra) >> 10
            ),
            None => boot_error!("{e}"),
        },
    };
    // Resume mode: the loader reserved its whole block for thinvisor (its
    // firmware shows it reserved): the guest sees none of it, the part
    // thinvisor did not need included.
    let used = reserved;
    let reserved = match &resume {
        Some(r) => mem::Reserved {
            start: r.block_start.min(used.start),
            end: r.block_end.max(used.end),
        },
        None => used,
    };
    info!(
        "thinvisor reserves {} KiB at {:#x}..{:#x} (image {} KiB, heap {} KiB{}); {} MiB free for the guest",
        (reserved.end - reserved.start) >> 10,
        reserved.start,
        reserved.end,
        mem::image_size() >> 10,
        (used.end - used.start - mem::image_size()) >> 10,
        if resume.is_some() {
            ", the rest of the loader's block unused"
        } else {
            ""
        },
        frames.free_bytes() >> 20
    );

    if let Err(e) = mem::init_rust_heap() {
        boot_error!("{e}");
    }
    // The decoder's tables, built now rather than on the first emulated
    // write.
    thinvisor_vmm::emulate::prepare();
    let backend = pick_backend();

    let (guest, ram) = match (&resume, options.boot) {
        (Some(r), _) => resume::guest(&boot, reserved, r),
        (None, BootMode::Linux) => passthrough::linux_guest(&boot, reserved),
        (None, BootMode::Chain) => chain::bios_guest(&boot, reserved),
        (None, BootMode::Module) => {
            let (module, image) = guest_module(&boot, options.guest_module);
            match options.layout {
                Layout::Isolated => isolated_guest(&mut frames, &options, image, module.string()),
                Layout::Passthrough => {
                    passthrough::multiboot_guest(&boot, reserved, image, module.string())
                }
            }
        }
    };
    // Devices: all memory but thinvisor's block, before the guest runs.
    let dma_top = match guest.memory {
        GuestLayout::Passthrough { top, .. } => top,
        GuestLayout::Isolated { .. } => available_end(&boot).max(4 << 30).next_multiple_of(SIZE_2M),
    };
    iommu::protect(dma_top, reserved);
    pci::init(reserved);
    let vm: &'static Vm = VM.call_once(|| {
        let mut vm = Vm::new(CpuidPolicy::new(host_cpuid), &serial::LOG);
        shell::calibrate_clock();
        vm.services = thinvisor_vmm::services::Services::new(&serial::LOG).with_shell(
            &shell::INFO,
            options.dbgsh,
            shell::clock,
            shell::takeover_ticks(),
        );
        if !options.dbgsh {
            info!("dbgsh=off: the debug shell is disabled");
        }
        let in_guest_space = matches!(guest.memory, GuestLayout::Passthrough { .. });
        shell::set_reserved(reserved.start, reserved.end, in_guest_space);
        if in_guest_space {
            vm.nested_faults = Some(&passthrough::PassthroughFaults);
        }
        vm.platform = Some(&platform::Machine);
        vm.reserved = Some((reserved.start, reserved.end));
        vm
    });
    for (number, name) in vm.registry.iter() {
        log::debug!("VMM call {number}: {name}");
    }
    let mut vmm = Vmm::new(vm);
    platform::plant_canary();
    match backend {
        Backend::Svm(features) => svm_backend::run(&features, &guest, ram, &mut vmm, &boot),
        Backend::Vmx(caps) => {
            let efer = match options.efer {
                EferMode::Auto => EferPreference::Auto,
                EferMode::MsrArea => EferPreference::MsrArea,
            };
            vmx_backend::run(&caps, efer, &guest, ram, &mut vmm, &boot)
        }
    }
}

/// The boot module `index` (`guest=`) and its bytes.
fn guest_module(boot: &BootInfo, index: usize) -> (thinvisor_boot::Module, &'static [u8]) {
    let Some(module) = boot.modules().get(index) else {
        boot_error!(
            "no guest module: the boot loader passed {} module(s) and guest={} selects none; \
             pass the guest kernel as a multiboot module",
            boot.modules().len(),
            index
        )
    };
    let module = *module;
    info!(
        "guest module {}: {:#x}..{:#x} ({} KiB) \"{}\"",
        index,
        module.start,
        module.end,
        module.len() >> 10,
        module.string()
    );
    if !mem::is_mapped(module.start, module.len()) {
        boot_error!(
            "guest module at {:#x} lies outside the memory the firmware reported",
            module.start
        );
    }
    // SAFETY: the module lies in the direct map (checked above) and is
    // reserved from the allocator, so nothing else writes it.
    let image: &'static [u8] = unsafe { mem::phys_slice_mut(module.start, module.len()) };
    (module, image)
}

/// The isolated layout: guest RAM is a block of `guest_mem=` bytes taken
/// from free memory, at guest-physical 0; the multiboot kernel is loaded
/// into it with an information structure that describes only that RAM.
fn isolated_guest(
    frames: &mut FrameAllocator,
    options: &cmdline::Options,
    image: &[u8],
    cmdline: &str,
) -> (GuestSetup, &'static GuestMemory) {
    let ram_size = options.guest_mem;
    // 1 GiB alignment lets nested paging use 1 GiB pages; 2 MiB will do.
    let aligned_1g = (ram_size >= SIZE_1G).then(|| frames.alloc(ram_size, SIZE_1G));
    let Some(ram_base) = aligned_1g
        .flatten()
        .or_else(|| frames.alloc(ram_size, SIZE_2M))
    else {
        boot_error!(
            "guest_mem={} MiB does not fit: {} MiB of memory is free",
            ram_size >> 20,
            frames.free_bytes() >> 20
        )
    };
    // SAFETY: freshly allocated, inside the direct map (the allocator
    // never hands out memory above it), referenced by nothing else.
    let ram = unsafe { mem::phys_slice_mut(ram_base, ram_size) };
    ram.fill(0);
    info!(
        "guest RAM: {} MiB at host-physical {:#x}",
        ram_size >> 20,
        ram_base
    );

    let kernel = match guest::load_multiboot_kernel(image, ram) {
        Ok(k) => k,
        Err(e) => boot_error!("guest module: {e}"),
    };
    let info_at = kernel.load_end.next_multiple_of(PAGE);
    let mbi = match guest::write_multiboot1_info(ram, info_at, cmdline.as_bytes()) {
        Ok(a) => a,
        Err(e) => boot_error!("guest module: {e}"),
    };
    info!(
        "guest kernel loaded: entry {:#x}, multiboot information at {:#x}",
        kernel.entry, mbi
    );
    let guest = GuestSetup {
        memory: GuestLayout::Isolated { ram_base, ram_size },
        initial: InitialState::multiboot(kernel.entry, multiboot1::MAGIC, mbi),
    };
    (
        guest,
        guest_memory(GuestMemory::Isolated(IsolatedMemory::new(ram))),
    )
}

/// The guest's memory as the VMM reaches it, in either layout: one object
/// for the whole run, shared by reference with every vCPU.
pub enum GuestMemory {
    Isolated(IsolatedMemory<'static>),
    Passthrough(PassthroughMemory<'static>),
}

impl GuestPhysMemory for GuestMemory {
    // Always inlined: every page-walk entry read goes through here.
    #[inline(always)]
    fn map(&self, gpa: GuestPhysAddr, len: usize) -> Result<PhysWindow<'_>, PhysAccessError> {
        match self {
            Self::Isolated(m) => m.map(gpa, len),
            Self::Passthrough(m) => m.map(gpa, len),
        }
    }

    // The page walk and the linear copies take this once per call and
    // then check every entry and page inline.
    #[inline(always)]
    fn direct_map(&self) -> Option<thinvisor_memory::DirectMap<'_>> {
        match self {
            Self::Isolated(m) => m.direct_map(),
            Self::Passthrough(m) => m.direct_map(),
        }
    }
}

/// The guest's memory: one VM, so one object for the whole run.
static GUEST_MEMORY: spin::Once<GuestMemory> = spin::Once::new();

/// Keeps `memory` for the rest of the run (there is one VM).
pub fn guest_memory(memory: GuestMemory) -> &'static GuestMemory {
    GUEST_MEMORY.call_once(|| memory)
}

/// The guest's memory, once [`guest_memory`] has kept it: what every
/// further vCPU shares.
pub fn shared_guest_memory() -> Option<&'static GuestMemory> {
    GUEST_MEMORY.get()
}

/// How guest-physical memory is laid out.
#[derive(Clone, Copy, Debug)]
pub enum GuestLayout {
    /// Guest RAM is `ram_size` bytes at host-physical `ram_base`, mapped
    /// at guest-physical 0.
    Isolated { ram_base: u64, ram_size: u64 },
    /// Guest-physical is host-physical on [0, `top`), except thinvisor's
    /// own block.
    Passthrough { top: u64, hidden: mem::Reserved },
}

/// Where and how the guest starts.
#[derive(Clone, Copy, Debug)]
pub struct GuestSetup {
    pub memory: GuestLayout,
    pub initial: InitialState,
}

impl GuestSetup {
    /// Which exits the guest needs.
    pub fn kind(&self) -> GuestKind {
        match self.memory {
            GuestLayout::Isolated { .. } => GuestKind::Isolated,
            GuestLayout::Passthrough { .. } => GuestKind::Passthrough,
        }
    }

    /// Second-level tables (NPT or EPT, by `kind`) for the layout; their
    /// root.
    pub fn nested_tables(&self, kind: passthrough::TableKind, huge_1g: bool) -> HostPhysAddr {
        match self.memory {
            GuestLayout::Isolated { ram_base, ram_size } => {
                let format = match kind {
                    passthrough::TableKind::Npt => NPT,
                    passthrough::TableKind::Ept => EPT_WRITE_BACK,
                };
                let mut tables = mem::HeapTables;
                NestedPageTable::new(&mut tables, format)
                    .and_then(|mut t| {
                        t.map(
                            &mut tables,
                            GuestPhysAddr::new(0),
                            HostPhysAddr::new(ram_base),
                            ram_size,
                            huge_1g,
                        )
                        .map(|()| t.root())
                    })
                    .unwrap_or_else(|e| {
                        boot_error!("cannot build the guest's nested page tables: {e:?}")
                    })
            }
            GuestLayout::Passthrough { top, hidden } => {
                passthrough::build_tables(kind, top, hidden, huge_1g)
            }
        }
    }
}

/// Run `vcpu` on this processor until its guest stops, and end the run: the
/// common tail of every processor's start on both vendors.
pub(crate) fn enter_guest<V: thinvisor_vmm::Vcpu>(
    cpu: &percpu::PerCpu,
    vcpu: &mut V,
    vmm: &mut Vmm<'_>,
    initial: &InitialState,
) -> ! {
    if cpu.index == 0 {
        mem::log_heap_use();
        info!("entering the guest at {:#x}", initial.rip());
    }
    if let Some(stats) = vcpu.exit_stats() {
        platform::register_stats(cpu.index, stats, vcpu.exit_names());
    }
    // The run ends here, with the vCPU (and its registered counts) alive.
    report_stop(thinvisor_vmm::run_guest(vmm, vcpu))
}

/// The virtualization extension this processor offers.
enum Backend {
    Svm(thinvisor_svm::SvmFeatures),
    Vmx(thinvisor_vmx::caps::VmxCapabilities),
}

/// SVM if the processor has it, else VT-x; a boot error naming both
/// reasons otherwise.
fn pick_backend() -> Backend {
    let svm = match thinvisor_svm::probe() {
        Ok(features) => return Backend::Svm(features),
        Err(e) => e,
    };
    match thinvisor_vmx::probe() {
        Ok(caps) => Backend::Vmx(caps),
        Err(vmx) => boot_error!("no usable hardware virtualization: {svm}; {vmx}"),
    }
}

pub(crate) fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn read_boot_info(magic: u32, info_pa: u64) -> BootInfo {
    let parsed = match magic {
        multiboot1::MAGIC => multiboot1::parse(info_pa, &mem::DirectMapReader),
        multiboot2::MAGIC => {
            if !mem::is_identity_mapped(info_pa, multiboot2::MAX_TOTAL_SIZE.into()) {
                boot_error!("multiboot2 information at {info_pa:#x} lies outside the first 4 GiB");
            }
            // SAFETY: the loader passed this address with the multiboot2
            // magic, and the low 4 GiB are identity-mapped.
            unsafe { multiboot2::parse(info_pa) }
        }
        other => boot_error!(
            "not started by a multiboot loader (EAX = {other:#x}); boot thinvisor with GRUB (multiboot2) or QEMU -kernel"
        ),
    };
    match parsed {
        Ok(info) => info,
        Err(e) => boot_error!("boot information: {e}"),
    }
}

fn log_memory_map(boot: &BootInfo) {
    for r in boot.memory_map() {
        log::debug!("memory {:#014x}..{:#014x} {:?}", r.start, r.end(), r.kind);
    }
    if boot.truncated() {
        warn!("the boot information was larger than thinvisor keeps; some of it was dropped");
    }
}

/// Every available byte except the hypervisor, the boot information, the
/// modules, and anything outside the direct map.
fn frame_allocator(boot: &BootInfo) -> FrameAllocator {
    let mut reserved = [(0u64, 0u64); 3 + MAX_MODULES];
    reserved[0] = mem::loaded_range();
    reserved[1] = boot.info_range();
    reserved[2] = (available_end(boot), u64::MAX);
    let mut n = 3;
    for (slot, m) in reserved[3..].iter_mut().zip(boot.modules()) {
        *slot = (m.start, m.end);
        n += 1;
    }
    let available = boot
        .memory_map()
        .iter()
        .filter(|r| r.kind == MemKind::Available)
        .count();
    if available == 0 {
        boot_error!("the boot loader's memory map lists no available memory");
    }
    FrameAllocator::new(boot.memory_map(), &reserved[..n])
}

/// The RSDP the loader gave (the multiboot2 ACPI tags, else the resume
/// state's), when it is a valid one; None: search the BIOS areas.
fn loader_rsdp(boot: &BootInfo, resume: Option<&ResumeState>) -> Option<u64> {
    let given = boot
        .rsdp()
        .or_else(|| resume.map(|r| r.rsdp).filter(|&pa| pa != 0))?;
    if thinvisor_boot::acpi::rsdp_is_valid(&mem::DirectMapReader, given) {
        log::debug!("ACPI: the loader's RSDP at {given:#x}");
        Some(given)
    } else {
        warn!("ACPI: the loader's RSDP at {given:#x} is not valid; searching the BIOS areas");
        None
    }
}

/// The loader's RSDP, once checked at boot.
static LOADER_RSDP: spin::Once<Option<u64>> = spin::Once::new();

/// The RSDP for an ACPI lookup after the guest was loaded: the loader's
/// while it is still valid (a copy inside the boot information may have
/// been overwritten by a guest loader since: then the BIOS areas'), None
/// to search the BIOS areas.
pub(crate) fn acpi_rsdp() -> Option<u64> {
    LOADER_RSDP
        .get()
        .copied()
        .flatten()
        .filter(|&pa| thinvisor_boot::acpi::rsdp_is_valid(&mem::DirectMapReader, pa))
}

/// Resume mode: only the block the loader reserved, less thinvisor's
/// image and the boot information if they lie in it. The loader took the
/// block from its firmware's memory; everything else is still the
/// firmware's (or the loader's), and thinvisor takes none of it.
fn resume_frames(boot: &BootInfo, r: &ResumeState) -> FrameAllocator {
    let block = [thinvisor_boot::MemRegion {
        start: r.block_start,
        len: r.block_end - r.block_start,
        kind: MemKind::Available,
    }];
    let mut reserved = [(0u64, 0u64); 2 + MAX_MODULES];
    reserved[0] = mem::loaded_range();
    reserved[1] = boot.info_range();
    let mut n = 2;
    for (slot, m) in reserved[2..].iter_mut().zip(boot.modules()) {
        *slot = (m.start, m.end);
        n += 1;
    }
    FrameAllocator::new(&block, &reserved[..n])
}

/// The end of the highest memory the firmware calls available: what the
/// direct map must cover and the allocator may hand out.
fn available_end(boot: &BootInfo) -> u64 {
    boot.memory_map()
        .iter()
        .filter(|r| r.kind == MemKind::Available)
        .map(|r| r.end())
        .max()
        .unwrap_or(0)
}

fn host_cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    CpuidResult {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// Say how the guest ended and end the run with the matching status.
pub(crate) fn report_stop(reason: StopReason) -> ! {
    iommu::final_report();
    platform::log_exit_tables();
    platform::check_canary();
    let code = match reason {
        StopReason::Halted { rip } => {
            error!("guest halted at rip {rip:#x} with nothing to wake it; stopping");
            exit_code::GUEST_HALTED
        }
        StopReason::Shutdown { rip } => {
            error!("guest shutdown (triple fault) near rip {rip:#x}; stopping");
            exit_code::GUEST_SHUTDOWN
        }
        StopReason::BadMemory { fault, rip } => {
            let access = if fault.fetch {
                "fetch"
            } else if fault.write {
                "write"
            } else {
                "read"
            };
            match fault.linear {
                Some(la) => error!(
                    "nested page fault: guest {access} at guest-physical {:#x} (guest-linear {:#x}), outside guest RAM (rip {rip:#x}); stopping",
                    fault.gpa.as_u64(),
                    la.as_u64()
                ),
                None => error!(
                    "nested page fault: guest {access} at guest-physical {:#x}, outside guest RAM (rip {rip:#x}); stopping",
                    fault.gpa.as_u64()
                ),
            }
            exit_code::GUEST_BAD_MEMORY
        }
        StopReason::EntryFailed { code } => {
            error!("the processor refused to enter the guest (code {code:#x}; details above); stopping");
            exit_code::VMM_UNHANDLED
        }
        StopReason::Unhandled { code, rip } => {
            error!("unhandled exit {code:#x} at rip {rip:#x}; stopping");
            exit_code::VMM_UNHANDLED
        }
    };
    power::end_run(code)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // Bypass the logger's lock: the panic may have hit while it was held.
    let _ = writeln!(serial::Console, "thinvisor: [ERROR] panic: {info}");
    power::end_run(exit_code::VMM_PANIC)
}
