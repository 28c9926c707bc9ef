//! Multiboot2 boot information, as given by GRUB's `multiboot2` command.
//!
//! The `multiboot2` crate does the decoding, but it trusts tag sizes (it
//! asserts on impossible ones, and indexes with them). Boot information is
//! untrusted input here, so this module first walks the tag list itself and
//! checks every size the crate will rely on; only then does it hand the
//! pointer to the crate.

use crate::info::{str_from_boot, BootInfo, BootInfoError, MemKind, MemRegion};
use ::multiboot2::{BootInformation, BootInformationHeader, StringError};

/// What the boot loader leaves in EAX for a multiboot2 kernel.
pub const MAGIC: u32 = 0x36D7_6289;

/// Largest boot information accepted: far above what GRUB produces (a few
/// KiB, tens with an EFI memory map), low enough that a garbage size field
/// does not make us read across all of memory.
pub const MAX_TOTAL_SIZE: u32 = 1 << 20;

const TAG_END: u32 = 0;
const TAG_CMDLINE: u32 = 1;
const TAG_MODULE: u32 = 3;
const TAG_BASIC_MEMINFO: u32 = 4;
const TAG_MMAP: u32 = 6;
/// ACPI 1.0 and 2.0+ RSDP copies (multiboot2 specification 3.6.17/18):
/// how a UEFI loader passes the RSDP, which is not in the BIOS areas.
const TAG_ACPI_OLD: u32 = 14;
const TAG_ACPI_NEW: u32 = 15;

/// Bytes of a tag header (type, size).
const TAG_HEADER_LEN: usize = 8;
/// Bytes of the memory-map tag before its entries.
const MMAP_HEADER_LEN: usize = 16;
/// Bytes of a memory-map entry as the crate models it.
const MMAP_ENTRY_LEN: usize = 24;

/// Parses the multiboot2 information at `info_pa`.
///
/// # Safety
/// `info_pa` must be identity-mapped, and the whole structure (as many bytes
/// as its first `u32` says, up to [`MAX_TOTAL_SIZE`]) must be readable and
/// not modified while this runs.
pub unsafe fn parse(info_pa: u64) -> Result<BootInfo, BootInfoError> {
    if info_pa == 0 {
        return Err(BootInfoError::NullPointer);
    }
    if !info_pa.is_multiple_of(8) {
        return Err(BootInfoError::Misaligned(info_pa));
    }
    let addr = usize::try_from(info_pa).map_err(|_| BootInfoError::Unreadable {
        what: "multiboot2 information",
        addr: info_pa,
    })?;
    // Identity mapping: the physical address is the pointer.
    let ptr = core::ptr::with_exposed_provenance::<u8>(addr);
    // SAFETY: the caller guarantees the structure is mapped and readable; its
    // first 4 bytes (total_size) are always part of it, and it is 8-aligned.
    let total_size = unsafe { ptr.cast::<u32>().read() };
    if total_size < 16 || !total_size.is_multiple_of(8) || total_size > MAX_TOTAL_SIZE {
        return Err(BootInfoError::BadTotalSize(total_size));
    }
    // SAFETY: the caller guarantees `total_size` bytes from `ptr` are readable
    // and unchanged for the duration of this call.
    let bytes = unsafe { core::slice::from_raw_parts(ptr, total_size as usize) };
    validate(bytes)?;

    // SAFETY: the same bytes, now known to hold a well-formed tag list.
    let mbi = unsafe { BootInformation::load(ptr.cast::<BootInformationHeader>()) }
        .map_err(|_| BootInfoError::NoEndTag)?;

    let mut info = BootInfo::new();
    info.set_info_range(info_pa, info_pa.saturating_add(total_size.into()));

    if let Some(tag) = mbi.command_line_tag() {
        let text = crate_str(tag.cmdline(), "command line")?;
        info.set_cmdline(text);
    }

    for (index, module) in mbi.module_tags().enumerate() {
        if index >= crate::info::MAX_MODULES {
            return Err(BootInfoError::TooManyModules(
                mbi.module_tags().count() as u64
            ));
        }
        let text = crate_str(module.cmdline(), "module string")?;
        info.push_module(
            module.start_address().into(),
            module.end_address().into(),
            text,
        )?;
    }

    if let Some(tag) = mbi.memory_map_tag() {
        for area in tag.memory_areas() {
            let start = area.start_address();
            info.push_region(MemRegion {
                start,
                // A range running past the top of the address space is cut there.
                len: area.size().min(u64::MAX - start),
                kind: MemKind::from_multiboot(area.typ().into()),
            })?;
        }
    } else if let Some(tag) = mbi.basic_memory_info_tag() {
        info.push_region(MemRegion {
            start: 0,
            len: u64::from(tag.memory_lower()) * 1024,
            kind: MemKind::Available,
        })?;
        info.push_region(MemRegion {
            start: 0x10_0000,
            len: u64::from(tag.memory_upper()) * 1024,
            kind: MemKind::Available,
        })?;
    } else {
        return Err(BootInfoError::NoMemoryMap);
    }

    // Tags the crate does not model: walked raw (sizes validated above).
    let mut offset = 8usize;
    while let Some(ty) = bytes
        .get(offset..offset + 4)
        .map(|_| read_u32(bytes, offset))
    {
        let size = read_u32(bytes, offset + 4) as usize;
        let payload = bytes
            .get(offset + TAG_HEADER_LEN..offset + size)
            .unwrap_or(&[]);
        match ty {
            // The copy inside the information is a valid RSDP itself (its
            // tables' addresses are the firmware's): prefer 2.0+.
            TAG_ACPI_NEW | TAG_ACPI_OLD
                if !payload.is_empty() && (ty == TAG_ACPI_NEW || info.rsdp().is_none()) =>
            {
                info.set_rsdp(info_pa + (offset + TAG_HEADER_LEN) as u64);
            }
            crate::resume::TAG_RESUME => {
                let state = crate::resume::ResumeState::from_bytes(payload)
                    .map_err(BootInfoError::Resume)?;
                info.set_resume(state);
            }
            TAG_END => break,
            _ => {}
        }
        offset += (size + 7) & !7;
    }

    Ok(info)
}

