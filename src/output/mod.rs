//! What a build hands over: the image in the format asked for (raw, qcow2, vmdk, vdi,
//! a Vagrant box), files that steps make beside it (a cloud-init seed), a `.sha256`
//! file for each, and a manifest.
//!
//! Everything is written under a temporary name beside its final one
//! (`.NAME.vmdb-partial-PID`, PID being vmdb's, the parent's). The build process (the
//! child, in its namespaces) makes the files; it lists each in the report
//! (`report.json` in the scratch directory, see `Report`) BEFORE it creates it, so that
//! the parent knows every temporary file even when the build is killed, and so does
//! the next vmdb when vmdb itself is killed (src/engine/inflight.rs). The parent renames them
//! all into place when the build succeeded, or removes them all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::event::Status;
use crate::host::cmd::Cmd;
use crate::log;

pub mod format;
pub mod manifest;
pub mod vagrant_box;

pub use format::{Format, format_name_mismatch};

/// What the build needs to know to hand over its outputs.
#[derive(Debug, Clone, Default)]
pub struct OutputOptions {
    pub format: Format,
    pub compress: bool,
    /// Write FILE.sha256 beside every output.
    pub checksums: bool,
    /// Write IMAGE.manifest.json.
    pub manifest: bool,
    /// The image's final name (None in unit tests: nothing is handed over).
    pub final_path: Option<PathBuf>,
    /// Where the steps write the raw image (the template variable `output`).
    pub build_path: PathBuf,
    /// The output is written in place: a block device, or an existing file (vmdb2's
    /// `--image`).
    pub in_place: bool,
    /// vmdb's PID (the parent's: the build itself is PID 1 in its namespace), in the
    /// temporary names.
    pub owner_pid: u32,
    /// The spec's name and text, for the manifest.
    pub spec_name: String,
    pub spec_text: String,
}

impl OutputOptions {
    pub fn pid(&self) -> u32 {
        if self.owner_pid == 0 {
            std::process::id()
        } else {
            self.owner_pid
        }
    }
}

/// What a file the build writes is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutKind {
    Image,
    VagrantBox,
    /// Made by a step beside the image.
    CloudInitSeed,
    /// FILE.sha256 beside an output.
    Checksum,
    Manifest,
    /// Removed whatever happens.
    Temporary,
}

impl std::fmt::Display for OutKind {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let name = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
        f.write_str(name.as_str().unwrap_or_default())
    }
}

/// One file the build writes under a temporary name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutFile {
    /// The temporary name it is written under.
    pub partial: PathBuf,
    /// Its final name; None for a temporary file (or directory) that is always removed.
    pub path: Option<PathBuf>,
    pub kind: OutKind,
    pub format: Option<String>,
    /// Filled in when the file is complete.
    pub size: Option<u64>,
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub index: usize,
    #[serde(rename = "type")]
    pub kind: String,
    pub line: usize,
    pub description: String,
    pub status: Status,
    /// Seconds; absent for a skipped step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub unless: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
}

/// What the build process tells vmdb (the parent), through `report.json` in the
/// scratch directory: the files to rename or remove, and what the manifest needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// In the order they are to be renamed into place.
    pub files: Vec<OutFile>,
    pub steps: Vec<StepRecord>,
    /// Installed in the image (None when the image has no dpkg database or it was
    /// not asked for).
    pub packages: Option<Vec<Package>>,
}

pub const REPORT: &str = "report.json";

impl Report {
    /// Read the report the build wrote into `workdir`; an empty one if there is none.
    pub fn load(workdir: &Path) -> Report {
        std::fs::read(workdir.join(REPORT))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Write it into `workdir`, atomically (a killed build leaves the previous one).
    pub fn save(&self, workdir: &Path) -> Result<()> {
        let tmp = workdir.join(format!("{REPORT}.new"));
        let data = serde_json::to_vec(self).context("encoding the build report")?;
        std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, workdir.join(REPORT))
            .with_context(|| format!("writing {}", workdir.join(REPORT).display()))
    }

