//! What `cargo xtask bench` makes of its measurements: the figures of
//! issue 11's table against their targets, written as
//! `target/bench/results.json`, `target/bench/report.md`,
//! `target/bench/exits.svg` and `target/bench/linux-exits.svg`, and the
//! regression gate that compares the
//! per-exit instruction counts with the baseline committed in
//! `bench/baseline.json`.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

use crate::util::Result;

/// Vendor keys, as they appear in results.json and the baseline.
pub const SVM: &str = "svm";
pub const VMX: &str = "vmx";
/// A figure that is not tied to one vendor's extension.
pub const ANY: &str = "any";

/// The unit of every exit round trip (and the only unit the gate checks).
pub const INSTRUCTIONS: &str = "instructions";

/// A per-exit figure may grow by this fraction before the gate fails.
pub const TOLERANCE: f64 = 0.10;

/// Where the committed baseline lives, from the workspace root.
pub const BASELINE: &str = "bench/baseline.json";

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    AtMost,
    AtLeast,
}

/// A target of issue 11's table: the value must be at most (or at least)
/// this.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    pub op: Op,
    pub value: f64,
}

impl Target {
    const fn at_most(value: f64) -> Option<Target> {
        Some(Target {
            op: Op::AtMost,
            value,
        })
    }

    const fn at_least(value: f64) -> Option<Target> {
        Some(Target {
            op: Op::AtLeast,
            value,
        })
    }

    pub fn met(&self, value: f64) -> bool {
        match self.op {
            Op::AtMost => value <= self.value,
            Op::AtLeast => value >= self.value,
        }
    }

    fn op_str(&self) -> &'static str {
        match self.op {
            Op::AtMost => "<=",
            Op::AtLeast => ">=",
        }
    }

    fn show(&self, unit: &str) -> String {
        let op = match self.op {
            Op::AtMost => "≤",
            Op::AtLeast => "≥",
        };
        format!("{op} {}", show_value(self.value, unit))
    }
}

/// One figure of the report: measured (`value`) or not (`note` says why).
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// A stable key: the bench guest's loop name for exit round trips.
    pub name: String,
    /// [`SVM`], [`VMX`] or [`ANY`].
    pub vendor: String,
    /// What it is, for people.
    pub label: String,
    pub value: Option<f64>,
    pub unit: String,
    pub target: Option<Target>,
    /// BitVisor's figure on the same emulator, where there is one.
    pub bitvisor: Option<f64>,
    /// Why there is no value.
    pub note: String,
}

impl Figure {
    pub fn met(&self) -> Option<bool> {
        Some(self.target?.met(self.value?))
    }

    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "vendor": self.vendor,
            "label": self.label,
            "value": self.value,
            "unit": self.unit,
            "target": self.target.map(|t| json!({"op": t.op_str(), "value": t.value})),
            "met": self.met(),
            "bitvisor": self.bitvisor,
            "note": if self.note.is_empty() { Value::Null } else { json!(self.note) },
        })
    }
}

/// A row of issue 11's table.
struct Spec {
    name: &'static str,
    vendor: &'static str,
    label: &'static str,
    unit: &'static str,
    target: Option<Target>,
    bitvisor: Option<f64>,
}

/// BitVisor's figures on the same emulator (TESTING notes, README's
/// Benchmarks): the anchors the exit-path costs are compared with.
pub const BITVISOR_CPUID_EXIT: f64 = 351.0;
pub const BITVISOR_LOOKUP: f64 = 23_170.0;

/// Where the bench guest's figures sit among the other exits.
pub const COPY_BYTE_OVER_PAGE: &str = "copy_64k_byte_over_page";
pub const COPY_PAGE_OVER_MEMCPY: &str = "copy_64k_page_over_memcpy";

/// Issue 11's targets, in the issue's order.
const SPECS: &[Spec] = &[
    Spec {
        name: "cpuid_exit",
        vendor: SVM,
        label: "CPUID exit",
        unit: INSTRUCTIONS,
        target: Target::at_most(100.0),
        bitvisor: Some(BITVISOR_CPUID_EXIT),
    },
    Spec {
        name: "cpuid_exit",
        vendor: VMX,
        label: "CPUID exit",
        unit: INSTRUCTIONS,
        target: Target::at_most(130.0),
        bitvisor: None,
    },
    Spec {
        name: "lookup_dbgsh",
        vendor: SVM,
        label: "function-0 lookup of `dbgsh`, 64-bit paged guest",
        unit: INSTRUCTIONS,
        target: Target::at_most(300.0),
        bitvisor: Some(BITVISOR_LOOKUP),
    },
    Spec {
        name: "lookup_dbgsh",
        vendor: VMX,
        label: "function-0 lookup of `dbgsh`, 64-bit paged guest",
        unit: INSTRUCTIONS,
        target: Target::at_most(360.0),
        bitvisor: None,
    },
    Spec {
        name: "lookup_dbgsh_paging_off",
        vendor: SVM,
        label: "function-0 lookup of `dbgsh`, guest with paging off",
        unit: INSTRUCTIONS,
        target: Target::at_most(200.0),
        bitvisor: None,
    },
    Spec {
        name: "lookup_dbgsh_paging_off",
        vendor: VMX,
        label: "function-0 lookup of `dbgsh`, guest with paging off",
        unit: INSTRUCTIONS,
        target: Target::at_most(200.0),
        bitvisor: None,
    },
    Spec {
        name: "dbgsh_poll",
        vendor: SVM,
        label: "a function call that returns at once (dbgsh poll)",
        unit: INSTRUCTIONS,
        target: Target::at_most(110.0),
        bitvisor: None,
    },
    Spec {
        name: "linux_user_lookup_loop",
        vendor: ANY,
        label: "Linux user program under thinvisor: one lookup, whole loop iteration",
        unit: INSTRUCTIONS,
        target: Target::at_most(460.0),
        bitvisor: Some(23_184.0),
    },
    Spec {
        name: "linux_user_cpuid_loop",
        vendor: ANY,
        label: "Linux user program under thinvisor: one CPUID, whole loop iteration",
        unit: INSTRUCTIONS,
        target: Target::at_most(129.0),
        bitvisor: Some(362.9),
    },
    Spec {
        name: "linux_boot_ratio",
        vendor: ANY,
        label: "Linux boot to the init marker under thinvisor vs bare",
        unit: "x",
        target: Target::at_most(1.03),
        bitvisor: Some(1.1),
    },
    Spec {
        name: "memory_reserved_2cpus",
        vendor: ANY,
        label: "memory thinvisor reserves, 2 CPUs",
        unit: "MiB",
        target: Target::at_most(16.0),
        bitvisor: Some(128.0),
    },
    Spec {
        name: COPY_BYTE_OVER_PAGE,
        vendor: ANY,
        label: "bulk guest-virtual copy, 64 KiB: per-byte / page-by-page instructions",
        unit: "x",
        target: Target::at_least(100.0),
        bitvisor: None,
    },
    Spec {
        name: COPY_PAGE_OVER_MEMCPY,
        vendor: ANY,
        label: "bulk guest-virtual copy, 64 KiB: page-by-page / memcpy instructions",
        unit: "x",
        target: Target::at_most(2.0),
        bitvisor: None,
    },
];

