//! Native partition-table writing and reading for vmdb.
//!
//! vmdb2 drove `parted` for this; here the tables are written directly with
//! the `gpt` and `mbrman` crates. The position syntax and alignment rules
//! mimic what parted does with `--align optimal`, so existing `.vmdb` specs
//! produce the same layout they did with parted.
//!
//! Everything works on a plain image file or on a block device (e.g. a loop
//! device). Sectors are always 512 bytes.

use anyhow::{Context, Result, anyhow, bail};
use gpt::partition_types::{self, Type};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Sector size assumed everywhere (vmdb only builds 512-byte-sector images).
pub const SECTOR: u64 = 512;
/// parted's optimal alignment on an image or loop device is 1 MiB.
const MIB: u64 = 1024 * 1024;
const MIB_SECTORS: u64 = MIB / SECTOR;
/// Size of a GPT header plus its 128-entry array, at each end of the disk.
/// The backup copy takes the last 33 sectors, the primary sectors 1..=33.
const GPT_TAIL_SECTORS: u64 = 33;
const GPT_HEAD_SECTORS: u64 = 34;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelKind {
    Msdos,
    Gpt,
}

/// The last sector an msdos partition table can address (32-bit sector numbers).
pub const MBR_LAST_SECTOR: u64 = u32::MAX as u64;

impl LabelKind {
    /// How many partitions a table of this kind holds: an MBR's four primary
    /// entries, or the 128 entries of the GPT array vmdb writes.
    pub fn max_partitions(self) -> usize {
        match self {
            LabelKind::Msdos => 4,
            LabelKind::Gpt => 128,
        }
    }

    /// Accepts the names parted accepts for `mklabel`, plus "mbr".
    pub fn parse(s: &str) -> Option<LabelKind> {
        match s.trim().to_ascii_lowercase().as_str() {
            "msdos" | "dos" | "mbr" => Some(LabelKind::Msdos),
            "gpt" => Some(LabelKind::Gpt),
            _ => None,
        }
    }
}

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {} for writing", path.display()))
}

fn open_ro(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("cannot open {}", path.display()))
}

fn total_sectors(path: &Path) -> Result<u64> {
    Ok(super::disk_size(path)? / SECTOR)
}

// ---------------------------------------------------------------------------
// Labels
// ---------------------------------------------------------------------------

fn zero_sectors(file: &mut File, first: u64, count: u64) -> Result<()> {
    let zeros = vec![0u8; (count * SECTOR) as usize];
    file.seek(SeekFrom::Start(first * SECTOR))?;
    file.write_all(&zeros)?;
    Ok(())
}

/// A random, non-zero MBR disk signature. /dev/urandom avoids pulling in a
/// random-number crate for four bytes.
fn random_disk_signature() -> Result<[u8; 4]> {
    let mut f = File::open("/dev/urandom").context("cannot open /dev/urandom")?;
    loop {
        let mut sig = [0u8; 4];
        f.read_exact(&mut sig)?;
        if sig != [0; 4] {
            return Ok(sig);
        }
    }
}

/// Write a new empty table (wipes any previous table). For GPT, also a
/// protective MBR.
pub fn write_label(path: &Path, kind: LabelKind) -> Result<()> {
    let total = total_sectors(path)?;
    // Smallest disk on which parted's layout (first partition at 1 MiB)
    // could hold anything at all.
    if total < MIB_SECTORS + GPT_HEAD_SECTORS + GPT_TAIL_SECTORS {
        bail!(
            "{} is too small for a partition table ({} bytes)",
            path.display(),
            total * SECTOR
        );
    }
    let mut file = open_rw(path)?;

    // Both ends are wiped whatever the new kind is: a stale GPT left behind
    // under a new MBR (or a stale backup GPT under a new GPT on a resized
    // disk) makes libblkid/fdisk report a confusing mix of tables.
    zero_sectors(&mut file, 0, GPT_HEAD_SECTORS)?;
    zero_sectors(&mut file, total - GPT_TAIL_SECTORS, GPT_TAIL_SECTORS)?;

    match kind {
        LabelKind::Msdos => {
            let mut mbr = mbrman::MBR::new_from(&mut file, SECTOR as u32, random_disk_signature()?)
                .context("cannot create MBR")?;
            mbr.write_into(&mut file).context("cannot write MBR")?;
        }
        LabelKind::Gpt => {
            // The protective partition covers the whole disk after LBA 0,
            // capped at what 32 bits can express (UEFI spec).
            let pmbr_size = u32::try_from(total - 1).unwrap_or(u32::MAX);
            gpt::mbr::ProtectiveMBR::with_lb_size(pmbr_size)
                .overwrite_lba0(&mut file)
                .context("cannot write protective MBR")?;
            // The gpt crate places the backup header at the last sector of
            // the device it is given, found by seeking to its end, which is
            // correct for both files and block devices.
            let disk = gpt::GptConfig::new()
                .writable(true)
                .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
                .create_from_device(file.try_clone()?, None)
                .context("cannot create GPT")?;
            disk.write().context("cannot write GPT")?;
        }
    }
    file.sync_all()?;
    Ok(())
}

