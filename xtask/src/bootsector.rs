//! The boot-sector test disk of the `boot=chain` cases: built from
//! `test-guests/bootsector/bootsector.S` with binutils, and the check of
//! what it prints against thinvisor's own log.
//!
//! The disk prints every BIOS memory answer it gets (E820h entries, E801h,
//! AH=88h, INT 12h, the BIOS data area's 0x413); thinvisor logs the block
//! it reserved for itself. [`check_memory_answers`] compares the two: no
//! usable E820 entry may touch the block, a reserved one must cover it, and
//! the older answers must agree with the E820 table.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use crate::util::{self, Context, Ctx, Result};

/// Bytes of the disk image: one cylinder of 16 heads and 63 sectors, so
/// that Bochs derives the geometry of a flat image from its size.
pub const DISK_BYTES: usize = 16 * 63 * 512;

/// Assemble the boot sector and write `target/xtask/bootsector/bootsector.img`.
pub fn build(ctx: &Ctx) -> Result<PathBuf> {
    let source = ctx.root.join("test-guests/bootsector/bootsector.S");
    let dir = ctx.work().join("bootsector");
    fs::create_dir_all(&dir).context(format_args!("creating {}", dir.display()))?;
    let object = dir.join("bootsector.o");
    let binary = dir.join("bootsector.bin");
    util::run_captured(
        Command::new("as")
            .arg("--32")
            .arg("-o")
            .arg(&object)
            .arg(&source),
    )?;
    util::run_captured(
        Command::new("ld")
            .args(["-m", "elf_i386", "--oformat", "binary", "-Ttext", "0x7c00"])
            .arg("-o")
            .arg(&binary)
            .arg(&object),
    )?;
    let mut disk = fs::read(&binary).context(format_args!("reading {}", binary.display()))?;
    if disk.len() < 512 || disk[510..512] != [0x55, 0xAA] || disk.len() > DISK_BYTES {
        return Err(format!(
            "{}: {} bytes, not a boot sector of at most {DISK_BYTES} bytes",
            binary.display(),
            disk.len()
        ));
    }
    disk.resize(DISK_BYTES, 0);
    let image = dir.join("bootsector.img");
    fs::write(&image, disk).context(format_args!("writing {}", image.display()))?;
    Ok(image)
}

const MIB: u64 = 1 << 20;
const FOUR_GIB: u64 = 4 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    base: u64,
    len: u64,
    kind: u32,
}

impl Entry {
    fn end(&self) -> u64 {
        self.base.saturating_add(self.len)
    }
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s, 16).ok()
}

/// thinvisor's "reserves ... at 0xSTART..0xEND" line.
fn reserved_block(log: &str) -> Option<(u64, u64)> {
    let line = log.lines().find(|l| l.contains("thinvisor reserves "))?;
    let (_, rest) = line.split_once(" at 0x")?;
    let (start, rest) = rest.split_once("..0x")?;
    let end: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    Some((hex(start)?, hex(&end)?))
}

/// The values after `prefix` on the disk's line that starts with it.
fn fields<'a>(log: &'a str, prefix: &str) -> Option<Vec<&'a str>> {
    log.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(prefix))
        .map(|rest| rest.split_whitespace().collect())
}

fn e820_entries(log: &str) -> Result<Vec<Entry>> {
    log.lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("e820: "))
        .map(|rest| parse_entry(rest).ok_or_else(|| format!("unreadable line `e820: {rest}`")))
        .collect()
}

/// `BASE LEN TYPE`, in hex.
fn parse_entry(rest: &str) -> Option<Entry> {
    let f: Vec<&str> = rest.split_whitespace().collect();
    match f[..] {
        [base, len, kind] => Some(Entry {
            base: hex(base)?,
            len: hex(len)?,
            kind: u32::try_from(hex(kind)?).ok()?,
        }),
        _ => None,
    }
}

/// The end of the usable memory running without a gap from `from`.
fn usable_run_end(table: &[Entry], from: u64) -> Option<u64> {
    let mut i = table
        .iter()
        .position(|e| e.kind == 1 && e.base <= from && from < e.end())?;
    let mut end = table[i].end();
    while let Some(next) = table.get(i + 1) {
        if next.kind != 1 || next.base != end {
            break;
        }
        end = next.end();
        i += 1;
    }
    Some(end)
}

