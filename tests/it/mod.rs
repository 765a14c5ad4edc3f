#![allow(clippy::unwrap_used)]

pub mod helpers;

mod archive;
mod azure;
mod cli;
mod differential;
mod encryption;
mod faults;
mod format;
mod integrity;
mod live;
mod manager;
mod nightly;
mod nodes;
mod profiles;
mod remote;
mod resume;
mod roundtrip;
mod s3;
mod serve;
pub mod servers;
