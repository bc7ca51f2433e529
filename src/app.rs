//! From a parsed command line to an exit status.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::cli::{BuildArgs, Cli, Command, EXIT_FAILED, EXIT_USAGE, SpecArgs};
use crate::engine::prepare::{Prepared, Refused, absolute};
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
            match prepare(&v.spec, var, &out, &out, &v.spec_args) {
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

/// Load, render and validate (see `engine::prepare`), printing the spec's warnings and
/// problems; on failure, the exit status.
///
/// `out` is the path the image is built at; messages show `shown_out` instead (the
/// final name, not the temporary one beside it).
fn prepare(
    spec_path: &Path,
    out_var: &str,
    out: &Path,
    shown_out: &Path,
    args: &SpecArgs,
) -> Result<Prepared, i32> {
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    vars.insert(out_var.to_string(), out.display().to_string());
    if let Some(t) = &args.rootfs_tarball {
        vars.insert("rootfs_tarball".into(), absolute(t).display().to_string());
    }
    for (k, v) in &args.variables {
        vars.insert(k.clone(), v.clone());
    }
    let (built, shown) = (out.display().to_string(), shown_out.display().to_string());
    let print = |name: &str, diags: &[Diag]| {
        for d in diags {
            eprintln!("{}", d.render(name).replace(&built, &shown));
        }
    };
    let rootfs_tarball = args.rootfs_tarball.as_deref();
    match engine::prepare::prepare(spec_path, vars, rootfs_tarball, plugins::REGISTRY.plugins) {
        Ok(p) => {
            print(&p.name, &p.warnings);
            Ok(p)
        }
        Err(Refused::Unreadable(why)) => {
            eprintln!("vmdb: {why}");
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
            eprintln!(
                "vmdb: {name}: {n} problem{} found; nothing was built",
                if n == 1 { "" } else { "s" }
            );
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
    if let Err(e) = crate::log::init(args.verbose, args.log.as_deref()) {
        eprintln!("vmdb: cannot open log file: {e}");
        return EXIT_USAGE;
    }
    if let Some(w) = &name_mismatch {
        crate::log::warn(w);
    }
    if args.compress && !args.format.compressible() {
        eprintln!(
            "vmdb: --compress works with --format qcow2, vmdk, vagrant-libvirt and vagrant-virtualbox, not {}",
            args.format.name()
        );
        return EXIT_USAGE;
    }
    if args.format != Format::Raw && !crate::host::cmd::in_path("qemu-img") {
        eprintln!(
            "vmdb: --format {} needs qemu-img (Debian package qemu-utils)",
            args.format.name()
        );
        return EXIT_USAGE;
    }
    let mut target = match supervisor::Target::new(&out) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vmdb: {e:#}");
            return EXIT_USAGE;
        }
    };
    if target.is_device() && args.format != Format::Raw {
        eprintln!(
            "vmdb: {} is a block device: it can only be written raw (not --format {})",
            out.display(),
            args.format.name()
        );
        return EXIT_USAGE;
    }
    let mut prepared = match prepare(&spec_path, var, target.build_path(), &out, &args.spec_args) {
        Ok(p) => p,
        Err(code) => return code,
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("vmdb: building needs root (loop devices, mounts): run vmdb with sudo");
        return EXIT_FAILED;
    }
    // What killed builds left behind, whatever their spec and output.
    crate::engine::inflight::clean_stale();
    if let Err(e) = target.claim() {
        eprintln!("vmdb: {e:#}");
        return EXIT_USAGE;
    }
    if !args.no_cache {
        prepared.opts.cache_dir = Some(args.cache_dir.clone());
    }
    prepared.opts.refresh = args.refresh;
    if let Some(dest) = &args.json {
        if let Err(e) = crate::log::init_json(dest) {
            eprintln!("vmdb: cannot write JSON events to {}: {e}", dest.display());
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
        device: target.is_device(),
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

fn dry_run(spec: &Path, var: &str, out: &Path, args: &BuildArgs) -> i32 {
    match prepare(spec, var, out, out, &args.spec_args) {
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
