//! Makes sure the host tools are there (installing them with apt when we
//! are root), and the Rust target.

use std::path::PathBuf;
use std::process::Command;

use crate::util::{self, Context, Ctx, Result};

/// The Debian packages that hold every tool below.
pub const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "bochs",
    "bochs-sdl",
    "bochsbios",
    "vgabios",
    "grub-pc-bin",
    "grub-common",
    "xorriso",
    "mtools",
    "binutils",
    "gcc",
    "libc6-dev",
    "ovmf",
    "valgrind",
];

/// The bare-metal Rust target of the hypervisor and its test guests.
pub const TARGET: &str = "x86_64-unknown-none";

/// Bochs' system BIOS, first existing path wins.
const BOCHS_BIOS: &[&str] = &["/usr/share/bochs/BIOS-bochs-latest"];
/// Bochs' VGA BIOS (Debian's `vgabios`; `bochs` links the second to it).
const VGA_BIOS: &[&str] = &[
    "/usr/share/vgabios/vgabios.bin",
    "/usr/share/bochs/VGABIOS-lgpl-latest",
];
/// The SDL2 display plugin (`bochs-sdl`): Debian's Bochs has no `nogui`.
const BOCHS_SDL2: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_sdl2_gui.so",
    "/usr/lib/bochs/plugins/libbx_sdl2_gui.so",
];
/// glibc's static library: the C example of the guest tools is linked
/// statically (`cc -static`) against it.
const LIBC_A: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/libc.a",
    "/usr/lib64/libc.a",
    "/usr/lib/libc.a",
];
/// OVMF, the UEFI firmware for QEMU (thinvisor.efi's tests): code and the
/// variable store's template.
pub const OVMF_CODE: &[&str] = &["/usr/share/OVMF/OVMF_CODE_4M.fd"];
/// OVMF's empty variable store, copied for every run (the firmware writes
/// its boot options into it).
pub const OVMF_VARS: &[&str] = &["/usr/share/OVMF/OVMF_VARS_4M.fd"];
/// GRUB's BIOS platform files, needed by grub-mkrescue.
const GRUB_I386_PC: &[&str] = &["/usr/lib/grub/i386-pc"];

enum Need {
    /// An executable on PATH.
    Tool(&'static str),
    /// A file or directory, any of these paths.
    Path(&'static [&'static str]),
}

struct Requirement {
    what: &'static str,
    need: Need,
    package: &'static str,
}

const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        what: "qemu-system-x86_64",
        need: Need::Tool("qemu-system-x86_64"),
        package: "qemu-system-x86",
    },
    Requirement {
        what: "bochs",
        need: Need::Tool("bochs"),
        package: "bochs",
    },
    Requirement {
        what: "valgrind (the copy bench's instruction counts)",
        need: Need::Tool("valgrind"),
        package: "valgrind",
    },
    Requirement {
        what: "Bochs SDL2 display plugin",
        need: Need::Path(BOCHS_SDL2),
        package: "bochs-sdl",
    },
    Requirement {
        what: "Bochs BIOS",
        need: Need::Path(BOCHS_BIOS),
        package: "bochsbios",
    },
    Requirement {
        what: "VGA BIOS",
        need: Need::Path(VGA_BIOS),
        package: "vgabios",
    },
    Requirement {
        what: "grub-mkrescue",
        need: Need::Tool("grub-mkrescue"),
        package: "grub-common",
    },
    Requirement {
        what: "GRUB i386-pc files",
        need: Need::Path(GRUB_I386_PC),
        package: "grub-pc-bin",
    },
    Requirement {
        what: "xorriso",
        need: Need::Tool("xorriso"),
        package: "xorriso",
    },
    Requirement {
        what: "mformat",
        need: Need::Tool("mformat"),
        package: "mtools",
    },
    Requirement {
        what: "OVMF (UEFI firmware for QEMU)",
        need: Need::Path(OVMF_CODE),
        package: "ovmf",
    },
    Requirement {
        what: "objcopy",
        need: Need::Tool("objcopy"),
        package: "binutils",
    },
    // The C example of the guest tools (guest-tools/c) and its static
    // library's link.
    Requirement {
        what: "C compiler (cc)",
        need: Need::Tool("cc"),
        package: "gcc",
    },
    Requirement {
        what: "static glibc (libc.a)",
        need: Need::Path(LIBC_A),
        package: "libc6-dev",
    },
];

