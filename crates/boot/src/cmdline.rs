//! The hypervisor's own command line: `key=value` tokens separated by spaces.
//!
//! Boot loaders put the kernel's path first (QEMU `-kernel`, GRUB), so tokens
//! without `=` are skipped. An unknown key is reported through a callback and
//! ignored, so that an old hypervisor still boots with a newer configuration;
//! a known key with a bad value is an error, because guessing would start the
//! guest differently from what the user asked for.

use core::fmt;
use log::LevelFilter;

/// Smallest guest RAM accepted, and the granularity it is rounded up to
/// (one large page, so that nested paging can use 2 MiB mappings).
pub const GUEST_MEM_GRANULE: u64 = 2 << 20;
/// Largest guest RAM: the guest is a 32-bit multiboot kernel.
pub const GUEST_MEM_MAX: u64 = 4 << 30;
/// Guest RAM when `guest_mem=` is absent.
pub const GUEST_MEM_DEFAULT: u64 = 64 << 20;

/// The options the hypervisor understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// `log=`: most verbose level that is printed.
    pub log_level: LevelFilter,
    /// `guest=`: index (0-based) of the boot module that holds the guest kernel.
    pub guest_module: usize,
    /// `guest_mem=`: guest RAM in bytes, a multiple of 2 MiB, at most 4 GiB.
    pub guest_mem: u64,
    /// `efer=`: how VT-x switches the guest's EFER (docs/architecture.md,
    /// "VT-x specifics").
    pub efer: EferMode,
    /// `boot=`: what the guest is and how it starts.
    pub boot: BootMode,
    /// `layout=`: how guest-physical memory relates to the machine's.
    pub layout: Layout,
    /// `dbgsh=on|off`: whether the VMM's debug shell answers the `dbgsh`
    /// call (off: the call streams "dbgsh is disabled", as BitVisor does).
    pub dbgsh: bool,
    /// `iommu=`: whether devices are kept out of thinvisor's memory by
    /// the IOMMU (docs/architecture.md, "IOMMU").
    pub iommu: IommuMode,
}

/// `iommu=required|auto|off`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IommuMode {
    /// Refuse to start the guest unless an IOMMU protects thinvisor's
    /// memory from every device.
    Required,
    /// Protect when the machine has a usable IOMMU; otherwise say so in
    /// one line and run unprotected. The default: most machines thinvisor
    /// is tried on (emulators, CI) have none, and a hypervisor that
    /// refused to start there would be of no use to them.
    #[default]
    Auto,
    /// Leave the IOMMU (and its ACPI table) to the guest.
    Off,
}

/// `boot=module|linux|chain`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BootMode {
    /// A multiboot v1 kernel from a boot module (`guest=` picks which).
    #[default]
    Module,
    /// A Linux bzImage from the first module, the initrd from the second.
    Linux,
    /// The BIOS boots the first hard disk, in real mode, inside the guest.
    Chain,
}

/// `layout=isolated|passthrough`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// The guest's RAM is a block thinvisor allocates, at guest-physical 0.
    #[default]
    Isolated,
    /// Guest-physical is host-physical for the whole machine, except
    /// thinvisor's own memory.
    Passthrough,
}

/// `efer=auto|msr-area`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EferMode {
    /// The VM-entry/VM-exit EFER controls when the processor has them.
    #[default]
    Auto,
    /// Always the VM-entry/VM-exit MSR areas, so that path can be tested
    /// on processors that have the controls.
    MsrArea,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            log_level: LevelFilter::Info,
            guest_module: 0,
            guest_mem: GUEST_MEM_DEFAULT,
            efer: EferMode::Auto,
            boot: BootMode::Module,
            layout: Layout::Isolated,
            dbgsh: true,
            iommu: IommuMode::Auto,
        }
    }
}

