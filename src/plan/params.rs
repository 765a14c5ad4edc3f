//! Parameters: declarations, resolution from `-p`, files and the environment,
//! validation, `${NAME}` templates and redaction.

use crate::redact;
use crate::{Error, Result};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// One declared parameter.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub description: String,
    pub required: bool,
    pub default: Option<String>,
    pub pattern: Option<Regex>,
    pub secret: bool,
    /// Whether an unset value may come from the environment variable of the same
    /// name (credentials and endpoints); other parameters never do, so a generic
    /// name such as `KEYSPACES` in the caller's shell cannot change a run.
    pub env: bool,
}

/// Where a parameter's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// `-p KEY=VALUE`
    Cli,
    /// `-p KEY=@FILE`
    File,
    /// The environment variable of the same name.
    Env,
    /// The plan's default.
    Default,
    /// Kept from the run being resumed.
    Stored,
    /// Not given, optional, empty.
    Unset,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cli => "cli",
            Source::File => "file",
            Source::Env => "env",
            Source::Default => "default",
            Source::Stored => "stored",
            Source::Unset => "unset",
        }
    }
}

/// Secrets shorter than this are refused: masking a very short value would mangle
/// unrelated text and reveal the secret by elimination.
pub const MIN_SECRET_LEN: usize = 8;

/// Values read with `-p KEY=@FILE` are at most this long.
pub const MAX_FILE_VALUE: u64 = 64 << 10;

/// A value as it may appear in a message: at most 64 characters.
pub fn shorten(value: &str) -> String {
    const MAX: usize = 64;
    if value.chars().count() <= MAX {
        return value.to_string();
    }
    let head: String = value.chars().take(MAX).collect();
    format!("{head}… ({} bytes)", value.len())
}

/// A value given on the command line: `-p KEY=VALUE` or `-p KEY=@FILE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliParam {
    pub key: String,
    pub value: String,
    /// Taken as given, never read from a file (`@…`): a value that came over the
    /// network is not a path on this machine.
    pub literal: bool,
}

impl std::str::FromStr for CliParam {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok(CliParam {
                key: k.to_string(),
                value: v.to_string(),
                literal: false,
            }),
            _ => Err("expected KEY=VALUE or KEY=@FILE".to_string()),
        }
    }
}

/// Resolved parameter values of one run. Holds secret values in memory only;
/// [`Params::redacted`] is the form that may be printed or persisted.
#[derive(Debug, Clone, Default)]
pub struct Params {
    values: BTreeMap<String, String>,
    secret: BTreeSet<String>,
    sources: BTreeMap<String, Source>,
}

