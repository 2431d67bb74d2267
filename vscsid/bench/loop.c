/*
 * vscsid-bench's hot loop (vscsid.bench._loop, built by _build.py): one call of
 * bq_run() drives one virtqueue (submit, kick, wait, reap, check, time) until
 * its measurement window closes and its in-flight requests are drained. It
 * touches no Python object, so cffi releases the GIL for the whole call and one
 * OS thread per queue runs truly in parallel. vscsid/bench/loops.py keeps a
 * pure-Python implementation of the same loop (--engine python) on top of the
 * driver queue (driverq.py), the readable reference.
 *
 * Shared-memory ordering (virtio 1.x, 2.7.13 / Linux virtio_ring.c), with the
 * shared virtio layer's fences and accesses (vscsid/virtio/fences.h):
 *
 *  - descriptors, request headers and avail ring entries are plain stores,
 *    published by a release store of avail->idx (st16_rel);
 *  - a sequentially consistent fence (vsd_mb) separates that store from the
 *    read of the device's avail_event (or used->flags) for the kick decision,
 *    and the store of used_event (re-enabling notifications) from the re-read
 *    of used->idx before sleeping;
 *  - used->idx is read with an acquire load (ld16_acq) before the used
 *    elements and the response bytes.
 *
 * Also here: the verification pattern (bq_fill_block / bq_check_block), the
 * log-linear latency histogram and the --loopback device (bq_loopback), which
 * completes every request at once to measure the load generator's own ceiling.
 * Constants, structures and entry points: loop.h; ring flags and sizes, the
 * virtio-scsi framing and need_event: vscsid/virtio/virtio.h and fences.h.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <stdio.h>
#include <time.h>
#include <poll.h>
#include <unistd.h>
#include <errno.h>
#include <sys/resource.h>

#include "virtio.h"
#include "fences.h"
#include "loop.h"

_Static_assert(BQ_HIST_N == ((64 - BQ_HIST_SUB_BITS + 1) << BQ_HIST_SUB_BITS), "BQ_HIST_N");
_Static_assert(BQ_CHAIN_LEN == 3, "build_chain writes three descriptors");

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

/* CDB fields are big endian */
static inline void put_be16(uint8_t *p, uint16_t v) { v = __builtin_bswap16(v); memcpy(p, &v, 2); }
static inline void put_be32(uint8_t *p, uint32_t v) { v = __builtin_bswap32(v); memcpy(p, &v, 4); }
static inline void put_be64(uint8_t *p, uint64_t v) { v = __builtin_bswap64(v); memcpy(p, &v, 8); }

