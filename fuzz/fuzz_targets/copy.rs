//! The page-by-page copies (`read_linear`, `write_linear`, `read_cstr`)
//! and the physical accesses under them (`read_phys`,
//! `read_until_nul_phys`) on hostile tables, holes and ranges: they must
//! not panic and must agree with a byte-by-byte loop over `translate`.

#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use thinvisor_memory::{
    read_cstr_with_access, read_linear, translate, write_linear, Access, CStrError,
    GuestLinearAddr, GuestPhysAddr, GuestPhysMemory, IsolatedMemory, PhysAccessError, PhysWindow,
    TranslateError,
};
use thinvisor_memory_fuzz::Setup;

/// Guest memory that remembers every range mapped through it (the walk's
/// entry reads), to know whether a write could change a translation.
/// Refuses writes.
struct Recorder<'m, M> {
    inner: &'m M,
    reads: Mutex<Vec<(u64, usize)>>,
}

impl<M: GuestPhysMemory> GuestPhysMemory for Recorder<'_, M> {
    fn map(&self, gpa: GuestPhysAddr, len: usize) -> Result<PhysWindow<'_>, PhysAccessError> {
        self.reads.lock().unwrap().push((gpa.0, len));
        self.inner.map(gpa, len)
    }

    fn write_phys(&self, gpa: GuestPhysAddr, _data: &[u8]) -> Result<(), PhysAccessError> {
        Err(PhysAccessError { gpa })
    }
}

/// Byte `i` of the range at `la`, as the per-byte method (BitVisor's)
/// finds it: its gpa, then one byte read there.
fn byte_gpa<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    s: &Setup,
    access: Access,
    i: usize,
) -> Result<u64, TranslateError> {
    let mask = s.linear_mask();
    let a = (s.la & mask).wrapping_add(i as u64) & mask;
    translate(mem, &s.regs, GuestLinearAddr(a), access).map(|t| t.gpa.0)
}

fn byte_at<M: GuestPhysMemory + ?Sized>(mem: &M, gpa: u64) -> Result<u8, TranslateError> {
    let mut b = [0u8; 1];
    mem.read_phys(GuestPhysAddr(gpa), &mut b)
        .map_err(|e| TranslateError::PhysUnreadable { gpa: e.gpa })?;
    Ok(b[0])
}

/// All of RAM as the guest-reachable bytes see it, holes read as 0xEE
/// (their contents cannot change: nothing reaches them).
fn snapshot(mem: &IsolatedMemory<'_>) -> Vec<u8> {
    let mut out = vec![0xEEu8; mem.len() as usize];
    for (i, chunk) in out.chunks_mut(4096).enumerate() {
        let at = i as u64 * 4096;
        // A page with a hole in it, byte by byte.
        if mem.read_phys(GuestPhysAddr(at), chunk).is_err() {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = byte_at(mem, at + j as u64).unwrap_or(0xEE);
            }
        }
    }
    out
}

fn check_read(mem: &IsolatedMemory<'_>, s: &Setup) {
    let want: Result<Vec<u8>, _> = (0..s.len)
        .map(|i| byte_at(mem, byte_gpa(mem, s, s.access, i)?))
        .collect();
    let mut buf = vec![0u8; s.len];
    let got = read_linear(mem, &s.regs, GuestLinearAddr(s.la), &mut buf, s.access).map(|()| buf);
    assert_eq!(got, want, "read_linear {:#x}+{:#x}", s.la, s.len);
}

fn check_cstr(mem: &IsolatedMemory<'_>, s: &Setup) {
    let limit = s.len.min(300);
    let mut want = Err(CStrError::TooLong);
    let mut name = Vec::new();
    for i in 0..limit {
        match byte_gpa(mem, s, s.access, i).and_then(|g| byte_at(mem, g)) {
            Err(e) => {
                want = Err(CStrError::Unreadable(e));
                break;
            }
            Ok(0) => {
                want = Ok(i);
                break;
            }
            Ok(b) => name.push(b),
        }
    }
    let mut buf = vec![0xFFu8; limit];
    let got = read_cstr_with_access(mem, &s.regs, GuestLinearAddr(s.la), &mut buf, s.access);
    assert_eq!(got, want, "read_cstr {:#x} limit {}", s.la, limit);
    if let Ok(n) = got {
        assert_eq!(&buf[..n], &name[..]);
        assert_eq!(buf[n], 0);
    }
}

