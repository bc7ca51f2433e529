//! What a running build has at hand: the shared state, the options, and the loop
//! devices it attached.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::engine::spec::SpecDir;
use crate::engine::state::State;
use crate::host::blockdev::is_block_device;
use crate::host::blockdev::loopdev::LoopDevice;
use crate::output::OutKind;

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Directory of the spec file: relative paths in steps are relative to it.
    pub spec_dir: SpecDir,
    pub rootfs_tarball: Option<PathBuf>,
    /// The rendered template variables.
    pub vars: BTreeMap<String, String>,
    /// The spec's name as given (for cache entries).
    pub spec_name: String,
    /// Where the step and package caches live; None with --no-cache.
    pub cache_dir: Option<PathBuf>,
    /// `--refresh`: restore no saved state; save fresh ones.
    pub refresh: bool,
    /// The image's format, checksums, manifest (src/output/mod.rs).
    pub out: crate::output::OutputOptions,
    /// Give partitions vmdb2's names too (`/dev/mapper/loopNpM`), in a private
    /// /dev/mapper: only in the build's own mount namespace, and only when no step uses
    /// the host's device-mapper, whose names that would hide.
    pub vmdb2_names: bool,
}

/// Where the partitions' vmdb2 names go (see host/blockdev/mapper.rs).
const MAPPER_DIR: &str = "/dev/mapper";

/// The state of the private /dev/mapper.
#[derive(Debug, Default, PartialEq)]
enum MapperDir {
    #[default]
    NotYet,
    Mounted,
    /// /dev/mapper is not a directory on this host: no names are made.
    Unavailable,
}

pub struct Build {
    pub state: State,
    pub opts: Options,
    /// What the build tells vmdb (the parent) in report.json: outputs, steps, packages.
    pub report: crate::output::Report,
    /// Private scratch space: mount points and temporary files.
    workdir: PathBuf,
    /// Set when the build owns its scratch space (in tests); the supervisor otherwise
    /// makes it, so that it can remove it even when the build is killed.
    _own_workdir: Option<tempfile::TempDir>,
    /// Whole-disk loop devices by backing path, and partition loop devices.
    disk_loops: Vec<(PathBuf, LoopDevice)>,
    part_loops: Vec<LoopDevice>,
    /// Filesystems the build mounted, each with its root directory opened right after
    /// mounting: syncfs on it reports every write-back error since then.
    mounted: Vec<(PathBuf, std::fs::File)>,
    /// Block devices the steps write to, held exclusively until the build ends.
    held: Vec<crate::host::blockdev::busy::Claim>,
    mapper_dir: MapperDir,
    /// The vmdb2 names made, each with the partition device it points at.
    mapper_names: Vec<(PathBuf, PathBuf)>,
}

impl Build {
    /// A build with its own scratch directory, removed when it is dropped.
    pub fn new(opts: Options) -> Result<Build> {
        let tmp = tempfile::Builder::new()
            .prefix("vmdb-")
            .tempdir()
            .context("creating a scratch directory")?;
        let mut b = Build::in_workdir(opts, tmp.path().to_path_buf());
        b._own_workdir = Some(tmp);
        Ok(b)
    }

    /// A build using `workdir` (an existing directory) as its scratch space.
    pub fn in_workdir(opts: Options, workdir: PathBuf) -> Build {
        Build {
            state: State::default(),
            opts,
            report: crate::output::Report::default(),
            workdir,
            _own_workdir: None,
            disk_loops: Vec::new(),
            part_loops: Vec::new(),
            mounted: Vec::new(),
            held: Vec::new(),
            mapper_dir: MapperDir::default(),
            mapper_names: Vec::new(),
        }
    }

    /// Write the report for the parent (after every change to it).
    pub fn save_report(&self) -> Result<()> {
        self.report.save(&self.workdir)
    }

