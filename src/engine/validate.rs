//! Validation: type every step (after rendering) against its plugin's StepSpec, then
//! check each in order against the plan, reporting every mistake at once with its
//! file:line:col; nothing on disk is touched.

use std::collections::BTreeMap;

use crate::engine::plan::{HostNeed, Plan};
use crate::engine::spec::{Diag, Loc, Node, SpecDir, Value};
use crate::engine::step::{COMMON_KEYS, Check, Kind, Param, Plugin, Step, Val, find};
use crate::engine::template::Renderer;

/// Type-check every step (after rendering), then check each in order against the plan.
/// Returns the typed steps, or every problem found.
pub fn validate(
    raw: &[Node],
    renderer: &Renderer,
    plugins: &[&'static dyn Plugin],
    plan: &mut Plan,
) -> Result<Vec<Step>, Vec<Diag>> {
    let mut diags = Vec::new();
    let mut steps = Vec::new();
    for (i, node) in raw.iter().enumerate() {
        if let Some(step) = type_step(i + 1, node, renderer, plugins, &mut diags, plan) {
            steps.push(step);
        }
    }
    // Every step whose type and required keys are known is checked, even one with
    // another bad key, so that what it defines (a tag, a partition table) does not
    // cause false errors later on.
    for step in &steps {
        check_inputs(step, &plan.spec_dir, &mut diags);
        let plugin = find(plugins, step.kind).expect("typed steps have a plugin");
        let complete = plugin
            .spec()
            .keys
            .iter()
            .all(|k| !k.required || step.params.contains_key(k.name));
        if !complete {
            plan.unchecked.insert(step.kind);
            continue;
        }
        let mut c = Check::new(step, plan, &mut diags);
        plugin.check(&mut c);
    }
    if diags.is_empty() {
        Ok(steps)
    } else {
        diags.sort_by_key(|d| (d.loc.line, d.loc.col));
        Err(diags)
    }
}

/// Steps an error about a missing program names besides the first (a spec can have
/// thousands of steps that need the same one).
const OTHER_STEPS_LISTED: usize = 5;

/// The problems of `needs` on this host: one per missing program (or set of
/// alternatives), at the first step that needs it. `found` says whether a program (or
/// an absolute path) is there.
pub fn missing_on_host(needs: &[HostNeed], found: impl Fn(&str) -> bool) -> Vec<Diag> {
    // The alternatives once each, in the order steps need them, with their steps.
    let mut seen: BTreeMap<&[(&str, &str)], usize> = BTreeMap::new();
    let mut groups: Vec<(&HostNeed, Vec<usize>)> = Vec::new();
    for n in needs {
        match seen.get(n.any_of.as_slice()) {
            Some(&g) => groups[g].1.push(n.step),
            None => {
                seen.insert(&n.any_of, groups.len());
                groups.push((n, Vec::new()));
            }
        }
    }
    // One problem per step, key and package: "pvcreate, vgcreate and vgchange not
    // found (install lvm2)".
    let mut missing: Vec<(&HostNeed, Vec<usize>, Vec<&str>)> = Vec::new();
    for (first, others) in groups {
        if first.any_of.iter().any(|(p, _)| found(p)) {
            continue;
        }
        let mut others: Vec<usize> = others.into_iter().filter(|s| *s != first.step).collect();
        others.dedup();
        let programs: Vec<&str> = first.any_of.iter().map(|(p, _)| *p).collect();
        match missing.last_mut() {
            Some((prev, prev_others, prev_programs))
                if prev.step == first.step
                    && prev.key == first.key
                    && prev.any_of.len() == 1
                    && first.any_of.len() == 1
                    && prev.any_of[0].1 == first.any_of[0].1
                    && *prev_others == others =>
            {
                prev_programs.extend(programs);
            }
            _ => missing.push((first, others, programs)),
        }
    }
    missing
        .into_iter()
        .map(|(first, others, programs)| {
            let mut packages: Vec<&str> = first.any_of.iter().map(|(_, pkg)| *pkg).collect();
            packages.dedup();
            let mut msg = if first.any_of.len() > 1 {
                format!("none of {} found", programs.join(", "))
            } else {
                format!("{} not found", and_list(&programs))
            };
            msg.push_str(&format!(" (install {})", packages.join(" or ")));
            let it = if programs.len() > 1 && first.any_of.len() == 1 {
                "them"
            } else {
                "it"
            };
            if let [one] = others.as_slice() {
                msg.push_str(&format!("; step {one} needs {it} too"));
            } else if !others.is_empty() {
                let listed: Vec<String> = others
                    .iter()
                    .take(OTHER_STEPS_LISTED)
                    .map(|s| s.to_string())
                    .collect();
                let more = match others.len().checked_sub(OTHER_STEPS_LISTED) {
                    Some(n) if n > 0 => format!(" and {n} more"),
                    _ => String::new(),
                };
                msg.push_str(&format!(
                    "; steps {}{more} need {it} too",
                    listed.join(", ")
                ));
            }
            Diag {
                loc: first.loc,
                step: Some((first.step, first.kind.to_string())),
                key: Some(first.key.clone()),
                msg,
            }
        })
        .collect()
}

/// "a", "a and b", "a, b and c".
fn and_list(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Every path in the step's `inputs` must be there to be hashed.
fn check_inputs(step: &Step, spec_dir: &SpecDir, diags: &mut Vec<Diag>) {
    for input in step.inputs() {
        let problem = if input.trim().is_empty() {
            "an empty path: name a file or directory".to_string()
        } else {
            match std::fs::metadata(spec_dir.path(&input)) {
                Ok(_) => continue,
                Err(e) => {
                    format!("cannot read '{input}' (relative to the spec file's directory): {e}")
                }
            }
        };
        diags.push(Diag {
            loc: step.loc_of("inputs"),
            step: Some((step.index, step.kind.to_string())),
            key: Some("inputs".to_string()),
            msg: problem,
        });
    }
}

fn type_step(
    index: usize,
    node: &Node,
    renderer: &Renderer,
    plugins: &[&'static dyn Plugin],
    diags: &mut Vec<Diag>,
    plan: &mut Plan,
) -> Option<Step> {
    let Value::Map(entries) = &node.value else {
        diags.push(Diag {
            loc: node.loc,
            step: Some((index, "?".into())),
            key: None,
            msg: format!(
                "a step must be a mapping such as 'mkfs: ext4', found {}",
                node.kind_name()
            ),
        });
        return None;
    };
    let keys: Vec<&str> = entries.iter().filter_map(|(k, _)| k.as_str()).collect();
    // The first plugin in registry order whose name is a key wins (chroot before shell).
    let Some(plugin) = plugins
        .iter()
        .copied()
        .find(|p| keys.contains(&p.spec().name))
    else {
        let names: Vec<&str> = plugins.iter().map(|p| p.spec().name).collect();
        let first = keys.first().copied().unwrap_or("");
        let hint = did_you_mean(first, names.iter().copied())
            .map(|s| format!("; did you mean '{s}'?"))
            .unwrap_or_default();
        diags.push(Diag {
            loc: node.loc,
            step: Some((index, "?".into())),
            key: None,
            msg: format!(
                "unknown step type: none of its keys ({}) names a step type{hint}",
                keys.join(", ")
            ),
        });
        return None;
    };
    let spec = plugin.spec();
    for (k, v) in entries {
        if let (Some(name), Value::Scalar { text, .. }) = (k.as_str(), &v.value) {
            if plugin.shell_keys().contains(&name) {
                warn_unquoted(index, spec.name, name, v.loc, text, &mut plan.warnings);
            }
        }
    }
    let mut err = |loc: Loc, key: Option<&str>, msg: String| {
        diags.push(Diag {
            loc,
            step: Some((index, spec.name.to_string())),
            key: key.map(str::to_string),
            msg,
        });
    };

    let mut value = None;
    let mut params: BTreeMap<&'static str, Param> = BTreeMap::new();
    let mut seen_as: BTreeMap<&'static str, String> = BTreeMap::new();
    // Keys named by a did-you-mean: their misspelling is the one error to report.
    let mut suggested: Vec<&str> = Vec::new();
    let all_keys = || spec.keys.iter().chain(COMMON_KEYS);
    for (k, v) in entries {
        let Some(name) = k.as_str() else {
            err(k.loc, None, "a key must be a string".into());
            continue;
        };
        if name == spec.name {
            match convert(v, spec.value, renderer) {
                Ok(val) => value = Some(Param { val, loc: v.loc }),
                Err(msg) => {
                    err(v.loc, Some(name), msg);
                }
            }
            continue;
        }
        let Some(key) = all_keys().find(|key| key.name == name || key.aliases.contains(&name))
        else {
            let candidates = all_keys()
                .flat_map(|key| std::iter::once(key.name).chain(key.aliases.iter().copied()));
            let near = did_you_mean(name, candidates);
            if let Some(n) = near {
                suggested.push(n);
            }
            let hint = near
                .map(|s| format!("; did you mean '{s}'?"))
                .unwrap_or_else(|| {
                    let mut names: Vec<&str> = spec.keys.iter().map(|k| k.name).collect();
                    names.extend(COMMON_KEYS.iter().map(|k| k.name));
                    format!(" (known keys: {})", names.join(", "))
                });
            err(
                k.loc,
                Some(name),
                format!("unknown key for step type '{}'{hint}", spec.name),
            );
            continue;
        };
        if let Some(first) = seen_as.get(key.name) {
            err(
                k.loc,
                Some(name),
                format!("given twice (also as '{first}'); these keys mean the same"),
            );
            continue;
        }
        // Seen, even if its value is bad: one error per key, not also "missing".
        seen_as.insert(key.name, name.to_string());
        match convert(v, key.kind, renderer) {
            Ok(val) => {
                params.insert(key.name, Param { val, loc: v.loc });
            }
            Err(msg) => {
                err(v.loc, Some(name), msg);
            }
        }
    }
    for key in spec.keys {
        if params.contains_key(key.name)
            || seen_as.contains_key(key.name)
            || suggested
                .iter()
                .any(|s| *s == key.name || key.aliases.contains(s))
        {
            continue;
        }
        if key.required {
            let aka = if key.aliases.is_empty() {
                String::new()
            } else {
                format!(" (or {})", key.aliases.join(", "))
            };
            err(
                node.loc,
                Some(key.name),
                format!(
                    "missing required key{aka}: expected {}",
                    key.kind.expected()
                ),
            );
        } else if let Some(d) = key.default {
            let n = Node {
                value: Value::Scalar {
                    text: d.to_string(),
                    plain: true,
                },
                loc: node.loc,
            };
            if let Ok(val) = convert(&n, key.kind, renderer) {
                params.insert(key.name, Param { val, loc: node.loc });
            }
        }
    }
    let unless = match params.remove("unless") {
        Some(Param {
            val: Val::List(l), ..
        }) => l,
        _ => Vec::new(),
    };
    Some(Step {
        index,
        kind: spec.name,
        loc: node.loc,
        value: value?,
        params,
        unless,
    })
}

/// Warn about each template expression in shell text that is not `| quote`d.
fn warn_unquoted(
    index: usize,
    kind: &str,
    key: &str,
    loc: Loc,
    text: &str,
    warnings: &mut Vec<Diag>,
) {
    for (at, expr) in crate::engine::template::unquoted(text) {
        // Exact for a literal block (`|`), the usual way to write a script, and for
        // one line; within the right text otherwise (folded lines are joined).
        let before = &text[..at];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let loc = Loc {
            line: loc.line + before.matches('\n').count(),
            col: loc.col + before[line_start..].chars().count(),
        };
        warnings.push(Diag {
            loc,
            step: Some((index, kind.to_string())),
            key: Some(key.to_string()),
            msg: format!(
                "warning: {{{{ {expr} }}}} goes into the shell script unquoted: a value with \
                 quotes or ';' would run commands; write {{{{ {expr} | {} }}}} (one shell \
                 word: put no quotes around it)",
                crate::engine::template::QUOTE_FILTER
            ),
        });
    }
}

fn render_scalar(n: &Node, renderer: &Renderer) -> Result<String, String> {
    match &n.value {
        Value::Scalar { text, .. } => renderer.render(text),
        _ => Err(format!("expected a string, found {}", n.kind_name())),
    }
}

/// Render and convert one value to the kind the key wants.
fn convert(n: &Node, kind: Kind, renderer: &Renderer) -> Result<Val, String> {
    let wrong = |what: &str| format!("expected {}, found {what}", kind.expected());
    match kind {
        Kind::Str => match &n.value {
            Value::Scalar { .. } if n.is_null() => Err(wrong("nothing")),
            Value::Scalar { .. } => render_scalar(n, renderer).map(Val::Str),
            _ => Err(wrong(n.kind_name())),
        },
        Kind::Bool => {
            let s = render_scalar(n, renderer).map_err(|_| wrong(n.kind_name()))?;
            match s.as_str() {
                "true" | "True" | "yes" | "Yes" | "on" => Ok(Val::Bool(true)),
                "false" | "False" | "no" | "No" | "off" => Ok(Val::Bool(false)),
                _ => Err(wrong(&format!("'{s}'"))),
            }
        }
        Kind::Int => {
            let s = render_scalar(n, renderer).map_err(|_| wrong(n.kind_name()))?;
            s.trim()
                .parse::<i64>()
                .map(Val::Int)
                .map_err(|_| wrong(&format!("'{s}'")))
        }
        Kind::Mode => {
            let s = render_scalar(n, renderer).map_err(|_| wrong(n.kind_name()))?;
            let digits = s.trim().trim_start_matches("0o");
            u32::from_str_radix(digits, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .map(|m| Val::Int(m as i64))
                .ok_or_else(|| wrong(&format!("'{s}'")))
        }
        Kind::List => match &n.value {
            Value::Seq(items) => items
                .iter()
                .map(|i| match &i.value {
                    Value::Scalar { .. } if !i.is_null() => render_scalar(i, renderer),
                    _ => Err(format!(
                        "expected a list of strings, found {} in the list",
                        i.kind_name()
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Val::List),
            Value::Scalar { .. } if n.is_null() => Ok(Val::List(Vec::new())),
            Value::Scalar { .. } => render_scalar(n, renderer).map(|s| Val::List(vec![s])),
            Value::Map(_) => Err(wrong("a mapping")),
        },
        Kind::Map => match &n.value {
            Value::Map(entries) => {
                let mut m = BTreeMap::new();
                for (k, v) in entries {
                    let k = k.as_str().ok_or_else(|| wrong("a non-string key"))?;
                    m.insert(k.to_string(), render_scalar(v, renderer)?);
                }
                Ok(Val::Map(m))
            }
            _ => Err(wrong(n.kind_name())),
        },
    }
}

/// The closest known name, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        let keys = ["partition", "label", "options"];
        assert_eq!(
            did_you_mean("partiton", keys.iter().copied()),
            Some("partition")
        );
        assert_eq!(did_you_mean("zzz", keys.iter().copied()), None);
    }

    #[test]
    fn modes_are_octal() {
        let r = Renderer::new(Default::default());
        let n = crate::engine::spec::parse_yaml("0644").unwrap();
        assert_eq!(convert(&n, Kind::Mode, &r), Ok(Val::Int(0o644)));
        let n = crate::engine::spec::parse_yaml("0999").unwrap();
        assert!(convert(&n, Kind::Mode, &r).is_err());
    }

    #[test]
    fn lists_accept_a_single_string() {
        let r = Renderer::new(Default::default());
        let n = crate::engine::spec::parse_yaml("flag").unwrap();
        assert_eq!(
            convert(&n, Kind::List, &r),
            Ok(Val::List(vec!["flag".into()]))
        );
    }

    fn need(step: usize, any_of: &[(&'static str, &'static str)]) -> HostNeed {
        HostNeed {
            step,
            kind: "mkfs",
            key: "mkfs".into(),
            loc: Loc {
                line: step * 2,
                col: 9,
            },
            any_of: any_of.to_vec(),
        }
    }

    #[test]
    fn each_missing_program_once_at_its_first_step() {
        let mut needs: Vec<HostNeed> = (3..12)
            .map(|s| need(s, &[("mkfs.xfs", "xfsprogs")]))
            .collect();
        needs.push(need(4, &[("mkfs.ext4", "e2fsprogs")]));
        needs.push(need(
            5,
            &[("xorriso", "xorriso"), ("genisoimage", "genisoimage")],
        ));
        needs.push(need(6, &[("blkid", "util-linux")]));
        needs.push(need(7, &[("blkid", "util-linux")]));
        let found = |p: &str| p == "mkfs.ext4" || p == "genisoimage";
        let d: Vec<String> = missing_on_host(&needs, found)
            .iter()
            .map(|d| d.render("s.vmdb"))
            .collect();
        assert_eq!(
            d,
            [
                "s.vmdb:6:9: step 3 (mkfs): key 'mkfs': mkfs.xfs not found (install xfsprogs); steps 4, 5, 6, 7, 8 and 3 more need it too",
                "s.vmdb:12:9: step 6 (mkfs): key 'mkfs': blkid not found (install util-linux); step 7 needs it too",
            ]
        );
        let d = missing_on_host(&needs[9..11], |_| false);
        assert_eq!(
            d[1].msg,
            "none of xorriso, genisoimage found (install xorriso or genisoimage)"
        );
        // Programs of one package that one step needs: one problem.
        let lvm = |p| HostNeed {
            kind: "vgcreate",
            key: "vgcreate".into(),
            ..need(6, &[(p, "lvm2")])
        };
        let needs = [lvm("pvcreate"), lvm("vgcreate"), lvm("vgchange")];
        let d = missing_on_host(&needs, |_| false);
        assert_eq!(d.len(), 1);
        assert_eq!(
            d[0].msg,
            "pvcreate, vgcreate and vgchange not found (install lvm2)"
        );
    }

    #[test]
    fn unquoted_variables_in_shell_text_are_warned_about() {
        let raw = crate::engine::spec::load(
            "steps:\n  - chroot: /\n    shell: |\n      true\n      echo \"{{ h }}\" {{ h | quote }}\n  - echo: \"{{ h }}\"\n",
        )
        .unwrap();
        let mut vars = BTreeMap::new();
        vars.insert("h".to_string(), "x".to_string());
        let mut plan = crate::plugins::testing::plan_with_root();
        validate(
            &raw.steps,
            &Renderer::new(vars),
            crate::plugins::ALL,
            &mut plan,
        )
        .unwrap();
        let w: Vec<String> = plan.warnings.iter().map(|d| d.render("s.vmdb")).collect();
        assert_eq!(
            w,
            [
                "s.vmdb:5:13: step 1 (chroot): key 'shell': warning: {{ h }} goes into the shell script unquoted: a value with quotes or ';' would run commands; write {{ h | quote }} (one shell word: put no quotes around it)"
            ]
        );
    }
}
