// The checksum kernel's arithmetic on the host (scripts/gpu-kernels.sh): kvd.cu built as plain
// C++ with KVD_HOST_TEST, the 16 threads of a half-warp run one after the other. Prints
// "length pages checksum" for blocks of a fixed pattern cut into pages of several sizes; the
// script compares each checksum with Python's xxhash.xxh3_64 of the same bytes.
#define KVD_HOST_TEST
#include "kvd.cu"

#include <cstdio>
#include <vector>

int main() {
    std::vector<unsigned char> buf(1 << 21);
    for (size_t i = 0; i < buf.size(); i++) {
        buf[i] = (unsigned char)((i * 2654435761u) >> 13);
    }
    const u64 lengths[] = {256, 320, 1024, 1088, 2048, 4096, 4160, 16384, 65536, 1 << 20};
    const u64 page_sizes[] = {64, 192, 1024, 4096};
    for (u64 len : lengths) {
        for (u64 page : page_sizes) {
            std::vector<Page> pages;
            for (u64 at = 0; at < len; at += page) {
                const u64 n = len - at < page ? len - at : page;
                pages.push_back(Page{(u64)(buf.data() + at), n});
            }
            printf("%llu %zu %016llx\n", len, pages.size(),
                   kvd_xxh3_host(pages.data(), (unsigned int)pages.size(), len));
        }
    }
    return 0;
}