/// Labels of the exit loops the issue's table does not name.
fn exit_label(name: &str) -> &str {
    match name {
        "cpuid_exit" => "CPUID exit",
        "lookup_dbgsh" => "function-0 lookup of `dbgsh`, 64-bit paged guest",
        "lookup_dbgsh_paging_off" => "function-0 lookup of `dbgsh`, guest with paging off",
        "lookup_255_chars" => "function-0 lookup of a 255-character name",
        "dbgsh_poll" => "a function call that returns at once (dbgsh poll)",
        "lookup_dbgsh_other_insn" => "lookup of `dbgsh` with the other vendor's instruction (#UD)",
        other => other,
    }
}

/// One processor's exit table, as thinvisor logs it when the run ends
/// (`VM exits on CPU N: T in all`, then a line per reason).
#[derive(Debug, Clone, PartialEq)]
pub struct CpuExits {
    pub cpu: u32,
    pub total: u64,
    /// (reason, count), most frequent first, as logged.
    pub reasons: Vec<(String, u64)>,
}

/// What the Linux boots of `cargo xtask bench` measured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LinuxMeasured {
    /// Instructions per whole loop iteration of a user program's function-0
    /// lookup of `dbgsh` and of its CPUID, and of the same loops with a NOP
    /// in place of the exiting instruction.
    pub lookup_loop: f64,
    pub lookup_nop_loop: f64,
    pub cpuid_loop: f64,
    pub cpuid_nop_loop: f64,
    /// The guest's TSC at the init marker (instructions since reset under
    /// `-icount shift=0`), one per run, bare and under thinvisor, the runs
    /// alternated.
    pub boot_bare: Vec<u64>,
    pub boot_thinvisor: Vec<u64>,
    /// The processors of the boots that count instructions.
    pub boot_cpus: u32,
    /// The block thinvisor reserves, in KiB, on a 2-CPU Linux boot, and
    /// how much of its heap the guest's setup took (its log says both).
    pub reserved_kib: u64,
    pub heap_used_kib: Option<u64>,
    /// The exit tables of that 2-CPU boot, one per processor.
    pub exits: Vec<CpuExits>,
}

impl LinuxMeasured {
    fn mean(runs: &[u64]) -> Option<f64> {
        (!runs.is_empty()).then(|| runs.iter().map(|&v| v as f64).sum::<f64>() / runs.len() as f64)
    }

    /// Instructions to the marker under thinvisor over bare, the means of
    /// the runs.
    pub fn boot_ratio(&self) -> Option<f64> {
        Some(Self::mean(&self.boot_thinvisor)? / Self::mean(&self.boot_bare)?)
    }

    /// The largest difference between two runs of the same boot, relative
    /// to the smaller: how reproducible the instruction counts are.
    pub fn boot_spread(&self) -> Option<f64> {
        [&self.boot_bare, &self.boot_thinvisor]
            .iter()
            .map(|runs| {
                let min = *runs.iter().min()? as f64;
                let max = *runs.iter().max()? as f64;
                (min > 0.0).then(|| max / min - 1.0)
            })
            .try_fold(0.0f64, |acc, s| Some(acc.max(s?)))
    }
}

/// Everything one bench run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// Instructions per exit round trip, by loop name, on SVM and VT-x;
    /// None when the run did not measure exits.
    pub svm: Option<Vec<(String, f64)>>,
    pub vmx: Option<Vec<(String, f64)>>,
    /// 64 KiB copy instruction ratios (per-byte / page, page / memcpy);
    /// Err says why there are none.
    pub copy: std::result::Result<(f64, f64), String>,
    /// The Linux figures; Err says why there are none.
    pub linux: std::result::Result<LinuxMeasured, String>,
}

impl Default for Measured {
    fn default() -> Measured {
        Measured {
            svm: None,
            vmx: None,
            copy: Err("not measured in this run".into()),
            linux: Err("not measured in this run".into()),
        }
    }
}

/// Issue 11's targets that the Linux boots measure.
const LINUX_TARGETS: &[&str] = &[
    "linux_user_lookup_loop",
    "linux_user_cpuid_loop",
    "linux_boot_ratio",
    "memory_reserved_2cpus",
];

/// The Linux figures that are not issue 11's targets but tell where they
/// come from: (name, label, unit).
const LINUX_EXTRAS: &[(&str, &str, &str)] = &[
    (
        "linux_boot_instructions_bare",
        "Linux boot to the init marker, bare (guest TSC under -icount shift=0)",
        INSTRUCTIONS,
    ),
    (
        "linux_boot_instructions_thinvisor",
        "Linux boot to the init marker under thinvisor (guest TSC under -icount shift=0)",
        INSTRUCTIONS,
    ),
    (
        "linux_boot_run_spread",
        "Linux boot instructions: largest difference between two runs of the same boot",
        "%",
    ),
    (
        "linux_user_lookup_nop_loop",
        "Linux user program: the lookup loop with a NOP in place of the call",
        INSTRUCTIONS,
    ),
    (
        "linux_user_cpuid_nop_loop",
        "Linux user program: the CPUID loop with a NOP in place of CPUID",
        INSTRUCTIONS,
    ),
    (
        "heap_used_2cpus",
        "thinvisor's heap used by a 2-CPU Linux guest's setup",
        "KiB",
    ),
];

/// The value of a Linux figure (a target's or one of [`LINUX_EXTRAS`]).
fn linux_value(l: &LinuxMeasured, name: &str) -> Option<f64> {
    match name {
        "linux_user_lookup_loop" => Some(l.lookup_loop),
        "linux_user_cpuid_loop" => Some(l.cpuid_loop),
        "linux_boot_ratio" => l.boot_ratio(),
        "memory_reserved_2cpus" => Some(l.reserved_kib as f64 / 1024.0),
        "linux_boot_instructions_bare" => LinuxMeasured::mean(&l.boot_bare),
        "linux_boot_instructions_thinvisor" => LinuxMeasured::mean(&l.boot_thinvisor),
        "linux_boot_run_spread" => l.boot_spread().map(|s| s * 100.0),
        "linux_user_lookup_nop_loop" => Some(l.lookup_nop_loop),
        "linux_user_cpuid_nop_loop" => Some(l.cpuid_nop_loop),
        "heap_used_2cpus" => l.heap_used_kib.map(|k| k as f64),
        _ => None,
    }
}

/// Why a figure of the issue's table has no value in this run.
const NOT_YET: &str = "not measured yet";

