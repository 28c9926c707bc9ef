//! The debug shell (`Dbgsh::call`) with arbitrary answers from arbitrary
//! callers (client ids, clock values that may go backwards), over an
//! arbitrary VMM log, guest memory with holes and a reserved block (the
//! pass-through layout's thinvisor memory), exit counts and `cpu` lines,
//! enabled or disabled (`dbgsh=off`), with any takeover delay.
//!
//! Checked: every value returned is a byte (< 0x100), 0x100 (NUL),
//! 0x10A (session end) or -1 (nothing pending); a client that is not the
//! session's owner gets -1 while the owner has called within the takeover
//! delay, and the owner (or a client that takes the session over) never
//! does; a takeover, and a client taking a free shell, start a new
//! session with its whole banner (no byte of it acknowledged by an answer
//! meant for an earlier session); the disabled
//! shell streams only its message; no `mem` line dumps a byte of the
//! reserved block; no log line is written under the log's lock.

#![no_main]

use core::fmt::Write;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use thinvisor_abi::dbgsh::{BANNER, DISABLED, NOTHING, NUL_BYTE, SESSION_END};
use thinvisor_memory::{GuestPhysAddr, GuestPhysMemory, IsolatedMemory};
use thinvisor_memory_fuzz::vmm::{fresh_vm, LOG};
use thinvisor_memory_fuzz::Setup;
use thinvisor_vmm::dbgsh::{Caller, Dbgsh, Line, ShellEnv, ShellInfo};
use thinvisor_vmm::stats::ExitStats;

struct Info {
    stats: Vec<ExitStats>,
    cpu_lines: usize,
    reserved: Option<(u64, u64)>,
}

impl ShellInfo for Info {
    fn cpus(&self) -> usize {
        self.stats.len()
    }
    fn exit_stats(&self, cpu: usize) -> Option<&ExitStats> {
        self.stats.get(cpu)
    }
    fn exit_name(&self, slot: usize) -> &'static str {
        if slot.is_multiple_of(2) {
            "EVEN"
        } else {
            "odd"
        }
    }
    fn cpu_line(&self, index: usize, out: &mut Line) -> bool {
        if index < self.cpu_lines {
            let _ = write!(out, "cpu line {index}");
        }
        index < self.cpu_lines
    }
    fn reserved(&self) -> Option<(u64, u64)> {
        self.reserved
    }
}

/// Lines of input worth typing.
const SCRIPTS: &[&str] = &[
    "help\n",
    "log\n",
    "log 3\n",
    "log 0x10000000000\n",
    "stat\n",
    "cpu\n",
    "mem 0\n",
    "mem 0 300\n",
    "mem fff0 0x20\n",
    "mem 0 65536\n",
    "mem ffffffffffffffff 2\n",
    "exit\n",
    "bogus\r\n",
    "mem\n",
    "mem 1 2 3\n",
    "\x08\x7f\x08",
];

/// What one client knows: the value it received last.
#[derive(Clone, Copy)]
struct Client {
    id: u64,
    last: u64,
}

fuzz_target!(|data: &[u8]| {
    let Some((calls, rest)) = thinvisor_memory_fuzz::split_calls(data) else {
        return;
    };
    let mut u = Unstructured::new(rest);
    let Ok(mut s) = Setup::new(&mut u, 16) else {
        return;
    };
    let mut ram = std::mem::take(&mut s.ram);
    let ram_len = ram.len() as u64;
    let holes = s.holes.clone();
    let mem = IsolatedMemory::with_holes(&mut ram, &holes);
    let _ = run(&mut Unstructured::new(calls), &mem, ram_len);
});

