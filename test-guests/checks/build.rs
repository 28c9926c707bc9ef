//! Passes the linker script for the bare-metal build. Without `-T` rust-lld
//! would "succeed" with an empty image (TESTING.md), and the multiboot header
//! must be kept and placed first.

fn main() {
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
    // Only the bare-metal image uses the script; a host build (for example
    // `cargo clippy --workspace`) compiles a stub `main` instead.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
        // No RELRO: nothing remaps it read-only, and its segment would
        // cover `.data` (which holds `.got`).
        println!("cargo:rustc-link-arg-bins=-znorelro");
    }
}
