//! Building the bootable images: the ELF files under `target/images` and
//! GRUB ISOs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::setup::TARGET;
use crate::util::{self, Context, Ctx, Result};

/// Cargo package and binary name of the hypervisor.
pub const HV_BIN: &str = "thinvisor";
/// Cargo package and binary name of the test guest.
pub const GUEST_BIN: &str = "test-guest";

/// The files `cargo xtask build` produces.
#[derive(Debug, Clone)]
pub struct Images {
    /// `thinvisor.elf`: the ELF64 with multiboot1+2 headers (for GRUB).
    pub hv: PathBuf,
    /// `thinvisor32.elf`: the same as ELF32, for QEMU `-kernel`.
    pub hv32: PathBuf,
    /// `test-guest.elf`: the test guest, ELF64.
    pub guest: PathBuf,
    /// `test-guest32.elf`: the test guest as ELF32.
    pub guest32: PathBuf,
    /// `thinvisor.iso`: GRUB ISO booting the hypervisor with the checks.
    pub iso: PathBuf,
    /// `thinvisor.efi`: the UEFI loader with thinvisor built in.
    pub efi: PathBuf,
}

impl Images {
    /// The image paths (built or not).
    pub fn at(ctx: &Ctx) -> Images {
        let dir = ctx.images();
        Images {
            hv: dir.join("thinvisor.elf"),
            hv32: dir.join("thinvisor32.elf"),
            guest: dir.join("test-guest.elf"),
            guest32: dir.join("test-guest32.elf"),
            iso: dir.join("thinvisor.iso"),
            efi: dir.join("thinvisor.efi"),
        }
    }
}

/// A module handed to the hypervisor by the boot loader.
///
/// Both emulators show the hypervisor the same module string: its first
/// word is the module's file name (QEMU's convention: its `-initrd` string
/// is the file's path followed by arguments, and the runners make that
/// path the bare file name), the rest are the arguments.
#[derive(Debug, Clone)]
pub struct Module {
    /// The file to load.
    pub image: PathBuf,
    /// The module string, `<file name> [args...]`.
    pub cmdline: String,
}

impl Module {
    pub fn new(image: impl Into<PathBuf>, cmdline: impl Into<String>) -> Module {
        Module {
            image: image.into(),
            cmdline: cmdline.into(),
        }
    }

    /// The file name the module is loaded under: the first word of its
    /// string.
    pub fn file_name(&self) -> Result<&str> {
        let name = self.cmdline.split_whitespace().next().unwrap_or("");
        let ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c));
        if ok {
            Ok(name)
        } else {
            Err(format!(
                "module string `{}` must start with a plain file name \
                 (letters, digits, - _ . +)",
                self.cmdline
            ))
        }
    }
}

/// The kernel a boot loader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// thinvisor (multiboot2 from GRUB), its guest among the modules.
    Thinvisor,
    /// The test guest (multiboot v1 from GRUB too: it has no multiboot2
    /// header), which starts thinvisor from a module itself (`loader`
    /// mode).
    TestGuest,
}

impl Kernel {
    /// The kernel's file in a GRUB ISO's `/boot`.
    pub fn iso_name(self) -> &'static str {
        match self {
            Kernel::Thinvisor => "thinvisor.elf",
            Kernel::TestGuest => "test-guest.elf",
        }
    }

    /// GRUB's commands for the kernel and for a module.
    fn grub_commands(self) -> (&'static str, &'static str) {
        match self {
            Kernel::Thinvisor => ("multiboot2", "module2"),
            Kernel::TestGuest => ("multiboot", "module"),
        }
    }
}

