//! Loading a guest kernel the way a multiboot v1 boot loader would
//! (Multiboot Specification 0.6.96, section 3.1), into a block of guest RAM
//! that starts at guest-physical address 0, and writing the multiboot
//! information the guest receives.
//!
//! Two layouts share the code. In the isolated layout the guest's RAM is a
//! block at guest-physical 0 ([`load_multiboot_kernel`],
//! [`write_multiboot1_info`]); in the pass-through layout guest-physical is
//! host-physical, segments go to their real physical addresses and must lie
//! in the usable RAM of a [`GuestMap`], which hides thinvisor's memory
//! ([`load_multiboot_passthrough`]). Both write through
//! [`PhysWrite`].
//!
//! The image is untrusted: every address and size in it is checked against
//! the image and the guest RAM before a byte is copied, and nothing is copied
//! unless the whole image checks out.

use crate::e820::{GuestMap, Unusable, MAX_AVOID};
use crate::entry::Entry32;
use crate::phys::{PhysWrite, PhysWriteError, RamSlice};
use crate::place::{Taken, Want};
use crate::MemKind;
use core::fmt;
use elf::abi::{EM_386, EM_X86_64, ET_EXEC, PT_LOAD};
use elf::endian::AnyEndian;
use elf::file::Class;
use elf::segment::ProgramHeader;
use elf::{ElfBytes, ParseError};

/// Magic number that starts a multiboot v1 header.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// The header must lie entirely within this many bytes of the image start.
pub const HEADER_SEARCH_LEN: usize = 8192;

/// Header flag: align modules on 4 KiB boundaries (we pass no modules).
pub const HEADER_FLAG_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag: the kernel wants memory information (always given).
pub const HEADER_FLAG_MEMORY_INFO: u32 = 1 << 1;
/// Header flag: the kernel would like a video mode (a preference; ignored).
pub const HEADER_FLAG_VIDEO: u32 = 1 << 2;
/// Header flag: load addresses come from the header (a.out kludge), not ELF.
pub const HEADER_FLAG_AOUT_KLUDGE: u32 = 1 << 16;

/// Bits 0-15 are requirements: a loader must refuse any it does not provide.
const REQUIRED_MASK: u32 = 0xFFFF;
const SUPPORTED_REQUIRED: u32 =
    HEADER_FLAG_PAGE_ALIGN | HEADER_FLAG_MEMORY_INFO | HEADER_FLAG_VIDEO;

/// Information structure flag: `mem_lower` / `mem_upper` valid.
pub const INFO_FLAG_MEM: u32 = 1 << 0;
/// Information structure flag: `cmdline` valid.
pub const INFO_FLAG_CMDLINE: u32 = 1 << 2;
/// Information structure flag: `mmap_length` / `mmap_addr` valid.
pub const INFO_FLAG_MMAP: u32 = 1 << 6;

/// Bytes reserved for the information structure (up to and including the
/// VBE fields of 0.6.96, all zero except the ones we set).
const INFO_STRUCT_LEN: u64 = 88;
/// Bytes of one memory-map entry including its size prefix.
const MMAP_ENTRY_LEN: u64 = 24;
/// End of conventional memory given to the guest (the EBDA starts here).
const LOW_RAM_END: u64 = 0x9_FC00;
/// `mem_lower` reported to the guest: the classic 640 KiB of conventional
/// memory (the memory map is the precise statement, ending at the EBDA).
const MEM_LOWER_KIB: u32 = 640;
/// Start of the memory above the legacy hole.
const HIGH_RAM_START: u64 = 0x10_0000;
/// Guest RAM accepted by [`write_multiboot1_info`].
const MIN_RAM: u64 = 2 << 20;
const MAX_RAM: u64 = 4 << 30;
/// Pass-through: the window the information structure goes in first (see
/// [`crate::linux::LOW_WINDOW`] for why these bounds).
const LOW_WINDOW: (u64, u64) = crate::linux::LOW_WINDOW;
/// Pass-through: `mem_lower` counts at most 640 KiB (Multiboot 0.6.96, 3.3).
const LOW_RAM_LIMIT: u64 = 640 * 1024;
const FOUR_GIB: u64 = 1 << 32;

/// Where the loaded kernel starts and how far it extends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Guest-physical entry point (entered in 32-bit protected mode).
    pub entry: u32,
    /// One past the highest byte loaded or zeroed (bss).
    pub load_end: u64,
}

