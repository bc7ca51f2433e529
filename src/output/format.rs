//! The format of the finished image, and the conversion from the raw image the steps
//! wrote: qemu-img for qcow2, vmdk and vdi; a tar of the disk and its metadata for a
//! Vagrant box.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::qemu_img_convert;
use super::{OutFile, OutKind, OutputOptions, Report, sync_file, temp_name};
use crate::host::cmd::Cmd;
use crate::log;

/// The format of the finished image (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// The raw disk image the steps wrote
    #[default]
    Raw,
    /// QEMU copy-on-write (compressed clusters with --compress)
    Qcow2,
    /// VMware disk (stream-optimized, compressed, with --compress)
    Vmdk,
    /// VirtualBox disk
    Vdi,
    /// A Vagrant box for the libvirt provider (box.img in qcow2)
    VagrantLibvirt,
    /// A Vagrant box for the VirtualBox provider (vmdk and box.ovf)
    VagrantVirtualbox,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::VagrantLibvirt => "vagrant-libvirt",
            Format::VagrantVirtualbox => "vagrant-virtualbox",
        }
    }

    /// Whether `--compress` means something for this format.
    pub fn compressible(self) -> bool {
        !matches!(self, Format::Raw | Format::Vdi)
    }

    /// What a file of this format is, in a sentence.
    fn noun(self) -> &'static str {
        match self {
            Format::Raw => "a raw image",
            Format::Qcow2 => "a qcow2 image",
            Format::Vmdk => "a VMDK image",
            Format::Vdi => "a VDI image",
            Format::VagrantLibvirt | Format::VagrantVirtualbox => "a Vagrant box",
        }
    }

    /// The usual extension of its files.
    fn extension(self) -> &'static str {
        match self {
            Format::Raw => "img",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::VagrantLibvirt | Format::VagrantVirtualbox => "box",
        }
    }
}

/// A warning when the output's name says another format than `format` writes
/// (`--format qcow2 --output x.img`, or `--output x.qcow2` without --format), by its
/// extension; None when they agree or the name says nothing (no extension, or one
/// that names no image format).
pub fn format_name_mismatch(format: Format, output: &Path) -> Option<String> {
    let ext = output.extension()?.to_str()?.to_ascii_lowercase();
    let named: &[Format] = match ext.as_str() {
        "img" | "raw" => &[Format::Raw],
        "qcow2" | "qcow" => &[Format::Qcow2],
        "vmdk" => &[Format::Vmdk],
        "vdi" => &[Format::Vdi],
        "box" => &[Format::VagrantLibvirt, Format::VagrantVirtualbox],
        _ => return None,
    };
    if named.contains(&format) {
        return None;
    }
    let formats: Vec<String> = named
        .iter()
        .map(|f| format!("--format {}", f.name()))
        .collect();
    Some(format!(
        "{} will hold {} (--format {}), but its name says {}: name it {}, or give {}",
        output.display(),
        format.noun(),
        format.name(),
        named[0].noun(),
        output.with_extension(format.extension()).display(),
        formats.join(" or ")
    ))
}

/// The image in its final format, under a temporary name registered for its final one.
pub(super) fn convert(
    report: &mut Report,
    dir: &Path,
    o: &OutputOptions,
    final_path: &Path,
    pid: u32,
) -> Result<()> {
    let raw = o.build_path.clone();
    if o.format == Format::Raw {
        report.files.insert(
            0,
            OutFile {
                partial: raw,
                path: Some(final_path.to_path_buf()),
                kind: OutKind::Image,
                format: Some("raw".into()),
                size: None,
                sha256: None,
            },
        );
        return report.save(dir);
    }
    let out = temp_name(final_path, "converting", pid);
    report.files.insert(
        0,
        OutFile {
            partial: out.clone(),
            path: Some(final_path.to_path_buf()),
            kind: if matches!(o.format, Format::VagrantLibvirt | Format::VagrantVirtualbox) {
                OutKind::VagrantBox
            } else {
                OutKind::Image
            },
            format: Some(o.format.name().into()),
            size: None,
            sha256: None,
        },
    );
    report.add_temporary(dir, &raw)?;
    let virtual_size = sync_file(&raw)?;
    match o.format {
        Format::Raw => {}
        Format::Qcow2 | Format::Vmdk | Format::Vdi => {
            log::info(&format!(
                "vmdb: converting the image to {}{}",
                o.format.name(),
                if o.compress { " (compressed)" } else { "" }
            ));
            qemu_img_convert(&raw, &out, o.format.name(), o.compress)?;
        }
        Format::VagrantLibvirt | Format::VagrantVirtualbox => {
            log::info(&format!("vmdb: making a {} box", o.format.name()));
            let box_dir = temp_name(final_path, "box", pid);
            report.add_temporary(dir, &box_dir)?;
            std::fs::create_dir(&box_dir)
                .with_context(|| format!("creating {}", box_dir.display()))?;
            let name = final_path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let files = if o.format == Format::VagrantLibvirt {
                super::vagrant_box::libvirt(&raw, &box_dir, virtual_size)?
            } else {
                super::vagrant_box::virtualbox(&raw, &box_dir, virtual_size, &name)?
            };
            let mut tar = Cmd::new("tar")
                .arg("--create")
                .arg("--file")
                .arg(&out)
                .arg("--directory")
                .arg(&box_dir)
                .args(["--owner=0", "--group=0", "--numeric-owner"]);
            if o.compress {
                tar = tar.arg("--gzip");
            }
            tar.args(&files).run()?;
            std::fs::remove_dir_all(&box_dir)
                .with_context(|| format!("removing {}", box_dir.display()))?;
        }
    }
    // The raw image is no longer needed: free its space now.
    std::fs::remove_file(&raw).with_context(|| format!("removing {}", raw.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_name_that_says_another_format_is_warned_about() {
        let w = |f, o: &str| format_name_mismatch(f, Path::new(o));
        assert_eq!(
            w(Format::Qcow2, "out/x.img").as_deref(),
            Some(
                "out/x.img will hold a qcow2 image (--format qcow2), but its name says a raw \
                 image: name it out/x.qcow2, or give --format raw"
            )
        );
        assert_eq!(
            w(Format::Raw, "x.QCOW2").as_deref(),
            Some(
                "x.QCOW2 will hold a raw image (--format raw), but its name says a qcow2 \
                 image: name it x.img, or give --format qcow2"
            )
        );
        assert_eq!(
            w(Format::Vdi, "x.box").as_deref(),
            Some(
                "x.box will hold a VDI image (--format vdi), but its name says a Vagrant box: \
                 name it x.vdi, or give --format vagrant-libvirt or --format vagrant-virtualbox"
            )
        );
        for (f, o) in [
            (Format::Raw, "x.img"),
            (Format::Raw, "x.raw"),
            (Format::Raw, "/dev/sdb"),
            (Format::Raw, "disk"),
            (Format::Qcow2, "x.qcow2"),
            (Format::Qcow2, "x.disk"),
            (Format::Vmdk, "x.vmdk"),
            (Format::Vdi, "x.vdi"),
            (Format::VagrantLibvirt, "x.box"),
            (Format::VagrantVirtualbox, "x.box"),
            (Format::Qcow2, "{{ suite }}.qcow2"),
        ] {
            assert_eq!(w(f, o), None, "{o}");
        }
    }
}
