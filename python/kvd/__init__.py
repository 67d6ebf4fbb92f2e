"""kvd: Python client of the kvd KV-cache daemon, and its vLLM connector.

The client (``kvd.Client``) speaks to a running ``kvd`` over its Unix socket (control) and a
shared-memory ring (data); block bytes are copied straight between your buffers and kvd's
shared arena, with the GIL released. ``kvd.connector.KvdConnector`` plugs kvd into vLLM.

Keys are 32 bytes. ``chain_keys`` derives kvd's canonical key chain from token ids (BLAKE3,
documented in kvd-proto); any other stable 32-byte content hash works as well.
"""

from kvd._kvd import (
    BAD_SIZE,
    CORRUPT,
    DEFAULT_SOCKET,
    LOADED,
    MISSING,
    Client,
    KvdError,
    KvdUnavailable,
    KvdUnsupported,
    GpuAttachment,
    Namespace,
    chain_key,
    chain_keys,
    checksum,
    namespace_id,
)

__all__ = [
    "BAD_SIZE",
    "CORRUPT",
    "DEFAULT_SOCKET",
    "LOADED",
    "MISSING",
    "Client",
    "KvdError",
    "KvdUnavailable",
    "KvdUnsupported",
    "GpuAttachment",
    "Namespace",
    "chain_key",
    "chain_keys",
    "checksum",
    "namespace_id",
]
