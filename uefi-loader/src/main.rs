//! thinvisor.efi: starts thinvisor from UEFI firmware, on every processor,
//! and returns to the firmware — which then goes on booting the OS as
//! thinvisor's guest (docs/uefi.md).
//!
//! 1. The command line: the load options (`thinvisor.efi log=debug` in the
//!    shell, or a boot entry's optional data), else `thinvisor.cfg` beside
//!    the image: thinvisor's options (the multiboot command line's, see
//!    README), and optionally a `then PATH ARGS` line naming the loader to
//!    start next (for a boot entry that starts thinvisor, then the OS).
//! 2. Memory: thinvisor's image at the physical addresses it is linked for
//!    (EfiLoaderData: it moves itself out at once), and its block,
//!    EfiReservedMemoryType — the OS keeps that reserved, and the
//!    firmware's runtime code never points into it. thinvisor takes no
//!    other memory.
//! 3. The multiboot2 information (command line, memory map, RSDP, the
//!    resume tag) and the jump (crates/handoff): thinvisor boots, takes
//!    the other processors, and resumes this one where it left off, as its
//!    guest. The call returns; so does this program, to the firmware.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use thinvisor_boot::resume::{ResumeState, RESUME_VERSION};
use thinvisor_handoff::image::Plan;
use thinvisor_handoff::info::{kind, InfoBuilder, Region};
use uefi::boot::{self, AllocateType, LoadImageSource, MemoryType};
use uefi::mem::memory_map::MemoryMap;
use uefi::prelude::*;
use uefi::proto::device_path::build::{self, DevicePathBuilder};
use uefi::proto::device_path::text::{AllowShortcuts, DisplayOnly};
use uefi::proto::device_path::DevicePath;
use uefi::proto::loaded_image::LoadedImage;
use uefi::table::cfg::{ACPI2_GUID, ACPI_GUID};
use uefi::{println, CString16};

/// thinvisor's ELF image, built in by `cargo xtask build`.
static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/thinvisor.elf"));

/// thinvisor's block: its image and heap (about 4 MiB, see its boot log)
/// with room for an AMD-Vi device table (2 MiB).
const BLOCK_BYTES: u64 = 8 << 20;
/// The block's alignment (thinvisor maps it with 2 MiB pages where it
/// can).
const BLOCK_ALIGN: u64 = 2 << 20;
/// Pages for the multiboot2 information (a UEFI memory map has a few
/// hundred entries at most).
const INFO_PAGES: usize = 16;
const PAGE: u64 = 4096;
const BELOW_4G: u64 = 0xFFFF_F000;

#[entry]
fn main() -> Status {
    if uefi::helpers::init().is_err() {
        return Status::ABORTED;
    }
    match run() {
        Ok(()) => Status::SUCCESS,
        Err(e) => {
            println!("thinvisor.efi: {e}");
            Status::LOAD_ERROR
        }
    }
}

fn run() -> Result<(), String> {
    let config = Config::read()?;
    println!(
        "thinvisor.efi: starting thinvisor with \"{}\"",
        config.options
    );
    start_thinvisor(&config.options)?;
    let signature = hypervisor_signature();
    if signature != thinvisor_abi_signature() {
        return Err(format!(
            "thinvisor returned, but CPUID 0x40000000 says {:?}: not running under thinvisor",
            String::from_utf8_lossy(&signature)
        ));
    }
    println!("thinvisor.efi: the firmware runs under thinvisor now");
    if let Some((path, args)) = &config.then {
        println!("thinvisor.efi: starting {path} {args}");
        start_next(path, args)?;
    }
    Ok(())
}

/// The CPUID leaf 0x40000000 vendor signature (EBX, ECX, EDX).
fn hypervisor_signature() -> [u8; 12] {
    let r = core::arch::x86_64::__cpuid(0x4000_0000);
    let mut s = [0u8; 12];
    s[..4].copy_from_slice(&r.ebx.to_le_bytes());
    s[4..8].copy_from_slice(&r.ecx.to_le_bytes());
    s[8..].copy_from_slice(&r.edx.to_le_bytes());
    s
}

