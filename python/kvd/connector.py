"""``KvdConnector``: vLLM's KV connector (v1 API) backed by kvd.

Enable it with::

    --kv-transfer-config '{"kv_connector": "KvdConnector",
                           "kv_connector_module_path": "kvd.connector",
                           "kv_role": "kv_both",
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"socket": "/run/kvd/kvd.sock"}}'

How it works
------------
*Scheduler role* (EngineCore): for each new request it derives one 32-byte key per full block
of the prompt (see "Keys"), asks kvd for the longest stored prefix beyond what vLLM already
holds, and reports those tokens as external hits (block-aligned, always leaving one token to
compute). Each step it tells the workers which blocks to load (hits) and which newly completed
blocks to save, with their keys.

*Worker role* (one per TP rank): ``register_kv_caches`` learns where each layer's pages live;
``start_load_kv`` copies hit blocks from kvd's shared arena into the engine's pages (checksum
verified first, so a damaged block is reported through ``get_block_ids_with_load_errors`` and
recomputed, never used); ``wait_for_save`` copies completed blocks into arena slots and commits
them. A kvd block is the concatenation, layer by layer, of the engine's page for that block.
Loads and saves are synchronous (they finish within the step); copies run in Rust with the GIL
released, one copy per page.

Keys
----
``hash`` in the extra config picks the key chain:
- ``"kvd"``: kvd's canonical chain (BLAKE3 over parent key, u32 token ids; kvd-proto), the same
  in every process and every vLLM version;
- ``"vllm"``: vLLM's own ``request.block_hashes`` (for llm-d routers that score by them); only
  reproducible across processes with a cryptographic algorithm (``sha256``/``sha256_cbor``);
- ``"auto"`` (default): ``"vllm"`` when ``prefix_caching_hash_algo`` is sha256/sha256_cbor and
  its hashes cover exactly one engine block, else ``"kvd"``.
The scheme is part of the namespace's layout string, so keys of two schemes never meet.

Namespace
---------
model (``model`` extra key, default the served model), KV dtype, layout
(``<device>/<cache spec>/L<layers>x<page bytes>[/<kv layout>]|keys=<scheme>``), block size, TP
rank and size, LoRA adapter, and tenant = ``tenant`` extra key plus a digest of the request's
``cache_salt``: a salted request never sees another salt's blocks, and the salt itself (a
secret) never reaches kvd. The digest is keyed (HMAC-SHA256) with the bytes of
``salt_key_file`` (extra key, or ``$KVD_SALT_KEY_FILE``; a Kubernetes Secret shared by the
engines that should share salted blocks), so nobody without the key can tell from a
namespace's id or tenant which salt it belongs to, or compute it from a guessed salt; without
a key the digest is a plain SHA-256 and the connector says so once.

Not cached: requests with multimodal inputs or prompt embeddings under the ``kvd`` scheme (their
KV depends on more than token ids), and models with several KV-cache groups (hybrid models).

If kvd is not running, vLLM keeps serving: one warning, no hits, nothing saved; the connector
reconnects by itself (every ``retry_s`` seconds, default 5).

Extra config keys: ``socket`` (default ``$KVD_SOCKET`` or /run/kvd/kvd.sock), ``model``,
``tenant``, ``hash`` (auto|kvd|vllm), ``verify_checksums`` (default true), ``load`` and
``save`` (default true), ``retry_s``, ``timeout_s`` (longest wait for kvd, default 5; a
daemon that stops answering is treated as down), ``copy_path``: ``direct`` (CPU tensors: pages
copied straight between the KV cache and kvd's arena), ``staging`` (through a host buffer),
``daemon`` (the KV buffers are shared with kvd once — CUDA IPC handles, or CPU tensors from
``kvd.shareable.empty`` — and kvd copies the pages itself; needs a kvd with a GPU backend,
falls back to the other paths with one warning otherwise), or ``auto`` (default: ``daemon``
for CUDA tensors when kvd can, else ``staging``; ``direct`` for CPU tensors); ``layerwise``
(default false; daemon copy path only): loads run one vLLM layer at a time on a thread, so the
forward pass starts on the first layers while kvd copies the rest (blocks pinned meanwhile).
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvd import shareable
from kvd._kvd import CORRUPT, LOADED, KvdError, KvdUnavailable, KvdUnsupported, chain_keys
from kvd._link import Link

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

# A child of vLLM's logger, so the connector's lines appear with vLLM's own.
log = logging.getLogger("vllm.kvd_connector")

#: Attachments kept per connection (kvd allows 64); one per namespace in use.
_MAX_ATTACHED = 32

#: Version of the key schemes and layout string; part of every namespace.
KEY_SCHEME_KVD = "kvd-blake3-v1"
_CRYPTO_HASHES = {"sha256", "sha256_cbor"}


@dataclass
class BlockTransfer:
    """Blocks of one request to move in one direction this step."""

    req_id: str
    tenant: str
    lora: str
    keys: list[bytes]
    block_ids: list[int]


@dataclass
class KvdConnectorMetadata(KVConnectorMetadata):
    """What the scheduler asks the workers to do in one step (pickled to worker processes)."""

    loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)


@dataclass
class Geometry:
    """The shape of one engine block, as both roles derive it from the engine config."""

    model: str
    dtype: str
    layout: str
    block_tokens: int
    tp_rank: int
    tp_size: int
    layer_names: list[str]
    page_bytes: int | None
    cacheable: bool
    why_not: str = ""


def _dtype_name(d: Any) -> str:
    return str(d).removeprefix("torch.")


def _geometry(vllm_config: VllmConfig, kv_cache_config: Any, model: str, scheme: str) -> Geometry:
    cache = vllm_config.cache_config
    block_tokens = int(cache.block_size)
    parallel = vllm_config.parallel_config
    tp_size = int(getattr(parallel, "tensor_parallel_size", 1) or 1)
    device = str(getattr(getattr(vllm_config, "device_config", None), "device_type", "cpu"))
    layer_names: list[str] = []
    page_bytes: int | None = None
    spec_name = "attention"
    dtype = str(getattr(cache, "cache_dtype", "auto"))
    cacheable, why_not = True, ""
    kv_layout = ""
    if kv_cache_config is not None:
        groups = list(getattr(kv_cache_config, "kv_cache_groups", []))
        if len(groups) != 1:
            cacheable, why_not = False, f"{len(groups)} KV-cache groups (hybrid model)"
        if groups:
            spec = groups[0].kv_cache_spec
            layer_names = list(groups[0].layer_names)
            page_bytes = int(spec.page_size_bytes)
            spec_name = type(spec).__name__
            dtype = _dtype_name(getattr(spec, "dtype", dtype))
            if getattr(spec, "block_size", block_tokens) != block_tokens:
                block_tokens = int(spec.block_size)
        kv_layout = getattr(kv_cache_config, "kv_cache_layout", None) or ""
    if dtype == "auto":
        dtype = _dtype_name(vllm_config.model_config.dtype)
    layout = f"{device}/{spec_name}/L{len(layer_names) or '?'}x{page_bytes or '?'}"
    if kv_layout:
        layout += f"/{kv_layout}"
    layout += f"|keys={scheme}"
    return Geometry(
        model=model,
        dtype=dtype,
        layout=layout,
        block_tokens=block_tokens,
        tp_rank=0,
        tp_size=tp_size,
        layer_names=layer_names,
        page_bytes=page_bytes,
        cacheable=cacheable,
        why_not=why_not,
    )


def _key_scheme(vllm_config: VllmConfig, kv_cache_config: Any, wanted: str) -> str:
    algo = str(getattr(vllm_config.cache_config, "prefix_caching_hash_algo", "") or "")
    hash_block = getattr(kv_cache_config, "hash_block_size", None) if kv_cache_config else None
    usable = algo in _CRYPTO_HASHES and hash_block in (None, vllm_config.cache_config.block_size)
    if wanted == "kvd":
        return KEY_SCHEME_KVD
    if wanted == "vllm":
        if not usable:
            raise ValueError(
                f"kvd: hash='vllm' needs prefix_caching_hash_algo sha256 or sha256_cbor with one "
                f"hash per block (got {algo!r}); use hash='kvd'"
            )
        return f"vllm-{algo}"
    if wanted != "auto":
        raise ValueError(f"kvd: hash must be auto, kvd or vllm, not {wanted!r}")
    return f"vllm-{algo}" if usable else KEY_SCHEME_KVD


@dataclass
class _ReqState:
    """Scheduler-side bookkeeping of one live request."""

    request: Any
    tenant: str
    lora: str
    keys: list[bytes] = field(default_factory=list)
    local_tokens: int = 0
    load: tuple[list[bytes], int] | None = None
    block_ids: list[int] = field(default_factory=list)
    saved_blocks: int = 0


class KvdConnector(KVConnectorBase_V1):
    """vLLM KV connector that keeps KV blocks in kvd (see the module docstring)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: Any = None,
    ) -> None:
        params = inspect.signature(KVConnectorBase_V1.__init__).parameters
        if "kv_cache_config" in params:
            super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        else:
            super().__init__(vllm_config=vllm_config, role=role)
        try:
            from vllm.v1.metrics.cache_hit_source import CacheHitSource

            self._cache_hit_source = CacheHitSource.HOST
        except ImportError:
            pass
        tc = vllm_config.kv_transfer_config
        extra: dict[str, Any] = dict(getattr(tc, "kv_connector_extra_config", None) or {})
        self._socket = str(
            extra.get("socket") or os.environ.get("KVD_SOCKET") or "/run/kvd/kvd.sock"
        )
        self._tenant = str(extra.get("tenant", ""))
        self._salt_key = _salt_key(extra.get("salt_key_file") or os.environ.get("KVD_SALT_KEY_FILE"))
        self._warned_unkeyed = False
        self._verify = _flag(extra, "verify_checksums", True)
        self._do_load = _flag(extra, "load", True)
        self._do_save = _flag(extra, "save", True)
        self._copy_path = str(extra.get("copy_path", "auto"))
        self._layerwise = _flag(extra, "layerwise", False)
        if self._copy_path not in ("auto", "direct", "staging", "daemon"):
            raise ValueError(
                f"kvd: copy_path must be auto, direct, staging or daemon, not {self._copy_path!r}"
            )
        model = str(
            extra.get("model")
            or getattr(vllm_config.model_config, "served_model_name", None)
            or vllm_config.model_config.model
        )
        if isinstance(getattr(vllm_config.model_config, "served_model_name", None), list):
            model = str(extra.get("model") or vllm_config.model_config.served_model_name[0])
        self._scheme = _key_scheme(vllm_config, kv_cache_config, str(extra.get("hash", "auto")))
        self._geo = _geometry(vllm_config, kv_cache_config, model, self._scheme)
        self._block = self._geo.block_tokens
        if getattr(tc, "kv_load_failure_policy", "recompute") != "recompute":
            log.warning(
                "kvd: kv_load_failure_policy is %r; set it to \"recompute\" so a block kvd "
                "lost or found damaged is recomputed instead of failing the request",
                getattr(tc, "kv_load_failure_policy", None),
            )
        if not self._geo.cacheable:
            log.warning("kvd: caching disabled for this model: %s", self._geo.why_not)
        role_name = "scheduler" if role == KVConnectorRole.SCHEDULER else "worker"
        self._link = Link(
            self._socket,
            name=f"vllm-{role_name}-{os.getpid()}",
            retry_s=float(extra.get("retry_s", 5.0)),
            timeout_s=float(extra.get("timeout_s", 5.0)),
            log=log,
        )
        # Scheduler state.
        self._reqs: dict[str, _ReqState] = {}
        # Worker state.
        self._layers: list[Any] = []
        self._staging: list[torch.Tensor] = []
        # Daemon-driven copies: the shares and layer buffers to attach, and the attachment of
        # each (client, namespace) made so far.
        self._shared: tuple[list[tuple[Any, ...]], list[tuple[int, int, int, int, int]]] | None = None
        self._attached: dict[bytes, Any] = {}
        self._attached_client: Any = None
        # Layer-wise loads: each vLLM layer's pages (first, count) and the loads in flight.
        self._layer_pages: dict[str, tuple[int, int]] = {}
        self._layer_loads: list[_LayerLoad] = []
        self._load_errors: set[int] = set()
        self._block_bytes = 0
        self._stats = {"loaded_blocks": 0, "failed_blocks": 0, "saved_blocks": 0}
        if role != KVConnectorRole.SCHEDULER:
            try:
                from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

                self._geo.tp_rank = int(get_tensor_model_parallel_rank())
            except (ImportError, AssertionError, RuntimeError):
                self._geo.tp_rank = 0
        if role == KVConnectorRole.SCHEDULER and self._geo.cacheable:
            # Connect and map the default namespace now, so the first request does not pay
            # for it (and a missing kvd is reported at start-up).
            self._namespace(self._tenant)
        log.info(
            "kvd connector (%s): socket %s, namespace model=%s dtype=%s layout=%s block=%d tp=%d/%d",
            role_name,
            self._socket,
            self._geo.model,
            self._geo.dtype,
            self._geo.layout,
            self._block,
            self._geo.tp_rank,
            self._geo.tp_size,
        )

    # ------------------------------------------------------------------ shared

    def _namespace(self, tenant: str, lora: str = ""):
        g = self._geo
        return self._link.namespace(
            model=g.model,
            dtype=g.dtype,
            layout=g.layout,
            block_tokens=g.block_tokens,
            tp_rank=g.tp_rank,
            tp_size=g.tp_size,
            lora=lora,
            tenant=tenant,
        )

    def _tenant_of(self, request: Any) -> str:
        salt = getattr(request, "cache_salt", None)
        if not salt:
            return self._tenant
        # The salt is a secret (vLLM's cache isolation): only its keyed digest is named in kvd.
        if self._salt_key is None:
            if not self._warned_unkeyed:
                self._warned_unkeyed = True
                log.warning(
                    "kvd: cache salts are digested without a key; set salt_key_file (a Secret "
                    "shared by the engines) so namespace tenants reveal nothing of a salt"
                )
            digest = hashlib.sha256(str(salt).encode()).hexdigest()[:32]
        else:
            digest = hmac.new(self._salt_key, str(salt).encode(), hashlib.sha256).hexdigest()[:32]
        return f"{self._tenant}|salt={digest}"

    def _lora_of(self, request: Any) -> str:
        lr = getattr(request, "lora_request", None)
        return "" if lr is None else str(getattr(lr, "lora_name", lr))

    # --------------------------------------------------------------- scheduler

    def _cacheable(self, request: Any) -> bool:
        if not self._geo.cacheable:
            return False
        if self._scheme == KEY_SCHEME_KVD and (
            getattr(request, "mm_features", None) or getattr(request, "prompt_embeds", None) is not None
        ):
            return False
        return True

    def _keys(self, st: _ReqState, blocks: int) -> list[bytes]:
        """Keys of the request's first ``blocks`` full blocks (extending the memo as needed)."""
        if len(st.keys) < blocks:
            if self._scheme == KEY_SCHEME_KVD:
                # Only the tokens of blocks not keyed yet: decode steps extend the chain.
                start = len(st.keys) * self._block
                tokens = list(st.request.all_token_ids[start : blocks * self._block])
                parent = st.keys[-1] if st.keys else None
                st.keys.extend(chain_keys(tokens, self._block, parent))
            else:
                hashes = st.request.block_hashes
                st.keys = [bytes(h) if len(h) == 32 else _wide(bytes(h)) for h in hashes]
        return st.keys[:blocks]

    def _state(self, request: Any) -> _ReqState:
        st = self._reqs.get(request.request_id)
        if st is None or st.request is not request:
            st = _ReqState(request=request, tenant=self._tenant_of(request), lora=self._lora_of(request))
            self._reqs[request.request_id] = st
        return st

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if not self._do_load or not self._cacheable(request):
            return 0, False
        st = self._state(request)
        st.local_tokens = num_computed_tokens
        # Always leave at least one token for the engine to compute.
        max_blocks = max(0, (request.num_tokens - 1) // self._block)
        first = num_computed_tokens // self._block
        if max_blocks <= first:
            return 0, False
        keys = self._keys(st, max_blocks)
        if len(keys) <= first:
            return 0, False
        got = self._namespace(st.tenant, st.lora)
        if got is None:
            return 0, False
        client, ns = got
        try:
            prefix, _tiers = client.lookup(ns, keys[first:])
        except KvdError as e:
            self._link.failed(e)
            return 0, False
        return prefix * self._block, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        st = self._state(request)
        if num_external_tokens <= 0:
            st.load = None
            return
        first = st.local_tokens // self._block
        n = num_external_tokens // self._block
        keys = self._keys(st, first + n)[first:]
        if len(keys) != n:
            # Cannot happen while the keys of the lookup are memoised; refuse rather than
            # load the wrong blocks.
            raise RuntimeError(f"kvd: {n} external blocks but {len(keys)} keys")
        st.load = (keys, first)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KvdConnectorMetadata()
        spec = getattr(scheduler_output, "scheduled_spec_decode_tokens", {}) or {}
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            st.saved_blocks = new.num_computed_tokens // self._block
            self._plan(meta, new.req_id, st, new.num_computed_tokens, scheduler_output, spec)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set()) or set()
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:
                st.block_ids = list(new_ids[0]) if new_ids else []
                st.saved_blocks = cached.num_computed_tokens[i] // self._block
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            self._plan(meta, req_id, st, cached.num_computed_tokens[i], scheduler_output, spec)
        return meta

    def _plan(
        self,
        meta: KvdConnectorMetadata,
        req_id: str,
        st: _ReqState,
        computed: int,
        out: SchedulerOutput,
        spec: dict[str, list[int]],
    ) -> None:
        if st.load is not None:
            keys, first = st.load
            meta.loads.append(
                BlockTransfer(
                    req_id, st.tenant, st.lora, keys, st.block_ids[first : first + len(keys)]
                )
            )
            st.load = None
        if not self._do_save or not self._cacheable(st.request):
            return
        done = computed + out.num_scheduled_tokens.get(req_id, 0) - len(spec.get(req_id, ()))
        full = min(done, st.request.num_tokens) // self._block
        # A request rolled back (a failed load is recomputed from its first bad block) saves
        # again from where it now stands.
        start = min(st.saved_blocks, computed // self._block)
        full = min(full, len(st.block_ids))
        if full <= start:
            return
        keys = self._keys(st, full)
        full = min(full, len(keys))  # vLLM's hashes may lag the tokens by a step
        if full <= start:
            return
        meta.saves.append(
            BlockTransfer(req_id, st.tenant, st.lora, keys[start:full], st.block_ids[start:full])
        )
        self._send_lineage(st, keys, start, full)
        st.saved_blocks = full

    def _send_lineage(self, st: _ReqState, keys: list[bytes], start: int, full: int) -> None:
        """Tells kvd the tokens and parent of the blocks about to be saved, before the workers
        store them, when kvd publishes KV events (a router drops an event without tokens)."""
        got = self._namespace(st.tenant, st.lora)
        if got is None:
            return
        client, ns = got
        if not ns.events:
            return
        b = self._block
        tokens = list(st.request.all_token_ids[start * b : full * b])
        parent = keys[start - 1] if start > 0 else None
        try:
            client.lineage(ns, parent, keys[start:full], tokens)
        except KvdError as e:
            # Events are advisory: the blocks are still saved, their events skipped.
            self._link.failed(e)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        return False, None

    # ------------------------------------------------------------------ worker

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = [n for n in self._geo.layer_names if n in kv_caches] or list(kv_caches)
        num_blocks = getattr(self._kv_cache_config, "num_blocks", None)
        layers: list[torch.Tensor] = []
        self._layer_pages = {}
        for name in names:
            t = kv_caches[name]
            nb = num_blocks or t.shape[0]
            self._layer_pages[name] = (len(layers), 1 if t.shape[0] == nb else 2)
            if t.shape[0] == nb:
                layers.append(t)
            elif t.shape[0] == 2 and t.shape[1] == nb:
                layers.extend([t[0], t[1]])
            else:
                self._disable(f"layer {name} has shape {tuple(t.shape)}, not [num_blocks, …]")
                return
        try:
            pages = [_as_pages(t) for t in layers]
        except (RuntimeError, ValueError) as e:
            self._disable(f"KV pages are not contiguous per block ({e})")
            return
        page_total = sum(p.shape[1] for p in pages)
        self._block_bytes = page_total
        expect = self._geo.page_bytes
        if expect is not None and expect * len(names) != page_total:
            self._disable(
                f"pages hold {page_total} bytes per block but the cache spec says "
                f"{expect} x {len(names)} layers"
            )
            return
        on_cpu = all(p.device.type == "cpu" for p in pages)
        direct = on_cpu and self._copy_path != "staging"
        if direct:
            self._layers = [p.numpy() for p in pages]
        else:
            self._layers = []
            self._staging = pages
        self._shared = None
        if self._copy_path == "daemon" or (self._copy_path == "auto" and not on_cpu):
            try:
                self._shared = shareable.share(pages)
            except (ValueError, RuntimeError) as e:  # RuntimeError: torch cannot share (IPC)
                level = logging.WARNING if self._copy_path == "daemon" else logging.INFO
                log.log(level, "kvd: KV buffers cannot be shared with kvd (%s); the connector copies", e)
        got = self._namespace(self._tenant)  # connect and map now, not on the first request
        if self._shared is not None and got is not None:
            self._attachment(*got)
        log.info(
            "kvd: %d layers registered, %d pages of %d bytes per block (%s copy)",
            len(names),
            len(pages),
            page_total,
            "daemon" if self._shared is not None else "direct" if direct else "staged",
        )

    def _attachment(self, client: Any, ns: Any) -> Any:
        """The daemon-side mapping of this worker's KV buffers for ``ns`` (attached on first
        use per client and namespace); None when kvd cannot copy for us — then the connector
        copies, and after a refusal for good."""
        if self._shared is None:
            return None
        if client is not self._attached_client:
            # A new connection: the old one's attachments went with it.
            self._attached, self._attached_client = {}, client
        key = bytes(ns.id)
        att = self._attached.get(key)
        if att is not None:
            return att
        shares, layers = self._shared
        try:
            if len(self._attached) >= _MAX_ATTACHED:
                # kvd holds at most 64 per connection: let go of the oldest namespace's.
                oldest = next(iter(self._attached))
                client.gpu_detach(self._attached.pop(oldest))
            att = client.gpu_attach(ns, shares, layers)
        except KvdUnsupported as e:
            level = logging.WARNING if self._copy_path == "daemon" else logging.INFO
            log.log(level, "kvd: daemon-driven copies unavailable (%s); the connector copies instead", e)
            self._shared = None
            return None
        except KvdUnavailable:
            return None  # the link reports and retries; the connector copies meanwhile
        except KvdError as e:
            # kvd refused these buffers (e.g. it cannot map them): no use asking every step.
            log.warning("kvd: kvd refused the KV buffers (%s); the connector copies instead", e)
            self._shared = None
            return None
        self._attached[key] = att
        log.info("kvd: KV buffers attached (%s); kvd copies the pages", att)
        return att

    def _sync_device(self) -> None:
        """Waits for the engine's queued GPU work, so kvd reads pages the forward pass wrote."""
        if self._staging and self._staging[0].device.type == "cuda":
            torch.cuda.current_stream(self._staging[0].device).synchronize()

    def _disable(self, why: str) -> None:
        log.warning("kvd: connector disabled on this worker: %s", why)
        self._layers, self._staging, self._shared = [], [], None

    def _active(self) -> bool:
        return bool(self._layers or self._staging)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvdConnectorMetadata):
            return
        for t in meta.loads:
            if self._layerwise and self._start_layerwise(t):
                continue
            t0 = time.perf_counter()
            ok = self._load(t) if self._active() else [False] * len(t.keys)
            self._account(t, ok, time.perf_counter() - t0)

    def _account(self, t: BlockTransfer, ok: list[bool], dt: float) -> None:
        """Counts and logs one request's load; failed blocks go to vLLM for recomputation."""
        failed = [b for b, good in zip(t.block_ids, ok) if not good]
        loaded = len(t.keys) - len(failed)
        self._stats["loaded_blocks"] += loaded
        if loaded:
            mib = loaded * self._block_bytes / 2**20
            log.info(
                "kvd: loaded %d blocks (%.1f MiB) for request %s in %.2f ms (%.2f GB/s)",
                loaded,
                mib,
                t.req_id,
                dt * 1e3,
                mib * 2**20 / max(dt, 1e-9) / 1e9,
            )
        if failed:
            self._stats["failed_blocks"] += len(failed)
            self._load_errors.update(failed)
            log.warning(
                "kvd: %d of %d blocks of request %s could not be loaded; vLLM recomputes them",
                len(failed),
                len(t.keys),
                t.req_id,
            )

    def _start_layerwise(self, t: BlockTransfer) -> bool:
        """Starts loading ``t`` layer by layer on a thread (daemon copy path only), so the
        forward pass runs its first layers while kvd copies the next; False when that path is
        not available for it (then it loads in one go)."""
        got = self._namespace(t.tenant, t.lora)
        if got is None or not self._layer_pages:
            return False
        client, ns = got
        att = self._attachment(client, ns)
        if att is None:
            return False
        groups = sorted(self._layer_pages.values())
        load = _LayerLoad(self, t, client, ns, att, groups)
        self._layer_loads.append(load)
        load.thread.start()
        return True

    def _finish_layer_loads(self) -> None:
        """Waits for the layer-wise loads of this step and accounts for them."""
        loads, self._layer_loads = self._layer_loads, []
        for load in loads:
            load.thread.join(timeout=self._link.timeout_s * (len(load.groups) + 1))
            if load.thread.is_alive():
                log.warning("kvd: layer-wise load of request %s did not finish in time", load.t.req_id)
                load.ok = [False] * len(load.ok)
            self._account(load.t, load.ok, load.seconds)

    def _load(self, t: BlockTransfer) -> list[bool]:
        got = self._namespace(t.tenant, t.lora)
        if got is None:
            return [False] * len(t.keys)
        client, ns = got
        try:
            att = self._attachment(client, ns)
            if att is not None:
                codes = client.gpu_load(att, t.keys, t.block_ids, verify=self._verify)
            elif self._layers:
                codes = client.load_blocks(ns, t.keys, t.block_ids, self._layers, verify=self._verify)
            else:
                codes = self._load_staged(client, ns, t)
            corrupt = [k for k, c in zip(t.keys, codes) if c == CORRUPT]
            if corrupt:
                # Drop damaged copies so the recomputed blocks can be stored in their place.
                client.delete(ns, corrupt)
                log.warning("kvd: %d blocks failed their checksum; deleted from kvd", len(corrupt))
        except KvdError as e:
            self._link.failed(e)
            log.warning("kvd: load failed: %s", e)
            return [False] * len(t.keys)
        return [c == LOADED for c in codes]

    def _load_staged(self, client: Any, ns: Any, t: BlockTransfer) -> list[int]:
        total = sum(p.shape[1] for p in self._staging)
        n = len(t.keys)
        buf = torch.empty((n, total), dtype=torch.uint8, pin_memory=_pinnable(self._staging))
        codes = client.load_blocks(ns, t.keys, list(range(n)), [buf.numpy()], verify=self._verify)
        good = [i for i, c in enumerate(codes) if c == LOADED]
        if good:
            rows = torch.tensor(good, dtype=torch.long)
            ids = torch.tensor([t.block_ids[i] for i in good], dtype=torch.long)
            off = 0
            for pages in self._staging:
                width = pages.shape[1]
                src = buf[rows, off : off + width].to(pages.device, non_blocking=False)
                pages.index_copy_(0, ids.to(pages.device), src)
                off += width
        return codes

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Without layer-wise loads everything was loaded in start_load_kv.
        span = self._layer_pages.get(layer_name)
        if span is None or not self._layer_loads:
            return
        for load in self._layer_loads:
            if not load.wait_for(span):
                # Not there in time: its blocks are reported failed and recomputed.
                load.ok = [False] * len(load.ok)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        # A kvd block holds every layer's page, so blocks are saved once the forward pass has
        # written all layers, in wait_for_save.
        return

    def wait_for_save(self) -> None:
        self._finish_layer_loads()
        if not self.has_connector_metadata() or not self._active():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvdConnectorMetadata):
            return
        for t in meta.saves:
            got = self._namespace(t.tenant, t.lora)
            if got is None:
                return
            client, ns = got
            try:
                att = self._attachment(client, ns)
                if att is not None:
                    self._sync_device()
                    stored = client.gpu_save(att, t.keys, t.block_ids)
                elif self._layers:
                    stored = client.save_blocks(ns, t.keys, t.block_ids, self._layers)
                else:
                    stored = self._save_staged(client, ns, t)
            except KvdError as e:
                self._link.failed(e)
                log.warning("kvd: save of %d blocks failed: %s", len(t.keys), e)
                continue
            self._stats["saved_blocks"] += sum(stored)

    def _save_staged(self, client: Any, ns: Any, t: BlockTransfer) -> list[bool]:
        ids = torch.tensor(t.block_ids, dtype=torch.long)
        parts = [pages.index_select(0, ids.to(pages.device)).cpu() for pages in self._staging]
        buf = torch.cat(parts, dim=1).contiguous()
        return client.save_blocks(ns, t.keys, list(range(len(t.keys))), [buf.numpy()])

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._finish_layer_loads()
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self._stats["loaded_blocks"] or self._stats["saved_blocks"] or self._stats["failed_blocks"]:
            log.info("kvd connector totals: %s", self._stats)


