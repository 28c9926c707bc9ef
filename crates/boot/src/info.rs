//! [`BootInfo`]: a fixed-size copy of what the boot loader handed over, in a
//! form that does not depend on which boot protocol delivered it.
//!
//! It is a copy (not a view) so that the memory holding the boot loader's
//! structures can be reused once parsing is done, and it has fixed capacity
//! because nothing can be allocated before the frame allocator exists.

use core::fmt;

/// Bytes of command line kept.
pub const CMDLINE_CAP: usize = 1024;
/// Memory-map entries kept (after merging adjacent entries of one kind).
pub const MAX_REGIONS: usize = 128;
/// Boot modules kept.
pub const MAX_MODULES: usize = 16;
/// Bytes of each module's string kept.
pub const MODULE_STRING_CAP: usize = 256;

/// What a memory-map entry says about its range (the e820/multiboot types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemKind {
    /// RAM free for use (type 1).
    Available,
    /// Not to be used (type 2, and every type this crate does not know).
    Reserved,
    /// RAM holding ACPI tables, usable once they are no longer needed (type 3).
    AcpiReclaimable,
    /// Must be preserved across sleep states (type 4).
    AcpiNvs,
    /// Defective RAM (type 5).
    Bad,
}

impl MemKind {
    /// Maps a multiboot / e820 type number; unknown types are reserved, the
    /// only safe reading of a type we do not understand.
    pub fn from_multiboot(ty: u32) -> Self {
        match ty {
            1 => MemKind::Available,
            3 => MemKind::AcpiReclaimable,
            4 => MemKind::AcpiNvs,
            5 => MemKind::Bad,
            _ => MemKind::Reserved,
        }
    }

    /// The E820 / multiboot type number of this kind (the inverse of
    /// [`from_multiboot`](Self::from_multiboot) for the kinds it keeps).
    pub fn e820_type(self) -> u32 {
        match self {
            MemKind::Available => 1,
            MemKind::Reserved => 2,
            MemKind::AcpiReclaimable => 3,
            MemKind::AcpiNvs => 4,
            MemKind::Bad => 5,
        }
    }
}

/// One memory-map entry: `len` bytes from physical address `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    /// First physical address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the range is.
    pub kind: MemKind,
}

impl MemRegion {
    /// One past the last byte, saturating at the top of the address space
    /// (firmware maps are not trusted to stay below it).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// A boot module (the guest kernel, an initrd, ...) the boot loader loaded.
#[derive(Clone, Copy)]
pub struct Module {
    /// First physical address of the module's bytes.
    pub start: u64,
    /// One past its last byte.
    pub end: u64,
    string: [u8; MODULE_STRING_CAP],
    string_len: usize,
}

impl Module {
    /// The module's string (its path and arguments with QEMU and GRUB).
    pub fn string(&self) -> &str {
        valid_prefix(self.string.get(..self.string_len).unwrap_or(&[]))
    }

    /// Size of the module in bytes.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the module holds no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Module")
            .field("start", &self.start)
            .field("end", &self.end)
            .field("string", &self.string())
            .finish()
    }
}

