//! From a parsed command line to an exit status.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::cli::{BuildArgs, Cli, Command, EXIT_FAILED, EXIT_USAGE, SpecArgs, Vmdb2Cli};
use crate::engine::prepare::{Prepared, Refused, Source, absolute};
use crate::engine::spec::Diag;
use crate::engine::{self, supervisor};
use crate::event::{Event, Status, round3};
use crate::output::{Format, OutputOptions};
use crate::plugins;

pub fn main(cli: Cli) -> i32 {
    match cli.command {
        Some(Command::Validate(v)) => {
            let (var, out) = output_var(v.output.as_deref(), v.image.as_deref())
                .unwrap_or(("output", PathBuf::from("OUTPUT.img")));
            let source = match read_spec(&v.spec) {
                Ok(s) => s,
                Err(code) => return code,
            };
            match prepare(&v.spec, &source, var, &out, &out, &v.spec_args) {
                Ok(p) => {
                    print_plan(&p);
                    println!("{}: OK, {}", p.name, steps(p.steps.len()));
                    0
                }
                Err(code) => code,
            }
        }
        Some(Command::Boot(b)) => match crate::boot::boot(&b, false) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("vmdb boot: {e:#}");
                EXIT_FAILED
            }
        },
        Some(Command::Cache(c)) => match crate::cachecmd::run(&c) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("vmdb cache: {e:#}");
                EXIT_FAILED
            }
        },
        None => build(cli.build),
    }
}

/// vmdb run as `vmdb2`: a build with vmdb2's command line.
pub fn main_vmdb2(cli: Vmdb2Cli) -> i32 {
    if cli.image.is_none() && cli.output.is_none() {
        eprintln!("vmdb2: say where to build the image with --image FILE or --output FILE");
        return EXIT_USAGE;
    }
    let cache_dir = std::env::var_os("VMDB_CACHE_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    build(cli.build_args(cache_dir))
}

fn output_var<'a>(
    output: Option<&'a Path>,
    image: Option<&'a Path>,
) -> Option<(&'static str, PathBuf)> {
    match (output, image) {
        (Some(o), _) => Some(("output", o.to_path_buf())),
        (None, Some(i)) => Some(("image", i.to_path_buf())),
        _ => None,
    }
}

/// The template variables: the image's, --rootfs-tarball's and the --variable ones.
fn spec_vars(out_var: &str, out: &Path, args: &SpecArgs) -> BTreeMap<String, String> {
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    vars.insert(out_var.to_string(), out.display().to_string());
    if let Some(t) = &args.rootfs_tarball {
        vars.insert("rootfs_tarball".into(), absolute(t).display().to_string());
    }
    for (k, v) in &args.variables {
        vars.insert(k.clone(), v.clone());
    }
    vars
}

/// `prepare` without printing anything; None if the spec is refused.
fn prepare_quietly(
    spec_path: &Path,
    source: &Source,
    out: &Path,
    args: &SpecArgs,
) -> Option<Prepared> {
    engine::prepare::prepare_source(
        spec_path,
        source,
        spec_vars("image", out, args),
        args.rootfs_tarball.as_deref(),
        plugins::REGISTRY.plugins,
    )
    .ok()
}

/// A line on standard error, and in the --log file.
fn say(msg: &str) {
    eprintln!("{msg}");
    crate::log::debug(msg);
}

/// Read the spec (see `engine::prepare::read`); on failure, say why and return the exit
/// status.
fn read_spec(spec_path: &Path) -> Result<Source, i32> {
    engine::prepare::read(spec_path).map_err(|e| {
        if let Refused::Unreadable(why) = e {
            say(&format!("vmdb: {why}"));
        }
        EXIT_USAGE
    })
}