    /// Outputs that get a final name, other than checksums and the manifest.
    pub fn outputs(&self) -> impl Iterator<Item = &OutFile> {
        self.files.iter().filter(|f| {
            f.path.is_some() && !matches!(f.kind, OutKind::Checksum | OutKind::Manifest)
        })
    }
    /// Register an output file that a step is about to write, and save the report in
    /// `dir`: returns the temporary name to write it under. It gets `path` when the
    /// build succeeds, and is removed otherwise. Relative paths are relative to the
    /// current directory (as --output). `pid` goes into the temporary name.
    pub fn add_output(
        &mut self,
        dir: &Path,
        path: &Path,
        kind: OutKind,
        format: Option<&str>,
        pid: u32,
    ) -> Result<PathBuf> {
        let path =
            std::path::absolute(path).with_context(|| format!("output {}", path.display()))?;
        let partial = temp_name(&path, "partial", pid);
        self.add_output_at(dir, &path, &partial, kind, format)?;
        Ok(partial)
    }

    /// Register an output that a step is about to write under the temporary name
    /// `partial` it chose itself (a second disk named after the image's own temporary
    /// name, `{{ output }}.data`), as `add_output` does.
    pub fn add_output_at(
        &mut self,
        dir: &Path,
        path: &Path,
        partial: &Path,
        kind: OutKind,
        format: Option<&str>,
    ) -> Result<()> {
        let path =
            std::path::absolute(path).with_context(|| format!("output {}", path.display()))?;
        let partial = std::path::absolute(partial)
            .with_context(|| format!("output {}", partial.display()))?;
        if path.file_name().is_none() {
            bail!("output {} has no file name", path.display());
        }
        let parent = path.parent().unwrap_or(Path::new("/"));
        if !parent.is_dir() {
            bail!(
                "cannot write {}: directory {} does not exist",
                path.display(),
                parent.display()
            );
        }
        check_file_output(&path)?;
        if let Some(f) = self.files.iter().find(|f| f.path.as_ref() == Some(&path)) {
            bail!(
                "{} is written twice by this build (already as {})",
                path.display(),
                f.kind
            );
        }
        self.files.push(OutFile {
            partial,
            path: Some(path),
            kind,
            format: format.map(str::to_string),
            size: None,
            sha256: None,
        });
        self.save(dir)
    }

    /// Register a temporary file or directory, removed whatever happens, and save the
    /// report in `dir`.
    pub fn add_temporary(&mut self, dir: &Path, p: &Path) -> Result<()> {
        let p = std::path::absolute(p).with_context(|| format!("temporary {}", p.display()))?;
        self.files.push(OutFile {
            partial: p,
            path: None,
            kind: OutKind::Temporary,
            format: None,
            size: None,
            sha256: None,
        });
        self.save(dir)
    }
}

/// `DIR/.NAME.vmdb-WHAT-PID` for `DIR/NAME`.
pub fn temp_name(path: &Path, what: &str, pid: u32) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    dir.join(format!(".{name}.vmdb-{what}-{pid}"))
}

/// Check that an output may be written at `path`: it is written under a temporary
/// name and renamed over `path`, so whatever is there must be a regular file (or
/// nothing). A symbolic link is refused rather than replaced or followed: the user
/// names the file itself.
pub fn check_file_output(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("output {}", path.display())),
    };
    let t = m.file_type();
    let what = if t.is_file() {
        return Ok(());
    } else if t.is_symlink() {
        let to = std::fs::read_link(path)
            .map(|l| l.display().to_string())
            .unwrap_or_default();
        format!("it is a symbolic link (to {to}): name the file itself")
    } else if t.is_dir() {
        "it is a directory".into()
    } else if t.is_char_device() {
        "it is a character device, not a file or a block device".into()
    } else if t.is_block_device() {
        "it is a block device, not a file".into()
    } else if t.is_fifo() {
        "it is a named pipe (FIFO), not a file".into()
    } else if t.is_socket() {
        "it is a socket, not a file".into()
    } else {
        "it is not a regular file".into()
    };
    bail!("refusing to write to {}: {what}", path.display())
}