/// Read which kind of table is on the disk (None if none).
pub fn read_label(path: &Path) -> Result<Option<LabelKind>> {
    let mut file = open_ro(path)?;
    let mut buf = vec![0u8; 2 * SECTOR as usize];
    let mut got = 0;
    // A disk shorter than two sectors simply has no table.
    while got < buf.len() {
        let n = file.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got < buf.len() {
        return Ok(None);
    }
    let has_mbr_sig = buf[510] == 0x55 && buf[511] == 0xAA;
    let has_gpt_sig = &buf[512..520] == b"EFI PART";
    // The partition type byte is at offset 4 of each 16-byte MBR entry.
    let has_protective = (0..4).any(|i| buf[446 + i * 16 + 4] == 0xEE);
    Ok(if has_gpt_sig && (has_protective || !has_mbr_sig) {
        Some(LabelKind::Gpt)
    } else if has_mbr_sig {
        Some(LabelKind::Msdos)
    } else {
        None
    })
}

fn require_label(path: &Path) -> Result<LabelKind> {
    read_label(path)?.ok_or_else(|| anyhow!("{} has no partition table", path.display()))
}

// ---------------------------------------------------------------------------
// Positions
// ---------------------------------------------------------------------------

/// A parsed parted position, before it is related to a particular disk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Position {
    /// A decimal-unit size (B, kB, MB, GB, TB or a bare number): parted
    /// treats these as approximate and snaps them to the alignment grid.
    Bytes(u64),
    /// A binary-unit size (KiB, MiB, GiB, TiB): parted takes these
    /// literally, like sectors.
    ExactBytes(u64),
    Sectors(u64),
    Percent(f64),
}

const POSITION_HELP: &str = "expected a size like 1G, 512MiB, 2048s or a percentage like 50%";

/// parted-compatible position parsing (see `resolve_range` for alignment).
///
/// Units follow parted: decimal kB/MB/GB/TB (also K/M/G/T), binary
/// KiB/MiB/GiB/TiB, B for bytes, s for sectors, % of the disk. A bare number
/// is in MB, parted's default unit. Units are case-insensitive as in parted.
pub fn parse_position(s: &str) -> Result<Position> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    if num.is_empty() {
        bail!("invalid position {s:?}: {POSITION_HELP}");
    }

    if unit == "s" {
        let n: u64 = num
            .parse()
            .map_err(|_| anyhow!("invalid position {s:?}: sector counts must be whole numbers"))?;
        return Ok(Position::Sectors(n));
    }

    let value: f64 = num
        .parse()
        .map_err(|_| anyhow!("invalid position {s:?}: {POSITION_HELP}"))?;
    if !value.is_finite() {
        bail!("invalid position {s:?}: {POSITION_HELP}");
    }

    if unit == "%" {
        if value > 100.0 {
            bail!("invalid position {s:?}: a percentage must be between 0% and 100%");
        }
        return Ok(Position::Percent(value));
    }

    let (multiplier, exact): (u64, bool) = match unit.as_str() {
        "b" => (1, false),
        "k" | "kb" => (1_000, false),
        "" | "m" | "mb" => (1_000_000, false),
        "g" | "gb" => (1_000_000_000, false),
        "t" | "tb" => (1_000_000_000_000, false),
        "kib" => (1 << 10, true),
        "mib" => (1 << 20, true),
        "gib" => (1 << 30, true),
        "tib" => (1 << 40, true),
        _ => bail!("invalid position {s:?}: unknown unit {unit:?}; {POSITION_HELP}"),
    };
    let bytes = value * multiplier as f64;
    if bytes > u64::MAX as f64 / 2.0 {
        bail!("invalid position {s:?}: value is too large");
    }
    let bytes = bytes.round() as u64;
    Ok(if exact {
        Position::ExactBytes(bytes)
    } else {
        Position::Bytes(bytes)
    })
}

fn round_to_nearest_mib(bytes: u64) -> u64 {
    (bytes + MIB / 2) / MIB * MIB
}

fn position_bytes(pos: Position, disk_bytes: u64) -> u64 {
    match pos {
        Position::Bytes(b) | Position::ExactBytes(b) => b,
        Position::Sectors(s) => s.saturating_mul(SECTOR),
        Position::Percent(p) => (disk_bytes as f64 * p / 100.0).round() as u64,
    }
}

/// First and last sector a partition may occupy with this kind of label.
fn usable_sectors(total: u64, kind: LabelKind) -> (u64, u64) {
    match kind {
        // The backup GPT header and array take the last 33 sectors.
        LabelKind::Gpt => (GPT_HEAD_SECTORS, total.saturating_sub(GPT_TAIL_SECTORS + 1)),
        LabelKind::Msdos => (1, total.saturating_sub(1)),
    }
}

/// Turn parted-style start and end positions into an inclusive sector range,
/// aligned as parted's "optimal" alignment does on a disk with no reported
/// optimal I/O size: 1 MiB boundaries.
pub fn resolve_range(
    disk_bytes: u64,
    kind: LabelKind,
    start: &str,
    end: &str,
) -> Result<(u64, u64)> {
    let start_pos = parse_position(start)?;
    let end_pos = parse_position(end)?;
    let total = disk_bytes / SECTOR;
    let (first_usable, last_usable) = usable_sectors(total, kind);
    if last_usable < MIB_SECTORS {
        bail!("disk of {disk_bytes} bytes is too small for any partition");
    }

    // parted clamps "100%" and sizes that round past the end, but refuses
    // a position that lies outside the device altogether.
    for (text, pos) in [(start, start_pos), (end, end_pos)] {
        let outside = match pos {
            Position::Bytes(b) => b > disk_bytes,
            Position::Percent(_) => false,
            // An exact position names a sector, which must exist.
            Position::ExactBytes(b) => b >= disk_bytes,
            Position::Sectors(_) => false,
        };
        if outside {
            bail!("position {text:?} is outside the disk ({disk_bytes} bytes)");
        }
    }

    let start_sector = match start_pos {
        // An explicit sector means the user wants exactly that sector.
        Position::Sectors(s) => s,
        Position::ExactBytes(b) => b / SECTOR,
        // parted snaps to the nearest aligned sector, and keeps the first
        // MiB free for the label and boot loaders.
        p => (round_to_nearest_mib(position_bytes(p, disk_bytes)) / SECTOR).max(MIB_SECTORS),
    };

    let end_sector = match end_pos {
        Position::Sectors(s) => {
            if s > last_usable {
                bail!("end {end:?} is past the last usable sector {last_usable}");
            }
            s
        }
        Position::ExactBytes(b) => {
            // parted ends a binary-unit range one sector before the value.
            let s = (b / SECTOR)
                .checked_sub(1)
                .ok_or_else(|| anyhow!("end {end:?} is at the very start of the disk"))?;
            if s > last_usable {
                bail!("end {end:?} (sector {s}) is past the last usable sector {last_usable}");
            }
            s
        }
        p => {
            let boundary = round_to_nearest_mib(position_bytes(p, disk_bytes)) / SECTOR;
            if boundary == 0 {
                bail!("end {end:?} is at the very start of the disk");
            }
            let e = boundary - 1;
            if e > last_usable && start_sector % MIB_SECTORS != 0 {
                // The user already chose an unaligned start, and parted
                // then stops aligning the end as well.
                last_usable
            } else if e > last_usable {
                // For GPT the backup table is in the way of the disk end;
                // parted keeps the end aligned instead, so the partition
                // ends at the last whole MiB.
                (last_usable + 1) / MIB_SECTORS * MIB_SECTORS - 1
            } else {
                e
            }
        }
    };

    if start_sector < first_usable {
        bail!("start {start:?} is before the first usable sector {first_usable}");
    }
    if start_sector > last_usable {
        bail!("start {start:?} is past the end of the disk");
    }
    if end_sector < start_sector {
        bail!(
            "end {end:?} (sector {end_sector}) is before start {start:?} (sector {start_sector})"
        );
    }
    Ok((start_sector, end_sector))
}

