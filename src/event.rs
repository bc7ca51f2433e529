//! The JSON events of `--json` (docs/json-events.md), as one type: what vmdb writes is
//! what the page documents, and a test holds the two together.

use serde::{Deserialize, Serialize};

/// How a step (or its teardown, or the build) went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Failed,
    Interrupted,
    /// All its `unless` flags were set.
    Skipped,
    /// The step cache stood in for it.
    Cached,
}

/// What a step event says about its step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepInfo {
    /// 1-based index in the spec.
    pub step: usize,
    /// How many steps the spec has.
    pub steps: usize,
    #[serde(rename = "type")]
    pub kind: String,
    /// Its line in the spec.
    pub line: usize,
    pub description: String,
}

/// One event. It is written as an object with its name in `event`, the time, and its
/// members (see `log::event`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    BuildStart {
        vmdb_version: String,
        spec: String,
        output: String,
        format: String,
        steps: usize,
    },
    StepStart {
        #[serde(flatten)]
        step: StepInfo,
    },
    StepSkipped {
        #[serde(flatten)]
        step: StepInfo,
        unless: Vec<String>,
    },
    StepCached {
        #[serde(flatten)]
        step: StepInfo,
    },
    Command {
        /// The running step, if any.
        step: Option<usize>,
        command: String,
        argv: Vec<String>,
    },
    StepEnd {
        step: usize,
        steps: usize,
        #[serde(rename = "type")]
        kind: String,
        status: Status,
        duration: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Teardown {
        step: usize,
        #[serde(rename = "type")]
        kind: String,
        status: Status,
        duration: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Warning {
        message: String,
    },
    Error {
        message: String,
    },
    BuildEnd {
        status: Status,
        exit_code: i32,
        duration: f64,
        outputs: Vec<String>,
    },
}

/// Seconds rounded to milliseconds, as events and the manifest give durations.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// One of each event, with every member set.
    fn one_of_each() -> Vec<Event> {
        let info = || StepInfo {
            step: 2,
            steps: 5,
            kind: "mkfs".into(),
            line: 7,
            description: "mkfs: ext4".into(),
        };
        vec![
            Event::BuildStart {
                vmdb_version: "1".into(),
                spec: "s.vmdb".into(),
                output: "/x.img".into(),
                format: "raw".into(),
                steps: 5,
            },
            Event::StepStart { step: info() },
            Event::StepSkipped {
                step: info(),
                unless: vec!["f".into()],
            },
            Event::StepCached { step: info() },
            Event::Command {
                step: Some(2),
                command: "true".into(),
                argv: vec!["true".into()],
            },
            Event::StepEnd {
                step: 2,
                steps: 5,
                kind: "mkfs".into(),
                status: Status::Failed,
                duration: 0.5,
                error: Some("e".into()),
            },
            Event::Teardown {
                step: 2,
                kind: "mkfs".into(),
                status: Status::Failed,
                duration: 0.5,
                error: Some("e".into()),
            },
            Event::Warning {
                message: "w".into(),
            },
            Event::Error {
                message: "e".into(),
            },
            Event::BuildEnd {
                status: Status::Failed,
                exit_code: 1,
                duration: 1.0,
                outputs: vec![],
            },
        ]
    }

    /// The table of docs/json-events.md: each event's name with its members, and the
    /// values it lists for `status`.
    fn documented() -> BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> {
        let page = include_str!("../docs/json-events.md");
        let mut events = BTreeMap::new();
        for row in page.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.trim_matches('|').split(" | ").collect();
            let name = cells[0].trim().trim_matches('`').to_string();
            // Members are separated by commas outside parentheses; each starts with its
            // name in backquotes, values are in the parentheses after it.
            let (mut members, mut statuses) = (BTreeSet::new(), BTreeSet::new());
            let (mut depth, mut part) = (0, String::new());
            for c in cells[2].chars().chain([',']) {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    ',' if depth == 0 => {
                        let words: Vec<&str> = part.split('`').collect();
                        if words.len() > 1 {
                            members.insert(words[1].to_string());
                            if words[1] == "status" {
                                statuses
                                    .extend(words[3..].iter().step_by(2).map(|s| s.to_string()));
                            }
                        }
                        part.clear();
                        continue;
                    }
                    _ => {}
                }
                part.push(c);
            }
            events.insert(name, (members, statuses));
        }
        events
    }

    #[test]
    fn every_event_is_as_documented() {
        let doc = documented();
        let mut seen = BTreeSet::new();
        for e in one_of_each() {
            let v = serde_json::to_value(&e).unwrap();
            let obj = v.as_object().unwrap();
            let name = obj["event"].as_str().unwrap().to_string();
            let (members, _) = doc
                .get(&name)
                .unwrap_or_else(|| panic!("event {name} is not in docs/json-events.md"));
            let ours: BTreeSet<String> = obj.keys().filter(|k| *k != "event").cloned().collect();
            assert_eq!(&ours, members, "the members of {name}");
            seen.insert(name);
        }
        let documented: BTreeSet<String> = doc.keys().cloned().collect();
        assert_eq!(seen, documented, "events documented but never written");
    }

    #[test]
    fn statuses_are_as_documented() {
        let doc = documented();
        let names = |s: &[Status]| -> BTreeSet<String> {
            s.iter()
                .map(|s| {
                    serde_json::to_value(s)
                        .unwrap()
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        let (ok, failed, interrupted) = (Status::Ok, Status::Failed, Status::Interrupted);
        assert_eq!(doc["step-end"].1, names(&[ok, failed, interrupted]));
        assert_eq!(doc["teardown"].1, names(&[ok, failed]));
        assert_eq!(doc["build-end"].1, names(&[ok, failed]));
    }
}
