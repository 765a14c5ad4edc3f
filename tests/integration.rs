//! All integration tests build into this one binary; shared helpers live in
//! `it/helpers.rs`. CLI tests run the real `cairn` binary.

mod it;