/// The report's figures: the issue's targets first, then every other
/// exit loop the bench guest measured.
pub fn figures(m: &Measured) -> Vec<Figure> {
    let exits = |vendor: &str| match vendor {
        SVM => m.svm.as_deref(),
        VMX => m.vmx.as_deref(),
        _ => None,
    };
    let mut out = Vec::new();
    for s in SPECS {
        let (value, note) = if s.unit == INSTRUCTIONS && s.vendor != ANY {
            match exits(s.vendor) {
                Some(list) => match list.iter().find(|(n, _)| n == s.name) {
                    Some((_, v)) => (Some(*v), String::new()),
                    None => (None, "the bench guest printed no such loop".into()),
                },
                None => (
                    None,
                    "not measured in this run (`cargo xtask bench` and `--quick` measure it)"
                        .into(),
                ),
            }
        } else if s.name == COPY_BYTE_OVER_PAGE || s.name == COPY_PAGE_OVER_MEMCPY {
            match &m.copy {
                Ok((byte, memcpy)) => {
                    let v = if s.name == COPY_BYTE_OVER_PAGE {
                        *byte
                    } else {
                        *memcpy
                    };
                    (Some(v), String::new())
                }
                Err(why) => (None, why.clone()),
            }
        } else if LINUX_TARGETS.contains(&s.name) {
            match &m.linux {
                Ok(l) => match linux_value(l, s.name) {
                    Some(v) => (Some(v), String::new()),
                    None => (None, "the Linux boots gave no value".into()),
                },
                Err(why) => (None, why.clone()),
            }
        } else {
            (None, NOT_YET.into())
        };
        out.push(Figure {
            name: s.name.into(),
            vendor: s.vendor.into(),
            label: s.label.into(),
            value,
            unit: s.unit.into(),
            target: s.target,
            bitvisor: s.bitvisor,
            note,
        });
    }
    if let Ok(l) = &m.linux {
        for &(name, label, unit) in LINUX_EXTRAS {
            if let Some(v) = linux_value(l, name) {
                out.push(Figure {
                    name: name.into(),
                    vendor: ANY.into(),
                    label: label.into(),
                    value: Some(v),
                    unit: unit.into(),
                    target: None,
                    bitvisor: None,
                    note: String::new(),
                });
            }
        }
    }
    for vendor in [SVM, VMX] {
        for (name, v) in exits(vendor).unwrap_or_default() {
            if out.iter().any(|f| &f.name == name && f.vendor == vendor) {
                continue;
            }
            out.push(Figure {
                name: name.clone(),
                vendor: vendor.into(),
                label: exit_label(name).into(),
                value: Some(*v),
                unit: INSTRUCTIONS.into(),
                target: None,
                bitvisor: None,
                note: String::new(),
            });
        }
    }
    out
}

/// Where and how the figures were measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunInfo {
    /// The command that reproduces the run.
    pub command: String,
    /// `git describe`-like revision of the tree.
    pub commit: String,
    /// `qemu-system-x86_64 --version`'s first line, Bochs' log's version line.
    pub qemu: Option<String>,
    pub bochs: Option<String>,
}

pub fn results_json(info: &RunInfo, figures: &[Figure], linux: Option<&LinuxMeasured>) -> String {
    let v = json!({
        "command": info.command,
        "commit": info.commit,
        "emulators": {"qemu": info.qemu, "bochs": info.bochs},
        "figures": figures.iter().map(Figure::to_json).collect::<Vec<_>>(),
        "linux": linux.map(linux_json),
    });
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}

