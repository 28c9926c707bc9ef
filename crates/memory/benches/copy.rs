//! Bulk copy out of guest-linear memory, three ways (issue 4's benchmark),
//! driven by `cargo xtask bench`:
//!
//! - `page`: [`read_linear`], one walk per 4 KiB page (thinvisor's method);
//! - `byte`: one walk per byte, then a one-byte read (BitVisor's method);
//! - `memcpy`: `copy_from_slice` of as many bytes of contiguous host memory
//!   (the floor any method pays; guest memory itself is copied with atomic
//!   word loads, which the compiler may not turn into vector moves).
//!
//! The guest has 8 MiB of RAM and 4-level paging; the source range is
//! mapped with 4 KiB pages onto frames scattered over the upper 6 MiB in
//! shuffled order, so consecutive linear pages are not physically
//! adjacent and the copy cannot degenerate into one memcpy.
//!
//! `copy` (also as `cargo bench` runs it, with `--bench`) times every
//! method and size: calibration, warm-up, then samples; one line per
//! figure, `time METHOD SIZE MEDIAN_NS MIN_NS MAX_NS SAMPLES ITERS`, the
//! times being per copy. `copy once METHOD SIZE` makes one warm-up copy
//! and then one inside `bench_measured_copy`, for
//! `valgrind --tool=callgrind --toggle-collect=bench_measured_copy`
//! (instruction counts: repeatable, unlike wall time on a shared machine).

use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use thinvisor_memory::pagetable::{PageTables, RW, SIZE_4K};
use thinvisor_memory::{
    read_linear, translate, Access, GuestLinearAddr, GuestPhysMemory, IsolatedMemory, PagingMode,
    PagingRegs, TranslateError,
};

const RAM: usize = 8 << 20;
const TABLES: (u64, u64) = (0x10_0000, 0x20_0000);
const DATA: (u64, u64) = (0x20_0000, 0x80_0000);
/// Where the source range starts in the guest's linear space (a typical
/// user-space address).
const BASE: u64 = 0x7F3A_0000_0000;
const SIZES: [usize; 3] = [4 << 10, 64 << 10, 1 << 20];
const SAMPLES: usize = 31;
/// A sample lasts at least this long, well above the timer's resolution.
const SAMPLE_MIN: Duration = Duration::from_millis(8);
const WARM_UP: Duration = Duration::from_millis(60);

#[derive(Clone, Copy, Debug)]
enum Method {
    Page,
    Byte,
    Memcpy,
}

const METHODS: [Method; 3] = [Method::Page, Method::Byte, Method::Memcpy];

impl Method {
    fn name(self) -> &'static str {
        match self {
            Self::Page => "page",
            Self::Byte => "byte",
            Self::Memcpy => "memcpy",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        METHODS.into_iter().find(|m| m.name() == s)
    }
}

/// SplitMix64, for a repeatable shuffle.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The byte at offset `i` of the source range.
fn pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(31) ^ (i >> 12) as u8
}

/// Guest RAM with the source range mapped and filled, and its registers.
fn guest() -> (Vec<u8>, PagingRegs) {
    let mut ram = vec![0u8; RAM];
    let mem = IsolatedMemory::new(&mut ram);
    let mut pt =
        PageTables::new(&mem, PagingMode::Level4, TABLES.0, TABLES.1).expect("page tables");
    let mut frames: Vec<u64> = (DATA.0 / SIZE_4K..DATA.1 / SIZE_4K).collect();
    let mut rng = Rng(4);
    for i in (1..frames.len()).rev() {
        frames.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let max = SIZES[SIZES.len() - 1];
    for (page, &frame) in frames.iter().take(max / SIZE_4K as usize).enumerate() {
        pt.map(
            &mem,
            BASE + page as u64 * SIZE_4K,
            frame * SIZE_4K,
            SIZE_4K,
            RW,
        )
        .expect("map");
    }
    let regs = pt.regs();
    let data: Vec<u8> = (0..max).map(pattern).collect();
    thinvisor_memory::write_linear(&mem, &regs, GuestLinearAddr(BASE), &data, Access::WRITE)
        .expect("fill");
    (ram, regs)
}

/// BitVisor's way: translate every byte, read it alone.
fn per_byte<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    regs: &PagingRegs,
    la: u64,
    buf: &mut [u8],
) -> Result<(), TranslateError> {
    for (i, b) in buf.iter_mut().enumerate() {
        let t = translate(
            mem,
            regs,
            GuestLinearAddr(la.wrapping_add(i as u64)),
            Access::READ,
        )?;
        let mut one = [0u8; 1];
        mem.read_phys(t.gpa, &mut one)
            .map_err(|e| TranslateError::PhysUnreadable { gpa: e.gpa })?;
        *b = one[0];
    }
    Ok(())
}

