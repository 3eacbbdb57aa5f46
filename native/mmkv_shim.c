/*
 * mmkv native shim (see mmkv_shim.h for what it does, mmkv_internal.h for how
 * its files divide the work): this file holds the compile-time checks that the
 * layout in mmkv_layout.h is self-consistent and fits the header page, and the
 * table of sizeof/offsetof that tests/test_layout.py compares with cffi's view.
 */
#define _GNU_SOURCE
#include "mmkv_internal.h"

#include <pthread.h>
#include <semaphore.h>

_Static_assert(sizeof(pthread_mutex_t) <= MMKV_MUTEX_BYTES, "mutex does not fit its area");
_Static_assert(sizeof(sem_t) <= MMKV_SEM_BYTES, "sem_t does not fit its area");
_Static_assert(sizeof(struct mmkv_locks) == MMKV_MUTEX_BYTES + MMKV_NSEMS * MMKV_SEM_BYTES, "lock area");
_Static_assert(sizeof(struct mmkv_identity) <= MMKV_OFF_META0 - MMKV_OFF_IDENTITY, "identity sector");
_Static_assert(sizeof(struct mmkv_meta) <= MMKV_OFF_META1 - MMKV_OFF_META0, "meta sector");
_Static_assert(sizeof(struct mmkv_state) <= MMKV_OFF_LOCKS - MMKV_OFF_STATE, "state sectors");
_Static_assert(MMKV_OFF_LOCKS + sizeof(struct mmkv_locks) <= MMKV_HEADER_SIZE, "header page");
_Static_assert(sizeof(((struct mmkv_state *)0)->free_heads) == 8 * MMKV_NCLASSES, "classes");
_Static_assert(sizeof(struct mmkv_record) == 32, "record header");
_Static_assert(MMKV_HEAP_START == MMKV_HEADER_SIZE + MMKV_BLOCK_HEADER, "heap start");
_Static_assert((MMKV_HEAP_START + MMKV_BLOCK_HEADER) % MMKV_BLOCK_ALIGN == 0, "payloads are 16-aligned");
_Static_assert(MMKV_BLOCK_FLAGS == MMKV_BLOCK_ALIGN - 1 && (MMKV_BLOCK_ALIGN & MMKV_BLOCK_FLAGS) == 0, "block flags");
_Static_assert(offsetof(struct mmkv_free_block, header) == 0, "free block header");
_Static_assert(offsetof(struct mmkv_free_block, next) == MMKV_FREE_NEXT, "free block next link");
_Static_assert(offsetof(struct mmkv_free_block, prev) == MMKV_FREE_PREV, "free block prev link");
_Static_assert(sizeof(struct mmkv_free_block) + MMKV_FREE_FOOTER <= MMKV_BLOCK_MIN, "a minimal free block holds links and footer");
_Static_assert(MMKV_BLOCK_HEADER == 8 && MMKV_FREE_FOOTER == 8 && MMKV_EPILOGUE_BYTES == 8, "one word each");
_Static_assert((MMKV_SEGMENT_SLOTS & (MMKV_SEGMENT_SLOTS - 1)) == 0 && MMKV_SEGMENT_SLOTS <= 65536, "segment size");
_Static_assert(MMKV_TAG_SHIFT + 16 <= 64 - MMKV_DIR_MAX_BITS, "tag bits overlap directory bits");
_Static_assert((1 << MMKV_TAG_SHIFT) >= MMKV_SEGMENT_SLOTS, "tag bits overlap slot bits");
_Static_assert(MMKV_EXACT_CLASSES == (MMKV_EXACT_MAX - MMKV_BLOCK_MIN) / 16 + 1, "exact classes");
_Static_assert(MMKV_OFF_STATE % 64 == 0 && MMKV_OFF_LOCKS % 64 == 0, "alignment");

/* ---------------------------------------------------------------- layout table */

