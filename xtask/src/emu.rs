//! Emulator runners: boot a kernel with modules in QEMU (`-kernel`,
//! multiboot1) or Bochs (GRUB ISO, multiboot2), with a time limit, and
//! collect the exit status and the serial log.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use thinvisor_abi::exit_code;

use crate::images::{self, Kernel, Module};
use crate::setup;
use crate::util::{self, Context, Ctx, Ended, Result};

/// What to boot.
#[derive(Debug, Clone)]
pub struct Boot {
    /// Which kernel `kernel32` and `kernel64` are.
    pub kernel: Kernel,
    /// ELF32 multiboot1 kernel for QEMU `-kernel`.
    pub kernel32: PathBuf,
    /// ELF64 (or ELF32) kernel for GRUB ISOs (multiboot2 for thinvisor,
    /// multiboot v1 for the test guest).
    pub kernel64: PathBuf,
    /// The kernel's command line.
    pub args: String,
    /// Modules, in order.
    pub modules: Vec<Module>,
}

/// QEMU settings.
#[derive(Debug, Clone)]
pub struct QemuOpts {
    /// `-m`, in MiB.
    pub mem_mb: u32,
    /// Wall-clock limit.
    pub timeout: Duration,
    /// Extra arguments (e.g. `-icount shift=0` for benchmarks).
    pub extra: Vec<String>,
    /// Serial port on the terminal (`-serial stdio`, interactive) instead
    /// of `serial.log`.
    pub interactive: bool,
    /// `-smp N`; 0 leaves QEMU's default (one processor).
    pub smp: u32,
    /// `-machine`; None leaves QEMU's default (`pc`, SMM on).
    pub machine: Option<String>,
    /// Raw disk images, attached in order (the first is the BIOS's first
    /// hard disk). Writes go to a temporary overlay (`snapshot=on`), so a
    /// run never changes the image another run or its build stamp relies
    /// on.
    pub drives: Vec<PathBuf>,
    /// A line to time: the run's `Outcome::line_at` says when it first
    /// appeared in the serial log (e.g. Linux's boot time to its init).
    pub time_line: Option<String>,
    /// UEFI instead of `-kernel`: OVMF (its code read-only, a fresh copy
    /// of its variable store per run) boots this directory as a FAT disk
    /// (QEMU's `fat:rw:DIR`), without a network card (OVMF would spend a
    /// minute trying PXE). The boot's `kernel32`, `args` and `modules` are
    /// not used.
    pub uefi: Option<PathBuf>,
}

impl Default for QemuOpts {
    fn default() -> Self {
        QemuOpts {
            mem_mb: 512,
            timeout: Duration::from_secs(30),
            extra: Vec::new(),
            interactive: false,
            smp: 0,
            machine: None,
            drives: Vec::new(),
            time_line: None,
            uefi: None,
        }
    }
}

/// The `-drive` value for a raw image, with QEMU's comma escape.
pub fn raw_drive(path: &Path) -> String {
    format!("file={},format=raw,snapshot=on", drive_path(path))
}

/// A path in a `-drive` value: QEMU's options double a literal comma.
fn drive_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// The arguments that boot `esp` (a directory, as a FAT disk) with OVMF,
/// whose variable store is first copied into `dir`.
fn uefi_args(dir: &Path, esp: &Path) -> Result<Vec<String>> {
    let (code, vars_template) = setup::ovmf()?;
    let vars = dir.join("OVMF_VARS_4M.fd");
    util::copy(&vars_template, &vars)?;
    Ok(vec![
        "-drive".into(),
        format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            drive_path(&code)
        ),
        "-drive".into(),
        format!("if=pflash,format=raw,unit=1,file={}", drive_path(&vars)),
        "-drive".into(),
        format!("file=fat:rw:{},format=raw", drive_path(esp)),
        "-net".into(),
        "none".into(),
    ])
}

