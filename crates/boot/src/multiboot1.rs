//! Multiboot v1 boot information (Multiboot Specification 0.6.96, section 3.3),
//! as given by QEMU `-kernel` and GRUB's `multiboot` command.
//!
//! The structure is a web of 32-bit physical pointers, so it is read through
//! [`PhysRead`]: the hypervisor reads physical memory, tests read a buffer,
//! and every pointer the boot loader gave may be garbage.

use crate::info::MODULE_STRING_CAP;
use crate::info::{str_from_boot, BootInfo, BootInfoError, MemKind, MemRegion, CMDLINE_CAP};

/// What the boot loader leaves in EAX for a multiboot v1 kernel.
pub const MAGIC: u32 = 0x2BAD_B002;

/// `flags` bit: `mem_lower` / `mem_upper` are valid.
pub const FLAG_MEM: u32 = 1 << 0;
/// `flags` bit: `cmdline` is valid.
pub const FLAG_CMDLINE: u32 = 1 << 2;
/// `flags` bit: `mods_count` / `mods_addr` are valid.
pub const FLAG_MODS: u32 = 1 << 3;
/// `flags` bit: `mmap_length` / `mmap_addr` are valid.
pub const FLAG_MMAP: u32 = 1 << 6;

/// Bytes of the information structure this parser reads (up to `mmap_addr`).
const INFO_LEN: usize = 52;
/// Bytes of one module-list entry.
const MODULE_ENTRY_LEN: u64 = 16;
/// Smallest `size` of a memory-map entry (base, length, type).
const MMAP_ENTRY_MIN: u32 = 20;
/// Memory-map entries read at most, so a huge `mmap_length` cannot make the
/// parser loop for minutes.
const MMAP_MAX_RAW_ENTRIES: usize = 4096;

/// Reads physical memory on behalf of the parser.
pub trait PhysRead {
    /// Fills `buf` from physical address `pa`; `false` if any of it cannot be read.
    fn read(&self, pa: u64, buf: &mut [u8]) -> bool;
}

/// Parses the multiboot v1 information structure at physical address `info_pa`.
pub fn parse(info_pa: u64, mem: &dyn PhysRead) -> Result<BootInfo, BootInfoError> {
    let mut info = BootInfo::new();
    let mut raw = [0u8; INFO_LEN];
    read(mem, info_pa, &mut raw, "multiboot information")?;
    let mut span = Span::new(info_pa, INFO_LEN as u64);

    let flags = le32(&raw, 0);

    if flags & FLAG_CMDLINE != 0 {
        let pa = u64::from(le32(&raw, 16));
        let mut buf = [0u8; CMDLINE_CAP];
        let (len, cut) = read_cstr(mem, pa, &mut buf, "command line")?;
        let text = str_from_boot(buf.get(..len).unwrap_or(&[]), cut, "command line")?;
        info.set_cmdline(text);
        if cut {
            info.mark_truncated();
        }
        span.add(pa, len as u64 + u64::from(!cut));
    }

    if flags & FLAG_MODS != 0 {
        let count = le32(&raw, 20);
        let list_pa = u64::from(le32(&raw, 24));
        if count as usize > crate::info::MAX_MODULES {
            return Err(BootInfoError::TooManyModules(count.into()));
        }
        for i in 0..u64::from(count) {
            // Cannot overflow: list_pa < 2^32 and i < 16.
            let entry_pa = list_pa + i * MODULE_ENTRY_LEN;
            let mut entry = [0u8; MODULE_ENTRY_LEN as usize];
            read(mem, entry_pa, &mut entry, "module list")?;
            let (start, end) = (u64::from(le32(&entry, 0)), u64::from(le32(&entry, 4)));
            let string_pa = u64::from(le32(&entry, 8));
            let mut buf = [0u8; MODULE_STRING_CAP];
            let (len, cut) = if string_pa == 0 {
                (0, false)
            } else {
                read_cstr(mem, string_pa, &mut buf, "module string")?
            };
            let text = str_from_boot(buf.get(..len).unwrap_or(&[]), cut, "module string")?;
            info.push_module(start, end, text)?;
            if cut {
                info.mark_truncated();
            }
            if string_pa != 0 {
                span.add(string_pa, len as u64 + u64::from(!cut));
            }
        }
        span.add(list_pa, u64::from(count) * MODULE_ENTRY_LEN);
    }

    if flags & FLAG_MMAP != 0 {
        let length = u64::from(le32(&raw, 44));
        let map_pa = u64::from(le32(&raw, 48));
        parse_mmap(mem, map_pa, length, &mut info)?;
        span.add(map_pa, length);
    } else if flags & FLAG_MEM != 0 {
        // No map: the two classic ranges are all we know to be RAM.
        let lower = u64::from(le32(&raw, 4)) * 1024;
        let upper = u64::from(le32(&raw, 8)) * 1024;
        info.push_region(MemRegion {
            start: 0,
            len: lower,
            kind: MemKind::Available,
        })?;
        info.push_region(MemRegion {
            start: 0x10_0000,
            len: upper,
            kind: MemKind::Available,
        })?;
    } else {
        return Err(BootInfoError::NoMemoryMap);
    }

    info.set_info_range(span.lo, span.hi);
    Ok(info)
}

