//! Debian's Linux as a test guest: the assets (Debian's stock kernel, an
//! initramfs with busybox, `thinvisor-probe` and the guest tools, a
//! SYSLINUX boot disk) and
//! `cargo xtask linux`, which boots them on bare QEMU (or under thinvisor)
//! and times the boot.
//!
//! The guest's `/init` prints lines the integration cases look for:
//!
//! ```text
//! thinvisor-init: marker
//! thinvisor-init: cpus N
//! thinvisor-init: hypervisor-flag yes|no
//! probe: cpuid-signature ...            (thinvisor-probe)
//! probe: lookup log_read = N | probe: no thinvisor
//! thinvisor-init: STEP ok | thinvisor-init: STEP FAILED (why)  (the guest tools,
//!                                                  under thinvisor; see INIT_SCRIPT)
//! thinvisor-init: no-vmm TOOL status 2                (elsewhere)
//! thinvisor-init: done
//! ```
//!
//! and then powers the machine off, which ends a bare QEMU by itself.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::cpio::Cpio;
use crate::debian::{self, Unpacked};
use crate::disk::{self, DiskInputs};
use crate::emu::{self, Boot, QemuOpts};
use crate::images::{self, Kernel, Module};
use crate::setup;
use crate::util::{self, Context, Ctx, Result};

/// The kernel command line of every Linux boot: the console on COM1 (where
/// the tests read), and a panic ends the run at once (with `-no-reboot`
/// QEMU exits on the reboot) instead of hanging until the time-out.
/// `iomem=relaxed` lets `/dev/mem` read memory ranges a driver claimed
/// (Debian's kernel has `CONFIG_IO_STRICT_DEVMEM`), so `memscan` reads
/// every reserved range; System RAM stays closed to `/dev/mem`
/// (`CONFIG_STRICT_DEVMEM`) and memscan reads it through `/proc/kcore`.
macro_rules! kernel_args {
    () => {
        "console=ttyS0 panic=-1 iomem=relaxed"
    };
}

/// The kernel command line (see `kernel_args!`).
pub const KERNEL_ARGS: &str = kernel_args!();
/// The kernel command line of the UEFI boots (`esp.rs`): the initramfs
/// for the EFI stub to load from the kernel's own volume, then the usual
/// arguments, and `efi=debug`, which makes Linux print the firmware's
/// memory map (`efi: memNN: [TYPE ...] range=[...]`).
pub const EFI_KERNEL_ARGS: &str = concat!(r"initrd=\initrd.img ", kernel_args!(), " efi=debug");
/// The kernel's file name, in `target/linux`, in module strings and on
/// the disk.
pub const KERNEL_FILE: &str = "vmlinuz";
/// The initramfs' file name.
pub const INITRD_FILE: &str = "initrd.img";
/// The boot disk's file name.
pub const DISK_FILE: &str = "disk.img";
/// The module string of the kernel under `boot=linux`: the file name, then
/// the kernel's command line (thinvisor drops the first word).
pub const KERNEL_MODULE: &str = concat!("vmlinuz ", kernel_args!());
/// The module string of the initramfs under `boot=linux`.
pub const INITRD_MODULE: &str = "initrd.img";

/// thinvisor's command line for a Linux guest from modules. Linux runs in
/// the pass-through layout (the machine's memory, minus thinvisor's), so
/// the machine's size matters: Debian's bzImage unpacks 63.6 MiB
/// (`init_size`) at 16 MiB and dies silently in its decompressor with 64
/// MiB (seen on bare QEMU `-m 64`; 96 MiB boots). The runs use 512 MiB.
pub const LINUX_HV_ARGS: &str = "boot=linux log=info";
/// thinvisor's command line for the BIOS boot of the first hard disk.
pub const CHAIN_HV_ARGS: &str = "boot=chain log=info";

/// The kernel parameter that makes `/init` a benchmark boot (see
/// `INIT_SCRIPT`): `boot` reads the TSC after the marker and powers off,
/// `loops` also times exits from a user program (`vmmbench loops`). The
/// kernel takes a dotted name for a module's parameter and ignores it
/// when no module has it; `/init` finds it in `/proc/cmdline`.
pub const BENCH_PARAM: &str = "thinvisor.bench";

/// The kernel command line of a benchmark boot in `mode` (`boot` or
/// `loops`): the usual one, plus [`BENCH_PARAM`].
pub fn bench_kernel_args(mode: &str) -> String {
    format!("{KERNEL_ARGS} {BENCH_PARAM}={mode}")
}

/// The line `/init` prints first; the boot time is measured to it.
pub const MARKER: &str = "thinvisor-init: marker";
/// The line `/init` prints last, before powering off.
pub const DONE: &str = "thinvisor-init: done";

/// The Rust target of the programs in the initramfs: static, no libc
/// needed in the guest.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// The package of the guest programs.
const TOOLS_PACKAGE: &str = "guest-tools";
/// The probe's binary.
const PROBE_BIN: &str = "thinvisor-probe";
/// The Rust programs of `guest-tools` that go into the initramfs' `/bin`.
pub const TOOLS_BINS: &[&str] = &[
    PROBE_BIN, "dbgsh", "vmmlog", "vmmcall", "memscan", "vmmbench",
];
/// The cargo profile of guest programs (stripped release, see Cargo.toml).
const GUEST_PROFILE: &str = "guest";
/// The package of BitVisor's `call_vmm` C API (a Rust staticlib) and the
/// library it builds.
const CAPI_PACKAGE: &str = "thinvisor-call-vmm";
const CAPI_LIB: &str = "libthinvisor_call_vmm.a";
/// The C library's target: glibc, so that a plain `cc -static` links it.
pub const GNU_TARGET: &str = "x86_64-unknown-linux-gnu";
/// The C example program (guest-tools/c/example.c), in `/bin`.
pub const C_EXAMPLE: &str = "call-vmm-example";
/// What a Rust staticlib needs from the C libraries when linked statically
/// (`rustc --print native-static-libs` less `-lgcc_s`, which has no static
/// form; `cc -static` adds libgcc_eh and libc itself).
pub const C_LIBS: &[&str] = &["-lpthread", "-lm", "-ldl", "-lrt", "-lutil"];

