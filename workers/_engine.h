/*
 * The data-plane engine's interface: the one definition of its constants,
 * structures and entry points. _engine.c includes this file; cffi's cdef is
 * vscsid/virtio/virtio.h followed by this same text (see _fast_build.py), so
 * the C structs and the Python view of them cannot drift apart. Plain
 * declarations only (cffi parses them): no includes, no inline code.
 * <stdint.h>, <stddef.h> and virtio.h come first in C.
 */

#define VSD_MAX_LUNS 256            /* LUN slots (the supervisor's LUN table) */
#define VSD_MAX_IOV 256
#define VSD_MAX_TARGETS 256         /* target ids 0..255 (the LUN field's byte 1) */
#define VSD_TARGET_LUNS 256         /* LUN numbers 0..255 per target */

/* struct vsd_lun.flags */
#define LUN_PRESENT 1
#define LUN_RO 2
#define LUN_NULL 4
#define LUN_FAST 8
#define LUN_ASYNC 16        /* every read and write through io_uring (O_DIRECT, injected
                               latency, aio=uring) */
#define LUN_NOWAIT 32       /* reads inline with RWF_NOWAIT, through io_uring when they would
                               wait for the disk (buffered files and devices) */
#define LUN_DIRECT 64       /* opened O_DIRECT: unaligned requests take buffered_fd */
#define LUN_SYNC 128        /* aio=sync: every read and write inline, as preadv/pwritev */
#define LUN_MAP_WRITE 256   /* map is writable: writes are copies into it too */

/* struct vsd_queue.broken: why the ring as a whole is unusable */
#define VSD_BROKEN_AVAIL_JUMP 1    /* avail->idx moved by more than the queue size */
#define VSD_BROKEN_HEAD_RANGE 2    /* an available entry names a head >= size */
#define VSD_BROKEN_HEAD_BUSY 3     /* an available entry names a head still in flight */

/* The shared per-LUN state byte (struct vsd_lun.state) */
#define STATE_WCE 1

struct vsd_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
};

struct vsd_lun {
    int fd;
    uint32_t flags;
    uint32_t block_size;
    uint32_t block_shift;
    uint64_t num_blocks;
    uint64_t max_transfer_bytes;
    uint64_t delay_ns;
    uint8_t *state;                 /* shared per-LUN state byte (WCE), may be NULL */
    uint32_t dio_align;             /* O_DIRECT: offset and length alignment (power of 2) */
    uint32_t mem_align;             /* O_DIRECT: buffer address and length alignment */
    int buffered_fd;                /* O_DIRECT: the same file without it, or -1 */
    uint64_t write_async_until;     /* writes go through io_uring until then (ns) */
    uint8_t *map;                   /* a memory file (tmpfs) mapped whole: reads (and with
                                       LUN_MAP_WRITE, writes) are copies; NULL: none */
    unsigned long *map_faults;      /* the mapping's SIGBUS count (vsd_guard_add_counted);
                                       a copy it rose during is redone by a system call
                                       and the engine stops using the mapping */
    uint64_t map_mtime_next;        /* writes through map: when to set the file's mtime next
                                       (CLOCK_MONOTONIC_COARSE ns; the kernel sets it only
                                       on a page's first write fault) */
    uint32_t *ua;                   /* its pending unit attentions (4 bytes of the shared
                                       state page, vscsid/lunstate.py), may be NULL: while
                                       any is set the LUN's requests take the reference path */
};

/* Statistics: one struct vsd_stats per request queue, in a shared page the
 * supervisor reads (workers/stats.py describes its layout to the supervisor).
 * The worker is its only writer: the C fast path and the Python reference path
 * count into the same counters. Latency histograms have fixed log-linear
 * buckets in microseconds: 0, 1, 2, 3, then four per power of two
 * (vsd_hist_bucket, vsd_hist_lower_us); the last bucket has no upper bound. */
#define VSD_HIST_BUCKETS 96
#define VSD_OPS 3                   /* reads, writes, other commands */
#define VSD_OP_READ 0
#define VSD_OP_WRITE 1
#define VSD_OP_OTHER 2
#define VSD_SENSE_KEYS 16

struct vsd_qstats {
    uint64_t fast, slow, bytes_in, bytes_out, calls, batches, async;
    uint64_t max_in_flight, nowait_miss, write_blocked, unaligned;
    uint64_t poll_hits, kicks;
    uint64_t late_calls;            /* calls sent only when the queue went idle (vsd_late_call) */
    uint64_t map_faults;            /* LUN mappings given up after a fault (a file shrank) */
};

