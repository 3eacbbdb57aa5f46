/*
 * mmkv native shim: SipHash-2-4, for key hashes (keyed with the file's seed)
 * and the header checksums the Python side computes; CRC32C for the record
 * checksums of format version 2 (version 1 files keep SipHash ones).
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


/* ---------------------------------------------------------------- CRC32C (Castagnoli) */

/* Reflected polynomial 0x82F63B78, as in iSCSI, ext4 and btrfs metadata.  The x86-64 SSE4.2
 * instruction computes it 8 bytes per step; other machines use the bytewise table. */
static uint32_t crc32c_table[256];

__attribute__((constructor)) static void crc32c_table_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
        crc32c_table[i] = c;
    }
}

static uint32_t crc32c_soft(uint32_t crc, const uint8_t *p, uint64_t len)
{
    while (len--)
        crc = crc32c_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, uint64_t len)
{
    uint64_t c = crc;
    for (; len >= 8; p += 8, len -= 8)
        c = __builtin_ia32_crc32di(c, load_le64(p));
    uint32_t c32 = (uint32_t)c;
    for (; len; p++, len--)
        c32 = __builtin_ia32_crc32qi(c32, *p);
    return c32;
}

static int crc32c_use_hw;   /* set once when the library is loaded, before any thread can call */

__attribute__((constructor)) static void crc32c_pick(void)
{
    __builtin_cpu_init();
    crc32c_use_hw = __builtin_cpu_supports("sse4.2");
}

uint32_t crc32c(uint32_t crc, const uint8_t *p, uint64_t len)
{
    crc = ~crc;
    crc = crc32c_use_hw ? crc32c_hw(crc, p, len) : crc32c_soft(crc, p, len);
    return ~crc;
}
#else
uint32_t crc32c(uint32_t crc, const uint8_t *p, uint64_t len)
{
    return ~crc32c_soft(~crc, p, len);
}
#endif

int mmkv_crc32c(uint32_t crc, const uint8_t *data, uint64_t len, uint32_t *out)
{
    if (!data && len)
        return EINVAL;
    *out = crc32c(crc, data, len);
    return 0;
}

int mmkv_crc32c_soft(uint32_t crc, const uint8_t *data, uint64_t len, uint32_t *out)
{
    if (!data && len)
        return EINVAL;
    *out = ~crc32c_soft(~crc, data, len);
    return 0;
}
