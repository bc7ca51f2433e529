// TEMPORARY STUB (replaced by the real module)
use anyhow::Result;
use std::path::Path;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelKind {
    Msdos,
    Gpt,
}
impl LabelKind {
    pub fn parse(s: &str) -> Option<LabelKind> {
        match s {
            "msdos" | "dos" | "mbr" => Some(LabelKind::Msdos),
            "gpt" => Some(LabelKind::Gpt),
            _ => None,
        }
    }
}
pub enum Position {
    Bytes(u64),
}
pub fn disk_size(_p: &Path) -> Result<u64> {
    todo!()
}
pub fn write_label(_p: &Path, _k: LabelKind) -> Result<()> {
    todo!()
}
pub fn read_label(_p: &Path) -> Result<Option<LabelKind>> {
    todo!()
}
pub fn resolve_range(_d: u64, _k: LabelKind, _s: &str, _e: &str) -> Result<(u64, u64)> {
    todo!()
}
pub fn parse_position(_s: &str) -> Result<Position> {
    todo!()
}
pub struct NewPartition<'a> {
    pub part_type: &'a str,
    pub fs_type: &'a str,
    pub start_sector: u64,
    pub end_sector: u64,
}
pub fn add_partition(_p: &Path, _n: &NewPartition) -> Result<u32> {
    todo!()
}
pub struct PartitionInfo {
    pub number: u32,
    pub start_sector: u64,
    pub size_sectors: u64,
    pub type_id: String,
}
pub fn read_partitions(_p: &Path) -> Result<Vec<PartitionInfo>> {
    todo!()
}
pub fn set_flag(_p: &Path, _n: u32, _f: &str, _on: bool) -> Result<()> {
    todo!()
}
pub fn known_flags() -> &'static [&'static str] {
    &[]
}