// ---------------------------------------------------------------------------
// Partitions
// ---------------------------------------------------------------------------

pub struct NewPartition<'a> {
    /// msdos: "primary", "logical" or "extended". gpt: the partition name
    /// (vmdb2 passes parted's first mkpart argument, which parted uses as the
    /// GPT name).
    pub part_type: &'a str,
    /// parted fs-type: ext2, ext3, ext4, linux-swap, fat16, fat32, vfat, ...
    pub fs_type: &'a str,
    pub start_sector: u64,
    pub end_sector: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PartitionInfo {
    pub number: u32,
    pub start_sector: u64,
    pub size_sectors: u64,
    /// GPT: upper-case type GUID. msdos: type byte in lower-case hex without
    /// leading zeros ("83", "c", "ef"), the way `sfdisk -J` prints it.
    pub type_id: String,
}

fn is_fat(fs_type: &str) -> bool {
    matches!(fs_type, "fat16" | "fat32" | "vfat" | "fat")
}

fn is_swap(fs_type: &str) -> bool {
    fs_type == "linux-swap" || fs_type.starts_with("linux-swap(")
}

fn mbr_type_for_fs(fs_type: &str) -> u8 {
    let fs = fs_type.to_ascii_lowercase();
    match fs.as_str() {
        "fat16" => 0x06,
        "fat32" | "vfat" | "fat" => 0x0c,
        _ if is_swap(&fs) => 0x82,
        _ => 0x83,
    }
}

fn gpt_type_for_fs(fs_type: &str) -> Type {
    let fs = fs_type.to_ascii_lowercase();
    if is_fat(&fs) {
        partition_types::BASIC
    } else if is_swap(&fs) {
        partition_types::LINUX_SWAP
    } else {
        partition_types::LINUX_FS
    }
}

/// Add a partition; returns its number (1-based, as the kernel would number
/// it).
pub fn add_partition(path: &Path, part: &NewPartition) -> Result<u32> {
    if part.end_sector < part.start_sector {
        bail!(
            "partition end sector {} is before its start sector {}",
            part.end_sector,
            part.start_sector
        );
    }
    match require_label(path)? {
        LabelKind::Gpt => add_gpt_partition(path, part),
        LabelKind::Msdos => add_mbr_partition(path, part),
    }
}

fn check_overlap(
    start: u64,
    end: u64,
    existing: impl Iterator<Item = (u32, u64, u64)>,
) -> Result<()> {
    for (n, s, e) in existing {
        if start <= e && s <= end {
            bail!(
                "new partition at sectors {start}..={end} overlaps partition {n} at sectors {s}..={e}"
            );
        }
    }
    Ok(())
}

fn open_gpt(file: File, writable: bool) -> Result<gpt::GptDisk<File>> {
    gpt::GptConfig::new()
        .writable(writable)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .open_from_device(file)
        .context("cannot read GPT")
}

fn add_gpt_partition(path: &Path, part: &NewPartition) -> Result<u32> {
    let file = open_rw(path)?;
    let mut disk = open_gpt(file, true)?;
    let (first, last) = {
        let h = disk.header();
        (h.first_usable, h.last_usable)
    };
    if part.start_sector < first {
        bail!(
            "partition start sector {} is before the first usable sector {first}",
            part.start_sector
        );
    }
    if part.end_sector > last {
        bail!(
            "partition end sector {} is past the last usable sector {last} of the disk",
            part.end_sector
        );
    }
    check_overlap(
        part.start_sector,
        part.end_sector,
        disk.partitions()
            .iter()
            .filter(|(_, p)| p.is_used())
            .map(|(n, p)| (*n, p.first_lba, p.last_lba)),
    )?;
    // Lowest free entry, like parted and sfdisk; the kernel numbers GPT
    // partitions by entry index.
    let number = disk
        .find_next_partition_id()
        .ok_or_else(|| anyhow!("the GPT partition table is full"))?;
    if part.part_type.encode_utf16().count() > 36 {
        bail!(
            "GPT partition name {:?} is longer than 36 characters",
            part.part_type
        );
    }
    disk.add_partition_at(
        part.part_type,
        number,
        part.start_sector,
        part.end_sector - part.start_sector + 1,
        gpt_type_for_fs(part.fs_type),
        0,
    )
    .context("cannot add GPT partition")?;
    let file = disk.write().context("cannot write GPT")?;
    file.sync_all()?;
    Ok(number)
}

