// kvd's kernels. kvd_copy_runs moves a batch of runs (source, destination, length) between
// device memory and pinned, device-mapped host memory in one launch; kvd_xxh3_blocks computes
// the XXH3-64 checksums of KV blocks where their pages lie, in device memory.
//
// Why a kernel: a paged KV block is one page of every layer, so a block of 32 layers is 32
// separate copies of a few KiB. Issued one by one (cuMemcpyAsync) each costs microseconds
// of driver time, far longer than its bytes take over PCIe; one launch that copies every
// run with the SMs' own loads and stores moves them at bus speed.
//
// Built without the CUDA toolkit: clang's CUDA front end with its NVVM builtins, no CUDA
// headers (scripts/gpu-kernels.sh writes kvd.ptx beside this file; kvd-gpu embeds the PTX and
// the driver compiles it for the GPU at start). Keep this file free of CUDA headers. Built with
// KVD_HOST_TEST, the checksum code is plain C++ for a host check against a reference XXH3.

typedef unsigned long long u64;

// One copy; the layout of kvd_gpu::method::Span (three little-endian u64s).
struct Run {
    u64 src;
    u64 dst;
    u64 len;
};

#ifdef KVD_HOST_TEST
#define DEVICE
#define GLOBAL
#define CONSTANT
#else
#define DEVICE __attribute__((device)) __attribute__((always_inline))
#define GLOBAL __attribute__((global))
#define CONSTANT __attribute__((constant))
#endif

// ---- Copies ------------------------------------------------------------------------------------
#ifndef KVD_HOST_TEST
// 16 bytes, moved by one vector load and one vector store.
typedef unsigned int Word __attribute__((ext_vector_type(4)));

// Copies one run with the 32 lanes of a warp: 16-byte words when source, destination and length
// allow, with four loads in flight per lane before their stores (bus latency is long, host
// memory's most of all); byte by byte otherwise.
static DEVICE void copy_run(u64 from, u64 to, u64 len, unsigned int lane) {
    const unsigned int lanes = 32;
    if (((from | to | len) & 15) == 0) {
        const Word *__restrict__ src = (const Word *)from;
        Word *__restrict__ dst = (Word *)to;
        const u64 words = len >> 4;
        u64 i = lane;
        for (; i + 3 * lanes < words; i += 4 * lanes) {
            const Word w0 = src[i];
            const Word w1 = src[i + lanes];
            const Word w2 = src[i + 2 * lanes];
            const Word w3 = src[i + 3 * lanes];
            dst[i] = w0;
            dst[i + lanes] = w1;
            dst[i + 2 * lanes] = w2;
            dst[i + 3 * lanes] = w3;
        }
        for (; i < words; i += lanes) {
            dst[i] = src[i];
        }
    } else {
        const unsigned char *__restrict__ src = (const unsigned char *)from;
        unsigned char *__restrict__ dst = (unsigned char *)to;
        for (u64 i = lane; i < len; i += lanes) {
            dst[i] = src[i];
        }
    }
}

// Warp w copies runs w, w + (warps in the grid), ...: `runs` (n of them) lies in device memory.
// A warp per run keeps thousands of small runs (a page of one layer: a few KiB) in flight at
// once; the host cuts long runs into pieces so that warps share them evenly.
extern "C" GLOBAL void kvd_copy_runs(const Run *__restrict__ runs, unsigned int n) {
    const unsigned int tid = __nvvm_read_ptx_sreg_tid_x();
    const unsigned int threads = __nvvm_read_ptx_sreg_ntid_x();
    const unsigned int warp = (__nvvm_read_ptx_sreg_ctaid_x() * threads + tid) >> 5;
    const unsigned int warps = (__nvvm_read_ptx_sreg_nctaid_x() * threads) >> 5;
    for (unsigned int r = warp; r < n; r += warps) {
        copy_run(runs[r].src, runs[r].dst, runs[r].len, tid & 31);
    }
}
#endif // KVD_HOST_TEST

// ---- Checksums -------------------------------------------------------------------------------
// XXH3-64 (seed 0, default secret): what kvd stores with every block, computed here on the
// engine's pages (device memory, read at HBM speed) instead of on the DRAM copy by CPU threads.
// Only the long-input path (more than 240 bytes) is here; kvd hashes shorter blocks on the CPU.
// XXH3 accumulates 64-byte stripes into eight lanes and scrambles the lanes after every 1 KiB;
// between scrambles the stripes' contributions simply add up, so 16 threads take one stripe
// each of a 1 KiB round and sum their contributions, and a block's rounds run in order.

