//! `cloud-init-seed: PATH`: write a cloud-init NoCloud seed (an ISO 9660 image or a
//! FAT filesystem labelled `cidata`, holding user-data and meta-data) as one more
//! output of the build, beside the image.

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::engine::build::Build;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::host::cmd::Cmd;

pub struct CloudInitSeed;

static SPEC: StepSpec = StepSpec {
    name: "cloud-init-seed",
    value: Kind::Str,
    value_doc: "path of the seed file. A relative path is relative to the current directory (as \
        `--output`), not to the spec.",
    keys: &[
        Key::req(
            "user-data",
            Kind::Str,
            "the `user-data` file, e.g. a `#cloud-config` document.",
        ),
        Key::opt(
            "meta-data",
            Kind::Str,
            "the `meta-data` file, e.g. `instance-id` and `local-hostname`. Without \
                it: `instance-id: vmdb-HASH`, with a hash of the user-data \
                (cloud-init runs its once-per-instance modules again when the \
                instance-id changes).",
        ),
        Key::opt(
            "network-config",
            Kind::Str,
            "a `network-config` file (network config version 1 or 2).",
        ),
        Key::opt(
            "format",
            Kind::Str,
            "`iso` writes an ISO 9660 image with volume id `cidata` (Rock Ridge and \
                Joliet) with `xorriso`, or `genisoimage` when xorriso is not \
                installed; `vfat` writes a 1 MiB FAT filesystem labelled `cidata` \
                with `mkfs.fat` and `mcopy`.",
        )
        .default("iso"),
    ],
    summary: "Writes a cloud-init NoCloud seed: a small disk image that cloud-init in a booting \
        machine finds by its volume label `cidata` and reads its configuration from.",
    cache: CacheRole::Volatile,
    always_saved: false,
};

/// The volume label cloud-init's NoCloud datasource looks for.
pub const LABEL: &str = "cidata";

/// The files of the seed, in order.
pub fn seed_files(step: &Step) -> Result<Vec<(&'static str, String)>> {
    let user = step.str("user-data")?.to_string();
    let meta = match step.opt_str("meta-data") {
        Some(m) => m.to_string(),
        None => default_meta_data(&user),
    };
    let mut files = vec![("user-data", user), ("meta-data", meta)];
    if let Some(n) = step.opt_str("network-config") {
        files.push(("network-config", n.to_string()));
    }
    Ok(files)
}

/// `instance-id: vmdb-HASH`: cloud-init runs its once-per-instance modules again
/// when the instance-id changes, so it follows the user-data.
pub fn default_meta_data(user_data: &str) -> String {
    format!(
        "instance-id: vmdb-{}\n",
        &crate::digest::sha256(user_data.as_bytes())[..16]
    )
}

/// The programs that write ISO 9660 images, in the order they are tried.
const ISO_TOOLS: &[(&str, &str)] = &[("xorriso", "xorriso"), ("genisoimage", "genisoimage")];

/// The program that writes ISO 9660 images: xorriso, or else genisoimage.
fn iso_tool() -> Result<Cmd> {
    if crate::host::cmd::in_path("xorriso") {
        Ok(Cmd::new("xorriso").args(["-as", "mkisofs"]))
    } else if crate::host::cmd::in_path("genisoimage") {
        Ok(Cmd::new("genisoimage"))
    } else {
        bail!("writing an ISO 9660 seed needs xorriso or genisoimage (or use format: vfat)")
    }
}

/// Write the seed at `out` from the files in `dir`.
pub fn write_seed(format: &str, dir: &Path, names: &[&str], out: &Path) -> Result<()> {
    match format {
        "iso" => {
            iso_tool()?
                .args(["-quiet", "-output"])
                .arg(out)
                .args(["-volid", LABEL, "-joliet", "-rock"])
                .args(names.iter().map(|n| dir.join(n)))
                .run()?;
        }
        "vfat" => {
            // 1 MiB: mkfs.fat's smallest comfortable FAT12 size, far more than needed.
            Cmd::new("mkfs.fat")
                .args(["-n", LABEL, "-C"])
                .arg(out)
                .arg("1024")
                .run()?;
            Cmd::new("mcopy")
                .arg("-i")
                .arg(out)
                .args(names.iter().map(|n| dir.join(n)))
                .arg("::")
                .run()?;
        }
        other => bail!("unknown seed format '{other}' (iso or vfat)"),
    }
    Ok(())
}

impl Plugin for CloudInitSeed {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        if c.step.arg().is_empty() {
            c.err("cloud-init-seed", "the path of the seed file is empty");
        }
        match c.step.opt_str("format").unwrap_or("iso") {
            "iso" => c.needs_one_of("format", ISO_TOOLS),
            "vfat" => {
                c.needs("format", "mkfs.fat", "dosfstools");
                c.needs("format", "mcopy", "mtools");
            }
            _ => {}
        }
        let f = c.step.opt_str("format").unwrap_or("iso");
        if f != "iso" && f != "vfat" {
            c.err("format", format!("'{f}' is not a seed format: iso or vfat"));
        }
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let files = seed_files(step)?;
        let format = step.opt_str("format").unwrap_or("iso");
        let dir = b.scratch_dir("cloud-init-seed-")?;
        for (name, text) in &files {
            let p = dir.join(name);
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        }
        let out = b.add_output(
            Path::new(step.arg()),
            crate::output::OutKind::CloudInitSeed,
            Some(format),
        )?;
        let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
        write_seed(format, &dir, &names, &out)?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
    // No teardown: vmdb renames the seed into place when the build succeeds and
    // removes it otherwise (see src/output/mod.rs).
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::testing::specs as testing;

    #[test]
    fn keys_and_defaults() {
        let s = testing::step(
            "steps:\n  - cloud-init-seed: seed.iso\n    user-data: |\n      #cloud-config\n",
        );
        let files = seed_files(&s).unwrap();
        assert_eq!(files[0], ("user-data", "#cloud-config\n".to_string()));
        assert_eq!(files[1].0, "meta-data");
        assert!(
            files[1].1.starts_with("instance-id: vmdb-"),
            "{}",
            files[1].1
        );
        assert_eq!(files.len(), 2);
        assert_eq!(
            testing::errors("steps:\n  - cloud-init-seed: s\n    user-data: x\n    format: udf\n"),
            ["'udf' is not a seed format: iso or vfat"]
        );
        assert_eq!(
            testing::errors("steps:\n  - cloud-init-seed: s\n"),
            ["missing required key: expected a string"]
        );
    }

    #[test]
    fn vfat_seed_is_labelled_and_holds_the_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("user-data"), "#cloud-config\n").unwrap();
        std::fs::write(d.path().join("meta-data"), "instance-id: x\n").unwrap();
        let out = d.path().join("seed.img");
        write_seed("vfat", d.path(), &["user-data", "meta-data"], &out).unwrap();
        let label = Cmd::new("mlabel")
            .args(["-s", "-i"])
            .arg(&out)
            .arg("::")
            .run()
            .unwrap();
        assert!(label.contains("cidata"), "{label}");
        let md = Cmd::new("mtype")
            .arg("-i")
            .arg(&out)
            .arg("::meta-data")
            .run()
            .unwrap();
        assert_eq!(md, "instance-id: x\n");
    }
}
