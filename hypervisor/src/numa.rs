//! The host's NUMA nodes (from the ACPI SRAT) and where a VM goes.
//!
//! Placement policy ("pack"): a VM's memory and vCPUs belong on one node,
//! because a vCPU reading memory on another node pays the interconnect on
//! every miss. A new VM goes to the node that can hold all of its memory
//! and has the most free memory (so VMs spread across nodes as they come,
//! and the node keeps the most room for the VM's own growth); its memory is
//! taken from that node first, and its vCPUs are to run on that node's
//! CPUs. A VM no node can hold is spread: its memory comes from wherever
//! there is room and its vCPUs run anywhere. With one node (or no SRAT)
//! there is nothing to choose.

use alloc::vec::Vec;

/// One node: its CPUs (local APIC IDs) and memory ranges `[start, end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    pub id: u32,
    pub apic_ids: Vec<u32>,
    pub ranges: Vec<(u64, u64)>,
}

impl Node {
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }
}

/// The SRAT's entries as the ACPI parser gives them.
#[derive(Clone, Copy, Debug)]
pub struct CpuAffinity {
    pub apic_id: u32,
    pub node: u32,
    pub enabled: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct MemoryAffinity {
    pub base: u64,
    pub length: u64,
    pub node: u32,
    pub enabled: bool,
    /// Persistent memory is not RAM for VMs (the PMem subsystem owns it).
    pub non_volatile: bool,
}

/// The SRAT's CPU and memory entries (ACPI 6.5 5.2.16: a 36-byte header,
/// 12 reserved bytes, then entries of type, length, body): types 0
/// (local APIC), 1 (memory) and 2 (x2APIC); others are skipped. A table
/// that runs past its end stops where it does. Read by hand: the `acpi`
/// crate's (6.1) parse gave one CPU entry and no memory of QEMU's
/// two-node table.
pub fn parse_srat(table: &[u8]) -> (Vec<CpuAffinity>, Vec<MemoryAffinity>) {
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |b: &[u8], o: usize| u32_at(b, o) as u64 | (u32_at(b, o + 4) as u64) << 32;
    let (mut cpus, mut memory) = (Vec::new(), Vec::new());
    let len = if table.len() >= 8 { (u32_at(table, 4) as usize).min(table.len()) } else { 0 };
    let mut at = 48;
    while at + 2 <= len {
        let (kind, elen) = (table[at], table[at + 1] as usize);
        if elen < 2 || at + elen > len {
            break;
        }
        let e = &table[at..at + elen];
        match (kind, elen) {
            (0, 16..) => {
                let node = e[2] as u32 | (e[9] as u32) << 8 | (e[10] as u32) << 16 | (e[11] as u32) << 24;
                cpus.push(CpuAffinity { apic_id: e[3] as u32, node, enabled: u32_at(e, 4) & 1 != 0 });
            }
            (1, 40..) => {
                let flags = u32_at(e, 28);
                memory.push(MemoryAffinity {
                    base: u64_at(e, 8),
                    length: u64_at(e, 16),
                    node: u32_at(e, 2),
                    enabled: flags & 1 != 0,
                    non_volatile: flags & 4 != 0,
                });
            }
            (2, 24..) => {
                cpus.push(CpuAffinity { apic_id: u32_at(e, 8), node: u32_at(e, 4), enabled: u32_at(e, 12) & 1 != 0 });
            }
            _ => {}
        }
        at += elen;
    }
    (cpus, memory)
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// By node id, ascending.
    pub nodes: Vec<Node>,
}

impl Topology {
    /// The nodes the SRAT describes: every enabled CPU and volatile memory
    /// range, by proximity domain. Empty without entries.
    pub fn from_srat(cpus: &[CpuAffinity], memory: &[MemoryAffinity]) -> Topology {
        let mut t = Topology::default();
        for c in cpus.iter().filter(|c| c.enabled) {
            t.node_mut(c.node).apic_ids.push(c.apic_id);
        }
        for m in memory.iter().filter(|m| m.enabled && !m.non_volatile && m.length > 0) {
            let end = m.base.saturating_add(m.length);
            t.node_mut(m.node).ranges.push((m.base, end));
        }
        for n in &mut t.nodes {
            n.ranges.sort_unstable();
            n.apic_ids.sort_unstable();
        }
        t
    }

