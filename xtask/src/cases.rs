//! The integration test cases: one entry each.
//!
//! A case boots the hypervisor with arguments and modules in one emulator
//! and judges the run by the emulator's exit status (QEMU only) and the
//! serial log: every `must_contain` substring must appear (compared
//! case-insensitively), no `must_not_contain` substring may appear
//! (compared exactly, so that `FAIL` does not match "0 failed").
//!
//! `CASES` run by default; `PENDING_CASES` only with `cargo xtask test
//! --pending`: they wait for hypervisor features that do not exist yet
//! (booting Linux; the pass-through guest's APs and dropped writes), and
//! move to `CASES` when those land.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use thinvisor_abi::exit_code;

use crate::bootsector;
pub use crate::esp::Esp;
use crate::images::{Images, Kernel};
use crate::linux::{self, LinuxAssets};
use crate::util::{Context, Ctx, Result};

/// Where a case runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emulator {
    /// QEMU TCG, `-cpu max` (AMD SVM), booted with `-kernel` (multiboot1).
    Qemu,
    /// Bochs with this CPU model, booted from a GRUB ISO (multiboot2).
    Bochs { model: &'static str },
    /// QEMU TCG, `-cpu max` (AMD SVM), with OVMF (UEFI) booting an EFI
    /// system partition built for the run (`esp.rs`): thinvisor.efi, which
    /// starts thinvisor and is resumed as its guest, then Debian's Linux
    /// through its EFI stub (or Linux alone). The case's `hv_args` are
    /// thinvisor.efi's options; its modules and disk are not used.
    Ovmf(Esp),
}

/// A module's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    /// `target/images/test-guest.elf`.
    TestGuest,
    /// `target/images/test-guest32.elf`.
    TestGuest32,
    /// `target/images/thinvisor.elf`: a module for the test guest's
    /// `loader` mode.
    Thinvisor,
    /// Generated text that is not an ELF file.
    Garbage,
    /// A generated, valid x86-64 ELF executable without a multiboot header.
    ElfWithoutMultiboot,
    /// Debian's Linux kernel (bzImage), `target/linux/vmlinuz`.
    LinuxKernel,
    /// The initramfs of the Linux guest, `target/linux/initrd.img`.
    LinuxInitrd,
}

/// A raw disk image attached as the first hard disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disk {
    /// `target/linux/disk.img`: MBR + SYSLINUX booting Debian's Linux with
    /// the same initramfs as `LinuxInitrd`.
    LinuxBoot,
    /// `target/xtask/bootsector/bootsector.img`: the boot-sector test of
    /// `boot=chain` (test-guests/bootsector); its cases check its memory
    /// answers against thinvisor's log ([`Check::BiosMemoryAnswers`]).
    BootSector,
    /// The same image as a virtio-blk disk (QEMU only): SeaBIOS drives
    /// virtio only from 32-bit code, so every INT 13h call switches modes
    /// through SMM (SMIs from inside the guest).
    BootSectorVirtio,
}

/// One integration test.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub name: &'static str,
    pub emulator: Emulator,
    /// The kernel the boot loader starts: thinvisor, or the test guest
    /// that starts thinvisor itself (`loader` mode).
    pub kernel: Kernel,
    /// The kernel's command line: the hypervisor's (with
    /// `Kernel::TestGuest`, the test guest's).
    pub hv_args: &'static str,
    /// The modules: file, and module string (`<file name> [args]`; the
    /// hypervisor sees this string under both emulators).
    pub modules: &'static [(Image, &'static str)],
    /// The `exit_code` the run must end with (QEMU only: Bochs' status
    /// says nothing).
    pub exit: Option<u8>,
    /// Substrings the serial log must contain (case-insensitive).
    pub must_contain: &'static [&'static str],
    /// Substrings the serial log must not contain (exact).
    pub must_not_contain: &'static [&'static str],
    /// Machine memory in MiB.
    pub mem_mb: u32,
    /// Wall-clock limit in seconds; 0 = the emulator's default.
    pub timeout_s: u64,
    /// Processors (QEMU `-smp`, Bochs `cpu: count=`); 1 = the emulator's
    /// default, one.
    pub smp: u32,
    /// QEMU's `-machine` (`pc`: i440FX with SMM on, QEMU's default).
    pub machine: &'static str,
    /// A raw disk image, as the BIOS's first hard disk (Bochs: ata0-master, the ISO moves to
    /// ata0-slave).
    pub disk: Option<Disk>,
    /// Checks that read the log as a whole.
    pub checks: &'static [Check],
    /// More QEMU arguments (QEMU only), e.g. `-device intel-iommu`.
    pub qemu_args: &'static [&'static str],
}

/// A judgement over the whole serial log, beyond substrings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The E820 map Linux prints (`BIOS-e820: [mem 0xS-0xE] TYPE`) has
    /// thinvisor's block (`thinvisor reserves N KiB at 0xA..0xB`) reserved,
    /// and no usable line overlaps it.
    E820HidesThinvisor,
    /// The boot-sector disk's BIOS memory answers (E820h entries, E801h,
    /// 88h, INT 12h, 0x413) hide thinvisor's block and agree with each
    /// other ([`bootsector::check_memory_answers`]).
    BiosMemoryAnswers,
    /// The BIOS's boot loader (SYSLINUX) started Linux, which printed the
    /// BIOS's memory map.
    BootedByTheBios,
    /// The UEFI memory map Linux prints with `efi=debug` (`efi: memNN:
    /// [TYPE |...] range=[0xS-0xE]`) has thinvisor's block (`thinvisor
    /// reserves N KiB at 0xA..0xB`) in Reserved ranges only (not
    /// conventional or boot-services memory, which the OS takes), and no
    /// usable E820 line overlaps it.
    EfiMapHidesThinvisor,
}

impl Check {
    /// What is wrong with `serial`, if anything.
    pub fn problem(self, serial: &str) -> Option<String> {
        match self {
            Check::E820HidesThinvisor => e820_hides_thinvisor(serial),
            Check::EfiMapHidesThinvisor => efi_map_hides_thinvisor(serial),
            Check::BootedByTheBios => {
                let missing: Vec<&str> = [
                    "SYSLINUX",
                    "BIOS-provided physical RAM map",
                    "BIOS-e820: [mem 0x0000000000000000-",
                ]
                .into_iter()
                .filter(|s| !serial.contains(s))
                .collect();
                (!missing.is_empty()).then(|| format!("not booted by the BIOS: no {missing:?}"))
            }
            Check::BiosMemoryAnswers => {
                let problems = bootsector::check_memory_answers(serial);
                (!problems.is_empty()).then(|| problems.join("; "))
            }
        }
    }
}

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// thinvisor's block from its boot log.
pub fn reserved_block(serial: &str) -> Option<(u64, u64)> {
    let line = serial.lines().find(|l| l.contains("thinvisor reserves "))?;
    let at = line.split(" at ").nth(1)?;
    let range = at.split_whitespace().next()?;
    let (a, b) = range.split_once("..")?;
    Some((
        parse_hex(a)?,
        parse_hex(b.trim_end_matches(|c: char| !c.is_ascii_hexdigit()))?,
    ))
}

fn e820_hides_thinvisor(serial: &str) -> Option<String> {
    let Some((start, end)) = reserved_block(serial) else {
        return Some("no `thinvisor reserves` line in the log".into());
    };
    let mut covered = false;
    let mut seen = 0;
    for line in serial.lines() {
        let Some(rest) = line.split("BIOS-e820: [mem ").nth(1) else {
            continue;
        };
        let Some((range, kind)) = rest.split_once(']') else {
            continue;
        };
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let (Some(s), Some(e)) = (parse_hex(s), parse_hex(e)) else {
            continue;
        };
        seen += 1;
        let kind = kind.trim();
        // Linux prints the last byte, inclusive.
        let overlaps = s < end && e >= start;
        if kind == "usable" && overlaps {
            return Some(format!(
                "E820 entry {s:#x}-{e:#x} usable overlaps thinvisor's {start:#x}..{end:#x}"
            ));
        }
        if kind == "reserved" && s <= start && e >= end - 1 {
            covered = true;
        }
    }
    match (seen, covered) {
        (0, _) => Some("no BIOS-e820 lines in the log".into()),
        (_, false) => Some(format!(
            "no reserved E820 entry covers thinvisor's {start:#x}..{end:#x}"
        )),
        _ => None,
    }
}

/// The ranges (inclusive ends, as Linux prints them) and kinds of the
/// E820 lines in `serial`.
fn e820_lines(serial: &str) -> Vec<(u64, u64, &str)> {
    serial
        .lines()
        .filter_map(|line| {
            let rest = line.split("BIOS-e820: [mem ").nth(1)?;
            let (range, kind) = rest.split_once(']')?;
            let (s, e) = range.split_once('-')?;
            Some((parse_hex(s)?, parse_hex(e)?, kind.trim()))
        })
        .collect()
}

/// The ranges (inclusive ends) and type names of the UEFI memory map
/// lines Linux prints with `efi=debug`:
/// `efi: mem07: [Reserved    |   |  |...|UC] range=[0x...-0x...] (8MB)`.
fn efi_map_lines(serial: &str) -> Vec<(u64, u64, &str)> {
    serial
        .lines()
        .filter_map(|line| {
            let rest = line.split("efi: mem").nth(1)?;
            let (_, rest) = rest.split_once(": [")?;
            let kind = rest.split('|').next()?.trim();
            let range = rest.split("range=[").nth(1)?.split(']').next()?;
            let (s, e) = range.split_once('-')?;
            Some((parse_hex(s)?, parse_hex(e)?, kind))
        })
        .collect()
}