/// CHS address for an MBR entry the way fdisk computes it (255 heads, 63
/// sectors per track); past what CHS can address, the conventional maximum.
fn chs_for(lba: u32) -> mbrman::CHS {
    mbrman::CHS::from_lba_exact(lba, 1023, 255, 63).unwrap_or(mbrman::CHS::new(1023, 254, 63))
}

fn read_mbr(file: &mut File) -> Result<mbrman::MBR> {
    mbrman::MBR::read_from(file, SECTOR as u32).context("cannot read MBR")
}

/// The msdos partition types vmdb makes: primary only.
pub fn check_msdos_type(part_type: &str) -> Result<()> {
    match part_type.to_ascii_lowercase().as_str() {
        "primary" => Ok(()),
        "extended" | "logical" => bail!(
            "{part_type} partitions are not supported; use primary partitions (at most 4) \
             or a gpt label"
        ),
        other => bail!("unknown msdos partition type {other:?}; expected primary"),
    }
}

fn add_mbr_partition(path: &Path, part: &NewPartition) -> Result<u32> {
    check_msdos_type(part.part_type)?;
    let total = total_sectors(path)?;
    let mut file = open_rw(path)?;
    let mut mbr = read_mbr(&mut file)?;

    // A full table is the more fundamental problem, so report it first.
    let slot = mbr
        .header
        .iter()
        .find(|(_, p)| p.is_unused())
        .map(|(i, _)| i)
        .ok_or_else(|| anyhow!("the msdos partition table is full (4 primary partitions)"))?;

    if part.start_sector < 1 {
        bail!("partition cannot start at sector 0, where the MBR is");
    }
    let last = total - 1;
    if part.end_sector > last {
        bail!(
            "partition end sector {} is past the last sector {last} of the disk",
            part.end_sector
        );
    }
    if part.end_sector > MBR_LAST_SECTOR {
        bail!("an msdos partition table cannot address sectors past 2 TiB; use gpt");
    }
    check_overlap(
        part.start_sector,
        part.end_sector,
        mbr.header
            .iter()
            .filter(|(_, p)| p.is_used())
            .map(|(i, p)| {
                let s = u64::from(p.starting_lba);
                (i as u32, s, s + u64::from(p.sectors).max(1) - 1)
            }),
    )?;

    let start = part.start_sector as u32;
    let end = part.end_sector as u32;
    mbr.header[slot] = mbrman::MBRPartitionEntry {
        boot: 0,
        first_chs: chs_for(start),
        sys: mbr_type_for_fs(part.fs_type),
        last_chs: chs_for(end),
        starting_lba: start,
        sectors: end - start + 1,
    };
    mbr.write_into(&mut file).context("cannot write MBR")?;
    file.sync_all()?;
    Ok(slot as u32)
}

/// Read the partitions back (GPT or MBR), sorted by number.
pub fn read_partitions(path: &Path) -> Result<Vec<PartitionInfo>> {
    let mut file = open_ro(path)?;
    let mut parts = match require_label(path)? {
        LabelKind::Gpt => {
            let disk = open_gpt(file, false)?;
            disk.partitions()
                .iter()
                .filter(|(_, p)| p.is_used())
                .map(|(n, p)| PartitionInfo {
                    number: *n,
                    start_sector: p.first_lba,
                    size_sectors: p.last_lba - p.first_lba + 1,
                    type_id: p.part_type_guid.guid.to_string().to_uppercase(),
                })
                .collect::<Vec<_>>()
        }
        LabelKind::Msdos => {
            let mbr = read_mbr(&mut file)?;
            mbr.header
                .iter()
                .filter(|(_, p)| p.is_used())
                .map(|(i, p)| PartitionInfo {
                    number: i as u32,
                    start_sector: u64::from(p.starting_lba),
                    size_sectors: u64::from(p.sectors),
                    type_id: format!("{:x}", p.sys),
                })
                .collect()
        }
    };
    parts.sort_by_key(|p| p.number);
    Ok(parts)
}

// ---------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------

const KNOWN_FLAGS: &[&str] = &[
    "boot",
    "esp",
    "bios_grub",
    "legacy_boot",
    "lvm",
    "raid",
    "swap",
    "msftdata",
];

pub fn known_flags() -> &'static [&'static str] {
    KNOWN_FLAGS
}

/// GPT type a type-flag stands for. On GPT, parted models most flags as
/// partition types, so setting one replaces the type.
fn gpt_flag_type(flag: &str) -> Option<Type> {
    Some(match flag {
        "esp" | "boot" => partition_types::EFI,
        "bios_grub" => partition_types::BIOS,
        "lvm" => partition_types::LINUX_LVM,
        "raid" => partition_types::LINUX_RAID,
        "swap" => partition_types::LINUX_SWAP,
        "msftdata" => partition_types::BASIC,
        _ => return None,
    })
}

/// The GPT "legacy BIOS bootable" attribute, which is parted's legacy_boot.
const GPT_ATTR_LEGACY_BOOT: u64 = 1 << 2;

/// Set or clear a flag the way parted's `set N FLAG on|off` does.
pub fn set_flag(path: &Path, number: u32, flag: &str, on: bool) -> Result<()> {
    let flag = flag.to_ascii_lowercase();
    if !KNOWN_FLAGS.contains(&flag.as_str()) {
        bail!(
            "unknown partition flag {flag:?}; known flags are: {}",
            KNOWN_FLAGS.join(", ")
        );
    }
    match require_label(path)? {
        LabelKind::Gpt => set_gpt_flag(path, number, &flag, on),
        LabelKind::Msdos => set_mbr_flag(path, number, &flag, on),
    }
}

