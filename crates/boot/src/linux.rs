//! Loading a Linux bzImage in the pass-through layout with the 32-bit boot
//! protocol (the kernel's Documentation/arch/x86/boot.rst, "32-bit Boot
//! Protocol"; the zero page is Documentation/arch/x86/zero-page.rst).
//!
//! The real-mode setup code is not run: thinvisor builds `boot_params` (the
//! "zero page") itself, loads the protected-mode kernel and starts it at its
//! first byte in 32-bit protected mode with ESI pointing at `boot_params`.
//!
//! # Where things go
//!
//! - The protected-mode kernel (the file from `(setup_sects + 1) * 512` on):
//!   a relocatable kernel at the lowest address at or above `pref_address`
//!   (and 1 MiB) aligned to `kernel_alignment` where `max(init_size, file
//!   bytes)` of usable RAM is free, so the first candidate is
//!   `pref_address` itself. Never below it: boot.rst's runtime-start
//!   algorithm (under `init_size`) moves a kernel loaded below
//!   `pref_address` up to it before decompressing, so the memory it needs
//!   is at `pref_address` anyway. When nothing is free at
//!   `kernel_alignment`, `1 << min_alignment` (2.10+) is tried and written
//!   back to `kernel_alignment`, as boot.rst allows. A non-relocatable
//!   kernel is loaded at 0x100000 and needs `init_size` at `pref_address`
//!   (2.10+; 0x100000 before). Everything below 4 GiB: the 32-bit entry
//!   runs with paging off.
//! - The initrd: as high as possible below `initrd_addr_max` (its highest
//!   byte; boot.rst, "initrd_addr_max") and 4 GiB, above 1 MiB, page
//!   aligned; if nothing fits there and the kernel sets
//!   `XLF_CAN_BE_LOADED_ABOVE_4G` (2.12+), as high as possible above 4 GiB,
//!   with the high halves in `ext_ramdisk_image/size`.
//! - `boot_params` (4 KiB), then a 32-byte GDT, then the command line, in
//!   one page-aligned block at the lowest free usable address in
//!   [0x10000, 0x90000): above the real-mode IVT and BIOS data area (page 0)
//!   and the 64 KiB Linux reserves at the bottom (`CONFIG_X86_RESERVE_LOW`),
//!   below where an EBDA may start (Linux assumes one may reach down to
//!   0x90000 when the BIOS does not say, see `reserve_bios_regions()`),
//!   and away from the kernel and initrd. Only if that window is full does
//!   the block go to the lowest free usable address in [1 MiB, 4 GiB).
//!
//! Nothing lands in a range that is not usable RAM of the [`GuestMap`]
//! (hidden ranges are not), nor in an `avoid` range (the boot modules being
//! read from), and nothing is written unless the whole plan succeeds.

use crate::e820::{GuestMap, Unusable, MAX_AVOID};
use crate::entry::{Entry32, Gdtr, FLAT_CODE32, FLAT_DATA32};
use crate::phys::{PhysWrite, PhysWriteError};
use crate::place::{Taken, Want};
use crate::{align_up, PAGE_SIZE};
use core::fmt;

/// Offset of the setup header in the image and in `boot_params`.
pub const SETUP_HEADER_OFFSET: usize = 0x1F1;
/// `boot_flag` (0x1FE) of every bootable image.
pub const BOOT_FLAG: u16 = 0xAA55;
/// `header` (0x202): "HdrS", present from protocol 2.00 on.
pub const HEADER_MAGIC: u32 = 0x5372_6448;
/// Oldest protocol accepted: 2.06 fixes the 32-bit entry point's contract
/// (boot.rst, "32-bit Boot Protocol") and adds `cmdline_size`.
pub const MIN_PROTOCOL: u16 = 0x0206;

/// `loadflags` bit 0: the protected-mode code is loaded at 0x100000 (a
/// bzImage; a zImage loads at 0x10000 and needs the 16-bit entry).
pub const LOADED_HIGH: u8 = 1 << 0;
/// `loadflags` bit 7: `heap_end_ptr` is valid.
pub const CAN_USE_HEAP: u8 = 1 << 7;
/// `xloadflags` bit 0: the kernel has the 64-bit entry at 0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// `xloadflags` bit 1: kernel, boot_params, command line and ramdisk may lie
/// above 4 GiB.
pub const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;