/// Render and validate the spec read from `spec_path` (see `engine::prepare`), printing
/// its warnings and problems; on failure, the exit status.
///
/// `out` is the path the image is built at; messages show `shown_out` instead (the
/// final name, not the temporary one beside it).
fn prepare(
    spec_path: &Path,
    source: &Source,
    out_var: &str,
    out: &Path,
    shown_out: &Path,
    args: &SpecArgs,
) -> Result<Prepared, i32> {
    let vars = spec_vars(out_var, out, args);
    let (built, shown) = (out.display().to_string(), shown_out.display().to_string());
    let print = |name: &str, diags: &[Diag]| {
        for d in diags {
            say(&d.render(name).replace(&built, &shown));
        }
    };
    let rootfs_tarball = args.rootfs_tarball.as_deref();
    match engine::prepare::prepare_source(
        spec_path,
        source,
        vars,
        rootfs_tarball,
        plugins::REGISTRY.plugins,
    ) {
        Ok(p) => {
            print(&p.name, &p.warnings);
            Ok(p)
        }
        Err(Refused::Unreadable(why)) => {
            say(&format!("vmdb: {why}"));
            Err(EXIT_USAGE)
        }
        Err(Refused::Invalid {
            name,
            warnings,
            problems,
        }) => {
            print(&name, &warnings);
            print(&name, &problems);
            let n = problems.len();
            say(&format!(
                "vmdb: {name}: {n} problem{} found; nothing was built",
                if n == 1 { "" } else { "s" }
            ));
            Err(EXIT_USAGE)
        }
    }
}

pub fn print_plan(p: &Prepared) {
    for s in &p.steps {
        let unless = if s.unless.is_empty() {
            String::new()
        } else {
            format!("  (unless {})", s.unless.join(", "))
        };
        println!(
            "{:>3}. line {:<4} {}{unless}",
            s.index,
            s.loc.line,
            s.describe()
        );
    }
}