/// Which part of the image an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    /// ELF program header number `n` (0-based).
    ElfProgramHeader(usize),
    /// The bytes the a.out-kludge header says to load.
    AoutImage,
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Segment::ElfProgramHeader(n) => write!(f, "ELF program header {n}"),
            Segment::AoutImage => write!(f, "a.out-kludge load area"),
        }
    }
}

/// The first bytes of every ELF file.
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// Why a guest kernel could not be loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// No multiboot header magic in the first 8192 bytes.
    NoMultibootHeader,
    /// A header magic was found (at this offset) but its checksum is wrong.
    BadChecksum { offset: usize },
    /// The header requires features (these flag bits) we do not provide.
    UnsupportedFlags(u32),
    /// The header's a.out-kludge fields run past the end of the image.
    HeaderTruncated,
    /// No a.out kludge, and the image is not ELF.
    NotElf,
    /// ELF class byte is neither 32- nor 64-bit.
    BadElfClass(u8),
    /// ELF file is big-endian.
    BigEndianElf,
    /// ELF file is for another machine (class in bits, e_machine).
    BadMachine { bits: u8, machine: u16 },
    /// ELF file is not an executable (its e_type).
    NotExecutable(u16),
    /// ELF headers are malformed.
    MalformedElf(&'static str),
    /// Nothing to load.
    NoLoadableSegments,
    /// A segment has more bytes in the file than in memory.
    FileLargerThanMemory {
        segment: Segment,
        filesz: u64,
        memsz: u64,
    },
    /// The a.out-kludge addresses contradict each other.
    BadAoutAddresses(&'static str),
    /// A segment's file bytes lie outside the image.
    SegmentOutsideImage {
        segment: Segment,
        offset: u64,
        size: u64,
        image_len: u64,
    },
    /// A segment's memory lies outside guest RAM.
    SegmentOutsideRam {
        segment: Segment,
        addr: u64,
        size: u64,
        ram_len: u64,
    },
    /// The entry point is not inside a loaded segment below 4 GiB.
    BadEntry(u64),
    /// The information structure address is not 4 KiB aligned.
    InfoMisaligned(u64),
    /// The information structure would not lie inside guest RAM.
    InfoOutsideRam { at: u64, size: u64 },
    /// Guest RAM is below 2 MiB or above 4 GiB.
    BadRamSize(u64),
    /// Pass-through: a segment's memory is not entirely usable RAM; `at` is
    /// the first offending address (one in thinvisor's memory if any is).
    SegmentNotUsable {
        segment: Segment,
        addr: u64,
        size: u64,
        at: u64,
        why: Unusable,
    },
    /// Pass-through: no usable RAM below 4 GiB holds the information
    /// structure (`size` bytes) away from the kernel.
    NoRoomForInfo { size: u64 },
    /// Pass-through: more ranges to keep clear than [`MAX_AVOID`].
    TooManyAvoidRanges(usize),
    /// The target refused a write.
    Write(PhysWriteError),
}

impl From<PhysWriteError> for LoadError {
    fn from(e: PhysWriteError) -> Self {
        LoadError::Write(e)
    }
}

impl core::error::Error for LoadError {}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LoadError::NoMultibootHeader => write!(
                f,
                "guest kernel has no multiboot header in its first {HEADER_SEARCH_LEN} bytes"
            ),
            LoadError::BadChecksum { offset } => write!(
                f,
                "guest kernel's multiboot header at offset {offset:#x} has a wrong checksum"
            ),
            LoadError::UnsupportedFlags(bits) => write!(
                f,
                "guest kernel's multiboot header requires features this loader lacks (flag bits {bits:#x})"
            ),
            LoadError::HeaderTruncated => write!(
                f,
                "guest kernel's multiboot header is cut off by the end of the file"
            ),
            LoadError::NotElf => write!(
                f,
                "guest module is not an ELF file and has no multiboot header with the a.out kludge either"
            ),
            LoadError::BadElfClass(class) => {
                write!(f, "guest kernel is an ELF file of unknown class {class}")
            }
            LoadError::BigEndianElf => write!(f, "guest kernel is a big-endian ELF file, not x86"),
            LoadError::BadMachine { bits, machine } => write!(
                f,
                "guest kernel is a {bits}-bit ELF file for machine {machine}, not x86 (ELF32) or x86-64 (ELF64)"
            ),
            LoadError::NotExecutable(ty) => write!(
                f,
                "guest kernel is an ELF file of type {ty}, not an executable (link it with -C relocation-model=static)"
            ),
            LoadError::MalformedElf(why) => write!(f, "guest kernel is a malformed ELF file: {why}"),
            LoadError::NoLoadableSegments => {
                write!(f, "guest kernel has no loadable segment")
            }
            LoadError::FileLargerThanMemory { segment, filesz, memsz } => write!(
                f,
                "guest kernel's {segment} has more bytes in the file ({filesz:#x}) than in memory ({memsz:#x})"
            ),
            LoadError::BadAoutAddresses(why) => {
                write!(f, "guest kernel's a.out-kludge header is inconsistent: {why}")
            }
            LoadError::SegmentOutsideImage { segment, offset, size, image_len } => write!(
                f,
                "guest kernel's {segment} (file bytes {offset:#x}+{size:#x}) lies outside the {image_len:#x}-byte file"
            ),
            LoadError::SegmentOutsideRam { segment, addr, size, ram_len } => write!(
                f,
                "guest kernel's {segment} ({addr:#x}+{size:#x}) does not fit in the guest's {ram_len:#x} bytes of RAM (raise guest_mem=)"
            ),
            LoadError::BadEntry(entry) => write!(
                f,
                "guest kernel's entry point {entry:#x} is not inside a loaded segment below 4 GiB"
            ),
            LoadError::InfoMisaligned(at) => {
                write!(f, "multiboot information address {at:#x} is not 4 KiB aligned")
            }
            LoadError::InfoOutsideRam { at, size } => write!(
                f,
                "multiboot information ({at:#x}+{size:#x}) does not fit in guest RAM"
            ),
            LoadError::BadRamSize(len) => write!(
                f,
                "guest RAM of {len:#x} bytes is unusable for a multiboot guest (2 MiB to 4 GiB)"
            ),
            LoadError::SegmentNotUsable { segment, addr, size, at, why } => write!(
                f,
                "guest kernel's {segment} ({addr:#x}+{size:#x}) cannot be loaded: {at:#x} is {why}"
            ),
            LoadError::NoRoomForInfo { size } => write!(
                f,
                "no usable RAM below 4 GiB for the multiboot information ({size:#x} bytes) away from the kernel"
            ),
            LoadError::TooManyAvoidRanges(n) => write!(
                f,
                "{n} ranges to keep clear, at most {MAX_AVOID} are supported"
            ),
            LoadError::Write(e) => write!(f, "loading the guest kernel: {e}"),
        }
    }
}

