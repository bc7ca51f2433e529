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
