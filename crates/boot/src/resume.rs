//! "Resume me as your guest": the state a loader that runs before thinvisor
//! (thinvisor.efi under UEFI, the test guest's `loader` mode) hands over,
//! so that thinvisor virtualizes the running software itself instead of
//! booting something new (docs/uefi.md).
//!
//! The loader records its own processor state, switches to the multiboot2
//! entry state (32-bit protected mode, paging off) and jumps to
//! thinvisor's `_start` with a multiboot2 information structure that holds
//! one [`TAG_RESUME`] tag. thinvisor boots as usual, then enters the guest
//! with exactly that state: the loader continues after its call as if
//! nothing had happened, now under thinvisor.
//!
//! The tag's payload is a [`ResumeState`], little-endian, at offset 8 of
//! the tag (after its type and size). It is read with bounds checks: a
//! malformed tag is a boot error, never a crash.

/// Multiboot2 tag type of a [`ResumeState`]. The multiboot2 specification
/// numbers its tags from 0 up (21 in version 2.0); a type this far up is
/// no loader's but thinvisor's own.
pub const TAG_RESUME: u32 = 0x7476_0001;

/// The version of [`ResumeState`]'s layout.
pub const RESUME_VERSION: u32 = 1;

/// A processor's state as the loader left it, enough to continue it in
/// 64-bit mode: what the registers held, what the descriptor tables say
/// about the segments is read from the tables themselves (the GDT is in
/// memory the guest keeps).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResumeState {
    /// [`RESUME_VERSION`].
    pub version: u32,
    /// `size_of::<ResumeState>()` as the loader built it.
    pub size: u32,
    /// The general registers, in the order of `thinvisor_vmm::Gpr` (RAX,
    /// RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15).
    pub gprs: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub gdt_base: u64,
    pub idt_base: u64,
    pub gdt_limit: u16,
    pub idt_limit: u16,
    /// Selectors: CS, SS, DS, ES, FS, GS, TR, LDTR.
    pub selectors: [u16; 8],
    pub _pad: [u16; 2],
    pub fs_base: u64,
    pub gs_base: u64,
    pub kernel_gs_base: u64,
    pub pat: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub dr7: u64,
    /// The block the loader reserved for thinvisor (physical, 4 KiB
    /// aligned): thinvisor moves itself there and takes no other memory.
    pub block_start: u64,
    pub block_end: u64,
    /// The ACPI RSDP the firmware gave the loader (0: none).
    pub rsdp: u64,
}

/// Indexes into [`ResumeState::selectors`].
pub mod seg {
    pub const CS: usize = 0;
    pub const SS: usize = 1;
    pub const DS: usize = 2;
    pub const ES: usize = 3;
    pub const FS: usize = 4;
    pub const GS: usize = 5;
    pub const TR: usize = 6;
    pub const LDTR: usize = 7;
}

/// Why a resume tag was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeError {
    /// The payload is shorter than a [`ResumeState`].
    TooShort(usize),
    /// Another layout version.
    Version(u32),
    /// The block is empty, unaligned or inverted.
    BadBlock { start: u64, end: u64 },
    /// The state is not 64-bit mode with paging (EFER.LMA, CR0.PG/PE,
    /// CR4.PAE): thinvisor resumes only what UEFI runs in.
    NotLongMode,
}

impl core::fmt::Display for ResumeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ResumeError::TooShort(n) => write!(f, "resume state of {n} bytes is too short"),
            ResumeError::Version(v) => {
                write!(
                    f,
                    "resume state version {v}, thinvisor reads {RESUME_VERSION}"
                )
            }
            ResumeError::BadBlock { start, end } => {
                write!(
                    f,
                    "reserved block {start:#x}..{end:#x} is not a page-aligned range"
                )
            }
            ResumeError::NotLongMode => write!(f, "resume state is not 64-bit mode with paging"),
        }
    }
}

