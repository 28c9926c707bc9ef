//! `memscan CANARY`: reads every physical page the guest can address (all
//! of [0, top of RAM) and every non-RAM range of the firmware's memory
//! map) and looks for thinvisor's canary (the words `CANARY ^ i`, i <
//! 512, that thinvisor writes into a page of its own memory at boot and
//! logs the value of). It must find none: thinvisor's memory is not
//! readable from the guest. A pattern the scanner plants in its own
//! memory must be found, so that a scanner that reads nothing cannot
//! pass.
//!
//! System RAM is read through `/proc/kcore`, everything else through
//! `/dev/mem` (see `guest_tools::memscan` for why; needs root and the
//! kernel command line `iomem=relaxed`). Exit status: 0 no match and the
//! control found, 1 a match, no control or no way to read, 2 no thinvisor
//! here (nothing read), 64 usage error.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::time::Instant;

use guest_tools::memscan::{
    control_value, kcore_offset, kcore_segments, map_entry, plan, KcoreSegment, MapEntry, Matcher,
    PAGE,
};
use guest_tools::status;

const USAGE: &str = "\
usage: memscan CANARY
Reads every physical page below the top of RAM (System RAM through
/proc/kcore, the rest through /dev/mem) and every reserved range of the
firmware's memory map (/sys/firmware/memmap), and counts the 8-byte words
CANARY ^ i (i < 512): thinvisor's canary page, which no guest page may
show. CANARY is hex (0x...), as thinvisor logs it (`canary planted in thinvisor's memory at`).
Prints the pages read, the pages unreadable and the matches; a pattern
planted in memscan's own memory must be found (the control).
Exit status: 0 no match and the control found, 1 otherwise, 2 no
thinvisor here, 64 usage error. Run as root, with iomem=relaxed.";

/// Pages read from /proc/kcore at once.
const CHUNK_PAGES: u64 = 256;
/// Matches listed by address.
const SHOW_MATCHES: usize = 10;

#[derive(Default)]
struct Tally {
    kcore: u64,
    devmem: u64,
    mapped: u64,
    unreadable: u64,
    /// (errno, count) of the unreadable pages.
    errors: Vec<(i32, u64)>,
    matches: u64,
    first_matches: Vec<u64>,
    control: u64,
    /// The physical page of the planted control, if known.
    control_page: Option<u64>,
    /// A control word was found in that page.
    control_in_own_page: bool,
}

impl Tally {
    fn failed(&mut self, e: &io::Error) {
        let code = e.raw_os_error().unwrap_or(0);
        self.unreadable += 1;
        match self.errors.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += 1,
            None => self.errors.push((code, 1)),
        }
    }

    /// Looks at the words of `bytes`, which are physical memory from `pa`.
    fn scan(&mut self, pa: u64, bytes: &[u8], canary: &Matcher, control: &Matcher) {
        for (i, w) in bytes.chunks_exact(8).enumerate() {
            let word = u64::from_le_bytes(w.try_into().unwrap_or_default());
            if canary.matches(word) {
                self.matches += 1;
                if self.first_matches.len() < SHOW_MATCHES {
                    self.first_matches.push(pa + 8 * i as u64);
                }
            }
            if control.matches(word) {
                self.control += 1;
                self.control_in_own_page |=
                    self.control_page == Some((pa + 8 * i as u64) & !(PAGE - 1));
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return;
    }
    if let Err(e) = guest_tools::vmm::Vmm::get() {
        eprintln!("memscan: no thinvisor here ({e}); nothing read");
        std::process::exit(status::NO_VMM);
    }
    let [text] = &args[..] else {
        eprintln!("memscan: one argument, the canary, is needed\n{USAGE}");
        std::process::exit(status::USAGE);
    };
    let Some(canary) = Matcher::from_hex(text) else {
        eprintln!("memscan: `{text}` is not a 64-bit hex value\n{USAGE}");
        std::process::exit(status::USAGE);
    };
    match run(&canary) {
        Ok(true) => {}
        Ok(false) => std::process::exit(status::FAILED),
        Err(e) => {
            eprintln!("memscan: {e}");
            std::process::exit(status::FAILED);
        }
    }
}

/// The firmware's memory map, as the kernel received it.
fn firmware_map() -> Result<Vec<MapEntry>, String> {
    let dir = "/sys/firmware/memmap";
    let mut map = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| format!("{dir}: {e}"))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("{dir}: {e}"))?.path();
        let read = |name: &str| fs::read_to_string(path.join(name)).unwrap_or_default();
        match map_entry(&read("start"), &read("end"), &read("type")) {
            Some(e) => map.push(e),
            None => return Err(format!("{}: unreadable entry", path.display())),
        }
    }
    map.sort_by_key(|e| e.range.start);
    if map.is_empty() {
        return Err(format!("{dir} is empty"));
    }
    Ok(map)
}