class _LayerLoad:
    """One request's blocks loaded by kvd one vLLM layer at a time, on a thread.

    The blocks are pinned in kvd first, so none is evicted between its first and last layer;
    the checksum is checked with the first layer (it covers the whole block). A block that
    fails at any layer is reported failed, and vLLM recomputes it.
    """

    def __init__(
        self,
        owner: KvdConnector,
        t: BlockTransfer,
        client: Any,
        ns: Any,
        att: Any,
        groups: list[tuple[int, int]],
    ) -> None:
        self.t, self.groups = t, groups
        self._owner, self._client, self._ns, self._att = owner, client, ns, att
        self.ok = [True] * len(t.keys)
        self.seconds = 0.0
        self._done = {g: threading.Event() for g in groups}
        self.thread = threading.Thread(target=self._run, name="kvd-layer-load", daemon=True)

    def wait_for(self, group: tuple[int, int]) -> bool:
        """Waits until ``group``'s pages are loaded (or failed); False when it took too long."""
        event = self._done.get(group)
        return event is None or event.wait(timeout=self._owner._link.timeout_s)

    def _run(self) -> None:
        t0 = time.perf_counter()
        client, ns, keys = self._client, self._ns, self.t.keys
        pinned = False
        try:
            client.pin(ns, keys)
            pinned = True
            corrupt: list[bytes] = []
            for g, (first, count) in enumerate(self.groups):
                live = [i for i, good in enumerate(self.ok) if good]
                if live:
                    codes = client.gpu_load(
                        self._att,
                        [keys[i] for i in live],
                        [self.t.block_ids[i] for i in live],
                        first_layer=first,
                        layers=count,
                        verify=self._owner._verify and g == 0,
                    )
                    for i, c in zip(live, codes):
                        if c != LOADED:
                            self.ok[i] = False
                            if c == CORRUPT:
                                corrupt.append(keys[i])
                self._done[(first, count)].set()
            if corrupt:
                client.delete(ns, corrupt)
                log.warning("kvd: %d blocks failed their checksum; deleted from kvd", len(corrupt))
        except KvdError as e:
            self._owner._link.failed(e)
            log.warning("kvd: layer-wise load failed: %s", e)
            self.ok = [False] * len(self.ok)
        finally:
            for event in self._done.values():
                event.set()
            if pinned:
                try:
                    client.unpin(ns, keys)
                except KvdError:
                    pass
            self.seconds = time.perf_counter() - t0