    fn node_mut(&mut self, id: u32) -> &mut Node {
        let i = match self.nodes.binary_search_by_key(&id, |n| n.id) {
            Ok(i) => i,
            Err(i) => {
                self.nodes.insert(i, Node { id, ..Default::default() });
                i
            }
        };
        &mut self.nodes[i]
    }

    /// Whether there is a choice to make.
    pub fn is_numa(&self) -> bool {
        self.nodes.len() > 1
    }

    pub fn node(&self, id: u32) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    pub fn node_of_cpu(&self, apic_id: u32) -> Option<u32> {
        self.nodes.iter().find(|n| n.apic_ids.contains(&apic_id)).map(|n| n.id)
    }

    pub fn node_of_addr(&self, pa: u64) -> Option<u32> {
        self.nodes.iter().find(|n| n.ranges.iter().any(|&(s, e)| (s..e).contains(&pa))).map(|n| n.id)
    }
}

/// Where a VM goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Its memory and vCPUs on this node.
    Node(u32),
    /// No node holds it (or the host has one node): anywhere.
    Spread,
}

/// The policy above: `free` is each node's free bytes now.
pub fn place(topology: &Topology, vm_bytes: u64, free: &[(u32, u64)]) -> Placement {
    if !topology.is_numa() {
        return Placement::Spread;
    }
    free.iter()
        .filter(|(id, bytes)| *bytes >= vm_bytes && topology.node(*id).is_some())
        // Most free first; on a tie the lower id, so placement repeats.
        .max_by_key(|(id, bytes)| (*bytes, core::cmp::Reverse(*id)))
        .map_or(Placement::Spread, |(id, _)| Placement::Node(*id))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn two_nodes() -> Topology {
        Topology::from_srat(
            &[
                CpuAffinity { apic_id: 1, node: 1, enabled: true },
                CpuAffinity { apic_id: 0, node: 0, enabled: true },
                CpuAffinity { apic_id: 7, node: 1, enabled: false },
            ],
            &[
                MemoryAffinity { base: 0, length: 640 << 10, node: 0, enabled: true, non_volatile: false },
                MemoryAffinity { base: MB, length: 255 * MB, node: 0, enabled: true, non_volatile: false },
                MemoryAffinity { base: 256 * MB, length: 256 * MB, node: 1, enabled: true, non_volatile: false },
                MemoryAffinity { base: 4096 * MB, length: 64 * MB, node: 1, enabled: true, non_volatile: true },
                MemoryAffinity { base: 8192 * MB, length: 64 * MB, node: 2, enabled: false, non_volatile: false },
            ],
        )
    }

    #[test]
    fn the_srat_becomes_nodes_of_enabled_cpus_and_volatile_memory() {
        let t = two_nodes();
        assert_eq!(t.nodes.len(), 2, "{t:?}");
        assert!(t.is_numa());
        assert_eq!(t.nodes[0].apic_ids, [0]);
        assert_eq!(t.nodes[1].apic_ids, [1], "the disabled CPU is left out");
        assert_eq!(t.nodes[0].bytes(), (640 << 10) + 255 * MB);
        assert_eq!(t.nodes[1].ranges, [(256 * MB, 512 * MB)], "persistent memory is not RAM");
        assert_eq!(t.node_of_cpu(1), Some(1));
        assert_eq!(t.node_of_cpu(7), None);
        assert_eq!(t.node_of_addr(300 * MB), Some(1));
        assert_eq!(t.node_of_addr(2 * MB), Some(0));
        assert_eq!(t.node_of_addr(4100 * MB), None);
        assert!(!Topology::from_srat(&[], &[]).is_numa());
    }

    /// A two-node SRAT as QEMU builds it for `-numa node,cpus=0 -numa
    /// node,cpus=1` with 256 MiB each: two local-APIC entries, then memory
    /// entries (the legacy hole split off), with a truncated entry at the end.
    fn qemu_srat() -> Vec<u8> {
        let mut t = vec![0u8; 48];
        t[0..4].copy_from_slice(b"SRAT");
        let cpu = |apic: u8, node: u8| {
            let mut e = vec![0u8; 16];
            (e[0], e[1], e[2], e[3], e[4]) = (0, 16, node, apic, 1);
            e
        };
        let mem = |base: u64, len: u64, node: u32, flags: u32| {
            let mut e = vec![0u8; 40];
            (e[0], e[1]) = (1, 40);
            e[2..6].copy_from_slice(&node.to_le_bytes());
            e[8..16].copy_from_slice(&base.to_le_bytes());
            e[16..24].copy_from_slice(&len.to_le_bytes());
            e[28..32].copy_from_slice(&flags.to_le_bytes());
            e
        };
        t.extend(cpu(0, 0));
        t.extend(cpu(1, 1));
        t.extend(mem(0, 0xa0000, 0, 1));
        t.extend(mem(MB, 255 * MB, 0, 1));
        t.extend(mem(256 * MB, 256 * MB, 1, 1));
        t.extend(mem(1 << 32, 64 * MB, 1, 5));
        // An x2APIC entry (type 2) and an unknown one (type 9) then the cut.
        let mut x2 = vec![0u8; 24];
        (x2[0], x2[1]) = (2, 24);
        x2[4..8].copy_from_slice(&1u32.to_le_bytes());
        x2[8..12].copy_from_slice(&300u32.to_le_bytes());
        x2[12] = 1;
        t.extend(x2);
        t.extend([9, 4, 0, 0]);
        t.extend([1, 40, 0, 0]);
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        t
    }

    #[test]
    fn a_two_node_srat_parses_to_its_cpus_and_memory() {
        let (cpus, memory) = parse_srat(&qemu_srat());
        let t = Topology::from_srat(&cpus, &memory);
        assert_eq!(t.nodes.len(), 2, "{t:?}");
        assert_eq!(t.nodes[0].apic_ids, [0]);
        assert_eq!(t.nodes[1].apic_ids, [1, 300]);
        assert_eq!(t.nodes[0].ranges, [(0, 0xa0000), (MB, 256 * MB)]);
        assert_eq!(t.nodes[1].ranges, [(256 * MB, 512 * MB)], "the persistent range is left out");
        assert_eq!(memory.len(), 4, "the truncated entry is not read");
        // Garbage and short input give nothing, without panicking.
        assert_eq!(parse_srat(&[]).0.len(), 0);
        let mut bad = qemu_srat();
        bad[48 + 1] = 0;
        assert_eq!(parse_srat(&bad).0.len(), 0, "a zero-length entry stops the walk");
        let mut long = qemu_srat();
        long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_srat(&long).1.len(), 4, "a length past the buffer is cut to it");
    }

    #[test]
    fn a_vm_goes_to_the_node_with_most_free_memory_that_holds_it() {
        let t = two_nodes();
        assert_eq!(place(&t, 64 * MB, &[(0, 200 * MB), (1, 250 * MB)]), Placement::Node(1));
        assert_eq!(place(&t, 64 * MB, &[(0, 200 * MB), (1, 100 * MB)]), Placement::Node(0));
        // Only one node can hold it, though the other has more free: no.
        assert_eq!(place(&t, 150 * MB, &[(0, 140 * MB), (1, 160 * MB)]), Placement::Node(1));
        // A tie goes to the lower id.
        assert_eq!(place(&t, 8 * MB, &[(1, 100 * MB), (0, 100 * MB)]), Placement::Node(0));
        // Nothing holds it: spread. One node: nothing to choose.
        assert_eq!(place(&t, 300 * MB, &[(0, 200 * MB), (1, 250 * MB)]), Placement::Spread);
        let one = Topology::from_srat(&[CpuAffinity { apic_id: 0, node: 0, enabled: true }], &[]);
        assert_eq!(place(&one, MB, &[(0, 100 * MB)]), Placement::Spread);
        // A node the SRAT does not name is never chosen.
        assert_eq!(place(&t, MB, &[(5, 900 * MB)]), Placement::Spread);
    }
}