/* struct virtq_desc {le64 addr; le32 len; le16 flags; le16 next} */
static inline void put_desc(uint8_t *d, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    st64(d, addr);
    st32(d + 8, len);
    st16(d + 12, flags);
    st16(d + 14, next);
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
/* Each BQ_SECTOR-byte sector: le64 magic, le64 sector, le64 seed, le64 gen, then
 * 60 words of a splitmix64 stream keyed by (seed, sector, gen). */
#define WORDS (BQ_SECTOR / 8)
static inline uint64_t pattern_key(uint64_t sector, uint64_t seed, uint64_t gen)
{
    return seed ^ (sector * 0x9E3779B97F4A7C15ull) ^ (gen * 0xD1B54A32D192ED03ull);
}

void bq_fill_block(uint8_t *data, uint32_t bs, uint64_t first_sector, uint64_t seed, uint64_t gen)
{
    for (uint32_t off = 0; off < bs; off += BQ_SECTOR) {
        uint64_t sector = first_sector + off / BQ_SECTOR;
        uint64_t w[WORDS];
        w[0] = BQ_MAGIC;
        w[1] = sector;
        w[2] = seed;
        w[3] = gen;
        uint64_t x = pattern_key(sector, seed, gen);
        for (int i = 4; i < WORDS; i++)
            w[i] = splitmix64_next(&x);
        memcpy(data + off, w, BQ_SECTOR);
    }
}

/* BQ_VERIFY_OK: every sector carries the pattern (of expected_gen when it is non-zero);
 * BQ_VERIFY_UNWRITTEN: every sector is zero and expected_gen == 0 (never written);
 * < 0: a BQ_VERIFY_* failure.  out[0] = failing sector, out[1] = generation found. */
int bq_check_block(const uint8_t *data, uint32_t bs, uint64_t first_sector, uint64_t seed,
                   uint64_t expected_gen, uint64_t *out)
{
    int zeros = 0, good = 0;
    for (uint32_t off = 0; off < bs; off += BQ_SECTOR) {
        const uint8_t *p = data + off;
        uint64_t sector = first_sector + off / BQ_SECTOR;
        out[0] = sector;
        out[1] = 0;
        if (ld64(p) != BQ_MAGIC) {
            int allzero = 1;
            for (int i = 0; i < BQ_SECTOR; i++)
                if (p[i]) { allzero = 0; break; }
            if (allzero && expected_gen == 0) { zeros++; continue; }
            return BQ_VERIFY_NO_HEADER;
        }
        uint64_t gen = ld64(p + 24);
        out[1] = gen;
        if (ld64(p + 8) != sector) return BQ_VERIFY_WRONG_SECTOR;
        if (ld64(p + 16) != seed) return BQ_VERIFY_WRONG_SEED;
        if (expected_gen && gen != expected_gen) return BQ_VERIFY_WRONG_GEN;
        uint64_t x = pattern_key(sector, seed, gen);
        for (int i = 4; i < WORDS; i++)
            if (ld64(p + 8 * i) != splitmix64_next(&x)) return BQ_VERIFY_CORRUPT;
        good++;
    }
    if (zeros && good) { out[1] = 0; return BQ_VERIFY_PARTLY_WRITTEN; }
    return zeros ? BQ_VERIFY_UNWRITTEN : BQ_VERIFY_OK;
}

/* ------------------------------------------------------------------ chains */
/* The slot's fixed chain: BQ_CHAIN_LEN descriptors from its head (ring
 * descriptors head, head + 1, head + 2), or one INDIRECT descriptor at its head
 * pointing at the slot's table. */
static void build_chain(struct bq *q, struct bq_slot *s, int kind)
{
    uint64_t a[BQ_CHAIN_LEN];
    uint32_t l[BQ_CHAIN_LEN];
    uint16_t f[BQ_CHAIN_LEN];
    int last = BQ_CHAIN_LEN - 1, is_write = kind == 1;
    a[0] = s->hdr_gpa; l[0] = q->hdr_len; f[0] = 0;
    if (kind == 2) {                /* a flush: the header and the response, no data */
        a[1] = s->resp_gpa; f[1] = VIRTQ_DESC_F_WRITE;
        l[1] = q->format == BQ_FMT_SCSI ? q->resp_len : VIRTIO_BLK_STATUS_SIZE;
        last = 1;
    } else if (q->format == BQ_FMT_SCSI) {
        if (is_write) {
            a[1] = s->data_gpa; l[1] = q->bs; f[1] = 0;
            a[2] = s->resp_gpa; l[2] = q->resp_len; f[2] = VIRTQ_DESC_F_WRITE;
        } else {
            a[1] = s->resp_gpa; l[1] = q->resp_len; f[1] = VIRTQ_DESC_F_WRITE;
            a[2] = s->data_gpa; l[2] = q->bs; f[2] = VIRTQ_DESC_F_WRITE;
        }
    } else {
        a[1] = s->data_gpa; l[1] = q->bs; f[1] = is_write ? 0 : VIRTQ_DESC_F_WRITE;
        a[2] = s->resp_gpa; l[2] = VIRTIO_BLK_STATUS_SIZE; f[2] = VIRTQ_DESC_F_WRITE;
    }
    if (q->indirect) {
        for (int i = 0; i <= last; i++)
            put_desc(s->table + VIRTQ_DESC_SIZE * i, a[i], l[i],
                     f[i] | (i < last ? VIRTQ_DESC_F_NEXT : 0), i < last ? i + 1 : 0);
        put_desc(q->desc + VIRTQ_DESC_SIZE * s->head, s->table_gpa, VIRTQ_DESC_SIZE * (last + 1),
                 VIRTQ_DESC_F_INDIRECT, 0);
    } else {
        uint32_t h = s->head;
        for (int i = 0; i <= last; i++)
            put_desc(q->desc + VIRTQ_DESC_SIZE * (h + i), a[i], l[i],
                     f[i] | (i < last ? VIRTQ_DESC_F_NEXT : 0), i < last ? (uint16_t)(h + i + 1) : 0);
    }
    s->dir = kind;
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
    if (mode == BQ_MODE_READBACK) {                    /* read back every block written */
        for (;;) {
            if (q->seq_next >= q->blk_hi) return 0;
            blk = q->seq_next++;
            uint32_t g = q->gens[blk];
            if (g != 0 && g != BQ_GEN_UNKNOWN) break;
        }
        is_write = 0;
    } else {
        if (q->flush_every && q->since_flush >= q->flush_every) {
            q->since_flush = 0;
            s->is_flush = 1;
            s->is_write = 0;
            s->blk = 0;
            return 1;
        }
        if (q->rw == BQ_RW_MIXED) is_write = bounded(q->rng, 100) >= q->rwmixread;
        else is_write = q->rw == BQ_RW_WRITE;
        if (is_write)
            q->since_flush++;
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
    s->is_flush = 0;
    if (q->verify) {
        q->busy[blk] = 1;
        if (is_write) {
            s->gen = (q->nonce << 32) | (uint64_t)(++q->gen_next);
            bq_fill_block(s->data, q->bs, blk * (q->bs / BQ_SECTOR), q->seed, s->gen);
        } else {
            uint32_t g = q->gens[blk];
            s->gen = (g == 0 || g == BQ_GEN_UNKNOWN) ? 0 : ((q->nonce << 32) | g);
        }
    }
    return 1;
}

static inline void prep_header(struct bq *q, struct bq_slot *s)
{
    int kind = s->is_flush ? 2 : s->is_write;
    if (s->is_flush) {
        if (q->format == BQ_FMT_SCSI) {
            uint8_t *cdb = s->hdr + VIRTIO_SCSI_REQ_HDR;
            memset(cdb, 0, 10);
            cdb[0] = 0x35;                              /* SYNCHRONIZE CACHE(10): everything */
            s->resp[VIRTIO_SCSI_RESP_OFF_STATUS] = 0xFF;
            s->resp[VIRTIO_SCSI_RESP_OFF_RESPONSE] = 0xFF;
        } else {
            st32(s->hdr, VIRTIO_BLK_T_FLUSH);
            st32(s->hdr + 4, 0);
            st64(s->hdr + 8, 0);
            s->resp[0] = 0xFF;
        }
        if (s->dir != kind)
            build_chain(q, s, kind);
        return;
    }
    if (q->format == BQ_FMT_SCSI) {
        uint8_t *cdb = s->hdr + VIRTIO_SCSI_REQ_HDR;
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
        s->resp[VIRTIO_SCSI_RESP_OFF_STATUS] = 0xFF;    /* poison status and response */
        s->resp[VIRTIO_SCSI_RESP_OFF_RESPONSE] = 0xFF;
    } else {
        st32(s->hdr, s->is_write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN);
        st32(s->hdr + 4, 0);
        st64(s->hdr + 8, s->blk * (q->bs / VIRTIO_BLK_SECTOR_SIZE));
        s->resp[0] = 0xFF;                              /* poison the status byte */
    }
    if (s->dir != kind)
        build_chain(q, s, kind);
}

static void record_error(struct bq *q, struct bq_slot *s, int kind)
{
    q->errors++;
    if (q->err_kind) return;
    q->err_kind = kind;
    q->err_blk = s->blk;
    q->err_is_write = s->is_write;
    if (q->format == BQ_FMT_SCSI) {
        const uint8_t *r = s->resp;
        q->err_status = r[VIRTIO_SCSI_RESP_OFF_STATUS];
        q->err_response = r[VIRTIO_SCSI_RESP_OFF_RESPONSE];
        q->err_residual = (int32_t)ld32(r + VIRTIO_SCSI_RESP_OFF_RESIDUAL);
        uint32_t sl = ld32(r + VIRTIO_SCSI_RESP_OFF_SENSE_LEN);
        const uint8_t *sense = r + VIRTIO_SCSI_RESP_HDR;
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
    if (q->format == BQ_FMT_SCSI) {
        const uint8_t *r = s->resp;
        if (r[VIRTIO_SCSI_RESP_OFF_RESPONSE] != VIRTIO_SCSI_S_OK) bad = BQ_ERR_RESPONSE;
        else if (r[VIRTIO_SCSI_RESP_OFF_STATUS]) bad = BQ_ERR_STATUS;   /* not GOOD */
        else if (ld32(r + VIRTIO_SCSI_RESP_OFF_RESIDUAL)) bad = BQ_ERR_RESIDUAL;
    } else if (s->resp[0] != VIRTIO_BLK_S_OK) {
        bad = BQ_ERR_BLK_STATUS;
    }
    if (bad)
        record_error(q, s, bad);
    if (s->is_flush) {
        q->total_ios++;
        if (t >= q->ramp_end_ns && t < q->end_ns) {
            q->flushes++;
            q->flush_lat_sum += t - s->start_ns;
        }
        return;
    }
    if (q->verify) {
        uint64_t blk = s->blk;
        if (s->is_write) {
            q->gens[blk] = bad ? BQ_GEN_UNKNOWN : (uint32_t)s->gen;
        } else if (!bad) {
            uint64_t out[2];
            int rc = bq_check_block(s->data, q->bs, blk * (q->bs / BQ_SECTOR), q->seed, s->gen, out);
            if (rc == BQ_VERIFY_OK) q->verify_ok++;
            else if (rc == BQ_VERIFY_UNWRITTEN) q->verify_unwritten++;
            else {
                q->verify_errors++;
                if (!q->verr_reason) {
                    q->verr_reason = rc;
                    q->verr_sector = out[0];
                    q->verr_expected = s->gen;
                    q->verr_found = out[1];
                }
                record_error(q, s, BQ_ERR_VERIFY);
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
    uint16_t uidx = ld16_acq(q->used + 2);                  /* acquire: entries after the index */
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
        uint32_t id = ld32(ring + 8 * ((uint16_t)(last + k) & mask));
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
        st16(q->avail + used_event_off(q->qsize), (uint16_t)(uidx - 1));
    return n;
}

/* Publish added entries and kick the device if it asked for it. */
static void publish_and_kick(struct bq *q)
{
    uint16_t new_idx = q->avail_idx;
    st16_rel(q->avail + 2, new_idx);
    q->publishes++;
    vsd_mb();
    uint16_t old = q->kick_old;
    q->kick_old = new_idx;
    int need;
    if (q->event_idx)
        need = need_event(ld16(q->used + avail_event_off(q->qsize)), new_idx, old);
    else
        need = !(ld16(q->used) & VIRTQ_USED_F_NO_NOTIFY);
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
        st16(q->avail + used_event_off(q->qsize), (uint16_t)(q->last_used - 1));
    else
        st16(q->avail, VIRTQ_AVAIL_F_NO_INTERRUPT);
}

/* Ask for a signal on the next used entry; returns 1 if entries are already there. */
static inline int cb_enable(struct bq *q)
{
    if (q->event_idx)
        st16(q->avail + used_event_off(q->qsize), q->last_used);
    else
        st16(q->avail, 0);
    vsd_mb();
    return ld16(q->used + 2) != q->last_used;
}

/* Wait for used entries (or timeout_ms). Returns -1 on a poll error. */
static int wait_used(struct bq *q, int timeout_ms)
{
    if (q->spin_ns) {
        uint64_t until = bq_now_ns() + q->spin_ns;
        do {
            if (ld16_acq(q->used + 2) != q->last_used) return 0;
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
    q->flushes = q->flush_lat_sum = 0;
    q->lat_min = UINT64_MAX;
    memset(q->hist, 0, sizeof(uint64_t) * BQ_HIST_N);
    q->errors = q->total_ios = q->submitted = q->kicks = q->waits = q->publishes = q->reap_batches = 0;
    q->verify_ok = q->verify_unwritten = q->verify_errors = 0;
    q->win_start_ns = q->win_end_ns = 0;
    q->cpu_user_ns0 = q->cpu_sys_ns0 = q->cpu_user_ns1 = q->cpu_sys_ns1 = 0;
}

/* BQ_MODE_TIMED: timed run (submit until end_ns, then drain); BQ_MODE_READBACK: read back and
 * verify every block this queue wrote (no time limit).  Returns 0, or -1 after a fatal error
 * (msg set). */
int bq_run(struct bq *q, int mode)
{
    int submitting = 1, in_window = 0, rc = 0;
    uint64_t now = bq_now_ns(), last_progress = now;
    if (mode == BQ_MODE_READBACK) {
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
 * Single guest memory region. It exists to measure the bench's own ceiling (the device is never
 * the bottleneck); it walks the chains with the shared ring definitions and trusts nothing it
 * reads (a malformed chain stops it with a message). */
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
        st16(d->used, VIRTQ_USED_F_NO_NOTIFY);
    for (;;) {
        if (__atomic_load_n(d->stop, __ATOMIC_RELAXED))
            return 0;
        uint16_t aidx = ld16_acq(d->avail + 2);
        if (aidx == d->last_avail) {
            uint64_t until = bq_now_ns() + d->spin_ns;
            while (ld16_acq(d->avail + 2) == d->last_avail && bq_now_ns() < until)
                CPU_RELAX();
            if (ld16_acq(d->avail + 2) != d->last_avail)
                continue;
            if (d->event_idx) st16(avail_event_p, d->last_avail); else st16(d->used, 0);
            vsd_mb();
            if (ld16_acq(d->avail + 2) == d->last_avail) {
                struct pollfd pfd = { .fd = d->kick_fd, .events = POLLIN };
                d->sleeps++;
                if (poll(&pfd, 1, 50) > 0) {
                    uint64_t v;
                    if (read(d->kick_fd, &v, 8) < 0 && errno != EAGAIN) {}
                }
            }
            if (!d->event_idx) st16(d->used, VIRTQ_USED_F_NO_NOTIFY);
            continue;
        }
        uint16_t n = (uint16_t)(aidx - d->last_avail);
        if (n > d->qsize) { d->fatal = 1; snprintf(d->msg, sizeof d->msg, "avail idx jumped"); return -1; }
        for (uint16_t k = 0; k < n; k++) {
            uint16_t head = ld16(d->avail + 4 + 2 * ((uint16_t)(d->last_avail + k) & mask));
            if (head >= d->qsize) { d->fatal = 1; snprintf(d->msg, sizeof d->msg, "bad head"); return -1; }
            const uint8_t *tbl = d->desc;
            uint32_t limit = d->qsize, i = head, written = 0, count = 0;
            uint8_t *first_w = NULL, *last_w = NULL;
            uint32_t last_w_len = 0;
            for (;;) {
                const uint8_t *e = tbl + VIRTQ_DESC_SIZE * i;
                uint64_t addr = ld64(e);
                uint32_t len = ld32(e + 8);
                uint16_t flags = ld16(e + 12);
                uint16_t next = ld16(e + 14);
                if (flags & VIRTQ_DESC_F_INDIRECT) {
                    tbl = dev_host(d, addr, len);
                    if (!tbl || len % VIRTQ_DESC_SIZE || !len) { d->fatal = 1; snprintf(d->msg, sizeof d->msg, "bad indirect"); return -1; }
                    limit = len / VIRTQ_DESC_SIZE; i = 0;
                    continue;
                }
                if (++count > limit) { d->fatal = 1; snprintf(d->msg, sizeof d->msg, "chain loop"); return -1; }
                if (flags & VIRTQ_DESC_F_WRITE) {
                    uint8_t *h = dev_host(d, addr, len);
                    if (!h) { d->fatal = 1; snprintf(d->msg, sizeof d->msg, "bad buffer"); return -1; }
                    if (!first_w) first_w = h;
                    last_w = h; last_w_len = len;
                    written += len;
                }
                if (!(flags & VIRTQ_DESC_F_NEXT)) break;
                i = next;
                if (i >= limit) { d->fatal = 1; snprintf(d->msg, sizeof d->msg, "bad next"); return -1; }
            }
            if (d->format == BQ_FMT_SCSI) {
                /* sense_len 0, residual 0, qualifier 0, GOOD, S_OK */
                if (first_w) memset(first_w, 0, VIRTIO_SCSI_RESP_HDR);
            } else if (last_w && last_w_len) {
                last_w[last_w_len - 1] = VIRTIO_BLK_S_OK;
            }
            uint8_t *ue = d->used + 4 + 8 * (d->used_idx & mask);
            st32(ue, head);
            st32(ue + 4, written);
            d->used_idx++;
        }
        d->last_avail = aidx;
        d->served += n;
        st16_rel(d->used + 2, d->used_idx);
        vsd_mb();
        int need;
        if (d->event_idx) need = need_event(ld16(used_event_p), d->used_idx, signalled);
        else need = !(ld16(d->avail) & VIRTQ_AVAIL_F_NO_INTERRUPT);
        signalled = d->used_idx;
        if (need) {
            uint64_t one = 1;
            if (write(d->call_fd, &one, 8) < 0 && errno != EAGAIN) {}
            d->calls++;
        }
    }
}
