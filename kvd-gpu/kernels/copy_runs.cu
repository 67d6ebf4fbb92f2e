// kvd's batched copy kernel: moves a batch of runs (source, destination, length) between
// device memory and pinned, device-mapped host memory in one launch.
//
// Why a kernel: a paged KV block is one page of every layer, so a block of 32 layers is 32
// separate copies of a few KiB. Issued one by one (cuMemcpyAsync) each costs microseconds
// of driver time, far longer than its bytes take over PCIe; one launch that copies every
// run with the SMs' own loads and stores moves them at bus speed.
//
// Built without the CUDA toolkit: clang's CUDA front end with its NVVM builtins, no CUDA
// headers (scripts/gpu-kernels.sh writes copy_runs.ptx beside this file; kvd-gpu embeds the
// PTX and the driver compiles it for the GPU at start). Keep this file free of CUDA headers.

typedef unsigned long long u64;

// One copy; the layout of kvd_gpu::cuda::KernelRun (three little-endian u64s).
struct Run {
    u64 src;
    u64 dst;
    u64 len;
};

// 16 bytes, moved by one vector load and one vector store.
typedef unsigned int Word __attribute__((ext_vector_type(4)));

#define DEVICE __attribute__((device))
#define GLOBAL __attribute__((global))

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