/// Where a kernel's segments may go.
#[derive(Clone, Copy)]
enum Space<'a> {
    /// The isolated layout: guest RAM `[0, len)`.
    Ram(u64),
    /// The pass-through layout: the usable RAM of a [`GuestMap`], away from
    /// the boot modules still being read.
    Map {
        map: &'a GuestMap,
        avoid: &'a [(u64, u64)],
    },
}

impl Space<'_> {
    /// Whether `size` bytes at `addr` may be loaded.
    fn check(&self, segment: Segment, addr: u64, size: u64) -> Result<(), LoadError> {
        if size == 0 {
            return Ok(());
        }
        match *self {
            Space::Ram(ram_len) => {
                if addr.checked_add(size).is_none_or(|end| end > ram_len) {
                    return Err(LoadError::SegmentOutsideRam {
                        segment,
                        addr,
                        size,
                        ram_len,
                    });
                }
            }
            Space::Map { map, avoid } => {
                let fail = |at, why| LoadError::SegmentNotUsable {
                    segment,
                    addr,
                    size,
                    at,
                    why,
                };
                map.check_usable(addr, size)
                    .map_err(|(at, why)| fail(at, why))?;
                // check_usable passed, so addr + size does not overflow.
                let end = addr + size;
                if let Some(&(s, _)) = avoid
                    .iter()
                    .filter(|&&(s, e)| s < end && addr < e)
                    .min_by_key(|&&(s, _)| s)
                {
                    return Err(fail(s.max(addr), Unusable::Source));
                }
            }
        }
        Ok(())
    }
}

/// A kernel whose segments were checked and written.
#[derive(Clone, Copy, Debug)]
struct Loaded {
    entry: u32,
    /// Lowest byte loaded.
    start: u64,
    /// One past the highest.
    end: u64,
}

impl From<Loaded> for LoadedKernel {
    fn from(k: Loaded) -> Self {
        LoadedKernel {
            entry: k.entry,
            load_end: k.end,
        }
    }
}

/// Loads a multiboot v1 kernel `image` into guest RAM `ram` (guest-physical
/// address 0 is `ram[0]`). Nothing is written unless the whole image is valid.
pub fn load_multiboot_kernel(image: &[u8], ram: &mut [u8]) -> Result<LoadedKernel, LoadError> {
    let space = Space::Ram(ram.len() as u64);
    load_kernel(image, space, &mut RamSlice::new(0, ram)).map(LoadedKernel::from)
}