#define SZ(s) {#s, sizeof(struct s)},
#define OF(s, f) {#s "." #f, offsetof(struct s, f)},
static const struct {
    const char *name;
    uint64_t value;
} layout_table[] = {
    SZ(mmkv_identity) OF(mmkv_identity, magic) OF(mmkv_identity, version) OF(mmkv_identity, page_size)
    OF(mmkv_identity, seed0) OF(mmkv_identity, seed1) OF(mmkv_identity, created_ns)
    OF(mmkv_identity, flags) OF(mmkv_identity, reserved) OF(mmkv_identity, checksum)
    SZ(mmkv_meta) OF(mmkv_meta, seq) OF(mmkv_meta, file_size) OF(mmkv_meta, dir_off)
    OF(mmkv_meta, dir_bits) OF(mmkv_meta, journal_off) OF(mmkv_meta, journal_txn) OF(mmkv_meta, catalog_off)
    OF(mmkv_meta, reserved) OF(mmkv_meta, checksum)
    SZ(mmkv_state) OF(mmkv_state, generation) OF(mmkv_state, dirty) OF(mmkv_state, count)
    OF(mmkv_state, live_bytes) OF(mmkv_state, used_bytes) OF(mmkv_state, free_bytes)
    OF(mmkv_state, free_bitmap) OF(mmkv_state, lock_pid) OF(mmkv_state, lock_since_ns)
    OF(mmkv_state, recoveries) OF(mmkv_state, seq) OF(mmkv_state, compacting_pid) OF(mmkv_state, ttl_min)
    OF(mmkv_state, sweep_at) OF(mmkv_state, sweep_min) OF(mmkv_state, reserved) OF(mmkv_state, free_heads)
    SZ(mmkv_locks) OF(mmkv_locks, mutex) OF(mmkv_locks, sems)
    SZ(mmkv_record) OF(mmkv_record, checksum) OF(mmkv_record, key_hash) OF(mmkv_record, key_len)
    OF(mmkv_record, flags) OF(mmkv_record, val_len)
    SZ(mmkv_segment) OF(mmkv_segment, depth) OF(mmkv_segment, prefix) OF(mmkv_segment, count)
    OF(mmkv_segment, reserved)
    SZ(mmkv_view) OF(mmkv_view, base) OF(mmkv_view, size) OF(mmkv_view, dir_off)
    OF(mmkv_view, dir_bits) OF(mmkv_view, seed0) OF(mmkv_view, seed1) OF(mmkv_view, generation)
    OF(mmkv_view, lock_timeout_ns) OF(mmkv_view, pid) OF(mmkv_view, heap_end) OF(mmkv_view, page_size)
    OF(mmkv_view, large_block) OF(mmkv_view, fit_scan) OF(mmkv_view, max_count) OF(mmkv_view, fd)
    OF(mmkv_view, release_min) OF(mmkv_view, holes_block) OF(mmkv_view, sync_full)
    OF(mmkv_view, closing) OF(mmkv_view, active) OF(mmkv_view, held) OF(mmkv_view, crc_sums) OF(mmkv_view, sweep_tick) OF(mmkv_view, lockless)
    OF(mmkv_view, sync_hook) OF(mmkv_view, clock) OF(mmkv_view, counts_at)
    OF(mmkv_view, hash) OF(mmkv_view, seg) OF(mmkv_view, slot)
    OF(mmkv_view, rec_off) OF(mmkv_view, val_off) OF(mmkv_view, val_len) OF(mmkv_view, rec_flags)
    OF(mmkv_view, probes) OF(mmkv_view, deadline) OF(mmkv_view, rec_need)
    SZ(mmkv_getbuf) OF(mmkv_getbuf, buf) OF(mmkv_getbuf, cap) OF(mmkv_getbuf, val_len) OF(mmkv_getbuf, alloc)
    OF(mmkv_getbuf, alloc_ctx) OF(mmkv_getbuf, alloc_max) OF(mmkv_getbuf, expired)
    SZ(mmkv_journal) OF(mmkv_journal, magic) OF(mmkv_journal, txn) OF(mmkv_journal, count) OF(mmkv_journal, checksum)
    SZ(mmkv_free_block) OF(mmkv_free_block, header) OF(mmkv_free_block, next) OF(mmkv_free_block, prev)
    SZ(mmkv_catalog) OF(mmkv_catalog, magic) OF(mmkv_catalog, count) OF(mmkv_catalog, next_id)
    OF(mmkv_catalog, checksum)
    SZ(mmkv_index_counts) OF(mmkv_index_counts, count) OF(mmkv_index_counts, live_bytes)
    OF(mmkv_index_counts, ttl_min) OF(mmkv_index_counts, sweep_at) OF(mmkv_index_counts, sweep_min)
    SZ(mmkv_catalog_entry) OF(mmkv_catalog_entry, id) OF(mmkv_catalog_entry, dir_off)
    OF(mmkv_catalog_entry, dir_bits) OF(mmkv_catalog_entry, name_at) OF(mmkv_catalog_entry, flags)
    OF(mmkv_catalog_entry, counts) OF(mmkv_catalog_entry, reserved)
};

int mmkv_layout_entry(int which, const char **name, uint64_t *value)
{
    if (which < 0 || which >= (int)(sizeof layout_table / sizeof layout_table[0]))
        return ENOENT;
    *name = layout_table[which].name;
    *value = layout_table[which].value;
    return 0;
}