fn efi_map_hides_thinvisor(serial: &str) -> Option<String> {
    let Some((start, end)) = reserved_block(serial) else {
        return Some("no `thinvisor reserves` line in the log".into());
    };
    let map = efi_map_lines(serial);
    if map.is_empty() {
        return Some("no UEFI memory map in the log (efi=debug)".into());
    }
    for &(s, e, kind) in &map {
        if kind != "Reserved" && s < end && e >= start {
            return Some(format!(
                "UEFI map entry {s:#x}-{e:#x} {kind} overlaps thinvisor's {start:#x}..{end:#x}"
            ));
        }
    }
    // Every byte of the block lies in a Reserved entry (Linux may print
    // the map more than once; adjacent entries may split the block).
    let mut reserved: Vec<(u64, u64)> = map
        .iter()
        .filter(|(_, _, kind)| *kind == "Reserved")
        .map(|&(s, e, _)| (s, e.saturating_add(1)))
        .collect();
    reserved.sort_unstable();
    let mut at = start;
    for (s, e) in reserved {
        if s <= at && e > at {
            at = e;
        }
    }
    if at < end {
        return Some(format!(
            "no Reserved UEFI map entry covers {at:#x} of thinvisor's {start:#x}..{end:#x}"
        ));
    }
    let e820 = e820_lines(serial);
    if e820.is_empty() {
        return Some("no BIOS-e820 lines in the log".into());
    }
    e820.iter()
        .find(|&&(s, e, kind)| kind == "usable" && s < end && e >= start)
        .map(|(s, e, _)| {
            format!("E820 entry {s:#x}-{e:#x} usable overlaps thinvisor's {start:#x}..{end:#x}")
        })
}

/// Defaults for a QEMU case; Bochs cases override `emulator`.
const QEMU: Case = Case {
    name: "",
    emulator: Emulator::Qemu,
    kernel: Kernel::Thinvisor,
    hv_args: "log=info",
    modules: &[],
    exit: None,
    must_contain: &[],
    must_not_contain: &[],
    mem_mb: 512,
    timeout_s: 0,
    smp: 1,
    machine: "pc",
    disk: None,
    checks: &[],
    qemu_args: &[],
};

const RYZEN: Emulator = Emulator::Bochs { model: "ryzen" };
const SKYLAKE_X: Emulator = Emulator::Bochs {
    model: "corei7_skylake_x",
};

/// The test guest's `checks` run passed.
const CHECKS_PASSED: &[&str] = &[
    "SUMMARY: ",
    " 0 failed",
    "PASS lookup_known",
    "PASS cpuid_signature",
    "PASS register_preservation",
    "PASS lookup_paged_high",
    "PASS lookup_paging_off",
    "PASS lookup_bad_pointer",
    "PASS invalid_function",
    "PASS lookup_overlong",
    "PASS lookup_unknown",
    "PASS lookup_empty",
    "PASS dbgsh_session",
    "PASS log_set_buf_accepted",
    "PASS efer_is_guests",
    "PASS syscall_sysret",
    "PASS protected_msr",
    "PASS many_exits",
    "PASS log_read_32bit",
    "PASS log_read_pae",
    "PASS log_read_4level",
    "PASS log_read_refused",
    "PASS log_set_buf_refused",
    "PASS log_set_buf_cpl3_ignored",
    "PASS log_set_buf_dropped",
    "PASS log_set_buf_stream",
    "PASS cross_vendor_call",
    "PASS hostile_calls",
    "PASS smi_storm",
    "PASS cr0_writes",
    "PASS xsetbv",
    "PASS cr_writes_gp",
    "SUMMARY: 30 passed, 0 failed",
];
/// Two constant lists of substrings as one.
macro_rules! joined {
    ($a:expr, $b:expr) => {{
        const A: &[&str] = $a;
        const B: &[&str] = $b;
        const ALL: [&str; A.len() + B.len()] = {
            let mut all = [""; A.len() + B.len()];
            let mut i = 0;
            while i < A.len() {
                all[i] = A[i];
                i += 1;
            }
            while i < A.len() + B.len() {
                all[i] = B[i - A.len()];
                i += 1;
            }
            all
        };
        &ALL
    }};
}

/// [`CHECKS_PASSED`], on a machine without an IOMMU (the default
/// `iommu=auto` says so and goes on).
const CHECKS_PASSED_NO_IOMMU: &[&str] = joined!(CHECKS_PASSED, &[NO_IOMMU_AUTO]);
/// The test guest's `dma` mode (`test-guests/checks/src/dma.rs`).
const DMA_GUEST: &[(Image, &str)] = &[(Image::TestGuest, "test-guest.elf dma")];
/// QEMU's `edu` at a fixed slot (so the fault lines name 00:05.0), with a
/// DMA mask that reaches thinvisor's block (the default, 28 bits, would
/// clamp addresses above 256 MiB).
const EDU: &str = "edu,addr=05.0,dma_mask=0xffffffffffff";
/// The line of a machine without an IOMMU under the default `iommu=auto`.
const NO_IOMMU_AUTO: &str =
    "iommu: none found (no DMAR or IVRS table), DMA protection off (iommu=auto)";
/// The test guest's `passthrough` mode (`test-guests/checks/src/passthrough.rs`).
const PASSTHROUGH_GUEST: &[(Image, &str)] = &[(Image::TestGuest, "test-guest.elf passthrough")];
/// Its run passed.
const PASSTHROUGH_PASSED: &[&str] = &[
    "PASS mmap_hides_thinvisor",
    "PASS log_set_buf_refused",
    "PASS hidden_reads_filler",
    "PASS apic_base_guarded",
    "PASS mtrr_guarded",
    "PASS pat_guarded",
    "PASS lvt_init_dropped",
    "(delivery mode INIT) dropped",
    "PASS timer_wakes_hlt",
    "PASS aps_start",
    "PASS pci_bar_guarded",
    "PASS hidden_writes_dropped",
    "SUMMARY: 11 passed, 0 failed",
    // The BAR moved over thinvisor's block, dropped (the guest checks
    // the BAR and the log line), and thinvisor's memory untouched.
    "pci: guest write of ",
    ": intact",
];
/// What the boot log says on SVM.
const ON_SVM: &[&str] = &["AMD SVM: revision"];
/// What the boot log says on VT-x under `efer=auto`: every Bochs Intel
/// model offers the EFER controls, VPID and 2 MiB EPT pages.
const ON_VMX_AUTO: &[&str] = &["EFER via VMCS controls", "VPID on", "EPT 2M pages yes"];
const ON_VMX_MSR_AREA: &[&str] = &["EFER via MSR areas", "VPID on", "EPT 2M pages yes"];
const NO_FAIL: &[&str] = &["FAIL"];
/// The test guest's `npf` run: a read of guest-physical 0xE000_0000, as
/// the hypervisor reports the stop (`report_stop` in hypervisor/src/main.rs;
/// the guest's own line names the address too, so the address alone
/// proves nothing).
const NPF_REPORTED: &[&str] = &["nested page fault: guest read at guest-physical 0xe0000000"];
/// The stop lines of the `halt` and `triple` runs (`report_stop`): a run
/// that ends any other way cannot print them.
const HALT_REPORTED: &[&str] = &["guest halted at rip 0x"];
const SHUTDOWN_REPORTED: &[&str] = &["guest shutdown (triple fault) near rip 0x"];
/// A `checks` run on VT-x that passed, and whose boot log names the EFER
/// path asked for.
const CHECKS_PASSED_VMX_AUTO: [&str; CHECKS_PASSED.len() + ON_VMX_AUTO.len()] =
    concat(CHECKS_PASSED, ON_VMX_AUTO);
const CHECKS_PASSED_VMX_MSR_AREA: [&str; CHECKS_PASSED.len() + ON_VMX_MSR_AREA.len()] =
    concat(CHECKS_PASSED, ON_VMX_MSR_AREA);

/// `a` then `b`, for expectation lists made of two (`N` must be the sum
/// of their lengths; a wrong `N` fails the build).
const fn concat<const N: usize>(a: &[&'static str], b: &[&'static str]) -> [&'static str; N] {
    assert!(a.len() + b.len() == N);
    let mut out = [""; N];
    let mut i = 0;
    while i < a.len() {
        out[i] = a[i];
        i += 1;
    }
    while i < N {
        out[i] = b[i - a.len()];
        i += 1;
    }
    out
}

/// The boot-sector disk under `boot=chain` (the memory answers are checked
/// too, see [`Disk::BootSector`]).
const CHAIN_BOOTSECTOR: &[&str] = &[
    "chain: INT 15h handler at",
    "bootsector: MBR running, DL=80",
    "bootsector: sector 1 read, signature ok",
    "e820: 0000000000000000 ",
    "e820 edges: ok",
    "int15 c0: ok",
    "cpuid: thinvisor",
    "vmm: lookup log_read = 00000003",
    "bootsector: PASS",
];

const CHECKS: &[(Image, &str)] = &[(Image::TestGuest, "test-guest.elf checks")];
/// The same with the full 1 MiB `log_set_buf_stream` (every byte of it also
/// goes to COM1 and port 0xE9, which costs QEMU about 5 s and Bochs about
/// 10 s; the other checks runs stream the default 128 KiB): one case per
/// vendor, whose expectations include [`FULL_STREAM`].
const CHECKS_FULL_STREAM: &[(Image, &str)] =
    &[(Image::TestGuest, "test-guest.elf checks stream_kib=1024")];
/// The full stream ran (the guest's note names its goal).
const FULL_STREAM: &[&str] = &["NOTE log_set_buf_stream: goal 1048576 bytes, "];
/// A `checks` run that passed with the full stream.
const CHECKS_PASSED_FULL_STREAM: [&str; CHECKS_PASSED.len() + FULL_STREAM.len()] =
    concat(CHECKS_PASSED, FULL_STREAM);
const NPF: &[(Image, &str)] = &[(Image::TestGuest, "test-guest.elf npf")];

