//! The EFI system partition of a UEFI case: a directory, built afresh for
//! every run under `target/xtask/CASE/esp`, that QEMU shows OVMF as a FAT
//! disk (`fat:rw:DIR`, see `emu::QemuOpts::uefi`). It holds Debian's
//! kernel (its EFI stub starts it), the test initramfs and, but for the
//! bare run, thinvisor.efi with its options.

use std::fs;
use std::path::{Path, PathBuf};

use crate::linux;
use crate::util::{self, Context, Result};

/// How the firmware gets to Linux.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Esp {
    /// OVMF finds no boot loader on the disk and starts its shell, which
    /// runs `startup.nsh`: `thinvisor.efi` with the case's options (its
    /// load options), then the kernel's EFI stub, now under thinvisor.
    Shell,
    /// No shell: the boot manager starts the removable-media path
    /// `\EFI\BOOT\BOOTX64.EFI`, which is thinvisor.efi; it reads
    /// `\EFI\BOOT\thinvisor.cfg` beside it (the case's options and a
    /// `then` line) and, once thinvisor resumed it, starts the kernel.
    BootManager,
    /// No thinvisor: `startup.nsh` starts the kernel alone, for the wall
    /// time without thinvisor.
    Bare,
}

/// The files of the partition.
#[derive(Debug, Clone)]
pub struct EspInputs {
    pub efi: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The kernel's path on the partition, as UEFI spells it.
pub const KERNEL_PATH: &str = r"\vmlinuz";

/// The shell script OVMF's shell runs (it looks for it on every file
/// system, `fs0:` first; the one disk is `fs0:`). `hv_args`: thinvisor's
/// options.
pub fn startup_nsh(esp: Esp, hv_args: &str) -> Option<String> {
    let kernel = format!("{} {}", linux::KERNEL_FILE, linux::EFI_KERNEL_ARGS);
    match esp {
        Esp::Shell => Some(format!("fs0:\r\nthinvisor.efi {hv_args}\r\n{kernel}\r\n")),
        Esp::Bare => Some(format!("fs0:\r\n{kernel}\r\n")),
        Esp::BootManager => None,
    }
}

/// `thinvisor.cfg`: thinvisor's options and the loader to start next.
pub fn thinvisor_cfg(hv_args: &str) -> String {
    format!(
        "# thinvisor's options (README, \"Command line\")\n\
         {hv_args}\n\
         # once thinvisor runs the firmware as its guest: Debian's kernel\n\
         # (its EFI stub), with the test initramfs\n\
         then {KERNEL_PATH} {}\n",
        linux::EFI_KERNEL_ARGS
    )
}

/// Builds the partition's directory `dir` (emptied first).
pub fn build(dir: &Path, esp: Esp, hv_args: &str, inputs: &EspInputs) -> Result<PathBuf> {
    if dir.exists() {
        fs::remove_dir_all(dir).context(format_args!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir).context(format_args!("creating {}", dir.display()))?;
    // Copies, not links: `fat:rw` writes what the firmware writes back
    // into the directory.
    util::copy(&inputs.kernel, &dir.join(linux::KERNEL_FILE))?;
    util::copy(&inputs.initrd, &dir.join(linux::INITRD_FILE))?;
    match esp {
        Esp::Shell => util::copy(&inputs.efi, &dir.join("thinvisor.efi"))?,
        Esp::BootManager => {
            let boot = dir.join("EFI").join("BOOT");
            fs::create_dir_all(&boot).context(format_args!("creating {}", boot.display()))?;
            util::copy(&inputs.efi, &boot.join("BOOTX64.EFI"))?;
            fs::write(boot.join("thinvisor.cfg"), thinvisor_cfg(hv_args))
                .context("writing thinvisor.cfg")?;
        }
        Esp::Bare => {}
    }
    if let Some(script) = startup_nsh(esp, hv_args) {
        fs::write(dir.join("startup.nsh"), script).context("writing startup.nsh")?;
    }
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts() {
        let shell = startup_nsh(Esp::Shell, "log=info").unwrap();
        assert!(shell.starts_with("fs0:\r\nthinvisor.efi log=info\r\nvmlinuz initrd=\\initrd.img "));
        assert!(shell.contains(" efi=debug"));
        let bare = startup_nsh(Esp::Bare, "log=info").unwrap();
        assert!(!bare.contains("thinvisor") && bare.contains("vmlinuz initrd="));
        assert_eq!(startup_nsh(Esp::BootManager, "log=info"), None);
        let cfg = thinvisor_cfg("log=debug");
        assert!(cfg.contains("\nlog=debug\n"));
        assert!(cfg.contains(&format!("\nthen \\vmlinuz {}\n", linux::EFI_KERNEL_ARGS)));
    }

    #[test]
    fn layouts() {
        let root = std::env::temp_dir().join(format!("xtask-esp-{}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        let file = |name: &str| {
            let path = root.join(name);
            fs::write(&path, name).unwrap();
            path
        };
        let inputs = EspInputs {
            efi: file("t.efi"),
            kernel: file("k"),
            initrd: file("i"),
        };
        let dir = root.join("esp");
        build(&dir, Esp::BootManager, "log=info", &inputs).unwrap();
        assert_eq!(
            fs::read(dir.join("EFI/BOOT/BOOTX64.EFI")).unwrap(),
            b"t.efi"
        );
        assert!(dir.join("EFI/BOOT/thinvisor.cfg").exists());
        assert!(!dir.join("startup.nsh").exists());
        build(&dir, Esp::Shell, "log=info", &inputs).unwrap();
        assert!(!dir.join("EFI").exists());
        assert_eq!(fs::read(dir.join("vmlinuz")).unwrap(), b"k");
        assert_eq!(fs::read(dir.join("initrd.img")).unwrap(), b"i");
        assert!(dir.join("thinvisor.efi").exists() && dir.join("startup.nsh").exists());
        build(&dir, Esp::Bare, "log=info", &inputs).unwrap();
        assert!(!dir.join("thinvisor.efi").exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
