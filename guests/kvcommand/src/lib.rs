//! The commands the key/value guests (`kvstore`, `diskstorage`) accept, and that their
//! clients (`kv`, `loadgen`) send: the original text lines `get-K`, `set-K-V`, `delete-K`
//! (with the text protocol's answer lines, which the host's text port writes) and a small
//! protobuf message; the digest both guests keep of their state; and the walk over their
//! settings. One crate, so guests and clients cannot drift apart.
//! Plain Rust, built natively for clients and for wasm32 inside the guests.

pub mod command;
pub mod digest;
pub mod proto;
pub mod seal;
pub mod settings;
#[cfg(feature = "snapshot-kit")]
pub mod snapshot_kit;
pub mod text;