/// A multiboot kernel loaded in the pass-through layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlacedKernel {
    /// Physical entry point (entered in 32-bit protected mode).
    pub entry: u32,
    /// The span of its segments `[start, end)` (bss included).
    pub start: u64,
    pub end: u64,
}

/// Pass-through layout: loads a multiboot v1 kernel `image` at the physical
/// addresses its ELF program headers (or a.out-kludge header) give, through
/// `target`. Every segment must lie entirely in `map`'s usable RAM (so never
/// in a hidden range) and outside every `avoid` range (at most
/// [`MAX_AVOID`]: the boot modules being read from); the error names the
/// segment and the first offending address. Nothing is written unless every
/// segment checks out.
pub fn load_multiboot_kernel_passthrough(
    image: &[u8],
    map: &GuestMap,
    avoid: &[(u64, u64)],
    target: &mut dyn PhysWrite,
) -> Result<PlacedKernel, LoadError> {
    if avoid.len() > MAX_AVOID {
        return Err(LoadError::TooManyAvoidRanges(avoid.len()));
    }
    let k = load_kernel(image, Space::Map { map, avoid }, target)?;
    Ok(PlacedKernel {
        entry: k.entry,
        start: k.start,
        end: k.end,
    })
}

fn load_kernel(
    image: &[u8],
    space: Space<'_>,
    target: &mut dyn PhysWrite,
) -> Result<Loaded, LoadError> {
    let (offset, flags) = find_header(image).map_err(|e| match e {
        // Neither kind of kernel: say what the file is not.
        LoadError::NoMultibootHeader if !image.starts_with(ELF_MAGIC) => LoadError::NotElf,
        e => e,
    })?;
    let unknown = flags & REQUIRED_MASK & !SUPPORTED_REQUIRED;
    if unknown != 0 {
        return Err(LoadError::UnsupportedFlags(unknown));
    }
    if flags & HEADER_FLAG_AOUT_KLUDGE != 0 {
        load_aout(image, offset, space, target)
    } else {
        load_elf(image, space, target)
    }
}

/// Finds the first 4-byte aligned header with a valid checksum; returns its
/// offset and flags.
fn find_header(image: &[u8]) -> Result<(usize, u32), LoadError> {
    let area = image.get(..HEADER_SEARCH_LEN).unwrap_or(image);
    let mut bad_checksum = None;
    for (index, chunk) in area.chunks_exact(4).enumerate() {
        let offset = index * 4;
        if le32(chunk, 0) != HEADER_MAGIC {
            continue;
        }
        let Some(header) = area.get(offset..offset + 12) else {
            break;
        };
        let flags = le32(header, 4);
        let checksum = le32(header, 8);
        if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) == 0 {
            return Ok((offset, flags));
        }
        bad_checksum.get_or_insert(offset);
    }
    Err(match bad_checksum {
        Some(offset) => LoadError::BadChecksum { offset },
        None => LoadError::NoMultibootHeader,
    })
}

/// Loads using the header's address fields (flag bit 16).
fn load_aout(
    image: &[u8],
    offset: usize,
    space: Space<'_>,
    target: &mut dyn PhysWrite,
) -> Result<Loaded, LoadError> {
    let fields = offset
        .checked_add(32)
        .and_then(|end| image.get(offset..end))
        .ok_or(LoadError::HeaderTruncated)?;
    let header_addr = u64::from(le32(fields, 12));
    let load_addr = u64::from(le32(fields, 16));
    let load_end_addr = u64::from(le32(fields, 20));
    let bss_end_addr = u64::from(le32(fields, 24));
    let entry_addr = le32(fields, 28);
    let image_len = image.len() as u64;
    let segment = Segment::AoutImage;

    // The header's own address fixes where in the file loading starts.
    let before_header = header_addr
        .checked_sub(load_addr)
        .ok_or(LoadError::BadAoutAddresses(
            "load_addr lies above header_addr",
        ))?;
    let file_start =
        (offset as u64)
            .checked_sub(before_header)
            .ok_or(LoadError::BadAoutAddresses(
                "load_addr lies before the start of the file",
            ))?;
    let file_size = if load_end_addr == 0 {
        image_len - file_start
    } else {
        load_end_addr
            .checked_sub(load_addr)
            .ok_or(LoadError::BadAoutAddresses(
                "load_end_addr lies below load_addr",
            ))?
    };
    let load_end = load_addr.saturating_add(file_size);
    let mem_end = if bss_end_addr == 0 {
        load_end
    } else if bss_end_addr < load_end {
        return Err(LoadError::BadAoutAddresses(
            "bss_end_addr lies below the end of the loaded data",
        ));
    } else {
        bss_end_addr
    };

    let file = range_in(image, file_start, file_size).ok_or(LoadError::SegmentOutsideImage {
        segment,
        offset: file_start,
        size: file_size,
        image_len,
    })?;
    let mem_size = mem_end - load_addr;
    space.check(segment, load_addr, mem_size)?;
    if !(load_addr..mem_end).contains(&u64::from(entry_addr)) {
        return Err(LoadError::BadEntry(entry_addr.into()));
    }

    copy_segment(target, load_addr, file, mem_size)?;
    Ok(Loaded {
        entry: entry_addr,
        start: load_addr,
        end: mem_end,
    })
}

