//! minijinja rendering of spec strings. Unlike vmdb2, an undefined variable is an error.
//!
//! A variable's value is text from the command line (a CI system's branch name, a
//! user's input): in a shell script it must go through the `quote` filter, which makes
//! it one shell word, or quotes in it end the script's quoting and the rest runs as
//! commands. `unquoted` finds the expressions of a script that do not.

use std::collections::BTreeMap;

use minijinja::{Environment, UndefinedBehavior};

pub struct Renderer {
    env: Environment<'static>,
    vars: BTreeMap<String, String>,
}

impl Renderer {
    pub fn new(vars: BTreeMap<String, String>) -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Spec values are not HTML.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_keep_trailing_newline(true);
        env.add_filter("quote", |v: minijinja::Value| shell_quote(&v.to_string()));
        Renderer { env, vars }
    }

    pub fn vars(&self) -> &BTreeMap<String, String> {
        &self.vars
    }

    /// Render one string; the error says what is wrong in words a spec author knows.
    pub fn render(&self, text: &str) -> Result<String, String> {
        if !text.contains("{{") && !text.contains("{%") && !text.contains("{#") {
            return Ok(text.to_string());
        }
        let tmpl = self
            .env
            .template_from_str(text)
            .map_err(|e| format!("bad template: {}", detail(&e)))?;
        match tmpl.render(&self.vars) {
            Ok(out) => Ok(out),
            Err(e) if e.kind() == minijinja::ErrorKind::UndefinedError => {
                // Name the variables a spec author forgot (filters like `default` make
                // some undeclared names fine, so this is only worked out on failure).
                let candidates: Vec<String> = tmpl
                    .undeclared_variables(false)
                    .into_iter()
                    .filter(|v| !self.vars.contains_key(v))
                    .collect();
                // Only those whose absence breaks the template: a name used with a
                // `default` filter is fine missing.
                let mut missing: Vec<String> = candidates
                    .iter()
                    .filter(|m| {
                        let mut vars = self.vars.clone();
                        for other in candidates.iter().filter(|o| o != m) {
                            vars.insert(other.clone(), String::new());
                        }
                        tmpl.render(&vars).is_err()
                    })
                    .cloned()
                    .collect();
                if missing.is_empty() {
                    return Err(format!("template error: {}", detail(&e)));
                }
                missing.sort();
                let names = missing
                    .iter()
                    .map(|m| format!("'{m}'"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let hint = missing
                    .iter()
                    .map(|m| format!("--variable {m}=VALUE"))
                    .collect::<Vec<_>>()
                    .join(" ");
                Err(format!(
                    "undefined template variable {names} (set it with {hint})"
                ))
            }
            Err(e) => Err(format!("template error: {}", detail(&e))),
        }
    }
}

/// `s` as one POSIX shell word: in single quotes, each `'` written as `'\''`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The name of the filter that makes a value one shell word.
pub const QUOTE_FILTER: &str = "quote";

/// The expressions of `{{ ... }}` in `text` whose last filter is not `quote`, with
/// where each starts in `text`: in a shell script, their values would be parsed by
/// the shell.
pub fn unquoted(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let at = text.len() - rest.len() + start;
        let inner = &rest[start + 2..];
        let Some(end) = closing_braces(inner) else {
            break;
        };
        // `{{-` and `-}}` (and `+`) only control whitespace.
        let expr = inner[..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        let quoted = expr
            .strip_suffix(QUOTE_FILTER)
            .is_some_and(|before| before.trim_end().ends_with('|'));
        if !quoted {
            found.push((at, expr.to_string()));
        }
        rest = &inner[end + 2..];
    }
    found
}

/// Where the `}}` that closes an expression is, skipping string literals.
fn closing_braces(s: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match quote {
            Some(_) if escaped => escaped = false,
            Some(_) if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if s[i..].starts_with("}}") => return Some(i),
            None => {}
        }
    }
    None
}

fn detail(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(d) => format!("{} ({d})", e.kind()),
        None => e.kind().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Renderer {
        let mut v = BTreeMap::new();
        v.insert("output".to_string(), "/tmp/x.img".to_string());
        v.insert("suite".to_string(), "bookworm".to_string());
        Renderer::new(v)
    }

    #[test]
    fn renders_variables() {
        assert_eq!(r().render("{{ output }}").unwrap(), "/tmp/x.img");
        assert_eq!(
            r().render("debian-{{ suite }}.img").unwrap(),
            "debian-bookworm.img"
        );
        assert_eq!(r().render("no template").unwrap(), "no template");
    }

    #[test]
    fn undefined_variable_is_an_error_naming_it() {
        let e = r().render("{{ mirror }}").unwrap_err();
        assert_eq!(
            e,
            "undefined template variable 'mirror' (set it with --variable mirror=VALUE)"
        );
    }

    #[test]
    fn does_not_html_escape_and_keeps_newline() {
        assert_eq!(r().render("a<{{ suite }}>&\n").unwrap(), "a<bookworm>&\n");
    }

    #[test]
    fn names_only_the_variables_without_a_default() {
        let e = r().render("{{ a }} {{ b | default('x') }}").unwrap_err();
        assert_eq!(
            e,
            "undefined template variable 'a' (set it with --variable a=VALUE)"
        );
    }

    #[test]
    fn default_filter_allows_a_missing_variable() {
        assert_eq!(
            r().render("{{ arch | default('amd64') }}").unwrap(),
            "amd64"
        );
    }

    #[test]
    fn syntax_error_is_reported() {
        assert!(
            r().render("{{ suite ")
                .unwrap_err()
                .starts_with("bad template")
        );
    }

    #[test]
    fn quote_makes_one_shell_word() {
        let mut v = BTreeMap::new();
        v.insert(
            "h".to_string(),
            r#"x"; touch /tmp/INJECTED; echo "'y"#.to_string(),
        );
        let r = Renderer::new(v);
        assert_eq!(
            r.render("echo {{ h | quote }}").unwrap(),
            r#"echo 'x"; touch /tmp/INJECTED; echo "'\''y'"#
        );
        assert_eq!(r.render("{{ 'a b' | quote }}").unwrap(), "'a b'");
        assert_eq!(r.render("{{ '' | quote }}").unwrap(), "''");
        assert_eq!(r.render("{{ 42 | quote }}").unwrap(), "'42'");
    }

    #[test]
    fn finds_expressions_without_quote() {
        let exprs = |t: &str| unquoted(t).into_iter().map(|(_, e)| e).collect::<Vec<_>>();
        assert_eq!(
            unquoted("echo \"{{ hostname }}\" > /etc/hostname"),
            [(6, "hostname".to_string())]
        );
        assert_eq!(
            exprs("a {{ x|quote }} {{- y | default('z') | quote -}} {{ u | unquote }}"),
            ["u | unquote"]
        );
        assert_eq!(
            exprs("{{ a | default('}}') }} {{ b | quote }}"),
            ["a | default('}}')"]
        );
        assert!(unquoted("{% if a %}echo hi{% endif %} ${HOME}").is_empty());
    }
}
