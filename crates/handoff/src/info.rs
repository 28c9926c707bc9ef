//! The multiboot2 information thinvisor's entry reads (Multiboot2
//! Specification 3.6), built into a caller's buffer: a command line, a
//! memory map, the ACPI RSDP and the resume tag.

use thinvisor_boot::resume::{ResumeState, TAG_RESUME};

const TAG_END: u32 = 0;
const TAG_CMDLINE: u32 = 1;
const TAG_MMAP: u32 = 6;
const TAG_ACPI_OLD: u32 = 14;
const TAG_ACPI_NEW: u32 = 15;

/// Memory types of the multiboot2 memory map (3.6.8).
pub mod kind {
    pub const AVAILABLE: u32 = 1;
    pub const RESERVED: u32 = 2;
    pub const ACPI_RECLAIMABLE: u32 = 3;
    pub const ACPI_NVS: u32 = 4;
    pub const BAD: u32 = 5;
}

/// One memory-map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub len: u64,
    pub kind: u32,
}

/// The buffer was too small.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooSmall;

/// Writes tags into a buffer that must be 8-byte aligned (the caller's
/// responsibility: thinvisor's parser refuses a misaligned address).
pub struct InfoBuilder<'a> {
    buf: &'a mut [u8],
    len: usize,
    resume_at: Option<usize>,
}

impl<'a> InfoBuilder<'a> {
    pub fn new(buf: &'a mut [u8]) -> Result<Self, TooSmall> {
        if buf.len() < 8 {
            return Err(TooSmall);
        }
        buf[..8].fill(0);
        Ok(Self {
            buf,
            len: 8,
            resume_at: None,
        })
    }

    /// Append a tag of `ty` whose payload `fill` writes into the slice it
    /// is given (`size` bytes, zeroed).
    fn tag(
        &mut self,
        ty: u32,
        size: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<usize, TooSmall> {
        let total = 8 + size;
        let padded = total.next_multiple_of(8);
        let at = self.len;
        let slot = self.buf.get_mut(at..at + padded).ok_or(TooSmall)?;
        slot.fill(0);
        slot[..4].copy_from_slice(&ty.to_le_bytes());
        slot[4..8].copy_from_slice(&(total as u32).to_le_bytes());
        fill(&mut slot[8..total]);
        self.len += padded;
        Ok(at + 8)
    }

    pub fn cmdline(&mut self, text: &str) -> Result<(), TooSmall> {
        self.tag(TAG_CMDLINE, text.len() + 1, |p| {
            p[..text.len()].copy_from_slice(text.as_bytes())
        })?;
        Ok(())
    }

    /// The memory map (entry size 24, version 0).
    pub fn memory_map(&mut self, regions: &[Region]) -> Result<(), TooSmall> {
        self.tag(TAG_MMAP, 8 + 24 * regions.len(), |p| {
            p[..4].copy_from_slice(&24u32.to_le_bytes());
            for (i, r) in regions.iter().enumerate() {
                let e = &mut p[8 + 24 * i..8 + 24 * (i + 1)];
                e[..8].copy_from_slice(&r.start.to_le_bytes());
                e[8..16].copy_from_slice(&r.len.to_le_bytes());
                e[16..20].copy_from_slice(&r.kind.to_le_bytes());
            }
        })?;
        Ok(())
    }

    /// A copy of the RSDP (20 bytes for revision 0, its `length` field's
    /// bytes for 2.0+).
    pub fn rsdp(&mut self, rsdp: &[u8]) -> Result<(), TooSmall> {
        let revision = rsdp.get(15).copied().unwrap_or(0);
        let ty = if revision >= 2 {
            TAG_ACPI_NEW
        } else {
            TAG_ACPI_OLD
        };
        self.tag(ty, rsdp.len(), |p| p.copy_from_slice(rsdp))?;
        Ok(())
    }

    /// The resume tag, with `state` as known so far (the processor state
    /// is filled in at the switch, through [`InfoBuilder::finish`]'s
    /// offset).
    pub fn resume(&mut self, state: &ResumeState) -> Result<(), TooSmall> {
        let bytes = state.to_bytes();
        let at = self.tag(TAG_RESUME, bytes.len(), |p| p.copy_from_slice(&bytes))?;
        self.resume_at = Some(at);
        Ok(())
    }

    /// The end tag and the header: the information's length and the
    /// offset of the resume tag's [`ResumeState`], if any.
    pub fn finish(mut self) -> Result<(usize, Option<usize>), TooSmall> {
        self.tag(TAG_END, 0, |_| {})?;
        let total = self.len as u32;
        self.buf[..4].copy_from_slice(&total.to_le_bytes());
        Ok((self.len, self.resume_at))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;

    #[repr(align(8))]
    struct Aligned([u8; 4096]);

    #[test]
    fn thinvisor_parses_what_is_built() {
        let mut buf = Aligned([0xAA; 4096]);
        let state = ResumeState {
            version: thinvisor_boot::resume::RESUME_VERSION,
            size: core::mem::size_of::<ResumeState>() as u32,
            cr0: 0x8000_0011,
            cr4: 0x20,
            efer: 0x500,
            block_start: 0x10_0000,
            block_end: 0x20_0000,
            ..ResumeState::default()
        };
        let mut rsdp = vec![0u8; 36];
        rsdp[..8].copy_from_slice(b"RSD PTR ");
        rsdp[15] = 2;
        let mut b = InfoBuilder::new(&mut buf.0).unwrap();
        b.cmdline("log=info iommu=auto").unwrap();
        b.memory_map(&[
            Region {
                start: 0,
                len: 0xA_0000,
                kind: kind::AVAILABLE,
            },
            Region {
                start: 0x10_0000,
                len: 0x3FF0_0000,
                kind: kind::AVAILABLE,
            },
        ])
        .unwrap();
        b.rsdp(&rsdp).unwrap();
        b.resume(&state).unwrap();
        let (len, resume_at) = b.finish().unwrap();
        assert!(len.is_multiple_of(8));
        let at = resume_at.unwrap();
        assert_eq!(
            ResumeState::from_bytes(&buf.0[at..at + core::mem::size_of::<ResumeState>()]),
            Ok(state)
        );
        let pa = buf.0.as_ptr() as u64;
        // SAFETY: the buffer is mapped at its own address in this process
        // and not changed while parsed.
        let info = unsafe { thinvisor_boot::multiboot2::parse(pa) }.unwrap();
        assert_eq!(info.cmdline(), "log=info iommu=auto");
        assert_eq!(info.memory_map().len(), 2);
        assert_eq!(info.resume(), Some(&state));
        let rsdp_pa = info.rsdp().unwrap();
        assert_eq!(&buf.0[(rsdp_pa - pa) as usize..][..8], b"RSD PTR ");
    }

    #[test]
    fn too_small_is_an_error_not_a_panic() {
        let mut buf = Aligned([0; 4096]);
        for n in [0, 7, 8, 20, 63] {
            let Ok(mut b) = InfoBuilder::new(&mut buf.0[..n]) else {
                assert!(n < 8);
                continue;
            };
            let r = b.cmdline("a long enough command line to overflow the buffer");
            assert_eq!(r, Err(TooSmall));
        }
    }
}