/// Size of `boot_params`.
pub const BOOT_PARAMS_SIZE: usize = 4096;
/// `boot_params.e820_entries` (u8).
pub const E820_ENTRIES_OFFSET: usize = 0x1E8;
/// `boot_params.e820_table`: 20-byte entries (addr u64, size u64, type u32).
pub const E820_TABLE_OFFSET: usize = 0x2D0;
/// `boot_params.ext_ramdisk_image`, `ext_ramdisk_size`, `ext_cmd_line_ptr`.
const EXT_RAMDISK_IMAGE: usize = 0x0C0;
const EXT_RAMDISK_SIZE: usize = 0x0C4;
const EXT_CMD_LINE_PTR: usize = 0x0C8;

// Setup header fields (offsets in the image and in boot_params).
const SETUP_SECTS: usize = 0x1F1;
const SYSSIZE: usize = 0x1F4;
const BOOT_FLAG_AT: usize = 0x1FE;
const JUMP_LEN: usize = 0x201;
const HEADER: usize = 0x202;
const VERSION: usize = 0x206;
const TYPE_OF_LOADER: usize = 0x210;
const LOADFLAGS: usize = 0x211;
const CODE32_START: usize = 0x214;
const RAMDISK_IMAGE: usize = 0x218;
const RAMDISK_SIZE: usize = 0x21C;
const HEAP_END_PTR: usize = 0x224;
const CMD_LINE_PTR: usize = 0x228;
const INITRD_ADDR_MAX: usize = 0x22C;
const KERNEL_ALIGNMENT: usize = 0x230;
const RELOCATABLE_KERNEL: usize = 0x234;
const MIN_ALIGNMENT: usize = 0x235;
const XLOADFLAGS: usize = 0x236;
const CMDLINE_SIZE: usize = 0x238;
const PREF_ADDRESS: usize = 0x258;
const INIT_SIZE: usize = 0x260;

/// The setup header must reach past `cmdline_size` (2.06) ...
const HEADER_END_206: usize = 0x23C;
/// ... and past `init_size` from 2.10 on.
const HEADER_END_210: usize = 0x264;
/// The setup header may not run into `edd_mbr_sig_buffer`, the first
/// `boot_params` field after it (the jump byte at 0x201 could claim up to
/// 0x301).
const HEADER_END_MAX: usize = 0x290;

/// `type_of_loader`: 0xFF, "undefined" (boot.rst lists no id for us).
const LOADER_TYPE: u8 = 0xFF;
/// `heap_end_ptr`: boot.rst's value for a modern bzImage (setup heap ending
/// at 0xE000 from the setup segment, minus 0x200). Only the 16-bit setup
/// code uses it, which the 32-bit protocol skips; it is set as a real-mode
/// loader would so the header is consistent.
const HEAP_END: u16 = 0xDE00;

/// Where the protected-mode kernel of a non-relocatable bzImage goes.
pub const BZIMAGE_LOAD_ADDR: u64 = 0x10_0000;
const FOUR_GIB: u64 = 1 << 32;
/// The window for `boot_params`, the GDT and the command line.
pub const LOW_WINDOW: (u64, u64) = (0x1_0000, 0x9_0000);
/// Offsets in the low block.
const GDT_OFFSET: u64 = BOOT_PARAMS_SIZE as u64;
const GDT_LEN: usize = 32;
const CMDLINE_OFFSET: u64 = GDT_OFFSET + GDT_LEN as u64;
/// `__BOOT_CS` and `__BOOT_DS` (boot.rst, "32-bit Boot Protocol").
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;

