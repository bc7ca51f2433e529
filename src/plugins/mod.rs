//! The step types, one file each. Order matters where a step could match two types:
//! the first plugin whose name is a key of the step wins (chroot before shell).

use crate::step::Plugin;

pub mod echo;
pub mod error;

pub static ALL: &[&dyn Plugin] = &[&echo::Echo, &error::Error];