/// The built assets.
#[derive(Debug, Clone)]
pub struct LinuxAssets {
    /// `target/linux/vmlinuz`: Debian's bzImage.
    pub kernel: PathBuf,
    /// `target/linux/initrd.img`: uncompressed newc cpio.
    pub initrd: PathBuf,
    /// `target/linux/disk.img`, when asked for.
    pub disk: Option<PathBuf>,
    /// Which kernel: `linux-image-6.1.0-NN-amd64 VERSION`.
    pub kernel_package: String,
}

/// The directory of the assets.
pub fn dir(ctx: &Ctx) -> PathBuf {
    ctx.out().join("linux")
}

/// Fetches (or takes from the cache) the Debian packages, builds the probe
/// and the initramfs and, with `with_disk`, the boot disk. Files are
/// rewritten only when their contents change; the disk is rebuilt only
/// when one of its inputs changed.
pub fn build(ctx: &Ctx, with_disk: bool) -> Result<LinuxAssets> {
    let out = dir(ctx);
    fs::create_dir_all(&out).context(format_args!("creating {}", out.display()))?;

    let kernel_members = ["./boot/vmlinuz-*"];
    let kernel_pkg = debian::kernel_package(&kernel_members)?;
    let kernel_deb = debian::fetch(&kernel_pkg, &kernel_members)?;
    let vmlinuz = kernel_deb
        .files_starting("boot", "vmlinuz-")?
        .pop()
        .ok_or_else(|| format!("{kernel_pkg} holds no boot/vmlinuz-*"))?;
    let kernel = out.join(KERNEL_FILE);
    write_if_changed(
        &kernel,
        &fs::read(&vmlinuz).context(format_args!("reading {}", vmlinuz.display()))?,
    )?;

    let busybox_deb = debian::fetch("busybox-static", &["./bin/busybox"])?;
    let busybox = busybox_deb.file("bin/busybox")?;
    let applets = busybox_applets(&busybox)?;
    let programs = build_tools(ctx)?
        .into_iter()
        .map(|(name, path)| {
            let data = fs::read(&path).context(format_args!("reading {}", path.display()))?;
            Ok((name, data))
        })
        .collect::<Result<Vec<_>>>()?;
    let initrd = out.join(INITRD_FILE);
    let archive = initramfs(
        &fs::read(&busybox).context("reading busybox")?,
        &applets,
        &programs,
    );
    write_if_changed(&initrd, &archive)?;

    let disk = if with_disk {
        Some(build_disk(&out, &kernel, &initrd)?)
    } else {
        None
    };
    Ok(LinuxAssets {
        kernel,
        initrd,
        disk,
        kernel_package: format!("{} {}", kernel_deb.package, kernel_deb.version),
    })
}

/// Builds the guest programs: the Rust ones (`TOOLS_BINS`, static musl
/// binaries) and the C example, linked statically against the `call_vmm`
/// library. Their names in `/bin` and their paths.
pub fn build_tools(ctx: &Ctx) -> Result<Vec<(String, PathBuf)>> {
    setup::ensure_target(ctx, MUSL_TARGET)?;
    let mut cmd = ctx.cargo();
    cmd.args(["build", "-p", TOOLS_PACKAGE]);
    for bin in TOOLS_BINS {
        cmd.args(["--bin", bin]);
    }
    cmd.args(["--profile", GUEST_PROFILE, "--target", MUSL_TARGET]);
    util::run(&mut cmd).context("building the guest tools")?;
    let dir = images::cargo_target_dir(ctx)?
        .join(MUSL_TARGET)
        .join(GUEST_PROFILE);
    let mut programs = Vec::new();
    for bin in TOOLS_BINS {
        let path = dir.join(bin);
        if !path.exists() {
            return Err(format!("cargo built no {}", path.display()));
        }
        programs.push((bin.to_string(), path));
    }
    programs.push((C_EXAMPLE.to_string(), build_c_example(ctx)?));
    Ok(programs)
}

/// The `call_vmm` static library (for the glibc target) and, with `cc`,
/// the C example linked statically against it, in `target/linux/`.
fn build_c_example(ctx: &Ctx) -> Result<PathBuf> {
    setup::ensure_target(ctx, GNU_TARGET)?;
    util::run(ctx.cargo().args([
        "build",
        "-p",
        CAPI_PACKAGE,
        "--lib",
        "--profile",
        GUEST_PROFILE,
        "--target",
        GNU_TARGET,
    ]))
    .context("building the call_vmm library")?;
    let lib = images::cargo_target_dir(ctx)?
        .join(GNU_TARGET)
        .join(GUEST_PROFILE)
        .join(CAPI_LIB);
    if util::which("cc").is_none() {
        return Err(format!(
            "no C compiler (cc) for the guest tools' C example; install one as root with:\n    \
             apt-get install -y {}",
            ["gcc", "libc6-dev"].join(" ")
        ));
    }
    let out = dir(ctx);
    fs::create_dir_all(&out).context(format_args!("creating {}", out.display()))?;
    let exe = out.join(C_EXAMPLE);
    let tools = ctx.root.join("guest-tools");
    // The linker's warnings about getaddrinfo and getpwuid_r in a static
    // glibc program concern code of Rust's std the library never calls:
    // the output is shown only when cc fails.
    let mut cc = Command::new("cc");
    cc.args(["-static", "-O2", "-s", "-Wall", "-Wl,--gc-sections", "-I"])
        .arg(tools.join("include"))
        .arg(tools.join("c").join("example.c"))
        .arg(&lib)
        .args(C_LIBS)
        .arg("-o")
        .arg(&exe);
    eprintln!("$ {}", util::describe(&cc));
    util::run_captured(&mut cc).context("compiling the C example (guest-tools/c/example.c)")?;
    Ok(exe)
}

