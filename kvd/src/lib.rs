//! kvd daemon library: everything the `kvd` binary runs, split so tests can drive it in-process.
//!
//! Logical layer (no IO): [`alloc`], [`store`], [`residency`] (changes for the cluster
//! index and the events) and [`lineage`] (the tokens behind blocks, for events). Physical
//! layer: [`arena`] (shared memory), [`disk`] (the NVMe tier), [`ring_service`] (data plane),
//! [`server`] (control plane). [`demoter`] moves blocks down the tiers in the background;
//! [`index`] publishes what the node holds to the cluster index (Redis/Valkey) and
//! [`events`] as vLLM-format KV events over ZMQ ([`zmtp`]: its wire, bounded against hostile
//! peers); [`peer`] moves blocks between nodes;
//! [`metrics`] serves Prometheus metrics and health probes ([`accept`]: the bounded accept
//! loop of the TCP endpoints).
//! [`daemon`] ties them together and [`config`] describes it all.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod accept;
pub mod alloc;
pub mod arena;
pub mod config;
pub mod daemon;
pub mod demoter;
pub mod disk;
pub mod events;
pub mod gpu;
pub mod index;
pub mod lineage;
pub mod metrics;
pub mod peer;
pub mod residency;
pub mod ring_service;
pub mod s3;
pub mod server;
pub mod store;
pub mod tenancy;
pub mod zmtp;
