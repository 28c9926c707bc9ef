//! A raw BIOS disk image that boots Linux through SYSLINUX: an MBR (boot
//! code from syslinux's `mbr.bin`, partition table written here), and one
//! bootable FAT16 partition at sector 2048 holding SYSLINUX, the kernel,
//! the initramfs and `syslinux.cfg`.
//!
//! It is what `boot=chain` needs: a disk the BIOS boots the ordinary way,
//! with real-mode BIOS calls (and the SMIs SeaBIOS makes in them) before
//! Linux runs. The file system is made by mtools (`mformat`, `mcopy`) on a
//! partition image and SYSLINUX is installed by Debian's mtools-based
//! `syslinux` taken from its package, so nothing needs root, loop devices
//! or installed syslinux packages.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{self, Context, Result};

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// Where the partition starts (1 MiB, the usual alignment).
pub const PARTITION_START: u32 = 2048;
/// The whole image.
pub const DISK_MIB: u32 = 50;
/// Partition type 0x06: FAT16 with more than 65535 sectors, CHS or LBA.
pub const TYPE_FAT16: u8 = 0x06;
/// The MBR's disk signature (bytes 440..444): "TVSR", fixed so that the
/// image is reproducible.
const DISK_ID: u32 = u32::from_le_bytes(*b"TVSR");
/// The FAT volume serial number, fixed for the same reason.
const VOLUME_SERIAL: &str = "54564e56";

/// Heads and sectors per track of the CHS fields. Boot code that honours
/// CHS at all (SYSLINUX's `mbr.bin` and boot sector use EDD LBA when the
/// BIOS has it, which SeaBIOS does) expects the BIOS's usual translation.
const HEADS: u32 = 255;
const SECTORS_PER_TRACK: u32 = 63;

/// One primary partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub start: u32,
    pub sectors: u32,
    pub kind: u8,
    pub bootable: bool,
}

/// The CHS address of `lba` as the partition table stores it (head,
/// sector | cylinder high bits, cylinder low byte), saturated at
/// 1023/254/63 for sectors CHS cannot reach.
pub fn chs(lba: u32) -> [u8; 3] {
    let cylinder = lba / (HEADS * SECTORS_PER_TRACK);
    if cylinder > 1023 {
        return [254, 0xFF, 0xFF];
    }
    let head = (lba / SECTORS_PER_TRACK) % HEADS;
    let sector = lba % SECTORS_PER_TRACK + 1;
    [
        head as u8,
        (sector as u8 & 0x3F) | (((cylinder >> 8) as u8 & 0x03) << 6),
        cylinder as u8,
    ]
}

/// The first sector of the disk: `boot_code` (at most 440 bytes, e.g.
/// syslinux's `mbr.bin`), the disk signature, up to four partition entries
/// and the 0x55AA boot signature.
pub fn mbr(boot_code: &[u8], disk_id: u32, partitions: &[Partition]) -> Result<[u8; 512]> {
    if boot_code.len() > 440 {
        return Err(format!(
            "MBR boot code is {} bytes; at most 440 fit before the disk signature",
            boot_code.len()
        ));
    }
    if partitions.len() > 4 {
        return Err(format!("{} partitions; an MBR holds 4", partitions.len()));
    }
    let mut sector = [0u8; 512];
    sector[..boot_code.len()].copy_from_slice(boot_code);
    sector[440..444].copy_from_slice(&disk_id.to_le_bytes());
    for (i, p) in partitions.iter().enumerate() {
        let last = p
            .start
            .checked_add(p.sectors)
            .and_then(|end| end.checked_sub(1))
            .filter(|_| p.sectors > 0)
            .ok_or_else(|| format!("partition {i}: bad extent {p:?}"))?;
        let entry = &mut sector[446 + 16 * i..446 + 16 * (i + 1)];
        entry[0] = if p.bootable { 0x80 } else { 0 };
        entry[1..4].copy_from_slice(&chs(p.start));
        entry[4] = p.kind;
        entry[5..8].copy_from_slice(&chs(last));
        entry[8..12].copy_from_slice(&p.start.to_le_bytes());
        entry[12..16].copy_from_slice(&p.sectors.to_le_bytes());
    }
    sector[510] = 0x55;
    sector[511] = 0xAA;
    Ok(sector)
}

/// What goes on the disk.
#[derive(Debug, Clone)]
pub struct DiskInputs {
    /// syslinux's `mbr.bin` (package syslinux-common).
    pub mbr_bin: PathBuf,
    /// The mtools-based SYSLINUX installer (`/usr/bin/syslinux` of package
    /// syslinux); it writes ldlinux.sys and ldlinux.c32 itself.
    pub syslinux: PathBuf,
    /// Files copied to the partition's root: (path, name on the disk).
    pub files: Vec<(PathBuf, String)>,
    /// The contents of `/syslinux.cfg`.
    pub syslinux_cfg: String,
}

/// Environment for mtools on a bare image file: no complaints about a
/// geometry that no drive has.
fn mtools(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("MTOOLS_SKIP_CHECK", "1");
    cmd
}

