//! What the steps share that knows Debian: bootstrapping, mirrors and archives, the
//! package download cache, foreign architectures, and running programs in the image.

pub mod binfmt;
pub mod bootstrap;
pub mod chroot;
pub mod debcache;
pub mod mirror;

use std::path::Path;

use anyhow::Result;

use crate::engine::cachekey::Archive;
use crate::engine::step::Distro;
use crate::host::cmd::Cmd;
use crate::output::Package;

/// What the engine learns of Debian (see `Distro`).
pub struct Debian;

impl Distro for Debian {
    fn archives_named_in(&self, text: &str) -> Vec<Archive> {
        mirror::sources_in(text)
            .into_iter()
            .map(|(uri, suite)| mirror::archive(&uri, &suite))
            .collect()
    }

    fn archive_states(&self, archives: &[Archive]) -> Vec<Result<String, String>> {
        mirror::archive_states(archives)
    }

    fn state_date(&self, state: &str) -> String {
        mirror::state_date(state).to_string()
    }

    fn installed_packages(&self, root: &Path) -> Result<Option<Vec<Package>>> {
        installed_packages(root)
    }
}

/// The packages installed in the image whose root is at `root` (from its dpkg
/// database; dpkg-query of the host reads it, nothing runs in the image).
pub fn installed_packages(root: &Path) -> Result<Option<Vec<Package>>> {
    // Where the image's dpkg database is, inside the image (not through its links).
    let img = crate::host::image_root::ImageRoot::open(root)?;
    if !img.is_file("/var/lib/dpkg/status")? {
        return Ok(None);
    }
    let admindir = img.host_path("/var/lib/dpkg")?;
    let out = Cmd::new("dpkg-query")
        .arg(format!("--admindir={}", admindir.display()))
        .args([
            "-W",
            "-f",
            "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n",
        ])
        .run()?;
    Ok(Some(parse_packages(&out)))
}

/// Lines of `STATUS\tNAME\tVERSION\tARCH`; only installed packages ("ii").
pub fn parse_packages(out: &str) -> Vec<Package> {
    let mut v: Vec<Package> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            match f.as_slice() {
                [status, name, version, arch] if status.trim() == "ii" => Some(Package {
                    name: name.to_string(),
                    version: version.to_string(),
                    architecture: arch.to_string(),
                }),
                _ => None,
            }
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::{Canary, plant_link};

    // What the Debian helpers do in the image, through hostile links.

    #[test]
    fn package_cache_seed_and_collect_stay_in_the_image() {
        let canary = Canary::new();
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("debs");
        std::fs::create_dir(&cache).unwrap();
        std::fs::write(cache.join("a_1_amd64.deb"), "a").unwrap();
        let root = d.path().join("root");
        let inside = canary.inside(&root);
        plant_link(
            &root,
            "var/cache/apt/archives",
            &canary.path.display().to_string(),
        );
        let sum = |data: &[u8]| crate::digest::sha256(data);
        let wanted: crate::distro::debcache::Sums =
            [("a_1_amd64.deb".to_string(), sum(b"a"))].into();
        assert_eq!(crate::distro::debcache::seed(&cache, &root, &wanted), 1);
        canary.assert_untouched();
        assert_eq!(std::fs::read(inside.join("a_1_amd64.deb")).unwrap(), b"a");
        // A "package" in the image that is a link to a host file is not collected.
        std::os::unix::fs::symlink(canary.path.join("file"), inside.join("evil_1_all.deb"))
            .unwrap();
        std::fs::write(inside.join("b_1_amd64.deb"), "b").unwrap();
        let sums: crate::distro::debcache::Sums = [
            ("b_1_amd64.deb".to_string(), sum(b"b")),
            (
                "evil_1_all.deb".to_string(),
                sum(&std::fs::read(canary.path.join("file")).unwrap()),
            ),
        ]
        .into();
        let archives = crate::distro::debcache::archives(&root).unwrap();
        assert_eq!(
            crate::distro::debcache::collect(&cache, &archives, &sums),
            1
        );
        assert_eq!(std::fs::read(cache.join("b_1_amd64.deb")).unwrap(), b"b");
        assert!(!cache.join("evil_1_all.deb").exists());
    }

    #[test]
    fn mmdebstrap_tidy_removes_nothing_on_the_host() {
        let canary = Canary::new();
        for f in [
            "pkgcache.bin",
            "archives/x_1_all.deb",
            "dpkg.cfg.d/99mmdebstrap",
        ] {
            let p = canary.path.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "force-unsafe-io\n").unwrap();
        }
        let before = canary.snapshot();
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let inside = canary.inside(root);
        std::fs::create_dir_all(inside.join("archives")).unwrap();
        std::fs::write(inside.join("archives/y_1_all.deb"), "").unwrap();
        plant_link(root, "var/cache/apt", &canary.path.display().to_string());
        plant_link(root, "etc/dpkg", &canary.escaping());
        crate::distro::bootstrap::tidy(root).unwrap();
        assert_eq!(canary.snapshot(), before);
        assert!(!inside.join("archives/y_1_all.deb").exists());
    }

    #[test]
    fn the_images_dpkg_database_is_read_inside_it() {
        // The host's dpkg database says arm64 and lists a package of the host.
        let canary = Canary::new();
        std::fs::write(
            canary.path.join("status"),
            "Package: base-files\nStatus: install ok installed\nVersion: 1\nArchitecture: arm64\n\n",
        )
        .unwrap();
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let inside = canary.inside(root);
        plant_link(root, "var/lib/dpkg", &canary.path.display().to_string());
        assert_eq!(crate::distro::binfmt::image_arch(root).unwrap(), None);
        assert!(installed_packages(root).unwrap().is_none());
        std::fs::write(
            inside.join("status"),
            "Package: base-files\nStatus: install ok installed\nVersion: 2\nArchitecture: amd64\n\n",
        )
        .unwrap();
        assert_eq!(
            crate::distro::binfmt::image_arch(root).unwrap().as_deref(),
            Some("amd64")
        );
        let p = installed_packages(root).unwrap().unwrap();
        let p: Vec<_> = p
            .iter()
            .map(|p| (&p.name[..], &p.version[..], &p.architecture[..]))
            .collect();
        assert_eq!(p, [("base-files", "2", "amd64")]);
    }

    #[test]
    fn only_installed_packages_sorted() {
        let out =
            "ii \tzlib1g\t1:1.2.13\tamd64\nrc \told\t1\tamd64\nii \tbase-files\t12.4\tamd64\n";
        assert_eq!(
            parse_packages(out),
            vec![
                Package {
                    name: "base-files".into(),
                    version: "12.4".into(),
                    architecture: "amd64".into()
                },
                Package {
                    name: "zlib1g".into(),
                    version: "1:1.2.13".into(),
                    architecture: "amd64".into()
                },
            ]
        );
    }
}
