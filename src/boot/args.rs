//! The command line of `vmdb boot`.

use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct BootArgs {
    /// Disk image to boot (raw or qcow2; detected by extension .qcow2 or via qemu-img info)
    pub image: PathBuf,
    /// Boot with UEFI firmware (OVMF) instead of BIOS
    #[arg(long)]
    pub uefi: bool,
    /// Guest architecture: x86_64, i386 or aarch64 (aarch64 always uses UEFI)
    #[arg(long, default_value = "x86_64")]
    pub arch: String,
    /// Seconds allowed for the whole boot, login, command and power-off
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Command run after login; its exit status must be 0
    #[arg(long, default_value = "cat /etc/os-release")]
    pub run: String,
    /// User to log in as
    #[arg(long, default_value = "root")]
    pub user: String,
    /// Password, sent if a Password: prompt appears (an empty line otherwise)
    #[arg(long)]
    pub password: Option<String>,
    /// Where to write the console log (default: IMAGE.console.log beside the image)
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Guest memory in MiB
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    /// Use KVM instead of TCG emulation
    #[arg(long)]
    pub kvm: bool,
    /// Pass -snapshot so the image is not modified
    #[arg(long)]
    pub snapshot: bool,
    /// Extra disk to attach (e.g. a cloud-init seed); may be repeated
    #[arg(long = "drive")]
    pub extra_drives: Vec<PathBuf>,
}