    /// Register an output file that a step is about to write: returns the temporary
    /// name to write it under (see `Report::add_output`).
    pub fn add_output(
        &mut self,
        path: &Path,
        kind: OutKind,
        format: Option<&str>,
    ) -> Result<PathBuf> {
        let pid = self.opts.out.pid();
        self.report
            .add_output(&self.workdir, path, kind, format, pid)
    }

    /// Register an output file that a step is about to write under the temporary name
    /// `partial` (see `Report::add_output_at`).
    pub fn add_output_at(
        &mut self,
        path: &Path,
        partial: &Path,
        kind: OutKind,
        format: Option<&str>,
    ) -> Result<()> {
        self.report
            .add_output_at(&self.workdir, path, partial, kind, format)
    }

    /// Register a temporary file or directory, removed whatever happens.
    pub fn add_temporary(&mut self, p: &Path) -> Result<()> {
        self.report.add_temporary(&self.workdir, p)
    }

    /// The build's scratch directory (owned by the parent; report.json goes there).
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// A fresh directory in the scratch space.
    pub fn scratch_dir(&self, prefix: &str) -> Result<PathBuf> {
        let d = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.workdir)
            .context("creating a scratch directory")?;
        Ok(d.keep())
    }

    /// Before a step writes to `disk`: if it is a block device, check that nothing else
    /// uses it (it may have been mounted since validation) and hold it exclusively for
    /// the rest of the build. Image files need nothing.
    pub fn claim_device(&mut self, disk: &Path) -> Result<()> {
        if is_block_device(disk) {
            if let Some(c) = crate::host::blockdev::busy::claim(disk)? {
                self.held.push(c);
            }
        }
        Ok(())
    }

    /// The block device of a whole disk: itself if it is one, else a loop device.
    pub fn disk_device(&mut self, disk: &Path) -> Result<PathBuf> {
        if is_block_device(disk) {
            self.claim_device(disk)?;
            return Ok(disk.to_path_buf());
        }
        if let Some((_, l)) = self.disk_loops.iter().find(|(p, _)| p == disk) {
            return Ok(l.path().to_path_buf());
        }
        let l = LoopDevice::attach(disk, 0, 0)?;
        let path = l.path().to_path_buf();
        self.disk_loops.push((disk.to_path_buf(), l));
        Ok(path)
    }

    /// The block device of a partition tag, attached at its offset and size on first use.
    pub fn partition_device(&mut self, tag: &str) -> Result<PathBuf> {
        let t = self.state.tag(tag)?;
        if let Some(d) = &t.device {
            return Ok(d.clone());
        }
        let disk = t
            .disk
            .clone()
            .with_context(|| format!("tag '{tag}' is not a partition"))?;
        let (offset, size, number) = (t.offset, t.size, t.number);
        self.claim_device(&disk)?;
        let l = LoopDevice::attach(&disk, offset, size)?;
        let path = l.path().to_path_buf();
        self.part_loops.push(l);
        self.state.tag_mut(tag)?.device = Some(path.clone());
        if let (true, Some(number)) = (self.opts.vmdb2_names, number) {
            self.add_vmdb2_name(&disk, number, &path)?;
        }
        Ok(path)
    }

    /// Make partition `number` of `disk`, attached as `device`, reachable under the
    /// name kpartx would have given it: after the whole disk's loop device (made now
    /// for an image file, so that the name's loop number is a real one).
    fn add_vmdb2_name(&mut self, disk: &Path, number: u32, device: &Path) -> Result<()> {
        use crate::host::blockdev::mapper;
        if self.mapper_dir == MapperDir::NotYet {
            self.mapper_dir = if mapper::make_private(Path::new(MAPPER_DIR))? {
                MapperDir::Mounted
            } else {
                crate::log::verbose(&format!(
                    "  {MAPPER_DIR} is not a directory here: partitions get no vmdb2 names"
                ));
                MapperDir::Unavailable
            };
        }
        if self.mapper_dir != MapperDir::Mounted {
            return Ok(());
        }
        let whole = self.disk_device(disk)?;
        let link = mapper::add(
            Path::new(MAPPER_DIR),
            &mapper::kpartx_name(&whole, number),
            device,
        )?;
        self.mapper_names.push((device.to_path_buf(), link));
        Ok(())
    }

    /// Remove the vmdb2 name of a partition device, as kpartx -d did. Only tidiness:
    /// the private /dev/mapper goes with the build's namespace anyway.
    fn remove_vmdb2_name(&mut self, device: &Path) {
        if let Some(i) = self.mapper_names.iter().position(|(d, _)| d == device) {
            let (_, link) = self.mapper_names.remove(i);
            if let Err(e) = crate::host::blockdev::mapper::remove(&link) {
                crate::log::verbose(&format!("  {e:#}"));
            }
        }
    }

    /// Whether the build is still going well: a failed build's image is thrown away,
    /// so nothing of it needs writing back.
    fn succeeding(&self) -> bool {
        !self.state.failed
    }

    /// Remember a filesystem just mounted at `point`, to check its write-back later.
    pub fn watch_filesystem(&mut self, point: &Path) -> Result<()> {
        let dir = std::fs::File::open(point)
            .with_context(|| format!("opening mount point {}", point.display()))?;
        self.mounted.push((point.to_path_buf(), dir));
        Ok(())
    }

    /// Before unmounting the filesystem at `point`: write back all its data and
    /// metadata, and fail if any write since it was mounted was lost (the kernel only
    /// logs those: a full disk under the image, an I/O error). The directory is closed,
    /// so that it does not keep the filesystem busy.
    pub fn flush_filesystem(&mut self, point: &Path, tag: &str) -> Result<()> {
        let Some(i) = self.mounted.iter().position(|(p, _)| p == point) else {
            return Ok(());
        };
        let (_, dir) = self.mounted.remove(i);
        if !self.succeeding() {
            return Ok(());
        }
        use std::os::fd::AsRawFd;
        nix::unistd::syncfs(dir.as_raw_fd()).with_context(|| {
            format!(
                "the image is incomplete: writing back the filesystem of tag '{tag}' failed \
                 (is the disk holding the image full?)"
            )
        })
    }

    /// Detach the partition devices of the given tags (kpartx's teardown); their
    /// writes are checked unless the build failed already.
    pub fn release_partitions(&mut self, tags: &[String]) -> Result<()> {
        let check = self.succeeding();
        let mut result = Ok(());
        for name in tags {
            if let Ok(t) = self.state.tag_mut(name) {
                if let Some(dev) = t.device.take() {
                    self.remove_vmdb2_name(&dev);
                    if let Some(i) = self.part_loops.iter().position(|l| l.path() == dev) {
                        let l = self.part_loops.remove(i);
                        if !check {
                            l.abandon();
                        } else if let Err(e) = l.close() {
                            if result.is_ok() {
                                result = Err(e);
                            }
                        }
                    }
                }
            }
        }
        result.map_err(write_back_failed)
    }

    /// Let go of every loop device, newest first; they detach once unmounted. Unless
    /// the build failed already, what was written through them is written back and
    /// checked; the errors are returned.
    pub fn release_all_loops(&mut self) -> Vec<anyhow::Error> {
        let check = self.succeeding();
        let mut errors = Vec::new();
        let loops = std::mem::take(&mut self.part_loops)
            .into_iter()
            .rev()
            .chain(
                std::mem::take(&mut self.disk_loops)
                    .into_iter()
                    .rev()
                    .map(|(_, l)| l),
            );
        for l in loops {
            if !check {
                l.abandon();
            } else if let Err(e) = l.close() {
                errors.push(write_back_failed(e));
            }
        }
        errors
    }
}

fn write_back_failed(e: anyhow::Error) -> anyhow::Error {
    e.context(
        "the image is incomplete: a write to it was lost (is the disk holding the image full?)",
    )
}