/// Bochs settings.
#[derive(Debug, Clone)]
pub struct BochsOpts {
    /// CPU model (`ryzen`, `corei7_skylake_x`, ...).
    pub model: String,
    /// Guest memory in MiB.
    pub mem_mb: u32,
    /// Wall-clock limit.
    pub timeout: Duration,
    /// Emulated instructions per second: low keeps BIOS and GRUB timer
    /// waits cheap.
    pub ips: u64,
    /// Copy the serial log to stdout while it grows.
    pub follow: bool,
    /// A raw disk image (a multiple of 16 * 63 sectors) as the first hard
    /// disk (ata0-master); the GRUB ISO moves to ata0-slave and is still
    /// what the BIOS boots. The run uses a copy.
    pub disk: Option<PathBuf>,
    /// Processors (`cpu: count=N`); 1 = Bochs' default, one.
    pub cpus: u32,
    /// A line to time, as `QemuOpts::time_line`.
    pub time_line: Option<String>,
}

impl BochsOpts {
    pub fn new(model: &str) -> BochsOpts {
        BochsOpts {
            model: model.to_string(),
            mem_mb: 512,
            timeout: Duration::from_secs(120),
            ips: 2_000_000,
            follow: false,
            disk: None,
            cpus: 1,
            time_line: None,
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    /// The emulator's exit status; None when it was stopped (time-out,
    /// reboot).
    pub status: Option<ExitStatus>,
    /// Why the runner stopped the emulator, if it did.
    pub stopped: Option<String>,
    /// The serial log (lossy UTF-8; empty for interactive runs).
    pub serial: String,
    /// Wall time of the emulator process.
    pub elapsed: Duration,
    /// The run's directory (logs, generated files).
    pub dir: PathBuf,
    /// The emulator's own stdout+stderr file.
    pub emulator_output: PathBuf,
    /// When the timed line (`QemuOpts::time_line`, `BochsOpts::time_line`)
    /// first appeared, from the emulator's start (to within the 100 ms
    /// polling interval).
    pub line_at: Option<Duration>,
}

impl Outcome {
    /// The emulator's own output (its messages, not the guest's).
    pub fn emulator_text(&self) -> String {
        fs::read(&self.emulator_output)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The message Bochs printed when it ended ("Bochs is exiting with the
    /// following message: ..."), if any.
    pub fn bochs_exit_message(&self) -> Option<String> {
        let text = self.emulator_text();
        let mut lines = text.lines();
        lines.find(|l| l.contains("Bochs is exiting with the following message"))?;
        lines
            .find(|l| !l.trim().is_empty() && !l.starts_with("====="))
            .map(|l| l.trim().to_string())
    }
}

/// Meaning of a QEMU exit status under the test setup
/// (`isa-debug-exit`: status = (code << 1) | 1).
pub fn describe_qemu_status(status: &ExitStatus) -> String {
    let Some(raw) = status.code() else {
        return format!("QEMU died: {status}");
    };
    const KNOWN: &[(u8, &str)] = &[
        (exit_code::GUEST_PASSED, "guest: all checks passed"),
        (exit_code::GUEST_FAILED, "guest: some checks failed"),
        (exit_code::GUEST_HALTED, "thinvisor: guest halted"),
        (
            exit_code::GUEST_SHUTDOWN,
            "thinvisor: guest shut down (triple fault)",
        ),
        (
            exit_code::GUEST_BAD_MEMORY,
            "thinvisor: guest touched memory outside guest RAM",
        ),
        (
            exit_code::VMM_UNHANDLED,
            "thinvisor: unhandled exit or failed VM entry",
        ),
        (exit_code::BOOT_ERROR, "thinvisor: boot error"),
        (exit_code::VMM_PANIC, "thinvisor: panic"),
    ];
    if let Some((code, what)) = KNOWN
        .iter()
        .find(|(code, _)| exit_code::qemu_status(*code) == raw)
    {
        return format!("status {raw} = {what} (exit code {code:#x})");
    }
    match raw {
        0 => "status 0 = QEMU ended without an exit code (the guest powered off or reset \
              the machine; with -no-reboot also a triple fault of thinvisor itself)"
            .to_string(),
        1 => "status 1 = QEMU error (or exit code 0 written)".to_string(),
        n if n % 2 == 1 => format!("status {n} = unknown exit code {:#x}", (n - 1) / 2),
        n => format!("status {n} = unexpected QEMU status"),
    }
}

/// Describes an exit code of `thinvisor_abi::exit_code` with its QEMU status.
pub fn describe_exit_code(code: u8) -> String {
    format!(
        "status {} (exit code {code:#x})",
        exit_code::qemu_status(code)
    )
}

/// Places each module in `dir` under its file name, so that QEMU's
/// module string (the path, then the arguments) is the module string
/// itself.
fn stage_modules(dir: &Path, modules: &[Module]) -> Result<String> {
    let mut initrd = Vec::new();
    for module in modules {
        let name = module.file_name()?;
        util::copy(&module.image, &dir.join(name))?;
        // QEMU splits the module list at commas; a literal comma is doubled.
        initrd.push(module.cmdline.trim().replace(',', ",,"));
    }
    Ok(initrd.join(","))
}

/// The QEMU command for `boot`, run in `dir`.
pub fn qemu_command(dir: &Path, boot: &Boot, opts: &QemuOpts) -> Result<Command> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.current_dir(dir);
    if let Some(machine) = &opts.machine {
        cmd.args(["-machine", machine]);
    }
    cmd.args(["-cpu", "max", "-m"])
        .arg(format!("{}M", opts.mem_mb))
        .args(["-display", "none", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
    if opts.smp > 0 {
        cmd.arg("-smp").arg(opts.smp.to_string());
    }
    for drive in &opts.drives {
        cmd.arg("-drive").arg(raw_drive(drive));
    }
    if opts.interactive {
        cmd.args(["-serial", "stdio"]);
    } else {
        cmd.args(["-serial", "file:serial.log"]);
    }
    cmd.args(["-debugcon", "file:e9.log"]);
    if let Some(esp) = &opts.uefi {
        cmd.args(uefi_args(dir, esp)?);
    } else {
        cmd.arg("-kernel")
            .arg(&boot.kernel32)
            .arg("-append")
            .arg(&boot.args);
        if !boot.modules.is_empty() {
            cmd.arg("-initrd").arg(stage_modules(dir, &boot.modules)?);
        }
    }
    cmd.args(&opts.extra);
    Ok(cmd)
}

fn output_file(path: &Path) -> Result<(Stdio, Stdio)> {
    let file = File::create(path).context(format_args!("creating {}", path.display()))?;
    let err = file.try_clone().context("duplicating a file handle")?;
    Ok((file.into(), err.into()))
}

/// Boots `boot` in QEMU inside `dir` (which should be fresh): the serial
/// port goes to `dir/serial.log`, port 0xE9 to `dir/e9.log`, QEMU's own
/// output to `dir/qemu.out`. Interactive runs use the terminal instead.
pub fn run_qemu(dir: &Path, boot: &Boot, opts: &QemuOpts) -> Result<Outcome> {
    fs::create_dir_all(dir).context(format_args!("creating {}", dir.display()))?;
    let mut cmd = qemu_command(dir, boot, opts)?;
    let out_path = dir.join("qemu.out");
    fs::write(dir.join("command.txt"), util::describe(&cmd) + "\n")
        .context("writing command.txt")?;
    if opts.interactive {
        eprintln!("$ {}", util::describe(&cmd));
        // stdin, stdout and stderr stay the terminal's.
    } else {
        let (out, err) = output_file(&out_path)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().context("cannot start qemu-system-x86_64")?;
    let serial_path = dir.join("serial.log");
    let mut line_at = None;
    let ended = util::supervise(&mut child, opts.timeout, || {
        if let (Some(line), None) = (&opts.time_line, line_at) {
            if read_lossy(&serial_path).contains(line.as_str()) {
                line_at = Some(start.elapsed());
            }
        }
        None
    })
    .context("waiting for QEMU")?;
    let elapsed = start.elapsed();
    let (status, stopped) = match ended {
        Ended::Exited(status) => (Some(status), None),
        Ended::TimedOut => (
            None,
            Some(format!("timeout after {}", util::secs(opts.timeout))),
        ),
        Ended::Stopped(reason) => (None, Some(reason)),
    };
    Ok(Outcome {
        status,
        stopped,
        serial: read_lossy(&serial_path),
        elapsed,
        dir: dir.to_path_buf(),
        emulator_output: out_path,
        line_at,
    })
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The bochsrc for a run in `dir` (paths relative to it): the ISO as
/// ata0-master, or with `disk` (a flat image) as ata0-master and the ISO as
/// ata0-slave.
pub fn bochsrc(opts: &BochsOpts, iso: &str, disk: Option<&str>) -> Result<String> {
    let bios = setup::bochs_bios()?;
    let vga = setup::vga_bios()?;
    let drives = match disk {
        None => format!("ata0-master: type=cdrom, path={iso}, status=inserted\n"),
        Some(disk) => format!(
            "ata0-master: type=disk, path={disk}, mode=flat\n\
             ata0-slave: type=cdrom, path={iso}, status=inserted\n"
        ),
    };
    Ok(format!(
        "cpu: model={model}\n\
         cpu: ips={ips}\n\
         {cpus}\
         memory: guest={mem}, host={mem}\n\
         romimage: file={bios}\n\
         vgaromimage: file={vga}\n\
         pci: enabled=1, chipset=i440fx, slot1=pcivga\n\
         {drives}\
         boot: cdrom\n\
         com1: enabled=1, mode=file, dev=serial.log\n\
         port_e9_hack: enabled=1\n\
         clock: sync=none, time0=local\n\
         display_library: sdl2\n\
         sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy\n\
         log: bochs.log\n\
         panic: action=fatal\n\
         error: action=report\n\
         mouse: enabled=0\n",
        model = opts.model,
        ips = opts.ips,
        // Several processors: a short quantum interleaves them finely, as
        // Bochs' documentation suggests for SMP guests.
        cpus = if opts.cpus > 1 {
            format!("cpu: count={}, quantum=16\n", opts.cpus)
        } else {
            String::new()
        },
        mem = opts.mem_mb,
        bios = bios.display(),
        vga = vga.display(),
    ))
}

/// The line GRUB prints on the serial port as it boots an entry: seen twice,
/// the machine has reset.
const GRUB_BOOTING: &str = "Booting `";

/// GRUB's message when the entry's commands failed: it then waits at its
/// menu for a key.
const GRUB_FAILED: &str = "Failed to boot both default and fallback entries";

/// Why a Bochs run should stop early, judging by GRUB's output on the
/// serial port: the machine reset, or GRUB could not boot the entry.
fn grub_trouble(serial: &str) -> Option<String> {
    if serial.matches(GRUB_BOOTING).count() > 1 {
        return Some("the machine reset (GRUB booted a second time)".to_string());
    }
    if serial.contains(GRUB_FAILED) {
        let clean = util::strip_escapes(serial);
        let error = clean
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or(GRUB_FAILED);
        return Some(format!("GRUB could not boot: {error}"));
    }
    None
}

/// Boots `boot` in Bochs from a GRUB ISO made in `dir`, which is emptied
/// first. Bochs always exits with status 1: judge the run by its serial log
/// (`dir/serial.log`). A second GRUB boot (the machine reset, e.g. after a
/// triple fault) stops the run.
pub fn run_bochs(ctx: &Ctx, dir_name: &str, boot: &Boot, opts: &BochsOpts) -> Result<Outcome> {
    let iso = images::make_case_iso(
        ctx,
        dir_name,
        (boot.kernel, &boot.kernel64),
        &boot.args,
        &boot.modules,
    )?;
    let dir = iso
        .parent()
        .map(Path::to_path_buf)
        .ok_or("ISO without a directory")?;
    let disk = match &opts.disk {
        Some(image) => {
            util::copy(image, &dir.join("disk.img"))?;
            Some("disk.img")
        }
        None => None,
    };
    fs::write(dir.join("bochsrc"), bochsrc(opts, "thinvisor.iso", disk)?)
        .context("writing bochsrc")?;
    fs::write(dir.join("bochs.cmds"), "c\nquit\n").context("writing bochs.cmds")?;
    let serial_path = dir.join("serial.log");
    File::create(&serial_path).context("creating serial.log")?;
    let out_path = dir.join("bochs.out");
    let (out, err) = output_file(&out_path)?;
    let mut cmd = Command::new("bochs");
    cmd.current_dir(&dir)
        .env("SDL_VIDEODRIVER", "dummy")
        .args(["-q", "-f", "bochsrc", "-rc", "bochs.cmds"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    fs::write(dir.join("command.txt"), util::describe(&cmd) + "\n")
        .context("writing command.txt")?;
    if opts.follow {
        eprintln!("$ (cd {} && {})", ctx.show(&dir), util::describe(&cmd));
    }
    let start = Instant::now();
    let mut child = cmd.spawn().context("cannot start bochs")?;
    let mut follower = Follower::new(&serial_path);
    let mut line_at = None;
    let ended = util::supervise(&mut child, opts.timeout, || {
        if opts.follow {
            follower.copy_new();
        }
        let serial = read_lossy(&serial_path);
        if let (Some(line), None) = (&opts.time_line, line_at) {
            if serial.contains(line.as_str()) {
                line_at = Some(start.elapsed());
            }
        }
        grub_trouble(&serial)
    })
    .context("waiting for Bochs")?;
    let elapsed = start.elapsed();
    if opts.follow {
        follower.copy_new();
    }
    let (status, stopped) = match ended {
        Ended::Exited(status) => (Some(status), None),
        Ended::TimedOut => (
            None,
            Some(format!(
                "timeout after {} (Bochs was not powered off)",
                util::secs(opts.timeout)
            )),
        ),
        Ended::Stopped(reason) => (None, Some(reason)),
    };
    Ok(Outcome {
        status,
        stopped,
        serial: read_lossy(&serial_path),
        elapsed,
        dir,
        emulator_output: out_path,
        line_at,
    })
}

/// Copies what a growing file gains to stdout.
struct Follower {
    path: PathBuf,
    offset: u64,
}

impl Follower {
    fn new(path: &Path) -> Follower {
        Follower {
            path: path.to_path_buf(),
            offset: 0,
        }
    }

    fn copy_new(&mut self) {
        let Ok(mut file) = File::open(&self.path) else {
            return;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if let Ok(n) = file.read_to_end(&mut buf) {
            self.offset += n as u64;
            let mut stdout = io::stdout().lock();
            let _ = stdout.write_all(&buf);
            let _ = stdout.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn statuses() {
        let passed = ExitStatus::from_raw(33 << 8);
        assert!(describe_qemu_status(&passed).contains("all checks passed"));
        let halted = ExitStatus::from_raw(65 << 8);
        assert!(describe_qemu_status(&halted).contains("guest halted"));
        let zero = ExitStatus::from_raw(0);
        assert!(describe_qemu_status(&zero).contains("without an exit code"));
        let odd = ExitStatus::from_raw(7 << 8);
        assert!(describe_qemu_status(&odd).contains("unknown exit code 0x3"));
    }

    #[test]
    fn grub_trouble_is_seen() {
        assert_eq!(
            grub_trouble("\x1b[H  Booting `thinvisor'\r\nthinvisor: hi\n"),
            None
        );
        let reset = "  Booting `thinvisor'\nx\n  Booting `thinvisor'\n";
        assert!(grub_trouble(reset).unwrap().contains("reset"));
        let failed = "  Booting `t'\r\n\r\rerror: premature end of file /boot/x.\r\n\
                      \r  Failed to boot both default and fallback entries.\r\n";
        assert_eq!(
            grub_trouble(failed).unwrap(),
            "GRUB could not boot: error: premature end of file /boot/x."
        );
    }

    #[test]
    fn qemu_initrd_doubles_commas() {
        let dir = std::env::temp_dir().join(format!("xtask-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src.bin");
        fs::write(&src, b"x").unwrap();
        let boot = Boot {
            kernel: Kernel::Thinvisor,
            kernel32: "/k32".into(),
            kernel64: "/k64".into(),
            args: "log=info".into(),
            modules: vec![
                Module::new(&src, "a.elf checks"),
                Module::new(&src, "b.bin x,y"),
            ],
        };
        let cmd = qemu_command(&dir, &boot, &QemuOpts::default()).unwrap();
        let line = util::describe(&cmd);
        assert!(line.contains("-initrd 'a.elf checks,b.bin x,,y'"), "{line}");
        assert!(line.contains("-append log=info"), "{line}");
        assert!(!line.contains("-smp") && !line.contains("-drive"), "{line}");
        let opts = QemuOpts {
            smp: 2,
            machine: Some("pc".into()),
            drives: vec!["/d/a,b.img".into()],
            ..QemuOpts::default()
        };
        let line = util::describe(&qemu_command(&dir, &boot, &opts).unwrap());
        assert!(line.contains("-machine pc -cpu max"), "{line}");
        assert!(line.contains("-smp 2"), "{line}");
        assert!(
            line.contains("-drive file=/d/a,,b.img,format=raw,snapshot=on"),
            "{line}"
        );
        assert!(dir.join("a.elf").exists() && dir.join("b.bin").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
