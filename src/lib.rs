//! vmdb: build disk images from a YAML spec of steps.
//!
//! The front (main, cli, app, matrix, cachecmd) over layers whose imports only point
//! down: plugins -> distro -> engine -> output -> host -> base (log, event, progress,
//! size, digest); boot (`vmdb boot`) uses host and base only.

pub mod app;
pub mod cachecmd;
pub mod cli;
pub mod matrix;

pub mod boot;
pub mod distro;
pub mod engine;
pub mod host;
pub mod output;
pub mod plugins;

pub mod digest;
pub mod event;
pub mod log;
pub mod progress;
pub mod size;