struct vsd_lunstats {
    uint64_t ops[VSD_OPS];          /* completed requests */
    uint64_t bytes_in, bytes_out;   /* data read by the guest / written by it */
    uint64_t errors[VSD_SENSE_KEYS];/* CHECK CONDITION, by sense key */
    uint64_t failures;              /* virtio-scsi responses other than OK */
    uint64_t in_flight;             /* requests in flight now (a gauge) */
    uint64_t lat_count[VSD_OPS];    /* timed requests (one in latency_sample) */
    uint64_t lat_sum_ns[VSD_OPS];
    uint64_t lat[VSD_OPS][VSD_HIST_BUCKETS];
};

struct vsd_stats {
    struct vsd_qstats q;
    struct vsd_lunstats luns[VSD_MAX_LUNS];   /* by LUN slot */
};

struct vsd_uring;

struct vsd_queue {
    /* ring */
    uint8_t *desc;
    uint8_t *avail;
    uint8_t *used;
    uint32_t size;
    uint32_t mask;
    uint16_t last_avail;
    uint16_t used_idx;
    uint16_t signalled_used;
    uint16_t call_used;             /* used_idx when the call eventfd was last written
                                       (vsd_late_call: what the driver may still miss) */
    int signalled_valid;
    int event_idx;
    int call_fd;
    /* guest memory */
    struct vsd_region regions[VSD_MAX_REGIONS];
    int nregions;
    int last_region;                /* where the previous translation hit */
    /* LUNs by slot; lunmap[target * VSD_TARGET_LUNS + lun] is slot + 1 (0: none).
     * Without a map (NULL), target 0's LUN n is slot n, below nluns. */
    struct vsd_lun luns[VSD_MAX_LUNS];
    int nluns;
    uint16_t *lunmap;
    uint32_t cdb_size;
    uint32_t sense_size;
    /* inflight region of this queue (16-byte header + 16 bytes per descriptor), or NULL */
    uint8_t *inflight;
    uint64_t counter;
    /* per-head state (VSD_HEAD_*), size entries */
    uint8_t *hstate;
    /* heads pushed since the last publish (at most size: each is a distinct DONE head) */
    uint16_t *completed;
    uint32_t ncompleted;
    /* state for the Python side */
    int more;
    int broken;                     /* VSD_BROKEN_* */
    uint16_t broken_head;           /* the head named when broken is HEAD_RANGE or HEAD_BUSY */
    /* asynchronous I/O */
    struct vsd_uring *uring;
    uint32_t in_flight;
    /* statistics (never NULL) */
    struct vsd_stats *st;
    uint32_t lat_every, lat_tick;   /* time one fast-path request in lat_every (0: none) */
    /* adaptive busy polling (vsd_serve) */
    uint64_t poll_ns, poll_max_ns;
};

/* the data path */
int vsd_run(struct vsd_queue *q, uint16_t *slow, int max_slow, int budget);
int vsd_claim(struct vsd_queue *q, uint16_t head);
int vsd_resubmit(struct vsd_queue *q, const uint16_t *heads, int n, uint16_t *slow);
int vsd_drain(struct vsd_queue *q, uint16_t *slow, int max_slow);
int vsd_push(struct vsd_queue *q, uint16_t head, uint32_t written);
int vsd_flush(struct vsd_queue *q);
int vsd_late_call(struct vsd_queue *q);
int vsd_serve(struct vsd_queue *q, int epfd, int kick_fd, int uring_fd, int timeout_ms,
              uint16_t *slow, int max_slow, int budget);

/* io_uring (raw system calls) */
struct vsd_uring *vsd_uring_new(unsigned entries, int event_fd, unsigned nheads, int *err);
void vsd_uring_free(struct vsd_uring *u);
int vsd_uring_pending(struct vsd_queue *q);

/* statistics and unit attentions */
unsigned vsd_hist_bucket(uint64_t ns);
uint64_t vsd_hist_lower_us(unsigned bucket);
int vsd_ua_take(uint8_t *ua, int n);
uint64_t vsd_now_ns(void);

/* timers for the reference path (ns resolution) */
int vsd_timerfd_create(void);
int vsd_timerfd_arm(int fd, uint64_t deadline_ns);

/* test hook: walk one chain as the fast path does (0 ok, -1 malformed, -2 too many segments) */
int vsd_walk_info(struct vsd_queue *q, uint16_t head, uint64_t *out_len, uint64_t *in_len,
                  int *nout, int *nin);