/// Why a Linux kernel could not be loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinuxError {
    /// The file ends before the setup header does.
    TooShort(usize),
    /// `boot_flag` is not 0xAA55.
    NoBootFlag(u16),
    /// No "HdrS": not a Linux kernel, or one older than protocol 2.00.
    NoHeaderMagic(u32),
    /// The protocol version is older than [`MIN_PROTOCOL`].
    ProtocolTooOld(u16),
    /// `LOADED_HIGH` is clear: a zImage, which only the 16-bit entry loads.
    NotBzImage,
    /// The setup header (0x202 + the byte at 0x201) ends before the fields
    /// its protocol version has.
    HeaderTooShort { end: usize, needed: usize },
    /// The setup header claims to run into the rest of `boot_params`.
    HeaderTooLong(usize),
    /// The setup sectors cover the whole file: no protected-mode kernel.
    NoKernel { offset: u64, image_len: u64 },
    /// `syssize` says the protected-mode kernel is longer than the file.
    KernelTruncated { syssize_bytes: u64, available: u64 },
    /// A relocatable kernel's `kernel_alignment` is not a power of two.
    BadKernelAlignment(u32),
    /// The command line is longer than `cmdline_size`.
    CmdlineTooLong { len: usize, max: u32 },
    /// No usable RAM below 4 GiB holds the relocatable kernel.
    NoRoomForKernel { size: u64, from: u64, align: u64 },
    /// A non-relocatable kernel's fixed range is not usable.
    KernelNotUsable {
        start: u64,
        end: u64,
        at: u64,
        why: Unusable,
    },
    /// No usable RAM holds the initrd below its limit.
    NoRoomForInitrd { size: u64, max: u64 },
    /// No usable RAM below 4 GiB holds boot_params and the command line.
    NoRoomForBootParams { size: u64 },
    /// More `avoid` ranges than supported.
    TooManyAvoidRanges(usize),
    /// The target refused a write.
    Write(PhysWriteError),
}

impl From<PhysWriteError> for LinuxError {
    fn from(e: PhysWriteError) -> Self {
        LinuxError::Write(e)
    }
}

impl core::error::Error for LinuxError {}

impl fmt::Display for LinuxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LinuxError::TooShort(len) => write!(
                f,
                "Linux kernel image of {len} bytes is too short to hold a setup header"
            ),
            LinuxError::NoBootFlag(flag) => write!(
                f,
                "not a Linux kernel image: boot flag is {flag:#06x}, not 0xaa55"
            ),
            LinuxError::NoHeaderMagic(magic) => write!(
                f,
                "not a Linux bzImage: header magic is {magic:#010x}, not \"HdrS\" (or a kernel older than boot protocol 2.00)"
            ),
            LinuxError::ProtocolTooOld(v) => write!(
                f,
                "Linux kernel speaks boot protocol {}.{:02}; the 32-bit entry needs 2.06 or later",
                v >> 8,
                v & 0xff
            ),
            LinuxError::NotBzImage => write!(
                f,
                "Linux kernel is a zImage (LOADED_HIGH clear), which only the 16-bit boot protocol loads"
            ),
            LinuxError::HeaderTooShort { end, needed } => write!(
                f,
                "Linux setup header ends at {end:#x}, before the fields of its protocol version (up to {needed:#x})"
            ),
            LinuxError::HeaderTooLong(end) => write!(
                f,
                "Linux setup header claims to end at {end:#x}, past the setup header area (0x290)"
            ),
            LinuxError::NoKernel { offset, image_len } => write!(
                f,
                "Linux image has no protected-mode kernel: the setup code ends at {offset:#x}, the file at {image_len:#x}"
            ),
            LinuxError::KernelTruncated { syssize_bytes, available } => write!(
                f,
                "Linux image is truncated: syssize says {syssize_bytes:#x} bytes of protected-mode kernel, the file has {available:#x}"
            ),
            LinuxError::BadKernelAlignment(a) => write!(
                f,
                "Linux kernel_alignment {a:#x} is not a power of two"
            ),
            LinuxError::CmdlineTooLong { len, max } => write!(
                f,
                "Linux command line of {len} bytes is longer than the kernel's cmdline_size ({max})"
            ),
            LinuxError::NoRoomForKernel { size, from, align } => write!(
                f,
                "no usable RAM below 4 GiB for the Linux kernel ({size:#x} bytes, {align:#x}-aligned, at or above {from:#x})"
            ),
            LinuxError::KernelNotUsable { start, end, at, why } => write!(
                f,
                "non-relocatable Linux kernel needs {start:#x}..{end:#x}, but {at:#x} is {why}"
            ),
            LinuxError::NoRoomForInitrd { size, max } => write!(
                f,
                "no usable RAM for the initrd ({size:#x} bytes, ending at or below {max:#x})"
            ),
            LinuxError::NoRoomForBootParams { size } => write!(
                f,
                "no usable RAM below 4 GiB for boot_params and the command line ({size:#x} bytes)"
            ),
            LinuxError::TooManyAvoidRanges(n) => {
                write!(f, "{n} ranges to keep clear, at most {MAX_AVOID} are supported")
            }
            LinuxError::Write(e) => write!(f, "loading the Linux kernel: {e}"),
        }
    }
}