const SIZE: usize = core::mem::size_of::<ResumeState>();

impl ResumeState {
    /// The payload's bytes (what a loader puts after the tag header).
    pub fn to_bytes(&self) -> [u8; SIZE] {
        // SAFETY: ResumeState is repr(C), Copy, made of integers with no
        // padding the compiler adds (the explicit `_pad` fills the one
        // hole), so every byte is initialized.
        unsafe { core::mem::transmute_copy(self) }
    }

    /// Read a payload, checking what thinvisor relies on.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ResumeError> {
        let Some(raw) = bytes.get(..SIZE) else {
            return Err(ResumeError::TooShort(bytes.len()));
        };
        let mut copy = [0u8; SIZE];
        copy.copy_from_slice(raw);
        // SAFETY: any bit pattern is a valid ResumeState (integers only).
        let s: ResumeState = unsafe { core::mem::transmute(copy) };
        if s.version != RESUME_VERSION {
            return Err(ResumeError::Version(s.version));
        }
        let aligned = |x: u64| x.is_multiple_of(4096);
        if s.block_start >= s.block_end || !aligned(s.block_start) || !aligned(s.block_end) {
            return Err(ResumeError::BadBlock {
                start: s.block_start,
                end: s.block_end,
            });
        }
        const EFER_LMA: u64 = 1 << 10;
        const CR0_PE_PG: u64 = 1 | 1 << 31;
        const CR4_PAE: u64 = 1 << 5;
        if s.efer & EFER_LMA == 0 || s.cr0 & CR0_PE_PG != CR0_PE_PG || s.cr4 & CR4_PAE == 0 {
            return Err(ResumeError::NotLongMode);
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ResumeState {
        ResumeState {
            version: RESUME_VERSION,
            size: SIZE as u32,
            rip: 0x7_1234,
            cr0: 0x8000_0033,
            cr4: 0x668,
            efer: 0xD00,
            block_start: 0x7F00_0000,
            block_end: 0x7F80_0000,
            selectors: [0x38, 0x30, 0x30, 0x30, 0x30, 0x30, 0, 0],
            ..ResumeState::default()
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(ResumeState::from_bytes(&s.to_bytes()), Ok(s));
        // Extra bytes (a newer loader's) are ignored.
        let mut long = [0u8; SIZE + 16];
        long[..SIZE].copy_from_slice(&s.to_bytes());
        assert_eq!(ResumeState::from_bytes(&long), Ok(s));
    }

    #[test]
    fn refusals() {
        let s = sample();
        assert_eq!(
            ResumeState::from_bytes(&s.to_bytes()[..SIZE - 1]),
            Err(ResumeError::TooShort(SIZE - 1))
        );
        let v = ResumeState { version: 9, ..s };
        assert_eq!(
            ResumeState::from_bytes(&v.to_bytes()),
            Err(ResumeError::Version(9))
        );
        for (start, end) in [(0x1000, 0x1000), (0x1001, 0x2000), (0x3000, 0x2000)] {
            let b = ResumeState {
                block_start: start,
                block_end: end,
                ..s
            };
            assert_eq!(
                ResumeState::from_bytes(&b.to_bytes()),
                Err(ResumeError::BadBlock { start, end })
            );
        }
        let real = ResumeState { efer: 0, ..s };
        assert_eq!(
            ResumeState::from_bytes(&real.to_bytes()),
            Err(ResumeError::NotLongMode)
        );
    }

    #[test]
    fn layout_is_fixed() {
        // The loader and thinvisor are built separately: the layout is
        // the ABI.
        assert_eq!(SIZE, 8 + 16 * 8 + 8 * 8 + 2 * 2 + 8 * 2 + 4 + 15 * 8);
        assert_eq!(core::mem::offset_of!(ResumeState, rip), 8 + 128);
        assert_eq!(
            core::mem::offset_of!(ResumeState, selectors),
            8 + 128 + 64 + 4
        );
    }
}
