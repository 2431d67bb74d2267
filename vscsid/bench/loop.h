/*
 * The interface of vscsid-bench's C driver loop (vscsid.bench._loop): the one
 * definition of its constants, structures and entry points. loop.c includes
 * this file; cffi's cdef is vscsid/virtio/virtio.h followed by this same text
 * (see _build.py), so the C structs and the Python view of them cannot drift
 * apart. Plain declarations only (cffi parses them): no includes, no inline
 * code, integer constants only. <stdint.h>, <stddef.h> and virtio.h come first
 * in C. The ring's flags, sizes, fences and the EVENT_IDX test are the shared
 * virtio layer's (virtio.h, fences.h).
 */

/* struct bq.format */
#define BQ_FMT_SCSI 0
#define BQ_FMT_BLK 1

/* struct bq.rw */
#define BQ_RW_READ 0
#define BQ_RW_WRITE 1
#define BQ_RW_MIXED 2

/* bq_run's mode */
#define BQ_MODE_TIMED 0         /* submit until end_ns, then drain */
#define BQ_MODE_READBACK 1      /* read back and verify every block this queue wrote */

/* One slot's chain: request header, data, response (virtio-scsi; response
 * before data for reads) or header, data, status byte (virtio-blk). */
#define BQ_CHAIN_LEN 3

/* The latency histogram: log-linear, 2^BQ_HIST_SUB_BITS sub-buckets per power
 * of two; BQ_HIST_N = (64 - BQ_HIST_SUB_BITS + 1) << BQ_HIST_SUB_BITS (loop.c
 * checks it). */
#define BQ_HIST_SUB_BITS 6
#define BQ_HIST_N 3776

/* The verify pattern: each 512-byte sector holds le64 magic, sector, seed,
 * generation, then 60 splitmix64 words keyed by the three. */
#define BQ_SECTOR 512
#define BQ_MAGIC 0x622d646973637376     /* "vscsid-b" little endian */
#define BQ_GEN_UNKNOWN 0xFFFFFFFF       /* struct bq.gens: a write of this block failed */

/* bq_check_block's results */
#define BQ_VERIFY_OK 0                  /* the pattern (of the expected generation) */
#define BQ_VERIFY_UNWRITTEN 1           /* all zeros, and nothing was expected */
#define BQ_VERIFY_NO_HEADER -1
#define BQ_VERIFY_WRONG_SECTOR -2
#define BQ_VERIFY_WRONG_SEED -3
#define BQ_VERIFY_WRONG_GEN -4          /* stale or unexpected generation */
#define BQ_VERIFY_CORRUPT -5            /* payload corrupt */
#define BQ_VERIFY_PARTLY_WRITTEN -6

/* struct bq.err_kind: what the first failed request got wrong */
#define BQ_ERR_RESPONSE 1               /* virtio-scsi response not S_OK */
#define BQ_ERR_STATUS 2                 /* SCSI status not GOOD */
#define BQ_ERR_RESIDUAL 3
#define BQ_ERR_BLK_STATUS 4             /* virtio-blk status not OK */
#define BQ_ERR_VERIFY 5

/* virtio-blk (virtio 1.x, 5.2.6): struct virtio_blk_outhdr {le32 type;
 * le32 reserved; le64 sector}, then the data, then u8 status. vscsid serves
 * virtio-scsi; the bench speaks virtio-blk only to drive other back ends. */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_OUTHDR_SIZE 16
#define VIRTIO_BLK_STATUS_SIZE 1
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_SECTOR_SIZE 512      /* the unit of outhdr.sector and the capacity */

struct bq_slot {
    uint8_t *hdr;           /* request header (virtio-scsi cmd req / virtio-blk outhdr) */
    uint8_t *resp;          /* virtio-scsi cmd resp / virtio-blk status byte */
    uint8_t *data;          /* bs bytes */
    uint8_t *table;         /* BQ_CHAIN_LEN-entry indirect descriptor table (indirect mode) */
    uint64_t hdr_gpa;
    uint64_t resp_gpa;
    uint64_t data_gpa;
    uint64_t table_gpa;
    uint64_t start_ns;
    uint64_t blk;           /* block number (bs units) of the I/O in flight */
    uint64_t gen;           /* generation written / expected (verify) */
    uint32_t head;          /* ring descriptor index of the chain head */
    int32_t dir;            /* what the descriptors are built for: -1 none, 0 read, 1 write,
                               2 flush */
    int32_t is_write;
    int32_t is_flush;       /* a cache flush (SYNCHRONIZE CACHE / VIRTIO_BLK_T_FLUSH), no data */
    int32_t inflight;
};

