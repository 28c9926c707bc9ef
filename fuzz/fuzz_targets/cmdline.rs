//! thinvisor's command-line parser (`thinvisor_boot::cmdline::parse`) on
//! arbitrary text and on token soups built from its own vocabulary.
//!
//! Checked: no panic; a warning names a whole `key=value` token of the
//! input; an error names a token of the input; accepted options are in
//! range (guest RAM a multiple of 2 MiB in [2 MiB, 4 GiB]; a boot that
//! is not a module is pass-through) and round-trip: written back as a
//! command line they parse to the same options, with no warning; words
//! without `=` (the kernel's path) change nothing.

#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use thinvisor_boot::cmdline::{
    self, BootMode, EferMode, Layout, Options, GUEST_MEM_GRANULE, GUEST_MEM_MAX,
};

const WORDS: &[&str] = &[
    "log=",
    "guest=",
    "guest_mem=",
    "efer=",
    "boot=",
    "layout=",
    "dbgsh=",
    "info",
    "TRACE",
    "off",
    "Warn",
    "module",
    "linux",
    "chain",
    "isolated",
    "passthrough",
    "on",
    "auto",
    "msr-area",
    "0x",
    "0X",
    "k",
    "M",
    "g",
    "2",
    "4096",
    "18446744073709551615",
    "+1",
    " ",
    "=",
    "\t",
    "thinvisor.elf",
    "x=y",
    "é",
];

fn soup(u: &mut Unstructured<'_>) -> Result<String> {
    let mut s = String::new();
    for _ in 0..u.int_in_range(0u8..=24)? {
        if u.ratio(1u8, 6u8)? {
            s.push_str(&u.int_in_range(0u64..=5000)?.to_string());
        } else {
            s.push_str(u.choose(WORDS)?);
        }
    }
    Ok(s)
}

/// `o` as a command line.
fn render(o: &Options) -> String {
    let boot = match o.boot {
        BootMode::Module => "module",
        BootMode::Linux => "linux",
        BootMode::Chain => "chain",
    };
    let layout = match o.layout {
        Layout::Isolated => "isolated",
        Layout::Passthrough => "passthrough",
    };
    let efer = match o.efer {
        EferMode::Auto => "auto",
        EferMode::MsrArea => "msr-area",
    };
    format!(
        "thinvisor.elf log={} guest={} guest_mem={} efer={efer} boot={boot} layout={layout} dbgsh={}",
        o.log_level.to_string().to_lowercase(),
        o.guest_module,
        o.guest_mem,
        if o.dbgsh { "on" } else { "off" }
    )
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = if mode & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        match soup(&mut Unstructured::new(rest)) {
            Ok(s) => s,
            Err(_) => return,
        }
    };
    let words: Vec<&str> = text.split_ascii_whitespace().collect();
    let mut warned = Vec::new();
    let r = cmdline::parse(&text, &mut |token, _| warned.push(token.to_string()));
    for t in &warned {
        assert!(
            t.contains('=') && words.contains(&t.as_str()),
            "warned about {t:?}"
        );
    }
    match r {
        Ok(o) => {
            assert!(o.guest_mem >= GUEST_MEM_GRANULE && o.guest_mem <= GUEST_MEM_MAX);
            assert_eq!(o.guest_mem % GUEST_MEM_GRANULE, 0);
            if o.boot != BootMode::Module {
                assert_eq!(o.layout, Layout::Passthrough);
            }
            let line = render(&o);
            let again = cmdline::parse(&line, &mut |t, why| panic!("{line:?}: {t} {why}"));
            assert_eq!(again.ok(), Some(o), "{text:?} -> {line:?}");
            let noisy = format!("vmlinuz {text} quiet");
            assert_eq!(cmdline::parse(&noisy, &mut |_, _| {}).ok(), Some(o));
        }
        Err(e) => {
            assert!(words.contains(&e.token), "error token {:?}", e.token);
            assert!(!e.to_string().is_empty());
        }
    }
});
