//! Load, render and validate a spec, with every problem found at once, before
//! anything on disk is touched. The front prints what this returns.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::engine::build::Options;
use crate::engine::plan::Plan;
use crate::engine::spec::{self, Diag, SpecDir};
use crate::engine::step::{Plugin, Step};
use crate::engine::template::Renderer;
use crate::engine::validate;

/// A loaded, rendered and validated spec.
pub struct Prepared {
    pub name: String,
    /// The spec's text (its checksum goes into the manifest).
    pub text: String,
    pub steps: Vec<Step>,
    pub opts: Options,
    /// Problems that do not stop the build (shown before it starts).
    pub warnings: Vec<Diag>,
}

/// Why a spec cannot be built.
#[derive(Debug)]
pub enum Refused {
    /// The spec could not be read: what went wrong.
    Unreadable(String),
    /// The spec's problems, in the order of their lines, with its warnings.
    Invalid {
        name: String,
        warnings: Vec<Diag>,
        problems: Vec<Diag>,
    },
}

/// A spec's name (its path, or `<stdin>`) and text.
pub struct Source {
    pub name: String,
    pub text: String,
}

/// Read the spec at `spec_path` ('-': standard input).
pub fn read(spec_path: &Path) -> Result<Source, Refused> {
    if spec_path == Path::new("-") {
        let mut text = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut text) {
            return Err(Refused::Unreadable(format!(
                "reading the spec from standard input: {e}"
            )));
        }
        return Ok(Source {
            name: "<stdin>".to_string(),
            text,
        });
    }
    match std::fs::read_to_string(spec_path) {
        Ok(text) => Ok(Source {
            name: spec_path.display().to_string(),
            text,
        }),
        Err(e) => Err(Refused::Unreadable(format!(
            "cannot read spec {}: {e}",
            spec_path.display()
        ))),
    }
}

/// Load, render (with `vars`) and validate the spec at `spec_path` ('-': standard
/// input) against `plugins`; `rootfs_tarball` is the build's --rootfs-tarball.
pub fn prepare(
    spec_path: &Path,
    vars: BTreeMap<String, String>,
    rootfs_tarball: Option<&Path>,
    plugins: &[&'static dyn Plugin],
) -> Result<Prepared, Refused> {
    let source = read(spec_path)?;
    prepare_source(spec_path, &source, vars, rootfs_tarball, plugins)
}

/// `prepare` for a spec read already (a build may render it twice).
pub fn prepare_source(
    spec_path: &Path,
    source: &Source,
    vars: BTreeMap<String, String>,
    rootfs_tarball: Option<&Path>,
    plugins: &[&'static dyn Plugin],
) -> Result<Prepared, Refused> {
    let (name, text) = (source.name.clone(), source.text.clone());
    let spec_dir = SpecDir::of(spec_path);
    let invalid = |warnings: Vec<Diag>, problems: Vec<Diag>| Refused::Invalid {
        name: name.clone(),
        warnings,
        problems,
    };
    let raw = spec::load(&text).map_err(|d| invalid(Vec::new(), d))?;
    let renderer = Renderer::new(vars.clone());
    let mut plan = Plan::for_this_host();
    plan.spec_dir = spec_dir.clone();
    plan.rootfs_tarball = rootfs_tarball.map(Path::to_path_buf);
    let validated = validate::validate(&raw.steps, &renderer, plugins, &mut plan);
    let mut warnings = std::mem::take(&mut plan.warnings);
    warnings.sort_by_key(|d| (d.loc.line, d.loc.col));
    // What the host lacks is reported with the spec's own mistakes, all at once.
    let missing = validate::missing_on_host(&plan.host_needs, crate::host::cmd::host_has);
    let steps = match validated {
        Ok(steps) if missing.is_empty() => steps,
        Ok(_) => return Err(invalid(warnings, missing)),
        Err(mut diags) => {
            diags.extend(missing);
            diags.sort_by_key(|d| (d.loc.line, d.loc.col));
            return Err(invalid(warnings, diags));
        }
    };
    Ok(Prepared {
        name: name.clone(),
        text,
        steps,
        opts: Options {
            spec_dir,
            rootfs_tarball: rootfs_tarball.map(absolute),
            vars,
            spec_name: name,
            cache_dir: None,
            refresh: false,
            out: Default::default(),
            vmdb2_names: !plan.uses_device_mapper,
        },
        warnings,
    })
}

/// A path made absolute against the current directory.
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