fn build(args: BuildArgs) -> i32 {
    let spec_path = args.spec.clone().unwrap_or_default();
    let Some((var, out)) = output_var(args.output.as_deref(), args.image.as_deref()) else {
        if args.dry_run {
            return dry_run(&spec_path, "output", Path::new("OUTPUT.img"), &args);
        }
        eprintln!("vmdb: say where to build the image with --output IMAGE (or --image IMAGE)");
        return EXIT_USAGE;
    };
    // The output's name and --format: a warning, the build goes on.
    let name_mismatch = crate::output::format_name_mismatch(args.format, &out);
    if !args.matrix.is_empty() {
        if args.dry_run {
            eprintln!("vmdb: --dry-run checks one image: give its variables with --variable");
            return EXIT_USAGE;
        }
        if let Some(w) = &name_mismatch {
            crate::log::warn(w);
        }
        return crate::matrix::run(&args, &spec_path, &out, var == "image");
    }
    if args.dry_run {
        return dry_run(&spec_path, var, &out, &args);
    }
    if args.as_vmdb2 {
        crate::log::as_vmdb2();
    }
    if let Err(e) = crate::log::init(args.verbose, args.log.as_deref()) {
        eprintln!("vmdb: cannot open log file: {e}");
        return EXIT_USAGE;
    }
    if let Some(w) = &name_mismatch {
        crate::log::warn(w);
    }
    if args.compress && !args.format.compressible() {
        say(&format!(
            "vmdb: --compress works with --format qcow2, vmdk, vagrant-libvirt and vagrant-virtualbox, not {}",
            args.format.name()
        ));
        return EXIT_USAGE;
    }
    if args.format != Format::Raw && !crate::host::cmd::in_path("qemu-img") {
        say(&format!(
            "vmdb: --format {} needs qemu-img (Debian package qemu-utils)",
            args.format.name()
        ));
        return EXIT_USAGE;
    }
    let mut target = match supervisor::Target::new(&out) {
        Ok(t) => t,
        Err(e) => {
            say(&format!("vmdb: {e:#}"));
            return EXIT_USAGE;
        }
    };
    let source = match read_spec(&spec_path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut prepared = if var == "image" && !target.is_device() {
        match prepare_image(&spec_path, &source, &out, &mut target, &args.spec_args) {
            Ok(p) => p,
            Err(code) => return code,
        }
    } else {
        match prepare(
            &spec_path,
            &source,
            var,
            target.build_path(),
            &out,
            &args.spec_args,
        ) {
            Ok(p) => p,
            Err(code) => return code,
        }
    };
    if target.is_in_place() && args.format != Format::Raw {
        let what = if target.is_device() {
            "a block device"
        } else {
            "built in place"
        };
        say(&format!(
            "vmdb: {} is {what}: it can only be written raw (not --format {})",
            out.display(),
            args.format.name()
        ));
        return EXIT_USAGE;
    }
    if !nix::unistd::geteuid().is_root() {
        say("vmdb: building needs root (loop devices, mounts): run vmdb with sudo");
        return EXIT_FAILED;
    }
    // What killed builds left behind, whatever their spec and output.
    crate::engine::inflight::clean_stale();
    if let Err(e) = target.claim() {
        say(&format!("vmdb: {e:#}"));
        return EXIT_USAGE;
    }
    if !args.no_cache {
        prepared.opts.cache_dir = Some(args.cache_dir.clone());
    }
    prepared.opts.refresh = args.refresh;
    if let Some(dest) = &args.json {
        if let Err(e) = crate::log::init_json(dest) {
            say(&format!(
                "vmdb: cannot write JSON events to {}: {e}",
                dest.display()
            ));
            return EXIT_USAGE;
        }
    }
    prepared.opts.out = OutputOptions {
        format: args.format,
        compress: args.compress,
        checksums: args.checksums,
        manifest: args.manifest,
        final_path: Some(target.final_path().to_path_buf()),
        build_path: target.build_path().to_path_buf(),
        in_place: target.is_in_place(),
        owner_pid: std::process::id(),
        spec_name: prepared.name.clone(),
        spec_text: prepared.text.clone(),
    };
    let started = std::time::Instant::now();
    let result = supervisor::run_build(prepared, target, args.keep_failed, &plugins::REGISTRY);
    let (code, outputs) = match result {
        Ok(outputs) => (0, outputs),
        Err(supervisor::Failed) => (EXIT_FAILED, Vec::new()),
    };
    crate::log::event(Event::BuildEnd {
        status: if code == 0 {
            Status::Ok
        } else {
            Status::Failed
        },
        exit_code: code,
        duration: round3(started.elapsed().as_secs_f64()),
        outputs: outputs.iter().map(|p| p.display().to_string()).collect(),
    });
    code
}

/// `--image FILE` as vmdb2 has it: a spec that makes the image (an `mkimg` step of
/// it) gets a new one, built under a temporary name as with --output; a spec that makes
/// none builds into the existing FILE in place. The spec is rendered with the
/// temporary name first to find out which.
fn prepare_image(
    spec_path: &Path,
    source: &Source,
    out: &Path,
    target: &mut supervisor::Target,
    args: &SpecArgs,
) -> Result<Prepared, i32> {
    let Some(p) = prepare_quietly(spec_path, source, target.build_path(), args) else {
        // Refused: say why.
        return prepare(spec_path, source, "image", target.build_path(), out, args);
    };
    let makes_it = p
        .steps
        .iter()
        .any(|s| s.kind == "mkimg" && Path::new(s.arg()) == target.build_path());
    if !makes_it {
        if std::fs::symlink_metadata(out).is_err() {
            say(&format!(
                "vmdb: {} does not exist, and the spec makes no image there (no mkimg step \
                 of it): --image builds into an existing file or device",
                out.display()
            ));
            return Err(EXIT_USAGE);
        }
        *target = match supervisor::Target::existing(out) {
            Ok(t) => t,
            Err(e) => {
                say(&format!("vmdb: {e:#}"));
                return Err(EXIT_USAGE);
            }
        };
    }
    // Rendered again, with the name the build uses, and its warnings shown.
    prepare(spec_path, source, "image", target.build_path(), out, args)
}

fn dry_run(spec: &Path, var: &str, out: &Path, args: &BuildArgs) -> i32 {
    let source = match read_spec(spec) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match prepare(spec, &source, var, out, out, &args.spec_args) {
        Ok(p) => {
            print_plan(&p);
            println!(
                "{}: OK, {} (dry run: nothing built)",
                p.name,
                steps(p.steps.len())
            );
            0
        }
        Err(code) => code,
    }
}

fn steps(n: usize) -> String {
    if n == 1 {
        "1 step".into()
    } else {
        format!("{n} steps")
    }
}