/// Why the boot loader's information could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    /// The boot information pointer is null.
    NullPointer,
    /// The boot information is not at an address the protocol allows.
    Misaligned(u64),
    /// A piece of the information could not be read (`what`, at `addr`).
    Unreadable { what: &'static str, addr: u64 },
    /// The structure's size field is impossible.
    BadTotalSize(u32),
    /// A multiboot2 tag is malformed; `offset` is from the start of the info.
    BadTag { offset: u64, ty: u32, size: u32 },
    /// thinvisor's resume tag is malformed.
    Resume(crate::resume::ResumeError),
    /// The multiboot2 information does not end with an end tag.
    NoEndTag,
    /// A memory-map entry has an impossible size; `offset` within the map.
    BadMmapEntry { offset: u64, size: u32 },
    /// The memory map uses an entry size this parser does not know.
    UnsupportedMmapEntrySize(u32),
    /// More memory-map entries than [`MAX_REGIONS`] (after merging).
    TooManyRegions,
    /// More boot modules than [`MAX_MODULES`].
    TooManyModules(u64),
    /// A module ends before it starts.
    BadModule { index: usize, start: u64, end: u64 },
    /// A string is not NUL-terminated within its tag.
    UnterminatedString(&'static str),
    /// A string is not valid UTF-8.
    NotUtf8(&'static str),
    /// Neither a memory map nor basic memory information was given.
    NoMemoryMap,
}

impl fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BootInfoError::NullPointer => write!(f, "boot information pointer is null"),
            BootInfoError::Misaligned(pa) => {
                write!(f, "boot information at {pa:#x} is not 8-byte aligned")
            }
            BootInfoError::Unreadable { what, addr } => {
                write!(f, "cannot read the {what} at physical address {addr:#x}")
            }
            BootInfoError::BadTotalSize(size) => {
                write!(
                    f,
                    "boot information claims an impossible total size of {size} bytes"
                )
            }
            BootInfoError::BadTag { offset, ty, size } => write!(
                f,
                "malformed boot information tag at offset {offset:#x} (type {ty}, size {size})"
            ),
            BootInfoError::NoEndTag => write!(f, "boot information has no end tag"),
            BootInfoError::Resume(e) => write!(f, "{e}"),
            BootInfoError::BadMmapEntry { offset, size } => write!(
                f,
                "memory map entry at offset {offset:#x} has an impossible size of {size} bytes"
            ),
            BootInfoError::UnsupportedMmapEntrySize(size) => {
                write!(
                    f,
                    "memory map entries of {size} bytes are not supported (expected 24)"
                )
            }
            BootInfoError::TooManyRegions => {
                write!(f, "memory map has more than {MAX_REGIONS} entries")
            }
            BootInfoError::TooManyModules(n) => {
                write!(
                    f,
                    "{n} boot modules given, at most {MAX_MODULES} are supported"
                )
            }
            BootInfoError::BadModule { index, start, end } => write!(
                f,
                "boot module {index} ends ({end:#x}) before it starts ({start:#x})"
            ),
            BootInfoError::UnterminatedString(what) => {
                write!(f, "the {what} is not NUL-terminated")
            }
            BootInfoError::NotUtf8(what) => write!(f, "the {what} is not valid UTF-8"),
            BootInfoError::NoMemoryMap => {
                write!(f, "the boot loader gave no memory map and no memory sizes")
            }
        }
    }
}

/// A boot-protocol-neutral copy of the boot information.
#[derive(Clone)]
pub struct BootInfo {
    cmdline: [u8; CMDLINE_CAP],
    cmdline_len: usize,
    regions: [MemRegion; MAX_REGIONS],
    region_count: usize,
    modules: [Module; MAX_MODULES],
    module_count: usize,
    info_start: u64,
    info_end: u64,
    truncated: bool,
    rsdp: Option<u64>,
    resume: Option<crate::resume::ResumeState>,
}

const EMPTY_REGION: MemRegion = MemRegion {
    start: 0,
    len: 0,
    kind: MemKind::Reserved,
};

const EMPTY_MODULE: Module = Module {
    start: 0,
    end: 0,
    string: [0; MODULE_STRING_CAP],
    string_len: 0,
};

impl Default for BootInfo {
    fn default() -> Self {
        Self::new()
    }
}

impl BootInfo {
    /// An empty record, to be filled by a parser (or by hand, e.g. from a
    /// UEFI memory map).
    pub const fn new() -> Self {
        BootInfo {
            cmdline: [0; CMDLINE_CAP],
            cmdline_len: 0,
            regions: [EMPTY_REGION; MAX_REGIONS],
            region_count: 0,
            modules: [EMPTY_MODULE; MAX_MODULES],
            module_count: 0,
            info_start: 0,
            info_end: 0,
            truncated: false,
            rsdp: None,
            resume: None,
        }
    }

    /// The ACPI RSDP's physical address, when the loader gave one (a UEFI
    /// loader must: the firmware's RSDP is not in the BIOS areas).
    pub fn rsdp(&self) -> Option<u64> {
        self.rsdp
    }

    pub fn set_rsdp(&mut self, pa: u64) {
        self.rsdp = Some(pa);
    }

    /// The loader's state to resume as the guest ([`crate::resume`]).
    pub fn resume(&self) -> Option<&crate::resume::ResumeState> {
        self.resume.as_ref()
    }

    pub fn set_resume(&mut self, state: crate::resume::ResumeState) {
        self.resume = Some(state);
    }

    /// The hypervisor's command line.
    pub fn cmdline(&self) -> &str {
        valid_prefix(self.cmdline.get(..self.cmdline_len).unwrap_or(&[]))
    }

    /// The firmware's memory map, in the order given (adjacent entries of one
    /// kind merged). Entries may overlap and need not be sorted.
    pub fn memory_map(&self) -> &[MemRegion] {
        self.regions.get(..self.region_count).unwrap_or(&[])
    }

    /// The boot modules, in the boot loader's order.
    pub fn modules(&self) -> &[Module] {
        self.modules.get(..self.module_count).unwrap_or(&[])
    }