/// The setup header fields the loader uses, as the image states them (with
/// boot.rst's defaults for fields older protocols lack).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetupHeader {
    /// Protocol version, major in the high byte (0x020f is 2.15).
    pub version: u16,
    /// Setup sectors after the boot sector (0 in the file means 4).
    pub setup_sects: u8,
    /// Protected-mode code size in 16-byte paragraphs (0 if not stated).
    pub syssize: u32,
    pub loadflags: u8,
    pub code32_start: u32,
    /// Highest address the initrd may occupy (its last byte).
    pub initrd_addr_max: u32,
    /// Preferred alignment of a relocatable kernel.
    pub kernel_alignment: u32,
    pub relocatable: bool,
    /// log2 of the least alignment that still works (2.10+; 0 before).
    pub min_alignment: u8,
    /// 2.12+; 0 before.
    pub xloadflags: u16,
    /// Longest command line without its NUL.
    pub cmdline_size: u32,
    /// 2.10+; 0x100000 before.
    pub pref_address: u64,
    /// 2.10+; 0 before (see [`BzImage::init_size`]).
    pub init_size: u32,
    /// One past the setup header: 0x202 + the byte at 0x201.
    pub header_end: usize,
}

/// A parsed bzImage.
#[derive(Clone, Copy, Debug)]
pub struct BzImage<'a> {
    header: SetupHeader,
    setup_header: &'a [u8],
    kernel: &'a [u8],
}