/// The applet paths busybox installs (`bin/sh`, `usr/bin/nproc`, ...),
/// from `busybox --list-full` (the binary is static x86-64, so the host
/// runs it).
fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let output = util::run_captured(Command::new(busybox).arg("--list-full"))
        .context("listing busybox's applets")?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        // Top-level names (`linuxrc`) would sit beside /init; skip them.
        .filter(|l| l.contains('/') && *l != "bin/busybox")
        .map(str::to_string)
        .collect())
}

/// The guest's `/init`: mounts the pseudo file systems, prints the lines
/// the tests look for, runs the probe, exercises the guest tools and
/// powers off (`-f`: no init system to ask). `nproc` counts the CPUs Linux
/// brought online; the `hypervisor` flag alone proves nothing (QEMU TCG
/// sets it with no hypervisor), hence the probe.
///
/// Under thinvisor (the probe found it) each step of the tools prints
/// `thinvisor-init: STEP ok` or `thinvisor-init: STEP FAILED (why)`, and
/// what the tools printed is shown with a `TOOL| ` prefix; elsewhere each
/// tool must end at once with the "no thinvisor" status 2
/// (`thinvisor-init: no-vmm TOOL status N`). Every tool runs under
/// `timeout`, so a hang costs seconds, not the case's time limit.
pub const INIT_SCRIPT: &str = r#"#!/bin/sh
# thinvisor test guest: report what this Linux sees, then power off.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# A benchmark boot (cargo xtask bench) has thinvisor.bench=boot|loops on
# the kernel's command line: the guest's TSC is read right after the marker
# (instructions since reset under QEMU -icount shift=0).
bench=$(sed -n 's/.*thinvisor\.bench=\([a-z]*\).*/\1/p' /proc/cmdline)
echo "thinvisor-init: marker"
[ -z "$bench" ] || vmmbench tsc
echo "thinvisor-init: kernel $(uname -r)"
echo "thinvisor-init: cpus $(nproc)"
if grep '^flags' /proc/cpuinfo | grep -qw hypervisor; then
    echo "thinvisor-init: hypervisor-flag yes"
else
    echo "thinvisor-init: hypervisor-flag no"
fi
if [ -n "$bench" ]; then
    # `loops` times exits from this user program (under thinvisor only;
    # elsewhere vmmbench ends with status 2); both modes then power off.
    if [ "$bench" = loops ]; then
        timeout 120 vmmbench loops
        echo "thinvisor-init: vmmbench loops status $?"
    fi
    echo "thinvisor-init: done"
    poweroff -f
fi
/bin/thinvisor-probe > /tmp/probe
st=$?
cat /tmp/probe
[ $st = 0 ] || echo "thinvisor-init: probe failed with status $st"

ok() { echo "thinvisor-init: $1 ok${2:+ ($2)}"; }
failed() { echo "thinvisor-init: $1 FAILED ($2)"; }
# show TOOL FILE: the file on the console, each line prefixed "TOOL| ".
show() { sed "s/^/$1| /" "$2"; }
# wait_for FILE TEXT: up to 5 s for TEXT to appear in FILE.
wait_for() {
    i=0
    while [ $i -lt 50 ]; do
        grep -qF "$2" "$1" 2>/dev/null && return 0
        usleep 100000
        i=$((i + 1))
    done
    return 1
}

