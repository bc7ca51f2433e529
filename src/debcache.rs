//! The package download cache shared by all builds on the machine: .deb files that
//! debootstrap and apt downloaded, so that a later build of any spec downloads none of
//! them again. Both tools check a cached package against the archive's checksums before
//! using it, and fetch it anew when it does not match.
//!
//! debootstrap uses the directory itself (its --cache-dir). apt gets copies: the image's
//! /var/cache/apt/archives is filled from the cache before an install and what it
//! downloaded is copied back after, so that builds running at once never share apt's
//! lock and `apt-get clean` in the image never empties the shared cache.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::build::Options;
use crate::image_root::ImageRoot;
use rustix::fs::FileType;

/// apt's package directory in the image.
const ARCHIVES: &str = "/var/cache/apt/archives";

/// The cache directory, created if needed; None when caching is off.
pub fn dir(opts: &Options) -> Option<PathBuf> {
    let d = opts.cache_dir.as_ref()?.join("debs");
    match std::fs::create_dir_all(&d) {
        Ok(()) => Some(d),
        Err(e) => {
            crate::log::info(&format!(
                "vmdb: warning: no package cache at {}: {e}",
                d.display()
            ));
            None
        }
    }
}

/// Copy the cached packages named in `wanted` (file names, as apt names them) that the
/// image's archive directory lacks into it. Only those: the cache holds every suite's
/// and architecture's packages, and what is copied is written into the image.
pub fn seed(cache: &Path, root: &Path, wanted: &[String]) -> Result<usize> {
    // The image's side is resolved inside the image: its links never lead to the host.
    let img = ImageRoot::open(root)?;
    let archives = Path::new(ARCHIVES);
    if !img.is_dir(archives)? {
        return Ok(0);
    }
    let mut n = 0;
    for name in wanted {
        let (src, dest) = (cache.join(name), archives.join(name));
        if src.is_file() && !img.exists(&dest)? {
            img.copy_in(&src, &dest, 0o644)
                .with_context(|| format!("copying {name} from the package cache"))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Copy the packages in the image's archive directory that the cache lacks into it
/// (under a temporary name, renamed into place, so a reader never sees half a file).
pub fn collect(cache: &Path, root: &Path) -> Result<usize> {
    let img = ImageRoot::open(root)?;
    let archives = Path::new(ARCHIVES);
    let mut n = 0;
    let in_image = img.read_dir(archives)?.unwrap_or_default().into_iter();
    let debs = in_image.filter(|e| e.kind == FileType::RegularFile);
    for name in debs
        .map(|e| e.name)
        .filter(|n| n.to_string_lossy().ends_with(".deb"))
    {
        let dest = cache.join(&name);
        if dest.exists() {
            continue;
        }
        let tmp = cache.join(format!(
            ".{}.{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        img.copy_out(archives.join(&name), &tmp)
            .with_context(|| format!("copying {} to the package cache", name.to_string_lossy()))?;
        std::fs::rename(&tmp, &dest)?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_and_collect() {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("debs");
        let root = d.path().join("root");
        let archives = root.join("var/cache/apt/archives");
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::create_dir_all(&archives).unwrap();
        std::fs::write(cache.join("a_1_amd64.deb"), "a").unwrap();
        std::fs::write(archives.join("b_1_amd64.deb"), "b").unwrap();
        std::fs::write(archives.join("lock"), "").unwrap();
        std::fs::write(cache.join("c_1_i386.deb"), "c").unwrap();
        let wanted = ["a_1_amd64.deb".to_string(), "d_1_all.deb".to_string()];
        assert_eq!(seed(&cache, &root, &wanted).unwrap(), 1);
        assert!(!archives.join("c_1_i386.deb").exists());
        assert_eq!(
            std::fs::read_to_string(archives.join("a_1_amd64.deb")).unwrap(),
            "a"
        );
        assert_eq!(collect(&cache, &root).unwrap(), 1);
        assert_eq!(
            std::fs::read_to_string(cache.join("b_1_amd64.deb")).unwrap(),
            "b"
        );
        assert!(!cache.join("lock").exists());
        // Nothing new either way the second time.
        assert_eq!(seed(&cache, &root, &wanted).unwrap(), 0);
        assert_eq!(collect(&cache, &root).unwrap(), 0);
    }
}