/// The System RAM segments of /proc/kcore.
fn kcore_map(kcore: &File) -> Result<Vec<KcoreSegment>, String> {
    let mut head = vec![0u8; 1 << 16];
    let n = kcore
        .read_at(&mut head, 0)
        .map_err(|e| format!("/proc/kcore: {e}"))?;
    head.truncate(n);
    kcore_segments(&head).ok_or_else(|| "/proc/kcore: no ELF core header".to_string())
}

/// The physical address of the page holding `va` in this process, from
/// /proc/self/pagemap (root sees frame numbers), if present.
fn own_phys(va: usize) -> Option<u64> {
    let pagemap = File::open("/proc/self/pagemap").ok()?;
    let mut entry = [0u8; 8];
    pagemap
        .read_exact_at(&mut entry, (va as u64 / PAGE) * 8)
        .ok()?;
    let e = u64::from_le_bytes(entry);
    let pfn = e & ((1 << 55) - 1);
    (e >> 63 == 1 && pfn != 0).then(|| pfn * PAGE + (va as u64 % PAGE))
}

/// Reads one page of /dev/mem at `pa` into `buf` with an mmap (for pages
/// above the kernel's direct map, which read() refuses with EFAULT).
fn mapped_page(devmem: &File, pa: u64, buf: &mut [u8]) -> io::Result<()> {
    let offset =
        libc::off_t::try_from(pa).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a fresh shared read-only mapping of one page of /dev/mem;
    // the kernel checks that the range may be mapped.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            devmem.as_raw_fd(),
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let words = p as *const u64;
    for (i, out) in buf.chunks_exact_mut(8).enumerate() {
        // SAFETY: inside the page mapped above; volatile and word-sized,
        // as device memory wants.
        let w = unsafe { words.add(i).read_volatile() };
        out.copy_from_slice(&w.to_le_bytes());
    }
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(p, PAGE as usize) };
    Ok(())
}

