//! The background fill of lazily restored VMs (`vm restore <name> lazy`):
//! between scheduling rounds, a bounded number of not-loaded pages per VM
//! come in from its checkpoint, at the VM's fill rate, until none is left
//! on disk; then the page source and its index are dropped. A read that
//! failed (here, or on a device's access to guest memory, or in a fault's
//! read-ahead) stops the VM with one line naming the checkpoint, the page
//! and the record.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::{Manager, detach_port, release};
use crate::backend::Backend;
use crate::memory::lazy::{BACKGROUND_BLOCK, LazyProgress};
use crate::vm::exit::Console;
use crate::vm::{Resources, RunState};

/// Pages the background fill loads per VM and round at most: four loads of
/// `BACKGROUND_BLOCK` pages, which bounds how long a round keeps the CPU
/// from the VMs and the console (each load reads one or two records, each
/// at most 1 MiB).
pub const FILL_PAGES_PER_ROUND: u64 = 4 * BACKGROUND_BLOCK as u64;

impl<B: Backend> Manager<B> {
    /// One round of background fill for every lazily restored VM whose
    /// rate allows one now. Called between scheduling rounds, also when no
    /// VM wanted the CPU (an idle host converges fastest).
    pub fn lazy_fill_round(&mut self, console: &mut impl Console) {
        if self.host_mem.lazy.is_empty() {
            return;
        }
        let Manager { backend, vms, host_mem, switches, .. } = self;
        let Ok(backend) = backend.as_mut() else { return };
        let (now, hz) = (backend.now(), backend.tsc_hz());
        let ids: Vec<u32> = host_mem.lazy.keys().copied().collect();
        for id in ids {
            let Some(vm) = vms.iter_mut().find(|v| v.id == id && v.res.is_some()) else {
                // Its VM ended without freeing (cannot happen: release
                // drops the source); drop it anyway.
                host_mem.lazy.remove(&id);
                continue;
            };
            let Some(Resources { mem, vcpus, .. }) = vm.res.as_mut() else { continue };
            let Some(src) = host_mem.lazy.get_mut(&id) else { continue };
            let due = src.failure.is_none() && src.progress.fill_rate > 0 && now >= src.next_fill_tsc;
            let (rate, mut from) = (src.progress.fill_rate, src.fill_cursor);
            let mut failed = src.failure.clone();
            if due {
                src.set_background(true);
                let before = mem.state_counts().not_loaded;
                let mut wrapped = false;
                while failed.is_none() && before - mem.state_counts().not_loaded < FILL_PAGES_PER_ROUND {
                    let alloc = backend.mem();
                    let loaded = host_mem.with_hooks(id, |h| {
                        mem.load_next_not_loaded(alloc, h, from, &mut |s| crate::vm::flush_all(vcpus, s))
                    });
                    match loaded {
                        Ok(Some(at)) => from = at,
                        // Pages behind the cursor are loaded unless a touch
                        // failed on one; look from the start once.
                        Ok(None) if !wrapped && mem.state_counts().not_loaded > 0 => {
                            wrapped = true;
                            from = mm::GuestPhysAddr(0);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            failed = Some(host_mem.lazy_failure(id).map_or_else(
                                || format!("lazy restore: loading guest page {:#x} failed: {e}", from.0),
                                String::from,
                            ));
                        }
                    }
                }
                let loaded = before - mem.state_counts().not_loaded;
                if let Some(src) = host_mem.lazy.get_mut(&id) {
                    src.set_background(false);
                    src.fill_cursor = from;
                    // The next round when this one's pages have been paid
                    // for at the fill rate.
                    let wait = u128::from(loaded.max(1)) * u128::from(hz) / u128::from(rate.max(1));
                    src.next_fill_tsc = now.saturating_add(wait.min(u128::from(u64::MAX)) as u64);
                }
            }
            let Some(src) = host_mem.lazy.get_mut(&id) else { continue };
            let on_disk = mem.state_counts().not_loaded;
            src.progress.on_disk = on_disk;
            let mut progress = src.progress;
            let checkpoint = src.checkpoint.clone();
            if let Some(reason) = failed {
                vm.stats.lazy = Some(progress);
                vm.end(RunState::Stopped { reason }, backend, console);
                release(backend, host_mem, vm);
                detach_port(switches, id);
            } else if on_disk == 0 {
                // Everything is in memory: the checkpoint is free again.
                progress.complete = true;
                vm.stats.lazy = Some(progress);
                host_mem.lazy.remove(&id);
                console.line(&format!(
                    "vm {id}: lazy restore from checkpoint {checkpoint} complete: {}",
                    progress_text(&progress)
                ));
            } else {
                vm.stats.lazy = Some(progress);
            }
        }
    }

    /// VM `id`'s lazy-restore progress as of now, if it was restored lazily.
    pub fn lazy_progress(&self, id: u32) -> Option<LazyProgress> {
        let vm = self.get(id)?;
        let mut p = self.host_mem.lazy.get(&id).map(|s| s.progress).or(vm.stats.lazy)?;
        if let Some(res) = vm.res.as_ref() {
            p.on_disk = res.mem.state_counts().not_loaded;
        }
        Some(p)
    }
}

/// "4096 pages: 12 by fault (3 faults), 180 by read-ahead, 3904 by background fill; 9 records read".
pub fn progress_text(p: &LazyProgress) -> String {
    format!(
        "{} pages: {} by fault ({} faults), {} by read-ahead, {} by background fill; {} records read ({} KiB)",
        p.pages_at_start,
        p.by_fault,
        p.faults,
        p.by_readahead,
        p.by_background,
        p.records_read,
        p.bytes_read.div_ceil(1024)
    )
}
