//! `cairn.toml`: named stores ("profiles"), so one word says where snapshots live.
//!
//! ```toml
//! [stores.prod]
//! url = "s3://backups/cassandra"
//! region = "eu-west-1"
//! secret_access_key_file = "/etc/cairn/aws-secret"   # or the standard AWS chain
//! access_key_id = "AKIA…"
//!
//! [stores.nas]
//! url = "/mnt/nas/cairn"        # relative paths are relative to this file
//! ```
//!
//! A profile is used as `--store prod` by every command that takes a store and as
//! `-p STORE=prod` by every plan (instead of the plan's own store parameters, which
//! keep working). The file is found at `--config FILE` (`CAIRN_CONFIG`), else next
//! to the cluster description (the working directory for commands without one),
//! else in the user's config dir
//! (`$XDG_CONFIG_HOME/cairn/cairn.toml`, `~/.config/cairn/cairn.toml`): the first
//! that exists is the only one read.
//!
//! Secrets are read from files named by `*_file` keys, bounded and registered for
//! redaction; a secret written inline is accepted only when the file is readable by
//! its owner alone (as ssh treats private keys).

use crate::plan::params::{MIN_SECRET_LEN, read_file_value};
use crate::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The file name looked for next to the cluster description and in the config dir.
pub const FILE_NAME: &str = "cairn.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    stores: BTreeMap<String, RawStore>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: String,
    #[serde(default)]
    description: String,
    // S3
    region: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    secret_access_key_file: Option<PathBuf>,
    session_token: Option<String>,
    session_token_file: Option<PathBuf>,
    // Azure
    account: Option<String>,
    key: Option<String>,
    key_file: Option<PathBuf>,
    client_id: Option<String>,
    tenant_id: Option<String>,
    client_secret: Option<String>,
    client_secret_file: Option<PathBuf>,
    authority_host: Option<String>,
    // Both
    endpoint: Option<String>,
    // The cloud's own protections
    sse: Option<String>,
    sse_kms_key_id: Option<String>,
    storage_class: Option<String>,
    access_tier: Option<String>,
}

/// Where a secret of a profile comes from.
#[derive(Debug, Clone)]
enum SecretFrom {
    Inline(String),
    File(PathBuf),
}

/// One named store.
#[derive(Debug, Clone)]
pub struct StoreProfile {
    pub name: String,
    /// The store URL (a relative directory made absolute against the file's dir).
    pub url: String,
    pub description: String,
    /// Backend options that are not secret.
    options: BTreeMap<String, String>,
    /// Backend options that are, by option name.
    secrets: BTreeMap<String, SecretFrom>,
}

impl StoreProfile {
    /// The URL's kind: `s3`, `az` or `file`.
    pub fn scheme(&self) -> &'static str {
        scheme_of(&self.url)
    }

    /// The backend options, secrets read from their files now (each registered for
    /// redaction before it can appear anywhere).
    pub fn options(&self) -> Result<BTreeMap<String, String>> {
        let mut out = self.options.clone();
        let mut problems = Vec::new();
        for (opt, from) in &self.secrets {
            let key = format!("stores.{}.{opt}", self.name);
            let value = match from {
                SecretFrom::Inline(v) => v.clone(),
                SecretFrom::File(p) => match read_secret_file(&format!("{key}_file"), p) {
                    Ok(v) => v,
                    Err(e) => {
                        problems.push(e);
                        continue;
                    }
                },
            };
            if value.trim().chars().count() < MIN_SECRET_LEN {
                problems.push(format!(
                    "{key}: a secret shorter than {MIN_SECRET_LEN} characters is refused (it could not be masked safely in logs)"
                ));
                continue;
            }
            crate::redact::register(&value);
            out.insert(opt.clone(), value);
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(Error::Params(problems))
        }
    }
}

/// A secret from a file a profile names: a regular file (a FIFO would block),
/// one line (trailing whitespace dropped; a second line or a control character
/// would silently make another credential).
fn read_secret_file(key: &str, path: &Path) -> std::result::Result<String, String> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => {
            return Err(format!("{key}: {} is not a regular file", path.display()));
        }
        _ => {}
    }
    let v = read_file_value(key, path)?;
    let v = v.trim_end().to_string();
    if v.chars().any(char::is_control) {
        crate::redact::register(&v);
        return Err(format!(
            "{key}: {} holds more than one line or a control character; a secret is one line",
            path.display()
        ));
    }
    Ok(v)
}

