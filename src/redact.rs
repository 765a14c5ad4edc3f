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

/// Register a secret value. Empty values are ignored.
pub fn register(value: &str) {
    if value.is_empty() {
        return;
    }
    let mut guard = match SECRETS.write() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    if !guard.iter().any(|s| s == value) {
        guard.push(value.to_string());
        // Longest first, so a secret that contains another is masked whole.
        guard.sort_by_key(|s| std::cmp::Reverse(s.len()));
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

impl<W: std::io::Write> std::io::Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0.write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_registered_values_and_longest_first() {
        register("s3cr3t-value");
        register("s3cr3t-value-longer");
        let out = redact("a s3cr3t-value-longer and s3cr3t-value b");
        assert_eq!(out, format!("a {MASK} and {MASK} b"));
        assert!(!out.contains("s3cr3t"));
    }
}
