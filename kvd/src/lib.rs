//! kvd daemon library: everything the `kvd` binary runs, split so tests can drive it in-process.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod alloc;
pub mod store;