// A page of a block: `len` bytes at `addr`; every page is a multiple of 64 bytes long and
// 16-byte aligned, so a stripe never crosses pages.
struct Page {
    u64 addr;
    u64 len;
};

// A block: pages [first, first + count) of the page list, `len` bytes in all (> 240).
struct HashJob {
    unsigned int first;
    unsigned int count;
    u64 len;
};

static CONSTANT unsigned char kSecret[192] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

#define PRIME32_1 0x9E3779B1ULL
#define PRIME32_2 0x85EBCA77ULL
#define PRIME32_3 0xC2B2AE3DULL
#define PRIME64_1 0x9E3779B185EBCA87ULL
#define PRIME64_2 0xC2B2AE3D27D4EB4FULL
#define PRIME64_3 0x165667B19E3779F9ULL
#define PRIME64_4 0x85EBCA77C2B2AE63ULL
#define PRIME64_5 0x27D4EB2F165667C5ULL
#define PRIME_MX1 0x165667919E3779F9ULL

// The secret's little-endian u64 at byte `at` (any alignment).
static DEVICE u64 secret64(unsigned int at) {
    u64 v = 0;
#pragma unroll
    for (int b = 7; b >= 0; b--) {
        v = (v << 8) | kSecret[at + b];
    }
    return v;
}

// Low and high halves of the 128-bit product, folded.
static DEVICE u64 mul_fold(u64 a, u64 b) {
#ifdef KVD_HOST_TEST
    const unsigned __int128 p = (unsigned __int128)a * b;
    return (u64)p ^ (u64)(p >> 64);
#else
    return (a * b) ^ __nvvm_mulhi_ull(a, b);
#endif
}

// The eight secret words a stripe is mixed with, from the secret's byte `at`. Read once per
// thread: threads of a warp reading different constant addresses at once take turns.
static DEVICE void stripe_keys(unsigned int at, u64 keys[8]) {
#pragma unroll
    for (int i = 0; i < 8; i++) {
        keys[i] = secret64(at + 8 * i);
    }
}

// What one stripe (eight little-endian words) adds to the lanes, mixed with `keys`.
static DEVICE void stripe_sum(const u64 w[8], const u64 keys[8], u64 out[8]) {
#pragma unroll
    for (int i = 0; i < 8; i++) {
        out[i] = 0;
    }
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const u64 key = w[i] ^ keys[i];
        out[i ^ 1] += w[i];
        out[i] += (key & 0xFFFFFFFFULL) * (key >> 32);
    }
}

// The end of a 1 KiB round, with the secret's words from byte 128 (`stripe_keys(128, ..)`).
static DEVICE void scramble(u64 acc[8], const u64 keys[8]) {
#pragma unroll
    for (int i = 0; i < 8; i++) {
        acc[i] = (acc[i] ^ (acc[i] >> 47) ^ keys[i]) * PRIME32_1;
    }
}

// The checksum from the final lanes.
static DEVICE u64 merge(const u64 acc[8], u64 len) {
    u64 h = len * PRIME64_1;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        h += mul_fold(acc[2 * i] ^ secret64(11 + 16 * i), acc[2 * i + 1] ^ secret64(19 + 16 * i));
    }
    h ^= h >> 37;
    h *= PRIME_MX1;
    h ^= h >> 32;
    return h;
}

static DEVICE void init_lanes(u64 acc[8]) {
    acc[0] = PRIME32_3;
    acc[1] = PRIME64_1;
    acc[2] = PRIME64_2;
    acc[3] = PRIME64_3;
    acc[4] = PRIME64_4;
    acc[5] = PRIME32_2;
    acc[6] = PRIME64_5;
    acc[7] = PRIME32_1;
}

// A forward-only position in a block's pages: the page and the block's bytes before it.
struct Cursor {
    unsigned int page;
    u64 before;
};

// Address of the block's byte `offset` (at or after the cursor's page).
static DEVICE u64 locate(const Page *pages, unsigned int count, Cursor *c, u64 offset) {
    while (c->page + 1 < count && offset >= c->before + pages[c->page].len) {
        c->before += pages[c->page].len;
        c->page++;
    }
    return pages[c->page].addr + (offset - c->before);
}

#ifndef KVD_HOST_TEST
// The eight words of the stripe at `addr`, in four 16-byte loads.
static DEVICE void load_stripe(u64 addr, u64 w[8]) {
    typedef u64 Pair __attribute__((ext_vector_type(2)));
    const Pair *p = (const Pair *)addr;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const Pair v = p[i];
        w[2 * i] = v.x;
        w[2 * i + 1] = v.y;
    }
}

