//! thinvisor.efi carries thinvisor's ELF image: `cargo xtask build` names
//! it in THINVISOR_ELF. Without it the loader builds with an empty image
//! and says so when run.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=THINVISOR_ELF");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out.join("thinvisor.elf");
    match std::env::var_os("THINVISOR_ELF") {
        Some(path) => {
            println!("cargo:rerun-if-changed={}", PathBuf::from(&path).display());
            std::fs::copy(&path, &dest).expect("THINVISOR_ELF names a readable file");
        }
        None => std::fs::write(&dest, b"").expect("OUT_DIR is writable"),
    }
}
