/*
 * mmkv native shim: SipHash-2-4, for key hashes (keyed with the file's seed),
 * record checksums and the header checksums the Python side computes.
 */
#define _GNU_SOURCE
#include "mmkv_internal.h"

/* ---------------------------------------------------------------- SipHash-2-4 */

#define ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                   \
    do {                                                                                           \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                                  \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                                     \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                                     \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                                  \
    } while (0)

static uint64_t load_le64(const uint8_t *p)
{
    uint64_t x;
    memcpy(&x, p, 8); /* little-endian host, checked at import by the Python side */
    return x;
}

uint64_t siphash24(uint64_t k0, uint64_t k1, const uint8_t *data, uint64_t len)
{
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL;
    uint64_t v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL;
    uint64_t v3 = k1 ^ 0x7465646279746573ULL;
    const uint8_t *end = data + (len & ~(uint64_t)7);
    for (; data != end; data += 8) {
        uint64_t m = load_le64(data);
        v3 ^= m;
        SIPROUND;
        SIPROUND;
        v0 ^= m;
    }
    uint64_t b = len << 56;
    switch (len & 7) {
    case 7: b |= (uint64_t)data[6] << 48; /* fall through */
    case 6: b |= (uint64_t)data[5] << 40; /* fall through */
    case 5: b |= (uint64_t)data[4] << 32; /* fall through */
    case 4: b |= (uint64_t)data[3] << 24; /* fall through */
    case 3: b |= (uint64_t)data[2] << 16; /* fall through */
    case 2: b |= (uint64_t)data[1] << 8;  /* fall through */
    case 1: b |= (uint64_t)data[0]; break;
    default: break;
    }
    v3 ^= b;
    SIPROUND;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

int mmkv_siphash(uint64_t k0, uint64_t k1, const uint8_t *data, uint64_t len, uint64_t *out)
{
    if (!data && len)
        return EINVAL;
    *out = siphash24(k0, k1, data, len);
    return 0;
}

