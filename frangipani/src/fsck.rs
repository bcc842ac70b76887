//! `lab fs fsck`: an offline check of a whole volume, read straight from
//! the block device (no workstation may be writing).
//!
//! It walks the tree from the root and compares what it finds with the
//! bitmaps. It reports every inconsistency it sees:
//! - an entry naming a free or unallocated inode (dangling), or with a
//!   kind other than the inode's;
//! - a link count that differs from the names (and, for a directory, the
//!   subdirectories) that refer to the inode, or a wrong parent;
//! - a block referred to twice, or referred to but free in its bitmap;
//! - an inode or block allocated in a bitmap but reachable from no name
//!   (orphans);
//! - a block that does not decode (inode, directory or bitmap).

use crate::device::BlockDevice;
use crate::directory::DirectoryBlock;
use crate::fs::{FsError, ROOT_INODE, decode_portion, read_layout};
use crate::inode::{Content, Inode, Kind, NO_BLOCK};
use crate::layout::{BITS_PER_PORTION, Layout, Resource};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// What a check found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FsckReport {
    pub directories: u64,
    pub files: u64,
    pub symlinks: u64,
    pub blocks: u64,
    pub problems: Vec<String>,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The allocated numbers of `resource`, from its bitmaps.
async fn allocated(
    device: &dyn BlockDevice,
    layout: &Layout,
    resource: Resource,
    problems: &mut Vec<String>,
) -> Result<BTreeSet<u64>, FsError> {
    let mut out = BTreeSet::new();
    for portion in 0..layout.portions(resource) {
        let valid = layout.portion_bits(resource, portion);
        let stored = device.read(layout.bitmap_block(resource, portion)).await?;
        let bits = match decode_portion(layout, resource, portion, &stored.data) {
            Ok(bits) => bits,
            Err(error) => {
                problems.push(error.to_string());
                continue;
            }
        };
        out.extend((0..valid).filter(|bit| bits.is_allocated(*bit)).map(|bit| portion * BITS_PER_PORTION + bit));
    }
    Ok(out)
}