/// One PT_LOAD segment, checked.
#[derive(Clone, Copy)]
struct LoadSegment {
    paddr: u64,
    offset: u64,
    filesz: u64,
    memsz: u64,
}

/// Loads each PT_LOAD segment of an ELF32/ELF64 image at its physical address.
fn load_elf(
    image: &[u8],
    space: Space<'_>,
    target: &mut dyn PhysWrite,
) -> Result<Loaded, LoadError> {
    if image.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(LoadError::NotElf);
    }
    // Checked before parsing: a big-endian file's headers read as garbage.
    if image.get(5) == Some(&2) {
        return Err(LoadError::BigEndianElf);
    }
    let file = ElfBytes::<AnyEndian>::minimal_parse(image).map_err(elf_error)?;
    let ehdr = &file.ehdr;
    if ehdr.endianness == AnyEndian::Big {
        return Err(LoadError::BigEndianElf);
    }
    let bits = match ehdr.class {
        Class::ELF32 => 32,
        Class::ELF64 => 64,
    };
    match (ehdr.class, ehdr.e_machine) {
        (Class::ELF32, EM_386) | (Class::ELF64, EM_X86_64) => {}
        (_, machine) => return Err(LoadError::BadMachine { bits, machine }),
    }
    if ehdr.e_type != ET_EXEC {
        return Err(LoadError::NotExecutable(ehdr.e_type));
    }
    let table = file.segments().ok_or(LoadError::NoLoadableSegments)?;
    let image_len = image.len() as u64;

    // First pass: check everything and find the entry point and the span.
    let mut entry = None;
    let mut load_start = u64::MAX;
    let mut load_end = 0u64;
    let mut loadable = 0usize;
    for index in 0..table.len() {
        let ph = table
            .get(index)
            .map_err(|_| LoadError::MalformedElf("a program header cannot be read"))?;
        if ph.p_type != PT_LOAD {
            continue;
        }
        let seg = check_segment(index, &ph, image_len, space)?;
        if seg.memsz == 0 {
            continue;
        }
        loadable += 1;
        load_start = load_start.min(seg.paddr);
        load_end = load_end.max(seg.paddr + seg.memsz);
        // The entry is a virtual address; translate it like GRUB does when a
        // kernel is linked high but loaded low.
        if entry.is_none() {
            let e = ehdr.e_entry;
            if let Some(off) = e.checked_sub(ph.p_vaddr).filter(|&off| off < seg.memsz) {
                entry = Some(seg.paddr + off);
            }
        }
    }
    if loadable == 0 {
        return Err(LoadError::NoLoadableSegments);
    }
    // A physical e_entry inside a segment is accepted too.
    let entry = match entry {
        Some(e) => e,
        None => {
            find_physical_entry(&table, ehdr.e_entry).ok_or(LoadError::BadEntry(ehdr.e_entry))?
        }
    };
    let entry = u32::try_from(entry).map_err(|_| LoadError::BadEntry(ehdr.e_entry))?;

    // Second pass: copy. Every check already passed.
    for index in 0..table.len() {
        let Ok(ph) = table.get(index) else { continue };
        if ph.p_type != PT_LOAD || ph.p_memsz == 0 {
            continue;
        }
        if let Ok(seg) = check_segment(index, &ph, image_len, space) {
            if let Some(file) = range_in(image, seg.offset, seg.filesz) {
                copy_segment(target, seg.paddr, file, seg.memsz)?;
            }
        }
    }
    Ok(Loaded {
        entry,
        start: load_start,
        end: load_end,
    })
}

