//! The manifest beside the image (docs/manifest.md): the spec, the variables, the
//! steps and how they went, the packages installed, and every output with its checksum.

use std::collections::BTreeMap;

use super::{OutputOptions, Report, StepRecord};
use crate::digest::sha256;
use crate::event::round3;

/// The manifest (docs/manifest.md).
pub(super) fn manifest(
    report: &Report,
    o: &OutputOptions,
    vars: &BTreeMap<String, String>,
    started: std::time::SystemTime,
    duration: f64,
) -> serde_json::Value {
    let built = o.build_path.display().to_string();
    let shown = o
        .final_path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let vars: BTreeMap<&String, String> = vars
        .iter()
        .map(|(k, v)| (k, v.replace(&built, &shown)))
        .collect();
    let outputs: Vec<serde_json::Value> = report
        .outputs()
        .map(|f| {
            let path = f.path.as_ref().expect("outputs have a path");
            serde_json::json!({
                "path": path.display().to_string(),
                "name": path.file_name().unwrap_or_default().to_string_lossy(),
                "kind": f.kind,
                "format": f.format,
                "size": f.size,
                "sha256": f.sha256,
            })
        })
        .collect();
    let steps: Vec<StepRecord> = report
        .steps
        .iter()
        .map(|s| StepRecord {
            description: s.description.replace(&built, &shown),
            ..s.clone()
        })
        .collect();
    let started = started
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    serde_json::json!({
        "manifest_version": 1,
        "vmdb_version": env!("CARGO_PKG_VERSION"),
        "spec": {
            "name": o.spec_name,
            "sha256": sha256(o.spec_text.as_bytes()),
        },
        "variables": vars,
        "format": o.format.name(),
        "compressed": o.compress && o.format.compressible(),
        "started": started,
        "duration": round3(duration),
        "steps": steps,
        "packages": report.packages,
        "outputs": outputs,
    })
}