fn set_gpt_flag(path: &Path, number: u32, flag: &str, on: bool) -> Result<()> {
    let mut disk = open_gpt(open_rw(path)?, true)?;
    let mut parts = disk.partitions().clone();
    let p = parts
        .get_mut(&number)
        .filter(|p| p.is_used())
        .ok_or_else(|| anyhow!("there is no partition {number} on {}", path.display()))?;
    if flag == "legacy_boot" {
        if on {
            p.flags |= GPT_ATTR_LEGACY_BOOT;
        } else {
            p.flags &= !GPT_ATTR_LEGACY_BOOT;
        }
    } else {
        let t = gpt_flag_type(flag).expect("every non-attribute flag maps to a type");
        if on {
            p.part_type_guid = t;
        } else if p.part_type_guid.guid == t.guid {
            // Clearing a type-flag leaves no record of the previous type, so
            // fall back to the generic Linux type as parted does for
            // partitions without a recognised filesystem.
            p.part_type_guid = partition_types::LINUX_FS;
        }
    }
    disk.update_partitions(parts)
        .context("cannot update GPT partitions")?;
    let file = disk.write().context("cannot write GPT")?;
    file.sync_all()?;
    Ok(())
}

fn set_mbr_flag(path: &Path, number: u32, flag: &str, on: bool) -> Result<()> {
    let mut file = open_rw(path)?;
    let mut mbr = read_mbr(&mut file)?;
    let slot = number as usize;
    if !(1..=4).contains(&slot) || mbr.header[slot].is_unused() {
        bail!(
            "there is no primary partition {number} on {}",
            path.display()
        );
    }
    let type_flag = |t: u8, mbr: &mut mbrman::MBR| {
        let e = &mut mbr.header[slot];
        if on {
            e.sys = t;
        } else if e.sys == t {
            e.sys = 0x83;
        }
    };
    match flag {
        "boot" => {
            if on {
                // parted keeps a single active partition, as BIOS boot code
                // expects exactly one.
                for i in 1..=4 {
                    mbr.header[i].boot = 0;
                }
                mbr.header[slot].boot = 0x80;
            } else {
                mbr.header[slot].boot = 0;
            }
        }
        "esp" => type_flag(0xef, &mut mbr),
        "lvm" => type_flag(0x8e, &mut mbr),
        "raid" => type_flag(0xfd, &mut mbr),
        "swap" => type_flag(0x82, &mut mbr),
        other => bail!("flag {other:?} is not available on msdos partition tables"),
    }
    mbr.write_into(&mut file).context("cannot write MBR")?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::process::Command;

    const MIB300: u64 = 314_572_800;
    const GIB4: u64 = 4 << 30;

    fn image(dir: &tempfile::TempDir, name: &str, bytes: u64) -> std::path::PathBuf {
        let path = dir.path().join(name);
        // set_len makes a sparse file, so even 4 GiB costs nothing.
        File::create(&path).unwrap().set_len(bytes).unwrap();
        path
    }

    fn sfdisk_json(path: &Path) -> Value {
        let out = Command::new("sfdisk").arg("-J").arg(path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "sfdisk -J failed: {stderr}");
        assert!(stderr.trim().is_empty(), "sfdisk -J warned: {stderr}");
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["partitiontable"].clone()
    }

    /// fdisk -l reports GPT problems (bad backup, wrong location, CRC) on
    /// stderr or in its output; a clean table produces neither.
    fn assert_fdisk_clean(path: &Path) {
        let out = Command::new("fdisk").arg("-l").arg(path).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_lowercase();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "fdisk -l failed: {stderr}");
        assert!(stderr.trim().is_empty(), "fdisk -l warned: {stderr}");
        for bad in [
            "corrupt",
            "mismatch",
            "not on the end",
            "invalid",
            "warning",
        ] {
            assert!(!stdout.contains(bad), "fdisk -l says {bad:?}:\n{stdout}");
        }
    }

    fn sf_parts(t: &Value) -> Vec<Value> {
        t["partitions"].as_array().cloned().unwrap_or_default()
    }

    fn add(path: &Path, name: &str, fs: &str, start: &str, end: &str) -> Result<u32> {
        let bytes = super::super::disk_size(path)?;
        let kind = read_label(path)?.unwrap();
        let (s, e) = resolve_range(bytes, kind, start, end)?;
        add_partition(
            path,
            &NewPartition {
                part_type: name,
                fs_type: fs,
                start_sector: s,
                end_sector: e,
            },
        )
    }

    // ---- parsing ----------------------------------------------------------

    #[test]
    fn parses_parted_units() {
        use Position::*;
        let cases = [
            ("0%", Percent(0.0)),
            ("100%", Percent(100.0)),
            ("12.5%", Percent(12.5)),
            ("1M", Bytes(1_000_000)),
            ("1MB", Bytes(1_000_000)),
            ("65M", Bytes(65_000_000)),
            ("1G", Bytes(1_000_000_000)),
            ("1.5GB", Bytes(1_500_000_000)),
            ("2T", Bytes(2_000_000_000_000)),
            ("3kB", Bytes(3_000)),
            ("3K", Bytes(3_000)),
            ("300MiB", ExactBytes(300 << 20)),
            ("1024KiB", ExactBytes(1 << 20)),
            ("2GiB", ExactBytes(2 << 30)),
            ("1TiB", ExactBytes(1 << 40)),
            ("512B", Bytes(512)),
            ("2048s", Sectors(2048)),
            ("1000000", Bytes(1_000_000_000_000)),
            ("7", Bytes(7_000_000)),
            (" 1mib ", ExactBytes(1 << 20)),
        ];
        for (s, want) in cases {
            assert_eq!(parse_position(s).unwrap(), want, "{s}");
        }
    }

    #[test]
    fn rejects_bad_positions() {
        for s in [
            "12Q", "", "-5M", "150%", "M", "1.5s", "1..2M", "%", "abc", "5 5M",
        ] {
            let err = parse_position(s).unwrap_err().to_string();
            assert!(err.contains(&format!("{s:?}")), "{s}: {err}");
        }
        let err = parse_position("12Q").unwrap_err().to_string();
        assert!(err.contains(POSITION_HELP), "{err}");
    }

    // ---- alignment, checked against what parted produced -----------------

    #[test]
    fn parted_facts_gpt_300mib() {
        assert_eq!(
            resolve_range(MIB300, LabelKind::Gpt, "1M", "65M").unwrap(),
            (2048, 126975)
        );
        assert_eq!(
            resolve_range(MIB300, LabelKind::Gpt, "65M", "100%").unwrap(),
            (126976, 612351)
        );
    }

    #[test]
    fn parted_facts_4gib() {
        let total = GIB4 / SECTOR;
        assert_eq!(
            resolve_range(GIB4, LabelKind::Msdos, "0%", "100%").unwrap(),
            (2048, total - 1)
        );
        assert_eq!(
            resolve_range(MIB300, LabelKind::Msdos, "0%", "100%").unwrap(),
            (2048, MIB300 / SECTOR - 1)
        );
        assert_eq!(
            resolve_range(GIB4, LabelKind::Msdos, "0%", "50%").unwrap(),
            (2048, 4194303)
        );
        assert_eq!(
            resolve_range(GIB4, LabelKind::Gpt, "0%", "1G").unwrap(),
            (2048, 1953791)
        );
        assert_eq!(
            resolve_range(GIB4, LabelKind::Gpt, "1G", "100%").unwrap(),
            (1953792, 8386559)
        );
    }

    #[test]
    fn explicit_sectors_are_exact() {
        assert_eq!(
            resolve_range(MIB300, LabelKind::Gpt, "2048s", "4095s").unwrap(),
            (2048, 4095)
        );
        assert_eq!(
            // With an unaligned start parted stops aligning the end too.
            resolve_range(MIB300, LabelKind::Gpt, "2049s", "100%").unwrap(),
            (2049, 614366)
        );
        // Small byte values still land on the first MiB.
        assert_eq!(
            resolve_range(MIB300, LabelKind::Msdos, "512B", "299MiB").unwrap(),
            (2048, 612351)
        );
        // Binary units are exact in parted (all measured with parted 3.5):
        // no rounding, the end one sector before the value, and with an
        // unaligned start the end is not aligned either.
        assert_eq!(
            resolve_range(MIB300, LabelKind::Gpt, "1.5MiB", "3MiB").unwrap(),
            (3072, 6143)
        );
        assert_eq!(
            resolve_range(MIB300, LabelKind::Gpt, "512KiB", "3MiB").unwrap(),
            (1024, 6143)
        );
        assert_eq!(
            resolve_range(MIB300, LabelKind::Gpt, "1536KiB", "100%").unwrap(),
            (3072, 614366)
        );
        assert_eq!(
            resolve_range(GIB4, LabelKind::Msdos, "1MiB", "300MiB").unwrap(),
            (2048, 614399)
        );
        // ... and parted refuses one that ends on the disk end itself.
        assert!(resolve_range(MIB300, LabelKind::Msdos, "1MiB", "300MiB").is_err());
    }

    #[test]
    fn bad_ranges_are_errors() {
        let gpt = LabelKind::Gpt;
        // End before start.
        assert!(resolve_range(MIB300, gpt, "100M", "50M").is_err());
        // End rounds to the disk start.
        assert!(resolve_range(MIB300, gpt, "0%", "0%").is_err());
        // Start past the end of the disk.
        assert!(resolve_range(MIB300, gpt, "1G", "100%").is_err());
        // Explicit sectors inside the GPT header or past the backup table.
        assert!(resolve_range(MIB300, gpt, "10s", "100%").is_err());
        assert!(resolve_range(MIB300, gpt, "2048s", "614399s").is_err());
        // Positions outside the disk are refused, as parted does.
        let err = resolve_range(10 << 20, gpt, "1M", "65M").unwrap_err();
        assert!(err.to_string().contains("outside the disk"), "{err}");
        assert!(resolve_range(10 << 20, LabelKind::Msdos, "1", "100").is_err());
        // Garbage is reported as such.
        let err = resolve_range(MIB300, gpt, "1M", "12Q").unwrap_err();
        assert!(err.to_string().contains("12Q"));
    }

    #[test]
    fn label_names() {
        assert_eq!(LabelKind::parse("msdos"), Some(LabelKind::Msdos));
        assert_eq!(LabelKind::parse("dos"), Some(LabelKind::Msdos));
        assert_eq!(LabelKind::parse("mbr"), Some(LabelKind::Msdos));
        assert_eq!(LabelKind::parse("gpt"), Some(LabelKind::Gpt));
        assert_eq!(LabelKind::parse("GPT"), Some(LabelKind::Gpt));
        assert_eq!(LabelKind::parse("sun"), None);
    }

    // ---- on-disk tables, checked with util-linux --------------------------

    #[test]
    fn gpt_table_reads_back_with_sfdisk_and_fdisk() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, "gpt.img", MIB300);
        assert_eq!(read_label(&img).unwrap(), None);
        write_label(&img, LabelKind::Gpt).unwrap();
        assert_eq!(read_label(&img).unwrap(), Some(LabelKind::Gpt));
        assert_fdisk_clean(&img);
        assert!(sf_parts(&sfdisk_json(&img)).is_empty());

        assert_eq!(add(&img, "efi", "vfat", "1M", "65M").unwrap(), 1);
        assert_eq!(add(&img, "root", "ext4", "65M", "100%").unwrap(), 2);

        let t = sfdisk_json(&img);
        assert_eq!(t["label"], "gpt");
        assert_eq!(t["lastlba"], 614366);
        let p = sf_parts(&t);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0]["start"], 2048);
        assert_eq!(p[0]["size"], 126975 - 2048 + 1);
        assert_eq!(p[0]["type"], "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7");
        assert_eq!(p[0]["name"], "efi");
        assert_eq!(p[1]["start"], 126976);
        assert_eq!(p[1]["size"], 612351 - 126976 + 1);
        assert_eq!(p[1]["type"], "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
        assert!(p[1]["node"].as_str().unwrap().ends_with('2'));
        assert_fdisk_clean(&img);

        assert_eq!(
            read_partitions(&img).unwrap(),
            vec![
                PartitionInfo {
                    number: 1,
                    start_sector: 2048,
                    size_sectors: 124928,
                    type_id: "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7".into(),
                },
                PartitionInfo {
                    number: 2,
                    start_sector: 126976,
                    size_sectors: 485376,
                    type_id: "0FC63DAF-8483-4772-8E79-3D69D8477DE4".into(),
                },
            ]
        );
    }

    #[test]
    fn gpt_swap_type() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, "swap.img", MIB300);
        write_label(&img, LabelKind::Gpt).unwrap();
        add(&img, "swap", "linux-swap", "0%", "100%").unwrap();
        let p = sf_parts(&sfdisk_json(&img));
        assert_eq!(p[0]["type"], "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F");
    }

    #[test]
    fn msdos_table_reads_back_with_sfdisk() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, "mbr.img", GIB4);
        write_label(&img, LabelKind::Msdos).unwrap();
        assert_eq!(read_label(&img).unwrap(), Some(LabelKind::Msdos));
        assert_eq!(add(&img, "primary", "fat32", "0%", "10%").unwrap(), 1);
        assert_eq!(add(&img, "primary", "ext4", "10%", "50%").unwrap(), 2);
        assert_eq!(add(&img, "primary", "fat16", "50%", "60%").unwrap(), 3);
        assert_eq!(
            add(&img, "primary", "linux-swap", "60%", "100%").unwrap(),
            4
        );

        let t = sfdisk_json(&img);
        assert_eq!(t["label"], "dos");
        let id = t["id"].as_str().unwrap();
        assert_ne!(id, "0x00000000", "disk signature must be set");
        let p = sf_parts(&t);
        let types: Vec<&str> = p.iter().map(|x| x["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["c", "83", "6", "82"]);
        assert_eq!(p[0]["start"], 2048);
        assert_eq!(
            p[1]["start"],
            p[0]["start"].as_u64().unwrap() + p[0]["size"].as_u64().unwrap()
        );
        assert_eq!(
            p[1]["start"].as_u64().unwrap() + p[1]["size"].as_u64().unwrap(),
            4194304
        );
        assert_eq!(
            p[3]["start"].as_u64().unwrap() + p[3]["size"].as_u64().unwrap(),
            GIB4 / SECTOR
        );
        assert_fdisk_clean(&img);

        let back = read_partitions(&img).unwrap();
        assert_eq!(back.len(), 4);
        for (mine, theirs) in back.iter().zip(&p) {
            assert_eq!(mine.start_sector, theirs["start"].as_u64().unwrap());
            assert_eq!(mine.size_sectors, theirs["size"].as_u64().unwrap());
            assert_eq!(mine.type_id, theirs["type"].as_str().unwrap());
        }

        // A fifth primary does not fit.
        let err = add(&img, "primary", "ext4", "1G", "2G").unwrap_err();
        assert!(err.to_string().contains("full"), "{err}");
    }

    #[test]
    fn overlap_and_past_end_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for kind in [LabelKind::Gpt, LabelKind::Msdos] {
            let img = image(&dir, &format!("{kind:?}.img"), MIB300);
            write_label(&img, kind).unwrap();
            add(&img, "primary", "ext4", "1MiB", "100MiB").unwrap();

            let err = add(&img, "primary", "ext4", "50MiB", "150MiB").unwrap_err();
            assert!(err.to_string().contains("overlaps partition 1"), "{err}");

            let total = MIB300 / SECTOR;
            let err = add_partition(
                &img,
                &NewPartition {
                    part_type: "primary",
                    fs_type: "ext4",
                    start_sector: 204800,
                    end_sector: total,
                },
            )
            .unwrap_err();
            assert!(err.to_string().contains("past the last"), "{err}");

            // Nothing was written by the failed attempts.
            assert_eq!(read_partitions(&img).unwrap().len(), 1);
        }
    }

    #[test]
    fn msdos_logical_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, "l.img", MIB300);
        write_label(&img, LabelKind::Msdos).unwrap();
        let err = add(&img, "logical", "ext4", "1M", "10M").unwrap_err();
        assert!(err.to_string().contains("not supported"), "{err}");
    }

    #[test]
    fn gpt_flags() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, "flags.img", MIB300);
        write_label(&img, LabelKind::Gpt).unwrap();
        add(&img, "bios", "ext2", "1M", "2M").unwrap();
        add(&img, "efi", "fat32", "2M", "100M").unwrap();
        add(&img, "root", "ext4", "100M", "100%").unwrap();

        set_flag(&img, 1, "bios_grub", true).unwrap();
        set_flag(&img, 2, "esp", true).unwrap();
        set_flag(&img, 3, "legacy_boot", true).unwrap();
        let p = sf_parts(&sfdisk_json(&img));
        assert_eq!(p[0]["type"], "21686148-6449-6E6F-744E-656564454649");
        assert_eq!(p[1]["type"], "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert_eq!(p[2]["type"], "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
        assert_eq!(p[2]["attrs"], "LegacyBIOSBootable");
        // Names and positions survive a flag change.
        assert_eq!(p[1]["name"], "efi");
        assert_eq!(p[1]["start"], 4096);
        assert_fdisk_clean(&img);

        set_flag(&img, 3, "lvm", true).unwrap();
        assert_eq!(
            read_partitions(&img).unwrap()[2].type_id,
            "E6D6D379-F507-44C2-A23C-238F2A3DF928"
        );
        set_flag(&img, 3, "lvm", false).unwrap();
        set_flag(&img, 3, "legacy_boot", false).unwrap();
        // Clearing a flag the partition does not have changes nothing.
        set_flag(&img, 2, "raid", false).unwrap();
        let p = sf_parts(&sfdisk_json(&img));
        assert_eq!(p[1]["type"], "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert_eq!(p[2]["type"], "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
        assert!(p[2].get("attrs").is_none(), "{:?}", p[2]);

        // "boot" on GPT is parted's alias for esp.
        set_flag(&img, 3, "boot", true).unwrap();
        assert_eq!(
            read_partitions(&img).unwrap()[2].type_id,
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
        );

        assert!(set_flag(&img, 9, "esp", true).is_err());
        let err = set_flag(&img, 1, "frobnicate", true)
            .unwrap_err()
            .to_string();
        for f in known_flags() {
            assert!(err.contains(f), "{err}");
        }
        assert_fdisk_clean(&img);
    }

    #[test]
    fn msdos_flags() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, "mflags.img", MIB300);
        write_label(&img, LabelKind::Msdos).unwrap();
        add(&img, "primary", "ext4", "1M", "100M").unwrap();
        add(&img, "primary", "ext4", "100M", "200M").unwrap();
        add(&img, "primary", "ext4", "200M", "100%").unwrap();

        set_flag(&img, 1, "boot", true).unwrap();
        set_flag(&img, 2, "esp", true).unwrap();
        set_flag(&img, 3, "lvm", true).unwrap();
        let p = sf_parts(&sfdisk_json(&img));
        assert_eq!(p[0]["bootable"], true);
        assert!(p[1].get("bootable").is_none());
        assert_eq!(p[1]["type"], "ef");
        assert_eq!(p[2]["type"], "8e");

        // Only one partition stays active, as with parted.
        set_flag(&img, 3, "boot", true).unwrap();
        let p = sf_parts(&sfdisk_json(&img));
        assert!(p[0].get("bootable").is_none());
        assert_eq!(p[2]["bootable"], true);

        set_flag(&img, 2, "esp", false).unwrap();
        set_flag(&img, 3, "boot", false).unwrap();
        let p = sf_parts(&sfdisk_json(&img));
        assert_eq!(p[1]["type"], "83");
        assert!(p[2].get("bootable").is_none());

        let err = set_flag(&img, 1, "bios_grub", true).unwrap_err();
        assert!(err.to_string().contains("msdos"), "{err}");
        assert!(set_flag(&img, 4, "boot", true).is_err());
        assert_fdisk_clean(&img);
    }

    #[test]
    fn relabel_wipes_previous_table() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, "re.img", MIB300);
        write_label(&img, LabelKind::Gpt).unwrap();
        add(&img, "root", "ext4", "0%", "100%").unwrap();

        write_label(&img, LabelKind::Msdos).unwrap();
        assert_eq!(read_label(&img).unwrap(), Some(LabelKind::Msdos));
        let t = sfdisk_json(&img);
        assert_eq!(t["label"], "dos");
        assert!(sf_parts(&t).is_empty());
        assert_fdisk_clean(&img);

        add(&img, "primary", "ext4", "0%", "100%").unwrap();
        write_label(&img, LabelKind::Gpt).unwrap();
        let t = sfdisk_json(&img);
        assert_eq!(t["label"], "gpt");
        assert!(sf_parts(&t).is_empty());
        assert!(read_partitions(&img).unwrap().is_empty());
        assert_fdisk_clean(&img);
    }

    #[test]
    fn unlabelled_disk() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, "blank.img", MIB300);
        assert_eq!(read_label(&img).unwrap(), None);
        assert!(read_partitions(&img).is_err());
        let tiny = image(&dir, "tiny.img", 100);
        assert_eq!(read_label(&tiny).unwrap(), None);
        assert!(write_label(&tiny, LabelKind::Gpt).is_err());
        assert_eq!(super::super::disk_size(&img).unwrap(), MIB300);
    }

    /// Detaches the loop device even when an assertion fails.
    struct Loop(String);
    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }

    #[test]
    fn works_on_a_loop_device() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&dir, "loop.img", MIB300);
        // Loop devices need root and a kernel that allows them; elsewhere
        // (an unprivileged CI container) this test has nothing to test.
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .output();
        let dev = match out {
            Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap().trim().to_string(),
            _ => {
                eprintln!("skipping: cannot attach a loop device");
                return;
            }
        };
        let lo = Loop(dev);
        let dev = Path::new(&lo.0);
        assert!(super::super::is_block_device(dev));
        assert_eq!(super::super::disk_size(dev).unwrap(), MIB300);

        write_label(dev, LabelKind::Gpt).unwrap();
        assert_eq!(add(dev, "root", "ext4", "1M", "65M").unwrap(), 1);
        assert_eq!(add(dev, "data", "ext4", "65M", "100%").unwrap(), 2);
        set_flag(dev, 1, "esp", true).unwrap();
        drop(lo);

        // The writes went through the device into the backing file.
        let p = sf_parts(&sfdisk_json(&img));
        assert_eq!(p[0]["start"], 2048);
        assert_eq!(p[0]["type"], "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert_eq!(p[1]["start"], 126976);
        assert_eq!(p[1]["size"], 612351 - 126976 + 1);
        assert_fdisk_clean(&img);
    }
}
