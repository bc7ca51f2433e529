//! The command line (vmdb2-compatible for builds).

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "vmdb",
    version,
    about = "Build disk images from a YAML spec of steps",
    long_about = "Build disk images from a YAML spec: a list of steps (make an image, partition it, \
                  make filesystems, install Debian, install a boot loader, ...). \
                  Reads vmdb2 spec files. Must run as root.",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub build: BuildArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check a spec without building anything: load, render, validate, print the plan
    Validate(ValidateArgs),
    /// Boot an image in qemu, log in on the serial console, run a command, power off
    Boot(crate::boot::BootArgs),
    /// List or prune the step cache
    ///
    /// The cache directory holds the step cache (steps/: the image tree after expensive
    /// steps, KEY.tar.zst with its record KEY.json) and the package cache (debs/: the
    /// .deb files builds downloaded, each with the archive's SHA-256 in the extended
    /// attribute user.vmdb.sha256). Builds may share it, at the same time too: every file
    /// is written under a unique temporary name starting with a dot, locked while it is
    /// written, and renamed into place when complete. Entries and packages are checked
    /// against their checksums before use; a damaged one is removed, and the steps run or
    /// the package is downloaded again. A build whose cache filesystem is full warns and
    /// goes on without caching. Temporaries left by builds that were killed are counted by
    /// `vmdb cache list` and removed by `vmdb cache prune` once no build holds them locked
    /// and they are more than a minute old.
    Cache(CacheArgs),
}

#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub action: CacheAction,
    /// The cache directory
    #[arg(long, value_name = "DIR", env = "VMDB_CACHE_DIR", default_value = DEFAULT_CACHE_DIR, global = true)]
    pub cache_dir: PathBuf,
}

#[derive(Subcommand, Debug, Clone)]
pub enum CacheAction {
    /// List the saved image trees, oldest first, the package cache's size, and the
    /// unfinished files: saves in progress and the leftovers of interrupted ones
    List,
    /// Remove saved image trees: older than --older-than, then the oldest until the rest
    /// fit in --max-size; and the leftovers of interrupted saves (temporaries that no build
    /// holds locked, more than a minute old)
    Prune {
        /// Keep at most this much (e.g. 20G)
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_size: Option<u64>,
        /// Remove entries older than this (e.g. 30d, 12h, 90m)
        #[arg(long, value_name = "AGE", value_parser = parse_age)]
        older_than: Option<u64>,
        /// Also empty the package download cache
        #[arg(long)]
        packages: bool,
    },
}

/// The command line of vmdb run as `vmdb2` (a link named so): vmdb2's options, and
/// its behaviour (see `app::main_vmdb2`).
#[derive(Parser, Debug)]
#[command(
    name = "vmdb2",
    version = concat!(env!("CARGO_PKG_VERSION"), " (vmdb answering as vmdb2)"),
    about = "Build a disk image from a vmdb2 spec (vmdb, answering to vmdb2's command line)",
    long_about = "Build a disk image from a vmdb2 spec: vmdb, run under the name vmdb2, takes \
                  vmdb2's command line. Progress goes to standard output with --verbose; \
                  errors go to standard error, and a failed build exits with status 1 \
                  (2 for a mistake in the spec or on the command line). No step cache is \
                  kept unless the environment variable VMDB_CACHE_DIR names one. Run as \
                  vmdb for vmdb's own options. Must run as root."
)]
pub struct Vmdb2Cli {
    /// The spec file ('-' reads it from standard input)
    #[arg(value_name = "SPECFILE")]
    pub spec: PathBuf,
    /// Use the existing image file or block device FILE (sets the template variable
    /// 'image'): the steps build into it in place, unless the spec makes it with mkimg
    #[arg(long, value_name = "FILE", conflicts_with = "output")]
    pub image: Option<PathBuf>,
    /// Create the new image FILE (sets the template variable 'output'); it appears
    /// only when the build succeeds
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Rootfs tarball for cache-rootfs / unpack-rootfs (sets the variable rootfs_tarball)
    #[arg(long, value_name = "FILE")]
    pub rootfs_tarball: Option<PathBuf>,
    /// Show progress on standard output
    #[arg(short, long)]
    pub verbose: bool,
    /// Write a log to FILE
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Template variable for the spec (repeatable); quotes around VALUE are removed
    #[arg(long = "variable", value_name = "NAME=VALUE", value_parser = parse_vmdb2_variable)]
    pub variables: Vec<(String, String)>,
}