/// Remove a file or a directory tree; quietly if it is not there.
pub fn remove_path(p: &Path) {
    let r = match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(_) => return,
    };
    if let Err(e) = r {
        log::info(&format!("vmdb: could not remove {}: {e}", p.display()));
    }
}

/// After the steps and their teardown succeeded, in the build process: convert the
/// image, make the box, the checksums and the manifest, all under temporary names,
/// registered in `report` (saved in `dir`). `vars` are the spec's variables, for the
/// manifest.
pub fn finish(
    report: &mut Report,
    dir: &Path,
    o: &OutputOptions,
    vars: &BTreeMap<String, String>,
    started: std::time::SystemTime,
    duration: f64,
) -> Result<()> {
    let Some(final_path) = o.final_path.clone() else {
        return Ok(());
    };
    let pid = o.pid();
    if o.in_place {
        // What the steps wrote to the device directly (a partition table, a boot
        // loader) as well as through loop devices.
        sync_file(&final_path)?;
        let size = crate::host::blockdev::disk_size(&final_path).ok();
        report.files.insert(
            0,
            OutFile {
                partial: final_path.clone(),
                path: Some(final_path.clone()),
                kind: OutKind::Image,
                format: Some("raw".into()),
                size,
                sha256: None,
            },
        );
        report.save(dir)?;
    } else if o.build_path.exists() {
        format::convert(report, dir, o, &final_path, pid)?;
    }

    let want_sums = o.checksums || o.manifest;
    let n = report.files.len();
    for i in 0..n {
        let f = &report.files[i];
        if f.path.is_none() || o.in_place && f.partial == final_path {
            continue;
        }
        let size = sync_file(&f.partial)?;
        let sha = if want_sums {
            Some(crate::digest::sha256_file(&f.partial)?)
        } else {
            None
        };
        let f = &mut report.files[i];
        f.size = Some(size);
        f.sha256 = sha;
    }
    report.save(dir)?;

    if o.checksums {
        let outs: Vec<OutFile> = report.outputs().cloned().collect();
        for f in outs {
            let (Some(path), Some(sum)) = (f.path.as_ref(), f.sha256.as_ref()) else {
                continue;
            };
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let sum_path = PathBuf::from(format!("{}.sha256", path.display()));
            let partial = report.add_output(dir, &sum_path, OutKind::Checksum, None, pid)?;
            write_file(&partial, format!("{sum}  {name}\n").as_bytes())?;
        }
    }
    if o.manifest {
        let m = manifest::manifest(report, o, vars, started, duration);
        let path = PathBuf::from(format!("{}.manifest.json", final_path.display()));
        let partial = report.add_output(dir, &path, OutKind::Manifest, None, pid)?;
        let mut text = serde_json::to_string_pretty(&m).context("encoding the manifest")?;
        text.push('\n');
        write_file(&partial, text.as_bytes())?;
    }
    Ok(())
}

fn write_file(p: &Path, data: &[u8]) -> Result<()> {
    std::fs::write(p, data).with_context(|| format!("writing {}", p.display()))?;
    sync_file(p).map(drop)
}

/// Write the file at `p` back to its disk and check that nothing of it was lost;
/// returns its size. The kernel reports a lost write (of the loop devices, of a tool)
/// to the next fsync of a descriptor opened before it, or, when none has seen it yet,
/// to a new one.
pub fn sync_file(p: &Path) -> Result<u64> {
    let f = std::fs::File::open(p).with_context(|| format!("output {}", p.display()))?;
    f.sync_all().with_context(|| {
        format!(
            "writing back {} failed: it is incomplete (is its disk full?)",
            p.display()
        )
    })?;
    Ok(f.metadata()
        .with_context(|| format!("output {}", p.display()))?
        .len())
}