/// Builds the disk image at `out` (via a partition image next to it).
pub fn build(out: &Path, inputs: &DiskInputs) -> Result {
    for (tool, package) in [
        ("mformat", "mtools"),
        ("mcopy", "mtools"),
        ("mattrib", "mtools"),
    ] {
        if util::which(tool).is_none() {
            return Err(format!(
                "`{tool}` not found; the boot disk needs it: install package {package} \
                 (`cargo xtask setup` as root installs it)"
            ));
        }
    }
    let total = u64::from(DISK_MIB) * 1024 * 1024 / SECTOR;
    let part_sectors = u32::try_from(total - u64::from(PARTITION_START)).expect("small disk");
    let part_img = out.with_extension("part");
    let _ = fs::remove_file(&part_img);
    let file = File::create(&part_img).context(format_args!("creating {}", part_img.display()))?;
    file.set_len(u64::from(part_sectors) * SECTOR)
        .context("sizing the partition image")?;
    drop(file);

    // FAT16 (mformat picks it for this size), 64 heads x 32 sectors like
    // mkfs.fat, hidden sectors = the partition's offset so that the boot
    // sector knows where it is.
    util::run_captured(
        mtools("mformat")
            .arg("-i")
            .arg(&part_img)
            .args(["-T", &part_sectors.to_string()])
            .args(["-h", "64", "-s", "32"])
            .args(["-H", &PARTITION_START.to_string()])
            .args(["-N", VOLUME_SERIAL, "-v", "THINVISOR", "::"]),
    )?;
    util::run_captured(
        Command::new(&inputs.syslinux)
            .arg("--install")
            .arg(&part_img),
    )
    .map_err(|e| format!("installing SYSLINUX: {e}"))?;
    let cfg = out.with_extension("cfg");
    fs::write(&cfg, &inputs.syslinux_cfg).context("writing syslinux.cfg")?;
    let mut files = inputs.files.clone();
    files.push((cfg.clone(), "syslinux.cfg".to_string()));
    for (path, name) in &files {
        util::run_captured(
            mtools("mcopy")
                .arg("-o")
                .arg("-i")
                .arg(&part_img)
                .arg(path)
                .arg(format!("::/{name}")),
        )?;
    }

    let boot_code =
        fs::read(&inputs.mbr_bin).context(format_args!("reading {}", inputs.mbr_bin.display()))?;
    let sector0 = mbr(
        &boot_code,
        DISK_ID,
        &[Partition {
            start: PARTITION_START,
            sectors: part_sectors,
            kind: TYPE_FAT16,
            bootable: true,
        }],
    )?;
    let partial = out.with_extension("img.partial");
    {
        let file =
            File::create(&partial).context(format_args!("creating {}", partial.display()))?;
        let mut w = BufWriter::new(file);
        w.write_all(&sector0).context("writing the MBR")?;
        let gap = vec![0u8; (u64::from(PARTITION_START - 1) * SECTOR) as usize];
        w.write_all(&gap)
            .context("writing the gap before the partition")?;
        let part = fs::read(&part_img).context("reading the partition image")?;
        w.write_all(&part).context("writing the partition")?;
        w.flush().context("writing the disk image")?;
    }
    fs::rename(&partial, out).context(format_args!("renaming to {}", out.display()))?;
    let _ = fs::remove_file(&part_img);
    let _ = fs::remove_file(&cfg);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_addresses() {
        assert_eq!(chs(0), [0, 1, 0]);
        // 2048 = head 32, sector 33 of cylinder 0.
        assert_eq!(chs(2048), [32, 33, 0]);
        // 102399 (last sector of 50 MiB) = cylinder 6, head 95, sector 25.
        assert_eq!(chs(102_399), [95, 25, 6]);
        // Cylinder 300 = 0x12C: high bits 01 in the sector byte.
        assert_eq!(chs(300 * 255 * 63), [0, 0x41, 0x2C]);
        assert_eq!(chs(u32::MAX), [254, 0xFF, 0xFF]);
    }

    #[test]
    fn mbr_layout() {
        let code = [0xFAu8; 440];
        let p = Partition {
            start: 2048,
            sectors: 100_352,
            kind: TYPE_FAT16,
            bootable: true,
        };
        let s = mbr(&code, 0x1234_5678, &[p]).unwrap();
        assert_eq!(&s[..440], &code[..]);
        assert_eq!(&s[440..444], &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(&s[444..446], &[0, 0]);
        let e = &s[446..462];
        assert_eq!(e[0], 0x80);
        assert_eq!(&e[1..4], &chs(2048));
        assert_eq!(e[4], 0x06);
        assert_eq!(&e[5..8], &chs(2048 + 100_352 - 1));
        assert_eq!(u32::from_le_bytes(e[8..12].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(e[12..16].try_into().unwrap()), 100_352);
        assert!(s[462..510].iter().all(|&b| b == 0));
        assert_eq!(&s[510..], &[0x55, 0xAA]);
    }

    #[test]
    fn mbr_refuses_bad_input() {
        let p = Partition {
            start: 1,
            sectors: 0,
            kind: 6,
            bootable: false,
        };
        assert!(mbr(&[0; 441], 0, &[]).is_err());
        assert!(mbr(&[], 0, &[p]).is_err());
        let ok = Partition { sectors: 1, ..p };
        assert!(mbr(&[], 0, &[ok; 5]).is_err());
        assert_eq!(mbr(&[], 0, &[ok]).unwrap()[446], 0);
    }
}
