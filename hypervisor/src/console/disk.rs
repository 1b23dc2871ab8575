//! The `disk` commands: the data disk's extents (swap, VM disk images,
//! checkpoints), listed, created and deleted through the space manager
//! (`disk::space`, kept in `HostMemory::space`).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde_json::{Value, json};

use super::commands::{HostStatus, Reply};
use crate::backend::Backend;
use crate::devices::rtc::utc_text;
use crate::disk::image::{HEADER_BLOCKS, Image};
use crate::disk::space::{ExtentInfo, HostSpaceSummary};
use crate::manager::Manager;
use crate::memory::HostSpace;

/// Bytes to MiB with one decimal ("31.5").
fn mib_text(bytes: u64) -> String {
    let tenths = (u128::from(bytes) * 10 + (1 << 19)) >> 20;
    format!("{}.{}", tenths / 10, tenths % 10)
}

fn space<B: Backend>(m: &Manager<B>) -> Result<&HostSpace, String> {
    m.host_mem.space.as_ref().ok_or_else(|| format!("no data disk ({})", m.host_mem.swap_missing))
}

fn extent_json(e: &ExtentInfo) -> Value {
    json!({
        "name": e.name.as_str(),
        "kind": e.kind.name(),
        "start_block": e.start,
        "blocks": e.blocks,
        "size_bytes": e.capacity_bytes(),
        "bytes": e.bytes,
        "created": e.created,
        "complete": e.complete,
        "meta": e.meta,
    })
}

/// The table in one JSON object (also part of `host --json`).
pub(super) fn summary_json(s: &HostSpace) -> Value {
    let sum = HostSpaceSummary::of(s);
    json!({
        "disk_blocks": s.disk_blocks(),
        "generation": s.generation(),
        "copy": format!("{}", s.current_copy()),
        "extents": s.list().len(),
        "images": sum.images,
        "checkpoints": sum.checkpoints,
        "swap_blocks": sum.swap_blocks,
        "free_blocks": s.free_blocks(),
        "largest_free_blocks": sum.largest_free,
    })
}

/// One line for `host`.
pub(super) fn summary_text(s: &HostSpace) -> String {
    let sum = HostSpaceSummary::of(s);
    format!(
        "data disk: {} MiB, table generation {} (copy {}): swap {} MiB, {} images, {} checkpoints, {} MiB free",
        mib_text(s.disk_blocks() * 512),
        s.generation(),
        s.current_copy(),
        mib_text(sum.swap_blocks * 512),
        sum.images,
        sum.checkpoints,
        mib_text(s.free_blocks() * 512)
    )
}

/// `disk list`.
pub(super) fn list<B: Backend>(m: &Manager<B>) -> Result<Reply, String> {
    let s = space(m)?;
    let mut text =
        String::from("NAME                              KIND        SIZE(MiB)  CREATED (UTC)        COMPLETE");
    for e in s.list() {
        text.push_str(&format!(
            "\n{:<32}  {:<10}  {:>9}  {}  {}",
            e.name.as_str(),
            e.kind.name(),
            mib_text(e.capacity_bytes()),
            utc_text(e.created),
            if e.complete { "yes" } else { "no (being written)" }
        ));
    }
    text.push_str(&format!(
        "\n{} MiB free of {} MiB",
        mib_text(s.free_blocks() * 512),
        mib_text(s.disk_blocks() * 512)
    ));
    let extents: Vec<Value> = s.list().iter().map(extent_json).collect();
    let mut j = json!({ "extents": extents });
    if let (Value::Object(o), Value::Object(sum)) = (&mut j, summary_json(s)) {
        o.extend(sum.into_iter().filter(|(k, _)| k != "extents"));
    }
    Ok(Reply { text, json: j })
}