fn crate_str<'a>(
    s: Result<&'a str, StringError>,
    what: &'static str,
) -> Result<&'a str, BootInfoError> {
    match s {
        Ok(s) => str_from_boot(s.as_bytes(), false, what),
        Err(StringError::MissingNul(_)) => Err(BootInfoError::UnterminatedString(what)),
        Err(_) => Err(BootInfoError::NotUtf8(what)),
    }
}

/// Checks the tag list in `bytes` (the whole structure, `total_size` long and
/// a multiple of 8) the way the `multiboot2` crate will walk it: every tag at
/// least a header long, padded to 8 bytes, inside the structure; the last one
/// an end tag; and the tags this parser reads with the sizes their layout needs.
fn validate(bytes: &[u8]) -> Result<(), BootInfoError> {
    let mut offset = 8usize;
    let mut last_type = None;
    while offset < bytes.len() {
        let ty = read_u32(bytes, offset);
        let size = read_u32(bytes, offset + 4);
        let bad = BootInfoError::BadTag {
            offset: offset as u64,
            ty,
            size,
        };
        let size_us = size as usize;
        let padded = size_us.checked_add(7).ok_or(bad)? & !7;
        if size_us < TAG_HEADER_LEN || padded > bytes.len() - offset {
            return Err(bad);
        }
        let ok = match ty {
            TAG_END => size_us == TAG_HEADER_LEN,
            TAG_CMDLINE => true,
            TAG_MODULE => size_us >= 16,
            TAG_BASIC_MEMINFO => size_us == 16,
            TAG_MMAP => {
                if size_us < MMAP_HEADER_LEN {
                    return Err(bad);
                }
                let entry_size = read_u32(bytes, offset + 8);
                if entry_size as usize != MMAP_ENTRY_LEN {
                    return Err(BootInfoError::UnsupportedMmapEntrySize(entry_size));
                }
                (size_us - MMAP_HEADER_LEN).is_multiple_of(MMAP_ENTRY_LEN)
            }
            _ => true,
        };
        if !ok {
            return Err(bad);
        }
        last_type = Some(ty);
        offset += padded;
    }
    if last_type != Some(TAG_END) {
        return Err(BootInfoError::NoEndTag);
    }
    Ok(())
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(src) = at.checked_add(4).and_then(|end| bytes.get(at..end)) {
        b.copy_from_slice(src);
    }
    u32::from_ne_bytes(b)
}