fn run(u: &mut Unstructured<'_>, mem: &dyn GuestPhysMemory, ram_len: u64) -> Result<()> {
    let enabled = u.ratio(7u8, 8u8)?;
    let takeover = match u.int_in_range(0u8..=3)? {
        0 => u64::MAX,
        1 => 0,
        2 => u.int_in_range(1..=100)?,
        _ => u.arbitrary()?,
    };
    // The VM's registry and a clean log (the VM's own shell is unused).
    let vm = fresh_vm(true, u64::MAX);
    for _ in 0..u.int_in_range(0u8..=20)? {
        let len = u.int_in_range(0..=150)?;
        // No ':' in the log's lines, so none can pass for a `mem` line.
        let line: Vec<u8> = u
            .bytes(len)?
            .iter()
            .map(|&b| if b == b':' { b';' } else { b })
            .collect();
        LOG.lock().push(&line);
        if u.ratio(7u8, 8u8)? {
            LOG.lock().push(b"\n");
        }
    }
    let mut stats = Vec::new();
    for _ in 0..u.int_in_range(0u8..=3)? {
        let s = ExitStats::default();
        for _ in 0..u.int_in_range(0u8..=8)? {
            let slot = u.int_in_range(0..=200)?;
            for _ in 0..u.int_in_range(1u8..=3)? {
                s.record(slot);
            }
            s.record_call(u.arbitrary()?);
        }
        stats.push(s);
    }
    let reserved = if u.ratio(3u8, 4u8)? {
        let start = u.int_in_range(0..=ram_len / 4096)? * 4096;
        let len = u.int_in_range(0u64..=4)? * 4096;
        Some((start, start + len))
    } else {
        None
    };
    let info = Info {
        stats,
        cpu_lines: u.int_in_range(0..=40)?,
        reserved,
    };
    let extra = |out: &mut Line| {
        let _ = out.write_str("log_set_buf: none");
    };
    let env = ShellEnv {
        log: &LOG,
        memory: mem,
        info: &info,
        registry: &vm.registry,
        extra_stat: if u.arbitrary()? { Some(&extra) } else { None },
    };
    let mut sh = Dbgsh::new(enabled, takeover);

    let mut clients = [0x1000u64, 0x2000, 0x3000].map(|id| Client { id, last: NOTHING });
    let mut now = 0u64;
    // The model: the owner and its last call; the last value the shell
    // handed out (its pending value).
    let mut owner: Option<(u64, u64)> = None;
    let mut pending = NOTHING;
    let mut output = Vec::new();
    let mut typing: &[u8] = b"";
    let mut calls = 0u32;

    while !u.is_empty() && calls < 20_000 {
        let who = usize::from(u.int_in_range(0u8..=2)?);
        now = match u.int_in_range(0u8..=7)? {
            0..=5 => now.saturating_add(u.int_in_range(0..=3)?),
            6 => now.saturating_sub(u.int_in_range(0..=50)?),
            _ => u.arbitrary()?,
        };
        if typing.is_empty() && u.ratio(1u8, 3u8)? {
            typing = u.choose(SCRIPTS)?.as_bytes();
        }
        // Mostly the protocol's own answer; sometimes anything.
        let last = clients[who].last;
        let answer = match u.int_in_range(0u8..=15)? {
            0 => NOTHING,
            1 => u.arbitrary()?,
            2 => u64::from(u.arbitrary::<u8>()?),
            _ if last == 0 => match typing.split_first() {
                Some((&b, rest)) => {
                    typing = rest;
                    u64::from(b)
                }
                None => 0,
            },
            _ if last == NOTHING => NOTHING,
            _ => 0,
        };
        // A burst of calls by the same client (draining output).
        let burst = if u.ratio(1u8, 4u8)? {
            u.int_in_range(1..=2000)?
        } else {
            1
        };
        let mut answer = answer;
        for _ in 0..burst {
            calls += 1;
            let client = clients[who].id;
            let caller = Caller { client, now };
            let r = sh.call(answer, caller, &env);
            assert!(
                r <= NUL_BYTE || r == SESSION_END || r == NOTHING,
                "dbgsh returned {r:#x}"
            );
            if enabled {
                // The model of the session's owner.
                let busy = matches!(owner, Some((c, t)) if c != client && now.saturating_sub(t) < takeover);
                let took_over = matches!(owner, Some((c, _)) if c != client) && !busy;
                if busy {
                    assert_eq!(
                        r, NOTHING,
                        "client {client:#x} got {r:#x} while {owner:x?} holds the shell"
                    );
                } else {
                    assert_ne!(r, NOTHING, "the owner {client:#x} got nothing");
                    if took_over {
                        assert_eq!(
                            r,
                            u64::from(BANNER.as_bytes()[0]),
                            "a takeover without a banner"
                        );
                    }
                    if owner.is_none() {
                        // A free shell: the new owner's session starts with
                        // the whole banner, whatever it answers (its answer
                        // was to a value of its own earlier session).
                        assert_eq!(
                            r,
                            u64::from(BANNER.as_bytes()[0]),
                            "a new session without its banner's first byte"
                        );
                    }
                    let ends = !took_over && answer != NOTHING && pending == SESSION_END;
                    owner = if ends { None } else { Some((client, now)) };
                    if ends {
                        // The next session's banner is pending already.
                        assert_eq!(r, u64::from(BANNER.as_bytes()[0]));
                    }
                    pending = r;
                    if (1..=0xFF).contains(&r) {
                        output.push(r as u8);
                    }
                }
            } else if (1..=0xFF).contains(&r) {
                assert!(
                    DISABLED.as_bytes().contains(&(r as u8)),
                    "the disabled shell sent {r:#x}"
                );
            }
            clients[who].last = r;
            answer = match r {
                NOTHING => break,
                0 => match typing.split_first() {
                    Some((&b, rest)) => {
                        typing = rest;
                        u64::from(b)
                    }
                    None => break,
                },
                _ => 0,
            };
        }
    }

    // No dump line of the reserved block: a `mem` line is 16 hex digits
    // of address, ": ", 16 bytes.
    if let Some((rs, re)) = reserved {
        for line in output.split(|&b| b == b'\n') {
            let Some(addr) = line.get(..18).filter(|l| l.ends_with(b": ")) else {
                continue;
            };
            let Ok(addr) = u64::from_str_radix(&String::from_utf8_lossy(&addr[..16]), 16) else {
                continue;
            };
            assert!(
                addr.saturating_add(16) <= rs || re <= addr,
                "mem dumped {addr:#x}, in the reserved {rs:#x}..{re:#x}"
            );
            // And what it shows is guest memory.
            let mut b = [0u8; 1];
            assert!(
                mem.read_phys(GuestPhysAddr::new(addr), &mut b).is_ok(),
                "dumped {addr:#x}, not RAM"
            );
        }
    }
    Ok(())
}
