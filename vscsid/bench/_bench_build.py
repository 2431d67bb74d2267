"""cffi build script for ``vscsid.bench._benchfast`` (out-of-line API mode).

The hot loop of ``vscsid-bench``: one call of :c:func:`bq_run` drives one
virtqueue (submit, kick, wait, reap, check, time) until its measurement window
closes and its in-flight requests are drained. It touches no Python object, so
cffi releases the GIL for the whole call and one OS thread per queue runs truly
in parallel. :mod:`vscsid.bench.bench` keeps a pure-Python implementation of
the same loop (``--engine python``) as the readable reference.

Shared-memory ordering (virtio 1.x, 2.7.13 / Linux ``virtio_ring.c``) uses the
``__atomic`` builtins:

* descriptors, request headers and avail ring entries are plain stores,
  published by a release store of ``avail->idx``;
* a sequentially consistent fence separates that store from the read of the
  device's ``avail_event`` (or ``used->flags``) for the kick decision, and the
  store of ``used_event`` (re-enabling notifications) from the re-read of
  ``used->idx`` before sleeping;
* ``used->idx`` is read with an acquire load before the used elements and the
  response bytes.

Also here: the verification pattern (:c:func:`bq_fill_block` /
:c:func:`bq_check_block`), the log-linear latency histogram and a trivial
in-process "loopback" device (:c:func:`bq_loopback`) that completes every
request at once, to measure the load generator's own ceiling.
"""
from cffi import FFI

ffibuilder = FFI()

# One text for both cdef and the C source, so the layouts cannot drift apart.
DECLS = r"""
struct bq_slot {
    uint8_t *hdr;           /* request header (virtio-scsi cmd req / virtio-blk outhdr) */
    uint8_t *resp;          /* virtio-scsi cmd resp / virtio-blk status byte */
    uint8_t *data;          /* bs bytes */
    uint8_t *table;         /* 3-entry indirect descriptor table (indirect mode) */
    uint64_t hdr_gpa;
    uint64_t resp_gpa;
    uint64_t data_gpa;
    uint64_t table_gpa;
    uint64_t start_ns;
    uint64_t blk;           /* block number (bs units) of the I/O in flight */
    uint64_t gen;           /* generation written / expected (verify) */
    uint32_t head;          /* ring descriptor index of the chain head */
    int32_t dir;            /* direction the descriptors are built for: -1 none, 0 read, 1 write */
    int32_t is_write;
    int32_t inflight;
};

struct bq {
    /* ---- configuration, written by Python before bq_run ---- */
    int32_t qidx;
    int32_t format;         /* 0 virtio-scsi, 1 virtio-blk */
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
    int32_t rw;             /* 0 read, 1 write, 2 mixed */
    int32_t random;
    uint32_t rwmixread;     /* percent of reads when mixed */
    int32_t once;           /* sequential: stop after one pass over [blk_lo, blk_hi) */
    uint64_t seed;          /* verify pattern seed */
    uint64_t rng[4];        /* xoshiro256** state (bq_seed) */
    int32_t verify;
    uint64_t nonce;         /* per-run high half of the generation */
    uint32_t *gens;         /* per block: last completed generation (low half), 0 never, ~0 unknown */
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
    int32_t err_kind;       /* 1 response, 2 status, 3 residual, 4 blk status, 5 verify */
    uint64_t err_blk;
    int32_t err_is_write;
    int32_t err_status;
    int32_t err_response;
    int32_t err_residual;
    int32_t err_sense_key;
    int32_t err_asc;
    int32_t err_ascq;
    int32_t verr_reason;
    uint64_t verr_sector;
    uint64_t verr_expected;
    uint64_t verr_found;
    char msg[200];
};

struct bq_dev {
    int32_t format;
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
"""