/// `s3`, `az` or `file` for a store URL or template (a plain path is `file`).
pub fn scheme_of(url: &str) -> &'static str {
    if url.starts_with("s3://") {
        "s3"
    } else if url.starts_with("az://") {
        "az"
    } else if url.starts_with("memory://") {
        "memory"
    } else {
        "file"
    }
}

/// The store profiles in effect: those of one `cairn.toml`, or none.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The file read, if one was found.
    pub path: Option<PathBuf>,
    /// Where it was looked for (said when a profile is missing).
    looked: Vec<PathBuf>,
    /// A found file that could not be read: said when a profile is asked for (a
    /// command that uses none is not stopped by it).
    broken: Option<String>,
    stores: BTreeMap<String, StoreProfile>,
}

impl Config {
    /// Find and read the config: `explicit` (which must exist), else `cairn.toml`
    /// next to `cluster`, else the user's config dir. None found is no error: there
    /// are then no profiles.
    pub fn discover(explicit: Option<&Path>, cluster: Option<&Path>) -> Result<Config> {
        if let Some(p) = explicit {
            if !p.exists() {
                return Err(Error::Usage(format!(
                    "config file {} does not exist (--config / CAIRN_CONFIG)",
                    p.display()
                )));
            }
            return Config::load(p);
        }
        let mut looked = Vec::new();
        // Next to the cluster description: the one given, else `CAIRN_CLUSTER`'s,
        // else (a command that takes none) the working directory.
        let env_cluster = std::env::var_os("CAIRN_CLUSTER")
            .filter(|c| !c.is_empty())
            .map(PathBuf::from);
        let dir = match cluster.or(env_cluster.as_deref()).map(Path::parent) {
            Some(Some(d)) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        looked.push(dir.join(FILE_NAME));
        if let Some(dir) = user_config_dir() {
            looked.push(dir.join("cairn").join(FILE_NAME));
        }
        for p in &looked {
            if p.exists() {
                return Ok(Config::load(p).unwrap_or_else(|e| Config {
                    path: Some(p.clone()),
                    looked: vec![p.clone()],
                    broken: Some(e.to_string()),
                    stores: BTreeMap::new(),
                }));
            }
        }
        Ok(Config {
            path: None,
            looked,
            broken: None,
            stores: BTreeMap::new(),
        })
    }

    /// Read one config file.
    pub fn load(path: &Path) -> Result<Config> {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let bad = |message: String| Error::Usage(format!("{}: {message}", path.display()));
        let text = crate::fsx::read_small_text(&path, crate::fsx::MAX_DESCRIPTION)
            .map_err(|e| bad(format!("cannot read: {e}")))?;
        // Values of secret keys are registered before anything can quote them, and
        // errors name the line and column, never the line itself.
        let table: toml::Table = toml::from_str(&text).map_err(|e| bad(located(&text, &e)))?;
        register_secret_values(&toml::Value::Table(table.clone()), false);
        let raw = RawConfig::deserialize(toml::Value::Table(table))
            .map_err(|e| bad(redacted_message(&e)))?;
        let private = {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(&path)
                .map(|m| m.permissions().mode() & 0o077 == 0)
                .unwrap_or(false)
        };
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut stores = BTreeMap::new();
        let mut problems = Vec::new();
        for (name, r) in raw.stores {
            match profile(&name, r, &dir, private) {
                Ok(p) => {
                    stores.insert(name, p);
                }
                Err(mut e) => problems.append(&mut e),
            }
        }
        if !problems.is_empty() {
            return Err(bad(problems.join("; ")));
        }
        Ok(Config {
            path: Some(path.clone()),
            looked: vec![path],
            broken: None,
            stores,
        })
    }

    pub fn stores(&self) -> impl Iterator<Item = &StoreProfile> {
        self.stores.values()
    }

    /// The profile `name`, or an error that says where profiles were looked for.
    pub fn store(&self, name: &str) -> Result<&StoreProfile> {
        if let Some(p) = self.stores.get(name) {
            return Ok(p);
        }
        if let Some(e) = &self.broken {
            return Err(Error::Usage(e.clone()));
        }
        Err(Error::Usage(match &self.path {
            Some(path) if self.stores.is_empty() => format!(
                "no store profile named {name:?}: {} defines none ([stores.{name}] url = …)",
                path.display()
            ),
            Some(path) => format!(
                "no store profile named {name:?} in {} (it defines: {})",
                path.display(),
                self.stores.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            None => format!(
                "no store profile named {name:?}: no {FILE_NAME} found (looked at {}; --config FILE names one)",
                self.looked
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }))
    }

    /// What a `--store` argument names: a profile (a bare word defined in the
    /// config), else a URL or path. A bare word that is both a profile and a
    /// directory here is refused as ambiguous; one that is neither is refused too
    /// (a typo of a profile name must not become a new directory).
    pub fn store_arg(&self, arg: &str) -> Result<StoreArg> {
        if !is_profile_name(arg) {
            return Ok(StoreArg::Url(arg.to_string()));
        }
        let exists = Path::new(arg).exists();
        match (self.stores.get(arg), exists) {
            (Some(_), true) => Err(Error::Usage(format!(
                "{arg:?} is both a store profile and a directory here: write ./{arg} for the directory, or run from elsewhere for the profile"
            ))),
            (Some(p), false) => Ok(StoreArg::Profile(p.clone())),
            (None, true) => Ok(StoreArg::Url(arg.to_string())),
            (None, false) => {
                if let Some(e) = &self.broken {
                    return Err(Error::Usage(e.clone()));
                }
                let e = self
                    .store(arg)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                Err(Error::Usage(format!(
                    "{e}; and there is no directory {arg:?} here (write ./{arg} for a new one)"
                )))
            }
        }
    }
}

/// What a `--store` argument resolved to.
#[derive(Debug, Clone)]
pub enum StoreArg {
    Url(String),
    Profile(StoreProfile),
}

/// A profile name as a pattern (a plan's `STORE` parameter).
pub const PROFILE_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$";

/// A profile name: a bare word (letters, digits, `_`, `-`), never a path or URL.
pub fn is_profile_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && s.len() <= 64
}

fn user_config_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        let x = PathBuf::from(x);
        if x.is_absolute() {
            return Some(x);
        }
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".config"))
}