/// Builds the hypervisor and the test guest and writes every image.
pub fn build(ctx: &Ctx) -> Result<Images> {
    util::run(ctx.cargo().args([
        "build",
        "--release",
        "--target",
        TARGET,
        "-p",
        HV_BIN,
        "-p",
        GUEST_BIN,
    ]))?;
    let release = cargo_target_dir(ctx)?.join(TARGET).join("release");
    let images = Images::at(ctx);
    util::copy(&release.join(HV_BIN), &images.hv)?;
    util::copy(&release.join(GUEST_BIN), &images.guest)?;
    objcopy_elf32(&images.hv, &images.hv32)?;
    objcopy_elf32(&images.guest, &images.guest32)?;
    build_efi(ctx, &images)?;
    for warning in check_multiboot(&images.hv)? {
        eprintln!("warning: {}: {warning}", ctx.show(&images.hv));
    }
    make_iso(
        &ctx.work().join("iso-default"),
        &images.iso,
        &images.hv,
        "log=info",
        &[Module::new(&images.guest, "test-guest.elf checks")],
    )?;
    eprintln!("images in {}:", ctx.show(&ctx.images()));
    for path in [
        &images.hv,
        &images.hv32,
        &images.guest,
        &images.guest32,
        &images.iso,
        &images.efi,
    ] {
        let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        eprintln!("  {:<20} {:>10} bytes", file_name(path), size);
    }
    Ok(images)
}

/// Cargo package of the UEFI loader, and its target.
pub const EFI_PKG: &str = "thinvisor-efi";
pub const EFI_TARGET: &str = "x86_64-unknown-uefi";

/// `thinvisor.efi`: the UEFI loader (uefi-loader/) with thinvisor's image
/// built in, without its debug information (the loader copies it into
/// memory; 0.6 MB instead of 9).
fn build_efi(ctx: &Ctx, images: &Images) -> Result {
    let stripped = ctx.work().join("thinvisor-stripped.elf");
    if let Some(dir) = stripped.parent() {
        fs::create_dir_all(dir).context(format_args!("creating {}", dir.display()))?;
    }
    let _ = fs::remove_file(&stripped);
    util::run_captured(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&images.hv)
            .arg(&stripped),
    )?;
    util::run(
        ctx.cargo()
            .args(["build", "--release", "--target", EFI_TARGET, "-p", EFI_PKG])
            .env("THINVISOR_ELF", &stripped),
    )?;
    let built = cargo_target_dir(ctx)?
        .join(EFI_TARGET)
        .join("release")
        .join(format!("{EFI_PKG}.efi"));
    util::copy(&built, &images.efi)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Cargo's target directory (CARGO_TARGET_DIR, configuration, or
/// `target/`), as `cargo metadata` reports it.
pub fn cargo_target_dir(ctx: &Ctx) -> Result<PathBuf> {
    let output = util::run_captured(ctx.cargo().args([
        "metadata",
        "--format-version",
        "1",
        "--no-deps",
        "--offline",
    ]))?;
    let json = String::from_utf8_lossy(&output.stdout);
    json_string_field(&json, "target_directory")
        .map(PathBuf::from)
        .ok_or_else(|| "no target_directory in `cargo metadata` output".to_string())
}

/// The value of the first `"key":"value"` in `json` (enough for cargo's
/// metadata, whose paths carry no escapes other than `\\` and `\"`).
fn json_string_field(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut value = String::new();
    let mut chars = json[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => value.push(chars.next()?),
            c => value.push(c),
        }
    }
    None
}

/// `objcopy -O elf32-i386`: QEMU's `-kernel` loads only ELF32 multiboot
/// kernels.
pub fn objcopy_elf32(from: &Path, to: &Path) -> Result {
    let _ = fs::remove_file(to);
    util::run_captured(
        Command::new("objcopy")
            .args(["-O", "elf32-i386"])
            .arg(from)
            .arg(to),
    )
    .map(|_| ())
}

/// Warnings about the multiboot headers of a kernel image: a multiboot1
/// header must sit in the first 8 KiB (4-aligned), a multiboot2 header in
/// the first 32 KiB (8-aligned), each with a valid checksum.
pub fn check_multiboot(path: &Path) -> Result<Vec<String>> {
    let data = fs::read(path).context(format_args!("reading {}", path.display()))?;
    let mut warnings = Vec::new();
    if !data.starts_with(b"\x7fELF") {
        warnings.push("not an ELF file".to_string());
    }
    if !has_multiboot1(&data) {
        warnings
            .push("no multiboot1 header in the first 8 KiB (QEMU -kernel will refuse it)".into());
    }
    if !has_multiboot2(&data) {
        warnings.push("no multiboot2 header in the first 32 KiB (GRUB will refuse it)".into());
    }
    Ok(warnings)
}

