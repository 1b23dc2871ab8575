//! The `mem` commands: host and per-VM memory by page state, page sharing
//! on/off and scans, and per-VM memory targets.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde_json::{Value, json};

use super::commands::{HostStatus, Reply};
use crate::backend::Backend;
use crate::manager::Manager;
use crate::memory::MIN_TARGET_PAGES;

const PAGE: u64 = 4096;

fn kib(pages: u64) -> u64 {
    pages * PAGE / 1024
}

/// `mem`: the whole picture.
pub(super) fn show<B: Backend>(m: &Manager<B>, h: &HostStatus) -> Reply {
    let hm = &m.host_mem;
    let live: Vec<_> = m.vms.iter().filter(|v| v.res.is_some()).collect();
    let configured: u64 = live.iter().map(|v| v.mem_bytes).sum();
    let mut private = 0;
    let mut rows = String::new();
    let mut vms = Vec::new();
    for vm in &live {
        let Some(res) = vm.res.as_ref() else { continue };
        let c = res.mem.state_counts();
        private += c.present;
        let file = hm.swap.as_ref().and_then(|s| s.file_usage(vm.id));
        let r = &vm.reclaim;
        rows.push_str(&format!(
            "\n{:>4}  {:<10} {:>5} {:>8} {:>6} {:>7} {:>8} {:>9} {:>8}  {}",
            vm.id,
            vm.guest,
            vm.mem_bytes >> 20,
            c.present,
            c.zero,
            c.shared,
            c.swapped,
            c.ballooned,
            r.target.map_or(String::from("-"), |t| format!("{}", t)),
            match file {
                Some((used, limit)) => format!("{used}/{limit}"),
                None => String::from("none"),
            }
        ));
        if let Some(why) = &r.stuck {
            rows.push_str(&format!("\n      target not met: {why}"));
        }
        if let Some(p) = &r.planned {
            rows.push_str(&format!(
                "\n      host plan: balloon +{}, swap {}, share-scan {} pages; classes: {} idle, {} active, {} zero, {} duplicate, {} shared; {}",
                p.action.balloon_pages,
                p.action.swap_pages,
                p.action.share_scan_pages,
                p.classes.idle,
                p.classes.active,
                p.classes.zero,
                p.classes.duplicate,
                p.classes.shared,
                p.why
            ));
        }
        vms.push(json!({
            "id": vm.id,
            "guest": vm.guest,
            "mem_mib": vm.mem_bytes >> 20,
            "pages": {
                "present": c.present, "zero": c.zero, "shared": c.shared, "ballooned": c.ballooned,
                "swapped": c.swapped, "poisoned": c.poisoned, "not_loaded": c.not_loaded,
            },
            "target_pages": r.target,
            "target_met": r.target.is_none_or(|t| c.present <= t),
            "stuck": r.stuck,
            "swap_file": file.map(|(used, limit)| json!({ "used_pages": used, "limit_pages": limit })),
            "no_swap": r.no_swap.as_ref().map(|n| format!("{n}")),
            "swapped_out": r.swapped_out,
            "swapped_in": r.swapped_in,
            "cow_breaks": r.cow_breaks,
            "bookkeeping_bytes": res.mem.bookkeeping_bytes(),
            "balloon_driver": vm.devices.balloon().is_some_and(|b| b.negotiated() != 0),
            "host_plan": r.planned.map(|p| json!({
                "balloon_pages": p.action.balloon_pages,
                "swap_pages": p.action.swap_pages,
                "share_scan_pages": p.action.share_scan_pages,
                "class": { "idle": p.classes.idle, "active": p.classes.active, "zero": p.classes.zero,
                           "duplicate": p.classes.duplicate, "shared": p.classes.shared },
                "why": p.why,
            })),
        }));
    }
    let share = hm.sharing.as_ref().map(|s| s.stats()).unwrap_or_default();
    let st = hm.stats;
    // What the manager itself costs: per-VM page states and maps, the
    // sharing index, the swap maps.
    let vm_books: u64 = live.iter().filter_map(|v| v.res.as_ref()).map(|r| r.mem.bookkeeping_bytes()).sum();
    let books = vm_books
        + hm.sharing.as_ref().map_or(0, |s| s.bookkeeping_bytes())
        + hm.swap.as_ref().map_or(0, |s| s.bookkeeping_bytes());
    // Per GiB of guest RAM, in bytes.
    let books_per_gib = if configured == 0 { 0 } else { (books as u128 * (1 << 30) / configured as u128) as u64 };
    let mut text = format!(
        "host: {} MiB usable, {} MiB free; {} live VMs with {} MiB configured, {} KiB in private frames",
        h.mem_usable_bytes >> 20,
        h.mem_free_bytes >> 20,
        live.len(),
        configured >> 20,
        kib(private)
    );
    text.push_str(&format!(
        "\nbookkeeping: {} KiB ({} KiB per VM state tables; {} KiB per GiB of guest RAM, {}.{:03}%)",
        books / 1024,
        vm_books / 1024,
        books_per_gib / 1024,
        books_per_gib * 100 / (1 << 30),
        books_per_gib * 100_000 / (1 << 30) % 1000
    ));
    text.push_str(&format!(
        "\nsharing: {}; {} shared frames hold {} pages, {} zero pages; {} frames saved ({} KiB)\n  \
         since boot: {} pages scanned, {} merged, {} frames freed, {} copy-on-write breaks",
        if hm.sharing_enabled { format!("on ({} pages/round)", hm.scan_pages_per_round) } else { "off".into() },
        share.shared_frames,
        share.shared_refs,
        share.zero_refs,
        share.saved_frames,
        kib(share.saved_frames),
        st.scanned,
        st.merged,
        st.frames_freed,
        st.cow_breaks
    ));
    let swap_json = match &hm.swap {
        Some(s) => {
            let rs = s.stats();
            text.push_str(&format!(
                "\nswap: {} ({:?}): {} slots, {} reserved, {} in use, {} retired; {} pages out, {} in since boot",
                s.device, s.attached, rs.slots, rs.reserved, rs.in_files, rs.retired, st.swapped_out, st.swapped_in
            ));
            json!({
                "device": s.device, "slots": rs.slots, "reserved": rs.reserved, "in_use": rs.in_files,
                "retired": rs.retired, "swapped_out": st.swapped_out, "swapped_in": st.swapped_in,
            })
        }
        None => {
            text.push_str(&format!("\nswap: none ({})", hm.swap_missing));
            Value::Null
        }
    };
    if st.out_of_memory > 0 {
        text.push_str(&format!(
            "\nout of frames: {} times since boot; {} VMs stopped when nothing could be reclaimed",
            st.out_of_memory, st.oom_stopped
        ));
    }
    if let Some(t) = hm.host_target {
        text.push_str(&format!("\nhost target: {} MiB free (planned about once a second)", t >> 8));
    }
    text.push_str("\n  ID  GUEST        MiB  PRESENT   ZERO  SHARED  SWAPPED  BALLOONED   TARGET  SWAP FILE (pages)");
    if live.is_empty() {
        text.push_str("\n  (no live VMs)");
    }
    text.push_str(&rows);
    let json = json!({
        "host": {
            "usable_bytes": h.mem_usable_bytes,
            "free_bytes": h.mem_free_bytes,
            "configured_bytes": configured,
            "private_pages": private,
            "bookkeeping_bytes": books,
            "vm_bookkeeping_bytes": vm_books,
            "bookkeeping_bytes_per_gib": books_per_gib,
            "out_of_memory": st.out_of_memory,
            "oom_stopped": st.oom_stopped,
            "target_free_pages": hm.host_target,
        },
        "sharing": {
            "enabled": hm.sharing_enabled,
            "pages_per_round": hm.scan_pages_per_round,
            "shared_frames": share.shared_frames,
            "shared_pages": share.shared_refs,
            "zero_pages": share.zero_refs,
            "saved_frames": share.saved_frames,
            "scanned": st.scanned,
            "merged": st.merged,
            "frames_freed": st.frames_freed,
            "cow_breaks": st.cow_breaks,
            "bookkeeping_bytes": hm.sharing.as_ref().map_or(0, |s| s.bookkeeping_bytes()),
        },
        "swap": swap_json,
        "swap_missing": if hm.swap.is_none() { Some(format!("{}", hm.swap_missing)) } else { None },
        "vms": vms,
    });
    Reply { text, json }
}

