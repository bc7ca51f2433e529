//! What the steps share that knows Debian: bootstrapping, mirrors and archives, the
//! package download cache, foreign architectures, and running programs in the image.

pub mod binfmt;
pub mod bootstrap;
pub mod chroot;
pub mod debcache;
pub mod mirror;