fn find_physical_entry(
    table: &elf::segment::SegmentTable<'_, AnyEndian>,
    entry: u64,
) -> Option<u64> {
    table
        .iter()
        .filter(|ph| ph.p_type == PT_LOAD)
        .any(|ph| {
            entry
                .checked_sub(ph.p_paddr)
                .is_some_and(|off| off < ph.p_memsz)
        })
        .then_some(entry)
}

/// Checks that a segment's file bytes lie in the image and its memory in
/// the space it is loaded into.
fn check_segment(
    index: usize,
    ph: &ProgramHeader,
    image_len: u64,
    space: Space<'_>,
) -> Result<LoadSegment, LoadError> {
    let segment = Segment::ElfProgramHeader(index);
    let (paddr, offset, filesz, memsz) = (ph.p_paddr, ph.p_offset, ph.p_filesz, ph.p_memsz);
    if filesz > memsz {
        return Err(LoadError::FileLargerThanMemory {
            segment,
            filesz,
            memsz,
        });
    }
    if offset.checked_add(filesz).is_none_or(|end| end > image_len) {
        return Err(LoadError::SegmentOutsideImage {
            segment,
            offset,
            size: filesz,
            image_len,
        });
    }
    space.check(segment, paddr, memsz)?;
    Ok(LoadSegment {
        paddr,
        offset,
        filesz,
        memsz,
    })
}

fn elf_error(e: ParseError) -> LoadError {
    match e {
        ParseError::BadMagic(_) => LoadError::NotElf,
        ParseError::UnsupportedElfClass(class) => LoadError::BadElfClass(class),
        ParseError::UnsupportedElfEndianness(_) => LoadError::MalformedElf("unknown byte order"),
        ParseError::UnsupportedVersion(_) => LoadError::MalformedElf("unknown ELF version"),
        ParseError::BadEntsize(_) => {
            LoadError::MalformedElf("program or section header entries have the wrong size")
        }
        ParseError::BadOffset(_)
        | ParseError::SliceReadError(_)
        | ParseError::IntegerOverflow
        | ParseError::TryFromSliceError(_)
        | ParseError::TryFromIntError(_) => {
            LoadError::MalformedElf("the file is truncated or a header table lies outside it")
        }
        _ => LoadError::MalformedElf("its headers cannot be parsed"),
    }
}

/// `bytes[start..start + len]`, or `None` if any of it is out of bounds.
fn range_in(bytes: &[u8], start: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(start).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    bytes.get(start..end)
}

/// Copies `file` to physical `addr` and zeroes the rest of `mem_size` bytes
/// (bss). The caller has checked the range.
fn copy_segment(
    target: &mut dyn PhysWrite,
    addr: u64,
    file: &[u8],
    mem_size: u64,
) -> Result<(), PhysWriteError> {
    let data = (file.len() as u64).min(mem_size);
    let file = file.get(..data as usize).unwrap_or(&[]);
    target.write(addr, file)?;
    if mem_size > data {
        target.zero(addr.saturating_add(data), mem_size - data)?;
    }
    Ok(())
}

/// Writes a multiboot v1 information structure for the guest at
/// guest-physical `at` (4 KiB aligned, chosen by the caller past the
/// kernel's `load_end`): memory sizes, the command line (cut at its first
/// NUL) and a memory map of exactly the guest's RAM. Returns the address to
/// pass in EBX (with EAX = [`crate::multiboot1::MAGIC`]).
pub fn write_multiboot1_info(ram: &mut [u8], at: u64, cmdline: &[u8]) -> Result<u32, LoadError> {
    let ram_len = ram.len() as u64;
    if !(MIN_RAM..=MAX_RAM).contains(&ram_len) {
        return Err(LoadError::BadRamSize(ram_len));
    }
    if !at.is_multiple_of(crate::PAGE_SIZE) {
        return Err(LoadError::InfoMisaligned(at));
    }
    let cmdline = cmdline_text(cmdline);
    let mmap = [
        (0, LOW_RAM_END, MemKind::Available),
        (HIGH_RAM_START, ram_len - HIGH_RAM_START, MemKind::Available),
    ];
    let size = info_size(mmap.len(), cmdline);
    let end = at.checked_add(size);
    let in_low = end.is_some_and(|end| end <= LOW_RAM_END);
    let in_high = at >= HIGH_RAM_START && end.is_some_and(|end| end <= ram_len);
    if !(in_low || in_high) {
        return Err(LoadError::InfoOutsideRam { at, size });
    }
    let sizes = MemSizes {
        lower_kib: MEM_LOWER_KIB,
        upper_kib: ((ram_len - HIGH_RAM_START) / 1024) as u32,
    };
    write_info(&mut RamSlice::new(0, ram), at, sizes, &mmap, cmdline)
        .map_err(|_| LoadError::InfoOutsideRam { at, size })?;
    // Below 4 GiB: `end` is at most the RAM size, at most 4 GiB.
    Ok(at as u32)
}