fn run(canary: &Matcher) -> Result<bool, String> {
    let started = Instant::now();
    let map = firmware_map()?;
    let (ranges, skipped) = plan(&map);
    let kcore = File::open("/proc/kcore").map_err(|e| format!("/proc/kcore: {e}"))?;
    let segments = kcore_map(&kcore)?;
    let devmem = File::open("/dev/mem").map_err(|e| format!("/dev/mem: {e}"))?;

    // The control: a page of this process's memory (System RAM) filled
    // as thinvisor fills its canary page, with a value of its own.
    // SAFETY: RDTSC has no side effects.
    let control_seed = unsafe { core::arch::x86_64::_rdtsc() };
    let control_word = control_value(control_seed);
    let control = Matcher::for_value(control_word);
    let mut planted = vec![0u64; 1024];
    let skip = planted.as_ptr().align_offset(PAGE as usize);
    let page = &mut planted[skip..skip + 512];
    for (i, w) in page.iter_mut().enumerate() {
        *w = control_word ^ i as u64;
    }
    std::hint::black_box(&mut planted);
    let control_pa = own_phys(planted[skip..].as_ptr() as usize);

    let total: u64 = ranges.iter().map(|r| (r.end - r.start) / PAGE).sum();
    println!(
        "memscan: {total} pages in {} ranges; System RAM through /proc/kcore ({} segments), the rest through /dev/mem",
        ranges.len(),
        segments.len()
    );
    for r in &ranges {
        println!("memscan: range {:#x}..{:#x}", r.start, r.end);
    }
    for r in &skipped {
        println!(
            "memscan: skipped {:#x}..{:#x} ({} pages: reserved address space above 4 GiB, not memory)",
            r.start,
            r.end,
            (r.end - r.start) / PAGE
        );
    }

    let mut t = Tally {
        control_page: control_pa.map(|pa| pa & !(PAGE - 1)),
        ..Tally::default()
    };
    let mut buf = vec![0u8; (CHUNK_PAGES * PAGE) as usize];
    for r in &ranges {
        let mut pa = r.start;
        while pa < r.end {
            if let Some(offset) = kcore_offset(&segments, pa) {
                // As many pages as one segment holds in a row, up to a chunk.
                let mut n = 1;
                while n < CHUNK_PAGES
                    && pa + n * PAGE < r.end
                    && kcore_offset(&segments, pa + n * PAGE) == Some(offset + n * PAGE)
                {
                    n += 1;
                }
                let bytes = &mut buf[..(n * PAGE) as usize];
                match kcore.read_exact_at(bytes, offset) {
                    Ok(()) => {
                        t.kcore += n;
                        t.scan(pa, bytes, canary, &control);
                    }
                    Err(_) => {
                        // Page by page, to count exactly what fails.
                        for i in 0..n {
                            let page = &mut buf[..PAGE as usize];
                            match kcore.read_exact_at(page, offset + i * PAGE) {
                                Ok(()) => {
                                    t.kcore += 1;
                                    t.scan(pa + i * PAGE, page, canary, &control);
                                }
                                Err(e) => t.failed(&e),
                            }
                        }
                    }
                }
                pa += n * PAGE;
                continue;
            }
            let page = &mut buf[..PAGE as usize];
            match devmem.read_exact_at(page, pa) {
                Ok(()) => {
                    t.devmem += 1;
                    t.scan(pa, page, canary, &control);
                }
                // Above the kernel's direct map read() refuses; mmap may not.
                Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                    match mapped_page(&devmem, pa, page) {
                        Ok(()) => {
                            t.mapped += 1;
                            t.scan(pa, page, canary, &control);
                        }
                        Err(e) => t.failed(&e),
                    }
                }
                Err(e) => t.failed(&e),
            }
            pa += PAGE;
        }
    }

    let read = t.kcore + t.devmem + t.mapped;
    println!(
        "memscan: {read} pages read ({} through /proc/kcore, {} read and {} mapped from /dev/mem) in {:.1} s",
        t.kcore,
        t.devmem,
        t.mapped,
        started.elapsed().as_secs_f64()
    );
    for (code, n) in &t.errors {
        println!(
            "memscan: {n} pages unreadable: {}",
            io::Error::from_raw_os_error(*code)
        );
    }
    for at in &t.first_matches {
        println!("memscan: CANARY WORD at {at:#x}");
    }
    let own = control_pa.map_or(String::from("its physical address unknown"), |pa| {
        format!("its own page at {pa:#x}")
    });
    let control_found = match control_pa {
        Some(_) => t.control_in_own_page,
        None => t.control > 0,
    };
    println!(
        "memscan: control: {} words of the planted pattern found ({own}){}",
        t.control,
        if control_found { "" } else { ": NOT FOUND" }
    );
    std::hint::black_box(&planted);
    println!(
        "memscan: result: {} pages, {} unreadable, {} matches",
        read + t.unreadable,
        t.unreadable,
        t.matches
    );
    Ok(t.matches == 0 && control_found && read > 0)
}
