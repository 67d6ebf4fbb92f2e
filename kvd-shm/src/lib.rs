//! Shared-memory mechanics shared by the kvd daemon and its clients.
//!
//! `kvd-proto` says where things are in a ring or arena; this crate maps the memory and moves
//! descriptors through it. [`map`] creates sealed memfds and maps them (sealing stops a client
//! from shrinking a mapping under the daemon, which would fault it with SIGBUS), [`futex`] is the
//! cross-process doorbell, and [`ring`] is the single-producer single-consumer queue pair with
//! a client end and a daemon end. The daemon end treats every counter and entry written by the
//! client as untrusted and reports impossible values as [`ring::RingError::Corrupt`].

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod copy;
pub mod futex;
pub mod map;
pub mod ring;

pub use copy::copy_bytes;
pub use map::{MapError, Mapping};
pub use ring::{ClientRing, DaemonRing, RingError};
