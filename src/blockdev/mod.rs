//! Block devices: loop devices and partition tables.

pub mod loopdev;
pub mod table;