if grep -q '^probe: lookup' /tmp/probe; then
    # vmmlog: thinvisor's boot log, from user space.
    timeout 30 vmmlog > /tmp/vmmlog 2> /tmp/vmmlog.err
    st=$?
    show vmmlog-stderr /tmp/vmmlog.err
    res=$(sed -n 's/.*thinvisor reserves [0-9]* KiB at \(0x[0-9a-f]*\)\.\..*/\1/p' /tmp/vmmlog | head -n 1)
    if [ $st = 0 ] && [ -n "$res" ]; then
        ok vmmlog "$(wc -c < /tmp/vmmlog) bytes, thinvisor reserves $res"
    else
        failed vmmlog "status $st, $(wc -c < /tmp/vmmlog) bytes, no reserve line"
        res=0x0
    fi

    # vmmlog -f follows from here on: once it has caught up with the boot
    # log, everything thinvisor logs later must reach it too.
    vmmlog -f > /tmp/follow 2> /tmp/follow.err &
    follower=$!
    wait_for /tmp/follow 'thinvisor reserves' || failed vmmlog-follow "it did not print the boot log"
    caught_up=$(wc -c < /tmp/follow)

    # dbgsh from a pipe: every command's answer is checked.
    printf 'help\nlog 5\nstat\ncpu\nmem 1000 32\nmem %s 16\nbogus\nexit\n' "$res" \
        | timeout 60 dbgsh > /tmp/dbgsh 2> /tmp/dbgsh.err
    st=$?
    show dbgsh /tmp/dbgsh
    show dbgsh-stderr /tmp/dbgsh.err
    if [ $st = 0 ] && grep -q '^dbgsh> exit$' /tmp/dbgsh; then ok dbgsh; else failed dbgsh "status $st"; fi
    if grep -q '^mem ADDR \[N\] ' /tmp/dbgsh && grep -q '^exit  *end the session' /tmp/dbgsh; then
        ok dbgsh-help
    else
        failed dbgsh-help "no help lines"
    fi
    n=$(awk '/^dbgsh> log 5$/ { on = 1; next } /^dbgsh> / { on = 0 } on { n++ } END { print n + 0 }' /tmp/dbgsh)
    if [ "$n" = 5 ]; then ok dbgsh-log; else failed dbgsh-log "$n lines for log 5"; fi
    if grep -q '^0000000000001000: ' /tmp/dbgsh && grep -q '^0000000000001010: ' /tmp/dbgsh; then
        ok dbgsh-mem
    else
        failed dbgsh-mem "no dump of 0x1000"
    fi
    if grep -qF "mem: $res is thinvisor's own memory: refused" /tmp/dbgsh; then
        ok dbgsh-mem-refused "$res"
    else
        failed dbgsh-mem-refused "no refusal for $res"
    fi
    if grep -q '^unknown command; try help' /tmp/dbgsh; then ok dbgsh-unknown; else failed dbgsh-unknown "no error line"; fi
    # stat: both CPUs' exit tables and this session's calls of dbgsh.
    if grep -q '^CPU 0: [0-9]* exits$' /tmp/dbgsh && grep -q '^CPU 1: [0-9]* exits$' /tmp/dbgsh \
        && grep -q '^   1 dbgsh  *[1-9][0-9]*$' /tmp/dbgsh; then
        ok dbgsh-stat
    else
        failed dbgsh-stat "no exit tables for CPUs 0 and 1 or no dbgsh calls"
    fi
    # cpu: the backend, both CPUs, thinvisor's memory.
    if grep -q '^backend: ' /tmp/dbgsh && grep -q '^CPUs under thinvisor: 2$' /tmp/dbgsh \
        && grep -q "^thinvisor's memory: [0-9]* KiB at $res\.\." /tmp/dbgsh; then
        ok dbgsh-cpu
    else
        failed dbgsh-cpu "no backend, CPU count or memory line"
    fi

    # The follower has everything the log holds now (a fresh read from
    # the start is a prefix of what the follower printed).
    timeout 30 vmmlog > /tmp/vmmlog2 2>/dev/null
    size=$(wc -c < /tmp/vmmlog2)
    i=0
    until head -c "$size" /tmp/follow | cmp -s - /tmp/vmmlog2; do
        i=$((i + 1))
        [ $i -gt 50 ] && break
        usleep 100000
    done
    if [ $i -le 50 ]; then
        ok vmmlog-follow "$((size - caught_up)) bytes logged after it caught up"
    else
        failed vmmlog-follow "it has $(wc -c < /tmp/follow) bytes of $size"
    fi
    if grep -q 'dbgsh: session [0-9]* started' /tmp/vmmlog2; then
        if grep -q 'dbgsh: session [0-9]* started' /tmp/follow; then
            ok vmmlog-follow-session "saw a dbgsh session start"
        else
            failed vmmlog-follow-session "no session line"
        fi
    fi
    kill $follower
    show vmmlog-f-stderr /tmp/follow.err

    # The C program on BitVisor's call_vmm API.
    timeout 60 call-vmm-example
    st=$?
    if [ $st = 0 ]; then ok c-example; else failed c-example "status $st"; fi

    # vmmcall: an unknown name has its own status (3); a real call.
    timeout 10 vmmcall no_such_function 2> /tmp/vmmcall.err
    echo "thinvisor-init: vmmcall no_such_function status $?"
    show vmmcall-stderr /tmp/vmmcall.err
    timeout 10 vmmcall log_read 0 0 0 > /tmp/vmmcall
    st=$?
    show vmmcall /tmp/vmmcall
    if [ $st = 0 ] && grep -q '^rax=0x0000000000000000 rbx=0x' /tmp/vmmcall; then
        ok vmmcall
    else
        failed vmmcall "status $st"
    fi

    # vmmbench: the exit loops cargo xtask bench times (here the TSC need
    # not count instructions; the loops must run and print their lines).
    timeout 60 vmmbench loops > /tmp/vmmbench 2>&1
    st=$?
    show vmmbench /tmp/vmmbench
    if [ $st = 0 ] && grep -q '^vmmbench: loop lookup_dbgsh iterations=' /tmp/vmmbench \
        && grep -q '^vmmbench: loop cpuid iterations=' /tmp/vmmbench; then
        ok vmmbench
    else
        failed vmmbench "status $st"
    fi

    # dbgsh from the second processor.
    echo "thinvisor-init: taskset -c 1 runs on CPU $(taskset -c 1 awk '{ print $39 }' /proc/self/stat)"
    printf 'help\nexit\n' | timeout 60 taskset -c 1 dbgsh > /tmp/dbgsh1 2>&1
    st=$?
    if [ $st = 0 ] && grep -q '^mem ADDR \[N\] ' /tmp/dbgsh1 && grep -q '^dbgsh> exit$' /tmp/dbgsh1; then
        ok dbgsh-cpu1
    else
        show dbgsh-cpu1 /tmp/dbgsh1
        failed dbgsh-cpu1 "status $st"
    fi

    # Two clients at once: the first (on CPU 0) holds the shell while its
    # input is 2 s late; the second (on CPU 1) waits, then gets a session
    # of its own. Neither sees the other's bytes.
    (sleep 2; printf 'log 1\nexit\n') | timeout 60 taskset -c 0 dbgsh > /tmp/dbgsh-a 2>&1 &
    first=$!
    usleep 500000
    printf 'exit\n' | timeout 60 taskset -c 1 dbgsh > /tmp/dbgsh-b 2> /tmp/dbgsh-b.err
    st_b=$?
    wait $first
    st_a=$?
    if [ $st_a = 0 ] && [ $st_b = 0 ] \
        && grep -q '^dbgsh> log 1$' /tmp/dbgsh-a && grep -q '^dbgsh> exit$' /tmp/dbgsh-a \
        && grep -q 'another client has the shell' /tmp/dbgsh-b.err \
        && [ "$(grep -c '^dbgsh> ' /tmp/dbgsh-b)" = 1 ] && grep -q '^dbgsh> exit$' /tmp/dbgsh-b \
        && ! grep -q 'log 1' /tmp/dbgsh-b; then
        ok dbgsh-busy "the second client waited"
    else
        show dbgsh-a /tmp/dbgsh-a
        show dbgsh-b /tmp/dbgsh-b
        show dbgsh-b-stderr /tmp/dbgsh-b.err
        failed dbgsh-busy "status $st_a and $st_b"
    fi

    # CPU 1 taken offline and brought back: Linux restarts it with INIT
    # and SIPI, which thinvisor emulates (a real INIT would reset it out
    # of thinvisor). It must come back under thinvisor: a VMM call from it
    # answers.
    if [ -w /sys/devices/system/cpu/cpu1/online ]; then
        echo 0 > /sys/devices/system/cpu/cpu1/online
        off=$(cat /sys/devices/system/cpu/cpu1/online)
        echo 1 > /sys/devices/system/cpu/cpu1/online
        on=$(cat /sys/devices/system/cpu/cpu1/online)
        timeout 10 taskset -c 1 vmmcall log_read 0 0 0 > /tmp/vmmcall1 2>&1
        st=$?
        if [ "$off$on" = 01 ] && [ $st = 0 ] && [ "$(nproc)" = 2 ] \
            && grep -q '^rax=0x0000000000000000 rbx=0x' /tmp/vmmcall1; then
            ok cpu1-restart "offline, online again, answered"
        else
            show cpu1-vmmcall /tmp/vmmcall1
            failed cpu1-restart "online $off then $on, vmmcall status $st"
        fi
    else
        failed cpu1-restart "no /sys/devices/system/cpu/cpu1/online"
    fi

    # memscan: no page the guest can read (all of RAM through /proc/kcore,
    # every reserved range, thinvisor's block among them, through
    # /dev/mem) holds a word of thinvisor's canary page; a pattern memscan
    # plants in its own memory is found.
    canary=$(sed -n "s/.*canary planted in thinvisor's memory at 0x[0-9a-f]*: words \(0x[0-9a-f]*\) .*/\1/p" /tmp/vmmlog | head -n 1)
    if [ -n "$canary" ]; then
        timeout 600 memscan "$canary" > /tmp/memscan 2>&1
        st=$?
        show memscan /tmp/memscan
        result=$(sed -n 's/^memscan: result: //p' /tmp/memscan)
        if [ $st = 0 ]; then ok memscan "$result"; else failed memscan "status $st: $result"; fi
    else
        failed memscan "no canary line in the log"
    fi