/// Where an unset parameter may come from besides `-p`.
pub trait Env: Sync {
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;
impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

/// A value read from a file (`-p KEY=@FILE`, a store profile's `*_file`): a
/// bounded read (a pipe or `/dev/zero` ends), UTF-8, one trailing newline dropped.
pub fn read_file_value(key: &str, path: &Path) -> Result<String, String> {
    use std::io::Read;
    let shown = path.display();
    let cannot = |e: std::io::Error| format!("{key}: cannot read value from file {shown}: {e}");
    let file = std::fs::File::open(path).map_err(cannot)?;
    if file.metadata().map_err(cannot)?.is_dir() {
        return Err(format!("{key}: the value file {shown} is a directory"));
    }
    // Read at most one byte more than accepted: a size from stat says nothing
    // for a pipe or a device (`@/dev/zero` would never end).
    let mut bytes = Vec::new();
    file.take(MAX_FILE_VALUE + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_FILE_VALUE {
        return Err(format!(
            "{key}: the value file {shown} holds more than {MAX_FILE_VALUE} bytes, the most accepted"
        ));
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("{key}: the value file {shown} is not UTF-8 text"))?;
    // One trailing newline is an artefact of `echo > file`, not part of the value.
    let text = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    Ok(text.to_string())
}

/// A `-p` value: `@FILE` is the file's text, anything else itself.
pub fn read_value(key: &str, raw: &str) -> Result<(String, Source), String> {
    if let Some(path) = raw.strip_prefix('@') {
        Ok((read_file_value(key, Path::new(path))?, Source::File))
    } else {
        Ok((raw.to_string(), Source::Cli))
    }
}

impl Params {
    /// Resolve `cli` values against the declarations. Order of precedence: `-p`, then
    /// the environment variable of the same name, then the declared default.
    /// Unknown and missing names, and values that fail their pattern, are all reported
    /// in one error. Secret values are registered with [`redact`].
    pub fn resolve(specs: &[ParamSpec], cli: &[CliParam], env: &dyn Env) -> Result<Params> {
        Self::resolve_with(specs, cli, &[], env)
    }

    /// [`Params::resolve`] for a resume: `stored` are the run's recorded non-secret
    /// values, used where `cli` gives none.
    pub fn resolve_with(
        specs: &[ParamSpec],
        cli: &[CliParam],
        stored: &[CliParam],
        env: &dyn Env,
    ) -> Result<Params> {
        let mut problems = Vec::new();
        let by_name: BTreeMap<&str, &ParamSpec> =
            specs.iter().map(|s| (s.name.as_str(), s)).collect();
        let mut given: BTreeMap<String, (String, Source)> = BTreeMap::new();
        let mut unknown = Vec::new();
        for p in cli {
            if !by_name.contains_key(p.key.as_str()) {
                unknown.push(p.key.clone());
                continue;
            }
            if given.contains_key(&p.key) {
                problems.push(format!("{} given more than once", p.key));
                continue;
            }
            let read = if p.literal {
                Ok((p.value.clone(), Source::Cli))
            } else {
                read_value(&p.key, &p.value)
            };
            match read {
                Ok(v) => {
                    given.insert(p.key.clone(), v);
                }
                Err(e) => problems.push(e),
            }
        }
        if !unknown.is_empty() {
            let known: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            problems.push(format!(
                "unknown parameter(s): {} (this plan accepts: {})",
                unknown.join(", "),
                known.join(", ")
            ));
        }
        for p in stored {
            if by_name.contains_key(p.key.as_str()) && !given.contains_key(&p.key) {
                given.insert(p.key.clone(), (p.value.clone(), Source::Stored));
            }
        }
        let mut values = BTreeMap::new();
        let mut secret = BTreeSet::new();
        let mut sources = BTreeMap::new();
        let mut missing = Vec::new();
        for spec in specs {
            let value = given
                .remove(&spec.name)
                .or_else(|| {
                    spec.env
                        .then(|| env.var(&spec.name).filter(|v| !v.is_empty()))
                        .flatten()
                        .map(|v| (v, Source::Env))
                })
                .or_else(|| spec.default.clone().map(|d| (d, Source::Default)));
            let Some((value, source)) = value else {
                if spec.required {
                    missing.push(spec.name.clone());
                } else {
                    values.insert(spec.name.clone(), String::new());
                    sources.insert(spec.name.clone(), Source::Unset);
                }
                continue;
            };
            if spec.secret {
                // A value too short to mask is refused, and not registered: masking
                // it would mangle every message that contains its characters.
                if !value.is_empty() && value.trim().chars().count() < MIN_SECRET_LEN {
                    problems.push(format!(
                        "{}: a secret shorter than {MIN_SECRET_LEN} characters is refused (it could not be masked safely in logs)",
                        spec.name
                    ));
                    continue;
                }
                redact::register(&value);
                secret.insert(spec.name.clone());
            }
            sources.insert(spec.name.clone(), source);
            if spec.required && value.is_empty() {
                missing.push(spec.name.clone());
                continue;
            }
            let value = if spec.name == "SNAPSHOT_NAME" {
                match expand_name_template(&value, chrono::Utc::now()) {
                    Ok(v) => v,
                    Err(e) => {
                        problems.push(e);
                        continue;
                    }
                }
            } else {
                value
            };
            if let Some(re) = &spec.pattern
                && !value.is_empty()
                && !re.is_match(&value)
            {
                let must = describe_pattern(re.as_str());
                if spec.secret {
                    problems.push(format!("{}: the value is not valid: {must}", spec.name));
                } else {
                    problems.push(format!(
                        "{}: value {:?} is not valid: {must}",
                        spec.name,
                        shorten(&value),
                    ));
                }
                continue;
            }
            values.insert(spec.name.clone(), value);
        }
        if !missing.is_empty() {
            problems.push(format!(
                "missing required parameter(s): {}",
                missing.join(", ")
            ));
        }
        // A secret repeated in a parameter that is stored and shown as given would
        // be stored and shown.
        for s in &secret {
            let Some(sv) = values.get(s).filter(|v| !v.trim().is_empty()) else {
                continue;
            };
            // Case aside: an age key is the same key in either case.
            let needle = sv.trim().to_lowercase();
            for (k, v) in &values {
                if !secret.contains(k) && v.to_lowercase().contains(&needle) {
                    problems.push(format!(
                        "{k}: holds the value of the secret {s}; a secret is given only in its own parameter"
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(Params {
                values,
                secret,
                sources,
            })
        } else {
            Err(Error::Params(problems))
        }
    }

    pub fn get(&self, key: &str) -> &str {
        self.values.get(key).map(String::as_str).unwrap_or("")
    }

    pub fn is_secret(&self, key: &str) -> bool {
        self.secret.contains(key)
    }

    /// Where each value came from.
    pub fn sources(&self) -> &BTreeMap<String, Source> {
        &self.sources
    }

    /// All values, secrets included: only for hook environments and store options.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.values.iter()
    }

    /// The printable, persistable form: secret values replaced by the mask.
    pub fn redacted(&self) -> RedactedParams {
        RedactedParams(
            self.values
                .iter()
                .map(|(k, v)| {
                    let shown = if self.secret.contains(k) && !v.is_empty() {
                        redact::MASK.to_string()
                    } else {
                        v.clone()
                    };
                    (k.clone(), shown)
                })
                .collect(),
        )
    }

    /// Expand `${NAME}` references in `template`.
    pub fn expand(&self, template: &str) -> String {
        expand(template, |name| self.get(name).to_string())
    }
}

/// Parameters as they may be shown or stored.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RedactedParams(pub BTreeMap<String, String>);

impl RedactedParams {
    /// The values that were not secret, as `-p` values for a resume.
    pub fn non_secret(&self) -> Vec<CliParam> {
        self.0
            .iter()
            .filter(|(_, v)| v.as_str() != redact::MASK)
            .map(|(k, v)| CliParam {
                key: k.clone(),
                value: v.clone(),
                literal: true,
            })
            .collect()
    }
}

/// Expand a snapshot-name template at the start of a run (UTC):
/// `{date}` → `2026-11-21`, `{datetime}` → `20261121T023000Z`,
/// `{timestamp}` → Unix seconds. Other `{…}` are refused.
pub fn expand_name_template(
    value: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> std::result::Result<String, String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            return Err(format!("SNAPSHOT_NAME {value:?}: an unclosed '{{'"));
        };
        match &rest[open + 1..open + close] {
            "date" => out.push_str(&now.format("%Y-%m-%d").to_string()),
            "datetime" => out.push_str(&now.format("%Y%m%dT%H%M%SZ").to_string()),
            "timestamp" => out.push_str(&now.timestamp().to_string()),
            other => {
                return Err(format!(
                    "SNAPSHOT_NAME {value:?}: unknown template {{{other}}} (use {{date}}, {{datetime}} or {{timestamp}})"
                ));
            }
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Names referenced as `${NAME}` in a template.
pub fn references(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                out.push(after[..end].to_string());
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    out
}

fn expand(template: &str, lookup: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                out.push_str(&lookup(&after[..end]));
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// What a parameter's pattern asks for, in words (the patterns of the shipped
/// plans); another plan's pattern is shown as it is.
pub fn describe_pattern(re: &str) -> String {
    let words = match re {
        r"^([0-9]+(\.[0-9]+)?\s*([KMG]i?B?|B)?(/s)?)?$" => {
            "a size or rate such as 100MiB/s, 512KiB or 1GB"
        }
        r"^(https?://[^\s]+)?$" => "an http:// or https:// URL",
        r"^(serial|parallel)$" => "serial or parallel",
        r"^(true|false)$" => "true or false",
        r"^(aws:kms|AES256)?$" => "aws:kms or AES256",
        r"^(Hot|Cool|Cold)?$" => "Hot, Cool or Cold",
        r"^[A-Z_]*$" => "upper-case letters and _, e.g. STANDARD_IA",
        r"^[A-Za-z0-9:/_+=.@-]*$" => "a key id or ARN (letters, digits and : / _ + = . @ -)",
        r"^(true|false|force)$" => "true, false or force",
        r"^(exact|by-name)$" => "exact or by-name",
        r"^(gzip|zstd)$" => "gzip or zstd",
        r"^(differential|full)$" => "differential or full",
        r"^[0-9]{1,4}$" => "a whole number, 0 to 9999",
        r"^[0-9, ]*$" => "node indexes separated by commas, e.g. 0,2",
        r"^[1-9][0-9]*$" => "a whole number, 1 or more",
        r"^[A-Za-z0-9-]*$" => "letters, digits and -",
        r"^[A-Za-z0-9.-]*$" => "letters, digits, . and -",
        r"^[A-Za-z0-9._/-]*$" => "letters, digits and . _ / -",
        r"^[A-Za-z0-9/+=_-]*$" => "letters, digits and / + = _ -",
        r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$" => {
            "1 to 128 letters, digits and . _ -, starting with a letter or digit"
        }
        r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$" => {
            "a store profile name: 1 to 64 letters, digits, _ and -, starting with a letter or digit"
        }
        r"^[A-Za-z0-9_, -]*$" => "names (letters, digits, _ and -) separated by commas or spaces",
        r"^[A-Za-z0-9_./, -]*$" => {
            "paths (letters, digits, _ . / and -) separated by commas or spaces"
        }
        r"^[a-z0-9-]+$" => "lower-case letters, digits and -",
        r"^[a-z0-9](?:[a-z0-9]|-[a-z0-9]){2,62}$" => {
            "3 to 63 lower-case letters, digits and single hyphens, not at either end"
        }
        r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$" => {
            "3 to 63 lower-case letters, digits, . and -, starting and ending with a letter or digit"
        }
        r"^[a-z0-9]{3,24}$" => "3 to 24 lower-case letters and digits",
        other => return format!("it must match the pattern {other}"),
    };
    format!("give {words}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_pattern_of_the_shipped_plans_has_words() {
        for plan in crate::plan::Plan::list(None).expect("plans") {
            for p in &plan.params {
                if let Some(re) = &p.pattern {
                    let words = super::describe_pattern(re.as_str());
                    assert!(
                        words.starts_with("give "),
                        "{} {}: {}",
                        plan.name,
                        p.name,
                        re.as_str()
                    );
                }
            }
        }
    }

    use super::*;

    fn spec(name: &str, required: bool, default: Option<&str>, secret: bool) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            description: String::new(),
            required,
            default: default.map(Into::into),
            pattern: None,
            secret,
            env: true,
        }
    }

    fn p(k: &str, v: &str) -> CliParam {
        CliParam {
            key: k.into(),
            value: v.into(),
            literal: false,
        }
    }

    #[test]
    fn unknown_and_missing_are_named_together() {
        let specs = vec![spec("A", true, None, false), spec("B", true, None, false)];
        let err = Params::resolve(&specs, &[p("A", "x"), p("ZZZ", "1")], &BTreeMap::new())
            .expect_err("must refuse");
        let text = err.to_string();
        assert!(text.contains("ZZZ"), "{text}");
        assert!(text.contains("missing required parameter(s): B"), "{text}");
    }

    #[test]
    fn precedence_cli_env_default_and_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("v");
        std::fs::write(&f, "from-file\n").expect("write");
        let specs = vec![
            spec("A", true, None, false),
            spec("B", false, Some("dflt"), false),
            spec("C", false, Some("dflt"), false),
            spec("D", true, None, true),
            ParamSpec {
                env: false,
                ..spec("E", false, Some("dflt"), false)
            },
        ];
        let env: BTreeMap<String, String> = [
            ("B".to_string(), "from-env".to_string()),
            ("E".to_string(), "from-env".to_string()),
        ]
        .into_iter()
        .collect();
        let params = Params::resolve(
            &specs,
            &[p("A", "cli"), p("D", &format!("@{}", f.display()))],
            &env,
        )
        .expect("resolve");
        assert_eq!(params.get("A"), "cli");
        assert_eq!(params.get("B"), "from-env");
        assert_eq!(params.get("C"), "dflt");
        assert_eq!(params.get("D"), "from-file");
        assert_eq!(
            params.get("E"),
            "dflt",
            "E takes no value from the environment"
        );
        assert_eq!(params.sources()["B"], Source::Env);
        assert_eq!(params.sources()["D"], Source::File);
        assert_eq!(params.redacted().0["D"], redact::MASK);
    }

    #[test]
    fn a_value_file_is_read_bounded_whatever_stat_says() {
        // /dev/zero has size 0 and never ends: the read must stop on its own.
        let err = read_value("K", "@/dev/zero").expect_err("must refuse");
        assert!(err.contains("more than"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        let err = read_value("K", &format!("@{}", dir.path().display())).expect_err("dir");
        assert!(err.contains("directory"), "{err}");
        let f = dir.path().join("ok");
        std::fs::write(&f, "x".repeat(MAX_FILE_VALUE as usize)).expect("write");
        let (v, src) = read_value("K", &format!("@{}", f.display())).expect("at the limit");
        assert_eq!((v.len() as u64, src), (MAX_FILE_VALUE, Source::File));
    }

    #[test]
    fn secret_pattern_failure_does_not_echo_value() {
        let mut s = spec("KEY", true, None, true);
        s.pattern = Some(Regex::new("^[a-z]+$").expect("re"));
        let err = Params::resolve(&[s], &[p("KEY", "NOT-lower-9f8e7d")], &BTreeMap::new())
            .expect_err("refuse");
        assert!(!err.to_string().contains("NOT-lower-9f8e7d"));
    }

    #[test]
    fn templates_expand_and_list_references() {
        assert_eq!(references("file://${A}/x/${B}"), vec!["A", "B"]);
        let specs = vec![spec("A", true, None, false), spec("B", true, None, false)];
        let params =
            Params::resolve(&specs, &[p("A", "1"), p("B", "2")], &BTreeMap::new()).expect("ok");
        assert_eq!(params.expand("file://${A}/x/${B}"), "file://1/x/2");
    }
}
