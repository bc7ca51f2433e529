//! Block devices: loop devices and partition tables.

pub mod busy;
pub mod loopdev;
pub mod table;