impl<'a> BzImage<'a> {
    /// Checks and parses the setup header (boot.rst, "The Real-Mode Kernel
    /// Header" and "Details of Header Fields").
    pub fn parse(image: &'a [u8]) -> Result<Self, LinuxError> {
        if image.len() < HEADER_END_206 {
            return Err(LinuxError::TooShort(image.len()));
        }
        let boot_flag = le16(image, BOOT_FLAG_AT);
        if boot_flag != BOOT_FLAG {
            return Err(LinuxError::NoBootFlag(boot_flag));
        }
        let magic = le32(image, HEADER);
        if magic != HEADER_MAGIC {
            return Err(LinuxError::NoHeaderMagic(magic));
        }
        let version = le16(image, VERSION);
        if version < MIN_PROTOCOL {
            return Err(LinuxError::ProtocolTooOld(version));
        }
        let loadflags = byte(image, LOADFLAGS);
        if loadflags & LOADED_HIGH == 0 {
            return Err(LinuxError::NotBzImage);
        }
        let header_end = HEADER + usize::from(byte(image, JUMP_LEN));
        let needed = if version >= 0x020A {
            HEADER_END_210
        } else {
            HEADER_END_206
        };
        if header_end < needed {
            return Err(LinuxError::HeaderTooShort {
                end: header_end,
                needed,
            });
        }
        if header_end > HEADER_END_MAX {
            return Err(LinuxError::HeaderTooLong(header_end));
        }
        let setup_header = image
            .get(SETUP_HEADER_OFFSET..header_end)
            .ok_or(LinuxError::TooShort(image.len()))?;

        let setup_sects = match byte(image, SETUP_SECTS) {
            0 => 4,
            n => n,
        };
        // At most 256 * 512: cannot overflow.
        let offset = (usize::from(setup_sects) + 1) * 512;
        let kernel = image
            .get(offset..)
            .filter(|k| !k.is_empty())
            .ok_or(LinuxError::NoKernel {
                offset: offset as u64,
                image_len: image.len() as u64,
            })?;
        let syssize = le32(image, SYSSIZE);
        let syssize_bytes = u64::from(syssize) * 16;
        if syssize_bytes > kernel.len() as u64 {
            return Err(LinuxError::KernelTruncated {
                syssize_bytes,
                available: kernel.len() as u64,
            });
        }

        let v210 = version >= 0x020A;
        let header = SetupHeader {
            version,
            setup_sects,
            syssize,
            loadflags,
            code32_start: le32(image, CODE32_START),
            initrd_addr_max: le32(image, INITRD_ADDR_MAX),
            kernel_alignment: le32(image, KERNEL_ALIGNMENT),
            relocatable: byte(image, RELOCATABLE_KERNEL) != 0,
            min_alignment: if v210 { byte(image, MIN_ALIGNMENT) } else { 0 },
            xloadflags: if version >= 0x020C {
                le16(image, XLOADFLAGS)
            } else {
                0
            },
            cmdline_size: le32(image, CMDLINE_SIZE),
            pref_address: if v210 {
                le64(image, PREF_ADDRESS)
            } else {
                BZIMAGE_LOAD_ADDR
            },
            init_size: if v210 { le32(image, INIT_SIZE) } else { 0 },
            header_end,
        };
        if header.relocatable && !header.kernel_alignment.is_power_of_two() {
            return Err(LinuxError::BadKernelAlignment(header.kernel_alignment));
        }
        Ok(BzImage {
            header,
            setup_header,
            kernel,
        })
    }

    /// The header fields.
    pub fn header(&self) -> &SetupHeader {
        &self.header
    }

    /// The protected-mode kernel: what is loaded and entered.
    pub fn kernel(&self) -> &'a [u8] {
        self.kernel
    }

    /// Bytes of contiguous memory the kernel needs from its runtime start:
    /// `init_size` (2.10+), never less than the protected-mode code. Older
    /// kernels do not say; GRUB's estimate, three times the code rounded up
    /// to pages, is used for them.
    pub fn init_size(&self) -> u64 {
        let code = self.kernel.len() as u64;
        let stated = if self.header.version >= 0x020A {
            u64::from(self.header.init_size)
        } else {
            align_up(code, PAGE_SIZE).unwrap_or(code).saturating_mul(3)
        };
        stated.max(code)
    }

    /// Whether the kernel accepts an initrd (and more) above 4 GiB.
    pub fn can_load_above_4g(&self) -> bool {
        self.header.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G != 0
    }
}

/// Where everything goes (all guest-physical = host-physical addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxPlan {
    /// Load address of the protected-mode kernel (the 32-bit entry point).
    pub kernel: u64,
    /// Bytes of it in the file.
    pub kernel_len: u64,
    /// The memory the kernel needs to decompress `[start, end)`: from its
    /// runtime start, `init_size` bytes.
    pub runtime: (u64, u64),
    /// `kernel_alignment` as written to `boot_params` (lowered to
    /// `1 << min_alignment` when only that fitted).
    pub kernel_alignment: u32,
    /// The initrd `[start, end)`.
    pub initrd: Option<(u64, u64)>,
    /// `boot_params` (4 KiB, page aligned).
    pub boot_params: u64,
    /// The GDT with `__BOOT_CS` and `__BOOT_DS` (32 bytes).
    pub gdt: u64,
    /// The NUL-terminated command line.
    pub cmdline: u64,
    /// Its length without the NUL.
    pub cmdline_len: u64,
}