/// Why the disk's memory answers in `log` do not hide thinvisor or do not
/// agree with each other (empty when all is well).
pub fn check_memory_answers(log: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let Some((start, end)) = reserved_block(log) else {
        return vec!["no `thinvisor reserves ... at 0x..0x..` line in the log".into()];
    };
    let table = match e820_entries(log) {
        Ok(t) if !t.is_empty() => t,
        Ok(_) => return vec!["the boot sector printed no `e820:` entries".into()],
        Err(e) => return vec![e],
    };
    for pair in table.windows(2) {
        if pair[1].base < pair[0].end() {
            problems.push(format!(
                "E820 entries out of order or overlapping: {pair:x?}"
            ));
        }
    }
    for e in table.iter().filter(|e| e.kind == 1) {
        if e.base < end && start < e.end() {
            problems.push(format!(
                "usable E820 entry {:#x}..{:#x} overlaps thinvisor's block {start:#x}..{end:#x}",
                e.base,
                e.end()
            ));
        }
    }
    if !table
        .iter()
        .any(|e| e.kind == 2 && e.base <= start && end <= e.end())
    {
        problems.push(format!(
            "no reserved E820 entry covers thinvisor's block {start:#x}..{end:#x}"
        ));
    }

    // INT 12h and 0x413 against the usable entry at 0.
    match fields(log, "base memory: int12 ") {
        Some(f) if f.len() == 3 && f[1] == "bda" => {
            let (int12, bda) = (hex(f[0]), hex(f[2]));
            let low = usable_run_end(&table, 0);
            if int12 != bda || bda.map(|k| k * 1024) != low {
                problems.push(format!(
                    "base memory: INT 12h {int12:?} KiB, 0x413 {bda:?} KiB, E820 usable from 0 to {low:#x?}"
                ));
            }
        }
        _ => problems.push("no `base memory:` line".into()),
    }

    let from_1m = usable_run_end(&table, MIB).map_or(0, |e| e.min(FOUR_GIB) - MIB);
    let above_16m = usable_run_end(&table, 16 * MIB).map_or(0, |e| e.min(FOUR_GIB) - 16 * MIB);
    match fields(log, "e801: ").map(|f| f.iter().map(|v| hex(v)).collect::<Vec<_>>()) {
        Some(v) if v.len() == 4 && v.iter().all(Option::is_some) => {
            let v: Vec<u64> = v.into_iter().flatten().collect();
            let want = (from_1m.min(15 * MIB) >> 10, above_16m >> 16);
            if v[0] != v[2] || v[1] != v[3] || (v[0], v[1]) != want {
                problems.push(format!(
                    "E801h AX BX CX DX = {v:x?}; the E820 table says AX = CX = {:#x}, BX = DX = {:#x}",
                    want.0, want.1
                ));
            }
        }
        _ => problems.push("no readable `e801:` line".into()),
    }
    match fields(log, "int15 88: ").and_then(|f| f.first().and_then(|v| hex(v))) {
        Some(ax) => {
            let want = from_1m.min(63 * MIB) >> 10;
            if ax != want {
                problems.push(format!(
                    "AH=88h AX = {ax:#x}; the E820 table says {want:#x}"
                ));
            }
        }
        None => problems.push("no readable `int15 88:` line".into()),
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a good run prints (QEMU, 512 MiB), trimmed.
    const GOOD: &str = "\
thinvisor: [INFO] thinvisor reserves 4096 KiB at 0x1f800000..0x1fc00000 (image 1000 KiB)\r
bootsector: MBR running, DL=80\r
e820: 0000000000000000 000000000009e000 00000001\r
e820: 000000000009e000 0000000000002000 00000002\r
e820: 00000000000f0000 0000000000010000 00000002\r
e820: 0000000000100000 000000001f700000 00000001\r
e820: 000000001f800000 0000000000400000 00000002\r
e820: 000000001fc00000 00000000003e0000 00000001\r
e820: 000000001ffe0000 0000000000020000 00000002\r
e801: 3c00 1e80 3c00 1e80\r
int15 88: fc00\r
base memory: int12 0278 bda 0278\r
bootsector: PASS\r
";

    #[test]
    fn a_good_run_passes() {
        assert_eq!(reserved_block(GOOD), Some((0x1f80_0000, 0x1fc0_0000)));
        assert_eq!(check_memory_answers(GOOD), Vec::<String>::new());
    }

    #[test]
    fn a_usable_block_fails() {
        // The BIOS's own answers, thinvisor not hidden.
        let bad = GOOD
            .replace(
                "e820: 0000000000100000 000000001f700000 00000001\r\n\
                 e820: 000000001f800000 0000000000400000 00000002\r\n\
                 e820: 000000001fc00000 00000000003e0000 00000001\r\n",
                "e820: 0000000000100000 000000001fee0000 00000001\r\n",
            )
            .replace("e801: 3c00 1e80 3c00 1e80", "e801: 3c00 1ffe 3c00 1ffe");
        let problems = check_memory_answers(&bad);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("overlaps thinvisor's block")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("no reserved E820 entry")),
            "{problems:?}"
        );
    }

    #[test]
    fn inconsistent_legacy_answers_fail() {
        let bad = GOOD
            .replace("e801: 3c00 1e80 3c00 1e80", "e801: 3c00 1ffe 3c00 1ffe")
            .replace("int15 88: fc00", "int15 88: 3c00")
            .replace("bda 0278", "bda 027f");
        let problems = check_memory_answers(&bad);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(check_memory_answers("e820: x")[0].contains("thinvisor reserves"));
    }
}
