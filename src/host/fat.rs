//! FAT filesystems without the kernel: on these hosts the kernel cannot mount vfat, so
//! a FAT mount point is a staging directory whose contents mtools copy in and out.

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::host::cmd::Cmd;

fn mtools(prog: &str) -> Cmd {
    Cmd::new(prog).env("MTOOLS_SKIP_CHECK", "1")
}

/// mtools cannot use a loop device (it wants a drive geometry), so it is pointed at
/// the disk image itself with the partition's byte offset.
fn drive(disk: &Path, offset: u64) -> String {
    format!("{}@@{offset}", disk.display())
}

/// Copy everything in the FAT filesystem at `offset` of `disk` into `dir`.
pub fn copy_out(disk: &Path, offset: u64, dir: &Path) -> Result<()> {
    let dev = drive(disk, offset);
    let listing = mtools("mdir").args(["-b", "-i"]).arg(&dev).arg("::/").run();
    // mdir fails on an empty root directory; then there is nothing to copy.
    if listing.map(|l| l.trim().is_empty()).unwrap_or(true) {
        return Ok(());
    }
    mtools("mcopy")
        .args(["-s", "-n", "-m", "-Q", "-i"])
        .arg(&dev)
        .arg("::*")
        .arg(dir)
        .run()
        .with_context(|| format!("copying the FAT filesystem on {} out", dev))?;
    Ok(())
}

/// Copy everything below `dir` into the root of the FAT filesystem at `offset` of
/// `disk`, overwriting files of the same name.
pub fn copy_in(dir: &Path, disk: &Path, offset: u64) -> Result<()> {
    let dev = drive(disk, offset);
    // mcopy follows symbolic links (copy-dir copies links as links): one would put what
    // it leads to on the host into the filesystem. FAT has no links anyway.
    if let Some(link) = first_link(dir, dir)? {
        bail!(
            "cannot copy {} into the FAT filesystem on {dev}: it is a symbolic link, and FAT has none",
            link.display()
        );
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    if entries.is_empty() {
        return Ok(());
    }
    entries.sort();
    mtools("mcopy")
        .args(["-s", "-o", "-m", "-Q", "-i"])
        .arg(&dev)
        .args(&entries)
        .arg("::/")
        .run()
        .with_context(|| {
            format!(
                "copying {} into the FAT filesystem on {}",
                dir.display(),
                dev
            )
        })?;
    Ok(())
}

/// The first symbolic link below `dir`, relative to `base`.
fn first_link(base: &Path, dir: &Path) -> Result<Option<std::path::PathBuf>> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let t = e
            .file_type()
            .with_context(|| format!("examining {}", e.path().display()))?;
        if t.is_symlink() {
            return Ok(Some(e.path().strip_prefix(base)?.to_path_buf()));
        }
        if t.is_dir() {
            if let Some(l) = first_link(base, &e.path())? {
                return Ok(Some(l));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_a_fat_image() {
        if Cmd::new("mkfs.vfat").arg("--help").run().is_err()
            && !Path::new("/sbin/mkfs.vfat").exists()
        {
            eprintln!("skipped: dosfstools missing");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("fat.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        Cmd::new("mkfs.vfat").arg(&img).run().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("EFI/BOOT")).unwrap();
        std::fs::write(src.join("EFI/BOOT/BOOTX64.EFI"), b"efi binary").unwrap();
        std::fs::write(src.join("startup.nsh"), b"fs0:").unwrap();
        copy_in(&src, &img, 0).unwrap();
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        copy_out(&img, 0, &out).unwrap();
        assert_eq!(
            std::fs::read(out.join("EFI/BOOT/BOOTX64.EFI")).unwrap(),
            b"efi binary"
        );
        assert_eq!(std::fs::read(out.join("startup.nsh")).unwrap(), b"fs0:");
        // An empty filesystem copies out to nothing.
        let img2 = d.path().join("empty.img");
        std::fs::File::create(&img2)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        Cmd::new("mkfs.vfat").arg(&img2).run().unwrap();
        let out2 = d.path().join("out2");
        std::fs::create_dir(&out2).unwrap();
        copy_out(&img2, 0, &out2).unwrap();
        assert_eq!(std::fs::read_dir(&out2).unwrap().count(), 0);
    }

    #[test]
    fn links_are_not_followed_onto_the_host() {
        let canary = crate::plugins::testing::Canary::new();
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("fat.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        Cmd::new("mkfs.vfat").arg(&img).run().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("EFI/BOOT")).unwrap();
        std::fs::write(src.join("EFI/BOOT/BOOTX64.EFI"), b"efi binary").unwrap();
        let host_file = canary.path.join("file").display().to_string();
        crate::plugins::testing::plant_link(&src, "EFI/BOOT/grub.cfg", &host_file);
        let e = copy_in(&src, &img, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot copy EFI/BOOT/grub.cfg into the FAT filesystem on {}@@0: it is a \
                 symbolic link, and FAT has none",
                img.display()
            )
        );
        let listing = mtools("mdir")
            .args(["-/", "-b", "-i"])
            .arg(&img)
            .arg("::/")
            .run();
        assert_eq!(listing.unwrap_or_default(), "", "nothing was copied");
    }
}