/// Pass-through layout: writes a multiboot v1 information structure through
/// `target` whose memory map is `map`'s E820 table (the firmware's map with
/// thinvisor's memory reserved) and whose `mem_lower` / `mem_upper` are the
/// usable RAM from 0 and from 1 MiB up to the first hole (Multiboot
/// Specification 0.6.96, 3.3), with `cmdline` (cut at its first NUL).
///
/// It goes at the lowest page-aligned usable address in [0x10000, 0x90000)
/// (or, if that window is full, in [1 MiB, 4 GiB)) that overlaps no `avoid`
/// range (at most [`MAX_AVOID`] + 1): pass the boot modules still needed
/// and the kernel's span. Returns the address to pass in EBX.
pub fn write_multiboot1_info_passthrough(
    map: &GuestMap,
    avoid: &[(u64, u64)],
    cmdline: &[u8],
    target: &mut dyn PhysWrite,
) -> Result<u32, LoadError> {
    if avoid.len() > MAX_AVOID + 1 {
        return Err(LoadError::TooManyAvoidRanges(avoid.len()));
    }
    let mut taken = Taken::new();
    for &(s, e) in avoid {
        taken.push(s, e);
    }
    let cmdline = cmdline_text(cmdline);
    let mut mmap = [(0u64, 0u64, MemKind::Reserved); crate::e820::MAX_E820_ENTRIES];
    for (slot, e) in mmap.iter_mut().zip(map.e820()) {
        *slot = (e.addr, e.size, e.kind);
    }
    let mmap = mmap.get(..map.e820().len()).unwrap_or(&[]);
    let size = info_size(mmap.len(), cmdline);
    let want = |lo, hi| {
        Want {
            size,
            align: crate::PAGE_SIZE,
            lo,
            hi,
        }
        .lowest(map.usable(), &taken)
    };
    let at = want(LOW_WINDOW.0, LOW_WINDOW.1)
        .or_else(|| want(HIGH_RAM_START, FOUR_GIB))
        .ok_or(LoadError::NoRoomForInfo { size })?;
    let usable_from = |base: u64| {
        map.usable()
            .iter()
            .find(|&&(s, e)| s <= base && base < e)
            .map_or(0, |&(_, e)| e - base)
    };
    let sizes = MemSizes {
        lower_kib: (usable_from(0).min(LOW_RAM_LIMIT) / 1024) as u32,
        upper_kib: u32::try_from(usable_from(HIGH_RAM_START) / 1024).unwrap_or(u32::MAX),
    };
    write_info(target, at, sizes, mmap, cmdline)?;
    // The search stays below 4 GiB.
    Ok(at as u32)
}

/// What [`load_multiboot_passthrough`] did and how to start the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultibootBoot {
    /// The kernel's entry point and span.
    pub kernel: PlacedKernel,
    /// The information structure (also in EBX).
    pub info: u32,
    /// Entry state (Multiboot Specification 0.6.96, 3.2): EAX =
    /// [`crate::multiboot1::MAGIC`], EBX = the information, flat CS 0x08 and
    /// data 0x10 (the selectors are the loader's choice; the GDTR is
    /// undefined and the kernel must load its own).
    pub entry: Entry32,
}

