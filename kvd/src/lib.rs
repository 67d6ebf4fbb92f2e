//! kvd daemon library: everything the `kvd` binary runs, split so tests can drive it in-process.
//!
//! Logical layer (no IO): [`alloc`] and [`store`]. Physical layer: [`arena`] (shared memory),
//! [`ring_service`] (data plane), [`server`] (control plane). [`daemon`] ties them together and
//! [`config`] describes it all.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod alloc;
pub mod arena;
pub mod config;
pub mod daemon;
pub mod ring_service;
pub mod server;
pub mod store;