fn first_existing(paths: &[&str]) -> Option<PathBuf> {
    paths.iter().map(PathBuf::from).find(|p| p.exists())
}

fn missing() -> Vec<&'static Requirement> {
    REQUIREMENTS
        .iter()
        .filter(|r| match r.need {
            Need::Tool(name) => util::which(name).is_none(),
            Need::Path(paths) => first_existing(paths).is_none(),
        })
        .collect()
}

/// Bochs' BIOS image.
pub fn bochs_bios() -> Result<PathBuf> {
    first_existing(BOCHS_BIOS).ok_or_else(|| {
        format!(
            "Bochs BIOS not found ({}); install bochsbios",
            BOCHS_BIOS.join(", ")
        )
    })
}

/// The VGA BIOS image for Bochs.
pub fn vga_bios() -> Result<PathBuf> {
    first_existing(VGA_BIOS).ok_or_else(|| {
        format!(
            "VGA BIOS not found ({}); install vgabios",
            VGA_BIOS.join(", ")
        )
    })
}

/// OVMF's code and the template of its variable store.
pub fn ovmf() -> Result<(PathBuf, PathBuf)> {
    match (first_existing(OVMF_CODE), first_existing(OVMF_VARS)) {
        (Some(code), Some(vars)) => Ok((code, vars)),
        _ => Err(format!(
            "OVMF not found ({}, {}); install ovmf",
            OVMF_CODE.join(", "),
            OVMF_VARS.join(", ")
        )),
    }
}

/// Checks for every tool and installs what is missing (as root). Quick and
/// silent when everything is present.
pub fn ensure(ctx: &Ctx) -> Result {
    ensure_tools()?;
    ensure_rust_target(ctx)
}

fn ensure_tools() -> Result {
    let missing = missing();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = missing
        .iter()
        .map(|r| format!("{} ({})", r.what, r.package))
        .collect();
    let install = format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
        APT_PACKAGES.join(" ")
    );
    if !util::is_root() {
        return Err(format!(
            "missing host tools: {}.\nInstall them as root with:\n    {install}",
            names.join(", ")
        ));
    }
    eprintln!(
        "setup: missing {}; installing with apt-get",
        names.join(", ")
    );
    util::run(Command::new("apt-get").arg("update"))?;
    util::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(APT_PACKAGES),
    )?;
    let still: Vec<&str> = missing_after_install();
    if still.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "still missing after apt-get install: {}",
            still.join(", ")
        ))
    }
}

fn missing_after_install() -> Vec<&'static str> {
    missing().iter().map(|r| r.what).collect()
}

fn ensure_rust_target(ctx: &Ctx) -> Result {
    ensure_target(ctx, TARGET)?;
    ensure_target(ctx, crate::images::EFI_TARGET)
}

/// Adds the Rust target `target` with rustup when it is not installed (a
/// toolchain without rustup is left alone: the build will say if the
/// target is missing).
pub fn ensure_target(ctx: &Ctx, target: &str) -> Result {
    if util::which("rustup").is_none() {
        return Ok(());
    }
    let output = util::run_captured(Command::new("rustup").current_dir(&ctx.root).args([
        "target",
        "list",
        "--installed",
    ]))?;
    let installed = String::from_utf8_lossy(&output.stdout);
    if installed.lines().any(|l| l.trim() == target) {
        return Ok(());
    }
    util::run(
        Command::new("rustup")
            .current_dir(&ctx.root)
            .args(["target", "add", target]),
    )
    .context(format_args!("adding the Rust target {target}"))
}
