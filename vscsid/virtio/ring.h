/*
 * What vscsid.virtio._ring exports to Python (cffi reads this text as its cdef
 * after virtio.h): the fences and atomic 16-bit accesses the Python ring code
 * needs around shared memory, the EVENT_IDX test and its fields' offsets, and the
 * SIGBUS guard for guest memory. Implemented in ring.c.
 */
void vq_mb(void);
void vq_rmb(void);
void vq_wmb(void);
uint16_t vq_load_u16(const uint8_t *base, size_t off);
void vq_store_u16(uint8_t *base, size_t off, uint16_t value);
int vq_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx);
size_t vq_used_event_off(uint32_t size);
size_t vq_avail_event_off(uint32_t size);

int vsd_sigbus_install(void);
int vsd_guard_add(uint8_t *start, uint64_t len);
/* A mapping whose faults count in *faults, not in vsd_fault_count (a LUN's memory file). */
int vsd_guard_add_counted(uint8_t *start, uint64_t len, unsigned long *faults);
void vsd_guard_remove(uint8_t *start);
unsigned long vsd_fault_count(void);
