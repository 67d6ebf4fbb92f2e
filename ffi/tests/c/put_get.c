/* Drives a running kvd through the C ABI: keys, put, get, lookup, delete and the errors.
 * Usage: put_get <socket>. Prints C-OK and exits 0 when every check holds. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvd.h"

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fprintf(stderr, "check failed at line %d: ", __LINE__);           \
            fprintf(stderr, __VA_ARGS__);                                     \
            fprintf(stderr, " (last error: %s)\n", kvd_last_error());         \
            return 1;                                                         \
        }                                                                     \
    } while (0)

#define BLOCK (100 * 1024 + 7)

static void fill(uint8_t *buf, size_t n, uint32_t seed) {
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        buf[i] = (uint8_t)x;
    }
}

int main(int argc, char **argv) {
    CHECK(argc == 2, "usage: put_get <socket>");
    KvdClient *c = NULL;
    CHECK(kvd_connect(argv[1], "c-test", &c) == KVD_STATUS_OK, "connect");
    KvdNamespace *ns = NULL;
    CHECK(kvd_open_namespace(c, "c-model", "bfloat16", "LBHNC", 32, 0, 1, NULL, NULL, &ns) ==
              KVD_STATUS_OK,
          "open namespace");
    uint8_t id[16];
    CHECK(kvd_namespace_id(ns, id) == KVD_STATUS_OK, "namespace id");

    uint32_t tokens[64];
    for (uint32_t i = 0; i < 64; i++) tokens[i] = i;
    uint8_t keys[3][32];
    CHECK(kvd_chain_key(NULL, tokens, 32, keys[0]) == KVD_STATUS_OK, "key 0");
    CHECK(kvd_chain_key(keys[0], tokens + 32, 32, keys[1]) == KVD_STATUS_OK, "key 1");
    memset(keys[2], 0x77, 32);

    static uint8_t data[2][BLOCK], out[BLOCK];
    for (int b = 0; b < 2; b++) {
        fill(data[b], BLOCK, (uint32_t)b + 1);
        CHECK(kvd_put(c, ns, keys[b], data[b], BLOCK) == KVD_STATUS_OK, "put %d", b);
    }
    CHECK(kvd_put(c, ns, keys[0], data[0], BLOCK) == KVD_STATUS_EXISTS, "second put");

    for (int b = 0; b < 2; b++) {
        size_t len = 0;
        memset(out, 0, sizeof out);
        CHECK(kvd_get(c, ns, keys[b], out, sizeof out, &len) == KVD_STATUS_OK, "get %d", b);
        CHECK(len == BLOCK && memcmp(out, data[b], BLOCK) == 0, "block %d bytes", b);
    }
    size_t len = 0;
    CHECK(kvd_get(c, ns, keys[0], out, 100, &len) == KVD_STATUS_TOO_SMALL && len == BLOCK,
          "small buffer");
    CHECK(kvd_get(c, ns, keys[2], out, sizeof out, &len) == KVD_STATUS_NOT_FOUND, "missing");

    uint32_t prefix = 0;
    CHECK(kvd_lookup(c, ns, &keys[0][0], 3, &prefix) == KVD_STATUS_OK && prefix == 2, "lookup");
    uint32_t deleted = 0;
    CHECK(kvd_delete(c, ns, keys[1], 1, &deleted) == KVD_STATUS_OK && deleted == 1, "delete");
    CHECK(kvd_lookup(c, ns, &keys[0][0], 2, &prefix) == KVD_STATUS_OK && prefix == 1,
          "lookup after delete");

    CHECK(kvd_put(c, ns, NULL, data[0], BLOCK) == KVD_STATUS_INVALID_ARGUMENT, "NULL key");
    CHECK(strstr(kvd_last_error(), "key is NULL") != NULL, "error message");

    kvd_namespace_free(ns);
    kvd_client_free(c);
    KvdClient *none = NULL;
    CHECK(kvd_connect("/nonexistent/kvd.sock", NULL, &none) == KVD_STATUS_UNAVAILABLE,
          "no daemon");
    printf("C-OK\n");
    return 0;
}
