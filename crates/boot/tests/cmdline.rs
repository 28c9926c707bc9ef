use log::LevelFilter;
use thinvisor_boot::cmdline::{
    parse, BootMode, CmdlineError, CmdlineErrorKind, EferMode, IommuMode, Layout, Options,
};

/// Parses and collects warnings.
fn run(cmdline: &str) -> (Result<Options, CmdlineError<'_>>, Vec<(String, String)>) {
    let mut warnings = Vec::new();
    let r = parse(cmdline, &mut |t, why| {
        warnings.push((t.to_string(), why.to_string()))
    });
    (r, warnings)
}

fn ok(cmdline: &str) -> Options {
    let (r, _) = run(cmdline);
    r.unwrap_or_else(|e| panic!("{cmdline:?}: {e}"))
}

fn err(cmdline: &str) -> CmdlineError<'_> {
    run(cmdline).0.expect_err(cmdline)
}

const MIB: u64 = 1 << 20;

#[test]
fn defaults() {
    let o = ok("");
    assert_eq!(o.log_level, LevelFilter::Info);
    assert_eq!(o.guest_module, 0);
    assert_eq!(o.guest_mem, 64 * MIB);
    assert_eq!(o, Options::default());
    assert_eq!(ok("   \t  "), Options::default());
}

#[test]
fn kernel_path_and_flags_are_skipped() {
    let (r, w) = run("/boot/thinvisor.elf quiet log=debug");
    assert_eq!(r.unwrap().log_level, LevelFilter::Debug);
    assert!(w.is_empty());
}

#[test]
fn all_options() {
    let o = ok("thinvisor log=trace guest=2 guest_mem=128M efer=msr-area iommu=required");
    assert_eq!(
        o,
        Options {
            log_level: LevelFilter::Trace,
            guest_module: 2,
            guest_mem: 128 * MIB,
            efer: EferMode::MsrArea,
            boot: BootMode::Module,
            layout: Layout::Isolated,
            dbgsh: true,
            iommu: IommuMode::Required,
        }
    );
}

#[test]
fn iommu_modes() {
    assert_eq!(ok("").iommu, IommuMode::Auto);
    assert_eq!(ok("iommu=auto").iommu, IommuMode::Auto);
    assert_eq!(ok("iommu=off").iommu, IommuMode::Off);
    assert_eq!(ok("iommu=required").iommu, IommuMode::Required);
    for bad in ["iommu=", "iommu=on", "iommu=REQUIRED"] {
        assert_eq!(err(bad).kind, CmdlineErrorKind::BadIommu, "{bad}");
    }
    assert!(err("iommu=yes")
        .to_string()
        .contains("iommu=required, iommu=auto or iommu=off"));
}

#[test]
fn dbgsh_switch() {
    assert!(ok("").dbgsh);
    assert!(ok("dbgsh=on").dbgsh);
    assert!(!ok("dbgsh=off").dbgsh);
    for bad in ["dbgsh=", "dbgsh=OFF", "dbgsh=0"] {
        assert_eq!(err(bad).kind, CmdlineErrorKind::BadDbgsh, "{bad}");
    }
    assert!(err("dbgsh=no")
        .to_string()
        .contains("dbgsh=on or dbgsh=off"));
}

#[test]
fn boot_modes_and_layouts() {
    let o = ok("");
    assert_eq!((o.boot, o.layout), (BootMode::Module, Layout::Isolated));
    let o = ok("boot=module layout=passthrough");
    assert_eq!((o.boot, o.layout), (BootMode::Module, Layout::Passthrough));
    // The machine's own OS is always passed through, in either order.
    for line in [
        "boot=linux",
        "layout=passthrough boot=chain",
        "boot=linux layout=passthrough",
    ] {
        assert_eq!(ok(line).layout, Layout::Passthrough, "{line}");
    }
    assert_eq!(ok("boot=linux").boot, BootMode::Linux);
    assert_eq!(ok("boot=chain").boot, BootMode::Chain);
    let e = err("boot=linux layout=isolated");
    assert_eq!(e.kind, CmdlineErrorKind::IsolatedNeedsModule);
    assert_eq!(e.token, "layout=isolated");
    assert!(e.to_string().contains("passthrough"));
    for (bad, kind) in [
        ("boot=", CmdlineErrorKind::BadBoot),
        ("boot=Linux", CmdlineErrorKind::BadBoot),
        ("layout=shared", CmdlineErrorKind::BadLayout),
    ] {
        assert_eq!(err(bad).kind, kind, "{bad}");
    }
}

#[test]
fn efer_modes() {
    assert_eq!(ok("").efer, EferMode::Auto);
    assert_eq!(ok("efer=auto").efer, EferMode::Auto);
    assert_eq!(ok("efer=msr-area").efer, EferMode::MsrArea);
    for bad in ["efer=", "efer=MSR-AREA", "efer=controls"] {
        let e = err(bad);
        assert_eq!(e.kind, CmdlineErrorKind::BadEfer, "{bad}");
        assert!(e.to_string().contains("efer=auto or efer=msr-area"));
    }
}