impl Vmdb2Cli {
    /// The build vmdb does for this command line: vmdb2's options, no step cache unless
    /// `cache_dir` (VMDB_CACHE_DIR) names one, a raw image.
    pub fn build_args(self, cache_dir: Option<PathBuf>) -> BuildArgs {
        BuildArgs {
            spec: Some(self.spec),
            output: self.output,
            image: self.image,
            spec_args: SpecArgs {
                variables: self.variables,
                rootfs_tarball: self.rootfs_tarball,
            },
            verbose: self.verbose,
            log: self.log,
            no_cache: cache_dir.is_none(),
            cache_dir: cache_dir.unwrap_or_default(),
            as_vmdb2: true,
            ..BuildArgs::default()
        }
    }
}

/// Whether vmdb was started under the name `vmdb2` (argv[0], e.g. /usr/bin/vmdb2).
pub fn called_as_vmdb2(argv0: Option<&std::ffi::OsStr>) -> bool {
    argv0
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == "vmdb2")
}

/// vmdb2's `--variable NAME=VALUE`: as vmdb's, and quotes around the value go, as
/// vmdb2 removes them.
fn parse_vmdb2_variable(s: &str) -> Result<(String, String), String> {
    let (k, v) = parse_variable(s)?;
    let v = match v.chars().next() {
        Some(q @ ('\'' | '"')) => v.trim_matches(q).to_string(),
        _ => v,
    };
    Ok((k, v))
}

/// vmdb's exit status when a build (or another command) failed.
pub const EXIT_FAILED: i32 = 1;
/// vmdb's exit status for a mistake in the spec or on the command line: nothing was done.
pub const EXIT_USAGE: i32 = 2;

pub const DEFAULT_CACHE_DIR: &str = "/var/cache/vmdb";

fn parse_size(s: &str) -> Result<u64, String> {
    crate::size::parse(s)
}

/// An age in seconds from "30d", "12h", "90m" or "45s".
fn parse_age(s: &str) -> Result<u64, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| {
        format!("'{s}' is not an age: expected a number and d, h, m or s, like 30d")
    })?;
    let mult = match unit {
        "d" => 86400,
        "h" => 3600,
        "m" => 60,
        "s" | "" => 1,
        _ => {
            return Err(format!(
                "'{s}' is not an age: expected a number and d, h, m or s, like 30d"
            ));
        }
    };
    Ok(n * mult)
}

#[derive(Args, Debug, Clone, Default)]
pub struct SpecArgs {
    /// Template variable for the spec (repeatable); not output, image or rootfs_tarball,
    /// which --output, --image and --rootfs-tarball set
    #[arg(long = "variable", value_name = "NAME=VALUE", value_parser = parse_variable)]
    pub variables: Vec<(String, String)>,
    /// Rootfs tarball for cache-rootfs / unpack-rootfs (sets the variable rootfs_tarball)
    #[arg(long, value_name = "FILE")]
    pub rootfs_tarball: Option<PathBuf>,
}