pub const CASES: &[Case] = &[
    Case {
        name: "qemu-checks",
        modules: CHECKS_FULL_STREAM,
        exit: Some(exit_code::GUEST_PASSED),
        must_contain: &CHECKS_PASSED_FULL_STREAM,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "qemu-checks-elf32",
        modules: &[(Image::TestGuest32, "test-guest32.elf checks")],
        exit: Some(exit_code::GUEST_PASSED),
        must_contain: CHECKS_PASSED,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "qemu-npf",
        modules: NPF,
        exit: Some(exit_code::GUEST_BAD_MEMORY),
        must_contain: NPF_REPORTED,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "qemu-halt",
        modules: &[(Image::TestGuest, "test-guest.elf halt")],
        exit: Some(exit_code::GUEST_HALTED),
        must_contain: HALT_REPORTED,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "qemu-triple",
        modules: &[(Image::TestGuest, "test-guest.elf triple")],
        exit: Some(exit_code::GUEST_SHUTDOWN),
        must_contain: SHUTDOWN_REPORTED,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "qemu-no-module",
        exit: Some(exit_code::BOOT_ERROR),
        must_contain: &["no guest module"],
        ..QEMU
    },
    Case {
        name: "qemu-not-elf",
        modules: &[(Image::Garbage, "garbage.bin")],
        exit: Some(exit_code::BOOT_ERROR),
        must_contain: &["not an ELF"],
        ..QEMU
    },
    Case {
        name: "qemu-no-mb-header",
        modules: &[(Image::ElfWithoutMultiboot, "no-multiboot.elf")],
        exit: Some(exit_code::BOOT_ERROR),
        must_contain: &["multiboot header"],
        ..QEMU
    },
    Case {
        name: "qemu-1g-guest",
        hv_args: "log=info guest_mem=1G",
        modules: CHECKS,
        exit: Some(exit_code::GUEST_PASSED),
        must_contain: &[
            "guest RAM: 1024 MiB",
            "1 GiB pages yes",
            "PASS cross_vendor_call",
            "SUMMARY: 30 passed, 0 failed",
        ],
        must_not_contain: NO_FAIL,
        mem_mb: 3072,
        ..QEMU
    },
    Case {
        // 7 GiB: QEMU's `pc` puts 3 GiB below 4 GiB, so 3 GiB of guest RAM
        // can only come from above 4 GiB, through the extended direct map.
        name: "qemu-high-memory",
        hv_args: "log=debug guest_mem=3G",
        modules: CHECKS,
        exit: Some(exit_code::GUEST_PASSED),
        must_contain: &[
            "direct map: 8 GiB",
            "guest RAM: 3072 MiB at host-physical 0x100000000",
            "SUMMARY: 30 passed, 0 failed",
        ],
        must_not_contain: NO_FAIL,
        mem_mb: 7168,
        timeout_s: 90,
        ..QEMU
    },
    Case {
        // DMA remapping with Intel VT-d (QEMU's intel-iommu; the CPU is
        // still QEMU's AMD model with SVM: QEMU TCG has no VT-x).
        name: "qemu-vtd-dma",
        machine: "q35",
        hv_args: "log=info layout=passthrough iommu=required",
        modules: DMA_GUEST,
        qemu_args: &["-device", "intel-iommu", "-device", EDU],
        exit: Some(exit_code::GUEST_PASSED),
        must_contain: &[
            "iommu: Intel VT-d, 1 unit(s) at 0xfed90000: DMA remapping on",
            "the DMAR table and the registers hidden from the guest",
            "iommu: DMA fault: device 00:05.0 write at 0x",
            // The guest's "translation off" (GCMD = 0), dropped.
            "guest write into thinvisor's memory at 0xfed90018 (rip",
            "iommu: DMA fault: device 00:05.0 read at 0x",
            "test-guest: thinvisor's log names edu and 0x",
            "PASS dma_finds_edu",
            "PASS dma_to_guest_memory",
            "PASS dma_iommu_registers_hidden",
            "PASS pci_bar_guarded",
            "PASS pci_iommu_function_guarded",
            "PASS dma_into_thinvisor_blocked",
            "PASS dma_read_of_thinvisor_blocked",
            "SUMMARY: 7 passed, 0 failed",
            // q35: ECAM watched; the BAR refused through it too.
            "read-only to the guest: its configuration writes are judged",
            "via ECAM dropped",
            "iommu: 2 DMA fault(s) blocked during the run",
            ": intact",
        ],
        must_not_contain: &["FAIL", "OVERWRITTEN"],
        ..QEMU
    },
    Case {
        // DMA remapping with AMD-Vi (QEMU's amd-iommu, which writes no
        // event log in 7.2: the fault shows as the IOMMU's aborted request).
        name: "qemu-amdvi-dma",
        machine: "q35",
        hv_args: "log=info layout=passthrough iommu=required",
        modules: DMA_GUEST,
        qemu_args: &["-device", "amd-iommu", "-device", EDU],
        exit: Some(exit_code::GUEST_PASSED),
        must_contain: &[
            "iommu: AMD-Vi, 1 unit(s) at 0xfed80000: DMA remapping on",
            "the IVRS table and the registers hidden from the guest",
            "iommu: DMA fault: the AMD-Vi unit 00:03.0 aborted a device's request",
            // The guest's "IOMMU off" (Control = 0), dropped.
            "guest write into thinvisor's memory at 0xfed80018 (rip",
            "PASS dma_finds_edu",
            "PASS dma_to_guest_memory",
            "PASS dma_iommu_registers_hidden",
            "PASS pci_bar_guarded",
            "PASS pci_iommu_function_guarded",
            "PASS dma_into_thinvisor_blocked",
            "PASS dma_read_of_thinvisor_blocked",
            "SUMMARY: 7 passed, 0 failed",
            // q35: ECAM watched; the BAR refused through it too.
            "read-only to the guest: its configuration writes are judged",
            "via ECAM dropped",
            // The IOMMU's own function: its base register rewritten.
            "to 00:03.0 offset 0x",
            "the IOMMU's own function",
            "iommu: 2 DMA fault(s) blocked during the run",
            ": intact",
        ],
        must_not_contain: &["FAIL", "OVERWRITTEN"],
        ..QEMU
    },
    Case {
        // iommu=required on a machine without one: a boot error, one line.
        name: "qemu-iommu-required-none",
        hv_args: "log=info layout=passthrough iommu=required",
        modules: CHECKS,
        exit: Some(exit_code::BOOT_ERROR),
        must_contain: &[
            "iommu: none found (no DMAR or IVRS table); iommu=required: refusing to start the guest without DMA protection",
        ],
        must_not_contain: &["entering the guest"],
        ..QEMU
    },
    Case {
        name: "qemu-mem-too-big",
        hv_args: "log=info guest_mem=8G",
        modules: CHECKS,
        exit: Some(exit_code::BOOT_ERROR),
        must_contain: &["does not fit"],
        ..QEMU
    },
    Case {
        name: "qemu-mem-exhausted",
        hv_args: "log=info guest_mem=1G",
        modules: CHECKS,
        exit: Some(exit_code::BOOT_ERROR),
        must_contain: &["does not fit"],
        mem_mb: 512,
        ..QEMU
    },
    Case {
        name: "bochs-ryzen-checks",
        emulator: RYZEN,
        modules: CHECKS,
        must_contain: CHECKS_PASSED,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "bochs-ryzen-npf",
        emulator: RYZEN,
        modules: NPF,
        must_contain: NPF_REPORTED,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "qemu-svm-log",
        modules: CHECKS,
        exit: Some(exit_code::GUEST_PASSED),
        must_contain: ON_SVM,
        ..QEMU
    },
    Case {
        name: "qemu-passthrough-checks",
        hv_args: "log=info layout=passthrough",
        modules: CHECKS,
        exit: Some(exit_code::GUEST_PASSED),
        must_contain: CHECKS_PASSED_NO_IOMMU,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "bochs-skylake-x-passthrough-checks",
        emulator: SKYLAKE_X,
        hv_args: "log=info layout=passthrough",
        modules: CHECKS,
        must_contain: CHECKS_PASSED,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        // QEMU's default machine (`pc`, SMM on: SeaBIOS's disk services
        // raise SMIs) boots thinvisor with -kernel; the BIOS boots the disk.
        name: "qemu-chain-bootsector",
        hv_args: "log=info boot=chain",
        disk: Some(Disk::BootSector),
        checks: &[Check::BiosMemoryAnswers],
        exit: Some(exit_code::GUEST_PASSED),
        must_contain: CHAIN_BOOTSECTOR,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "qemu-chain-bootsector-virtio",
        hv_args: "log=info boot=chain",
        disk: Some(Disk::BootSectorVirtio),
        checks: &[Check::BiosMemoryAnswers],
        exit: Some(exit_code::GUEST_PASSED),
        must_contain: CHAIN_BOOTSECTOR,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        // GRUB from the CD-ROM (ata0-slave) boots thinvisor; the disk is
        // ata0-master, BIOS drive 80h. Real mode runs as an unrestricted
        // guest.
        name: "bochs-skylake-x-chain-bootsector",
        emulator: SKYLAKE_X,
        hv_args: "log=info boot=chain",
        disk: Some(Disk::BootSector),
        checks: &[Check::BiosMemoryAnswers],
        must_contain: CHAIN_BOOTSECTOR,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "bochs-skylake-x-checks",
        emulator: SKYLAKE_X,
        modules: CHECKS_FULL_STREAM,
        must_contain: &CHECKS_PASSED_FULL_STREAM,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "bochs-skylake-x-efer-auto",
        emulator: SKYLAKE_X,
        hv_args: "log=info efer=auto",
        modules: CHECKS,
        must_contain: &CHECKS_PASSED_VMX_AUTO,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "bochs-skylake-x-efer-msr-area",
        emulator: SKYLAKE_X,
        hv_args: "log=info efer=msr-area",
        modules: CHECKS,
        must_contain: &CHECKS_PASSED_VMX_MSR_AREA,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "bochs-skylake-x-npf",
        emulator: SKYLAKE_X,
        modules: NPF,
        must_contain: NPF_REPORTED,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "bochs-skylake-x-halt",
        emulator: SKYLAKE_X,
        modules: &[(Image::TestGuest, "test-guest.elf halt")],
        must_contain: HALT_REPORTED,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "bochs-skylake-x-triple",
        emulator: SKYLAKE_X,
        modules: &[(Image::TestGuest, "test-guest.elf triple")],
        must_contain: SHUTDOWN_REPORTED,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "bochs-icelake-u-checks",
        emulator: Emulator::Bochs {
            model: "corei7_icelake_u",
        },
        modules: CHECKS,
        must_contain: CHECKS_PASSED,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "bochs-tigerlake-checks",
        emulator: Emulator::Bochs { model: "tigerlake" },
        modules: CHECKS,
        must_contain: CHECKS_PASSED,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "bochs-haswell-checks",
        emulator: Emulator::Bochs {
            model: "corei7_haswell_4770",
        },
        modules: CHECKS,
        must_contain: CHECKS_PASSED,
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        // thinvisor loads the bzImage (first module; its string minus the
        // file name is the kernel's command line) and the initrd (second)
        // itself, the way a Linux boot loader does.
        name: "qemu-linux",
        hv_args: linux::LINUX_HV_ARGS,
        modules: &[
            (Image::LinuxKernel, linux::KERNEL_MODULE),
            (Image::LinuxInitrd, linux::INITRD_MODULE),
        ],
        must_contain: LINUX_UNDER_THINVISOR,
        must_not_contain: LINUX_TROUBLE,
        smp: 2,
        timeout_s: 120,
        checks: &[Check::E820HidesThinvisor],
        ..QEMU
    },
    Case {
        // Linux with DMA remapping on (Intel VT-d on q35): its devices
        // work, it finds no DMAR (renamed XMAR) and so never touches the
        // IOMMU; no device faults.
        name: "qemu-linux-vtd",
        machine: "q35",
        hv_args: "boot=linux log=info iommu=required",
        modules: &[
            (Image::LinuxKernel, linux::KERNEL_MODULE),
            (Image::LinuxInitrd, linux::INITRD_MODULE),
        ],
        qemu_args: &["-device", "intel-iommu"],
        must_contain: joined!(
            LINUX_UNDER_THINVISOR,
            &[
                "iommu: Intel VT-d, 1 unit(s) at 0xfed90000: DMA remapping on",
                "the DMAR table and the registers hidden from the guest",
                "iommu: 0 DMA fault(s) blocked during the run",
                // Linux lists the renamed table and ignores it.
                "ACPI: XMAR 0x",
            ]
        ),
        must_not_contain: joined!(LINUX_TROUBLE, &["DMAR: Host address width", "DMAR: IOMMU enabled"]),
        smp: 2,
        timeout_s: 120,
        checks: &[Check::E820HidesThinvisor],
        ..QEMU
    },
    Case {
        // thinvisor boots the first hard disk the BIOS way: SeaBIOS, the
        // MBR, SYSLINUX (real mode, BIOS disk calls) and then
        // Linux, which prints the BIOS's memory map.
        name: "qemu-linux-chain",
        hv_args: linux::CHAIN_HV_ARGS,
        disk: Some(Disk::LinuxBoot),
        must_contain: LINUX_UNDER_THINVISOR,
        must_not_contain: LINUX_TROUBLE,
        smp: 2,
        timeout_s: 120,
        checks: &[Check::E820HidesThinvisor, Check::BootedByTheBios],
        ..QEMU
    },
    Case {
        name: "qemu-passthrough-guest",
        hv_args: "log=info layout=passthrough",
        modules: PASSTHROUGH_GUEST,
        exit: Some(exit_code::GUEST_PASSED),
        must_contain: PASSTHROUGH_PASSED,
        must_not_contain: NO_FAIL,
        smp: 2,
        ..QEMU
    },
    Case {
        name: "bochs-skylake-x-passthrough-guest",
        emulator: SKYLAKE_X,
        hv_args: "log=info layout=passthrough",
        modules: PASSTHROUGH_GUEST,
        must_contain: PASSTHROUGH_PASSED,
        must_not_contain: NO_FAIL,
        smp: 2,
        ..QEMU
    },
    Case {
        // The same kernel and initramfs on Bochs' Intel model: VT-x with
        // EPT, unrestricted guest, 2 processors. About 5-6 G instructions:
        // 4-5 minutes on an idle machine, 10 on a busy one.
        name: "bochs-skylake-x-linux",
        emulator: SKYLAKE_X,
        hv_args: linux::LINUX_HV_ARGS,
        modules: &[
            (Image::LinuxKernel, linux::KERNEL_MODULE),
            (Image::LinuxInitrd, linux::INITRD_MODULE),
        ],
        must_contain: LINUX_UNDER_THINVISOR,
        must_not_contain: LINUX_TROUBLE,
        smp: 2,
        timeout_s: 900,
        checks: &[Check::E820HidesThinvisor],
        ..QEMU
    },
    Case {
        // `dbgsh=off`: the call streams the one-line message and ends
        // each session (the test guest reads it twice).
        name: "qemu-dbgsh-off",
        hv_args: "log=info dbgsh=off",
        modules: &[(Image::TestGuest, "test-guest.elf dbgsh-off")],
        exit: Some(exit_code::GUEST_PASSED),
        must_contain: &[
            "dbgsh=off: the debug shell is disabled",
            "PASS dbgsh_disabled",
            "SUMMARY: 1 passed, 0 failed",
        ],
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        name: "bochs-skylake-x-dbgsh-off",
        emulator: SKYLAKE_X,
        hv_args: "log=info dbgsh=off",
        modules: &[(Image::TestGuest, "test-guest.elf dbgsh-off")],
        must_contain: &[
            "dbgsh=off: the debug shell is disabled",
            "PASS dbgsh_disabled",
            "SUMMARY: 1 passed, 0 failed",
        ],
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        // A keyboard-controller reset: thinvisor reports the run, then the
        // reset acts (QEMU runs with -no-reboot and exits with status 0).
        name: "qemu-passthrough-reboot",
        hv_args: "log=info layout=passthrough",
        modules: &[(Image::TestGuest, "test-guest.elf reboot")],
        // QEMU's status after a reset with -no-reboot is 0, which no
        // exit code maps to: the log is the judge.
        exit: None,
        must_contain: &[
            "test-guest: resetting the machine",
            "the guest resets the machine (keyboard controller) (port 0x64, value 0xfe)",
            "VM exits on CPU 0:",
            "canary in thinvisor's memory at",
            ": intact",
        ],
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    Case {
        // A triple fault of the machine's own OS ends the run with the
        // documented status, the stop reason and the exit table.
        name: "qemu-passthrough-triple",
        hv_args: "log=info layout=passthrough",
        modules: &[(Image::TestGuest, "test-guest.elf triple")],
        exit: Some(exit_code::GUEST_SHUTDOWN),
        must_contain: &[
            "guest shutdown (triple fault)",
            "VM exits on CPU 0:",
            "SHUTDOWN",
            ": intact",
        ],
        must_not_contain: NO_FAIL,
        ..QEMU
    },
    // The hostile guest (issue 9): random VMM calls, hostile page tables,
    // CPUID, MSRs, port I/O and IPIs on both processors at once, seeded
    // (test-guests/checks/src/hostile.rs).
    HOSTILE_QEMU,
    HOSTILE_BOCHS,
    HOSTILE_RYZEN,
    LOADER_QEMU,
    LOADER_BOCHS,
    // UEFI (issue 10): thinvisor.efi, then Debian's Linux through its EFI
    // stub, under thinvisor.
    // OVMF's shell runs startup.nsh: `thinvisor.efi log=info`, then
    // Debian's kernel (EFI stub) under thinvisor.
    Case {
        name: "ovmf-linux-shell",
        emulator: Emulator::Ovmf(Esp::Shell),
        must_contain: LINUX_UNDER_THINVISOR_UEFI,
        must_not_contain: LINUX_TROUBLE,
        checks: &[Check::EfiMapHidesThinvisor, Check::E820HidesThinvisor],
        ..OVMF
    },
    // The firmware's boot manager, no shell: \EFI\BOOT\BOOTX64.EFI is
    // thinvisor.efi, whose thinvisor.cfg starts the kernel (`then`).
    Case {
        name: "ovmf-linux-bootmgr",
        emulator: Emulator::Ovmf(Esp::BootManager),
        must_contain: joined!(
            LINUX_UNDER_THINVISOR_UEFI,
            &[r"thinvisor.efi: starting \vmlinuz initrd=\initrd.img console=ttyS0"]
        ),
        must_not_contain: joined!(LINUX_TROUBLE, &["Shell> "]),
        checks: &[Check::EfiMapHidesThinvisor, Check::E820HidesThinvisor],
        ..OVMF
    },
    // The same OVMF and Linux without thinvisor: the wall time to compare
    // `ovmf-linux-shell` with (both print "marker line after N s").
    Case {
        name: "ovmf-linux-bare",
        emulator: Emulator::Ovmf(Esp::Bare),
        must_contain: LINUX_BARE_UEFI,
        must_not_contain: &["Kernel panic", "thinvisor: [", "thinvisor.efi"],
        ..OVMF
    },
];

/// Defaults of the UEFI cases: QEMU TCG with OVMF, q35 (SMM on), 2
/// processors, 512 MiB, Linux with the test initramfs.
const OVMF: Case = Case {
    emulator: Emulator::Ovmf(Esp::Shell),
    machine: "q35",
    smp: 2,
    ..QEMU
};

/// Linux started by its EFI stub (from OVMF's shell or from
/// thinvisor.efi), which loaded the initramfs named on its command line.
const LINUX_BY_EFI_STUB: &[&str] = &[
    "EFI stub: Loaded initrd from command line option",
    "efi: EFI v2",
];

/// The bare UEFI run: Linux's init and every guest tool say there is no
/// thinvisor.
const LINUX_BARE_UEFI: &[&str] = joined!(
    LINUX_BY_EFI_STUB,
    &[
        linux::MARKER,
        "thinvisor-init: cpus 2",
        "probe: no thinvisor",
        "thinvisor-init: no-vmm dbgsh status 2",
        "thinvisor-init: no-vmm vmmlog status 2",
        "thinvisor-init: no-vmm memscan status 2",
        "thinvisor-init: no-vmm vmmbench status 2",
        linux::DONE,
    ]
);

/// thinvisor.efi started thinvisor with the case's options (`log=info`),
/// thinvisor booted in resume mode inside the loader's block, and resumed
/// the loader as its guest: the loader saw thinvisor's CPUID signature
/// once the call returned.
const THINVISOR_EFI_RESUMED: &[&str] = &[
    "thinvisor.efi: starting thinvisor with \"log=info\"",
    "thinvisor.efi: thinvisor's image at 0x",
    " MiB, reserved)",
    "command line: \"log=info\"",
    "boot mode: resume (the loader's resume tag",
    "as the guest; thinvisor takes only its block 0x",
    "thinvisor reserves ",
    "thinvisor.efi: the firmware runs under thinvisor now",
];

/// thinvisor.efi started, the firmware resumed under thinvisor, Linux
/// started by its EFI stub and ran its init under thinvisor.
const LINUX_UNDER_THINVISOR_UEFI: &[&str] = joined!(
    joined!(THINVISOR_EFI_RESUMED, LINUX_BY_EFI_STUB),
    LINUX_UNDER_THINVISOR
);

/// The `hostile` mode's module string: seed 1 (see the mode's docs to
/// reproduce another seed).
const HOSTILE_GUEST: &[(Image, &str)] = &[(Image::TestGuest, "test-guest.elf hostile seed=1")];
/// Its run passed: the guest's own verdict with the operations on both
/// CPUs, both CPUs' last lookups, and thinvisor's canary. (Lines printed
/// while the other CPU still works can be cut by thinvisor's log lines on
/// the shared serial port: only lines printed after every CPU finished
/// are looked for.)
const HOSTILE_PASSED: &[&str] = &[
    "test-guest: hostile: 120000 operations on 2 CPUs",
    "test-guest: hostile CPU 0: ",
    "test-guest: hostile CPU 1: ",
    // The INIT storm (8 INIT-SIPI-SIPI cycles from the BSP, the guest's
    // default): the AP came back under thinvisor after each one.
    " 8 INIT cycles sent;",
    "; entered 9 times;",
    "restarting at 0x9000",
    "test-guest: hostile: thinvisor answered every CPU's last lookup",
    "PASS hostile",
    "SUMMARY: 1 passed, 0 failed",
    "canary in thinvisor's memory at",
    ": intact",
];
const HOSTILE_QEMU: Case = Case {
    name: "qemu-hostile",
    hv_args: "log=info layout=passthrough",
    modules: HOSTILE_GUEST,
    exit: Some(exit_code::GUEST_PASSED),
    must_contain: HOSTILE_PASSED,
    must_not_contain: NO_FAIL,
    smp: 2,
    ..QEMU
};
const HOSTILE_BOCHS: Case = Case {
    name: "bochs-skylake-x-hostile",
    emulator: SKYLAKE_X,
    hv_args: "log=info layout=passthrough",
    modules: HOSTILE_GUEST,
    must_contain: HOSTILE_PASSED,
    must_not_contain: NO_FAIL,
    smp: 2,
    ..QEMU
};
/// On Bochs' AMD model: its CPUID offers EFER.TCE, which its VMRUN
/// refuses (the guest's write must raise #GP, not stop the machine).
const HOSTILE_RYZEN: Case = Case {
    name: "bochs-ryzen-hostile",
    emulator: RYZEN,
    ..HOSTILE_BOCHS
};

/// The test guest's `loader` mode (test-guests/checks/src/loader.rs): the
/// test guest is the multiboot v1 kernel, booted bare, with thinvisor.elf
/// (the ELF64) as its module; it starts thinvisor through crates/handoff
/// with a resume tag and goes on as its guest. Its command line: the mode,
/// then thinvisor's after `--`.
const LOADER_MODULES: &[(Image, &str)] = &[(Image::Thinvisor, "thinvisor.elf")];
const LOADER_ARGS: &str = "loader -- log=info";
/// Its run passed: thinvisor read the information the guest built, the
/// guest came back from the switch as thinvisor's guest and every check
/// passed, the AP the guest started came up under thinvisor (thinvisor's
/// INIT/SIPI emulation), both processors ran under thinvisor (exit
/// tables) and thinvisor's memory was untouched.
// TODO(resume): add thinvisor's own line that it resumed the loader once
// the `resume` branch settles its wording.
const LOADER_PASSED: &[&str] = &[
    "test-guest: mode loader",
    "test-guest: loader: entering thinvisor at 0x",
    "command line: \"log=info\"",
    "test-guest: loader: back from thinvisor (returned 0x0)",
    "PASS resume_returned",
    "PASS resume_cpuid_signature",
    "PASS resume_lookup_dbgsh",
    "PASS resume_control_registers",
    "PASS resume_descriptor_tables",
    "PASS resume_rflags_if",
    "PASS resume_msrs",
    "PASS resume_callee_saved",
    "PASS resume_interrupt",
    "PASS resume_block_hidden",
    "PASS resume_block_used",
    "PASS resume_aps_start",
    "SUMMARY: 12 passed, 0 failed",
    // thinvisor's own word: it resumed the loader, took its block, held
    // the AP, which the guest started under it.
    "boot mode: resume (the loader's resume tag",
    "resume: the loader continues as the guest at ",
    "the rest of the loader's block unused",
    "1 application processor(s) under thinvisor",
    "test-guest: 1 APs answered",
    "VM exits on CPU 0:",
    "VM exits on CPU 1:",
    "canary in thinvisor's memory at",
    ": intact",
];
const LOADER_QEMU: Case = Case {
    name: "qemu-resume",
    kernel: Kernel::TestGuest,
    hv_args: LOADER_ARGS,
    modules: LOADER_MODULES,
    exit: Some(exit_code::GUEST_PASSED),
    must_contain: LOADER_PASSED,
    must_not_contain: &["FAIL", "OVERWRITTEN"],
    smp: 2,
    ..QEMU
};
/// The same on VT-x: Bochs cannot run OVMF in reasonable time, so this is
/// how "continue from the current state" is covered on Intel.
const LOADER_BOCHS: Case = Case {
    name: "bochs-skylake-x-resume",
    emulator: SKYLAKE_X,
    exit: None,
    // GRUB reads thinvisor.elf and the test guest (15 MiB) from the CD
    // before anything runs: about 40 s to thinvisor's first line.
    timeout_s: 240,
    ..LOADER_QEMU
};

/// What every Linux boot prints, under thinvisor, with two processors
/// (see `linux::INIT_SCRIPT` and the probe in `guest-tools`).
const LINUX_UNDER_THINVISOR: &[&str] = &[
    linux::MARKER,
    "thinvisor-init: cpus 2",
    "thinvisor-init: hypervisor-flag yes",
    "probe: cpuid-signature thinvisor",
    "probe: lookup log_read = 3",
    // The guest tools (guest-tools, run by the init script): the VMM log
    // from user space, also followed; the debug shell from a pipe, each
    // answer checked; the C program on BitVisor's call_vmm API; the
    // documented status of an unknown name; the shell from CPU 1.
    "thinvisor-init: vmmlog ok",
    "thinvisor-init: dbgsh ok",
    "thinvisor-init: dbgsh-help ok",
    "thinvisor-init: dbgsh-log ok",
    "thinvisor-init: dbgsh-mem ok",
    "dbgsh| 0000000000001000: ",
    "thinvisor-init: dbgsh-mem-refused ok",
    "is thinvisor's own memory: refused",
    "thinvisor-init: dbgsh-unknown ok",
    "thinvisor-init: dbgsh-stat ok",
    "thinvisor-init: dbgsh-cpu ok",
    "dbgsh| backend: ",
    "thinvisor-init: vmmlog-follow ok",
    "thinvisor-init: vmmlog-follow-session ok",
    "c-example: dbgsh banner ok",
    "c-example: log_read ok",
    "c-example: done",
    "thinvisor-init: c-example ok",
    "thinvisor-init: vmmcall no_such_function status 3",
    "thinvisor-init: vmmcall ok",
    "thinvisor-init: vmmbench ok",
    "thinvisor-init: taskset -c 1 runs on CPU 1",
    "thinvisor-init: dbgsh-cpu1 ok",
    "thinvisor-init: dbgsh-busy ok",
    // CPU 1 offline and online again: Linux's INIT and SIPI, emulated by
    // thinvisor, brought it back under thinvisor.
    "thinvisor-init: cpu1-restart ok",
    "CPU 1 (APIC ID 1): INIT from the guest, waiting for a SIPI",
    "CPU 1: SIPI ",
    // memscan read the guest's whole physical memory and found no word of
    // thinvisor's canary page, but the pattern it planted in its own.
    "thinvisor-init: memscan ok (",
    " unreadable, 0 matches)",
    linux::DONE,
    // Both processors ran the guest under thinvisor (each has an exit
    // table), the power-off was seen, thinvisor's memory was untouched.
    "1 application processor(s) under thinvisor",
    "the guest enters an ACPI sleep state (powers off)",
    "VM exits on CPU 0:",
    "VM exits on CPU 1:",
    ": intact",
];
/// Signs of a Linux boot gone wrong.
/// (` FAILED (` is how the init script and the C example report a failed
/// step.)
const LINUX_TROUBLE: &[&str] = &[
    "Kernel panic",
    "probe failed",
    "probe: no thinvisor",
    " FAILED (",
];

/// Cases that wait for hypervisor features still being written: run only
/// with `cargo xtask test --pending` (e.g. `--filter linux --pending`). A
/// case moves to `CASES` once it passes.
pub const PENDING_CASES: &[Case] = &[];

/// Every case, the pending ones too.
pub fn all_cases() -> impl Iterator<Item = &'static Case> {
    CASES.iter().chain(PENDING_CASES)
}