/// `qemu-img convert` from raw to `format`; compressed: qcow2 clusters, or a
/// stream-optimized vmdk.
pub fn qemu_img_convert(raw: &Path, out: &Path, format: &str, compress: bool) -> Result<()> {
    let mut c = Cmd::new("qemu-img").args(["convert", "-f", "raw", "-O", format]);
    match format {
        "qcow2" if compress => c = c.arg("-c"),
        "vmdk" if compress => c = c.args(["-o", "subformat=streamOptimized"]),
        _ => {}
    }
    c.arg(raw).arg(out).run()?;
    Ok(())
}

/// Side files that an earlier build left beside this build's outputs and that this
/// build does not write: `FILE.sha256` of each output, and the image's
/// `IMAGE.manifest.json`. Beside the new outputs they would describe files that are
/// gone (`sha256sum -c` fails). Only regular files count; an output written in place
/// (a block device) has none.
pub fn stale_side_files(report: &Report) -> Vec<PathBuf> {
    let written: Vec<&Path> = report
        .files
        .iter()
        .filter_map(|f| f.path.as_deref())
        .collect();
    let mut stale = Vec::new();
    for f in report.outputs() {
        let Some(path) = &f.path else {
            continue;
        };
        if &f.partial == path {
            continue;
        }
        let mut side = vec![PathBuf::from(format!("{}.sha256", path.display()))];
        if matches!(f.kind, OutKind::Image | OutKind::VagrantBox) {
            side.push(PathBuf::from(format!("{}.manifest.json", path.display())));
        }
        for s in side {
            let regular = std::fs::symlink_metadata(&s).is_ok_and(|m| m.file_type().is_file());
            if regular && !written.contains(&s.as_path()) {
                stale.push(s);
            }
        }
    }
    stale
}

/// What `commit` put in place, and the stale side files it removed.
#[derive(Debug, Default, PartialEq)]
pub struct Committed {
    pub done: Vec<PathBuf>,
    pub removed: Vec<PathBuf>,
}

/// In vmdb (the parent) after a successful build: remove the stale side files of an
/// earlier build (`stale_side_files`), rename every output into place, in order, write
/// the directories back (so that the new names survive a crash), then remove the
/// temporary files. All or nothing: if a stale file cannot be removed, nothing is
/// renamed; if a rename or a directory's write-back fails, what was renamed already is
/// removed again. (Stale files go first: a failure after that leaves an older output
/// without its side file, never a side file that does not match.)
pub fn commit(report: &Report) -> Result<Committed> {
    let mut done: Vec<PathBuf> = Vec::new();
    let mut renamed: Vec<PathBuf> = Vec::new();
    let undo = |renamed: &[PathBuf]| {
        for p in renamed {
            remove_path(p);
        }
        discard(report, None);
    };
    let removed = stale_side_files(report);
    for s in &removed {
        if let Err(e) = std::fs::remove_file(s) {
            undo(&[]);
            return Err(e)
                .with_context(|| format!("removing {}, left by an earlier build", s.display()));
        }
    }
    for f in &report.files {
        let Some(path) = &f.path else {
            continue;
        };
        if &f.partial != path {
            if let Err(e) = std::fs::rename(&f.partial, path) {
                undo(&renamed);
                return Err(e).with_context(|| {
                    format!("renaming {} to {}", f.partial.display(), path.display())
                });
            }
            renamed.push(path.clone());
        }
        done.push(path.clone());
    }
    let mut dirs: Vec<&Path> = renamed
        .iter()
        .chain(&removed)
        .filter_map(|p| p.parent())
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        let r = std::fs::File::open(d).and_then(|f| f.sync_all());
        if let Err(e) = r {
            undo(&renamed);
            return Err(e).with_context(|| format!("writing back directory {}", d.display()));
        }
    }
    for f in &report.files {
        if f.path.is_none() {
            remove_path(&f.partial);
        }
    }
    Ok(Committed { done, removed })
}

