//! Node archives: a node's keyspaces as one compressed tar stream (gzip, the
//! default, or zstd: [`Codec`]).
//!
//! * [`pack`] walks a data dir and writes tar → gzip into any `std::io::Write`,
//!   hashing every file as it is read. It runs on a blocking thread; [`io::PartSink`]
//!   cuts the compressed stream into parts for the async uploader.
//! * [`unpack`] reads tar.gz from any `std::io::Read` ([`io::ChannelReader`] bridges
//!   a download), refuses anything unsafe or not declared by the manifest, and
//!   checks every file's SHA-256 — into a staging dir, or without writing (verify).

pub mod io;
pub mod pack;
pub mod pargz;
pub mod seek;
pub mod unpack;

/// gzip level: the same trade-off as `gzip -6`, the default users compare with.
pub const GZIP_LEVEL: u32 = 6;
/// zstd level: zstd's own default, the same as `zstd` with no level.
pub const ZSTD_LEVEL: i32 = 3;

/// How a node archive is compressed (`COMPRESSION`): the object's name says which.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// One gzip member of independently deflated blocks: `node-<i>.tar.gz`.
    #[default]
    Gzip,
    /// One zstd frame per block: `node-<i>.tar.zst`.
    Zstd,
}

impl Codec {
    pub fn parse(text: &str) -> Option<Codec> {
        match text.trim() {
            "" | "gzip" => Some(Codec::Gzip),
            "zstd" => Some(Codec::Zstd),
            _ => None,
        }
    }

    /// The suffix of a node object compressed so.
    pub fn extension(self) -> &'static str {
        match self {
            Codec::Gzip => "tar.gz",
            Codec::Zstd => "tar.zst",
        }
    }

    /// The codec of a node object, by its name.
    pub fn of_object(name: &str) -> Option<Codec> {
        [Codec::Gzip, Codec::Zstd]
            .into_iter()
            .find(|c| name.ends_with(&format!(".{}", c.extension())))
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::Gzip => "gzip",
            Codec::Zstd => "zstd",
        }
    }
}

/// Hex SHA-256 of a finished hasher.
pub fn hex_digest(h: sha2::Sha256) -> String {
    use sha2::Digest;
    hex::encode(h.finalize())
}
