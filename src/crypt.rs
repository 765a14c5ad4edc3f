//! Client-side encryption in the age format (the `age` crate; no cryptography of
//! our own). Every object of an encrypted snapshot — node archives, `manager.zip`
//! — is one age file: `age -d -i key.txt node-0.tar.gz | tar tz` opens it. The
//! manifest keeps in the clear only what listing and retention read (names,
//! times, sizes, object checksums, tags); keyspaces, file names and per-file
//! hashes are sealed in it as an armored age file for the same recipients.
//!
//! Recipients are X25519 public keys (`age1…`, one per line, `#` comments, as
//! `age-keygen` writes them) or a passphrase (scrypt). Identities are the text of
//! an identity file (`AGE-SECRET-KEY-1…`) or the passphrase. Both travel to node
//! agents only over their stdin, like store credentials; neither is ever stored.

use crate::{Error, Result};
use age::secrecy::SecretString;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::str::FromStr;

/// How an age file begins.
pub const AGE_MAGIC: &[u8] = b"age-encryption.org/v1";

/// Whether a file is an age file (its first line is age's).
pub fn is_age_file(path: &std::path::Path) -> bool {
    let mut head = [0u8; AGE_MAGIC.len()];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| head == AGE_MAGIC)
}

/// What a backup encrypts to.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EncryptTo {
    /// X25519 recipients, `age1…`.
    Recipients(Vec<String>),
    /// A passphrase (scrypt); secret.
    Passphrase(String),
}

impl std::fmt::Debug for EncryptTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncryptTo::Recipients(r) => f.debug_tuple("Recipients").field(r).finish(),
            EncryptTo::Passphrase(_) => f.write_str("Passphrase(********)"),
        }
    }
}

/// How a snapshot is encrypted, as its manifest says (public: no secret in it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Scheme {
    /// Always `age`.
    pub format: String,
    /// The X25519 recipients (empty with a passphrase).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub passphrase: bool,
}

impl Scheme {
    pub fn describe(&self) -> String {
        if self.passphrase {
            "age, with a passphrase".into()
        } else {
            format!("age, to {} recipient(s)", self.recipients.len())
        }
    }
}

impl EncryptTo {
    /// Parse recipients as `age-keygen` and `age -R` write them: one `age1…` key
    /// per line; blank lines and `#` comments ignored. At least one.
    pub fn recipients(text: &str) -> std::result::Result<EncryptTo, String> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.to_ascii_uppercase().starts_with("AGE-SECRET-KEY-") {
                // A private key given by mistake: masked everywhere from now on,
                // and never stored (the run is refused before it is recorded).
                crate::redact::register(line);
                return Err(format!(
                    "ENCRYPT_TO line {} is a secret key (AGE-SECRET-KEY-…), not a recipient: give the public key (age-keygen -y key.txt), and keep the secret key off this machine",
                    i + 1
                ));
            }
            if age::x25519::Recipient::from_str(line).is_err() {
                // Not echoed: a mistaken line may be anything.
                return Err(format!(
                    "ENCRYPT_TO line {} is not an age recipient (one age1… key per line, as age-keygen -y prints it)",
                    i + 1
                ));
            }
            keys.push(line.to_string());
        }
        if keys.is_empty() {
            return Err("ENCRYPT_TO names no recipient (age1… lines)".into());
        }
        keys.sort();
        keys.dedup();
        Ok(EncryptTo::Recipients(keys))
    }

    /// What the manifest and the run spec record.
    pub fn scheme(&self) -> Scheme {
        match self {
            EncryptTo::Recipients(r) => Scheme {
                format: "age".into(),
                recipients: r.clone(),
                passphrase: false,
            },
            EncryptTo::Passphrase(_) => Scheme {
                format: "age".into(),
                recipients: Vec::new(),
                passphrase: true,
            },
        }
    }

    fn encryptor(&self) -> Result<age::Encryptor> {
        let failed = |e: age::EncryptError| Error::State(format!("age: {e}"));
        match self {
            EncryptTo::Passphrase(p) => Ok(age::Encryptor::with_user_passphrase(
                SecretString::from(p.clone()),
            )),
            EncryptTo::Recipients(keys) => {
                let mut rs = Vec::with_capacity(keys.len());
                for k in keys {
                    rs.push(age::x25519::Recipient::from_str(k).map_err(|e| {
                        Error::Usage(format!("{:?} is not an age recipient: {e}", k))
                    })?);
                }
                age::Encryptor::with_recipients(rs.iter().map(|r| r as &dyn age::Recipient))
                    .map_err(failed)
            }
        }
    }

    /// A writer that encrypts into `out`; `finish` it to write the last chunk.
    pub fn wrap<W: Write>(&self, out: W) -> Result<age::stream::StreamWriter<W>> {
        self.encryptor()?
            .wrap_output(out)
            .map_err(|e| Error::State(format!("age: {e}")))
    }

    /// `plain` as an armored age file (text: it lives inside the JSON manifest).
    pub fn seal(&self, plain: &[u8]) -> Result<String> {
        let io = |e: std::io::Error| Error::State(format!("age: {e}"));
        let armor =
            age::armor::ArmoredWriter::wrap_output(Vec::new(), age::armor::Format::AsciiArmor)
                .map_err(io)?;
        let mut w = self.encryptor()?.wrap_output(armor).map_err(io)?;
        w.write_all(plain).map_err(io)?;
        let out = w.finish().and_then(|a| a.finish()).map_err(io)?;
        String::from_utf8(out).map_err(|e| Error::State(format!("age armor: {e}")))
    }
}