#[derive(Args, Debug, Clone, Default)]
pub struct BuildArgs {
    /// The spec file ('-' reads it from standard input)
    #[arg(value_name = "SPEC", required = true)]
    pub spec: Option<PathBuf>,
    /// Image to build (sets the template variable 'output')
    #[arg(long, value_name = "IMAGE", conflicts_with = "image")]
    pub output: Option<PathBuf>,
    /// Image to build (sets the template variable 'image' instead of 'output'); as
    /// vmdb2's --image, an existing file or device is built into in place when the spec
    /// makes no image there (no mkimg step of it)
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<PathBuf>,
    #[command(flatten)]
    pub spec_args: SpecArgs,
    /// Print each step as it starts and ends, and the output of the commands it runs
    #[arg(short, long)]
    pub verbose: bool,
    /// Write a debug log to FILE
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Check the spec and print the plan; build nothing
    #[arg(long)]
    pub dry_run: bool,
    /// On failure keep the half-built image (as IMAGE.failed) for debugging
    #[arg(long)]
    pub keep_failed: bool,
    /// Where the step cache and the package download cache live
    #[arg(long, value_name = "DIR", env = "VMDB_CACHE_DIR", default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Use no cache: neither restore nor save image trees, nor share package downloads
    #[arg(long)]
    pub no_cache: bool,
    /// Restore no saved image tree: run every step and save fresh states (the package
    /// cache is still used)
    #[arg(long, conflicts_with = "no_cache")]
    pub refresh: bool,
    /// Build one image per combination of values (repeatable: suite=bookworm,trixie
    /// and arch=amd64,i386 make four); use the names in --output, e.g. '{{ suite }}-{{ arch }}.img'
    #[arg(long, value_name = "NAME=V1,V2", value_parser = parse_axis)]
    pub matrix: Vec<(String, Vec<String>)>,
    /// How many images of a matrix to build at once (default: the number of CPUs)
    #[arg(short, long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Format of the finished image: the steps build a raw image, converted at the end
    #[arg(long, value_enum, default_value_t = crate::output::Format::Raw, value_name = "FORMAT")]
    pub format: crate::output::Format,
    /// Compress: qcow2 clusters, a stream-optimized vmdk, or a gzipped Vagrant box
    #[arg(long)]
    pub compress: bool,
    /// Write FILE.sha256 (sha256sum format) beside every output
    #[arg(long)]
    pub checksums: bool,
    /// Write IMAGE.manifest.json: spec, variables, steps, packages, outputs
    #[arg(long)]
    pub manifest: bool,
    /// Write one JSON event per line to FILE ('-': standard output)
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Run as `vmdb2`: progress as vmdb2 shows it (see `log::as_vmdb2`).
    #[arg(skip)]
    pub as_vmdb2: bool,
}

impl BuildArgs {
    /// --jobs, or the number of CPUs. (Not a clap default: it would be the build
    /// host's count, printed in the help and baked into the man page.)
    pub fn jobs(&self) -> usize {
        self.jobs
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            })
            .max(1)
    }
}

#[derive(Args, Debug, Clone)]
pub struct ValidateArgs {
    /// The spec file ('-' reads it from standard input)
    pub spec: PathBuf,
    /// Output name to render the spec with (default: a placeholder)
    #[arg(long, value_name = "IMAGE", conflicts_with = "image")]
    pub output: Option<PathBuf>,
    /// Render with the variable 'image' instead of 'output'
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<PathBuf>,
    #[command(flatten)]
    pub spec_args: SpecArgs,
}

/// Variables the command line sets from its own options: a `--variable` (or a
/// `--matrix` axis) of the same name would make the spec write somewhere else than
/// where the build puts its output.
const OPTION_VARIABLES: &[(&str, &str)] = &[
    ("output", "--output"),
    ("image", "--image"),
    ("rootfs_tarball", "--rootfs-tarball"),
];

/// Refuse a variable that an option sets.
pub fn not_an_option_variable(name: &str) -> Result<(), String> {
    match OPTION_VARIABLES.iter().find(|(n, _)| *n == name) {
        Some((_, option)) => Err(format!(
            "the variable '{name}' is set by {option}: use {option} instead"
        )),
        None => Ok(()),
    }
}