/// The Linux boots' details: every run's instruction count and the exit
/// tables.
fn linux_json(l: &LinuxMeasured) -> Value {
    json!({
        "boot_to_marker": {
            "unit": INSTRUCTIONS,
            "cpus": l.boot_cpus,
            "bare": l.boot_bare,
            "thinvisor": l.boot_thinvisor,
        },
        "reserved_kib": l.reserved_kib,
        "heap_used_kib": l.heap_used_kib,
        "exits": l.exits.iter().map(|c| json!({
            "cpu": c.cpu,
            "total": c.total,
            "reasons": c.reasons.iter()
                .map(|(r, n)| json!({"reason": r, "count": n}))
                .collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// Bochs' version from its log (`...i[      ] Bochs x86 Emulator 2.7`).
pub fn bochs_version(log: &str) -> Option<String> {
    log.lines().find_map(|l| {
        let at = l.find("Bochs x86 Emulator")?;
        Some(l[at..].trim().to_string())
    })
}

/// 223.0022 -> "223", 23170.0 -> "23,170", 1534.02 -> "1,534",
/// 362.9 -> "362.9", 1.03 -> "1.03": one decimal at most (two below 10),
/// thousands separated.
pub fn show_number(v: f64) -> String {
    let decimals = if v.abs() < 10.0 { 2 } else { 1 };
    let text = format!("{:.*}", decimals, v.abs());
    let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
    let frac = frac.trim_end_matches('0');
    let mut out = String::new();
    if v < 0.0 && text.chars().any(|c| c.is_ascii_digit() && c != '0') {
        out.push('-');
    }
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    out
}

fn show_value(v: f64, unit: &str) -> String {
    match unit {
        "x" => format!("{}×", show_number(v)),
        "" => show_number(v),
        unit => format!("{} {unit}", show_number(v)),
    }
}

fn show_vendor(vendor: &str) -> &str {
    match vendor {
        SVM => "SVM",
        VMX => "VT-x",
        _ => "–",
    }
}

fn show_met(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "**yes**",
        Some(false) => "no",
        None => "–",
    }
}

/// The baseline: per-exit instruction counts and why they were set.
#[derive(Debug, Clone, PartialEq)]
pub struct Baseline {
    pub why: String,
    pub figures: Vec<(String, String, f64)>,
}

/// Reads a baseline (or a results.json: the same `figures` objects):
/// every figure with a value in instructions.
pub fn parse_baseline(text: &str) -> Result<Baseline> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let list = v["figures"]
        .as_array()
        .ok_or("no `figures` array in the baseline")?;
    let mut figures = Vec::new();
    for f in list {
        let name = f["name"].as_str().ok_or("a figure without a name")?;
        let vendor = f["vendor"].as_str().ok_or("a figure without a vendor")?;
        let unit = f["unit"].as_str().unwrap_or(INSTRUCTIONS);
        // The gate is for exit round trips, which have a vendor; a
        // results.json also holds the Linux figures, which do not.
        if unit != INSTRUCTIONS || vendor == ANY {
            continue;
        }
        if let Some(value) = f["value"].as_f64() {
            figures.push((name.to_string(), vendor.to_string(), value));
        }
    }
    if figures.is_empty() {
        return Err("the baseline holds no per-exit figure".into());
    }
    Ok(Baseline {
        why: v["why"].as_str().unwrap_or("").to_string(),
        figures,
    })
}

/// A baseline file from this run's per-exit figures.
pub fn baseline_json(why: &str, info: &RunInfo, figures: &[Figure]) -> String {
    let list: Vec<Value> = figures
        .iter()
        .filter(|f| f.unit == INSTRUCTIONS && f.vendor != ANY)
        .filter_map(|f| {
            Some(json!({
                "name": f.name,
                "vendor": f.vendor,
                "value": f.value?,
                "unit": INSTRUCTIONS,
            }))
        })
        .collect();
    let v = json!({
        "why": why,
        "measured": format!("`{}` at {}", info.command, info.commit),
        "tolerance": format!("the gate fails when a figure exceeds its baseline by more than {:.0}%", TOLERANCE * 100.0),
        "figures": list,
    });
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Within the tolerance (or better).
    Ok,
    /// More than the tolerance above the baseline.
    Regressed,
    /// The run did not measure it.
    Missing,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub name: String,
    pub vendor: String,
    pub baseline: f64,
    pub now: Option<f64>,
    pub verdict: Verdict,
}

impl Comparison {
    /// Relative change against the baseline (+0.05 = 5% more instructions).
    pub fn change(&self) -> Option<f64> {
        Some(self.now? / self.baseline - 1.0)
    }
}

/// Each baseline figure against this run's.
pub fn gate(baseline: &Baseline, figures: &[Figure]) -> Vec<Comparison> {
    baseline
        .figures
        .iter()
        .map(|(name, vendor, base)| {
            let now = figures
                .iter()
                .find(|f| &f.name == name && &f.vendor == vendor && f.unit == INSTRUCTIONS)
                .and_then(|f| f.value);
            let verdict = match now {
                None => Verdict::Missing,
                Some(v) if v > base * (1.0 + TOLERANCE) + 1e-9 => Verdict::Regressed,
                Some(_) => Verdict::Ok,
            };
            Comparison {
                name: name.clone(),
                vendor: vendor.clone(),
                baseline: *base,
                now,
                verdict,
            }
        })
        .collect()
}

pub fn gate_passed(rows: &[Comparison]) -> bool {
    rows.iter().all(|r| r.verdict == Verdict::Ok)
}

fn show_change(c: &Comparison) -> String {
    c.change()
        .map_or("–".into(), |d| format!("{:+.1}%", d * 100.0))
}

fn show_verdict(v: Verdict) -> &'static str {
    match v {
        Verdict::Ok => "ok",
        Verdict::Regressed => "REGRESSED",
        Verdict::Missing => "MISSING",
    }
}

/// The gate's lines for the terminal: both numbers for every figure.
pub fn gate_text(rows: &[Comparison]) -> String {
    let mut s = format!(
        "regression gate against {BASELINE} (fails above +{:.0}%):\n",
        TOLERANCE * 100.0
    );
    for r in rows {
        let now = r.now.map_or("-".into(), show_number);
        let _ = writeln!(
            s,
            "  {:<24} {:<5} now {:>8}, baseline {:>8} ({:>7}) {}",
            r.name,
            show_vendor(&r.vendor),
            now,
            show_number(r.baseline),
            show_change(r),
            show_verdict(r.verdict)
        );
    }
    s
}

/// The gate's outcome for report.md: the baseline or why there is none.
pub type GateOutcome = std::result::Result<(Baseline, Vec<Comparison>), String>;

/// `target/bench/report.md`.
pub fn report_md(
    info: &RunInfo,
    figures: &[Figure],
    linux: Option<&LinuxMeasured>,
    gate: Option<&GateOutcome>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# thinvisor benchmark report\n");
    let _ = writeln!(
        s,
        "Made by `{}` at commit {}; `cargo xtask bench` measures every figure, \
         `cargo xtask bench --quick` only the exit round trips.\n",
        info.command, info.commit
    );
    let _ = writeln!(
        s,
        "Exit round trips are counted in instructions: the test guest's bench mode times \
         each loop with the guest's TSC, which advances by one per executed instruction \
         (QEMU `-icount shift=0` for AMD SVM, Bochs `clock: sync=none` for Intel VT-x; a \
         calibration loop checks it), minus the same loop with a NOP in place of the \
         exiting instruction. The copy ratios are callgrind instruction counts.\n"
    );
    let _ = writeln!(s, "Emulators:\n");
    let _ = writeln!(s, "- QEMU: {}", info.qemu.as_deref().unwrap_or("not run"));
    let _ = writeln!(
        s,
        "- Bochs: {}\n",
        info.bochs.as_deref().unwrap_or("not run")
    );

    let _ = writeln!(s, "## Issue 11's targets\n");
    let _ = writeln!(
        s,
        "| figure | vendor | measured | target | met | BitVisor |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for f in figures.iter().filter(|f| f.target.is_some()) {
        let _ = writeln!(s, "{}", target_row(f));
    }

    let rows = exit_rows(figures);
    if !rows.is_empty() {
        exits_md(&mut s, rows);
    }
    if let Some(l) = linux {
        linux_md(&mut s, l);
    }

    let _ = writeln!(s, "## Regression gate\n");
    match gate {
        None => {
            let _ = writeln!(s, "Not run: this run measured no exit round trips.");
        }
        Some(Err(e)) => {
            let _ = writeln!(s, "No baseline to compare with: {e}.");
        }
        Some(Ok((baseline, rows))) => {
            let _ = writeln!(
                s,
                "Against `{BASELINE}` ({}); a figure fails above +{:.0}%: **{}**.\n",
                if baseline.why.is_empty() {
                    "no reason given"
                } else {
                    &baseline.why
                },
                TOLERANCE * 100.0,
                if gate_passed(rows) {
                    "passed"
                } else {
                    "FAILED"
                }
            );
            let _ = writeln!(s, "| exit | vendor | baseline | now | change | verdict |");
            let _ = writeln!(s, "|---|---|---|---|---|---|");
            for r in rows {
                let _ = writeln!(
                    s,
                    "| `{}` | {} | {} | {} | {} | {} |",
                    r.name,
                    show_vendor(&r.vendor),
                    show_number(r.baseline),
                    r.now.map_or("–".into(), show_number),
                    show_change(r),
                    show_verdict(r.verdict)
                );
            }
        }
    }
    let _ = writeln!(s, "\nReproduce: `{}`", info.command);
    s
}

/// report.md's table of every exit round trip.
fn exits_md(s: &mut String, rows: Vec<ExitRow>) {
    let _ = writeln!(s, "\n## Every exit round trip (instructions)\n");
    let _ = writeln!(s, "| exit | SVM | VT-x | BitVisor (SVM) |");
    let _ = writeln!(s, "|---|---|---|---|");
    for (name, svm, vmx, bitvisor) in rows {
        let show = |v: Option<f64>| v.map_or("–".into(), show_number);
        let _ = writeln!(
            s,
            "| {} (`{name}`) | {} | {} | {} |",
            exit_label(&name),
            show(svm),
            show(vmx),
            bitvisor.map_or(String::new(), |b| format!("~{}", show_number(b)))
        );
    }
    let _ = writeln!(s, "\n![instructions per exit round trip](exits.svg)\n");
}

/// A boot ratio to four decimals (a 1% target needs more than two).
fn show_ratio(r: f64) -> String {
    format!("{r:.4}×")
}

/// report.md's section on the Linux boots.
fn linux_md(s: &mut String, l: &LinuxMeasured) {
    let _ = writeln!(s, "## Linux under thinvisor\n");
    let _ = writeln!(
        s,
        "Debian's kernel and the test initramfs on QEMU (AMD SVM, `-cpu max`, 512 MiB). \
         Instructions are the guest's TSC under `-icount shift=0,sleep=off` ({} CPU: QEMU's \
         icount mode does not get Linux's second processor started: it waits in `cpu_init` for \
         the boot processor's go-ahead, bare or not), which also counts \
         the time the processors sleep, at one tick per nanosecond.\n",
        l.boot_cpus
    );
    let _ = writeln!(
        s,
        "### Boot to the init marker\n\nThe TSC since reset when `/init` has printed its marker \
         (BIOS, loader and, under thinvisor, thinvisor's own start included), the same kernel, \
         initramfs and kernel command line, bare and under thinvisor (`{}`), the runs \
         alternated:\n",
        crate::linux::LINUX_HV_ARGS
    );
    let _ = writeln!(s, "| run | bare | under thinvisor | ratio |");
    let _ = writeln!(s, "|---|---|---|---|");
    for (i, (b, t)) in l.boot_bare.iter().zip(&l.boot_thinvisor).enumerate() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            i + 1,
            show_number(*b as f64),
            show_number(*t as f64),
            show_ratio(*t as f64 / *b as f64)
        );
    }
    if let (Some(b), Some(t), Some(r)) = (
        LinuxMeasured::mean(&l.boot_bare),
        LinuxMeasured::mean(&l.boot_thinvisor),
        l.boot_ratio(),
    ) {
        let _ = writeln!(
            s,
            "| mean | {} | {} | **{}** |",
            show_number(b.round()),
            show_number(t.round()),
            show_ratio(r)
        );
    }
    if let Some(spread) = l.boot_spread() {
        let _ = writeln!(
            s,
            "\nRuns of the same boot differ by at most {:.3}% ({} 1%).",
            spread * 100.0,
            if spread <= 0.01 {
                "within"
            } else {
                "NOT within"
            }
        );
    }
    let _ = writeln!(
        s,
        "\n### Exits from a user program\n\n`vmmbench loops` (guest-tools), pinned to CPU 0: \
         TSC ticks per loop iteration, the cheapest of 16 batches (one no interrupt hit); \
         the whole iteration is issue 11's figure, the NOP loop (the exiting instruction \
         replaced by a NOP) is for information.\n"
    );
    let _ = writeln!(s, "| loop | whole iteration | with a NOP | difference |");
    let _ = writeln!(s, "|---|---|---|---|");
    for (name, whole, nop) in [
        (
            "function-0 lookup of `dbgsh`",
            l.lookup_loop,
            l.lookup_nop_loop,
        ),
        ("CPUID", l.cpuid_loop, l.cpuid_nop_loop),
    ] {
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} |",
            show_number(whole),
            show_number(nop),
            show_number(whole - nop)
        );
    }
    let _ = writeln!(
        s,
        "\n### Memory\n\nthinvisor reserves {} KiB ({} MiB) on a 2-CPU Linux boot (its log's \
         `thinvisor reserves` line: the block it takes from the E820 map and hides){}.\n",
        l.reserved_kib,
        show_number(l.reserved_kib as f64 / 1024.0),
        l.heap_used_kib.map_or(String::new(), |k| format!(
            "; the guest's setup used {k} KiB of its heap"
        ))
    );
    let _ = writeln!(
        s,
        "### Exits of a 2-CPU Linux boot\n\nthinvisor's exit tables at the power-off of a \
         boot to the init marker (`thinvisor.bench=boot`, no icount):\n"
    );
    let mut head = String::from("| reason |");
    let mut rule = String::from("|---|");
    for c in &l.exits {
        let _ = write!(head, " CPU {} |", c.cpu);
        rule += "---|";
    }
    let _ = writeln!(s, "{head} all |\n{rule}---|");
    for (reason, per_cpu, all) in exit_reason_rows(&l.exits) {
        let mut row = format!("| {reason} |");
        for n in per_cpu {
            let _ = write!(row, " {} |", show_number(n as f64));
        }
        let _ = writeln!(s, "{row} {} |", show_number(all as f64));
    }
    let mut total = String::from("| **all** |");
    for c in &l.exits {
        let _ = write!(total, " **{}** |", show_number(c.total as f64));
    }
    let all: u64 = l.exits.iter().map(|c| c.total).sum();
    let _ = writeln!(s, "{total} **{}** |", show_number(all as f64));
    let _ = writeln!(
        s,
        "\n![exits per reason of a Linux boot](linux-exits.svg)\n"
    );
}