/// What was wrong with a command-line value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdlineErrorKind {
    /// `log=` names no level.
    BadLogLevel,
    /// `guest=` is not a decimal module index.
    BadGuestIndex,
    /// `efer=` is neither `auto` nor `msr-area`.
    BadEfer,
    /// `guest_mem=` is not a size.
    BadSize,
    /// `boot=` is not module, linux or chain.
    BadBoot,
    /// `layout=` is not isolated or passthrough.
    BadLayout,
    /// `dbgsh=` is not on or off.
    BadDbgsh,
    /// `iommu=` is not required, auto or off.
    BadIommu,
    /// `layout=isolated` with a `boot=` that needs the machine's memory.
    IsolatedNeedsModule,
    /// `guest_mem=` is below 2 MiB.
    GuestMemTooSmall,
    /// `guest_mem=` is above 4 GiB (after rounding up to 2 MiB).
    GuestMemTooLarge,
}

/// A command-line token whose value could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmdlineError<'a> {
    /// The whole offending token, e.g. `guest_mem=3T`.
    pub token: &'a str,
    /// Why it was refused.
    pub kind: CmdlineErrorKind,
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.token;
        match self.kind {
            CmdlineErrorKind::BadLogLevel => write!(
                f,
                "{t}: unknown log level (use off, error, warn, info, debug or trace)"
            ),
            CmdlineErrorKind::BadEfer => write!(f, "{t}: expected efer=auto or efer=msr-area"),
            CmdlineErrorKind::BadGuestIndex => {
                write!(f, "{t}: expected a boot module index (0, 1, 2, ...)")
            }
            CmdlineErrorKind::BadSize => write!(
                f,
                "{t}: expected a size in bytes, decimal or 0x hex, with an optional K, M or G suffix"
            ),
            CmdlineErrorKind::BadBoot => {
                write!(f, "{t}: expected boot=module, boot=linux or boot=chain")
            }
            CmdlineErrorKind::BadLayout => {
                write!(f, "{t}: expected layout=isolated or layout=passthrough")
            }
            CmdlineErrorKind::BadDbgsh => write!(f, "{t}: expected dbgsh=on or dbgsh=off"),
            CmdlineErrorKind::BadIommu => {
                write!(f, "{t}: expected iommu=required, iommu=auto or iommu=off")
            }
            CmdlineErrorKind::IsolatedNeedsModule => write!(
                f,
                "{t}: only boot=module runs in the isolated layout; boot=linux and boot=chain start the machine's own OS (layout=passthrough)"
            ),
            CmdlineErrorKind::GuestMemTooSmall => write!(f, "{t} is too small: at least 2M"),
            CmdlineErrorKind::GuestMemTooLarge => write!(f, "{t} does not fit: at most 4G"),
        }
    }
}