struct bq {
    /* ---- configuration, written by Python before bq_run ---- */
    int32_t qidx;
    int32_t format;         /* BQ_FMT_* */
    int32_t event_idx;
    int32_t indirect;
    uint32_t qsize;
    uint8_t *desc;
    uint8_t *avail;
    uint8_t *used;
    int32_t kick_fd;
    int32_t call_fd;
    uint32_t depth;
    struct bq_slot *slots;
    int32_t *head_to_slot;  /* qsize entries, -1 = not a chain head */
    uint32_t *free_stack;   /* depth entries */
    uint32_t hdr_len;
    uint32_t resp_len;
    uint32_t bs;
    uint32_t lbs;           /* LBA unit: the SCSI logical block size; 512 for virtio-blk */
    uint64_t blk_lo;        /* this queue's blocks: [blk_lo, blk_hi) in bs units */
    uint64_t blk_hi;
    int32_t rw;             /* BQ_RW_* */
    int32_t random;
    uint32_t rwmixread;     /* percent of reads when mixed */
    int32_t once;           /* sequential: stop after one pass over [blk_lo, blk_hi) */
    uint32_t flush_every;   /* a flush after every this many writes (0: never) */
    uint32_t since_flush;
    uint64_t seed;          /* verify pattern seed */
    uint64_t rng[4];        /* xoshiro256** state (bq_seed) */
    int32_t verify;
    uint64_t nonce;         /* per-run high half of the generation */
    uint32_t *gens;         /* per block: last completed generation (low half), 0 never, BQ_GEN_UNKNOWN */
    uint8_t *busy;          /* per block: an I/O is in flight (verify) */
    uint64_t ramp_end_ns;   /* CLOCK_MONOTONIC: measurement window [ramp_end_ns, end_ns) */
    uint64_t end_ns;
    uint64_t stall_ns;      /* no completion for this long with requests in flight: fatal */
    uint64_t spin_ns;       /* poll used->idx this long before sleeping on the call eventfd */
    int32_t *stop;          /* set by Python (Ctrl-C): stop submitting, drain */
    /* ---- ring state, carried across calls ---- */
    uint16_t avail_idx;
    uint16_t kick_old;
    uint16_t last_used;
    uint16_t pad0;
    uint32_t nfree;
    uint32_t gen_next;
    uint64_t seq_next;
    /* ---- statistics of the measurement window ---- */
    uint64_t ios;
    uint64_t reads;
    uint64_t writes;
    uint64_t flushes;       /* flushes completed in the window (not counted in ios) */
    uint64_t flush_lat_sum;
    uint64_t bytes;
    uint64_t lat_sum;
    uint64_t lat_min;
    uint64_t lat_max;
    uint64_t *hist;         /* BQ_HIST_N buckets */
    /* ---- whole-call counters ---- */
    uint64_t errors;        /* bad status/response/residual and verify failures (never windowed) */
    uint64_t total_ios;
    uint64_t submitted;
    uint64_t kicks;
    uint64_t waits;
    uint64_t publishes;
    uint64_t reap_batches;
    uint64_t verify_ok;
    uint64_t verify_unwritten;
    uint64_t verify_errors;
    uint64_t win_start_ns;
    uint64_t win_end_ns;
    uint64_t cpu_user_ns0;
    uint64_t cpu_sys_ns0;
    uint64_t cpu_user_ns1;
    uint64_t cpu_sys_ns1;
    /* ---- the first error ---- */
    int32_t fatal;
    int32_t err_kind;       /* BQ_ERR_* */
    uint64_t err_blk;
    int32_t err_is_write;
    int32_t err_status;
    int32_t err_response;
    int32_t err_residual;
    int32_t err_sense_key;
    int32_t err_asc;
    int32_t err_ascq;
    int32_t verr_reason;    /* BQ_VERIFY_* (< 0) */
    uint64_t verr_sector;
    uint64_t verr_expected;
    uint64_t verr_found;
    char msg[200];
};

/* The --loopback device: completes every request at once (one per queue, on
 * its own thread). */
struct bq_dev {
    int32_t format;         /* BQ_FMT_* */
    int32_t event_idx;
    uint32_t qsize;
    uint8_t *desc;
    uint8_t *avail;
    uint8_t *used;
    int32_t kick_fd;
    int32_t call_fd;
    uint64_t gpa_base;      /* one guest memory region: gpa_base .. gpa_base + mem_size */
    uint8_t *host_base;
    uint64_t mem_size;
    uint64_t spin_ns;
    int32_t *stop;
    uint16_t last_avail;
    uint16_t used_idx;
    uint32_t pad0;
    uint64_t served;
    uint64_t calls;
    uint64_t sleeps;
    int32_t fatal;
    char msg[120];
};

void bq_seed(struct bq *q, uint64_t seed);
void bq_reset_stats(struct bq *q);
int bq_run(struct bq *q, int mode);
int bq_hist_index(uint64_t v);
void bq_fill_block(uint8_t *data, uint32_t bs, uint64_t first_sector, uint64_t seed, uint64_t gen);
int bq_check_block(const uint8_t *data, uint32_t bs, uint64_t first_sector, uint64_t seed,
                   uint64_t expected_gen, uint64_t *out);
int bq_loopback(struct bq_dev *d);
uint64_t bq_now_ns(void);