/// `mem sharing on|off`.
pub(super) fn sharing<B: Backend>(m: &mut Manager<B>, on: bool, pages: Option<usize>) -> Result<Reply, String> {
    m.backend.as_ref().map_err(|why| format!("virtualization is unavailable: {why}"))?;
    let hm = &mut m.host_mem;
    if on && hm.sharing.is_none() {
        return Err("page sharing is unavailable: the host had no frame for the zero page".into());
    }
    hm.sharing_enabled = on;
    if let Some(p) = pages {
        hm.scan_pages_per_round = p;
    }
    let text = if on {
        format!("sharing on: scanning {} pages per scheduling round", hm.scan_pages_per_round)
    } else {
        String::from("sharing off: no background scans (shared pages stay shared)")
    };
    Ok(Reply { text, json: json!({ "enabled": on, "pages_per_round": hm.scan_pages_per_round }) })
}

/// `mem scan [<id>]`.
pub(super) fn scan<B: Backend>(m: &mut Manager<B>, id: Option<u32>) -> Result<Reply, String> {
    let r = m.share_now(id)?;
    let share = m.host_mem.sharing.as_ref().map(|s| s.stats()).unwrap_or_default();
    let text = format!(
        "scanned {} pages ({} hashed): {} merged into the zero page, {} into shared frames, {} frames freed ({} KiB); \
         {} already shared, {} skipped; host saves {} frames",
        r.scanned,
        r.hashed,
        r.zero_merged,
        r.shared_merged,
        r.frames_freed,
        kib(r.frames_freed),
        r.already_shared,
        r.skipped,
        share.saved_frames
    );
    Ok(Reply {
        text,
        json: json!({
            "scanned": r.scanned, "hashed": r.hashed, "zero_merged": r.zero_merged,
            "shared_merged": r.shared_merged, "frames_freed": r.frames_freed,
            "already_shared": r.already_shared, "skipped": r.skipped,
            "large_broken": r.large_broken, "saved_frames": share.saved_frames,
        }),
    })
}

