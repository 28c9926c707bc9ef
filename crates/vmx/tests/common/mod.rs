//! Capability MSRs of the Bochs 2.7 Intel CPU models, and helpers shared by
//! the test binaries.
//!
//! Harvested with a throwaway multiboot kernel (32-bit GNU as, booted from a
//! `grub-mkrescue` ISO) that printed CPUID.1:ECX and RDMSR of 0x3A and
//! 0x480..=0x491 to COM1, catching #GP; run per model as
//! `SDL_VIDEODRIVER=dummy bochs -q -f rc -rc cmds < /dev/null` with
//! `cpu: model=<model>, ips=2000000` in `rc` and `c`/`quit` in `cmds`.
//! No model faulted on any of these MSRs. All four report CPUID.1:ECX =
//! 0x77faf3bf (VMX, bit 5, set) and IA32_FEATURE_CONTROL = 0x5 (locked,
//! VMX outside SMX).
#![allow(dead_code)]

use thinvisor_vmx::caps::VmxCapabilities;

/// One Bochs CPU model: its name and (MSR, value) pairs.
pub struct Model {
    pub name: &'static str,
    pub msrs: &'static [(u32, u64)],
}

pub const CPUID_1_ECX: u32 = 0x77fa_f3bf;

pub const SKYLAKE_X: Model = Model {
    name: "corei7_skylake_x",
    msrs: &[
        (0x03a, 0x0000_0000_0000_0005),
        (0x480, 0x00d8_1000_0000_002b),
        (0x481, 0x0000_007f_0000_0016),
        (0x482, 0xf7f9_fffe_0401_e172),
        (0x483, 0x007f_ffff_0003_6dff),
        (0x484, 0x0000_ffff_0000_11ff),
        (0x485, 0x0000_0000_6004_01e0),
        (0x486, 0x0000_0000_8000_0021),
        (0x487, 0x0000_0000_ffff_ffff),
        (0x488, 0x0000_0000_0000_2000),
        (0x489, 0x0000_0000_0037_27ff),
        (0x48a, 0x0000_0000_0000_0034),
        (0x48b, 0x0217_7fff_0000_0000),
        (0x48c, 0x0000_0f01_0633_4141),
        (0x48d, 0x0000_007f_0000_0016),
        (0x48e, 0xf7f9_fffe_0400_6172),
        (0x48f, 0x007f_ffff_0003_6dfb),
        (0x490, 0x0000_ffff_0000_11fb),
        (0x491, 0x0000_0000_0000_0001),
    ],
};

pub const ICELAKE_U: Model = Model {
    name: "corei7_icelake_u",
    msrs: &[
        (0x03a, 0x0000_0000_0000_0005),
        (0x480, 0x00d8_1000_0000_0004),
        (0x481, 0x0000_007f_0000_0016),
        (0x482, 0xfff9_fffe_0401_e172),
        (0x483, 0x007f_ffff_0003_6dff),
        (0x484, 0x0000_ffff_0000_11ff),
        (0x485, 0x0000_0000_6004_01e0),
        (0x486, 0x0000_0000_8000_0021),
        (0x487, 0x0000_0000_ffff_ffff),
        (0x488, 0x0000_0000_0000_2000),
        (0x489, 0x0000_0000_0077_2fff),
        (0x48a, 0x0000_0000_0000_0034),
        (0x48b, 0x0297_7fff_0000_0000),
        (0x48c, 0x0000_0f01_0633_4141),
        (0x48d, 0x0000_007f_0000_0016),
        (0x48e, 0xfff9_fffe_0400_6172),
        (0x48f, 0x007f_ffff_0003_6dfb),
        (0x490, 0x0000_ffff_0000_11fb),
        (0x491, 0x0000_0000_0000_0001),
    ],
};

pub const TIGERLAKE: Model = Model {
    name: "tigerlake",
    msrs: &[
        (0x03a, 0x0000_0000_0000_0005),
        (0x480, 0x01d8_1000_0000_0004),
        (0x481, 0x0000_007f_0000_0016),
        (0x482, 0xfff9_fffe_0401_e172),
        (0x483, 0x107f_ffff_0003_6dff),
        (0x484, 0x0010_ffff_0000_11ff),
        (0x485, 0x0000_0000_6004_01e0),
        (0x486, 0x0000_0000_8000_0021),
        (0x487, 0x0000_0000_ffff_ffff),
        (0x488, 0x0000_0000_0000_2000),
        (0x489, 0x0000_0000_00f7_2fff),
        (0x48a, 0x0000_0000_0000_0034),
        (0x48b, 0x0297_7fff_0000_0000),
        (0x48c, 0x0000_0f01_06b3_4141),
        (0x48d, 0x0000_007f_0000_0016),
        (0x48e, 0xfff9_fffe_0400_6172),
        (0x48f, 0x107f_ffff_0003_6dfb),
        (0x490, 0x0010_ffff_0000_11fb),
        (0x491, 0x0000_0000_0000_0001),
    ],
};

pub const HASWELL_4770: Model = Model {
    name: "corei7_haswell_4770",
    msrs: &[
        (0x03a, 0x0000_0000_0000_0005),
        (0x480, 0x00d8_1000_0000_002b),
        (0x481, 0x0000_007f_0000_0016),
        (0x482, 0xf7f9_fffe_0401_e172),
        (0x483, 0x007f_ffff_0003_6dff),
        (0x484, 0x0000_ffff_0000_11ff),
        (0x485, 0x0000_0000_2004_01e0),
        (0x486, 0x0000_0000_8000_0021),
        (0x487, 0x0000_0000_ffff_ffff),
        (0x488, 0x0000_0000_0000_2000),
        (0x489, 0x0000_0000_0017_27ff),
        (0x48a, 0x0000_0000_0000_0034),
        (0x48b, 0x0004_7fff_0000_0000),
        (0x48c, 0x0000_0f01_0633_4141),
        (0x48d, 0x0000_007f_0000_0016),
        (0x48e, 0xf7f9_fffe_0400_6172),
        (0x48f, 0x007f_ffff_0003_6dfb),
        (0x490, 0x0000_ffff_0000_11fb),
        (0x491, 0x0000_0000_0000_0001),
    ],
};

pub const MODELS: [&Model; 4] = [&SKYLAKE_X, &ICELAKE_U, &TIGERLAKE, &HASWELL_4770];

impl Model {
    /// The value of `msr`, `None` for one the model does not have.
    pub fn rdmsr(&self, msr: u32) -> Option<u64> {
        self.msrs.iter().find(|&&(m, _)| m == msr).map(|&(_, v)| v)
    }

    /// The capabilities as `VmxCapabilities::read` sees them on this model.
    pub fn caps(&self) -> VmxCapabilities {
        VmxCapabilities::read(|m| self.rdmsr(m))
    }
}

/// `value` respects a control capability word: every allowed-0 bit (low
/// half) set, no bit outside allowed-1 (high half) set.
pub fn satisfies(cap: u64, value: u32) -> bool {
    let (must, may) = (cap as u32, (cap >> 32) as u32);
    value & must == must && value & !may == 0
}
