//! Host machine checks, after the #MC handler: the errors it logged
//! (`mca::host::HOST_ERRORS`) are reported, and an uncorrected memory
//! error's frame is taken away from every VM page in it (`mm`'s
//! `mark_poisoned`: unmapped for good, the frame quarantined). A guest that
//! touches such a page gets a machine check (`mca::vmce`); a migration or
//! checkpoint carries it as poisoned, never as data.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use mm::addr::HostPhysAddr;

use super::Manager;
use crate::backend::Backend;
use crate::mca::host::{Action, BankError, HOST_ERRORS};
use crate::vm::Resources;
use crate::vm::exit::Console;

/// What the host's machine checks have done, since boot (`host`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineCheckStats {
    /// Bank errors reported by #MC handlers.
    pub errors: u64,
    /// Uncorrected memory errors with an address.
    pub memory_errors: u64,
    /// Guest pages poisoned because of them.
    pub pages_poisoned: u64,
}

impl<B: Backend> Manager<B> {
    /// Act on the machine checks host CPUs took since the last call.
    pub fn machine_check_round(&mut self, console: &mut impl Console) {
        let mut errors = Vec::new();
        HOST_ERRORS.take(|e| errors.push(e));
        for e in errors {
            self.host_machine_check(e, console);
        }
    }

    /// One bank's error from a host CPU's #MC handler.
    pub fn host_machine_check(&mut self, e: BankError, console: &mut impl Console) {
        self.machine_checks.errors += 1;
        let head = format!("machine check: cpu {} bank {} status {:#018x}", e.cpu, e.bank, e.status);
        let hpa = match e.action {
            Action::Poison(hpa) => hpa,
            Action::Nothing | Action::Log | Action::Fatal(_) => {
                let what = if e.status & crate::mca::status::UC == 0 { "corrected" } else { "no address to act on" };
                console.line(&format!("{head}: {what}; logged"));
                return;
            }
        };
        self.machine_checks.memory_errors += 1;
        let mut lost: Vec<String> = Vec::new();
        let mut failed: Vec<String> = Vec::new();
        if let Ok(backend) = self.backend.as_mut() {
            let host = &mut self.host_mem;
            for vm in self.vms.iter_mut() {
                let id = vm.id;
                let Some(Resources { mem, vcpus, .. }) = vm.res.as_mut() else { continue };
                for gpa in mem.pages_in_frame(HostPhysAddr(hpa)) {
                    let alloc = backend.mem();
                    let r = host
                        .with_hooks(id, |h| mem.mark_poisoned(alloc, h, gpa, &mut |s| crate::vm::flush_all(vcpus, s)));
                    match r {
                        Ok(()) => {
                            self.machine_checks.pages_poisoned += 1;
                            lost.push(format!("vm {id} page {:#x}", gpa.0));
                        }
                        Err(err) => failed.push(format!("vm {id} page {:#x}: {err}", gpa.0)),
                    }
                }
            }
        }
        let whose = if lost.is_empty() && failed.is_empty() {
            String::from("not guest memory (no guest page lost)")
        } else if failed.is_empty() {
            format!("poisoned {}", lost.join(", "))
        } else {
            format!("poisoned {}; could not poison {}", lost.join(", "), failed.join(", "))
        };
        console.line(&format!("{head}: uncorrected memory error at host-physical {hpa:#x}: {whose}"));
    }
}