impl Case {
    /// Whether the case boots the Linux assets (built only when a selected
    /// case needs them: the first build downloads ~70 MB).
    pub fn needs_linux(&self) -> bool {
        matches!(self.emulator, Emulator::Ovmf(_))
            || self.needs_linux_disk()
            || self
                .modules
                .iter()
                .any(|(image, _)| matches!(image, Image::LinuxKernel | Image::LinuxInitrd))
    }

    /// Whether the case needs the Linux boot disk.
    pub fn needs_linux_disk(&self) -> bool {
        self.disk == Some(Disk::LinuxBoot)
    }

    /// Whether the case is in `PENDING_CASES`.
    pub fn is_pending(&self) -> bool {
        PENDING_CASES.iter().any(|c| c.name == self.name)
    }

    /// The wall-clock limit.
    pub fn timeout(&self) -> Duration {
        let default = match self.emulator {
            Emulator::Qemu => 30,
            Emulator::Bochs { .. } => 120,
            Emulator::Ovmf(_) => 240,
        };
        Duration::from_secs(if self.timeout_s == 0 {
            default
        } else {
            self.timeout_s
        })
    }

    /// Why `serial` does not satisfy the substring expectations (empty
    /// when it does).
    pub fn check_serial(&self, serial: &str) -> Vec<String> {
        let lower = serial.to_lowercase();
        let mut problems = Vec::new();
        let lacking: Vec<String> = self
            .must_contain
            .iter()
            .filter(|s| !lower.contains(&s.to_lowercase()))
            .map(|s| format!("{s:?}"))
            .collect();
        if !lacking.is_empty() {
            problems.push(format!("serial log lacks {}", lacking.join(", ")));
        }
        let present: Vec<String> = self
            .must_not_contain
            .iter()
            .filter(|s| serial.contains(**s))
            .map(|s| format!("{s:?}"))
            .collect();
        if !present.is_empty() {
            problems.push(format!("serial log contains {}", present.join(", ")));
        }
        problems.extend(self.checks.iter().filter_map(|c| c.problem(serial)));
        problems
    }
}