ffibuilder.cdef(DECLS + r"""
#define BQ_HIST_N ...
#define BQ_HIST_SUB_BITS ...
#define BQ_MAGIC ...
#define BQ_GEN_UNKNOWN ...
void bq_seed(struct bq *q, uint64_t seed);
void bq_reset_stats(struct bq *q);
int bq_run(struct bq *q, int mode);
int bq_hist_index(uint64_t v);
void bq_fill_block(uint8_t *data, uint32_t bs, uint64_t first_sector, uint64_t seed, uint64_t gen);
int bq_check_block(const uint8_t *data, uint32_t bs, uint64_t first_sector, uint64_t seed,
                   uint64_t expected_gen, uint64_t *out);
int bq_loopback(struct bq_dev *d);
uint64_t bq_now_ns(void);
""")

SOURCE = r"""
#define _GNU_SOURCE
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <stdio.h>
#include <time.h>
#include <poll.h>
#include <unistd.h>
#include <errno.h>
#include <sys/resource.h>
""" + DECLS + r"""

#define BQ_HIST_SUB_BITS 6
#define BQ_HIST_N ((64 - BQ_HIST_SUB_BITS + 1) << BQ_HIST_SUB_BITS)
#define BQ_MAGIC 0x622d646973637376ULL          /* "vscsid-b" little endian */
#define BQ_GEN_UNKNOWN 0xFFFFFFFFu

#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define CPU_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

/* ------------------------------------------------------------------ helpers */
uint64_t bq_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void thread_cpu(uint64_t *user_ns, uint64_t *sys_ns)
{
    struct rusage ru;
    getrusage(RUSAGE_THREAD, &ru);
    *user_ns = (uint64_t)ru.ru_utime.tv_sec * 1000000000ull + (uint64_t)ru.ru_utime.tv_usec * 1000ull;
    *sys_ns = (uint64_t)ru.ru_stime.tv_sec * 1000000000ull + (uint64_t)ru.ru_stime.tv_usec * 1000ull;
}

static inline uint16_t ld16(const uint8_t *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE); }
static inline uint16_t ld16_relaxed(const uint8_t *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED); }
static inline void st16(uint8_t *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED); }
static inline void st16_release(uint8_t *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE); }
static inline void full_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline uint32_t le32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t le64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void put_le32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put_le64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline void put_be16(uint8_t *p, uint16_t v) { v = __builtin_bswap16(v); memcpy(p, &v, 2); }
static inline void put_be32(uint8_t *p, uint32_t v) { v = __builtin_bswap32(v); memcpy(p, &v, 4); }
static inline void put_be64(uint8_t *p, uint64_t v) { v = __builtin_bswap64(v); memcpy(p, &v, 8); }

/* virtio spec / Linux: notify iff event_idx lies in [old, new) mod 2^16 */
static inline int need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

static inline void put_desc(uint8_t *d, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    memcpy(d, &addr, 8);
    memcpy(d + 8, &len, 4);
    memcpy(d + 12, &flags, 2);
    memcpy(d + 14, &next, 2);
}

/* ------------------------------------------------------------------ PRNG */
static inline uint64_t splitmix64_next(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static inline uint64_t xoshiro_next(uint64_t *s)   /* xoshiro256** */
{
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

/* uniform in [0, n) (Lemire's multiply-high; bias < n / 2^64) */
static inline uint64_t bounded(uint64_t *s, uint64_t n)
{
    return (uint64_t)(((unsigned __int128)xoshiro_next(s) * n) >> 64);
}

void bq_seed(struct bq *q, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        q->rng[i] = splitmix64_next(&x);
}

/* ------------------------------------------------------------------ histogram */
int bq_hist_index(uint64_t v)
{
    if (v < (1u << BQ_HIST_SUB_BITS))
        return (int)v;
    int e = 63 - __builtin_clzll(v);
    int sub = (int)((v >> (e - BQ_HIST_SUB_BITS)) & ((1u << BQ_HIST_SUB_BITS) - 1));
    return ((e - BQ_HIST_SUB_BITS + 1) << BQ_HIST_SUB_BITS) + sub;
}

/* ------------------------------------------------------------------ verify pattern */
/* Each 512-byte sector: le64 magic, le64 sector, le64 seed, le64 gen, then 60
 * words of a splitmix64 stream keyed by (seed, sector, gen). */
static inline uint64_t pattern_key(uint64_t sector, uint64_t seed, uint64_t gen)
{
    return seed ^ (sector * 0x9E3779B97F4A7C15ull) ^ (gen * 0xD1B54A32D192ED03ull);
}

void bq_fill_block(uint8_t *data, uint32_t bs, uint64_t first_sector, uint64_t seed, uint64_t gen)
{
    for (uint32_t off = 0; off < bs; off += 512) {
        uint64_t sector = first_sector + off / 512;
        uint64_t w[64];
        w[0] = BQ_MAGIC;
        w[1] = sector;
        w[2] = seed;
        w[3] = gen;
        uint64_t x = pattern_key(sector, seed, gen);
        for (int i = 4; i < 64; i++)
            w[i] = splitmix64_next(&x);
        memcpy(data + off, w, 512);
    }
}

/* 0: every sector carries the pattern (of expected_gen when it is non-zero);
 * 1: every sector is zero and expected_gen == 0 (never written);
 * <0: failure: -1 no header, -2 wrong sector, -3 wrong seed, -4 stale/unexpected generation,
 *     -5 payload corrupt, -6 partly written.  out[0] = failing sector, out[1] = generation found. */
int bq_check_block(const uint8_t *data, uint32_t bs, uint64_t first_sector, uint64_t seed,
                   uint64_t expected_gen, uint64_t *out)
{
    int zeros = 0, good = 0;
    for (uint32_t off = 0; off < bs; off += 512) {
        const uint8_t *p = data + off;
        uint64_t sector = first_sector + off / 512;
        out[0] = sector;
        out[1] = 0;
        if (le64(p) != BQ_MAGIC) {
            int allzero = 1;
            for (int i = 0; i < 512; i++)
                if (p[i]) { allzero = 0; break; }
            if (allzero && expected_gen == 0) { zeros++; continue; }
            return -1;
        }
        uint64_t gen = le64(p + 24);
        out[1] = gen;
        if (le64(p + 8) != sector) return -2;
        if (le64(p + 16) != seed) return -3;
        if (expected_gen && gen != expected_gen) return -4;
        uint64_t x = pattern_key(sector, seed, gen);
        for (int i = 4; i < 64; i++)
            if (le64(p + 8 * i) != splitmix64_next(&x)) return -5;
        good++;
    }
    if (zeros && good) { out[1] = 0; return -6; }
    return zeros ? 1 : 0;
}

/* ------------------------------------------------------------------ chains */
static void build_chain(struct bq *q, struct bq_slot *s, int is_write)
{
    uint64_t a[3];
    uint32_t l[3];
    uint16_t f[3];
    a[0] = s->hdr_gpa; l[0] = q->hdr_len; f[0] = 0;
    if (q->format == 0) {
        if (is_write) {
            a[1] = s->data_gpa; l[1] = q->bs; f[1] = 0;
            a[2] = s->resp_gpa; l[2] = q->resp_len; f[2] = F_WRITE;
        } else {
            a[1] = s->resp_gpa; l[1] = q->resp_len; f[1] = F_WRITE;
            a[2] = s->data_gpa; l[2] = q->bs; f[2] = F_WRITE;
        }
    } else {
        a[1] = s->data_gpa; l[1] = q->bs; f[1] = is_write ? 0 : F_WRITE;
        a[2] = s->resp_gpa; l[2] = 1; f[2] = F_WRITE;
    }
    if (q->indirect) {
        for (int i = 0; i < 3; i++)
            put_desc(s->table + 16 * i, a[i], l[i], f[i] | (i < 2 ? F_NEXT : 0), i < 2 ? i + 1 : 0);
        put_desc(q->desc + 16 * s->head, s->table_gpa, 48, F_INDIRECT, 0);
    } else {
        uint32_t h = s->head;
        for (int i = 0; i < 3; i++)
            put_desc(q->desc + 16 * (h + i), a[i], l[i], f[i] | (i < 2 ? F_NEXT : 0),
                     i < 2 ? (uint16_t)(h + i + 1) : 0);
    }
    s->dir = is_write;
}

static void set_error(struct bq *q, const char *m)
{
    if (!q->fatal) {
        q->fatal = 1;
        snprintf(q->msg, sizeof q->msg, "%s", m);
    }
}

/* Choose the next I/O for slot s. Returns 0 when there is no more work. */
static int pick(struct bq *q, struct bq_slot *s, int mode)
{
    uint64_t blk;
    int is_write;
    if (mode == 1) {                                   /* read back every block written */
        for (;;) {
            if (q->seq_next >= q->blk_hi) return 0;
            blk = q->seq_next++;
            uint32_t g = q->gens[blk];
            if (g != 0 && g != BQ_GEN_UNKNOWN) break;
        }
        is_write = 0;
    } else {
        if (q->rw == 2) is_write = bounded(q->rng, 100) >= q->rwmixread;
        else is_write = q->rw == 1;
        uint64_t n = q->blk_hi - q->blk_lo;
        if (q->random) {
            blk = q->blk_lo + bounded(q->rng, n);
            if (q->verify) {
                int tries = 0;
                while (q->busy[blk]) {
                    if (++tries < 16) blk = q->blk_lo + bounded(q->rng, n);
                    else blk = blk + 1 < q->blk_hi ? blk + 1 : q->blk_lo;
                }
            }
        } else {
            for (;;) {
                if (q->seq_next >= q->blk_hi) {
                    if (q->once) return 0;
                    q->seq_next = q->blk_lo;
                }
                blk = q->seq_next++;
                if (!q->verify || !q->busy[blk]) break;
            }
        }
    }
    s->blk = blk;
    s->is_write = is_write;
    if (q->verify) {
        q->busy[blk] = 1;
        if (is_write) {
            s->gen = (q->nonce << 32) | (uint64_t)(++q->gen_next);
            bq_fill_block(s->data, q->bs, blk * (q->bs / 512), q->seed, s->gen);
        } else {
            uint32_t g = q->gens[blk];
            s->gen = (g == 0 || g == BQ_GEN_UNKNOWN) ? 0 : ((q->nonce << 32) | g);
        }
    }
    return 1;
}

static inline void prep_header(struct bq *q, struct bq_slot *s)
{
    if (q->format == 0) {
        uint8_t *cdb = s->hdr + 19;
        uint32_t nlb = q->bs / q->lbs;
        uint64_t lba = s->blk * nlb;
        if (lba + nlb <= 0xFFFFFFFFull && nlb <= 0xFFFF) {
            cdb[0] = s->is_write ? 0x2A : 0x28;        /* WRITE(10) / READ(10) */
            cdb[1] = 0;
            put_be32(cdb + 2, (uint32_t)lba);
            cdb[6] = 0;
            put_be16(cdb + 7, (uint16_t)nlb);
            memset(cdb + 9, 0, 7);
        } else {
            cdb[0] = s->is_write ? 0x8A : 0x88;        /* WRITE(16) / READ(16) */
            cdb[1] = 0;
            put_be64(cdb + 2, lba);
            put_be32(cdb + 10, nlb);
            cdb[14] = 0;
            cdb[15] = 0;
        }
        s->resp[10] = 0xFF;                             /* poison status and response */
        s->resp[11] = 0xFF;
    } else {
        put_le32(s->hdr, s->is_write ? 1 : 0);          /* VIRTIO_BLK_T_OUT / _IN */
        put_le32(s->hdr + 4, 0);
        put_le64(s->hdr + 8, s->blk * (q->bs / 512));
        s->resp[0] = 0xFF;                              /* poison the status byte */
    }
    if (s->dir != s->is_write)
        build_chain(q, s, s->is_write);
}

static void record_error(struct bq *q, struct bq_slot *s, int kind)
{
    q->errors++;
    if (q->err_kind) return;
    q->err_kind = kind;
    q->err_blk = s->blk;
    q->err_is_write = s->is_write;
    if (q->format == 0) {
        const uint8_t *r = s->resp;
        q->err_status = r[10];
        q->err_response = r[11];
        q->err_residual = (int32_t)le32(r + 4);
        uint32_t sl = le32(r);
        const uint8_t *sense = r + 12;
        if (sl >= 14 && ((sense[0] & 0x7F) == 0x70 || (sense[0] & 0x7F) == 0x71)) {
            q->err_sense_key = sense[2] & 0x0F; q->err_asc = sense[12]; q->err_ascq = sense[13];
        } else if (sl >= 4 && ((sense[0] & 0x7F) == 0x72 || (sense[0] & 0x7F) == 0x73)) {
            q->err_sense_key = sense[1] & 0x0F; q->err_asc = sense[2]; q->err_ascq = sense[3];
        } else {
            q->err_sense_key = -1; q->err_asc = -1; q->err_ascq = -1;
        }
    } else {
        q->err_status = s->resp[0];
    }
}

static inline void complete(struct bq *q, struct bq_slot *s, uint64_t t)
{
    int bad = 0;
    if (q->format == 0) {
        const uint8_t *r = s->resp;
        if (r[11]) bad = 1;
        else if (r[10]) bad = 2;
        else if (le32(r + 4)) bad = 3;
    } else if (s->resp[0]) {
        bad = 4;
    }
    if (bad)
        record_error(q, s, bad);
    if (q->verify) {
        uint64_t blk = s->blk;
        if (s->is_write) {
            q->gens[blk] = bad ? BQ_GEN_UNKNOWN : (uint32_t)s->gen;
        } else if (!bad) {
            uint64_t out[2];
            int rc = bq_check_block(s->data, q->bs, blk * (q->bs / 512), q->seed, s->gen, out);
            if (rc == 0) q->verify_ok++;
            else if (rc == 1) q->verify_unwritten++;
            else {
                q->verify_errors++;
                if (!q->verr_reason) {
                    q->verr_reason = rc;
                    q->verr_sector = out[0];
                    q->verr_expected = s->gen;
                    q->verr_found = out[1];
                }
                record_error(q, s, 5);
            }
        }
        q->busy[blk] = 0;
    }
    q->total_ios++;
    if (t >= q->ramp_end_ns && t < q->end_ns) {
        uint64_t lat = t - s->start_ns;
        q->ios++;
        q->bytes += q->bs;
        if (s->is_write) q->writes++; else q->reads++;
        q->lat_sum += lat;
        if (lat < q->lat_min) q->lat_min = lat;
        if (lat > q->lat_max) q->lat_max = lat;
        q->hist[bq_hist_index(lat)]++;
    }
}

/* Consume used entries. Returns the number reaped, -1 on a device protocol error. */
static int reap(struct bq *q)
{
    uint16_t uidx = ld16(q->used + 2);                  /* acquire: entries after the index */
    uint16_t last = q->last_used;
    if (uidx == last)
        return 0;
    uint16_t n = (uint16_t)(uidx - last);
    if (UNLIKELY(n > q->depth - q->nfree)) {
        char m[160];
        snprintf(m, sizeof m, "used->idx moved by %u but only %u requests are in flight",
                 (unsigned)n, q->depth - q->nfree);
        set_error(q, m);
        return -1;
    }
    uint64_t t = bq_now_ns();
    uint32_t mask = q->qsize - 1;
    const uint8_t *ring = q->used + 4;
    for (uint16_t k = 0; k < n; k++) {
        uint32_t id = le32(ring + 8 * ((uint16_t)(last + k) & mask));
        int32_t si = id < q->qsize ? q->head_to_slot[id] : -1;
        struct bq_slot *s = si >= 0 ? &q->slots[si] : NULL;
        if (UNLIKELY(!s || !s->inflight)) {
            char m[160];
            snprintf(m, sizeof m, "used element id %u is not an in-flight chain head", id);
            q->last_used = (uint16_t)(last + k);
            set_error(q, m);
            return -1;
        }
        s->inflight = 0;
        complete(q, s, t);
        q->free_stack[q->nfree++] = (uint32_t)si;
    }
    q->last_used = uidx;
    q->reap_batches++;
    if (q->event_idx)                                   /* keep the device quiet while we are busy */
        st16(q->avail + 4 + 2 * q->qsize, (uint16_t)(uidx - 1));
    return n;
}

/* Publish added entries and kick the device if it asked for it. */
static void publish_and_kick(struct bq *q)
{
    uint16_t new_idx = q->avail_idx;
    st16_release(q->avail + 2, new_idx);
    q->publishes++;
    full_fence();
    uint16_t old = q->kick_old;
    q->kick_old = new_idx;
    int need;
    if (q->event_idx)
        need = need_event(ld16_relaxed(q->used + 4 + 8 * q->qsize), new_idx, old);
    else
        need = !(ld16_relaxed(q->used) & USED_F_NO_NOTIFY);
    if (need) {
        uint64_t one = 1;
        if (write(q->kick_fd, &one, 8) != 8 && errno != EAGAIN)
            set_error(q, "write to the kick eventfd failed");
        q->kicks++;
    }
}

static inline void cb_disable(struct bq *q)
{
    if (q->event_idx)
        st16(q->avail + 4 + 2 * q->qsize, (uint16_t)(q->last_used - 1));
    else
        st16(q->avail, AVAIL_F_NO_INTERRUPT);
}

/* Ask for a signal on the next used entry; returns 1 if entries are already there. */
static inline int cb_enable(struct bq *q)
{
    if (q->event_idx)
        st16(q->avail + 4 + 2 * q->qsize, q->last_used);
    else
        st16(q->avail, 0);
    full_fence();
    return ld16_relaxed(q->used + 2) != q->last_used;
}

/* Wait for used entries (or timeout_ms). Returns -1 on a poll error. */
static int wait_used(struct bq *q, int timeout_ms)
{
    if (q->spin_ns) {
        uint64_t until = bq_now_ns() + q->spin_ns;
        do {
            if (ld16_relaxed(q->used + 2) != q->last_used) return 0;
            CPU_RELAX();
        } while (bq_now_ns() < until);
    }
    if (cb_enable(q)) { cb_disable(q); return 0; }
    q->waits++;
    struct pollfd pfd = { .fd = q->call_fd, .events = POLLIN };
    int rc = poll(&pfd, 1, timeout_ms);
    if (rc < 0 && errno != EINTR) { cb_disable(q); set_error(q, "poll on the call eventfd failed"); return -1; }
    if (rc > 0) {
        uint64_t v;
        if (read(q->call_fd, &v, 8) < 0 && errno != EAGAIN) {
            cb_disable(q); set_error(q, "read of the call eventfd failed"); return -1;
        }
    }
    cb_disable(q);
    return 0;
}

void bq_reset_stats(struct bq *q)
{
    q->ios = q->reads = q->writes = q->bytes = q->lat_sum = q->lat_max = 0;
    q->lat_min = UINT64_MAX;
    memset(q->hist, 0, sizeof(uint64_t) * BQ_HIST_N);
    q->errors = q->total_ios = q->submitted = q->kicks = q->waits = q->publishes = q->reap_batches = 0;
    q->verify_ok = q->verify_unwritten = q->verify_errors = 0;
    q->win_start_ns = q->win_end_ns = 0;
    q->cpu_user_ns0 = q->cpu_sys_ns0 = q->cpu_user_ns1 = q->cpu_sys_ns1 = 0;
}

/* mode 0: timed run (submit until end_ns, then drain); mode 1: read back and verify every block
 * this queue wrote (no time limit).  Returns 0, or -1 after a fatal error (msg set). */
int bq_run(struct bq *q, int mode)
{
    int submitting = 1, in_window = 0, rc = 0;
    uint64_t now = bq_now_ns(), last_progress = now;
    if (mode == 1) {
        q->seq_next = q->blk_lo;
        q->ramp_end_ns = 0;
        q->end_ns = UINT64_MAX;
    }
    cb_disable(q);
    for (;;) {
        if (__atomic_load_n(q->stop, __ATOMIC_RELAXED))
            submitting = 0;
        int reaped = reap(q);
        if (reaped < 0) { rc = -1; break; }
        now = bq_now_ns();
        if (!in_window && now >= q->ramp_end_ns) {
            in_window = 1;
            q->win_start_ns = now;
            thread_cpu(&q->cpu_user_ns0, &q->cpu_sys_ns0);
        }
        if (in_window == 1 && now >= q->end_ns) {
            in_window = 2;
            q->win_end_ns = now;
            thread_cpu(&q->cpu_user_ns1, &q->cpu_sys_ns1);
            submitting = 0;
        }
        int added = 0;
        if (submitting) {
            uint32_t mask = q->qsize - 1;
            while (q->nfree) {
                struct bq_slot *s = &q->slots[q->free_stack[q->nfree - 1]];
                if (!pick(q, s, mode)) { submitting = 0; break; }
                q->nfree--;
                prep_header(q, s);
                s->start_ns = now;
                s->inflight = 1;
                st16(q->avail + 4 + 2 * (q->avail_idx & mask), (uint16_t)s->head);
                q->avail_idx++;
                added++;
            }
            if (added) {
                q->submitted += added;
                publish_and_kick(q);
            }
        }
        if (q->nfree == q->depth && !submitting)
            break;
        if (reaped || added) {
            last_progress = now;
            continue;
        }
        if (now - last_progress > q->stall_ns) {
            char m[160];
            snprintf(m, sizeof m, "no completion for %.1f s with %u requests in flight",
                     (double)(now - last_progress) / 1e9, q->depth - q->nfree);
            set_error(q, m);
            rc = -1;
            break;
        }
        if (wait_used(q, 100) < 0) { rc = -1; break; }
    }
    now = bq_now_ns();
    if (in_window == 1) {          /* ended early (stop flag, once, readback, error) */
        q->win_end_ns = now;
        thread_cpu(&q->cpu_user_ns1, &q->cpu_sys_ns1);
    } else if (in_window == 0) {
        q->win_start_ns = q->win_end_ns = now;
    }
    return rc;
}

/* ------------------------------------------------------------------ loopback device */
/* Completes every request at once without touching data: status OK, used len = writable bytes.
 * Single guest memory region. */
static inline uint8_t *dev_host(struct bq_dev *d, uint64_t gpa, uint64_t len)
{
    if (gpa < d->gpa_base || gpa - d->gpa_base > d->mem_size || len > d->mem_size - (gpa - d->gpa_base))
        return NULL;
    return d->host_base + (gpa - d->gpa_base);
}

int bq_loopback(struct bq_dev *d)
{
    uint32_t mask = d->qsize - 1;
    uint8_t *used_event_p = d->avail + 4 + 2 * d->qsize;
    uint8_t *avail_event_p = d->used + 4 + 8 * d->qsize;
    uint16_t signalled = d->used_idx;
    if (!d->event_idx)
        st16(d->used, USED_F_NO_NOTIFY);
    for (;;) {
        if (__atomic_load_n(d->stop, __ATOMIC_RELAXED))
            return 0;
        uint16_t aidx = ld16(d->avail + 2);
        if (aidx == d->last_avail) {
            uint64_t until = bq_now_ns() + d->spin_ns;
            while (ld16(d->avail + 2) == d->last_avail && bq_now_ns() < until)
                CPU_RELAX();
            if (ld16(d->avail + 2) != d->last_avail)
                continue;
            if (d->event_idx) st16(avail_event_p, d->last_avail); else st16(d->used, 0);
            full_fence();
            if (ld16(d->avail + 2) == d->last_avail) {
                struct pollfd pfd = { .fd = d->kick_fd, .events = POLLIN };
                d->sleeps++;
                if (poll(&pfd, 1, 50) > 0) {
                    uint64_t v;
                    if (read(d->kick_fd, &v, 8) < 0 && errno != EAGAIN) {}
                }
            }
            if (!d->event_idx) st16(d->used, USED_F_NO_NOTIFY);
            continue;
        }
        uint16_t n = (uint16_t)(aidx - d->last_avail);
        if (n > d->qsize) { d->fatal = 1; snprintf(d->msg, sizeof d->msg, "avail idx jumped"); return -1; }
        for (uint16_t k = 0; k < n; k++) {
            uint16_t head = ld16_relaxed(d->avail + 4 + 2 * ((uint16_t)(d->last_avail + k) & mask));
            if (head >= d->qsize) { d->fatal = 1; snprintf(d->msg, sizeof d->msg, "bad head"); return -1; }
            const uint8_t *tbl = d->desc;
            uint32_t limit = d->qsize, i = head, written = 0, count = 0;
            uint8_t *first_w = NULL, *last_w = NULL;
            uint32_t last_w_len = 0;
            for (;;) {
                const uint8_t *e = tbl + 16 * i;
                uint64_t addr = le64(e);
                uint32_t len = le32(e + 8);
                uint16_t flags, next;
                memcpy(&flags, e + 12, 2);
                memcpy(&next, e + 14, 2);
                if (flags & F_INDIRECT) {
                    tbl = dev_host(d, addr, len);
                    if (!tbl || len % 16 || !len) { d->fatal = 1; snprintf(d->msg, sizeof d->msg, "bad indirect"); return -1; }
                    limit = len / 16; i = 0;
                    continue;
                }
                if (++count > limit) { d->fatal = 1; snprintf(d->msg, sizeof d->msg, "chain loop"); return -1; }
                if (flags & F_WRITE) {
                    uint8_t *h = dev_host(d, addr, len);
                    if (!h) { d->fatal = 1; snprintf(d->msg, sizeof d->msg, "bad buffer"); return -1; }
                    if (!first_w) first_w = h;
                    last_w = h; last_w_len = len;
                    written += len;
                }
                if (!(flags & F_NEXT)) break;
                i = next;
                if (i >= limit) { d->fatal = 1; snprintf(d->msg, sizeof d->msg, "bad next"); return -1; }
            }
            if (d->format == 0) {
                if (first_w) memset(first_w, 0, 12);    /* virtio-scsi resp header: all OK */
            } else if (last_w && last_w_len) {
                last_w[last_w_len - 1] = 0;             /* virtio-blk status: OK */
            }
            uint8_t *ue = d->used + 4 + 8 * (d->used_idx & mask);
            uint32_t id = head;
            memcpy(ue, &id, 4);
            memcpy(ue + 4, &written, 4);
            d->used_idx++;
        }
        d->last_avail = aidx;
        d->served += n;
        st16_release(d->used + 2, d->used_idx);
        full_fence();
        int need;
        if (d->event_idx) need = need_event(ld16_relaxed(used_event_p), d->used_idx, signalled);
        else need = !(ld16_relaxed(d->avail) & AVAIL_F_NO_INTERRUPT);
        signalled = d->used_idx;
        if (need) {
            uint64_t one = 1;
            if (write(d->call_fd, &one, 8) < 0 && errno != EAGAIN) {}
            d->calls++;
        }
    }
}
"""

ffibuilder.set_source("vscsid.bench._benchfast", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