/// One row per exit reason of any processor: (reason, count per
/// processor, in the tables' order, and in all), most frequent first.
pub fn exit_reason_rows(tables: &[CpuExits]) -> Vec<(String, Vec<u64>, u64)> {
    let mut rows: Vec<(String, Vec<u64>, u64)> = Vec::new();
    for (i, c) in tables.iter().enumerate() {
        for (reason, n) in &c.reasons {
            let at = match rows.iter().position(|r| &r.0 == reason) {
                Some(at) => at,
                None => {
                    rows.push((reason.clone(), vec![0; tables.len()], 0));
                    rows.len() - 1
                }
            };
            rows[at].1[i] += n;
            rows[at].2 += n;
        }
    }
    rows.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    rows
}

fn target_row(f: &Figure) -> String {
    let measured = match f.value {
        // Its target is 3% above 1: two decimals would hide the figure.
        Some(v) if f.name == "linux_boot_ratio" => show_ratio(v),
        Some(v) => show_value(v, &f.unit),
        None => f.note.clone(),
    };
    format!(
        "| {} | {} | {} | {} | {} | {} |",
        f.label,
        show_vendor(&f.vendor),
        measured,
        f.target.map_or("–".into(), |t| t.show(&f.unit)),
        show_met(f.met()),
        f.bitvisor
            .map_or(String::new(), |b| format!("~{}", show_value(b, &f.unit)))
    )
}

/// One exit loop: (name, SVM, VT-x, BitVisor).
pub type ExitRow = (String, Option<f64>, Option<f64>, Option<f64>);

/// Every exit loop measured, in the order they were first seen.
pub fn exit_rows(figures: &[Figure]) -> Vec<ExitRow> {
    let mut rows: Vec<ExitRow> = Vec::new();
    for f in figures
        .iter()
        .filter(|f| f.unit == INSTRUCTIONS && f.vendor != ANY && f.value.is_some())
    {
        let at = match rows.iter().position(|r| r.0 == f.name) {
            Some(at) => at,
            None => {
                rows.push((f.name.clone(), None, None, None));
                rows.len() - 1
            }
        };
        let row = &mut rows[at];
        if f.vendor == SVM {
            row.1 = f.value;
        } else {
            row.2 = f.value;
        }
        if f.bitvisor.is_some() {
            row.3 = f.bitvisor;
        }
    }
    rows
}