#[test]
fn log_levels() {
    for (s, l) in [
        ("off", LevelFilter::Off),
        ("error", LevelFilter::Error),
        ("warn", LevelFilter::Warn),
        ("info", LevelFilter::Info),
        ("debug", LevelFilter::Debug),
        ("trace", LevelFilter::Trace),
        ("DEBUG", LevelFilter::Debug),
    ] {
        assert_eq!(ok(&format!("log={s}")).log_level, l);
    }
    let e = err("a log=verbose b");
    assert_eq!(e.token, "log=verbose");
    assert_eq!(e.kind, CmdlineErrorKind::BadLogLevel);
    assert!(e.to_string().starts_with("log=verbose: unknown log level"));
    assert_eq!(err("log=").kind, CmdlineErrorKind::BadLogLevel);
}

#[test]
fn later_token_wins() {
    assert_eq!(ok("log=warn log=error").log_level, LevelFilter::Error);
}

#[test]
fn guest_index() {
    assert_eq!(ok("guest=0").guest_module, 0);
    assert_eq!(ok("guest=15").guest_module, 15);
    for bad in [
        "guest=",
        "guest=-1",
        "guest=+1",
        "guest=0x1",
        "guest=one",
        "guest=99999999999999999999999",
    ] {
        let e = err(bad);
        assert_eq!(e.kind, CmdlineErrorKind::BadGuestIndex, "{bad}");
        assert_eq!(e.token, bad);
    }
}

#[test]
fn guest_mem_sizes() {
    assert_eq!(ok("guest_mem=2M").guest_mem, 2 * MIB);
    assert_eq!(ok("guest_mem=2m").guest_mem, 2 * MIB);
    assert_eq!(ok("guest_mem=4096K").guest_mem, 4 * MIB);
    assert_eq!(ok("guest_mem=1G").guest_mem, 1024 * MIB);
    assert_eq!(ok("guest_mem=4G").guest_mem, 4096 * MIB);
    assert_eq!(ok("guest_mem=0x4000000").guest_mem, 64 * MIB);
    assert_eq!(ok("guest_mem=0X10m").guest_mem, 16 * MIB);
    assert_eq!(ok("guest_mem=2097152").guest_mem, 2 * MIB);
    // Rounded up to 2 MiB.
    assert_eq!(ok("guest_mem=3M").guest_mem, 4 * MIB);
    assert_eq!(ok("guest_mem=2097153").guest_mem, 4 * MIB);
    assert_eq!(ok("guest_mem=4194303K").guest_mem, 4096 * MIB);
}

#[test]
fn guest_mem_limits() {
    for small in [
        "guest_mem=0",
        "guest_mem=1M",
        "guest_mem=2097151",
        "guest_mem=0x1fffff",
    ] {
        let e = err(small);
        assert_eq!(e.kind, CmdlineErrorKind::GuestMemTooSmall, "{small}");
        assert_eq!(e.to_string(), format!("{small} is too small: at least 2M"));
    }
    for big in [
        "guest_mem=4097M",
        "guest_mem=5G",
        "guest_mem=0x100000001",
        "guest_mem=4294967297",
        "guest_mem=18446744073709551615",
        "guest_mem=99999999999999999999999",
        "guest_mem=17179869184G",
    ] {
        let e = err(big);
        assert_eq!(e.kind, CmdlineErrorKind::GuestMemTooLarge, "{big}");
        assert_eq!(e.token, big);
        assert_eq!(e.to_string(), format!("{big} does not fit: at most 4G"));
    }
}

#[test]
fn guest_mem_syntax() {
    for bad in [
        "guest_mem=",
        "guest_mem=M",
        "guest_mem=0x",
        "guest_mem=0xM",
        "guest_mem=64MB",
        "guest_mem=1T",
        "guest_mem=-64M",
        "guest_mem=+64M",
        "guest_mem=6 4M",
        "guest_mem=0x4g00",
        "guest_mem=12é",
        "guest_mem=1.5G",
    ] {
        let (r, _) = run(bad);
        let e = r.expect_err(bad);
        // "6 4M" splits into "guest_mem=6" (too small) and "4M" (ignored).
        if bad == "guest_mem=6 4M" {
            assert_eq!(e.kind, CmdlineErrorKind::GuestMemTooSmall);
            continue;
        }
        assert_eq!(e.kind, CmdlineErrorKind::BadSize, "{bad}");
        assert_eq!(e.token, bad);
        assert!(e.to_string().contains("expected a size"), "{e}");
    }
}

#[test]
fn unknown_keys_warn() {
    let (r, w) = run("kernel foo=bar log=warn =x guest_memory=1G");
    assert_eq!(r.unwrap().log_level, LevelFilter::Warn);
    let tokens: Vec<&str> = w.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(tokens, ["foo=bar", "=x", "guest_memory=1G"]);
    assert!(w.iter().all(|(_, why)| !why.is_empty()));
}

#[test]
fn error_stops_at_first_bad_token() {
    let e = err("guest=x log=nope");
    assert_eq!(e.token, "guest=x");
}
