//! thinvisor's image: an ELF64 whose loadable segments name the physical
//! addresses they must be loaded at (its 32-bit entry runs there with
//! paging off; hypervisor/linker.ld), as a multiboot2 loader would place
//! them.

use elf::abi::{EM_X86_64, ET_EXEC, PT_LOAD};
use elf::endian::LittleEndian;
use elf::ElfBytes;

/// Why an image cannot be loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageError {
    /// Not a little-endian ELF64 x86-64 executable.
    NotElf,
    /// No loadable segment.
    Empty,
    /// A segment's file bytes lie outside the file, or it ends above 4 GiB
    /// (the 32-bit entry cannot reach it), or its sizes are inconsistent.
    BadSegment { paddr: u64, memsz: u64 },
    /// The entry point is not inside a loaded segment below 4 GiB.
    BadEntry(u64),
}

impl core::fmt::Display for ImageError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ImageError::NotElf => write!(f, "not an x86-64 ELF executable"),
            ImageError::Empty => write!(f, "no loadable segment"),
            ImageError::BadSegment { paddr, memsz } => {
                write!(
                    f,
                    "segment at {paddr:#x} ({memsz:#x} bytes) cannot be loaded"
                )
            }
            ImageError::BadEntry(e) => write!(f, "entry point {e:#x} is not in a loaded segment"),
        }
    }
}

/// The most segments an image may have.
pub const MAX_SEGMENTS: usize = 8;

/// One loadable segment: `file` bytes of the image at `offset` go to
/// physical `paddr`, followed by zeros up to `memsz`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub paddr: u64,
    pub offset: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// Where an image goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    segments: [Segment; MAX_SEGMENTS],
    count: usize,
    /// The 32-bit entry point (physical: it runs with paging off).
    pub entry: u32,
}

impl Plan {
    /// Read the image's program headers.
    pub fn of(image: &[u8]) -> Result<Self, ImageError> {
        let file =
            ElfBytes::<LittleEndian>::minimal_parse(image).map_err(|_| ImageError::NotElf)?;
        if file.ehdr.e_machine != EM_X86_64 || file.ehdr.e_type != ET_EXEC {
            return Err(ImageError::NotElf);
        }
        let headers = file.segments().ok_or(ImageError::Empty)?;
        let mut plan = Plan {
            segments: [Segment::default(); MAX_SEGMENTS],
            count: 0,
            entry: 0,
        };
        for ph in headers
            .iter()
            .filter(|ph| ph.p_type == PT_LOAD && ph.p_memsz > 0)
        {
            let bad = ImageError::BadSegment {
                paddr: ph.p_paddr,
                memsz: ph.p_memsz,
            };
            let file_end = ph.p_offset.checked_add(ph.p_filesz).ok_or(bad)?;
            let end = ph.p_paddr.checked_add(ph.p_memsz).ok_or(bad)?;
            if ph.p_filesz > ph.p_memsz || file_end > image.len() as u64 || end > 1 << 32 {
                return Err(bad);
            }
            let slot = plan.segments.get_mut(plan.count).ok_or(bad)?;
            *slot = Segment {
                paddr: ph.p_paddr,
                offset: ph.p_offset,
                filesz: ph.p_filesz,
                memsz: ph.p_memsz,
            };
            plan.count += 1;
        }
        if plan.count == 0 {
            return Err(ImageError::Empty);
        }
        // The entry (`_start`) is linked at its load address.
        let entry = file.ehdr.e_entry;
        let inside = plan
            .segments()
            .iter()
            .any(|s| (s.paddr..s.paddr + s.memsz).contains(&entry));
        plan.entry = match u32::try_from(entry) {
            Ok(e) if inside => e,
            _ => return Err(ImageError::BadEntry(entry)),
        };
        Ok(plan)
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments[..self.count]
    }

    /// The physical range [start, end) the segments cover, rounded out to
    /// pages: what the caller reserves before [`Plan::load`].
    pub fn range(&self) -> (u64, u64) {
        let start = self.segments().iter().map(|s| s.paddr).min().unwrap_or(0);
        let end = self
            .segments()
            .iter()
            .map(|s| s.paddr + s.memsz)
            .max()
            .unwrap_or(0);
        (start & !0xFFF, end.next_multiple_of(0x1000))
    }

    /// Copy the image into place through `write(paddr, bytes)` (zeros for
    /// the bytes past each segment's file size).
    pub fn load(&self, image: &[u8], mut write: impl FnMut(u64, &[u8])) {
        const ZEROS: [u8; 4096] = [0; 4096];
        for s in self.segments() {
            // In bounds: checked by `of`.
            let bytes = &image[s.offset as usize..(s.offset + s.filesz) as usize];
            write(s.paddr, bytes);
            let mut at = s.paddr + s.filesz;
            let end = s.paddr + s.memsz;
            while at < end {
                let n = (end - at).min(ZEROS.len() as u64);
                write(at, &ZEROS[..n as usize]);
                at += n;
            }
        }
    }
}