/// `NAME=V1,V2,...`
pub fn parse_axis(s: &str) -> Result<(String, Vec<String>), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE1,VALUE2, got '{s}'"))?;
    let values: Vec<String> = v
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect();
    if k.is_empty() || values.is_empty() {
        return Err(format!("expected NAME=VALUE1,VALUE2, got '{s}'"));
    }
    not_an_option_variable(k)?;
    Ok((k.to_string(), values))
}

fn parse_variable(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got '{s}'"))?;
    let ok = !k.is_empty()
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !k.starts_with(|c: char| c.is_ascii_digit());
    if !ok {
        return Err(format!(
            "'{k}' is not a variable name (letters, digits and _, not starting with a digit)"
        ));
    }
    not_an_option_variable(k)?;
    Ok((k.to_string(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vmdb").chain(args.iter().copied()))
    }

    #[test]
    fn build_arguments() {
        let c = parse(&[
            "x.vmdb",
            "--output",
            "x.img",
            "--variable",
            "suite=bookworm",
            "-v",
        ])
        .unwrap();
        assert!(c.command.is_none());
        assert_eq!(c.build.spec, Some(PathBuf::from("x.vmdb")));
        assert_eq!(c.build.output, Some(PathBuf::from("x.img")));
        assert_eq!(
            c.build.spec_args.variables,
            vec![("suite".to_string(), "bookworm".to_string())]
        );
        assert!(c.build.verbose);
    }

    #[test]
    fn output_and_image_conflict() {
        assert!(parse(&["x.vmdb", "--output", "a", "--image", "b"]).is_err());
    }

    #[test]
    fn bad_variable_is_refused() {
        let e = parse(&["x.vmdb", "--variable", "nope"]).unwrap_err();
        assert!(e.to_string().contains("expected NAME=VALUE"));
        assert!(parse(&["x.vmdb", "--variable", "1a=b"]).is_err());
    }

    #[test]
    fn variables_set_by_options_are_refused() {
        for (name, option) in [
            ("output", "--output"),
            ("image", "--image"),
            ("rootfs_tarball", "--rootfs-tarball"),
        ] {
            let e = parse(&[
                "x.vmdb",
                "--output",
                "a.img",
                "--variable",
                &format!("{name}=b"),
            ])
            .unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(
                e.to_string().contains(&format!(
                    "the variable '{name}' is set by {option}: use {option} instead"
                )),
                "{e}"
            );
        }
        assert!(parse(&["x.vmdb", "--variable", "outputs=b"]).is_ok());
    }

    #[test]
    fn axis_syntax() {
        assert_eq!(
            parse_axis("a=x, y").unwrap(),
            ("a".to_string(), vec!["x".to_string(), "y".to_string()])
        );
        assert!(parse_axis("a").is_err());
        assert!(parse_axis("a=").is_err());
    }

    #[test]
    fn validate_subcommand() {
        let c = parse(&["validate", "x.vmdb"]).unwrap();
        assert!(matches!(c.command, Some(Command::Validate(_))));
    }

    #[test]
    fn cache_commands() {
        let c = parse(&["cache", "prune", "--max-size", "10G", "--older-than", "30d"]).unwrap();
        let Some(Command::Cache(a)) = c.command else {
            panic!()
        };
        assert!(matches!(
            a.action,
            CacheAction::Prune { max_size: Some(s), older_than: Some(a), packages: false } if s == 10 << 30 && a == 30 * 86400
        ));
        assert!(parse(&["cache", "prune", "--older-than", "soon"]).is_err());
    }

    #[test]
    fn output_options() {
        let c = parse(&[
            "x.vmdb",
            "--output",
            "x.box",
            "--format",
            "vagrant-libvirt",
            "--compress",
            "--checksums",
            "--manifest",
            "--json",
            "-",
        ])
        .unwrap();
        assert_eq!(c.build.format, crate::output::Format::VagrantLibvirt);
        assert!(c.build.compress && c.build.checksums && c.build.manifest);
        assert_eq!(c.build.json, Some(PathBuf::from("-")));
        let c = parse(&["x.vmdb", "--output", "x.img"]).unwrap();
        assert_eq!(c.build.format, crate::output::Format::Raw);
        assert!(parse(&["x.vmdb", "--format", "iso"]).is_err());
    }

    #[test]
    fn refresh_needs_the_cache() {
        let c = parse(&["x.vmdb", "--output", "x.img", "--refresh"]).unwrap();
        assert!(c.build.refresh && !c.build.no_cache);
        let e = parse(&["x.vmdb", "--output", "x.img", "--refresh", "--no-cache"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn jobs_default_to_the_cpus_at_run_time() {
        let c = parse(&["x.vmdb", "--output", "x.img"]).unwrap();
        assert_eq!(c.build.jobs, None);
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(c.build.jobs(), cpus);
        assert_eq!(parse(&["x.vmdb", "-j", "3"]).unwrap().build.jobs(), 3);
        assert_eq!(parse(&["x.vmdb", "-j", "0"]).unwrap().build.jobs(), 1);
        // Nothing of this host in the help, which the man page is made from.
        let mut cmd = <Cli as clap::CommandFactory>::command();
        let help = cmd.render_long_help().to_string();
        assert!(help.contains("(default: the number of CPUs)"), "{help}");
        assert!(!help.contains(&format!("[default: {cpus}]")), "{help}");
    }

    #[test]
    fn the_name_vmdb2_is_told_by_argv0() {
        use std::ffi::OsStr;
        assert!(called_as_vmdb2(Some(OsStr::new("/usr/bin/vmdb2"))));
        assert!(called_as_vmdb2(Some(OsStr::new("vmdb2"))));
        assert!(!called_as_vmdb2(Some(OsStr::new("/usr/bin/vmdb"))));
        assert!(!called_as_vmdb2(Some(OsStr::new("/tmp/vmdb2/vmdb"))));
        assert!(!called_as_vmdb2(Some(OsStr::new("vmdb2.sh"))));
        assert!(!called_as_vmdb2(None));
    }

    #[test]
    fn vmdb2_command_line() {
        let c = Vmdb2Cli::try_parse_from([
            "vmdb2",
            "--verbose",
            "--image=x.raw",
            "--log=x.log",
            "--rootfs-tarball",
            "r.tar.gz",
            "--variable",
            "a='b c'",
            "--variable",
            "d=\"e\"",
            "--variable",
            "f=it's",
            "spec.yaml",
        ])
        .unwrap();
        let b = c.build_args(None);
        assert_eq!(b.spec, Some(PathBuf::from("spec.yaml")));
        assert_eq!(b.image, Some(PathBuf::from("x.raw")));
        assert_eq!(b.output, None);
        assert_eq!(b.log, Some(PathBuf::from("x.log")));
        assert_eq!(b.spec_args.rootfs_tarball, Some(PathBuf::from("r.tar.gz")));
        let v = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            b.spec_args.variables,
            [v("a", "b c"), v("d", "e"), v("f", "it's")]
        );
        assert!(b.verbose && b.as_vmdb2 && b.no_cache);
        assert_eq!(b.format, crate::output::Format::Raw);
        let b = Vmdb2Cli::try_parse_from(["vmdb2", "--output", "o.img", "s"])
            .unwrap()
            .build_args(Some(PathBuf::from("/c")));
        assert!(!b.no_cache && !b.verbose);
        assert_eq!(b.cache_dir, PathBuf::from("/c"));
        let e = Vmdb2Cli::try_parse_from(["vmdb2", "--output", "o", "--variable", "image=x", "s"])
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("the variable 'image' is set by --image: use --image instead"),
            "{e}"
        );
    }

    #[test]
    fn spec_is_required() {
        assert!(parse(&["--output", "x.img"]).is_err());
    }
}
