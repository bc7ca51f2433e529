//! vmdb: build disk images from a YAML spec of steps.

pub mod app;
pub mod binfmt;
pub mod blockdev;
pub mod boot;
pub mod build;
pub mod chroot;
pub mod cli;
pub mod cmd;
pub mod fat;
pub mod log;
pub mod mirror;
pub mod mount;
pub mod plan;
pub mod plugins;
pub mod runner;
pub mod size;
pub mod spec;
pub mod state;
pub mod step;
pub mod supervisor;
pub mod template;