else
    # No thinvisor: every tool says so at once, with status 2.
    for tool in dbgsh vmmlog "vmmcall log_read" call-vmm-example memscan "vmmbench loops"; do
        timeout 10 $tool < /dev/null > /dev/null 2>&1
        echo "thinvisor-init: no-vmm ${tool%% *} status $?"
    done
fi
echo "thinvisor-init: done"
poweroff -f
"#;

/// The initramfs: busybox and its applet links, the guest programs (in
/// `/bin`), `/init`, and the device nodes init needs before devtmpfs is
/// mounted.
pub fn initramfs(busybox: &[u8], applets: &[String], programs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut cpio = Cpio::new();
    for dir in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "root", "etc",
    ] {
        cpio.dir(dir, 0o755);
    }
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.char_dev("dev/null", 0o666, 1, 3);
    cpio.char_dev("dev/ttyS0", 0o660, 4, 64);
    cpio.file("bin/busybox", 0o755, busybox);
    for applet in applets {
        cpio.symlink(applet, "/bin/busybox");
    }
    for (name, data) in programs {
        cpio.file(&format!("bin/{name}"), 0o755, data);
    }
    cpio.file("init", 0o755, INIT_SCRIPT.as_bytes());
    cpio.finish()
}

/// `syslinux.cfg`: boot the kernel at once with the same command line as
/// the `-kernel` and `boot=linux` paths.
pub fn syslinux_cfg() -> String {
    format!(
        "DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nSERIAL 0 115200\n\
         LABEL linux\n  KERNEL {KERNEL_FILE}\n  APPEND {KERNEL_ARGS} initrd={INITRD_FILE}\n"
    )
}

/// The boot disk, rebuilt when the fingerprint of its inputs changed.
fn build_disk(out: &Path, kernel: &Path, initrd: &Path) -> Result<PathBuf> {
    let syslinux = debian::fetch("syslinux", &["./usr/bin/syslinux"])?;
    let common = debian::fetch("syslinux-common", &["./usr/lib/syslinux/mbr/mbr.bin"])?;
    let inputs = DiskInputs {
        mbr_bin: common.file("usr/lib/syslinux/mbr/mbr.bin")?,
        syslinux: syslinux.file("usr/bin/syslinux")?,
        files: vec![
            (kernel.to_path_buf(), KERNEL_FILE.to_string()),
            (initrd.to_path_buf(), INITRD_FILE.to_string()),
        ],
        syslinux_cfg: syslinux_cfg(),
    };
    let image = out.join(DISK_FILE);
    let stamp = out.join(format!("{DISK_FILE}.inputs"));
    let fingerprint = disk_fingerprint(&inputs, &[&syslinux, &common])?;
    if image.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s == fingerprint) {
        return Ok(image);
    }
    eprintln!("linux: building {}", image.display());
    let _ = fs::remove_file(&stamp);
    disk::build(&image, &inputs)?;
    fs::write(&stamp, fingerprint).context("writing the disk's input stamp")?;
    Ok(image)
}