fn check_phys(mem: &IsolatedMemory<'_>, s: &Setup) {
    // The linear address doubles as a guest-physical one here. A range
    // read must equal its bytes read one at a time, and fail at the first
    // unreadable one; the NUL scan must agree with the same bytes.
    let gpa = s.la & 0xFFFF;
    let mut want = Ok(());
    let mut bytes = Vec::with_capacity(s.len);
    for i in 0..s.len as u64 {
        match byte_at(mem, gpa + i) {
            Ok(b) => bytes.push(b),
            Err(_) => {
                want = Err(PhysAccessError {
                    gpa: GuestPhysAddr(gpa + i),
                });
                break;
            }
        }
    }
    let mut buf = vec![0u8; s.len];
    let got = mem.read_phys(GuestPhysAddr(gpa), &mut buf);
    assert_eq!(got, want, "read_phys {gpa:#x}+{:#x}", s.len);
    if got.is_ok() {
        assert_eq!(buf, bytes);
    }
    let nul = bytes.iter().position(|&b| b == 0);
    let want = match (nul, want) {
        (Some(n), _) => Ok(Some(n)),
        (None, Ok(())) => Ok(None),
        (None, Err(e)) => Err(e),
    };
    let mut buf = vec![0xFFu8; s.len];
    let got = mem.read_until_nul_phys(GuestPhysAddr(gpa), &mut buf);
    assert_eq!(got, want, "read_until_nul_phys {gpa:#x}+{:#x}", s.len);
    if let Ok(Some(n)) = got {
        assert_eq!(&buf[..=n], &bytes[..=n]);
    }
}

fn check_write(mem: &IsolatedMemory<'_>, s: &Setup) {
    let data: Vec<u8> = (0..s.len)
        .map(|i| (i as u8).wrapping_mul(13) ^ 0x5A)
        .collect();
    let access = s.access.as_write();
    // Per byte: translate everything first (write_linear promises nothing
    // is written on a translation error), recording the entries read.
    let recorder = Recorder {
        inner: mem,
        reads: Mutex::new(Vec::new()),
    };
    let gpas: Result<Vec<u64>, _> = (0..s.len)
        .map(|i| byte_gpa(&recorder, s, access, i))
        .collect();
    let table_reads = recorder.reads.into_inner().unwrap();
    let before = snapshot(mem);
    let mut want_ram = before.clone();
    let want = gpas.as_ref().map_err(|e| *e).and_then(|gpas| {
        for (&g, &b) in gpas.iter().zip(&data) {
            // Same reachability as the memory itself (RAM minus holes).
            mem.map(GuestPhysAddr(g), 1)
                .map(|_| ())
                .map_err(|e| TranslateError::PhysUnreadable { gpa: e.gpa })?;
            want_ram[g as usize] = b;
        }
        Ok(())
    });
    let got = write_linear(mem, &s.regs, GuestLinearAddr(s.la), &data, s.access);
    // A write into an entry the walk used changes later translations,
    // which the per-byte model does not follow: only "no panic" counts.
    let mut is_table = vec![false; before.len()];
    for &(t, n) in &table_reads {
        let start = usize::try_from(t).unwrap_or(usize::MAX).min(before.len());
        let end = start.saturating_add(n).min(before.len());
        is_table[start..end].fill(true);
    }
    let touches_tables = gpas.as_ref().is_ok_and(|gpas| {
        gpas.iter()
            .any(|&g| usize::try_from(g).is_ok_and(|g| is_table.get(g) == Some(&true)))
    });
    if touches_tables {
        return;
    }
    assert_eq!(got, want, "write_linear {:#x}+{:#x}", s.la, s.len);
    match got {
        // The failing page is all-or-nothing, the model byte by byte.
        Err(TranslateError::PhysUnreadable { .. }) => {}
        Ok(()) => assert!(snapshot(mem) == want_ram, "memory after write"),
        Err(_) => assert!(snapshot(mem) == before, "written despite a fault"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(mut s) = Setup::new(&mut u, 3 * 4096 + 64) else {
        return;
    };
    let mut ram = std::mem::take(&mut s.ram);
    let holes = s.holes.clone();
    let mem = IsolatedMemory::with_holes(&mut ram, &holes);
    check_read(&mem, &s);
    check_cstr(&mem, &s);
    check_phys(&mem, &s);
    check_write(&mem, &s);
});