/// `mem target <id> <MiB>|none`.
/// `mem target host <MiB>|none`.
pub(super) fn host_target<B: Backend>(m: &mut Manager<B>, mib: Option<u32>) -> Reply {
    let pages = mib.map(|v| u64::from(v) << 8);
    m.set_host_target(pages);
    let text = match mib {
        Some(v) => format!(
            "host target: {v} MiB free; met across VMs by sharing, then ballooning (guests with a balloon driver) \
             or swapping (the others)"
        ),
        None => String::from("host target: none (balloons and VM targets set so far stay)"),
    };
    Reply { text, json: json!({ "target_free_pages": pages }) }
}

pub(super) fn target<B: Backend>(m: &mut Manager<B>, id: u32, mib: Option<u32>) -> Result<Reply, String> {
    let pages = mib.map(|v| u64::from(v) << 8);
    m.set_target(id, pages)?;
    let text = match pages {
        Some(p) => format!(
            "vm {id}: target {} MiB ({p} pages); reclaimed by sharing, then swapping (minimum {} KiB)",
            p >> 8,
            kib(MIN_TARGET_PAGES)
        ),
        None => format!("vm {id}: no target"),
    };
    Ok(Reply { text, json: json!({ "id": id, "target_pages": pages }) })
}

/// `vm page <id> <gpa>`: the page's state and the host frame holding its
/// contents (to match a host machine check's address to a guest page, or
/// the other way round).
pub(super) fn page<B: Backend>(m: &Manager<B>, id: u32, gpa: u64) -> Result<Reply, String> {
    let vm = m.get(id).ok_or_else(|| format!("no VM {id}"))?;
    let res = vm.res.as_ref().ok_or_else(|| format!("vm {id} has ended: its memory is gone"))?;
    let at = mm::addr::GuestPhysAddr(gpa);
    let state = res.mem.page_state(at).ok_or_else(|| format!("{gpa:#x} is not RAM of vm {id}"))?;
    let frame = res.mem.page_frame(at).map(|f| f.0);
    let page = gpa & !(PAGE - 1);
    let text = match frame {
        Some(f) => format!("vm {id} page {page:#x}: {}, host frame {f:#x}", state.name()),
        None => format!("vm {id} page {page:#x}: {}, no host frame", state.name()),
    };
    Ok(Reply { text, json: json!({ "id": id, "gpa": page, "state": state.name(), "host_frame": frame }) })
}