/// What the disk is made of: package versions, the configuration, and a
/// hash of each file's contents.
fn disk_fingerprint(inputs: &DiskInputs, packages: &[&Unpacked]) -> Result<String> {
    let mut text = format!("disk {} MiB\n", disk::DISK_MIB);
    for p in packages {
        text += &format!("package {} {}\n", p.package, p.version);
    }
    text += &format!("cfg {:016x}\n", fnv1a(inputs.syslinux_cfg.as_bytes()));
    for (path, name) in &inputs.files {
        let data = fs::read(path).context(format_args!("reading {}", path.display()))?;
        text += &format!("file {name} {:016x}\n", fnv1a(&data));
    }
    Ok(text)
}

/// 64-bit FNV-1a: a cheap content hash for change detection (not for
/// security).
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes `data` to `path` unless it already holds exactly that (keeps the
/// file's time stamp for tools that look at it).
fn write_if_changed(path: &Path, data: &[u8]) -> Result {
    if fs::read(path).is_ok_and(|old| old == data) {
        return Ok(());
    }
    fs::write(path, data).context(format_args!("writing {}", path.display()))
}

const USAGE: &str = "\
usage: cargo xtask linux [--bare] [--disk] [--smp N] [--timeout SECS] [--build-only] [-- HV_ARGS...]
  Builds Debian's kernel, the initramfs (busybox, /init, the guest tools) and, with --disk,
  the SYSLINUX boot disk into target/linux/, then boots them in QEMU TCG (-cpu max, pc
  machine with SMM, -m 512) with the serial console here, and reports the wall time to
  the `thinvisor-init: marker` line.
  --bare          without thinvisor: QEMU -kernel vmlinuz -initrd initrd.img, or the disk
                  (default: under thinvisor with boot=linux, or boot=chain with --disk)
  --disk          boot the disk (SYSLINUX) instead of the kernel directly
  --smp N         processors (default 2)
  --timeout SECS  wall-clock limit (default 120)
  --build-only    only build the assets
  HV_ARGS         thinvisor's command line (default `boot=linux log=info`, or
                  `boot=chain log=info` with --disk)
Debian packages are cached in $THINVISOR_CACHE or ~/.cache/thinvisor/debian.
Exits 0 when the guest printed `thinvisor-init: done` and QEMU ended by itself.";

#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    bare: bool,
    disk: bool,
    smp: u32,
    timeout: u64,
    build_only: bool,
    hv_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            bare: false,
            disk: false,
            smp: 2,
            timeout: 120,
            build_only: false,
            hv_args: Vec::new(),
        }
    }
}

fn parse(args: &[String]) -> Result<Options> {
    let mut opts = Options::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<u64> {
            let v = args
                .next()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))?;
            v.parse().map_err(|_| format!("bad {name} `{v}`"))
        };
        match arg.as_str() {
            "--bare" => opts.bare = true,
            "--disk" => opts.disk = true,
            "--smp" => {
                let n = number("--smp")?;
                opts.smp = u32::try_from(n)
                    .ok()
                    .filter(|n| (1..=255).contains(n))
                    .ok_or_else(|| format!("--smp {n}: 1 to 255"))?;
            }
            "--timeout" => opts.timeout = number("--timeout")?,
            "--build-only" => opts.build_only = true,
            "--" => {
                opts.hv_args = args.cloned().collect();
                break;
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown option `{other}`\n{USAGE}")),
        }
    }
    Ok(opts)
}

/// `cargo xtask linux`.
pub fn main(ctx: &Ctx, args: &[String]) -> Result<ExitCode> {
    let opts = parse(args)?;
    setup::ensure(ctx)?;
    let assets = build(ctx, opts.disk)?;
    eprintln!(
        "linux: {} in {}: {KERNEL_FILE}, {INITRD_FILE}{}",
        assets.kernel_package,
        ctx.show(&dir(ctx)),
        if opts.disk {
            format!(", {DISK_FILE}")
        } else {
            String::new()
        }
    );
    if opts.build_only {
        return Ok(ExitCode::SUCCESS);
    }
    let run_dir = ctx.fresh_dir("linux-run")?;
    let mut cmd = if opts.bare {
        bare_command(&assets, opts.disk, opts.smp)?
    } else {
        let images = images::build(ctx)?;
        let (default_args, modules) = if opts.disk {
            (CHAIN_HV_ARGS, vec![])
        } else {
            (
                LINUX_HV_ARGS,
                vec![
                    Module::new(&assets.kernel, KERNEL_MODULE),
                    Module::new(&assets.initrd, INITRD_MODULE),
                ],
            )
        };
        let boot = Boot {
            kernel: Kernel::Thinvisor,
            kernel32: images.hv32.clone(),
            kernel64: images.hv.clone(),
            args: if opts.hv_args.is_empty() {
                default_args.to_string()
            } else {
                opts.hv_args.join(" ")
            },
            modules,
        };
        let qemu = QemuOpts {
            interactive: true,
            smp: opts.smp,
            machine: Some("pc".into()),
            drives: assets.disk.iter().cloned().collect(),
            ..QemuOpts::default()
        };
        emu::qemu_command(&run_dir, &boot, &qemu)?
    };
    cmd.current_dir(&run_dir);
    eprintln!("$ {}", util::describe(&cmd));
    let watched = watch(cmd, Duration::from_secs(opts.timeout))?;
    fs::write(run_dir.join("serial.log"), &watched.serial).context("writing serial.log")?;
    println!();
    println!("linux: {}", watched.summary(!opts.bare));
    Ok(if watched.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// QEMU without thinvisor: the kernel by `-kernel`, or the disk.
pub fn bare_command(assets: &LinuxAssets, from_disk: bool, smp: u32) -> Result<Command> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "pc", "-cpu", "max", "-m", "512M"])
        .args(["-smp", &smp.to_string()])
        .args(["-display", "none", "-no-reboot", "-serial", "stdio"]);
    if from_disk {
        let disk = assets.disk.as_ref().ok_or("the disk was not built")?;
        cmd.arg("-drive").arg(emu::raw_drive(disk));
    } else {
        cmd.arg("-kernel")
            .arg(&assets.kernel)
            .arg("-initrd")
            .arg(&assets.initrd)
            .arg("-append")
            .arg(KERNEL_ARGS);
    }
    Ok(cmd)
}

