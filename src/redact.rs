//! Secret redaction.
//!
//! Values of parameters declared `secret = true` are registered here when they are
//! resolved. Everything cairn prints, logs or persists (errors, hook output, the
//! tracing writer, the state store) goes through [`redact`], which replaces every
//! registered value with [`MASK`]. Parameter maps are redacted structurally before
//! they are stored; this filter is the second fence for values that travel inside
//! free text (an error from a store, a hook's stderr).

use std::sync::{LazyLock, RwLock};

pub const MASK: &str = "********";

static SECRETS: LazyLock<RwLock<Vec<String>>> = LazyLock::new(|| RwLock::new(Vec::new()));

/// Shorter fragments of a secret (its lines) are not registered on their own.
const MIN_FRAGMENT: usize = 8;

/// Register a secret value. Empty values are ignored. The value is registered as
/// given, without surrounding whitespace (a value read from a file or a Kubernetes
/// secret often ends in a newline that the text it leaks into does not have), and
/// line by line (a multi-line secret is often printed one line at a time).
pub fn register(value: &str) {
    if value.is_empty() {
        return;
    }
    let mut forms = vec![value, value.trim()];
    if value.contains('\n') {
        forms.extend(
            value
                .lines()
                .map(str::trim)
                .filter(|l| l.chars().count() >= MIN_FRAGMENT),
        );
    }
    let mut guard = match SECRETS.write() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    for f in forms {
        if !f.is_empty() && !guard.iter().any(|s| s == f) {
            guard.push(f.to_string());
        }
    }
    // Longest first, so a secret that contains another is masked whole.
    guard.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// Redact every string (keys and values) of a JSON document, before it is encoded:
/// redacting the encoded text could cut through JSON syntax.
pub fn redact_json(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) => Value::String(redact(s)),
        Value::Array(a) => Value::Array(a.iter().map(redact_json).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (redact(k), redact_json(v))).collect())
        }
        other => other.clone(),
    }
}

/// Replace every registered secret value in `text` with [`MASK`].
pub fn redact(text: &str) -> String {
    let guard = match SECRETS.read() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    let mut out = text.to_string();
    for s in guard.iter() {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), MASK);
        }
    }
    out
}

/// A `std::io::Write` that redacts each write before passing it on; used for the
/// tracing subscriber's output.
pub struct RedactingWriter<W>(pub W);

/// A log line that cannot be written (stderr closed: an agent whose SSH session
/// broke, a coordinator whose terminal went away) is dropped: the logging library
/// would otherwise report the failure with a panicking `eprintln!`, killing the
/// task that logged — mid-cancellation, say.
impl<W: std::io::Write> std::io::Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let _ = self.0.write_all(redact(&text).as_bytes());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_stream_drops_the_line_instead_of_failing() {
        struct Closed;
        impl std::io::Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
        }
        let mut w = RedactingWriter(Closed);
        assert!(matches!(std::io::Write::write(&mut w, b"a line\n"), Ok(7)));
        assert!(std::io::Write::flush(&mut w).is_ok());
    }

    #[test]
    fn masks_registered_values_and_longest_first() {
        register("s3cr3t-value");
        register("s3cr3t-value-longer");
        let out = redact("a s3cr3t-value-longer and s3cr3t-value b");
        assert_eq!(out, format!("a {MASK} and {MASK} b"));
        assert!(!out.contains("s3cr3t"));
    }

    #[test]
    fn trailing_newline_and_lines_of_a_secret_are_masked() {
        register("k8s-secret-from-file\n");
        assert_eq!(redact("key k8s-secret-from-file."), format!("key {MASK}."));
        register("-----BEGIN KEY-----\nline-one-of-the-key\nline-two-of-the-key\n");
        let out = redact("got line-two-of-the-key here");
        assert!(!out.contains("line-two"), "{out}");
    }

    #[test]
    fn json_is_redacted_structurally() {
        register("json-secret-value");
        let v = serde_json::json!({"a": "x json-secret-value y", "json-secret-value": 1});
        let text = redact_json(&v).to_string();
        assert!(!text.contains("json-secret-value"), "{text}");
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok());
    }
}
