//! The processor state a guest kernel is started in: 32-bit protected mode,
//! paging off, flat segments, interrupts off. Both boot protocols thinvisor
//! speaks start the kernel this way; they differ in the registers that carry
//! the boot information and in the selectors.

/// CR0 at entry: PE (protected mode) and ET (hardwired to 1 on every
/// processor with SVM or VT-x); paging and caching control bits clear.
pub const CR0_AT_ENTRY: u32 = 0x11;
/// EFLAGS at entry: only the always-one bit 1; IF clear (interrupts off).
pub const EFLAGS_AT_ENTRY: u32 = 0x2;

/// A GDT the guest can find in its memory: `limit + 1` bytes at `base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gdtr {
    /// Guest-physical (= linear, paging is off) address of the table.
    pub base: u32,
    /// Its size in bytes minus one.
    pub limit: u16,
}

/// Initial register state for a 32-bit protected-mode kernel entry.
///
/// Segments: CS is `code_selector`, DS/ES/FS/GS/SS are `data_selector`,
/// all with base 0 and limit 4 GiB (granularity 4 KiB), 32-bit default
/// operand size, DPL 0; code execute/read, data read/write, both accessed.
/// TR and LDTR as after reset. IDTR limit 0: interrupts are off and the
/// kernel sets up its own table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry32 {
    pub eip: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
    pub esi: u32,
    pub edi: u32,
    pub ebp: u32,
    pub esp: u32,
    /// [`EFLAGS_AT_ENTRY`].
    pub eflags: u32,
    /// [`CR0_AT_ENTRY`].
    pub cr0: u32,
    pub code_selector: u16,
    pub data_selector: u16,
    /// A GDT in guest memory whose descriptors match the selectors, when
    /// the protocol promises one (Linux does, multiboot does not: its
    /// kernels must load their own before touching a segment register).
    pub gdtr: Option<Gdtr>,
}

impl Entry32 {
    /// All general registers zero, the given entry point and selectors.
    pub const fn new(eip: u32, code_selector: u16, data_selector: u16) -> Self {
        Entry32 {
            eip,
            eax: 0,
            ebx: 0,
            ecx: 0,
            edx: 0,
            esi: 0,
            edi: 0,
            ebp: 0,
            esp: 0,
            eflags: EFLAGS_AT_ENTRY,
            cr0: CR0_AT_ENTRY,
            code_selector,
            data_selector,
            gdtr: None,
        }
    }
}

/// Flat 4 GiB 32-bit code descriptor, execute/read, accessed (so the
/// processor never writes the table).
pub(crate) const FLAT_CODE32: u64 = 0x00CF_9B00_0000_FFFF;
/// Flat 4 GiB 32-bit data descriptor, read/write, accessed.
pub(crate) const FLAT_DATA32: u64 = 0x00CF_9300_0000_FFFF;