/// Checks the volume on `device`.
pub async fn check(device: &dyn BlockDevice) -> Result<FsckReport, FsError> {
    let layout = read_layout(device).await?;
    let mut report = FsckReport::default();
    let mut problems = Vec::new();
    let inode_bits = allocated(device, &layout, Resource::Inode, &mut problems).await?;
    let small_bits = allocated(device, &layout, Resource::SmallBlock, &mut problems).await?;
    let large_bits = allocated(device, &layout, Resource::LargeBlock, &mut problems).await?;

    // Walk the tree: every inode reached, the names that refer to it, and
    // for directories the subdirectories and the parent they sit in.
    let mut inodes: BTreeMap<u64, Inode> = BTreeMap::new();
    let mut names: BTreeMap<u64, u32> = BTreeMap::new();
    let mut named_kind: BTreeMap<u64, Kind> = BTreeMap::new();
    let mut subdirectories: BTreeMap<u64, u32> = BTreeMap::new();
    let mut parent_of: BTreeMap<u64, u64> = BTreeMap::from([(ROOT_INODE, ROOT_INODE)]);
    let mut owner_of_block: BTreeMap<u64, u64> = BTreeMap::new();
    let mut queue = VecDeque::from([ROOT_INODE]);
    while let Some(ino) = queue.pop_front() {
        if inodes.contains_key(&ino) {
            continue;
        }
        let stored = device.read(layout.inode_block(ino)).await?;
        let inode = match Inode::decode(&stored.data) {
            Ok(inode) => inode,
            Err(error) => {
                problems.push(format!("inode {ino}: {error}"));
                continue;
            }
        };
        if inode.kind == Kind::Free {
            continue; // reported by the entry that names it
        }
        if let Content::Blocks(pointers) = &inode.content {
            let small = pointers.small.iter().map(|block| (Resource::SmallBlock, *block));
            let large = pointers.large.iter().map(|block| (Resource::LargeBlock, *block));
            for (resource, block) in small.chain(large).filter(|(_, block)| *block != NO_BLOCK) {
                report.blocks += 1;
                match layout.data_number(block) {
                    Some((found, number)) if found == resource => {
                        let bits = if resource == Resource::SmallBlock { &small_bits } else { &large_bits };
                        if !bits.contains(&number) {
                            problems.push(format!("inode {ino} uses {resource:?} {number}, which is free"));
                        }
                    }
                    _ => problems.push(format!("inode {ino} points at block {block}, not a {resource:?}")),
                }
                if let Some(other) = owner_of_block.insert(block, ino) {
                    problems.push(format!("block {block} is used by inodes {other} and {ino}"));
                }
            }
        }
        match inode.kind {
            Kind::Directory => {
                report.directories += 1;
                let Content::Blocks(pointers) = &inode.content else { unreachable!("directories have blocks") };
                for block in pointers.small.iter().filter(|block| **block != NO_BLOCK) {
                    let stored = device.read(*block).await?;
                    let directory = match DirectoryBlock::decode(&stored.data) {
                        Ok(directory) => directory,
                        Err(error) => {
                            problems.push(format!("directory {ino}, block {block}: {error}"));
                            continue;
                        }
                    };
                    for entry in directory.entries() {
                        let name = String::from_utf8_lossy(&entry.name);
                        if !inode_bits.contains(&entry.inode) {
                            problems.push(format!(
                                "dangling entry {name:?} in directory {ino}: inode {} is free",
                                entry.inode
                            ));
                            continue;
                        }
                        *names.entry(entry.inode).or_default() += 1;
                        if let Some(other) = named_kind.insert(entry.inode, entry.kind)
                            && other != entry.kind
                        {
                            problems.push(format!(
                                "inode {} is named both as {other:?} and as {:?}",
                                entry.inode, entry.kind
                            ));
                        }
                        if entry.kind == Kind::Directory {
                            *subdirectories.entry(ino).or_default() += 1;
                            if let Some(first) = parent_of.insert(entry.inode, ino) {
                                problems.push(format!("directory {} is named in {first} and in {ino}", entry.inode));
                            }
                        }
                        queue.push_back(entry.inode);
                    }
                }
            }
            Kind::File => report.files += 1,
            Kind::Symlink => report.symlinks += 1,
            Kind::Free => unreachable!("skipped above"),
        }
        inodes.insert(ino, inode);
    }

    // Entries against the inodes they name (the root is named by none).
    names.insert(ROOT_INODE, 0);
    for (ino, count) in &names {
        match inodes.get(ino) {
            None => problems.push(format!("dangling entries: inode {ino} is named {count} times but free")),
            Some(inode) if named_kind.get(ino).is_some_and(|kind| *kind != inode.kind) => {
                problems.push(format!("inode {ino} is a {:?}, but an entry says {:?}", inode.kind, named_kind[ino]));
            }
            Some(inode) if inode.kind == Kind::Directory => {
                let expected = 2 + subdirectories.get(ino).copied().unwrap_or(0);
                if inode.links != expected {
                    problems.push(format!("directory {ino} has link count {}, expected {expected}", inode.links));
                }
                match parent_of.get(ino) {
                    Some(parent) if *parent == u64::from(inode.parent) => {}
                    Some(parent) => {
                        problems.push(format!("directory {ino} records parent {}, but sits in {parent}", inode.parent))
                    }
                    None => problems.push(format!("directory {ino} sits in no directory")),
                }
            }
            Some(inode) => {
                if inode.links != *count {
                    problems.push(format!("inode {ino} has link count {}, but {count} names", inode.links));
                }
            }
        }
    }
    // Orphans: allocated but reachable from no name.
    for ino in inode_bits.iter().filter(|ino| **ino != 0 && !inodes.contains_key(ino)) {
        problems.push(format!("orphan inode {ino}: allocated, but no name refers to it"));
    }
    if !inode_bits.contains(&0) || !inode_bits.contains(&ROOT_INODE) {
        problems.push("inodes 0 and 1 (the root) must stay allocated".into());
    }
    for (resource, bits) in [(Resource::SmallBlock, &small_bits), (Resource::LargeBlock, &large_bits)] {
        for number in bits.iter() {
            if !owner_of_block.contains_key(&layout.data_block(resource, *number)) {
                problems.push(format!("orphan {resource:?} {number}: allocated, but no inode uses it"));
            }
        }
    }
    report.problems = problems;
    Ok(report)
}
