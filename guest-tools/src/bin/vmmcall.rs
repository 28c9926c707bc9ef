//! `vmmcall NAME [ARGS...]`: looks a thinvisor function up by name, calls
//! it with up to five arguments in RBX, RCX, RDX, RSI, RDI, and prints the
//! six registers it returns on one line. For trying functions out from a
//! shell; the exit statuses are those of `guest_tools::status`.

use guest_tools::cli::{format_regs, parse_u64};
use guest_tools::status;

const USAGE: &str = "\
usage: vmmcall NAME [ARG...]
Looks up the thinvisor VMM-call function NAME (function 0) and calls it with
up to five arguments in RBX, RCX, RDX, RSI, RDI (decimal, 0x hex, or -N for
the 64-bit two's complement; missing ones are 0). Prints the returned
registers as one line:
  rax=0x... rbx=0x... rcx=0x... rdx=0x... rsi=0x... rdi=0x...
Exit status: 0 called, 2 no thinvisor here (no call made), 3 thinvisor has
no function NAME, 1 other failure, 64 usage error.
Arguments are passed as they are: a function that takes an address (such as
log_read's buffer) is better used through its own program (vmmlog).";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return;
    }
    let Some((name, rest)) = args.split_first() else {
        eprintln!("vmmcall: a function name is needed\n{USAGE}");
        std::process::exit(status::USAGE);
    };
    if rest.len() > 5 {
        eprintln!("vmmcall: at most 5 arguments (RBX, RCX, RDX, RSI, RDI)");
        std::process::exit(status::USAGE);
    }
    let mut regs = [0u64; 5];
    for (slot, text) in regs.iter_mut().zip(rest) {
        match parse_u64(text) {
            Some(v) => *slot = v,
            None => {
                eprintln!("vmmcall: `{text}` is not a number (decimal, 0x hex or -N)");
                std::process::exit(status::USAGE);
            }
        }
    }
    let (vmm, number) = guest_tools::vmm::function_or_exit("vmmcall", name);
    println!("{}", format_regs(&vmm.call(number, regs)));
}