// Sums the lanes over the 16 threads of this half-warp (`mask`); every thread gets the sum.
static DEVICE void sum16(u64 c[8], unsigned int mask) {
#pragma unroll
    for (int m = 1; m < 16; m <<= 1) {
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const unsigned int lo = __nvvm_shfl_sync_bfly_i32(mask, (int)(unsigned int)c[i], m, 0x1f);
            const unsigned int hi = __nvvm_shfl_sync_bfly_i32(mask, (int)(unsigned int)(c[i] >> 32), m, 0x1f);
            c[i] += ((u64)hi << 32) | lo;
        }
    }
}

// out[j] = XXH3-64 of block j: 16 threads a block (a half-warp), thread s taking stripe s of
// every 1 KiB round. `jobs` (n), `pages` and `out` lie in device memory.
extern "C" GLOBAL void kvd_xxh3_blocks(const HashJob *__restrict__ jobs, const Page *__restrict__ pages,
                                       unsigned int n, u64 *__restrict__ out) {
    const unsigned int tid = __nvvm_read_ptx_sreg_tid_x();
    const unsigned int t = __nvvm_read_ptx_sreg_ctaid_x() * __nvvm_read_ptx_sreg_ntid_x() + tid;
    const unsigned int j = t >> 4, s = t & 15;
    if (j >= n) {
        return;
    }
    const unsigned int mask = 0xFFFFu << (tid & 16);
    const HashJob job = jobs[j];
    const Page *pg = pages + job.first;
    Cursor cur = {0, 0};
    u64 acc[8], w[8], c[8], keys[8], ends[8];
    init_lanes(acc);
    stripe_keys(s * 8, keys);
    stripe_keys(128, ends);
    const u64 rounds = (job.len - 1) / 1024;
    const u64 stripes = ((job.len - 1) - rounds * 1024) / 64;
    // Each round's stripe is loaded one round ahead, so its bus latency hides behind the sums.
    u64 next[8];
    if (rounds > 0 || s < stripes) {
        load_stripe(locate(pg, job.count, &cur, s * 64), next);
    }
    for (u64 r = 0; r < rounds; r++) {
#pragma unroll
        for (int i = 0; i < 8; i++) {
            w[i] = next[i];
        }
        if (r + 1 < rounds || s < stripes) {
            load_stripe(locate(pg, job.count, &cur, (r + 1) * 1024 + s * 64), next);
        }
        stripe_sum(w, keys, c);
        sum16(c, mask);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            acc[i] += c[i];
        }
        scramble(acc, ends);
    }
#pragma unroll
    for (int i = 0; i < 8; i++) {
        c[i] = 0;
    }
    if (s < stripes) {
        stripe_sum(next, keys, c);
    }
    sum16(c, mask);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        acc[i] += c[i];
    }
    load_stripe(locate(pg, job.count, &cur, job.len - 64), w);
    stripe_keys(121, keys);
    stripe_sum(w, keys, c);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        acc[i] += c[i];
    }
    if (s == 0) {
        out[j] = merge(acc, job.len);
    }
}
#else
// The host check: the kernel's arithmetic and page walk with its 16 threads run one after the
// other (what sum16 adds up in a half-warp is summed here), for kvd-gpu's unit test against
// twox-hash. Pages' addresses are host addresses.
extern "C" u64 kvd_xxh3_host(const Page *pages, unsigned int count, u64 len) {
    Cursor cur[16];
    u64 acc[8], w[8], c[8], sum[8], keys[8], ends[8];
    stripe_keys(128, ends);
    for (int s = 0; s < 16; s++) {
        cur[s].page = 0;
        cur[s].before = 0;
    }
    init_lanes(acc);
    const u64 rounds = (len - 1) / 1024;
    for (u64 r = 0; r <= rounds; r++) {
        const u64 stripes = r < rounds ? 16 : ((len - 1) - rounds * 1024) / 64;
        for (int i = 0; i < 8; i++) {
            sum[i] = 0;
        }
        for (unsigned int s = 0; s < stripes; s++) {
            __builtin_memcpy(w, (const void *)locate(pages, count, &cur[s], r * 1024 + s * 64), 64);
            stripe_keys(s * 8, keys);
            stripe_sum(w, keys, c);
            for (int i = 0; i < 8; i++) {
                sum[i] += c[i];
            }
        }
        for (int i = 0; i < 8; i++) {
            acc[i] += sum[i];
        }
        if (r < rounds) {
            scramble(acc, ends);
        }
    }
    __builtin_memcpy(w, (const void *)locate(pages, count, &cur[0], len - 64), 64);
    stripe_keys(121, keys);
    stripe_sum(w, keys, c);
    for (int i = 0; i < 8; i++) {
        acc[i] += c[i];
    }
    return merge(acc, len);
}
#endif
