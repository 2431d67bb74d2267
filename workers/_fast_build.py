"""cffi build script for ``vscsid.workers._fast`` (out-of-line API mode).

Two things live in C:

* memory fences and single-copy-atomic 16-bit loads/stores on the shared
  ring (CPython cannot express them);
* the data-plane fast path (``_engine.c``): ring pop/push, chain walking and
  READ/WRITE service straight between the backing file and guest memory, with
  io_uring (raw syscalls, no liburing needed) for asynchronous I/O. The Python
  modules virtqueue.py / request.py / worker.py remain the readable reference
  for the same logic and serve everything the fast path does not.
"""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()

ffibuilder.cdef(
    """
    void vq_mb(void);
    void vq_rmb(void);
    void vq_wmb(void);
    uint16_t vq_load_u16(const uint8_t *base, size_t off);
    void vq_store_u16(uint8_t *base, size_t off, uint16_t value);

    #define VSD_MAX_REGIONS 8
    #define VSD_MAX_LUNS 256
    #define VSD_MAX_IOV 256
    #define LUN_PRESENT 1
    #define LUN_RO 2
    #define LUN_NULL 4
    #define LUN_FAST 8
    #define LUN_ASYNC 16

    struct vsd_region { uint64_t gpa; uint64_t size; uint8_t *host; };
    struct vsd_lun {
        int fd;
        uint32_t flags;
        uint32_t block_size;
        uint32_t block_shift;
        uint64_t num_blocks;
        uint64_t max_transfer_bytes;
        uint64_t delay_ns;
        uint8_t *state;
    };
    struct vsd_io { ...; };
    struct vsd_uring { ...; };
    struct vsd_queue {
        uint8_t *desc;
        uint8_t *avail;
        uint8_t *used;
        uint32_t size;
        uint32_t mask;
        uint16_t last_avail;
        uint16_t used_idx;
        uint16_t signalled_used;
        int signalled_valid;
        int event_idx;
        int call_fd;
        struct vsd_region regions[8];
        int nregions;
        struct vsd_lun luns[256];
        int nluns;
        uint32_t cdb_size;
        uint32_t sense_size;
        uint8_t *inflight;
        uint64_t counter;
        uint16_t *completed;
        uint32_t ncompleted;
        int more;
        int broken;
        struct vsd_uring *uring;
        uint32_t in_flight;
        uint64_t st_fast, st_slow, st_bytes_in, st_bytes_out, st_calls, st_batches, st_async;
        uint64_t st_max_in_flight;
        uint64_t poll_ns, poll_max_ns;
        uint64_t st_poll_hits, st_kicks;
    };

    int vsd_run(struct vsd_queue *q, uint16_t *slow, int max_slow, int budget);
    int vsd_resubmit(struct vsd_queue *q, const uint16_t *heads, int n, uint16_t *slow);
    int vsd_drain(struct vsd_queue *q, uint16_t *slow, int max_slow);
    void vsd_push(struct vsd_queue *q, uint16_t head, uint32_t written);
    int vsd_flush(struct vsd_queue *q);
    int vsd_uring_init(struct vsd_uring *u, unsigned entries, int event_fd, struct vsd_io *ios);
    void vsd_uring_free(struct vsd_uring *u);
    int vsd_uring_pending(struct vsd_queue *q);

    int vsd_sigbus_install(void);
    int vsd_guard_add(uint8_t *start, uint64_t len);
    void vsd_guard_remove(uint8_t *start);
    unsigned long vsd_fault_count(void);
    int vsd_serve(struct vsd_queue *q, int epfd, int kick_fd, int uring_fd, int timeout_ms,
                  uint16_t *slow, int max_slow, int budget);
    int vsd_timerfd_create(void);
    int vsd_timerfd_arm(int fd, uint64_t deadline_ns);
    int vsd_walk_info(struct vsd_queue *q, uint16_t head, uint64_t *out_len, uint64_t *in_len,
                      int *nout, int *nin);
    """
)

ffibuilder.set_source(
    "vscsid.workers._fast",
    r"""
    #ifndef _GNU_SOURCE
    #define _GNU_SOURCE
    #endif
    #include <stdint.h>
    #include <stddef.h>

    static void vq_mb(void)  { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    static void vq_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    static void vq_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

    static uint16_t vq_load_u16(const uint8_t *base, size_t off)
    {
        return __atomic_load_n((const uint16_t *)(base + off), __ATOMIC_ACQUIRE);
    }

    static void vq_store_u16(uint8_t *base, size_t off, uint16_t value)
    {
        __atomic_store_n((uint16_t *)(base + off), value, __ATOMIC_RELEASE);
    }
    """ + (HERE / "_engine.c").read_text(),
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