    /// Physical range `[start, end)` covering the boot information that was
    /// parsed (for multiboot v1 the span of the structure, its command line,
    /// module list, module strings and memory map); keep it out of allocation
    /// until this copy has been made.
    pub fn info_range(&self) -> (u64, u64) {
        (self.info_start, self.info_end)
    }

    /// Whether a string (command line or module string) was longer than its
    /// buffer and was cut.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// Replaces the command line. Text beyond [`CMDLINE_CAP`] bytes is cut
    /// (at a character boundary) and [`truncated`](Self::truncated) is set.
    pub fn set_cmdline(&mut self, text: &str) {
        let (len, cut) = copy_capped(text, &mut self.cmdline);
        self.cmdline_len = len;
        self.truncated |= cut;
    }

    /// Appends a memory-map entry. Empty entries are dropped, and an entry
    /// that continues the previous one with the same kind extends it, so long
    /// fragmented maps still fit.
    pub fn push_region(&mut self, region: MemRegion) -> Result<(), BootInfoError> {
        if region.len == 0 {
            return Ok(());
        }
        if let Some(last) = self
            .region_count
            .checked_sub(1)
            .and_then(|i| self.regions.get_mut(i))
        {
            if last.kind == region.kind && last.start.checked_add(last.len) == Some(region.start) {
                if let Some(len) = last.len.checked_add(region.len) {
                    last.len = len;
                    return Ok(());
                }
            }
        }
        let slot = self
            .regions
            .get_mut(self.region_count)
            .ok_or(BootInfoError::TooManyRegions)?;
        *slot = region;
        self.region_count += 1;
        Ok(())
    }

    /// Appends a boot module. Its string beyond [`MODULE_STRING_CAP`] bytes is
    /// cut and [`truncated`](Self::truncated) is set.
    pub fn push_module(&mut self, start: u64, end: u64, string: &str) -> Result<(), BootInfoError> {
        let index = self.module_count;
        if end < start {
            return Err(BootInfoError::BadModule { index, start, end });
        }
        let slot = self
            .modules
            .get_mut(index)
            .ok_or(BootInfoError::TooManyModules(index as u64 + 1))?;
        let (len, cut) = copy_capped(string, &mut slot.string);
        slot.start = start;
        slot.end = end;
        slot.string_len = len;
        self.truncated |= cut;
        self.module_count += 1;
        Ok(())
    }

    /// Notes that a string was cut before it reached this record.
    pub(crate) fn mark_truncated(&mut self) {
        self.truncated = true;
    }

    /// Records where the boot information lies (see [`info_range`](Self::info_range)).
    pub fn set_info_range(&mut self, start: u64, end: u64) {
        self.info_start = start;
        self.info_end = end.max(start);
    }
}

impl fmt::Debug for BootInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootInfo")
            .field("cmdline", &self.cmdline())
            .field("memory_map", &self.memory_map())
            .field("modules", &self.modules())
            .field("info_range", &self.info_range())
            .field("truncated", &self.truncated)
            .finish()
    }
}

/// Copies as much of `text` as fits into `buf`, cutting at a character
/// boundary; returns the length copied and whether anything was cut.
fn copy_capped(text: &str, buf: &mut [u8]) -> (usize, bool) {
    let mut len = text.len().min(buf.len());
    while !text.is_char_boundary(len) {
        len -= 1;
    }
    let (src, dst) = (text.as_bytes(), &mut *buf);
    if let (Some(s), Some(d)) = (src.get(..len), dst.get_mut(..len)) {
        d.copy_from_slice(s);
    }
    (len, len < text.len())
}

/// The longest valid UTF-8 prefix of `bytes` (all of it for what
/// [`copy_capped`] stored; the fallback only keeps the accessor total).
fn valid_prefix(bytes: &[u8]) -> &str {
    match core::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(bytes.get(..e.valid_up_to()).unwrap_or(&[])).unwrap_or(""),
    }
}

/// Turns a string read from the boot loader into `&str`. If it was cut at its
/// capacity (`cut`), a multi-byte character split by the cut is dropped;
/// otherwise invalid UTF-8 is an error.
pub(crate) fn str_from_boot<'a>(
    bytes: &'a [u8],
    cut: bool,
    what: &'static str,
) -> Result<&'a str, BootInfoError> {
    match core::str::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) if cut && e.error_len().is_none() => {
            Ok(core::str::from_utf8(bytes.get(..e.valid_up_to()).unwrap_or(&[])).unwrap_or(""))
        }
        Err(_) => Err(BootInfoError::NotUtf8(what)),
    }
}