/// Walks the size-prefixed memory map: each entry is `size` (u32, not
/// counting itself) followed by base (u64), length (u64) and type (u32).
fn parse_mmap(
    mem: &dyn PhysRead,
    map_pa: u64,
    length: u64,
    info: &mut BootInfo,
) -> Result<(), BootInfoError> {
    let mut offset = 0u64;
    let mut entries = 0usize;
    while offset < length {
        entries += 1;
        if entries > MMAP_MAX_RAW_ENTRIES {
            return Err(BootInfoError::TooManyRegions);
        }
        // Cannot overflow: both terms are below 2^33.
        let entry_pa = map_pa + offset;
        let mut size = [0u8; 4];
        read(mem, entry_pa, &mut size, "memory map")?;
        let size = u32::from_le_bytes(size);
        let next = offset + 4 + u64::from(size);
        if size < MMAP_ENTRY_MIN || next > length {
            return Err(BootInfoError::BadMmapEntry { offset, size });
        }
        let mut body = [0u8; MMAP_ENTRY_MIN as usize];
        read(mem, entry_pa + 4, &mut body, "memory map")?;
        let start = le64(&body, 0);
        // A range running past the top of the address space is cut there.
        let len = le64(&body, 8).min(u64::MAX - start);
        let kind = MemKind::from_multiboot(le32(&body, 16));
        info.push_region(MemRegion { start, len, kind })?;
        offset = next;
    }
    Ok(())
}

fn read(
    mem: &dyn PhysRead,
    pa: u64,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), BootInfoError> {
    if mem.read(pa, buf) {
        Ok(())
    } else {
        Err(BootInfoError::Unreadable { what, addr: pa })
    }
}

/// Reads a NUL-terminated string into `buf`; returns its length (without the
/// NUL) and whether it was cut at `buf.len()` bytes.
fn read_cstr(
    mem: &dyn PhysRead,
    pa: u64,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(usize, bool), BootInfoError> {
    for (i, slot) in buf.iter_mut().enumerate() {
        let addr = pa
            .checked_add(i as u64)
            .ok_or(BootInfoError::Unreadable { what, addr: pa })?;
        let mut byte = [0u8; 1];
        read(mem, addr, &mut byte, what)?;
        if byte[0] == 0 {
            return Ok((i, false));
        }
        *slot = byte[0];
    }
    Ok((buf.len(), true))
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(src) = bytes.get(at..at + 4) {
        b.copy_from_slice(src);
    }
    u32::from_le_bytes(b)
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(src) = bytes.get(at..at + 8) {
        b.copy_from_slice(src);
    }
    u64::from_le_bytes(b)
}

/// Smallest range covering every piece of the information that was read.
struct Span {
    lo: u64,
    hi: u64,
}

impl Span {
    fn new(start: u64, len: u64) -> Self {
        Span {
            lo: start,
            hi: start.saturating_add(len),
        }
    }

    fn add(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.lo = self.lo.min(start);
        self.hi = self.hi.max(start.saturating_add(len));
    }
}