impl Image {
    /// The file, generating it under `target/xtask/` when it is one of the
    /// generated inputs. The Linux images need `linux` (built by the
    /// caller when a selected case needs it).
    pub fn path(self, ctx: &Ctx, images: &Images, linux: Option<&LinuxAssets>) -> Result<PathBuf> {
        let linux = || linux.ok_or("the Linux assets were not built");
        let (path, contents) = match self {
            Image::TestGuest => return Ok(images.guest.clone()),
            Image::TestGuest32 => return Ok(images.guest32.clone()),
            Image::Thinvisor => return Ok(images.hv.clone()),
            Image::LinuxKernel => return Ok(linux()?.kernel.clone()),
            Image::LinuxInitrd => return Ok(linux()?.initrd.clone()),
            Image::Garbage => (ctx.work().join("garbage.bin"), garbage_text()),
            Image::ElfWithoutMultiboot => {
                (ctx.work().join("no-multiboot.elf"), elf_without_multiboot())
            }
        };
        fs::create_dir_all(ctx.work()).context("creating target/xtask")?;
        fs::write(&path, contents).context(format_args!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Disk {
    /// The image file: the Linux disk from `linux` (built by the caller),
    /// the boot-sector disk built here when needed.
    pub fn path(self, ctx: &Ctx, linux: Option<&LinuxAssets>) -> Result<PathBuf> {
        match self {
            Disk::LinuxBoot => linux
                .and_then(|l| l.disk.clone())
                .ok_or_else(|| "the Linux boot disk was not built".to_string()),
            Disk::BootSector | Disk::BootSectorVirtio => bootsector::build(ctx),
        }
    }
}

/// 4 KiB of deterministic pseudo-random printable text.
pub fn garbage_text() -> Vec<u8> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:-";
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..4096)
        .map(|i| {
            if i % 64 == 63 {
                return b'\n';
            }
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ALPHABET[(state % ALPHABET.len() as u64) as usize]
        })
        .collect()
}

/// A minimal static x86-64 ELF executable (one PT_LOAD segment at 2 MiB,
/// entry `hlt; jmp $-1`) that has no multiboot header.
pub fn elf_without_multiboot() -> Vec<u8> {
    const BASE: u64 = 0x20_0000;
    const EHDR: u64 = 64;
    const PHDR: u64 = 56;
    let code: &[u8] = &[0xF4, 0xEB, 0xFD]; // hlt; jmp back to the hlt
    let size = EHDR + PHDR + code.len() as u64;
    let mut elf = Vec::new();
    // e_ident: magic, ELFCLASS64, little-endian, version 1, System V ABI.
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type = ET_EXEC
    elf.extend_from_slice(&0x3Eu16.to_le_bytes()); // e_machine = x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&(BASE + EHDR + PHDR).to_le_bytes()); // e_entry
    elf.extend_from_slice(&EHDR.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&(EHDR as u16).to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&(PHDR as u16).to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
                                                // The program header: PT_LOAD, R+X, the whole file at BASE.
    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags
    elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&size.to_le_bytes()); // p_filesz
    elf.extend_from_slice(&size.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    elf.extend_from_slice(code);
    elf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::Module;
    use std::collections::HashSet;

    #[test]
    fn names_are_unique_and_plain() {
        let mut seen = HashSet::new();
        for case in all_cases() {
            assert!(seen.insert(case.name), "duplicate case {}", case.name);
            assert!(
                case.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "case name {}",
                case.name
            );
        }
    }

    #[test]
    fn module_strings_start_with_file_names() {
        for case in all_cases() {
            for (_, cmdline) in case.modules {
                Module::new("x", *cmdline).file_name().unwrap();
            }
        }
    }

    #[test]
    fn bochs_cases_expect_no_status() {
        for case in all_cases() {
            if let Emulator::Bochs { .. } = case.emulator {
                assert_eq!(case.exit, None, "{}", case.name);
                assert!(
                    matches!(case.disk, None | Some(Disk::BootSector)),
                    "{}",
                    case.name
                );
            }
        }
    }

    /// What the Linux guest prints under thinvisor once it boots, as the
    /// init script and the probe write it (the console adds `\r`).
    const LINUX_SERIAL_UNDER_THINVISOR: &str = concat!(
        "thinvisor: [INFO ] thinvisor reserves 4096 KiB at 0x1fa00000..0x1fe00000 (image 508 KiB, heap 3588 KiB)\r\n",
        "thinvisor: [INFO ] 1 application processor(s) under thinvisor (trampoline at 0x8000, 56 KiB each)\r\n",
        "[    0.000000] BIOS-e820: [mem 0x0000000000100000-0x000000001f9fffff] usable\r\n",
        "[    0.000000] BIOS-e820: [mem 0x000000001fa00000-0x000000001fdfffff] reserved\r\n",
        "[    2.636637] Run /init as init process\r\n",
        "thinvisor-init: marker\r\n",
        "thinvisor-init: kernel 6.1.0-57-amd64\r\n",
        "thinvisor-init: cpus 2\r\n",
        "thinvisor-init: hypervisor-flag yes\r\n",
        r"probe: cpuid-signature thinvisor\x00\x00\x00",
        "\r\n",
        "probe: lookup log_read = 3\r\n",
        "thinvisor-init: vmmlog ok (6120 bytes, thinvisor reserves 0x1fa00000)\r\n",
        "dbgsh| thinvisor dbgsh; type help for the commands\r\n",
        "dbgsh| dbgsh> help\r\n",
        "dbgsh| mem ADDR [N]  hex dump of N bytes (default 64) at guest-physical ADDR (hex)\r\n",
        "dbgsh| dbgsh> cpu\r\n",
        "dbgsh| backend: AMD SVM (revision 1), nested paging with 4 KiB, 2 MiB, 1 GiB pages\r\n",
        "dbgsh| dbgsh> mem 1000 32\r\n",
        "dbgsh| 0000000000001000: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00  ................\r\n",
        "dbgsh| 0000000000001010: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00  ................\r\n",
        "dbgsh| dbgsh> mem 0x1fa00000 16\r\n",
        "dbgsh| mem: 0x1fa00000 is thinvisor's own memory: refused\r\n",
        "dbgsh| dbgsh> bogus\r\n",
        "dbgsh| unknown command; try help\r\n",
        "dbgsh| dbgsh> exit\r\n",
        "thinvisor-init: dbgsh ok\r\n",
        "thinvisor-init: dbgsh-help ok\r\n",
        "thinvisor-init: dbgsh-log ok\r\n",
        "thinvisor-init: dbgsh-mem ok\r\n",
        "thinvisor-init: dbgsh-mem-refused ok (0x1fa00000)\r\n",
        "thinvisor-init: dbgsh-unknown ok\r\n",
        "thinvisor-init: dbgsh-stat ok\r\n",
        "thinvisor-init: dbgsh-cpu ok\r\n",
        "thinvisor-init: vmmlog-follow ok (105 bytes logged after it caught up)\r\n",
        "thinvisor-init: vmmlog-follow-session ok (saw a dbgsh session start)\r\n",
        "c-example: dbgsh = 1, log_read = 3\r\n",
        "c-example: dbgsh banner ok\r\n",
        "c-example: dbgsh session ended\r\n",
        "c-example: log_read ok (4095 bytes from offset 0)\r\n",
        "c-example: done\r\n",
        "thinvisor-init: c-example ok\r\n",
        "vmmcall: thinvisor has no function named `no_such_function`\r\n",
        "thinvisor-init: vmmcall no_such_function status 3\r\n",
        "vmmcall| rax=0x0000000000000000 rbx=0x0000000000000000 rcx=0x0000000000000000 rdx=0x0000000000000000 rsi=0x0000000000000000 rdi=0x0000000000000000\r\n",
        "thinvisor-init: vmmcall ok\r\n",
        "vmmbench| vmmbench: loop lookup_dbgsh iterations=1000 ticks=7351220 nop_ticks=40123 batches=16\r\n",
        "thinvisor-init: vmmbench ok\r\n",
        "thinvisor-init: taskset -c 1 runs on CPU 1\r\n",
        "thinvisor-init: dbgsh-cpu1 ok\r\n",
        "thinvisor-init: dbgsh-busy ok (the second client waited)\r\n",
        "thinvisor: [INFO ] CPU 1 (APIC ID 1): INIT from the guest, waiting for a SIPI\r\n",
        "thinvisor: [INFO ] CPU 1: SIPI 0x9a, restarting at 0x9a000\r\n",
        "thinvisor-init: cpu1-restart ok (offline, online again, answered)\r\n",
        "thinvisor-init: memscan ok (131040 pages, 0 unreadable, 0 matches)\r\n",
        "thinvisor-init: done\r\n",
        "thinvisor: [INFO ] the guest enters an ACPI sleep state (powers off) (port 0x604, value 0x2001)\r\n",
        "thinvisor: [INFO ] VM exits on CPU 0: 19480 in all\r\n",
        "thinvisor: [INFO ] VM exits on CPU 1: 2455 in all\r\n",
        "thinvisor: [INFO ] canary in thinvisor's memory at 0x1fb05000: intact\r\n",
    );

    fn find(name: &str) -> &'static Case {
        CASES
            .iter()
            .chain(PENDING_CASES)
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no case {name}"))
    }

    #[test]
    fn e820_check() {
        let log = "thinvisor: [INFO ] thinvisor reserves 4096 KiB at 0x1fa00000..0x1fe00000 (image 1 KiB)\n\
            [    0.000000] BIOS-e820: [mem 0x0000000000100000-0x000000001f9fffff] usable\n\
            [    0.000000] BIOS-e820: [mem 0x000000001fa00000-0x000000001fdfffff] reserved\n\
            [    0.000000] BIOS-e820: [mem 0x000000001fe00000-0x000000001ffdffff] usable\n";
        assert_eq!(Check::E820HidesThinvisor.problem(log), None);
        let bad = log.replace("0x000000001f9fffff] usable", "0x000000001fa00fff] usable");
        assert!(Check::E820HidesThinvisor
            .problem(&bad)
            .unwrap()
            .contains("overlaps"));
        let none = log.replace("reserved", "ACPI data");
        assert!(Check::E820HidesThinvisor
            .problem(&none)
            .unwrap()
            .contains("no reserved"));
        assert!(Check::E820HidesThinvisor.problem("").is_some());
    }

    /// What Linux prints of the UEFI memory map with `efi=debug`, and of
    /// E820, under thinvisor.efi (its block at 0x1d200000..0x1da00000).
    const EFI_MAP_LOG: &str = concat!(
        "thinvisor: [INFO ] thinvisor reserves 4096 KiB at 0x1d200000..0x1d600000 (image 640 KiB)\r\n",
        "[    0.000000] BIOS-e820: [mem 0x0000000000900000-0x000000001d1fffff] usable\r\n",
        "[    0.000000] BIOS-e820: [mem 0x000000001d200000-0x000000001d9fffff] reserved\r\n",
        "[    0.000000] BIOS-e820: [mem 0x000000001da00000-0x000000001ea89fff] usable\r\n",
        "[    0.000000] efi: mem09: [Conventional|   |  |  |  |  |  |  |  |  |  |   |WB|WT|WC|UC] range=[0x0000000001500000-0x000000001d1fffff] (459MB)\r\n",
        "[    0.000000] efi: mem10: [Reserved    |   |  |  |  |  |  |  |  |  |  |   |WB|WT|WC|UC] range=[0x000000001d200000-0x000000001d3fffff] (2MB)\r\n",
        "[    0.000000] efi: mem11: [Reserved    |   |  |  |  |  |  |  |  |  |  |   |WB|WT|WC|UC] range=[0x000000001d400000-0x000000001d9fffff] (6MB)\r\n",
        "[    0.000000] efi: mem12: [Boot Data   |   |  |  |  |  |  |  |  |  |  |   |WB|WT|WC|UC] range=[0x000000001da00000-0x000000001ea89fff] (16MB)\r\n",
    );

    #[test]
    fn efi_map_check() {
        let check = Check::EfiMapHidesThinvisor;
        assert_eq!(check.problem(EFI_MAP_LOG), None);
        assert_eq!(Check::E820HidesThinvisor.problem(EFI_MAP_LOG), None);
        // Boot-services memory over the block: the OS takes it after
        // ExitBootServices.
        let boot_data = EFI_MAP_LOG.replace(
            "[Reserved    |   |  |  |  |  |  |  |  |  |  |   |WB|WT|WC|UC] range=[0x000000001d400000",
            "[Boot Data   |   |  |  |  |  |  |  |  |  |  |   |WB|WT|WC|UC] range=[0x000000001d400000",
        );
        let problem = check.problem(&boot_data).unwrap();
        assert!(problem.contains("Boot Data overlaps"), "{problem}");
        // A hole in the Reserved ranges.
        let hole = EFI_MAP_LOG.replace("range=[0x000000001d400000", "range=[0x000000001d500000");
        let problem = check.problem(&hole).unwrap();
        assert!(problem.contains("covers 0x1d400000"), "{problem}");
        // A usable E820 line over it.
        let usable =
            EFI_MAP_LOG.replace("0x000000001d1fffff] usable", "0x000000001d200fff] usable");
        let problem = check.problem(&usable).unwrap();
        assert!(problem.contains("E820 entry"), "{problem}");
        // No map (no efi=debug), no block.
        let no_map: String = EFI_MAP_LOG
            .lines()
            .filter(|l| !l.contains("efi: mem"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(check.problem(&no_map).unwrap().contains("efi=debug"));
        assert!(check.problem("").unwrap().contains("thinvisor reserves"));
    }

    #[test]
    fn uefi_cases() {
        let shell = find("ovmf-linux-shell");
        let bootmgr = find("ovmf-linux-bootmgr");
        let bare = find("ovmf-linux-bare");
        assert_eq!(shell.emulator, Emulator::Ovmf(Esp::Shell));
        assert_eq!(bootmgr.emulator, Emulator::Ovmf(Esp::BootManager));
        assert_eq!(bare.emulator, Emulator::Ovmf(Esp::Bare));
        assert!(!bare.is_pending());
        for case in [shell, bootmgr, bare] {
            assert!(
                case.needs_linux() && !case.needs_linux_disk(),
                "{}",
                case.name
            );
            assert_eq!((case.smp, case.machine), (2, "q35"), "{}", case.name);
            assert!(case.modules.is_empty() && case.disk.is_none());
            assert!(case.must_contain.contains(&linux::DONE));
        }
        for case in [shell, bootmgr] {
            for line in LINUX_UNDER_THINVISOR.iter().chain(THINVISOR_EFI_RESUMED) {
                assert!(
                    case.must_contain.contains(line),
                    "{} lacks {line}",
                    case.name
                );
            }
            assert!(case.checks.contains(&Check::EfiMapHidesThinvisor));
            for trouble in LINUX_TROUBLE {
                assert!(case.must_not_contain.contains(trouble));
            }
        }
        // A log of the shell case: the loader, thinvisor, Linux by its EFI
        // stub, the memory maps; the same without the loader's resume
        // line fails.
        let log = format!(
            "FS0:\\> thinvisor.efi log=info\r\n\
             thinvisor.efi: starting thinvisor with \"log=info\"\r\n\
             thinvisor.efi: thinvisor's image at 0x200000..0x2a9000, its block at 0x1d200000..0x1da00000 (8 MiB, reserved)\r\n\
             thinvisor: [INFO ] command line: \"log=info\"\r\n\
             thinvisor: [INFO ] boot mode: resume (the loader's resume tag; boot= and layout= do not apply): \
             the loader continues at 0x1db88f42 as the guest; thinvisor takes only its block 0x1d200000..0x1da00000\r\n\
             thinvisor.efi: the firmware runs under thinvisor now\r\n\
             EFI stub: Loaded initrd from command line option\r\n\
             [    0.000000] efi: EFI v2.70 by EDK II\r\n\
             {EFI_MAP_LOG}{LINUX_SERIAL_UNDER_THINVISOR}"
        )
        .replace("0x1fa00000..0x1fe00000", "0x1d200000..0x1d600000")
        .replace(
            "BIOS-e820: [mem 0x000000001fa00000-0x000000001fdfffff] reserved",
            "BIOS-e820: [mem 0x000000001d200000-0x000000001d9fffff] reserved",
        )
        .replace(
            "BIOS-e820: [mem 0x0000000000100000-0x000000001f9fffff] usable",
            "BIOS-e820: [mem 0x0000000000100000-0x00000000008fffff] usable",
        );
        assert_eq!(shell.check_serial(&log), Vec::<String>::new());
        let unresumed = log.replace("thinvisor.efi: the firmware runs under thinvisor now", "");
        assert!(!shell.check_serial(&unresumed).is_empty());
        // The boot manager's case also needs the loader's `then`.
        assert!(!bootmgr.check_serial(&log).is_empty());
        let then = format!(
            "{log}thinvisor.efi: starting \\vmlinuz {}\r\n",
            linux::EFI_KERNEL_ARGS
        );
        assert_eq!(bootmgr.check_serial(&then), Vec::<String>::new());
        // The bare run passes without thinvisor only.
        assert!(!bare.check_serial(&log).is_empty());
    }

    #[test]
    fn qemu_args_only_on_qemu() {
        for case in CASES.iter().chain(PENDING_CASES) {
            assert!(
                case.qemu_args.is_empty() || case.emulator == Emulator::Qemu,
                "{}",
                case.name
            );
        }
        let vtd = CASES.iter().find(|c| c.name == "qemu-vtd-dma").unwrap();
        assert!(vtd.qemu_args.contains(&"intel-iommu") && vtd.machine == "q35");
        let passthrough = CASES
            .iter()
            .find(|c| c.name == "qemu-passthrough-checks")
            .unwrap();
        assert!(passthrough.must_contain.contains(&NO_IOMMU_AUTO));
        assert!(passthrough.must_contain.contains(&"PASS lookup_known"));
    }

    #[test]
    fn passthrough_guest_cases() {
        let cases: Vec<&Case> = CASES
            .iter()
            .filter(|c| c.name.ends_with("passthrough-guest"))
            .collect();
        assert_eq!(cases.len(), 2);
        for case in cases {
            assert!(case.smp >= 2 && case.hv_args.contains("layout=passthrough"));
            assert_eq!(case.modules, PASSTHROUGH_GUEST);
            assert!(case.must_contain.contains(&"SUMMARY: 11 passed, 0 failed"));
            assert!(case.must_contain.contains(&"PASS pci_bar_guarded"));
            assert!(case.must_contain.contains(&"PASS log_set_buf_refused"));
        }
    }

    #[test]
    fn hostile_cases() {
        let cases: Vec<&Case> = CASES
            .iter()
            .filter(|c| c.name.ends_with("-hostile"))
            .collect();
        assert_eq!(cases.len(), 3);
        for case in cases {
            assert!(case.smp >= 2 && case.hv_args.contains("layout=passthrough"));
            assert_eq!(case.modules, HOSTILE_GUEST);
            assert!(case.must_contain.contains(&"PASS hostile"));
            assert!(case.must_contain.contains(&": intact"));
            assert_eq!(case.must_not_contain, NO_FAIL);
        }
    }

    #[test]
    fn linux_serial_judged() {
        let direct = find("qemu-linux");
        assert_eq!(
            direct.check_serial(LINUX_SERIAL_UNDER_THINVISOR),
            Vec::<String>::new()
        );
        let chain = find("qemu-linux-chain");
        let chain_log = format!(
            "SYSLINUX 6.04 20210613\r\n\
             [    0.000000] BIOS-provided physical RAM map:\r\n\
             [    0.000000] BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable\r\n\
             {LINUX_SERIAL_UNDER_THINVISOR}"
        );
        assert_eq!(chain.check_serial(&chain_log), Vec::<String>::new());
        // What bare QEMU prints fails both.
        let bare = LINUX_SERIAL_UNDER_THINVISOR
            .replace(r"thinvisor\x00\x00\x00", "TCGTCGTCGTCG")
            .replace("probe: lookup log_read = 3", "probe: no thinvisor");
        let problems = direct.check_serial(&bare);
        assert!(
            problems[0].contains("probe: cpuid-signature thinvisor"),
            "{problems:?}"
        );
        assert!(problems[1].contains("probe: no thinvisor"), "{problems:?}");
        assert!(!chain.check_serial(&bare).is_empty());
        // A failed step of the tools fails the case, even with every
        // other line there.
        let failed = format!(
            "{LINUX_SERIAL_UNDER_THINVISOR}thinvisor-init: dbgsh-log FAILED (4 lines for log 5)\r\n"
        );
        let problems = direct.check_serial(&failed);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("FAILED"), "{problems:?}");
        // So does a missing step.
        let missing = LINUX_SERIAL_UNDER_THINVISOR.replace("thinvisor-init: c-example ok\r\n", "");
        let problems = direct.check_serial(&missing);
        assert!(problems[0].contains("c-example ok"), "{problems:?}");
    }

    #[test]
    fn linux_cases() {
        let pending: Vec<&str> = PENDING_CASES
            .iter()
            .filter(|c| c.needs_linux())
            .map(|c| c.name)
            .collect();
        // Nothing waits.
        assert!(pending.is_empty(), "{pending:?}");
        for name in ["ovmf-linux-shell", "ovmf-linux-bootmgr"] {
            assert!(find(name).needs_linux() && !find(name).is_pending());
        }
        for name in ["qemu-linux", "qemu-linux-chain"] {
            let case = find(name);
            assert!(case.needs_linux(), "{}", case.name);
            assert_eq!(case.smp, 2);
            assert!(case.must_contain.contains(&"thinvisor-init: cpus 2"));
        }
        assert!(!find("qemu-linux-chain").is_pending());
        let direct = find("qemu-linux");
        assert!(!direct.needs_linux_disk());
        assert_eq!(
            direct.modules[0].1,
            "vmlinuz console=ttyS0 panic=-1 iomem=relaxed"
        );
        assert_eq!(
            Module::new("x", direct.modules[0].1).file_name(),
            Ok(linux::KERNEL_FILE)
        );
        assert_eq!(
            Module::new("x", direct.modules[1].1).file_name(),
            Ok(linux::INITRD_FILE)
        );
        let chain = find("qemu-linux-chain");
        assert!(chain.needs_linux_disk() && chain.modules.is_empty());
        assert!(CASES.iter().all(|c| !c.is_pending()));
        assert!(PENDING_CASES.iter().all(|c| c.is_pending()));
        // The probe's line matches thinvisor's escaped signature.
        let probe_line = concat!(r"probe: cpuid-signature thinvisor\x00\x00\x00", "\r\n");
        assert!(direct
            .check_serial(probe_line)
            .iter()
            .all(|p| !p.contains("cpuid")));
    }

    #[test]
    fn serial_matching() {
        let case = &CASES[0];
        let mut log = String::from("SUMMARY: 8 passed, 0 failed\n");
        for s in &case.must_contain[2..] {
            log += &s.to_lowercase();
            log.push('\n');
        }
        assert_eq!(case.check_serial(&log), Vec::<String>::new());
        log += "FAIL lookup_known\n";
        assert_eq!(
            case.check_serial(&log),
            vec!["serial log contains \"FAIL\""]
        );
        let problems = case.check_serial("SUMMARY: 1 passed, 1 failed");
        assert!(problems[0].contains("\" 0 failed\""));
    }

    #[test]
    fn vmx_efer_cases_need_the_guests_pass_marker() {
        for name in ["bochs-skylake-x-efer-auto", "bochs-skylake-x-efer-msr-area"] {
            let case = CASES.iter().find(|c| c.name == name).unwrap();
            // The boot log alone, as a run whose checks fail also prints it.
            let boot_only =
                "EFER via VMCS controls; EFER via MSR areas; VPID on; EPT 2M pages yes\n\
                             SUMMARY: 25 passed, 1 failed\n";
            assert!(!case.check_serial(boot_only).is_empty(), "{name}");
            for s in CHECKS_PASSED {
                assert!(case.must_contain.contains(s), "{name} lacks {s:?}");
            }
        }
    }

    #[test]
    fn stop_cases_need_the_stop_line() {
        let triple = CASES
            .iter()
            .find(|c| c.name == "bochs-skylake-x-triple")
            .unwrap();
        // Bochs' own words, or a guest's, are not the hypervisor's stop line.
        assert!(!triple.check_serial("Bochs: shutdown requested").is_empty());
        let line = "thinvisor: [ERROR] guest shutdown (triple fault) near rip 0x10213a; stopping";
        assert_eq!(triple.check_serial(line), Vec::<String>::new());
        let npf = CASES
            .iter()
            .find(|c| c.name == "bochs-skylake-x-npf")
            .unwrap();
        let guest_only = "test-guest: touching guest-physical 0xE0000000 (outside guest RAM)";
        assert!(!npf.check_serial(guest_only).is_empty());
    }

    #[test]
    fn loader_cases() {
        for name in ["qemu-resume", "bochs-skylake-x-resume"] {
            let case = find(name);
            assert_eq!(case.kernel, Kernel::TestGuest, "{name}");
            assert_eq!(case.modules, LOADER_MODULES);
            assert!(case.hv_args.starts_with("loader -- "));
            assert_eq!(case.smp, 2);
            assert!(case.must_contain.contains(&"PASS resume_aps_start"));
            assert!(case.must_contain.contains(&": intact"));
            assert!(!case.is_pending());
        }
        // Every other case boots thinvisor.
        assert_eq!(
            all_cases()
                .filter(|c| c.kernel == Kernel::TestGuest)
                .count(),
            2
        );
        // The summary counts every PASS line expected.
        let passes = LOADER_PASSED
            .iter()
            .filter(|s| s.starts_with("PASS "))
            .count();
        assert!(LOADER_PASSED.contains(&format!("SUMMARY: {passes} passed, 0 failed").as_str()));
    }

    #[test]
    fn generated_inputs() {
        let garbage = garbage_text();
        assert!(!garbage.starts_with(b"\x7fELF"));
        assert!(garbage.iter().all(|b| b.is_ascii()));
        let elf = elf_without_multiboot();
        assert!(elf.starts_with(b"\x7fELF\x02"));
        assert_eq!(elf.len(), 64 + 56 + 3);
        assert!(!elf
            .windows(4)
            .any(|w| w == 0x1BAD_B002u32.to_le_bytes() || w == 0xE852_50D6u32.to_le_bytes()));
    }
}