/// What opens an encrypted snapshot.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Keys {
    /// The text of an age identity file.
    Identities(String),
    /// The passphrase it was encrypted with.
    Passphrase(String),
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Keys::Identities(_) => "Identities(********)",
            Keys::Passphrase(_) => "Passphrase(********)",
        })
    }
}

impl Keys {
    /// Check an identity file's text (`AGE-SECRET-KEY-1…` lines, `#` comments).
    pub fn identities(text: &str) -> std::result::Result<Keys, String> {
        let keys = Keys::Identities(text.to_string());
        match keys.decoded() {
            Ok(ids) if ids.is_empty() => {
                Err("AGE_IDENTITY holds no identity (AGE-SECRET-KEY-1… lines)".into())
            }
            Ok(_) => Ok(keys),
            Err(_) => Err(
                "AGE_IDENTITY is not an age identity file (AGE-SECRET-KEY-1… lines, as age-keygen writes them)"
                    .into(),
            ),
        }
    }

    fn decoded(&self) -> Result<Vec<Box<dyn age::Identity>>> {
        match self {
            Keys::Passphrase(p) => {
                let mut id = age::scrypt::Identity::new(SecretString::from(p.clone()));
                // The most work a passphrase may ask for: what age itself accepts.
                id.set_max_work_factor(22);
                Ok(vec![Box::new(id)])
            }
            Keys::Identities(text) => {
                let bad = || Error::Usage("not an age identity file".into());
                let file = age::IdentityFile::from_buffer(text.as_bytes()).map_err(|_| bad())?;
                file.into_identities().map_err(|_| bad())
            }
        }
    }

    /// A reader of the plaintext of the age file `r` (the object `name`, for
    /// messages). Every 64 KiB chunk is authenticated before its bytes are
    /// handed on: a changed byte is an error, never wrong data.
    pub fn reader<R: Read>(&self, r: R, name: &str) -> Result<age::stream::StreamReader<R>> {
        let ids = self.decoded()?;
        let d = age::Decryptor::new(r).map_err(|e| opened(name, e))?;
        d.decrypt(ids.iter().map(|i| &**i as &dyn age::Identity))
            .map_err(|e| opened(name, e))
    }