/// Keys whose values are secrets, and (a typo of them) anything that looks like
/// one: their values are masked in every message.
fn secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    [
        "secret",
        "key",
        "token",
        "password",
        "passphrase",
        "credential",
    ]
    .iter()
    .any(|w| k.contains(w))
        && !k.ends_with("_file")
        && k != "access_key_id"
}

fn register_secret_values(v: &toml::Value, secret: bool) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                register_secret_values(v, secret || secret_key(k));
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|v| register_secret_values(v, secret)),
        toml::Value::String(s) if secret => crate::redact::register(s),
        other if secret => crate::redact::register(&other.to_string()),
        _ => {}
    }
}

/// A syntax error as "line L, column C: what", without the source line (which
/// may hold a secret).
fn located(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {col}: {msg}")
        }
        None => msg,
    }
}

/// A type error of a value: the message without the value it quotes.
fn redacted_message(e: &toml::de::Error) -> String {
    crate::redact::redact(e.message().trim())
}

fn profile(
    name: &str,
    r: RawStore,
    dir: &Path,
    private: bool,
) -> std::result::Result<StoreProfile, Vec<String>> {
    let mut problems = Vec::new();
    let at = format!("stores.{name}");
    if !is_profile_name(name) {
        problems.push(format!(
            "stores.{name:?}: a profile name is 1 to 64 letters, digits, _ and -, starting with a letter or digit (it is used as --store NAME)"
        ));
    }
    let url = r.url.trim().to_string();
    // The URL is not echoed in these messages: a mistaken one may hold a password.
    if url.is_empty() {
        problems.push(format!("{at}.url is empty"));
        return Err(problems);
    }
    if url.contains('$') || url.starts_with('~') {
        problems.push(format!(
            "{at}.url: cairn expands no ~ or $VARIABLE here; write the path out"
        ));
        return Err(problems);
    }
    let known = ["s3://", "az://", "file://"];
    if (url.contains("://") && !known.iter().any(|p| url.starts_with(p)))
        || (url.starts_with("file:") && !url.starts_with("file://"))
    {
        problems.push(format!(
            "{at}.url is not a store URL: s3://bucket/prefix, az://container/prefix, file:///dir or a directory (schemes in lower case)"
        ));
        return Err(problems);
    }
    let scheme = scheme_of(&url);
    if matches!(scheme, "s3" | "az")
        && url
            .split_once("://")
            .map(|(_, rest)| rest.split('/').next().unwrap_or(""))
            .is_some_and(|host| host.contains(['@', ':']) || host.is_empty())
    {
        crate::redact::register(&url);
        problems.push(format!(
            "{at}.url: the bucket or container is missing or holds credentials (user:password@); name secrets with the *_file keys"
        ));
        return Err(problems);
    }
    // A relative directory is relative to the file that names it, not to wherever
    // cairn happens to run.
    let url = if scheme == "file" {
        let p = url.strip_prefix("file://").unwrap_or(&url);
        let p = Path::new(p);
        if p.is_absolute() || p.as_os_str().is_empty() {
            url.clone()
        } else {
            dir.join(p).display().to_string()
        }
    } else {
        url
    };
    let mut options = BTreeMap::new();
    let mut secrets = BTreeMap::new();
    let plain: [(&str, Option<String>, &[&str]); 11] = [
        ("sse", r.sse, &["s3"]),
        ("sse_kms_key_id", r.sse_kms_key_id, &["s3"]),
        ("storage_class", r.storage_class, &["s3"]),
        ("access_tier", r.access_tier, &["az"]),
        ("region", r.region, &["s3"]),
        ("access_key_id", r.access_key_id, &["s3"]),
        ("account", r.account, &["az"]),
        ("client_id", r.client_id, &["az"]),
        ("tenant_id", r.tenant_id, &["az"]),
        ("authority_host", r.authority_host, &["az"]),
        ("endpoint", r.endpoint, &["s3", "az"]),
    ];
    for (opt, value, applies) in plain {
        let Some(v) = value.filter(|v| !v.is_empty()) else {
            continue;
        };
        if !applies.contains(&scheme) {
            problems.push(format!(
                "{at}.{opt} does not apply to a {scheme} store ({url})"
            ));
            continue;
        }
        options.insert(opt.to_string(), v);
    }
    let secret: [(&str, Option<String>, Option<PathBuf>, &str); 4] = [
        (
            "secret_access_key",
            r.secret_access_key,
            r.secret_access_key_file,
            "s3",
        ),
        ("session_token", r.session_token, r.session_token_file, "s3"),
        ("key", r.key, r.key_file, "az"),
        ("client_secret", r.client_secret, r.client_secret_file, "az"),
    ];
    for (opt, inline, file, applies) in secret {
        let from = match (inline.filter(|v| !v.is_empty()), file) {
            (Some(_), Some(_)) => {
                problems.push(format!("{at}: give {opt} or {opt}_file, not both"));
                continue;
            }
            (Some(v), None) => {
                // Registered at once: the value is in memory from here on and
                // must never show in a message.
                crate::redact::register(&v);
                if !private {
                    problems.push(format!(
                        "{at}.{opt} is written in a file others can read: make it private (chmod 600) or name a file with {opt}_file"
                    ));
                    continue;
                }
                SecretFrom::Inline(v)
            }
            (None, Some(f)) => SecretFrom::File(if f.is_absolute() { f } else { dir.join(f) }),
            (None, None) => continue,
        };
        if scheme != applies {
            problems.push(format!(
                "{at}.{opt} does not apply to a {scheme} store ({url})"
            ));
            continue;
        }
        secrets.insert(opt.to_string(), from);
    }
    if problems.is_empty() {
        Ok(StoreProfile {
            name: name.to_string(),
            url,
            description: r.description,
            options,
            secrets,
        })
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(FILE_NAME);
        std::fs::write(&p, text).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    }

    #[test]
    fn profiles_resolve_paths_and_secret_files() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("secret"), "s3cr3t-value-1\n").expect("write");
        let p = write(
            d.path(),
            "[stores.prod]\nurl = \"s3://b/p\"\nregion = \"eu-west-1\"\nsecret_access_key_file = \"secret\"\n\n[stores.nas]\nurl = \"backups\"\n",
            0o644,
        );
        let c = Config::load(&p).expect("load");
        let prod = c.store("prod").expect("prod");
        let o = prod.options().expect("options");
        assert_eq!(
            o.get("secret_access_key").map(String::as_str),
            Some("s3cr3t-value-1")
        );
        assert_eq!(o.get("region").map(String::as_str), Some("eu-west-1"));
        assert_eq!(prod.scheme(), "s3");
        let nas = c.store("nas").expect("nas");
        assert_eq!(Path::new(&nas.url), d.path().join("backups"));
        let msg = c.store("prdo").expect_err("missing").to_string();
        assert!(msg.contains("nas, prod"), "{msg}");
    }

    #[test]
    fn inline_secrets_need_a_private_file_and_options_fit_the_scheme() {
        let d = tempfile::tempdir().expect("tempdir");
        let text = "[stores.prod]\nurl = \"s3://b/p\"\nsecret_access_key = \"inline-secret-9\"\n";
        let p = write(d.path(), text, 0o644);
        let msg = Config::load(&p).expect_err("readable").to_string();
        assert!(msg.contains("chmod 600"), "{msg}");
        assert!(!msg.contains("inline-secret-9"), "{msg}");
        let p = write(d.path(), text, 0o600);
        let c = Config::load(&p).expect("private");
        assert_eq!(
            c.store("prod").expect("prod").options().expect("o")["secret_access_key"],
            "inline-secret-9"
        );
        let p = write(
            d.path(),
            "[stores.x]\nurl = \"/srv/b\"\nregion = \"r\"\n",
            0o600,
        );
        let msg = Config::load(&p).expect_err("region on a dir").to_string();
        assert!(msg.contains("stores.x.region does not apply"), "{msg}");
        let p = write(
            d.path(),
            "[stores.x]\nurl = \"s3://b\"\nbucket = \"r\"\n",
            0o600,
        );
        let msg = Config::load(&p).expect_err("unknown key").to_string();
        assert!(msg.contains("bucket"), "{msg}");
    }

    #[test]
    fn no_message_quotes_a_secret_of_a_broken_file() {
        let d = tempfile::tempdir().expect("tempdir");
        for body in [
            "secret_acess_key = \"quoted-secret-1\"",
            "secret_access_key = \"quoted-secret-1",
            "secret_access_key = 98765432109876",
            "key = [\"quoted-secret-1\"]",
        ] {
            let text = format!("[stores.prod]\nurl = \"s3://b/p\"\n{body}\n");
            let p = write(d.path(), &text, 0o600);
            let msg = crate::redact::redact(&Config::load(&p).expect_err(body).to_string());
            assert!(
                !msg.contains("quoted-secret-1") && !msg.contains("98765432109876"),
                "{body}: {msg}"
            );
        }
        // A URL with credentials in it is refused without being echoed.
        let p = write(
            d.path(),
            "[stores.x]\nurl = \"s3://u:pw-in-url-77@b/p\"\n",
            0o600,
        );
        let msg = crate::redact::redact(&Config::load(&p).expect_err("userinfo").to_string());
        assert!(!msg.contains("pw-in-url-77"), "{msg}");
        // A secret file of two lines would sign with another credential.
        std::fs::write(d.path().join("two"), "first-line-secret\nsecond\n").expect("write");
        let p = write(
            d.path(),
            "[stores.x]\nurl = \"s3://b/p\"\nsecret_access_key_file = \"two\"\n",
            0o644,
        );
        let c = Config::load(&p).expect("load");
        let msg = c
            .store("x")
            .expect("x")
            .options()
            .expect_err("two lines")
            .to_string();
        assert!(msg.contains("more than one line"), "{msg}");
    }
}