/// A QEMU run whose serial console was on its stdout.
#[derive(Debug)]
pub struct Watched {
    pub serial: String,
    /// Wall time from QEMU's start to the marker line, if it came.
    pub marker_at: Option<Duration>,
    pub elapsed: Duration,
    /// QEMU's status when it ended by itself.
    pub status: Option<ExitStatus>,
    /// Why it was stopped otherwise.
    pub stopped: Option<String>,
}

impl Watched {
    /// The guest reached the end of `/init` and QEMU then ended by itself.
    pub fn succeeded(&self) -> bool {
        self.serial.contains(DONE) && self.status.is_some()
    }

    /// One line: the time to the marker, whether init finished, how QEMU
    /// ended (with thinvisor's exit code when `under_thinvisor`).
    pub fn summary(&self, under_thinvisor: bool) -> String {
        let marker = match self.marker_at {
            Some(t) => format!("`{MARKER}` after {}", util::secs(t)),
            None => format!("no `{MARKER}` line"),
        };
        let end = match (&self.status, &self.stopped) {
            (_, Some(reason)) => format!("QEMU was stopped: {reason}"),
            (Some(status), None) => format!(
                "QEMU ended by itself after {} ({})",
                util::secs(self.elapsed),
                if under_thinvisor {
                    emu::describe_qemu_status(status)
                } else {
                    status.to_string()
                }
            ),
            (None, None) => "QEMU ended".to_string(),
        };
        let done = if self.serial.contains(DONE) {
            "init finished"
        } else {
            "init did not finish"
        };
        format!("{marker}; {done}; {end}")
    }
}