/// thinvisor's signature (crates/abi: `CPUID_SIGNATURE`).
fn thinvisor_abi_signature() -> [u8; 12] {
    *b"thinvisor\0\0\0"
}

/// What to start thinvisor with, and what to start after it.
struct Config {
    options: String,
    then: Option<(String, String)>,
}

impl Config {
    fn read() -> Result<Self, String> {
        let loaded = boot::open_protocol_exclusive::<LoadedImage>(boot::image_handle())
            .map_err(|e| format!("no loaded-image protocol: {e:?}"))?;
        if let Some(options) = load_options(&loaded) {
            return Ok(Config {
                options,
                then: None,
            });
        }
        let own = loaded
            .file_path()
            .and_then(|p| p.to_string(DisplayOnly(true), AllowShortcuts(false)).ok())
            .map(|p| p.to_string())
            .unwrap_or_default();
        drop(loaded);
        let dir = own.rfind('\\').map_or("", |i| &own[..i]);
        let path = format!("{dir}\\thinvisor.cfg");
        match read_file(&path) {
            Ok(bytes) => Ok(Config::parse(&String::from_utf8_lossy(&bytes))),
            Err(_) => {
                println!("thinvisor.efi: no options and no {path}: using \"log=info\"");
                Ok(Config {
                    options: "log=info".into(),
                    then: None,
                })
            }
        }
    }

    /// `thinvisor.cfg`: thinvisor's options on any number of lines, `#`
    /// comments, and at most one `then PATH [ARGS]` line.
    fn parse(text: &str) -> Self {
        let mut options = Vec::new();
        let mut then = None;
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if let Some(rest) = line.strip_prefix("then ") {
                let rest = rest.trim();
                let (path, args) = rest.split_once(' ').unwrap_or((rest, ""));
                then = Some((path.to_string(), args.trim().to_string()));
            } else if !line.is_empty() {
                options.push(line);
            }
        }
        Config {
            options: options.join(" "),
            then,
        }
    }
}

/// The load options as text, without the program's own name (the shell
/// passes the command line as typed); None when nothing is left.
fn load_options(loaded: &LoadedImage) -> Option<String> {
    let bytes = loaded.load_options_as_bytes()?;
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    let text = String::from_utf16_lossy(&units);
    let mut words = text.split_whitespace().peekable();
    if words
        .peek()
        .is_some_and(|w| w.to_ascii_lowercase().ends_with(".efi"))
    {
        words.next();
    }
    let rest: Vec<&str> = words.collect();
    (!rest.is_empty()).then(|| rest.join(" "))
}

/// A file of the volume this image came from.
fn read_file(path: &str) -> Result<Vec<u8>, String> {
    let sfs = boot::get_image_file_system(boot::image_handle())
        .map_err(|e| format!("no file system: {e:?}"))?;
    let mut fs = uefi::fs::FileSystem::new(sfs);
    let name = CString16::try_from(path).map_err(|_| format!("bad path {path}"))?;
    fs.read(name.as_ref())
        .map_err(|e| format!("cannot read {path}: {e:?}"))
}

fn pages(bytes: u64) -> usize {
    bytes.div_ceil(PAGE) as usize
}

