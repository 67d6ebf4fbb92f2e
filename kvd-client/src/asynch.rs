//! The tokio face of the client.
//!
//! Control calls and ring waits are short and blocking; each runs on tokio's blocking pool so
//! that an async caller never stalls a runtime worker. Data returns as owned `Vec<u8>` (an
//! in-place lease cannot cross an `.await` safely); use the blocking [`Client`] for zero-copy.

use std::path::PathBuf;
use std::sync::Arc;

use crate::{
    BlockKey, Client, ClientError, ClusterLookup, Lookup, Namespace, NamespaceDesc, NamespaceId,
    Options, PutOutcome, Result, StatsReport,
};

/// Async kvd client (clone freely; clones share one connection).
#[derive(Debug, Clone)]
pub struct AsyncClient {
    inner: Arc<Client>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ClientError::Unexpected(format!("client task failed: {e}")))?
}

impl AsyncClient {
    /// Connects.
    pub async fn connect(path: impl Into<PathBuf>, opts: Options) -> Result<Self> {
        let path = path.into();
        let c = blocking(move || Client::connect_with(path, opts)).await?;
        Ok(Self { inner: Arc::new(c) })
    }

    /// The blocking client underneath.
    pub fn blocking(&self) -> &Arc<Client> {
        &self.inner
    }

    /// See [`Client::open_namespace`].
    pub async fn open_namespace(&self, desc: NamespaceDesc) -> Result<Namespace> {
        let c = self.inner.clone();
        blocking(move || c.open_namespace(&desc)).await
    }

    /// See [`Client::lookup`].
    pub async fn lookup(&self, ns: NamespaceId, keys: Vec<BlockKey>) -> Result<Lookup> {
        let c = self.inner.clone();
        blocking(move || c.lookup(&ns, &keys)).await
    }

    /// See [`Client::cluster_lookup`].
    pub async fn cluster_lookup(
        &self,
        ns: NamespaceId,
        keys: Vec<BlockKey>,
    ) -> Result<ClusterLookup> {
        let c = self.inner.clone();
        blocking(move || c.cluster_lookup(&ns, &keys)).await
    }

    /// See [`Client::put`].
    pub async fn put(&self, ns: Namespace, key: BlockKey, data: Vec<u8>) -> Result<PutOutcome> {
        let c = self.inner.clone();
        blocking(move || c.put(&ns, &key, &data)).await
    }

    /// Reads a block into an owned buffer.
    pub async fn get(&self, ns: Namespace, key: BlockKey) -> Result<Option<Vec<u8>>> {
        let c = self.inner.clone();
        blocking(move || Ok(c.get(&ns, &key)?.map(|l| l.to_vec()))).await
    }

    /// See [`Client::pin`].
    pub async fn pin(&self, ns: NamespaceId, keys: Vec<BlockKey>) -> Result<u32> {
        let c = self.inner.clone();
        blocking(move || c.pin(&ns, &keys)).await
    }

    /// See [`Client::unpin`].
    pub async fn unpin(&self, ns: NamespaceId, keys: Vec<BlockKey>) -> Result<u32> {
        let c = self.inner.clone();
        blocking(move || c.unpin(&ns, &keys)).await
    }

    /// See [`Client::delete`].
    pub async fn delete(&self, ns: NamespaceId, keys: Vec<BlockKey>) -> Result<u32> {
        let c = self.inner.clone();
        blocking(move || c.delete(&ns, &keys)).await
    }

    /// See [`Client::stats`].
    pub async fn stats(&self) -> Result<StatsReport> {
        let c = self.inner.clone();
        blocking(move || c.stats()).await
    }
}