/// What [`load_linux`] did and how to start the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxBoot {
    /// The protocol version the image speaks.
    pub protocol: u16,
    /// Where everything went.
    pub plan: LinuxPlan,
    /// The 32-bit entry state: EIP = the kernel's load address, ESI =
    /// `boot_params`, EBP = EDI = EBX = 0, CS = 0x10, DS = ES = SS = 0x18,
    /// GDTR = the GDT in the low block.
    pub entry: Entry32,
}

/// Keeps the user's command line up to its first NUL (C strings end there).
fn cmdline_text(cmdline: &[u8]) -> &[u8] {
    cmdline.split(|&b| b == 0).next().unwrap_or(&[])
}

/// Plans where a kernel, an initrd of `initrd_len` bytes (0: none) and a
/// command line of `cmdline_len` bytes (without NUL) go in `map`'s usable
/// RAM, away from every `avoid` range (at most 16; the boot modules the
/// kernel and initrd are read from). See the module documentation.
pub fn plan_linux(
    bz: &BzImage<'_>,
    initrd_len: u64,
    cmdline_len: usize,
    map: &GuestMap,
    avoid: &[(u64, u64)],
) -> Result<LinuxPlan, LinuxError> {
    let h = bz.header();
    if cmdline_len as u64 > u64::from(h.cmdline_size) {
        return Err(LinuxError::CmdlineTooLong {
            len: cmdline_len,
            max: h.cmdline_size,
        });
    }
    if avoid.len() > MAX_AVOID {
        return Err(LinuxError::TooManyAvoidRanges(avoid.len()));
    }
    let mut taken = Taken::new();
    for &(s, e) in avoid {
        taken.push(s, e);
    }
    let usable = map.usable();
    let kernel_len = bz.kernel().len() as u64;
    let need = bz.init_size();

    // The kernel.
    let (kernel, runtime, kernel_alignment) = if h.relocatable {
        let from = h.pref_address.max(BZIMAGE_LOAD_ADDR);
        let preferred = u64::from(h.kernel_alignment).max(PAGE_SIZE);
        let min = (h.min_alignment < 32)
            .then(|| (1u64 << h.min_alignment).max(PAGE_SIZE))
            .filter(|&m| m < preferred);
        let try_align = |align: u64| {
            let lo = align_up(from, align)?;
            Want {
                size: need,
                align,
                lo,
                hi: FOUR_GIB,
            }
            .lowest(usable, &taken)
        };
        let (at, align) = match try_align(preferred) {
            Some(at) => (at, preferred),
            None => match min.and_then(|m| try_align(m).map(|at| (at, m))) {
                Some(found) => found,
                None => {
                    return Err(LinuxError::NoRoomForKernel {
                        size: need,
                        from,
                        align: preferred,
                    })
                }
            },
        };
        // Lowered only to `min`, a power of two below `preferred` < 2^32.
        let alignment = if align == preferred {
            h.kernel_alignment
        } else {
            u32::try_from(align).unwrap_or(h.kernel_alignment)
        };
        (at, (at, at + need), alignment)
    } else {
        // "if nonzero" (boot.rst, pref_address): 0 states no preference.
        let start = match h.pref_address {
            0 => BZIMAGE_LOAD_ADDR,
            pref => pref,
        };
        let check = |s: u64, len: u64| -> Result<(), LinuxError> {
            let end = s.saturating_add(len);
            let fail = |at: u64, why: Unusable| LinuxError::KernelNotUsable {
                start: s,
                end,
                at,
                why,
            };
            if end > FOUR_GIB || s.checked_add(len).is_none() {
                return Err(fail(s.max(FOUR_GIB.min(end)), Unusable::NotRam));
            }
            map.check_usable(s, len)
                .map_err(|(at, why)| fail(at, why))?;
            if let Some((o, _)) = taken.overlap(s, end) {
                return Err(fail(o.max(s), Unusable::Source));
            }
            Ok(())
        };
        check(BZIMAGE_LOAD_ADDR, kernel_len)?;
        check(start, need)?;
        (BZIMAGE_LOAD_ADDR, (start, start + need), h.kernel_alignment)
    };
    taken.push(kernel, kernel + kernel_len);
    taken.push(runtime.0, runtime.1);

    // The initrd.
    let initrd = if initrd_len == 0 {
        None
    } else {
        let max = u64::from(h.initrd_addr_max).saturating_add(1).min(FOUR_GIB);
        let low = Want {
            size: initrd_len,
            align: PAGE_SIZE,
            lo: BZIMAGE_LOAD_ADDR,
            hi: max,
        };
        let high = Want {
            size: initrd_len,
            align: PAGE_SIZE,
            lo: FOUR_GIB,
            hi: u64::MAX,
        };
        let at = low
            .highest(usable, &taken)
            .or_else(|| {
                bz.can_load_above_4g()
                    .then(|| high.highest(usable, &taken))
                    .flatten()
            })
            .ok_or(LinuxError::NoRoomForInitrd {
                size: initrd_len,
                max: if bz.can_load_above_4g() {
                    u64::MAX
                } else {
                    max - 1
                },
            })?;
        taken.push(at, at + initrd_len);
        Some((at, at + initrd_len))
    };

    // boot_params, the GDT and the command line.
    let block = CMDLINE_OFFSET + cmdline_len as u64 + 1;
    let window = |lo, hi| {
        Want {
            size: block,
            align: PAGE_SIZE,
            lo,
            hi,
        }
        .lowest(usable, &taken)
    };
    let boot_params = window(LOW_WINDOW.0, LOW_WINDOW.1)
        .or_else(|| window(BZIMAGE_LOAD_ADDR, FOUR_GIB))
        .ok_or(LinuxError::NoRoomForBootParams { size: block })?;

    Ok(LinuxPlan {
        kernel,
        kernel_len,
        runtime,
        kernel_alignment,
        initrd,
        boot_params,
        gdt: boot_params + GDT_OFFSET,
        cmdline: boot_params + CMDLINE_OFFSET,
        cmdline_len: cmdline_len as u64,
    })
}