struct Bench<'a> {
    mem: IsolatedMemory<'a>,
    regs: PagingRegs,
    /// Contiguous host memory holding the same bytes, for `memcpy`.
    host: Vec<u8>,
}

impl Bench<'_> {
    #[inline(never)]
    fn copy(&self, method: Method, dst: &mut [u8]) {
        let la = black_box(BASE);
        match method {
            Method::Page => read_linear(
                black_box(&self.mem),
                &self.regs,
                GuestLinearAddr(la),
                dst,
                Access::READ,
            )
            .expect("read_linear"),
            Method::Byte => per_byte(black_box(&self.mem), &self.regs, la, dst).expect("per byte"),
            Method::Memcpy => dst.copy_from_slice(black_box(&self.host[..dst.len()])),
        }
        black_box(dst);
    }

    /// Time of `iters` copies in a row.
    fn run(&self, method: Method, dst: &mut [u8], iters: u64) -> Duration {
        let start = Instant::now();
        for _ in 0..iters {
            self.copy(method, dst);
        }
        start.elapsed()
    }
}

/// The copy callgrind counts (`--toggle-collect=bench_measured_copy`).
#[no_mangle]
#[inline(never)]
fn bench_measured_copy(bench: &Bench<'_>, method: Method, dst: &mut [u8]) {
    bench.copy(method, dst);
}

fn check(dst: &[u8]) {
    assert!(
        dst.iter().enumerate().all(|(i, &b)| b == pattern(i)),
        "copied bytes differ from the guest's"
    );
}

fn time_all(bench: &Bench<'_>) {
    let mut dst = vec![0u8; SIZES[SIZES.len() - 1]];
    for size in SIZES {
        for method in METHODS {
            let dst = &mut dst[..size];
            dst.fill(0);
            bench.copy(method, dst);
            check(dst);
            // Calibrate: double the iterations until a sample is long
            // enough to time.
            let mut iters = 1u64;
            while bench.run(method, dst, iters) < SAMPLE_MIN && iters < 1 << 30 {
                iters *= 2;
            }
            let warm = Instant::now();
            while warm.elapsed() < WARM_UP {
                bench.run(method, dst, iters);
            }
            let mut ns: Vec<f64> = (0..SAMPLES)
                .map(|_| bench.run(method, dst, iters).as_nanos() as f64 / iters as f64)
                .collect();
            ns.sort_by(f64::total_cmp);
            println!(
                "time {} {size} {:.1} {:.1} {:.1} {SAMPLES} {iters}",
                method.name(),
                ns[SAMPLES / 2],
                ns[0],
                ns[SAMPLES - 1]
            );
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut ram, regs) = guest();
    let host: Vec<u8> = (0..SIZES[SIZES.len() - 1]).map(pattern).collect();
    let bench = Bench {
        mem: IsolatedMemory::new(&mut ram),
        regs,
        host,
    };
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--bench")
        .collect();
    match args[..] {
        [] => time_all(&bench),
        ["once", method, size] => {
            let (Some(method), Ok(size)) = (Method::parse(method), size.parse::<usize>()) else {
                eprintln!("usage: copy once page|byte|memcpy SIZE");
                return ExitCode::from(2);
            };
            if size > SIZES[SIZES.len() - 1] {
                eprintln!("SIZE is at most {}", SIZES[SIZES.len() - 1]);
                return ExitCode::from(2);
            }
            let mut dst = vec![0u8; size];
            // Warm-up: first-call costs (lazy symbol binding, page faults
            // on `dst`) stay out of the count.
            bench.copy(method, &mut dst);
            dst.fill(0);
            bench_measured_copy(&bench, method, &mut dst);
            check(&dst);
        }
        _ => {
            eprintln!("usage: copy [once page|byte|memcpy SIZE]");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}