/// One series of a [`GroupedBars`] chart: a bar in every group that has
/// a value.
struct BarSeries {
    label: String,
    color: plotters::style::RGBColor,
    values: Vec<Option<f64>>,
}

/// A log-scale bar chart with one group of bars per name and a bar per
/// series in each group, each bar labelled with its value: both charts of
/// the report.
struct GroupedBars<'a> {
    caption: &'a str,
    y_desc: &'a str,
    /// The bottom of the log scale (bars start there).
    floor: f64,
    groups: Vec<String>,
    series: Vec<BarSeries>,
    /// Font size of the value labels.
    label_size: u32,
    /// Margin on each side of a bar, in pixels.
    bar_margin: u32,
}

impl GroupedBars<'_> {
    fn draw(&self, path: &Path) -> Result {
        use plotters::prelude::*;
        use plotters::style::text_anchor::{HPos, Pos, VPos};

        let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
        // Slots per group: one per series, a gap; names under the middle.
        let slots = self.series.len() as u32 + 1;
        let middle = (slots - 1) / 2;
        let n = self.groups.len() as u32;
        let top = self
            .series
            .iter()
            .flat_map(|s| s.values.iter().flatten())
            .fold(self.floor * 20.0, |a, &b| a.max(b))
            * 3.0;
        let root = SVGBackend::new(path, (1100, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(self.caption, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (0u32..n * slots).into_segmented(),
                (self.floor..top).log_scale(),
            )
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels((n * slots) as usize + 1)
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(slot) if slot % slots == middle => {
                    self.groups[(slot / slots) as usize].clone()
                }
                _ => String::new(),
            })
            .y_desc(self.y_desc)
            .y_label_formatter(&|v| show_number(v.round()))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, series) in self.series.iter().enumerate() {
            let color = series.color;
            let bars: Vec<(u32, f64)> = series
                .values
                .iter()
                .enumerate()
                .filter_map(|(g, v)| Some((g as u32 * slots + i as u32, (*v)?)))
                .collect();
            chart
                .draw_series(bars.iter().map(|&(slot, v)| {
                    let mut bar = Rectangle::new(
                        [
                            (SegmentValue::Exact(slot), self.floor),
                            (SegmentValue::Exact(slot + 1), v),
                        ],
                        color.filled(),
                    );
                    bar.set_margin(0, 0, self.bar_margin, self.bar_margin);
                    bar
                }))
                .map_err(|e| err(&e))?
                .label(series.label.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
            chart
                .draw_series(bars.iter().map(|&(slot, v)| {
                    Text::new(
                        show_number(v.round()),
                        (SegmentValue::CenterOf(slot), v * 1.15),
                        ("sans-serif", self.label_size)
                            .into_font()
                            .color(&BLACK)
                            .pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )
                }))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }
}

/// `target/bench/exits.svg`: instructions per exit kind, thinvisor on SVM
/// and VT-x beside BitVisor's figures (log scale: BitVisor's lookup is
/// over 20 times thinvisor's).
pub fn draw_exits_chart(path: &Path, figures: &[Figure]) -> Result {
    use plotters::style::RGBColor;

    let rows = exit_rows(figures);
    if rows.is_empty() {
        return Err("no exit figures to draw".into());
    }
    let column = |label: &str, color, pick: fn(&ExitRow) -> Option<f64>| BarSeries {
        label: label.into(),
        color,
        values: rows.iter().map(pick).collect(),
    };
    GroupedBars {
        caption: "instructions per exit round trip (lower is better)",
        y_desc: "instructions (log scale)",
        floor: 10.0,
        groups: rows.iter().map(|r| r.0.clone()).collect(),
        series: vec![
            column(
                "thinvisor, AMD SVM (QEMU -icount)",
                RGBColor(31, 119, 180),
                |r| r.1,
            ),
            column(
                "thinvisor, Intel VT-x (Bochs)",
                RGBColor(44, 160, 44),
                |r| r.2,
            ),
            column(
                "BitVisor, AMD SVM (same QEMU)",
                RGBColor(214, 39, 40),
                |r| r.3,
            ),
        ],
        label_size: 12,
        bar_margin: 2,
    }
    .draw(path)
}

