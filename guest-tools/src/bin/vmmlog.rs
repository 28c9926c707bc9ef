//! `vmmlog [-f]`: prints thinvisor's log through the `log_read` VMM call,
//! from an ordinary user program (no kernel module, no physical
//! addresses). With `-f` it keeps following the log. When older bytes left
//! the VMM's 64 KiB ring before they were read, it says how many on
//! stderr, so the reader knows exactly what it missed.

use std::io::{self, Write};
use std::thread;
use std::time::Duration;

use guest_tools::cli::log_step;
use guest_tools::status;

const USAGE: &str = "\
usage: vmmlog [-f]
Prints thinvisor's log (its 64 KiB ring, as far back as it still holds)
through the log_read VMM call.
  -f   follow: keep printing new lines as thinvisor logs them (polls every
       200 ms; end it with Ctrl-C)
Bytes that left the ring before they could be read are reported on stderr
(`vmmlog: N bytes missed`).
Exit status: 0 done, 2 no thinvisor here, 3 thinvisor has no log_read,
1 thinvisor refused the buffer or output failed, 64 usage error.";

/// The read size: the whole ring in one call when it is full.
const CHUNK: usize = 64 * 1024;
/// The follower's pause when nothing is new.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

fn main() {
    let mut follow = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "-f" | "--follow" => follow = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => {
                eprintln!("vmmlog: unknown argument `{other}`\n{USAGE}");
                std::process::exit(status::USAGE);
            }
        }
    }
    let (vmm, number) = guest_tools::vmm::function_or_exit("vmmlog", "log_read");
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    let mut out = io::stdout().lock();
    loop {
        let regs = vmm.call(
            number,
            [buf.as_mut_ptr() as u64, buf.len() as u64, offset, 0, 0],
        );
        let Some(step) = log_step(offset, buf.len(), regs.rax, regs.rbx) else {
            eprintln!(
                "vmmlog: log_read refused the read (rax={:#x} rbx={:#x})",
                regs.rax, regs.rbx
            );
            std::process::exit(status::FAILED);
        };
        if step.missed > 0 {
            // The very first read starts wherever the ring does: the bytes
            // before it were gone before this program ran.
            if offset == 0 {
                eprintln!(
                    "vmmlog: {} bytes missed (the log's first bytes have left the VMM's ring)",
                    step.missed
                );
            } else {
                eprintln!(
                    "vmmlog: {} bytes missed (the VMM's ring overran)",
                    step.missed
                );
            }
        }
        offset = step.next;
        if step.copied > 0 {
            if let Err(e) = out
                .write_all(&buf[..step.copied])
                .and_then(|()| out.flush())
            {
                // A closed pipe (`vmmlog | head`) is the reader's choice.
                if e.kind() == io::ErrorKind::BrokenPipe {
                    return;
                }
                eprintln!("vmmlog: {e}");
                std::process::exit(status::FAILED);
            }
            continue;
        }
        if !follow {
            return;
        }
        thread::sleep(FOLLOW_POLL);
    }
}
