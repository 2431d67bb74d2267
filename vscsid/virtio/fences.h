/*
 * Memory ordering and single-copy-atomic accesses on rings shared with another
 * process, the EVENT_IDX notification test and where its two fields lie: static
 * inline C for the data-plane engine, the benchmark's driver loop and
 * vscsid/virtio/ring.c (which exports them to Python). The one definition of each.
 */
#ifndef VSCSID_FENCES_H
#define VSCSID_FENCES_H

#include <stdint.h>
#include <string.h>

static inline void vsd_mb(void)  { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void vsd_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void vsd_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

/* Unaligned-safe plain loads and stores (guest memory need not be aligned). */
static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void st16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* The ring indices are 16-bit and 2-byte aligned: acquire/release accesses. */
static inline uint16_t ld16_acq(const uint8_t *p)
{
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}
static inline void st16_rel(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}

/* virtio 1.x 2.7.10: notify when event_idx lies in (old_idx, new_idx] (mod 2^16). */
static inline int need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

/* Split ring layout (virtio 1.x 2.7): the driver's used_event follows the
 * available ring's entries, the device's avail_event the used ring's. */
static inline size_t used_event_off(uint32_t size) { return 4 + 2 * (size_t)size; }
static inline size_t avail_event_off(uint32_t size) { return 4 + 8 * (size_t)size; }

#endif