/// Runs `cmd` (whose serial console is its stdout) for at most `timeout`,
/// copying its output here as it comes and noting when the marker line
/// appeared.
pub fn watch(mut cmd: Command, timeout: Duration) -> Result<Watched> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().context("cannot start qemu-system-x86_64")?;
    let mut stdout = child.stdout.take().ok_or("no stdout from QEMU")?;
    let reader = thread::spawn(move || {
        let mut serial = Vec::new();
        let mut marker_at = None;
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            serial.extend_from_slice(&buf[..n]);
            let mut out = io::stdout().lock();
            let _ = out.write_all(&buf[..n]);
            let _ = out.flush();
            if marker_at.is_none() && contains(&serial, MARKER.as_bytes()) {
                marker_at = Some(start.elapsed());
            }
        }
        (serial, marker_at)
    });
    let ended = util::supervise(&mut child, timeout, || None).context("waiting for QEMU")?;
    let elapsed = start.elapsed();
    let (serial, marker_at) = reader.join().map_err(|_| "the output reader panicked")?;
    let (status, stopped) = match ended {
        util::Ended::Exited(status) => (Some(status), None),
        util::Ended::TimedOut => (None, Some(format!("timeout after {}", util::secs(timeout)))),
        util::Ended::Stopped(reason) => (None, Some(reason)),
    };
    Ok(Watched {
        serial: String::from_utf8_lossy(&serial).into_owned(),
        marker_at,
        elapsed,
        status,
        stopped,
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::read::entries;

    #[test]
    fn initramfs_contents() {
        let applets = vec!["bin/sh".to_string(), "sbin/poweroff".to_string()];
        let programs = vec![
            ("thinvisor-probe".to_string(), b"PROBE".to_vec()),
            ("dbgsh".to_string(), b"DBGSH".to_vec()),
        ];
        let all = entries(&initramfs(b"BB", &applets, &programs));
        let find = |name: &str| {
            all.iter()
                .find(|e| e.name == name)
                .unwrap_or_else(|| panic!("no {name}"))
        };
        assert_eq!(find("init").data, INIT_SCRIPT.as_bytes());
        assert_eq!(find("init").mode, 0o100_755);
        assert_eq!(find("bin/busybox").data, b"BB");
        assert_eq!(find("bin/thinvisor-probe").data, b"PROBE");
        assert_eq!(find("bin/dbgsh").data, b"DBGSH");
        assert_eq!(find("bin/dbgsh").mode, 0o100_755);
        assert_eq!(find("bin/sh").data, b"/bin/busybox");
        assert_eq!(find("sbin/poweroff").mode, 0o120_777);
        assert_eq!(find("dev/console").rdev, (5, 1));
        // Every entry's parent directory comes before it.
        for (i, e) in all.iter().enumerate() {
            if let Some((parent, _)) = e.name.rsplit_once('/') {
                assert!(
                    all[..i].iter().any(|p| p.name == parent),
                    "{} before its directory",
                    e.name
                );
            }
        }
    }

    #[test]
    fn init_prints_the_expected_lines() {
        for line in [MARKER, DONE, "thinvisor-init: cpus $(nproc)"] {
            assert!(INIT_SCRIPT.contains(line), "{line}");
        }
        assert!(INIT_SCRIPT.contains("hypervisor-flag yes"));
        assert!(INIT_SCRIPT.contains("hypervisor-flag no"));
        assert!(INIT_SCRIPT.trim_end().ends_with("poweroff -f"));
        // Every guest program is run, under thinvisor and without it, and
        // under `timeout` (the follower is killed), so a hang costs seconds.
        for run in [
            "timeout 30 vmmlog > /tmp/vmmlog",
            "vmmlog -f > /tmp/follow",
            "kill $follower",
            "| timeout 60 dbgsh > /tmp/dbgsh",
            "timeout 60 call-vmm-example",
            "timeout 10 vmmcall no_such_function",
            "timeout 10 vmmcall log_read 0 0 0",
            "| timeout 60 taskset -c 1 dbgsh",
            r#"for tool in dbgsh vmmlog "vmmcall log_read" call-vmm-example memscan "vmmbench loops"; do"#,
            "timeout 60 vmmbench loops > /tmp/vmmbench",
            "timeout 600 memscan \"$canary\" > /tmp/memscan",
            "timeout 10 $tool < /dev/null",
        ] {
            assert!(INIT_SCRIPT.contains(run), "{run}");
        }
        assert!(INIT_SCRIPT.contains(r#"failed() { echo "thinvisor-init: $1 FAILED ($2)"; }"#));
    }

    #[test]
    fn bench_boots_read_the_tsc_at_the_marker() {
        // The TSC right after the marker, in both bench modes; the loops
        // only in `loops`; a bench boot ends before the tool tests.
        let marker = INIT_SCRIPT.find(MARKER).unwrap();
        let tsc = INIT_SCRIPT
            .find(r#"[ -z "$bench" ] || vmmbench tsc"#)
            .unwrap();
        assert!(tsc > marker && !INIT_SCRIPT[marker..tsc].contains("\n\n"));
        assert!(INIT_SCRIPT.contains(&format!("{}=", BENCH_PARAM.replace('.', "\\."))));
        let loops = INIT_SCRIPT.find("timeout 120 vmmbench loops").unwrap();
        let probe = INIT_SCRIPT.find("/bin/thinvisor-probe").unwrap();
        assert!(loops < probe);
        assert_eq!(
            bench_kernel_args("loops"),
            format!("{KERNEL_ARGS} thinvisor.bench=loops")
        );
    }

    #[test]
    fn command_lines_agree() {
        assert_eq!(KERNEL_MODULE, format!("{KERNEL_FILE} {KERNEL_ARGS}"));
        let cfg = syslinux_cfg();
        assert!(cfg.starts_with("DEFAULT linux\nPROMPT 0\n"));
        assert!(cfg.contains(&format!("KERNEL {KERNEL_FILE}\n")));
        assert!(cfg.contains(&format!("APPEND {KERNEL_ARGS} initrd={INITRD_FILE}\n")));
    }

    #[test]
    fn fnv_known_values() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    /// Boots the built assets on bare QEMU through the runner the
    /// integration cases use (`emu::run_qemu`: QEMU loads a bzImage given as
    /// `-kernel` itself), checking the timed marker line and the CPU count.
    /// Needs `cargo xtask linux --build-only` first and about 20 s:
    /// `cargo test -p xtask -- --ignored bare_boot`.
    #[test]
    #[ignore]
    fn bare_boot_through_the_case_runner() {
        let ctx = Ctx::new();
        let kernel = dir(&ctx).join(KERNEL_FILE);
        let initrd = dir(&ctx).join(INITRD_FILE);
        assert!(
            kernel.exists() && initrd.exists(),
            "run cargo xtask linux --build-only"
        );
        let boot = Boot {
            kernel: Kernel::Thinvisor,
            kernel32: kernel.clone(),
            kernel64: kernel,
            args: KERNEL_ARGS.to_string(),
            modules: vec![Module::new(initrd, INITRD_MODULE)],
        };
        let opts = QemuOpts {
            timeout: Duration::from_secs(120),
            smp: 2,
            machine: Some("pc".into()),
            time_line: Some(MARKER.to_string()),
            ..QemuOpts::default()
        };
        let run_dir = ctx.fresh_dir("linux-runner-test").unwrap();
        let outcome = emu::run_qemu(&run_dir, &boot, &opts).unwrap();
        assert!(outcome.stopped.is_none(), "{:?}", outcome.stopped);
        assert!(outcome.serial.contains("thinvisor-init: cpus 2"));
        assert!(outcome.serial.contains("probe: no thinvisor"));
        for tool in [
            "dbgsh", "vmmlog", "vmmcall", C_EXAMPLE, "memscan", "vmmbench",
        ] {
            let line = format!("thinvisor-init: no-vmm {tool} status 2");
            assert!(outcome.serial.contains(&line), "{line}");
        }
        assert!(outcome.serial.contains(DONE));
        let marker = outcome.line_at.expect("the marker line was timed");
        assert!(marker <= outcome.elapsed);
        eprintln!(
            "marker after {}, QEMU ended after {}",
            util::secs(marker),
            util::secs(outcome.elapsed)
        );
    }

    #[test]
    fn options() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(parse(&[]).unwrap(), Options::default());
        let o = parse(&args("--bare --disk --smp 4 --timeout 9 -- log=debug x")).unwrap();
        assert!(o.bare && o.disk && !o.build_only);
        assert_eq!((o.smp, o.timeout), (4, 9));
        assert_eq!(o.hv_args, vec!["log=debug", "x"]);
        assert!(parse(&args("--smp 0")).is_err());
        assert!(parse(&args("--smp")).is_err());
        assert!(parse(&args("--what")).is_err());
    }
}