fn word(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at + 4)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn has_multiboot1(data: &[u8]) -> bool {
    (0..8192).step_by(4).any(|at| {
        matches!(
            (word(data, at), word(data, at + 4), word(data, at + 8)),
            (Some(0x1BAD_B002), Some(flags), Some(sum))
                if 0x1BAD_B002u32.wrapping_add(flags).wrapping_add(sum) == 0
        )
    })
}

fn has_multiboot2(data: &[u8]) -> bool {
    (0..32768).step_by(8).any(|at| {
        matches!(
            (word(data, at), word(data, at + 4), word(data, at + 8), word(data, at + 12)),
            (Some(0xE852_50D6), Some(arch), Some(len), Some(sum))
                if 0xE852_50D6u32.wrapping_add(arch).wrapping_add(len).wrapping_add(sum) == 0
        )
    })
}

/// Quotes a word for grub.cfg when it holds anything but plain characters.
fn grub_word(word: &str) -> String {
    if word
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn grub_words(s: &str) -> String {
    s.split_whitespace()
        .map(grub_word)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The grub.cfg that boots `/boot/thinvisor.elf` with `hv_args` and the
/// modules. GRUB's own messages (errors such as a missing multiboot header)
/// also go to the serial port, so they show in serial logs.
pub fn grub_cfg(hv_args: &str, modules: &[Module]) -> Result<String> {
    grub_cfg_for(Kernel::Thinvisor, hv_args, modules)
}

/// The grub.cfg that boots `kernel` (`/boot/<its ISO name>`) with `args`
/// and the modules.
pub fn grub_cfg_for(kernel: Kernel, args: &str, modules: &[Module]) -> Result<String> {
    let mut cfg = String::from(
        "serial --unit=0 --speed=115200\n\
         terminal_output --append serial\n\
         set timeout=0\n\
         set default=0\n\
         menuentry \"thinvisor\" {\n",
    );
    let (boot, load) = kernel.grub_commands();
    cfg += &format!(
        "  {boot} /boot/{} {}\n",
        kernel.iso_name(),
        grub_words(args)
    );
    for module in modules {
        let name = module.file_name()?;
        if name == kernel.iso_name() {
            return Err(format!(
                "module `{name}` would replace the kernel's file in the ISO"
            ));
        }
        cfg += &format!("  {load} /boot/{name} {}\n", grub_words(&module.cmdline));
    }
    cfg += "  boot\n}\n";
    Ok(cfg)
}

/// Makes a GRUB ISO at `iso` that boots `kernel` (an ELF64 multiboot2
/// kernel) with `hv_args` and `modules`, staging its files in `staging`.
pub fn make_iso(
    staging: &Path,
    iso: &Path,
    kernel: &Path,
    hv_args: &str,
    modules: &[Module],
) -> Result {
    make_iso_with_cfg(staging, iso, kernel, modules, &grub_cfg(hv_args, modules)?)
}

/// [`make_iso`] for either kernel.
fn make_iso_for(
    staging: &Path,
    iso: &Path,
    (kind, kernel): (Kernel, &Path),
    args: &str,
    modules: &[Module],
) -> Result {
    let cfg = grub_cfg_for(kind, args, modules)?;
    make_iso_files(staging, iso, (kind, kernel), modules, &cfg)
}

/// Makes a GRUB ISO at `iso` with a grub.cfg of the caller's: `kernel` is
/// `/boot/thinvisor.elf`, each module `/boot/<its file name>`.
pub fn make_iso_with_cfg(
    staging: &Path,
    iso: &Path,
    kernel: &Path,
    modules: &[Module],
    cfg: &str,
) -> Result {
    make_iso_files(staging, iso, (Kernel::Thinvisor, kernel), modules, cfg)
}

fn make_iso_files(
    staging: &Path,
    iso: &Path,
    (kind, kernel): (Kernel, &Path),
    modules: &[Module],
    cfg: &str,
) -> Result {
    if staging.exists() {
        fs::remove_dir_all(staging).context(format_args!("removing {}", staging.display()))?;
    }
    let grub_dir = staging.join("boot/grub");
    fs::create_dir_all(&grub_dir).context(format_args!("creating {}", grub_dir.display()))?;
    fs::write(grub_dir.join("grub.cfg"), cfg).context("writing grub.cfg")?;
    util::copy(kernel, &staging.join("boot").join(kind.iso_name()))?;
    for module in modules {
        util::copy(
            &module.image,
            &staging.join("boot").join(module.file_name()?),
        )?;
    }
    if let Some(parent) = iso.parent() {
        fs::create_dir_all(parent).context(format_args!("creating {}", parent.display()))?;
    }
    let _ = fs::remove_file(iso);
    util::run_captured(
        Command::new("grub-mkrescue")
            .arg("-o")
            .arg(iso)
            .arg(staging),
    )
    .map(|_| ())
}

/// Makes the ISO of one test case or run: `target/xtask/<name>/thinvisor.iso`
/// (the directory is emptied first). `kernel` is the file of `kind`.
pub fn make_case_iso(
    ctx: &Ctx,
    name: &str,
    (kind, kernel): (Kernel, &Path),
    args: &str,
    modules: &[Module],
) -> Result<PathBuf> {
    let dir = ctx.fresh_dir(name)?;
    let iso = dir.join("thinvisor.iso");
    make_iso_for(&dir.join("iso"), &iso, (kind, kernel), args, modules)?;
    Ok(iso)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_cfg_lines() {
        let cfg = grub_cfg(
            "log=info a;b",
            &[Module::new("/x/test-guest.elf", "test-guest.elf checks")],
        )
        .unwrap();
        assert!(cfg.contains("set timeout=0\n"));
        assert!(cfg.contains("set default=0\n"));
        assert!(cfg.contains("  multiboot2 /boot/thinvisor.elf log=info 'a;b'\n"));
        assert!(cfg.contains("  module2 /boot/test-guest.elf test-guest.elf checks\n"));
        assert!(cfg.contains("  boot\n}"));
        assert!(grub_cfg("", &[Module::new("/x/t.elf", "thinvisor.elf")]).is_err());
        // The test guest boots by multiboot v1 and loads thinvisor itself.
        let cfg = grub_cfg_for(
            Kernel::TestGuest,
            "loader -- log=info",
            &[Module::new("/x/thinvisor.elf", "thinvisor.elf")],
        )
        .unwrap();
        assert!(cfg.contains("  multiboot /boot/test-guest.elf loader -- log=info\n"));
        assert!(cfg.contains("  module /boot/thinvisor.elf thinvisor.elf\n"));
        assert!(!cfg.contains("multiboot2"));
    }

    #[test]
    fn module_names() {
        assert_eq!(Module::new("a", "x.elf y z").file_name(), Ok("x.elf"));
        assert!(Module::new("a", "").file_name().is_err());
        assert!(Module::new("a", "dir/x.elf").file_name().is_err());
    }

    #[test]
    fn multiboot_headers() {
        let mut data = vec![0u8; 64];
        assert!(!has_multiboot1(&data) && !has_multiboot2(&data));
        data[8..12].copy_from_slice(&0x1BAD_B002u32.to_le_bytes());
        data[16..20].copy_from_slice(&0u32.wrapping_sub(0x1BAD_B002).to_le_bytes());
        assert!(has_multiboot1(&data));
        data[24..28].copy_from_slice(&0xE852_50D6u32.to_le_bytes());
        data[32..36].copy_from_slice(&16u32.to_le_bytes());
        let sum = 0u32.wrapping_sub(0xE852_50D6).wrapping_sub(16);
        data[36..40].copy_from_slice(&sum.to_le_bytes());
        assert!(has_multiboot2(&data));
    }

    #[test]
    fn json_field() {
        let json = r#"{"packages":[],"target_directory":"/a/b \"c\"","x":1}"#;
        assert_eq!(
            json_string_field(json, "target_directory").as_deref(),
            Some("/a/b \"c\"")
        );
        assert_eq!(json_string_field(json, "nope"), None);
    }
}