    /// Open an armored age file made by [`EncryptTo::seal`]. Remembered for the
    /// process (by the file and these keys): a passphrase costs a second of
    /// scrypt, and a restore reads its manifest several times.
    pub fn open(&self, armored: &str, name: &str) -> Result<Vec<u8>> {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(serde_json::to_vec(self).unwrap_or_default());
        h.update([0]);
        h.update(armored.as_bytes());
        let id = crate::archive::hex_digest(h);
        if let Some(plain) = opened_cache().get(&id) {
            return Ok(plain.clone());
        }
        let mut r = self.reader(age::armor::ArmoredReader::new(armored.as_bytes()), name)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out)
            .map_err(|e| Error::archive(name, format!("cannot be decrypted: {e}")))?;
        opened_cache().insert(id, out.clone());
        Ok(out)
    }

    /// Whether these keys open the stored age file `key`: its header and first
    /// chunk are read (a few KiB), the rest is not.
    pub async fn opens_object(
        &self,
        store: &dyn crate::store::Store,
        key: &str,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<()> {
        let (keys, name) = (self.clone(), key.to_string());
        crate::store::read_stream(store, key, cancel, move |r| {
            let mut plain = keys.reader(r, &name)?;
            let mut first = [0u8; 1];
            plain
                .read(&mut first)
                .map_err(|e| Error::archive(&name, format!("cannot be decrypted: {e}")))?;
            Ok(())
        })
        .await
    }
}

/// Opened private parts, by file and keys.
struct Cache(std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>);

impl Cache {
    fn get(&self, id: &str) -> Option<Vec<u8>> {
        self.0.lock().ok()?.get(id).cloned()
    }
    fn insert(&self, id: String, plain: Vec<u8>) {
        if let Ok(mut g) = self.0.lock() {
            g.insert(id, plain);
        }
    }
}

fn opened_cache() -> &'static Cache {
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    CACHE.get_or_init(|| Cache(std::sync::Mutex::new(Default::default())))
}

/// An age error as cairn says it: a key that does not fit is refused (the
/// snapshot is fine, the identity is not its own); anything else is corruption.
fn opened(name: &str, e: age::DecryptError) -> Error {
    match e {
        age::DecryptError::NoMatchingKeys | age::DecryptError::DecryptionFailed => {
            Error::Refused(vec![format!(
                "{name}: the identity given does not open it (it was encrypted to other recipients or another passphrase)"
            )])
        }
        age::DecryptError::ExcessiveWork { .. } => Error::Refused(vec![format!(
            "{name}: its passphrase encryption asks for more work than cairn accepts"
        )]),
        age::DecryptError::Io(e) => Error::archive(name, format!("cannot be read: {e}")),
        other => Error::archive(name, format!("is damaged or not an age file: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (String, String) {
        let id = age::x25519::Identity::generate();
        let public = id.to_public().to_string();
        use age::secrecy::ExposeSecret;
        (public, id.to_string().expose_secret().to_string())
    }

    #[test]
    fn seal_and_stream_round_trip_and_a_wrong_key_is_refused() {
        let (public, secret) = pair();
        let (_, other) = pair();
        let to = EncryptTo::recipients(&format!("# a comment\n{public}\n\n")).expect("parse");
        let sealed = to.seal(b"private part").expect("seal");
        assert!(sealed.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
        let keys = Keys::identities(&format!("# created: now\n{secret}\n")).expect("id");
        assert_eq!(keys.open(&sealed, "m").expect("open"), b"private part");
        let wrong = Keys::identities(&other).expect("id");
        assert!(matches!(wrong.open(&sealed, "m"), Err(Error::Refused(_))));

        let mut w = to.wrap(Vec::new()).expect("wrap");
        let data = vec![7u8; 200_000];
        w.write_all(&data).expect("write");
        let mut file = w.finish().expect("finish");
        let mut back = Vec::new();
        keys.reader(&file[..], "o")
            .expect("reader")
            .read_to_end(&mut back)
            .expect("read");
        assert_eq!(back, data);
        // One flipped byte in the payload: an error, not other data.
        let n = file.len() - 1000;
        file[n] ^= 1;
        let mut out = Vec::new();
        let r = keys.reader(&file[..], "o").expect("header intact");
        assert!(r.take(u64::MAX).read_to_end(&mut out).is_err());
    }

    #[test]
    fn bad_recipients_and_identities_are_named() {
        let msg = EncryptTo::recipients("age1nope\n").expect_err("bad");
        assert!(msg.contains("line 1"), "{msg}");
        assert!(EncryptTo::recipients("# only a comment\n").is_err());
        assert!(Keys::identities("AGE-SECRET-KEY-1NOPE").is_err());
    }
}
