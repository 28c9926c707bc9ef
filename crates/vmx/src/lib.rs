//! thinvisor's Intel VT-x backend (Intel SDM vol. 3C, chapters 24-28).
#![no_std]

pub mod caps;