/// Load thinvisor and jump into it; returns once it resumed this program
/// as its guest.
fn start_thinvisor(options: &str) -> Result<(), String> {
    let plan = Plan::of(IMAGE).map_err(|e| {
        if IMAGE.is_empty() {
            "this thinvisor.efi was built without thinvisor's image (build it with `cargo xtask build`)".to_string()
        } else {
            format!("thinvisor's image: {e}")
        }
    })?;
    let (lo, hi) = plan.range();
    boot::allocate_pages(
        AllocateType::Address(lo),
        MemoryType::LOADER_DATA,
        pages(hi - lo),
    )
    .map_err(|e| {
        format!("cannot take {lo:#x}..{hi:#x} for thinvisor's image ({e:?}): the firmware uses it")
    })?;
    let block = reserve_block()?;
    let info_at = boot::allocate_pages(
        AllocateType::MaxAddress(BELOW_4G),
        MemoryType::LOADER_DATA,
        1 + INFO_PAGES,
    )
    .map_err(|e| format!("no memory below 4 GiB for the boot information: {e:?}"))?
    .as_ptr() as u64;
    let low_page = info_at + INFO_PAGES as u64 * PAGE;

    plan.load(IMAGE, |pa, bytes| {
        // SAFETY: [pa, pa + len) lies in the range allocated above, which
        // UEFI identity-maps; nothing else uses it.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), pa as *mut u8, bytes.len()) }
    });

    let rsdp = rsdp();
    let regions = memory_map()?;
    let state = ResumeState {
        version: RESUME_VERSION,
        size: core::mem::size_of::<ResumeState>() as u32,
        block_start: block,
        block_end: block + BLOCK_BYTES,
        rsdp: rsdp.map_or(0, |(pa, _)| pa),
        ..ResumeState::default()
    };
    // SAFETY: the pages allocated above, identity-mapped, ours alone.
    let buf =
        unsafe { core::slice::from_raw_parts_mut(info_at as *mut u8, INFO_PAGES * PAGE as usize) };
    let mut info = InfoBuilder::new(buf).map_err(|_| "boot information too small")?;
    let too_big = |_| "boot information does not fit".to_string();
    info.cmdline(options).map_err(too_big)?;
    info.memory_map(&regions).map_err(too_big)?;
    if let Some((_, bytes)) = rsdp {
        info.rsdp(bytes).map_err(too_big)?;
    }
    info.resume(&state).map_err(too_big)?;
    let (_, resume_at) = info.finish().map_err(too_big)?;
    let resume_at = resume_at.ok_or("no resume tag")?;
    println!(
        "thinvisor.efi: thinvisor's image at {lo:#x}..{hi:#x}, its block at {block:#x}..{:#x} ({} MiB, reserved)",
        block + BLOCK_BYTES,
        BLOCK_BYTES >> 20
    );
    // SAFETY: everything `enter` needs is in place: the low page and the
    // information below 4 GiB, identity-mapped, allocated from the
    // firmware; the image loaded at its physical addresses; this is the
    // boot processor at CPL 0 in 64-bit mode.
    let status = unsafe {
        thinvisor_handoff::switch::enter(
            (info_at + resume_at as u64) as *mut ResumeState,
            low_page,
            plan.entry,
            info_at as u32,
        )
    };
    if status != 0 {
        return Err(format!("thinvisor resumed the loader with status {status}"));
    }
    Ok(())
}

/// thinvisor's block: BLOCK_BYTES, 2 MiB aligned, below 4 GiB, reserved
/// for good (the excess of the allocation is given back).
fn reserve_block() -> Result<u64, String> {
    let n = pages(BLOCK_BYTES + BLOCK_ALIGN);
    let at = boot::allocate_pages(AllocateType::MaxAddress(BELOW_4G), MemoryType::RESERVED, n)
        .map_err(|e| {
            format!(
                "no {} MiB below 4 GiB for thinvisor: {e:?}",
                BLOCK_BYTES >> 20
            )
        })?;
    let start = at.as_ptr() as u64;
    let aligned = start.next_multiple_of(BLOCK_ALIGN);
    let end = start + n as u64 * PAGE;
    // Give back the head and tail around the aligned block.
    for (from, to) in [(start, aligned), (aligned + BLOCK_BYTES, end)] {
        if to > from {
            if let Some(p) = core::ptr::NonNull::new(from as *mut u8) {
                // SAFETY: pages of the allocation above, unused.
                let _ = unsafe { boot::free_pages(p, pages(to - from)) };
            }
        }
    }
    Ok(aligned)
}

/// The ACPI RSDP (2.0+ preferred): its address and bytes.
fn rsdp() -> Option<(u64, &'static [u8])> {
    let pa = uefi::system::with_config_table(|tables| {
        tables
            .iter()
            .find(|t| t.guid == ACPI2_GUID)
            .or_else(|| tables.iter().find(|t| t.guid == ACPI_GUID))
            .map(|t| t.address as u64)
    })?;
    // SAFETY: the firmware's RSDP, identity-mapped: 20 bytes in revision
    // 0, its length field's (at offset 20) from revision 2 on.
    unsafe {
        let p = pa as *const u8;
        let revision = *p.add(15);
        let len = if revision >= 2 {
            (p.add(20) as *const u32).read_unaligned().clamp(20, 64) as usize
        } else {
            20
        };
        Some((pa, core::slice::from_raw_parts(p, len)))
    }
}

