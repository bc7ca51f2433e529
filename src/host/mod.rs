//! The machine, knowing nothing of builds: programs, mounts, block devices, FAT
//! filesystems, paths inside an image tree, and locked cache files.

pub mod blockdev;
pub mod cachefile;
pub mod cmd;
pub mod fat;
pub mod image_root;
pub mod mount;
pub mod signals;
pub mod tarball;