/// Builds `boot_params` for `plan` (boot.rst, "32-bit Boot Protocol": zero
/// it, copy the setup header from 0x1F1 to 0x202 + the byte at 0x201, fill
/// in the loader's fields; zero-page.rst for the E820 table).
pub fn build_boot_params(
    bz: &BzImage<'_>,
    plan: &LinuxPlan,
    map: &GuestMap,
) -> [u8; BOOT_PARAMS_SIZE] {
    let mut bp = [0u8; BOOT_PARAMS_SIZE];
    if let Some(dst) = bp.get_mut(SETUP_HEADER_OFFSET..bz.header().header_end) {
        if dst.len() == bz.setup_header.len() {
            dst.copy_from_slice(bz.setup_header);
        }
    }
    put8(&mut bp, TYPE_OF_LOADER, LOADER_TYPE);
    put8(&mut bp, LOADFLAGS, LOADED_HIGH | CAN_USE_HEAP);
    put32(&mut bp, CODE32_START, plan.kernel as u32);
    put16(&mut bp, HEAP_END_PTR, HEAP_END);
    put32(&mut bp, KERNEL_ALIGNMENT, plan.kernel_alignment);
    let (image, size) = plan.initrd.map_or((0, 0), |(s, e)| (s, e - s));
    put32(&mut bp, RAMDISK_IMAGE, image as u32);
    put32(&mut bp, RAMDISK_SIZE, size as u32);
    put32(&mut bp, EXT_RAMDISK_IMAGE, (image >> 32) as u32);
    put32(&mut bp, EXT_RAMDISK_SIZE, (size >> 32) as u32);
    put32(&mut bp, CMD_LINE_PTR, plan.cmdline as u32);
    put32(&mut bp, EXT_CMD_LINE_PTR, (plan.cmdline >> 32) as u32);

    let entries = map.e820();
    put8(&mut bp, E820_ENTRIES_OFFSET, entries.len().min(255) as u8);
    for (i, e) in entries.iter().enumerate() {
        let at = E820_TABLE_OFFSET + i * 20;
        put64(&mut bp, at, e.addr);
        put64(&mut bp, at + 8, e.size);
        put32(&mut bp, at + 16, e.type_number());
    }
    bp
}