/// `disk create <name> <MiB> [from=<file>]`: an image of that many MiB for
/// a VM's virtio-blk disk (`vm run ... disk=<name>`). Only its header is
/// written (`disk::image`): the rest reads as zeros until the guest writes
/// it; with `from=`, the ramdisk file's bytes are its start (the last
/// block zero-padded).
pub(super) fn create<B: Backend>(
    m: &mut Manager<B>,
    h: &HostStatus,
    name: &str,
    mib: u32,
    from: Option<&str>,
) -> Result<Reply, String> {
    let now = m.host_epoch + h.uptime_us / 1_000_000;
    let source: Option<&'static [u8]> = match from {
        None => None,
        Some(f) => {
            let bytes = m.image_bytes(f).ok_or_else(|| format!("no ramdisk file {f:?} to copy"))?;
            if bytes.len() as u64 > u64::from(mib) << 20 {
                return Err(format!("{f} is {} bytes: more than {mib} MiB", bytes.len()));
            }
            Some(bytes)
        }
    };
    let s = m.host_mem.space.as_mut().ok_or_else(|| format!("no data disk ({})", m.host_mem.swap_missing))?;
    // The header's blocks come on top of the size asked for.
    let blocks = (u64::from(mib) << 11) + HEADER_BLOCKS;
    let e = s.create_image(name, blocks, now).map_err(|e| format!("{e}"))?;
    let header = s.extent_store(name).map_err(|e| format!("{e}")).and_then(|store| {
        let mut img = Image::create(store).map_err(|e| format!("cannot write its header: {e}"))?;
        if let Some(bytes) = source {
            copy_into(&mut img, bytes).map_err(|e| format!("cannot copy {}: {e}", from.unwrap_or("")))?;
        }
        Ok(img.capacity())
    });
    let capacity = match header {
        Ok(c) => c,
        Err(why) => {
            // Leave nothing half-made behind.
            let _ = s.delete(name, |_| None);
            return Err(format!("disk {name}: {why}"));
        }
    };
    let mut j = extent_json(&e);
    if let Value::Object(o) = &mut j {
        o.insert("capacity_bytes".into(), capacity.into());
        o.insert("copied_bytes".into(), source.map_or(0, |b| b.len()).into());
    }
    let how = match (from, source) {
        (Some(f), Some(b)) => format!("{} bytes copied from {f}, the rest zero-filled lazily", b.len()),
        _ => String::from("zero-filled lazily: only its header was written"),
    };
    Ok(Reply {
        text: format!("disk {} created: {} MiB image at block {} ({how})", e.name, mib_text(capacity), e.start),
        json: j,
    })
}

/// Writes `bytes` at the start of `img` in 64 KiB requests, the last one
/// padded with zeros to whole blocks, then flushes.
fn copy_into<D: mm::swap::BlockStore>(img: &mut Image<D>, bytes: &[u8]) -> Result<(), crate::disk::image::ImageError> {
    const CHUNK: usize = 64 * 1024;
    let block = mm::swap::BLOCK_SIZE;
    for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
        let offset = (i * CHUNK) as u64;
        if chunk.len().is_multiple_of(block) {
            img.write(offset, chunk)?;
        } else {
            let mut padded = alloc::vec![0u8; chunk.len().next_multiple_of(block)];
            padded[..chunk.len()].copy_from_slice(chunk);
            img.write(offset, &padded)?;
        }
    }
    img.flush()
}

/// `disk delete <name>`: refused for the swap extent, for an image a VM
/// uses (`Manager::disk_user`) and for a checkpoint a lazily restored VM
/// still reads.
pub(super) fn delete<B: Backend>(m: &mut Manager<B>, name: &str) -> Result<Reply, String> {
    super::checkpoint::lazy_user(m, name)?;
    if let Some(cp) = m.live_save_target()
        && (name == cp || name == super::checkpoint::disk_snapshot_name(&cp))
    {
        return Err(format!("{name} is being written by the live save of checkpoint {cp}"));
    }
    let user = m.disk_user(name);
    let s = m.host_mem.space.as_mut().ok_or_else(|| format!("no data disk ({})", m.host_mem.swap_missing))?;
    let e = s.delete(name, |_| user).map_err(|e| format!("{e}"))?;
    Ok(Reply {
        text: format!("disk {} deleted ({}, {} MiB freed)", e.name, e.kind.name(), mib_text(e.capacity_bytes())),
        json: extent_json(&e),
    })
}