/// The firmware's memory map in multiboot2 terms, adjacent entries of one
/// kind merged. RAM the firmware or the OS will use is "available" (what
/// thinvisor may use is its block, named in the resume tag); what the OS
/// must leave alone is "reserved".
fn memory_map() -> Result<Vec<Region>, String> {
    let map =
        boot::memory_map(MemoryType::LOADER_DATA).map_err(|e| format!("no memory map: {e:?}"))?;
    let mut regions: Vec<Region> = Vec::new();
    for d in map.entries() {
        let ty = match d.ty {
            MemoryType::CONVENTIONAL
            | MemoryType::LOADER_CODE
            | MemoryType::LOADER_DATA
            | MemoryType::BOOT_SERVICES_CODE
            | MemoryType::BOOT_SERVICES_DATA
            | MemoryType::PERSISTENT_MEMORY => kind::AVAILABLE,
            MemoryType::ACPI_RECLAIM => kind::ACPI_RECLAIMABLE,
            MemoryType::ACPI_NON_VOLATILE => kind::ACPI_NVS,
            MemoryType::UNUSABLE => kind::BAD,
            _ => kind::RESERVED,
        };
        let start = d.phys_start;
        let len = d.page_count * PAGE;
        match regions.last_mut() {
            Some(last) if last.kind == ty && last.start + last.len == start => last.len += len,
            _ => regions.push(Region {
                start,
                len,
                kind: ty,
            }),
        }
    }
    Ok(regions)
}

/// Start the next loader (`then` in thinvisor.cfg) from this volume, with
/// `args` as its load options (Linux's EFI stub reads `initrd=` from them
/// and opens the file on the volume it came from).
fn start_next(path: &str, args: &str) -> Result<(), String> {
    let me = boot::open_protocol_exclusive::<LoadedImage>(boot::image_handle())
        .map_err(|e| format!("no loaded-image protocol: {e:?}"))?;
    let device = me.device().ok_or("this image has no device")?;
    drop(me);
    let device_path = boot::open_protocol_exclusive::<DevicePath>(device)
        .map_err(|e| format!("no device path for this volume: {e:?}"))?;
    let name = CString16::try_from(path).map_err(|_| format!("bad path {path}"))?;
    let mut storage = Vec::new();
    let mut builder = DevicePathBuilder::with_vec(&mut storage);
    for node in device_path.node_iter() {
        builder = builder
            .push(&node)
            .map_err(|e| format!("device path: {e:?}"))?;
    }
    let full = builder
        .push(&build::media::FilePath {
            path_name: name.as_ref(),
        })
        .and_then(|b| b.finalize())
        .map_err(|e| format!("device path: {e:?}"))?;
    let child = boot::load_image(
        boot::image_handle(),
        LoadImageSource::FromDevicePath {
            device_path: full,
            boot_policy: uefi::proto::BootPolicy::ExactMatch,
        },
    )
    .map_err(|e| format!("cannot load {path}: {e:?}"))?;
    drop(device_path);
    // The options live as long as the child may read them: leaked on
    // purpose (a few bytes, once).
    let options: &'static CString16 = alloc::boxed::Box::leak(alloc::boxed::Box::new(
        CString16::try_from(args).map_err(|_| format!("bad arguments {args}"))?,
    ));
    {
        let mut loaded = boot::open_protocol_exclusive::<LoadedImage>(child)
            .map_err(|e| format!("no loaded-image protocol for {path}: {e:?}"))?;
        // SAFETY: the buffer outlives the child (leaked above); its size
        // in bytes includes the terminating NUL.
        unsafe { loaded.set_load_options(options.as_ptr().cast(), options.num_bytes() as u32) };
    }
    boot::start_image(child).map_err(|e| format!("{path} returned {e:?}"))
}