/// Parses `image`, plans the placement in `map` (away from `avoid`), and
/// writes the kernel, the initrd, `boot_params`, a GDT and the command line
/// (cut at its first NUL) through `target`. Nothing is written unless
/// parsing and planning succeed.
///
/// ```no_run
/// use thinvisor_boot::e820::GuestMap;
/// use thinvisor_boot::linux::load_linux;
/// use thinvisor_boot::phys::RamSlice;
/// # fn demo(
/// #     firmware_map: &[thinvisor_boot::MemRegion],
/// #     kernel: &[u8],
/// #     initrd: &[u8],
/// #     memory: &mut [u8],
/// # ) -> Result<(), Box<dyn core::error::Error>> {
/// // thinvisor occupies 2..6 MiB; the boot loader left the kernel and
/// // initrd modules at 64 MiB and 80 MiB.
/// let map = GuestMap::new(firmware_map, &[(0x20_0000, 0x60_0000)])?;
/// let modules = [(0x400_0000, 0x480_0000), (0x500_0000, 0x600_0000)];
/// // The hypervisor writes through its direct map; here, a buffer.
/// let mut target = RamSlice::new(0, memory);
/// let boot = load_linux(kernel, Some(initrd), b"console=ttyS0", &map, &modules, &mut target)?;
/// // Start the guest: 32-bit protected mode, paging off.
/// let (eip, esi) = (boot.entry.eip, boot.entry.esi);
/// # let _ = (eip, esi);
/// # Ok(())
/// # }
/// ```
pub fn load_linux(
    image: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &[u8],
    map: &GuestMap,
    avoid: &[(u64, u64)],
    target: &mut dyn PhysWrite,
) -> Result<LinuxBoot, LinuxError> {
    let bz = BzImage::parse(image)?;
    let cmdline = cmdline_text(cmdline);
    let initrd = initrd.unwrap_or(&[]);
    let plan = plan_linux(&bz, initrd.len() as u64, cmdline.len(), map, avoid)?;
    let bp = build_boot_params(&bz, &plan, map);

    target.write(plan.kernel, bz.kernel())?;
    if let Some((at, _)) = plan.initrd {
        target.write(at, initrd)?;
    }
    target.write(plan.boot_params, &bp)?;
    let mut gdt = [0u8; GDT_LEN];
    put64(&mut gdt, usize::from(BOOT_CS), FLAT_CODE32);
    put64(&mut gdt, usize::from(BOOT_DS), FLAT_DATA32);
    target.write(plan.gdt, &gdt)?;
    target.write(plan.cmdline, cmdline)?;
    target.write(plan.cmdline + plan.cmdline_len, &[0])?;

    // The plan keeps all three below 4 GiB.
    let mut entry = Entry32::new(plan.kernel as u32, BOOT_CS, BOOT_DS);
    entry.esi = plan.boot_params as u32;
    entry.gdtr = Some(Gdtr {
        base: plan.gdt as u32,
        limit: GDT_LEN as u16 - 1,
    });
    Ok(LinuxBoot {
        protocol: bz.header().version,
        plan,
        entry,
    })
}

fn byte(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

fn le16(b: &[u8], at: usize) -> u16 {
    let mut v = [0u8; 2];
    if let Some(s) = at.checked_add(2).and_then(|end| b.get(at..end)) {
        v.copy_from_slice(s);
    }
    u16::from_le_bytes(v)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = at.checked_add(4).and_then(|end| b.get(at..end)) {
        v.copy_from_slice(s);
    }
    u32::from_le_bytes(v)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = at.checked_add(8).and_then(|end| b.get(at..end)) {
        v.copy_from_slice(s);
    }
    u64::from_le_bytes(v)
}

fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(d) = at
        .checked_add(bytes.len())
        .and_then(|end| b.get_mut(at..end))
    {
        d.copy_from_slice(bytes);
    }
}

fn put8(b: &mut [u8], at: usize, v: u8) {
    put(b, at, &[v]);
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    put(b, at, &v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    put(b, at, &v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    put(b, at, &v.to_le_bytes());
}