/// Parses the hypervisor's command line.
///
/// `warn(token, why)` is called for every token that is ignored although it
/// looks like an option (unknown key), so the caller can log it.
pub fn parse<'a>(
    cmdline: &'a str,
    warn: &mut dyn FnMut(&str, &str),
) -> Result<Options, CmdlineError<'a>> {
    let mut opts = Options::default();
    let mut layout = None;
    for token in cmdline.split_ascii_whitespace() {
        let Some((key, value)) = token.split_once('=') else {
            // The kernel's own path, or a flag we do not have.
            continue;
        };
        let err = |kind| CmdlineError { token, kind };
        match key {
            "log" => {
                opts.log_level = parse_level(value).ok_or(err(CmdlineErrorKind::BadLogLevel))?
            }
            "guest" => {
                opts.guest_module =
                    parse_index(value).ok_or(err(CmdlineErrorKind::BadGuestIndex))?
            }
            "guest_mem" => opts.guest_mem = parse_guest_mem(value).map_err(err)?,
            "efer" => {
                opts.efer = match value {
                    "auto" => EferMode::Auto,
                    "msr-area" => EferMode::MsrArea,
                    _ => return Err(err(CmdlineErrorKind::BadEfer)),
                }
            }
            "boot" => {
                opts.boot = match value {
                    "module" => BootMode::Module,
                    "linux" => BootMode::Linux,
                    "chain" => BootMode::Chain,
                    _ => return Err(err(CmdlineErrorKind::BadBoot)),
                }
            }
            "dbgsh" => {
                opts.dbgsh = match value {
                    "on" => true,
                    "off" => false,
                    _ => return Err(err(CmdlineErrorKind::BadDbgsh)),
                }
            }
            "iommu" => {
                opts.iommu = match value {
                    "required" => IommuMode::Required,
                    "auto" => IommuMode::Auto,
                    "off" => IommuMode::Off,
                    _ => return Err(err(CmdlineErrorKind::BadIommu)),
                }
            }
            "layout" => {
                layout = Some((
                    token,
                    match value {
                        "isolated" => Layout::Isolated,
                        "passthrough" => Layout::Passthrough,
                        _ => return Err(err(CmdlineErrorKind::BadLayout)),
                    },
                ))
            }
            _ => warn(token, "unknown option, ignored"),
        }
    }
    // The machine's own OS always runs in the pass-through layout; only a
    // multiboot module may choose (and defaults to the isolated layout).
    opts.layout = match (opts.boot, layout) {
        (BootMode::Module, Some((_, l))) => l,
        (BootMode::Module, None) => Layout::Isolated,
        (_, Some((token, Layout::Isolated))) => {
            return Err(CmdlineError {
                token,
                kind: CmdlineErrorKind::IsolatedNeedsModule,
            })
        }
        (_, _) => Layout::Passthrough,
    };
    Ok(opts)
}

fn parse_level(value: &str) -> Option<LevelFilter> {
    const LEVELS: [(&str, LevelFilter); 6] = [
        ("off", LevelFilter::Off),
        ("error", LevelFilter::Error),
        ("warn", LevelFilter::Warn),
        ("info", LevelFilter::Info),
        ("debug", LevelFilter::Debug),
        ("trace", LevelFilter::Trace),
    ];
    LEVELS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(value))
        .map(|&(_, level)| level)
}

fn parse_index(value: &str) -> Option<usize> {
    // `usize::from_str` accepts a leading `+`; an index has digits only.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// Parses `guest_mem=`'s value and applies its limits.
fn parse_guest_mem(value: &str) -> Result<u64, CmdlineErrorKind> {
    let bytes = parse_size(value)?;
    if bytes < GUEST_MEM_GRANULE {
        return Err(CmdlineErrorKind::GuestMemTooSmall);
    }
    let rounded =
        crate::align_up(bytes, GUEST_MEM_GRANULE).ok_or(CmdlineErrorKind::GuestMemTooLarge)?;
    if rounded > GUEST_MEM_MAX {
        return Err(CmdlineErrorKind::GuestMemTooLarge);
    }
    Ok(rounded)
}

/// Parses `123`, `0x7b`, `64M`, `0x10k`, `1G` into bytes. A number too big
/// for 64 bits is "too large", not a syntax error, so the user learns the limit.
fn parse_size(value: &str) -> Result<u64, CmdlineErrorKind> {
    let (number, shift) = match value.as_bytes().last() {
        Some(b'k' | b'K') => (&value[..value.len() - 1], 10),
        Some(b'm' | b'M') => (&value[..value.len() - 1], 20),
        Some(b'g' | b'G') => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    let (digits, radix) = match number.get(..2) {
        Some("0x" | "0X") => (&number[2..], 16),
        _ => (number, 10),
    };
    if digits.is_empty() || !digits.bytes().all(|b| (b as char).is_digit(radix)) {
        return Err(CmdlineErrorKind::BadSize);
    }
    let n = u64::from_str_radix(digits, radix).map_err(|_| CmdlineErrorKind::GuestMemTooLarge)?;
    n.checked_mul(1u64 << shift)
        .ok_or(CmdlineErrorKind::GuestMemTooLarge)
}