def _salt_key(path: str | None) -> bytes | None:
    """The key of salt digests: the bytes of ``path`` (surrounding whitespace stripped)."""
    if not path:
        return None
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise ValueError(f"kvd: cannot read salt_key_file {path}: {e}") from e
    if len(key) < 16:
        raise ValueError(f"kvd: salt_key_file {path} holds {len(key)} bytes; use at least 16")
    return key


def _flag(extra: dict[str, Any], name: str, default: bool) -> bool:
    """A boolean extra-config key; accepts JSON booleans and the usual strings."""
    v = extra.get(name, default)
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"kvd: {name} must be true or false, not {v!r}")


def _wide(h: bytes) -> bytes:
    """A 32-byte key from a shorter vLLM block hash (xxhash), via personalised BLAKE2b."""
    return hashlib.blake2b(h, digest_size=32, person=b"kvd-vllm-hash").digest()


def _as_pages(t: torch.Tensor) -> torch.Tensor:
    """``t`` (``[num_blocks, …]``) as a ``[num_blocks, page bytes]`` uint8 view of the same
    memory (block stride kept); raises when a block's page is not contiguous (no silent copy)."""
    inner = t[0] if t.shape[0] > 0 else t
    if not inner.is_contiguous():
        raise ValueError(f"strides {tuple(t.stride())} for shape {tuple(t.shape)}")
    u8 = t.view(torch.uint8)
    page, stride = u8[0].numel(), u8.stride(0)
    if t.shape[0] > 1 and stride < page:
        raise ValueError(f"block stride {stride} smaller than page {page}")
    return torch.as_strided(u8, (t.shape[0], page), (stride, 1))


def _pinnable(staging: list[torch.Tensor]) -> bool:
    return any(p.device.type == "cuda" for p in staging) and torch.cuda.is_available()
