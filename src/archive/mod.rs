//! Node archives: a node's keyspaces as one gzip-compressed tar stream.
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

/// Hex SHA-256 of a finished hasher.
pub fn hex_digest(h: sha2::Sha256) -> String {
    use sha2::Digest;
    hex::encode(h.finalize())
}
