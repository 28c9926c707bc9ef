//! The cost of decoding one refused guest write (`vmm::emulate`).
//!
//! `decode` (also as `cargo bench -p thinvisor-vmm --bench decode` runs it)
//! prints, for every case, the wall time per decode (median of 31 samples)
//! and, once, how much heap iced-x86's decoder tables take (they are built
//! on the first decode: the hypervisor's global allocator must have that
//! much). `decode once CASE` makes one warm-up decode, then one inside
//! `bench_measured_decode`, for
//! `valgrind --tool=callgrind --toggle-collect=*bench_measured_decode*`
//! (instruction counts: repeatable, unlike wall time on a shared machine).
//!
//! Cases (the guest and its memory as the host tests build them):
//! - `mov64`: `mov %eax,(%rdx)` in 64-bit mode, 4-level paging, 4 KiB page;
//! - `imm32`: `movl $0,0xfee000b0` in 32-bit mode, paging off;
//! - `xchg64`: `xchg %eax,(%rdx)` in 64-bit mode, then `finish`;
//! - `straddle64`: an 11-byte `movl $imm,abs` split over two pages;
//! - `unsupported64`: `rep stosl` (decoded, refused).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use thinvisor_memory::pagetable::{PageTables, RW, SIZE_4K};
use thinvisor_memory::{GuestPhysAddr, GuestPhysMemory, IsolatedMemory, PagingMode, PagingRegs};
use thinvisor_vmm::emulate::{decode_write, EmulateError, MemWrite};
use thinvisor_vmm::{CpuMode, Event, Exit, Gpr, Vcpu};

/// Counts the bytes allocated, to report iced-x86's table size.
struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const RAM: usize = 2 << 20;
const TABLES: (u64, u64) = (0x10_0000, 0x20_0000);
const CODE: u64 = 0x7F3A_0000_0000;

struct Guest {
    regs: [u64; 16],
    rip: u64,
    cs_access: u16,
    paging: PagingRegs,
    mem: &'static IsolatedMemory<'static>,
}

impl Vcpu for Guest {
    fn gpr(&self, reg: Gpr) -> u64 {
        self.regs[reg as usize]
    }
    fn set_gpr(&mut self, reg: Gpr, value: u64) {
        self.regs[reg as usize] = value;
    }
    fn rip(&self) -> u64 {
        self.rip
    }
    fn rip_linear(&self) -> u64 {
        self.rip
    }
    fn paging(&self) -> PagingRegs {
        self.paging
    }
    fn mode(&self) -> CpuMode {
        CpuMode {
            cpl: 0,
            long64: self.cs_access & (1 << 13) != 0,
        }
    }
    fn memory(&self) -> &dyn GuestPhysMemory {
        self.mem
    }
    fn skip_instruction(&mut self) {}
    fn cs_access(&self) -> u16 {
        self.cs_access_bits()
    }
    fn rflags(&self) -> u64 {
        2
    }
    fn complete_instruction(&mut self, next_rip: u64) {
        self.rip = next_rip;
    }
    fn inject(&mut self, _: Event) {}
    fn run(&mut self) -> Exit {
        Exit::Hlt
    }
}

impl Guest {
    fn cs_access_bits(&self) -> u16 {
        self.cs_access
    }
}

const CASES: [&str; 5] = ["mov64", "imm32", "xchg64", "straddle64", "unsupported64"];

fn guest(case: &str) -> Option<Guest> {
    let mem: &'static IsolatedMemory<'static> =
        Box::leak(Box::new(IsolatedMemory::new(vec![0u8; RAM].leak())));
    let (bytes, long): (&[u8], bool) = match case {
        "mov64" => (&[0x89, 0x02], true),
        "imm32" => (&[0xC7, 0x05, 0xB0, 0x00, 0xE0, 0xFE, 0, 0, 0, 0], false),
        "xchg64" => (&[0x87, 0x02], true),
        "straddle64" => (
            &[
                0xC7, 0x04, 0x25, 0x00, 0x03, 0xE0, 0xFE, 0x08, 0x46, 0x0C, 0x00,
            ],
            true,
        ),
        "unsupported64" => (&[0xF3, 0xAB], true),
        _ => return None,
    };
    if !long {
        mem.write_phys(GuestPhysAddr::new(0x1000), bytes).ok()?;
        return Some(Guest {
            regs: [0; 16],
            rip: 0x1000,
            cs_access: 0xC09B,
            paging: PagingRegs {
                cr0: PagingRegs::CR0_PE,
                ..PagingRegs::default()
            },
            mem,
        });
    }
    let mut pt = PageTables::new(mem, PagingMode::Level4, TABLES.0, TABLES.1).ok()?;
    pt.map(mem, CODE, 0x3000, SIZE_4K, RW).ok()?;
    pt.map(mem, CODE + SIZE_4K, 0x8000, SIZE_4K, RW).ok()?;
    let rip = if case == "straddle64" {
        let split = 5;
        mem.write_phys(GuestPhysAddr::new(0x4000 - split), &bytes[..5])
            .ok()?;
        mem.write_phys(GuestPhysAddr::new(0x8000), &bytes[5..])
            .ok()?;
        CODE + SIZE_4K - split
    } else {
        mem.write_phys(GuestPhysAddr::new(0x3100), bytes).ok()?;
        CODE + 0x100
    };
    Some(Guest {
        regs: [0x000C_4500; 16],
        rip,
        cs_access: 0xA09B,
        paging: pt.regs(),
        mem,
    })
}

/// The measured decode (and, for XCHG, the retirement).
#[inline(never)]
fn bench_measured_decode(g: &mut Guest) -> Result<MemWrite, EmulateError> {
    let rip = g.rip;
    let r = decode_write(black_box(&*g));
    if let Ok(w) = r {
        w.finish(g, 0);
        g.rip = rip;
    }
    r
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("once") {
        let Some(mut g) = args.get(1).and_then(|c| guest(c)) else {
            eprintln!("usage: decode once {}", CASES.join("|"));
            return ExitCode::FAILURE;
        };
        // The warm-up (which builds iced-x86's tables) outside the
        // measured function.
        let _ = black_box(decode_write(black_box(&g)));
        let r = black_box(bench_measured_decode(&mut g));
        println!("{r:?}");
        return ExitCode::SUCCESS;
    }
    let before = ALLOCATED.load(Relaxed);
    let mut g = guest("mov64").expect("the mov64 case builds");
    let after_guest = ALLOCATED.load(Relaxed);
    let _ = bench_measured_decode(&mut g);
    println!(
        "iced-x86 tables: {} bytes of heap on the first decode (guest RAM {} bytes not counted)",
        ALLOCATED.load(Relaxed) - after_guest,
        after_guest - before
    );
    for case in CASES {
        let mut g = guest(case).expect("every case builds");
        let iters = 20_000;
        let mut samples: Vec<Duration> = (0..31)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..iters {
                    let _ = black_box(bench_measured_decode(&mut g));
                }
                t.elapsed() / iters
            })
            .collect();
        samples.sort();
        println!(
            "time {case} {} ns per decode ({:?})",
            samples[15].as_nanos(),
            bench_measured_decode(&mut g)
        );
    }
    ExitCode::SUCCESS
}