/// Remove every temporary file of a failed build, but keep `keep` (the half-built
/// image, for --keep-failed).
pub fn discard(report: &Report, keep: Option<&Path>) {
    for f in &report.files {
        if Some(f.partial.as_path()) == keep || f.path.as_ref() == Some(&f.partial) {
            continue;
        }
        remove_path(&f.partial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_carry_the_pid() {
        assert_eq!(
            temp_name(Path::new("/srv/x.qcow2"), "converting", 42),
            PathBuf::from("/srv/.x.qcow2.vmdb-converting-42")
        );
    }

    #[test]
    fn side_files_this_build_does_not_write_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        // An earlier build's outputs with their checksums and manifest, and a file of
        // the user's that only looks like one (a directory).
        for f in ["a", "a.sha256", "a.manifest.json", "s.iso", "s.iso.sha256"] {
            std::fs::write(p(f), "old").unwrap();
        }
        std::fs::create_dir(p("b.sha256")).unwrap();
        // This build: image a with a new checksum but no manifest, seed s.iso without a
        // checksum, and b written in place (as a block device is).
        for f in [".a.new", ".a.sha256.new", ".s.iso.new"] {
            std::fs::write(p(f), "new").unwrap();
        }
        let file = |partial: &str, path: &str, kind: OutKind| OutFile {
            partial: p(partial),
            path: Some(p(path)),
            kind,
            format: None,
            size: None,
            sha256: None,
        };
        let r = Report {
            files: vec![
                file(".a.new", "a", OutKind::Image),
                file(".s.iso.new", "s.iso", OutKind::CloudInitSeed),
                file("b", "b", OutKind::Image),
                file(".a.sha256.new", "a.sha256", OutKind::Checksum),
            ],
            ..Report::default()
        };
        assert_eq!(
            stale_side_files(&r),
            [p("a.manifest.json"), p("s.iso.sha256")]
        );
        let c = commit(&r).unwrap();
        assert_eq!(c.removed, [p("a.manifest.json"), p("s.iso.sha256")]);
        let mut names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "a.sha256", "b.sha256", "s.iso"]);
        assert_eq!(std::fs::read_to_string(p("a.sha256")).unwrap(), "new");
    }

    #[test]
    fn report_round_trip_and_commit_order() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        std::fs::write(p(".a.vmdb-partial-1"), "a").unwrap();
        std::fs::write(p(".a.sha256.vmdb-partial-1"), "s").unwrap();
        std::fs::write(p(".a.vmdb-partial-1.raw"), "r").unwrap();
        let file = |partial: &str, path: Option<&str>, kind: OutKind| OutFile {
            partial: p(partial),
            path: path.map(p),
            kind,
            format: None,
            size: None,
            sha256: None,
        };
        let r = Report {
            files: vec![
                file(".a.vmdb-partial-1", Some("a"), OutKind::Image),
                file(".a.vmdb-partial-1.raw", None, OutKind::Temporary),
                file(
                    ".a.sha256.vmdb-partial-1",
                    Some("a.sha256"),
                    OutKind::Checksum,
                ),
            ],
            ..Report::default()
        };
        r.save(d.path()).unwrap();
        let r = Report::load(d.path());
        assert_eq!(r.outputs().count(), 1);
        assert_eq!(
            commit(&r).unwrap(),
            Committed {
                done: vec![p("a"), p("a.sha256")],
                removed: vec![]
            }
        );
        let mut names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "a.sha256", "report.json"]);
    }

    #[test]
    fn failed_commit_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        std::fs::write(p(".a.vmdb-partial-1"), "a").unwrap();
        let r = Report {
            files: vec![
                OutFile {
                    partial: p(".a.vmdb-partial-1"),
                    path: Some(p("a")),
                    kind: OutKind::Image,
                    format: None,
                    size: None,
                    sha256: None,
                },
                OutFile {
                    partial: p(".b.vmdb-partial-1"),
                    path: Some(p("b")),
                    kind: OutKind::Checksum,
                    format: None,
                    size: None,
                    sha256: None,
                },
            ],
            ..Report::default()
        };
        assert!(commit(&r).is_err());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
