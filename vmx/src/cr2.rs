//! The guest's CR2 across VM entries and exits.
//!
//! The VMCS guest-state area holds CR0, CR3 and CR4 but not CR2 (SDM Vol.
//! 3C 25.4.1), and neither a VM entry nor a VM exit loads or saves it (27.3.2,
//! 28.5): a page fault in a guest leaves its address in the CPU's one CR2,
//! where the next VM time-sliced on this CPU would read it. So each vCPU
//! keeps its guest's CR2, takes it from the CPU after every exit and puts it
//! back before every entry. MOV to CR2 is serializing (SDM Vol. 3A 10.3),
//! so it is written only when the value differs — after another VM's page
//! fault, not on the ordinary exit path.

/// CR2 as the switch sees it: the CPU's register ([`crate::hw::Cr2`]) or a
/// test's stand-in.
pub trait Cr2Register {
    fn get(&self) -> u64;
    fn set(&mut self, value: u64);
}

/// One guest's CR2 while it is not in the register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestCr2(pub u64);

impl GuestCr2 {
    /// Before VM entry: the register holds the guest's value.
    #[inline(always)]
    pub fn load(self, reg: &mut impl Cr2Register) {
        if reg.get() != self.0 {
            reg.set(self.0);
        }
    }

    /// After a VM exit: what the guest left in the register.
    #[inline(always)]
    pub fn save(&mut self, reg: &impl Cr2Register) {
        self.0 = reg.get();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CR2 that counts writes.
    struct Reg {
        value: u64,
        writes: u32,
    }

    impl Cr2Register for Reg {
        fn get(&self) -> u64 {
            self.value
        }
        fn set(&mut self, value: u64) {
            self.value = value;
            self.writes += 1;
        }
    }

    /// One entry-to-exit run of a vCPU whose guest may take a page fault.
    fn run(vcpu: &mut GuestCr2, cpu: &mut Reg, fault_at: Option<u64>) -> u64 {
        vcpu.load(cpu);
        let seen = cpu.value; // what the guest reads with MOV from CR2
        if let Some(a) = fault_at {
            cpu.value = a; // the CPU's page-fault delivery
        }
        vcpu.save(cpu);
        seen
    }

    #[test]
    fn vms_sharing_a_cpu_each_see_their_own_cr2() {
        let mut cpu = Reg { value: 0xdead_0000, writes: 0 }; // left by the host
        let (mut a, mut b) = (GuestCr2(0), GuestCr2(0));
        assert_eq!(run(&mut a, &mut cpu, Some(0x10_0000_15a8)), 0, "not the host's value");
        assert_eq!(run(&mut b, &mut cpu, Some(0x10_0000_25a8)), 0, "not vm a's fault");
        assert_eq!(run(&mut a, &mut cpu, None), 0x10_0000_15a8);
        assert_eq!(run(&mut b, &mut cpu, None), 0x10_0000_25a8);
        assert_eq!((a, b), (GuestCr2(0x10_0000_15a8), GuestCr2(0x10_0000_25a8)), "what state() reports");
    }

    #[test]
    fn the_register_is_written_only_when_it_differs() {
        let mut cpu = Reg { value: 0, writes: 0 };
        let mut a = GuestCr2(0);
        for _ in 0..100 {
            run(&mut a, &mut cpu, None);
        }
        assert_eq!(cpu.writes, 0, "one VM, no faults: the exit path never writes CR2");
        run(&mut a, &mut cpu, Some(0x5000));
        run(&mut a, &mut cpu, None);
        assert_eq!(cpu.writes, 0, "its own fault is already in the register");
        let mut b = GuestCr2(0x7000); // e.g. from set_state()
        assert_eq!(run(&mut b, &mut cpu, None), 0x7000);
        assert_eq!(run(&mut a, &mut cpu, None), 0x5000);
        assert_eq!(cpu.writes, 2, "one write per switch to a VM with another CR2");
    }
}
