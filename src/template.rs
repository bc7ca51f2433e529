//! minijinja rendering of spec strings. Unlike vmdb2, an undefined variable is an error.

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
}