/// Pass-through layout, all in one: loads the kernel
/// ([`load_multiboot_kernel_passthrough`]) and writes its information
/// ([`write_multiboot1_info_passthrough`]) away from the kernel and every
/// `avoid` range (at most [`MAX_AVOID`]).
///
/// ```no_run
/// use thinvisor_boot::e820::GuestMap;
/// use thinvisor_boot::guest::load_multiboot_passthrough;
/// use thinvisor_boot::phys::RamSlice;
/// # fn demo(
/// #     firmware_map: &[thinvisor_boot::MemRegion],
/// #     image: &[u8],
/// #     memory: &mut [u8],
/// # ) -> Result<(), Box<dyn core::error::Error>> {
/// let map = GuestMap::new(firmware_map, &[(0x20_0000, 0x60_0000)])?;
/// let module = (0x400_0000, 0x400_0000 + image.len() as u64);
/// let boot = load_multiboot_passthrough(
///     image,
///     b"test-guest.elf checks",
///     &map,
///     &[module],
///     &mut RamSlice::new(0, memory),
/// )?;
/// assert_eq!(boot.entry.eax, thinvisor_boot::multiboot1::MAGIC);
/// # Ok(())
/// # }
/// ```
pub fn load_multiboot_passthrough(
    image: &[u8],
    cmdline: &[u8],
    map: &GuestMap,
    avoid: &[(u64, u64)],
    target: &mut dyn PhysWrite,
) -> Result<MultibootBoot, LoadError> {
    let kernel = load_multiboot_kernel_passthrough(image, map, avoid, target)?;
    let mut clear = [(0u64, 0u64); MAX_AVOID + 1];
    let mut n = 0;
    for (slot, &r) in clear
        .iter_mut()
        .zip(avoid.iter().chain([(kernel.start, kernel.end)].iter()))
    {
        *slot = r;
        n += 1;
    }
    let info =
        write_multiboot1_info_passthrough(map, clear.get(..n).unwrap_or(&[]), cmdline, target)?;
    let mut entry = Entry32::new(kernel.entry, MULTIBOOT_CS, MULTIBOOT_DS);
    entry.eax = crate::multiboot1::MAGIC;
    entry.ebx = info;
    Ok(MultibootBoot {
        kernel,
        info,
        entry,
    })
}

/// Flat code and data selectors a multiboot kernel is started with.
pub const MULTIBOOT_CS: u16 = 0x08;
pub const MULTIBOOT_DS: u16 = 0x10;

/// `mem_lower` and `mem_upper`, in KiB.
#[derive(Clone, Copy)]
struct MemSizes {
    lower_kib: u32,
    upper_kib: u32,
}

/// Keeps a command line up to its first NUL.
fn cmdline_text(cmdline: &[u8]) -> &[u8] {
    cmdline.split(|&b| b == 0).next().unwrap_or(&[])
}

/// Bytes of an information structure with `entries` map entries and
/// `cmdline` (plus its NUL).
fn info_size(entries: usize, cmdline: &[u8]) -> u64 {
    INFO_STRUCT_LEN + entries as u64 * MMAP_ENTRY_LEN + cmdline.len() as u64 + 1
}

/// Writes the information structure at `at`: the structure, then the memory
/// map (size-prefixed entries), then the command line and its NUL; every
/// other field zero. Both layouts share this.
fn write_info(
    target: &mut dyn PhysWrite,
    at: u64,
    sizes: MemSizes,
    mmap: &[(u64, u64, MemKind)],
    cmdline: &[u8],
) -> Result<(), PhysWriteError> {
    let size = info_size(mmap.len(), cmdline);
    let mmap_at = at + INFO_STRUCT_LEN;
    let mmap_len = mmap.len() as u64 * MMAP_ENTRY_LEN;
    let cmdline_at = mmap_at + mmap_len;
    target.zero(at, size)?;

    let mut info = [0u8; INFO_STRUCT_LEN as usize];
    put32(
        &mut info,
        0,
        INFO_FLAG_MEM | INFO_FLAG_CMDLINE | INFO_FLAG_MMAP,
    );
    put32(&mut info, 4, sizes.lower_kib);
    put32(&mut info, 8, sizes.upper_kib);
    // The callers keep the structure below 4 GiB.
    put32(&mut info, 16, cmdline_at as u32);
    put32(&mut info, 44, mmap_len as u32);
    put32(&mut info, 48, mmap_at as u32);
    target.write(at, &info)?;
    for (i, &(start, len, kind)) in mmap.iter().enumerate() {
        let mut entry = [0u8; MMAP_ENTRY_LEN as usize];
        put32(&mut entry, 0, (MMAP_ENTRY_LEN - 4) as u32);
        put64(&mut entry, 4, start);
        put64(&mut entry, 12, len);
        put32(&mut entry, 20, kind.e820_type());
        target.write(mmap_at + i as u64 * MMAP_ENTRY_LEN, &entry)?;
    }
    // The NUL after it is already there from the zeroing.
    target.write(cmdline_at, cmdline)
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = at
        .checked_add(bytes.len())
        .and_then(|end| buf.get_mut(at..end))
    {
        dst.copy_from_slice(bytes);
    }
}

fn put32(buf: &mut [u8], at: usize, value: u32) {
    put(buf, at, &value.to_le_bytes());
}

fn put64(buf: &mut [u8], at: usize, value: u64) {
    put(buf, at, &value.to_le_bytes());
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(src) = bytes.get(at..at + 4) {
        b.copy_from_slice(src);
    }
    u32::from_le_bytes(b)
}
