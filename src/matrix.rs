//! Many images from one spec: the spec is built once for each combination of the
//! `--matrix NAME=V1,V2` values (suite × arch, say), with `{{ }}` in the output name,
//! up to `--jobs` at a time. Each image is an ordinary vmdb build in its own process,
//! sharing the caches; a failure in one does not stop the others, and the summary says
//! which failed and why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::{BuildArgs, EXIT_FAILED, EXIT_USAGE};
use crate::engine::template::Renderer;
use crate::host::signals;

/// One image of the matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub vars: Vec<(String, String)>,
    pub output: PathBuf,
    pub rootfs_tarball: Option<PathBuf>,
}

impl Cell {
    fn label(&self) -> String {
        self.vars
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Every combination of the matrix values, in the order given (the last varies fastest).
pub fn combinations(matrix: &[(String, Vec<String>)]) -> Vec<Vec<(String, String)>> {
    let mut out: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for (name, values) in matrix {
        out = out
            .into_iter()
            .flat_map(|prefix| {
                values.iter().map(move |v| {
                    let mut c = prefix.clone();
                    c.push((name.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    out
}

/// The cells: output names (and tarball names) rendered for each combination. Two
/// cells may not write the same image.
pub fn cells(args: &BuildArgs, output: &Path) -> Result<Vec<Cell>, String> {
    let mut cells = Vec::new();
    for combo in combinations(&args.matrix) {
        let mut vars: BTreeMap<String, String> = args.spec_args.variables.iter().cloned().collect();
        vars.extend(combo.iter().cloned());
        let r = Renderer::new(vars);
        let render = |p: &Path| {
            r.render(&p.display().to_string())
                .map(PathBuf::from)
                .map_err(|e| format!("{}: {e}", p.display()))
        };
        let cell = Cell {
            output: render(output)?,
            rootfs_tarball: args
                .spec_args
                .rootfs_tarball
                .as_deref()
                .map(render)
                .transpose()?,
            vars: combo,
        };
        if let Some(other) = cells.iter().find(|c: &&Cell| c.output == cell.output) {
            return Err(format!(
                "'{}' and '{}' would both build {}: put the matrix variables in the output name, like --output '{{{{ suite }}}}-{{{{ arch }}}}.img'",
                other.label(),
                cell.label(),
                cell.output.display()
            ));
        }
        cells.push(cell);
    }
    Ok(cells)
}

static CHILDREN: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// SIGINT, SIGTERM, SIGHUP: start nothing more, and stop the running builds (each
/// tears down and removes its image).
fn forward_signals_to_children() {
    let _ = signals::catch(|_| {
        for pid in CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            signals::send(*pid, nix::sys::signal::Signal::SIGTERM);
        }
    });
}

/// The arguments of the vmdb build of one cell.
fn child_args(args: &BuildArgs, spec: &Path, cell: &Cell, image_var: bool) -> Vec<String> {
    let mut v = vec![
        spec.display().to_string(),
        if image_var { "--image" } else { "--output" }.to_string(),
        cell.output.display().to_string(),
    ];
    for (k, val) in args.spec_args.variables.iter().chain(&cell.vars) {
        v.push("--variable".into());
        v.push(format!("{k}={val}"));
    }
    if let Some(t) = &cell.rootfs_tarball {
        v.push("--rootfs-tarball".into());
        v.push(t.display().to_string());
    }
    if args.no_cache {
        v.push("--no-cache".into());
    } else {
        v.push("--cache-dir".into());
        v.push(args.cache_dir.display().to_string());
    }
    if args.refresh {
        v.push("--refresh".into());
    }
    if args.verbose {
        v.push("--verbose".into());
    }
    if args.keep_failed {
        v.push("--keep-failed".into());
    }
    v
}

fn log_path(cell: &Cell) -> PathBuf {
    PathBuf::from(format!("{}.log", cell.output.display()))
}

/// The last error a failed build reported, from its log.
fn why(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rfind(|l| {
            l.starts_with("vmdb: error:") || l.starts_with("vmdb: ") && !l.contains("torn down")
        })
        .map(|l| {
            l.trim_start_matches("vmdb: error: ")
                .trim_start_matches("vmdb: ")
                .to_string()
        })
        .unwrap_or_else(|| format!("see {}", log.display()))
}

pub fn run(args: &BuildArgs, spec: &Path, output: &Path, image_var: bool) -> i32 {
    let cells = match cells(args, output) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmdb: --matrix: {e}");
            return EXIT_USAGE;
        }
    };
    // Every cell's spec is checked before any is built.
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("vmdb"));
    let mut bad = false;
    for c in &cells {
        let mut a = vec!["validate".to_string()];
        a.extend(
            child_args(args, spec, c, image_var)
                .into_iter()
                .filter(|x| x != "--verbose" && x != "--keep-failed" && x != "--no-cache"),
        );
        // validate takes no cache options.
        if let Some(i) = a.iter().position(|x| x == "--cache-dir") {
            a.drain(i..i + 2);
        }
        let out = Command::new(&exe).args(&a).stdin(Stdio::null()).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                eprintln!("vmdb: {} ({}):", c.output.display(), c.label());
                eprint!("{}", String::from_utf8_lossy(&o.stderr));
                bad = true;
            }
            Err(e) => {
                eprintln!("vmdb: running {}: {e}", exe.display());
                return EXIT_FAILED;
            }
        }
    }
    if bad {
        return EXIT_USAGE;
    }
    let jobs = args.jobs();
    eprintln!("vmdb: building {} images, {jobs} at a time", cells.len());
    let started = Instant::now();
    let mut waiting: Vec<&Cell> = cells.iter().collect();
    waiting.reverse();
    let mut running: Vec<(&Cell, Child, Instant)> = Vec::new();
    let mut results: Vec<(&Cell, bool, f64)> = Vec::new();
    forward_signals_to_children();
    while !waiting.is_empty() || !running.is_empty() {
        while running.len() < jobs && !signals::interrupted() {
            let Some(c) = waiting.pop() else { break };
            let log = match std::fs::File::create(log_path(c)) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("vmdb: {}: {e}", log_path(c).display());
                    results.push((c, false, 0.0));
                    continue;
                }
            };
            let child = Command::new(&exe)
                .args(child_args(args, spec, c, image_var))
                .stdin(Stdio::null())
                .stdout(log.try_clone().map(Stdio::from).unwrap_or(Stdio::null()))
                .stderr(Stdio::from(log))
                .spawn();
            match child {
                Ok(ch) => {
                    CHILDREN
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(ch.id());
                    eprintln!("vmdb: started {} ({})", c.output.display(), c.label());
                    running.push((c, ch, Instant::now()));
                }
                Err(e) => {
                    eprintln!("vmdb: starting the build of {}: {e}", c.output.display());
                    results.push((c, false, 0.0));
                }
            }
        }
        if signals::interrupted() {
            waiting.clear();
        }
        let mut i = 0;
        while i < running.len() {
            if let Ok(Some(status)) = running[i].1.try_wait() {
                let (c, _, t) = running.remove(i);
                let secs = t.elapsed().as_secs_f64();
                let ok = status.success();
                if ok {
                    eprintln!("vmdb: built {} in {secs:.1}s", c.output.display());
                } else {
                    eprintln!(
                        "vmdb: FAILED {} after {secs:.1}s: {}",
                        c.output.display(),
                        why(&log_path(c))
                    );
                }
                results.push((c, ok, secs));
            } else {
                i += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let failed: Vec<_> = results.iter().filter(|r| !r.1).collect();
    eprintln!(
        "vmdb: matrix done in {:.1}s: {} built, {} failed",
        started.elapsed().as_secs_f64(),
        results.len() - failed.len(),
        failed.len()
    );
    for (c, _, _) in &failed {
        eprintln!(
            "  FAILED {} ({}): {} (log: {})",
            c.output.display(),
            c.label(),
            why(&log_path(c)),
            log_path(c).display()
        );
    }
    if failed.is_empty() && results.len() == cells.len() {
        0
    } else {
        EXIT_FAILED
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::parse_axis;

    fn args(matrix: &[&str]) -> BuildArgs {
        BuildArgs {
            matrix: matrix.iter().map(|m| parse_axis(m).unwrap()).collect(),
            jobs: Some(2),
            ..BuildArgs::default()
        }
    }

    #[test]
    fn every_combination_with_its_own_output() {
        let a = args(&["suite=bookworm,trixie", "arch=amd64,i386"]);
        let c = cells(&a, Path::new("out/{{ suite }}-{{ arch }}.img")).unwrap();
        let outs: Vec<String> = c.iter().map(|c| c.output.display().to_string()).collect();
        assert_eq!(
            outs,
            [
                "out/bookworm-amd64.img",
                "out/bookworm-i386.img",
                "out/trixie-amd64.img",
                "out/trixie-i386.img"
            ]
        );
        assert_eq!(c[3].label(), "suite=trixie arch=i386");
    }

    #[test]
    fn outputs_must_differ() {
        let a = args(&["suite=bookworm,trixie"]);
        let e = cells(&a, Path::new("debian.img")).unwrap_err();
        assert!(
            e.starts_with("'suite=bookworm' and 'suite=trixie' would both build debian.img"),
            "{e}"
        );
    }

    #[test]
    fn child_command_line() {
        let mut a = args(&["suite=bookworm"]);
        a.cache_dir = PathBuf::from("/var/cache/vmdb");
        a.spec_args.variables = vec![("hostname".into(), "ci".into())];
        let c = &cells(&a, Path::new("{{ suite }}.img")).unwrap()[0];
        assert_eq!(
            child_args(&a, Path::new("s.vmdb"), c, false),
            [
                "s.vmdb",
                "--output",
                "bookworm.img",
                "--variable",
                "hostname=ci",
                "--variable",
                "suite=bookworm",
                "--cache-dir",
                "/var/cache/vmdb"
            ]
        );
    }
}
