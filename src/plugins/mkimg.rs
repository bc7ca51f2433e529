//! `mkimg`: create a sparse raw image file of a given size.

use std::fs::OpenOptions;
use std::path::Path;

use anyhow::{Context, Result};

use crate::engine::build::Build;
use crate::engine::plan::PlanDisk;
use crate::engine::step::{CacheRole, Check, Key, Kind, Plugin, Step, StepSpec};
use crate::host::blockdev::is_block_device;
use crate::output::OutKind;
use crate::size;

pub struct Mkimg;

static SPEC: StepSpec = StepSpec {
    name: "mkimg",
    value: Kind::Str,
    value_doc: "path of the image, almost always `\"{{ output }}\"`.",
    keys: &[Key::req(
        "size",
        Kind::Str,
        "the size. `K`, `M`, `G`, `T` and `KiB`, `MiB`, `GiB`, `TiB` are binary \
                (`300M` is 300 MiB, as with qemu-img); `KB`, `MB`, `GB`, `TB` are \
                decimal; a bare number is bytes.",
    )],
    summary: "Creates the image file: a sparse raw file of the given size (it takes no disk \
        space until written).",
    cache: CacheRole::Setup,
    always_saved: false,
};

impl Plugin for Mkimg {
    fn spec(&self) -> &'static StepSpec {
        &SPEC
    }

    fn check(&self, c: &mut Check) {
        let size = match size::parse(c.step.opt_str("size").unwrap_or_default()) {
            Ok(s) => Some(s),
            Err(e) => {
                c.err("size", e);
                None
            }
        };
        let path = c.step.arg().to_string();
        super::check_device(c, "mkimg", &path);
        c.plan.disks.insert(
            c.step.arg().to_string(),
            PlanDisk {
                size,
                ..PlanDisk::default()
            },
        );
    }

    fn run(&self, step: &Step, b: &mut Build) -> Result<()> {
        let path = Path::new(step.arg());
        let size = size::parse(step.str("size")?).map_err(anyhow::Error::msg)?;
        if is_block_device(path) {
            b.claim_device(path)?;
            // Writing to a device: there is nothing to create.
            crate::log::verbose(&format!(
                "  {} is a block device; not creating a file",
                path.display()
            ));
            return Ok(());
        }
        further_disk(path, b)?;
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("creating image {}", path.display()))?;
        f.set_len(size)
            .with_context(|| format!("sizing image {} to {size} bytes", path.display()))?;
        Ok(())
    }
}

/// A further disk named after the image (`{{ output }}.data`: the image's temporary
/// name and a suffix) is an output too: registered before it is made, it gets its final
/// name (the image's and the suffix) with the image when the build succeeds, and is
/// removed otherwise, or by the next vmdb if vmdb is killed. Other paths are made where
/// the spec says.
fn further_disk(path: &Path, b: &mut Build) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let out = &b.opts.out;
    let Some(final_path) = &out.final_path else {
        return Ok(());
    };
    if out.build_path == *final_path || path == out.build_path {
        return Ok(());
    }
    let suffix = path
        .as_os_str()
        .as_bytes()
        .strip_prefix(out.build_path.as_os_str().as_bytes());
    let Some(suffix) = suffix.filter(|s| !s.contains(&b'/')) else {
        return Ok(());
    };
    let mut name = final_path.as_os_str().to_os_string();
    name.push(std::ffi::OsStr::from_bytes(suffix));
    b.add_output_at(Path::new(&name), path, OutKind::Image, Some("raw"))
}

#[cfg(test)]
mod tests {
    use crate::plugins::testing::{check_errors, run_step};

    #[test]
    fn creates_a_sparse_file_of_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        run_step(&format!("mkimg: {}\nsize: 300M", img.display())).unwrap();
        let m = std::fs::metadata(&img).unwrap();
        assert_eq!(m.len(), 300 << 20);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(m.blocks(), 0, "sparse");
    }

    #[test]
    fn bad_size_is_a_validation_error() {
        assert_eq!(
            check_errors("mkimg: x.img\nsize: 4Q"),
            vec![
                "key 'size': '4Q' is not a size: expected a number with an optional unit, like 4G, 512M, 300MiB or 10GB"
            ]
        );
    }
}