/// `target/bench/linux-exits.svg`: a Linux boot's exits per reason, a bar
/// per processor (log scale: the reasons range from a handful to
/// thousands).
pub fn draw_linux_exits_chart(path: &Path, tables: &[CpuExits]) -> Result {
    use plotters::style::RGBColor;

    let rows = exit_reason_rows(tables);
    if rows.is_empty() {
        return Err("no exit table to draw".into());
    }
    const COLORS: [RGBColor; 4] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
    ];
    GroupedBars {
        caption: "VM exits per reason, Linux boot to its init under thinvisor (AMD SVM, QEMU)",
        y_desc: "exits (log scale)",
        floor: 0.5,
        groups: rows.iter().map(|r| r.0.clone()).collect(),
        series: tables
            .iter()
            .enumerate()
            .map(|(i, table)| BarSeries {
                label: format!(
                    "CPU {} ({} exits)",
                    table.cpu,
                    show_number(table.total as f64)
                ),
                color: COLORS[i % COLORS.len()],
                values: rows
                    .iter()
                    .map(|r| (r.1[i] > 0).then_some(r.1[i] as f64))
                    .collect(),
            })
            .collect(),
        label_size: 10,
        bar_margin: 1,
    }
    .draw(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured() -> Measured {
        Measured {
            svm: Some(vec![
                ("cpuid_exit".into(), 223.0),
                ("lookup_dbgsh".into(), 1079.0),
                ("dbgsh_poll".into(), 90.0),
                ("lookup_255_chars".into(), 1534.0),
            ]),
            vmx: Some(vec![
                ("cpuid_exit".into(), 328.0),
                ("lookup_dbgsh".into(), 1243.0),
            ]),
            copy: Err("not measured in this run (--quick)".into()),
            linux: Err("not measured in this run (--quick)".into()),
        }
    }

    fn linux() -> LinuxMeasured {
        LinuxMeasured {
            lookup_loop: 1085.0,
            lookup_nop_loop: 5.0,
            cpuid_loop: 229.0,
            cpuid_nop_loop: 5.0,
            boot_bare: vec![1_000_000_000, 1_001_000_000],
            boot_thinvisor: vec![1_020_000_000, 1_020_500_000],
            boot_cpus: 1,
            reserved_kib: 4096,
            heap_used_kib: Some(648),
            exits: vec![
                CpuExits {
                    cpu: 0,
                    total: 12003,
                    reasons: vec![("IOIO".into(), 12000), ("EXCP #UD".into(), 3)],
                },
                CpuExits {
                    cpu: 1,
                    total: 2455,
                    reasons: vec![("CPUID".into(), 2400), ("IOIO".into(), 55)],
                },
            ],
        }
    }

    fn find<'a>(f: &'a [Figure], name: &str, vendor: &str) -> &'a Figure {
        f.iter()
            .find(|x| x.name == name && x.vendor == vendor)
            .unwrap()
    }

    #[test]
    fn figures_follow_the_issue_and_never_invent() {
        let f = figures(&measured());
        let cpuid = find(&f, "cpuid_exit", SVM);
        assert_eq!(cpuid.value, Some(223.0));
        assert_eq!(cpuid.met(), Some(false));
        assert_eq!(cpuid.bitvisor, Some(351.0));
        assert_eq!(find(&f, "dbgsh_poll", SVM).met(), Some(true));
        // Not measured at all yet: no value, no verdict.
        for name in [
            "linux_boot_ratio",
            "memory_reserved_2cpus",
            "linux_user_lookup_loop",
            "linux_user_cpuid_loop",
        ] {
            let x = find(&f, name, ANY);
            assert_eq!((x.value, x.met()), (None, None), "{name}");
            let why = if name.contains("paging_off") {
                NOT_YET
            } else {
                "not measured in this run (--quick)"
            };
            assert_eq!(x.note, why, "{name}");
        }
        // Nor do the Linux extras appear.
        assert!(!f.iter().any(|x| x.name == "linux_boot_instructions_bare"));
        // Per vendor, from the bench guest's lines; none when it printed
        // no such loop.
        let off = find(&f, "lookup_dbgsh_paging_off", SVM);
        assert_eq!(off.target, Target::at_most(200.0));
        assert_eq!(find(&f, "lookup_dbgsh_paging_off", VMX).target, off.target);
        let copy = find(&f, COPY_BYTE_OVER_PAGE, ANY);
        assert_eq!(copy.value, None);
        assert!(copy.note.contains("--quick"));
        // Loops the issue does not name follow, without a target.
        let long = find(&f, "lookup_255_chars", SVM);
        assert_eq!((long.target, long.met()), (None, None));
        // A target's loop that the run did not print has no value.
        let m = Measured {
            vmx: Some(vec![]),
            ..measured()
        };
        let vmx_cpuid = figures(&m)
            .into_iter()
            .find(|x| x.name == "cpuid_exit" && x.vendor == VMX);
        assert_eq!(vmx_cpuid.and_then(|x| x.value), None);
        // A loop without a target that one vendor did not print is left out.
        assert!(!f.iter().any(|x| x.name == "dbgsh_poll" && x.vendor == VMX));
        assert!(!f
            .iter()
            .any(|x| x.name == "lookup_255_chars" && x.vendor == VMX));
    }

    #[test]
    fn copy_ratios_meet_targets_both_ways() {
        let m = Measured {
            copy: Ok((2315.0, 2.6)),
            ..Measured::default()
        };
        let f = figures(&m);
        assert_eq!(find(&f, COPY_BYTE_OVER_PAGE, ANY).met(), Some(true));
        assert_eq!(find(&f, COPY_PAGE_OVER_MEMCPY, ANY).met(), Some(false));
    }

    #[test]
    fn results_json_has_one_object_per_figure() {
        let f = figures(&measured());
        let info = RunInfo {
            command: "cargo xtask bench --quick".into(),
            commit: "abc1234".into(),
            qemu: Some("QEMU emulator version 7.2.22".into()),
            bochs: None,
        };
        let v: Value = serde_json::from_str(&results_json(&info, &f, None)).unwrap();
        let list = v["figures"].as_array().unwrap();
        assert_eq!(list.len(), f.len());
        let cpuid = &list[0];
        assert_eq!(cpuid["name"], "cpuid_exit");
        assert_eq!(cpuid["vendor"], "svm");
        assert_eq!(cpuid["value"], 223.0);
        assert_eq!(cpuid["unit"], "instructions");
        assert_eq!(cpuid["target"]["op"], "<=");
        assert_eq!(cpuid["target"]["value"], 100.0);
        assert_eq!(cpuid["met"], false);
        let boot = list
            .iter()
            .find(|x| x["name"] == "linux_boot_ratio")
            .unwrap();
        assert!(boot["value"].is_null() && boot["met"].is_null());
        assert_eq!(v["emulators"]["bochs"], Value::Null);
        // A results.json reads as a baseline too.
        let b = parse_baseline(&results_json(&info, &f, None)).unwrap();
        assert!(b
            .figures
            .contains(&("cpuid_exit".into(), "svm".into(), 223.0)));
        assert!(!b.figures.iter().any(|x| x.0 == "linux_boot_ratio"));
    }

    #[test]
    fn baseline_round_trips_and_rejects_junk() {
        let f = figures(&measured());
        let info = RunInfo {
            command: "cargo xtask bench --quick".into(),
            commit: "abc1234".into(),
            ..RunInfo::default()
        };
        let text = baseline_json("today's main", &info, &f);
        let b = parse_baseline(&text).unwrap();
        assert_eq!(b.why, "today's main");
        assert_eq!(b.figures.len(), 6);
        assert!(b
            .figures
            .contains(&("lookup_dbgsh".into(), "vmx".into(), 1243.0)));
        assert!(parse_baseline("{").is_err());
        assert!(parse_baseline(r#"{"figures": []}"#).is_err());
        assert!(parse_baseline(r#"{"figures": [{"vendor": "svm", "value": 1}]}"#).is_err());
    }

    #[test]
    fn gate_fails_only_above_ten_percent() {
        let baseline = Baseline {
            why: "x".into(),
            figures: vec![
                ("cpuid_exit".into(), SVM.into(), 200.0),
                ("cpuid_exit".into(), VMX.into(), 300.0),
                ("lookup_dbgsh".into(), SVM.into(), 1000.0),
            ],
        };
        let now = |svm_cpuid: f64, vmx_cpuid: f64| {
            figures(&Measured {
                svm: Some(vec![
                    ("cpuid_exit".into(), svm_cpuid),
                    ("lookup_dbgsh".into(), 1000.0),
                ]),
                vmx: Some(vec![("cpuid_exit".into(), vmx_cpuid)]),
                copy: Err(String::new()),
                linux: Err(String::new()),
            })
        };
        // +10% exactly passes, improvements pass.
        let rows = gate(&baseline, &now(220.0, 150.0));
        assert!(gate_passed(&rows), "{rows:?}");
        assert!((rows[1].change().unwrap() + 0.5).abs() < 1e-9);
        // +10.5% fails.
        let rows = gate(&baseline, &now(221.0, 300.0));
        assert!(!gate_passed(&rows));
        assert_eq!(rows[0].verdict, Verdict::Regressed);
        let text = gate_text(&rows);
        assert!(
            text.contains("now      221, baseline      200 ( +10.5%) REGRESSED"),
            "{text}"
        );
        // A figure the run did not measure fails too.
        let partial = figures(&Measured {
            svm: Some(vec![("cpuid_exit".into(), 200.0)]),
            ..Measured::default()
        });
        let rows = gate(&baseline, &partial);
        assert_eq!(rows[2].verdict, Verdict::Missing);
        assert!(!gate_passed(&rows));
    }

    #[test]
    fn formats_numbers_and_versions() {
        assert_eq!(show_number(23170.0), "23,170");
        assert_eq!(show_number(223.0), "223");
        assert_eq!(show_number(362.9), "362.9");
        assert_eq!(show_number(1.03), "1.03");
        assert_eq!(show_number(223.0022), "223");
        assert_eq!(show_number(1534.024), "1,534");
        assert_eq!(show_number(1.1), "1.1");
        assert_eq!(show_number(-0.001), "0");
        assert_eq!(show_number(-12.5), "-12.5");
        assert_eq!(show_value(2315.0, "x"), "2,315×");
        assert_eq!(show_value(16.0, "MiB"), "16 MiB");
        assert_eq!(Target::at_least(100.0).unwrap().show("x"), "≥ 100×");
        assert_eq!(
            bochs_version(
                "00000000000i[      ] Bochs x86 Emulator 2.7\n00000000000i[      ]   Built"
            ),
            Some("Bochs x86 Emulator 2.7".into())
        );
        assert_eq!(bochs_version("nothing"), None);
    }

    #[test]
    fn report_lists_targets_versions_and_gate() {
        let f = figures(&measured());
        let info = RunInfo {
            command: "cargo xtask bench --quick".into(),
            commit: "abc1234".into(),
            qemu: Some("QEMU emulator version 7.2.22".into()),
            bochs: Some("Bochs x86 Emulator 2.7".into()),
        };
        let baseline = parse_baseline(&baseline_json("why not", &info, &f)).unwrap();
        let rows = gate(&baseline, &f);
        let md = report_md(&info, &f, None, Some(&Ok((baseline, rows))));
        assert!(md.contains("| CPUID exit | SVM | 223 instructions | ≤ 100 instructions | no | ~351 instructions |"), "{md}");
        assert!(
            md.contains("| function-0 lookup of `dbgsh`, guest with paging off | SVM | the bench guest printed no such loop | ≤ 200 instructions | – |"),
            "{md}"
        );
        assert!(md.contains("| Linux boot to the init marker under thinvisor vs bare | – | not measured in this run (--quick) | ≤ 1.03× | – | ~1.1× |"), "{md}");
        assert!(md.contains("QEMU emulator version 7.2.22"));
        assert!(md.contains("Bochs x86 Emulator 2.7"));
        assert!(md.contains("(why not)") && md.contains("**passed**"));
        assert!(md.contains("| function-0 lookup of `dbgsh`, 64-bit paged guest (`lookup_dbgsh`) | 1,079 | 1,243 | ~23,170 |"), "{md}");
        assert!(md.contains("Reproduce: `cargo xtask bench --quick`"));
    }

    #[test]
    fn draws_the_chart() {
        let dir = std::env::temp_dir().join(format!("xtask-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("exits.svg");
        draw_exits_chart(&path, &figures(&measured())).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("lookup_dbgsh") && svg.contains("23,170"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(draw_exits_chart(&path, &[]).is_err());
    }

    #[test]
    fn linux_figures_fill_the_issue_rows() {
        let m = Measured {
            linux: Ok(linux()),
            ..Measured::default()
        };
        let f = figures(&m);
        let get = |name: &str| {
            f.iter()
                .find(|x| x.name == name && x.vendor == ANY)
                .unwrap_or_else(|| panic!("{name}"))
        };
        assert_eq!(get("linux_user_lookup_loop").value, Some(1085.0));
        assert_eq!(get("linux_user_lookup_loop").met(), Some(false));
        assert_eq!(get("linux_user_cpuid_loop").met(), Some(false));
        let ratio = get("linux_boot_ratio").value.unwrap();
        assert!((ratio - 2_040_500_000.0 / 2_001_000_000.0).abs() < 1e-12);
        assert_eq!(get("linux_boot_ratio").met(), Some(true));
        assert_eq!(get("memory_reserved_2cpus").value, Some(4.0));
        assert_eq!(get("memory_reserved_2cpus").met(), Some(true));
        assert_eq!(
            get("linux_boot_instructions_bare").value,
            Some(1_000_500_000.0)
        );
        let spread = get("linux_boot_run_spread").value.unwrap();
        assert!((spread - 0.1).abs() < 1e-9, "{spread}");
        assert_eq!(get("heap_used_2cpus").value, Some(648.0));
        // None of them is a per-exit figure for the gate.
        let json = results_json(&RunInfo::default(), &f, m.linux.as_ref().ok());
        assert!(parse_baseline(&json).is_err());
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["linux"]["boot_to_marker"]["bare"][1], 1_001_000_000u64);
        assert_eq!(v["linux"]["exits"][0]["reasons"][1]["reason"], "EXCP #UD");
        assert_eq!(v["linux"]["exits"][1]["total"], 2455);
        assert_eq!(v["linux"]["reserved_kib"], 4096);
    }

    #[test]
    fn linux_section_of_the_report() {
        let l = linux();
        let m = Measured {
            linux: Ok(l.clone()),
            ..Measured::default()
        };
        let md = report_md(&RunInfo::default(), &figures(&m), Some(&l), None);
        for line in [
            "| Linux boot to the init marker under thinvisor vs bare | – | 1.0197× | ≤ 1.03× | **yes** | ~1.1× |",
            "| memory thinvisor reserves, 2 CPUs | – | 4 MiB | ≤ 16 MiB | **yes** | ~128 MiB |",
            "| 1 | 1,000,000,000 | 1,020,000,000 | 1.0200× |",
            "| mean | 1,000,500,000 | 1,020,250,000 | **1.0197×** |",
            "Runs of the same boot differ by at most 0.100% (within 1%).",
            "| function-0 lookup of `dbgsh` | 1,085 | 5 | 1,080 |",
            "| reason | CPU 0 | CPU 1 | all |",
            "| IOIO | 12,000 | 55 | 12,055 |",
            "| CPUID | 0 | 2,400 | 2,400 |",
            "| EXCP #UD | 3 | 0 | 3 |",
            "| **all** | **12,003** | **2,455** | **14,458** |",
            "![exits per reason of a Linux boot](linux-exits.svg)",
        ] {
            assert!(md.contains(line), "{line}\n{md}");
        }
        let rows = exit_reason_rows(&l.exits);
        assert_eq!(rows[0], ("IOIO".to_string(), vec![12000, 55], 12055));
        assert_eq!(rows.len(), 3);
    }

    #[test]
    fn draws_the_linux_chart() {
        let dir = std::env::temp_dir().join(format!("xtask-linux-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("linux-exits.svg");
        draw_linux_exits_chart(&path, &linux().exits).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("IOIO") && svg.contains("CPU 1 (2,455 exits)")
        );
        assert!(svg.contains("12,000"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(draw_linux_exits_chart(&path, &[]).is_err());
    }
}
