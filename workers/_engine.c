/*
 * vscsid data-plane fast path (compiled by cffi into vscsid.workers._fast).
 *
 * This is the C twin of the Python reference in virtqueue.py, request.py and
 * worker.py: it pops descriptor chains from the split ring, validates them the
 * same way, and serves the common case -- READ/WRITE(10/16) of whole blocks on a
 * plain LUN, with exactly-sized data buffers -- straight from the backing file
 * into guest memory. Every other request (any other opcode, odd flags or
 * layouts, errors, out-of-range LBAs, bad chains) is handed back to Python,
 * which produces the exact SCSI/virtio answer. So the C code never has to be
 * right about an error case: when in doubt it punts.
 *
 * The guest is untrusted: descriptors are read once into locals, every buffer
 * is translated through the region table with overflow checks, chains are
 * bounded by the table they walk, and indices are masked.
 *
 * Injected latency (delay_us) and real asynchronous I/O use io_uring when the
 * kernel allows it: requests stay in flight and complete out of order.
 */
#include <errno.h>
#include <stdlib.h>
#include <poll.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <linux/io_uring.h>
#include <linux/fs.h>

#include "virtio.h"
#include "fences.h"
#include "_engine.h"

/* the engine's names for the fences */
#define mb vsd_mb
#define rmb vsd_rmb
#define wmb vsd_wmb

static inline uint32_t be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint64_t be64(const uint8_t *p)
{
    return ((uint64_t)be32(p) << 32) | be32(p + 4);
}

/* Test builds (the fuzzer, the C self-tests) define VSD_HOOK to let an adversary
 * rewrite guest memory at the points where the engine has just read it. */
#ifndef VSD_HOOK
#define VSD_HOOK(q, what, ptr) ((void)0)
#endif

/* ------------------------------------------------------------------ memory */

/* The region holding gpa, or NULL. Up to VSD_MAX_REGIONS regions (memory
 * hotplug, virtio-mem): the region of the previous hit is tried first, which
 * is where nearly every buffer of a guest's request lies. */
static inline struct vsd_region *find_region(struct vsd_queue *q, uint64_t gpa)
{
    int i, n = q->nregions;
    struct vsd_region *r;
    if (q->last_region >= 0 && q->last_region < n) {
        r = &q->regions[q->last_region];
        if (gpa >= r->gpa && gpa - r->gpa < r->size)
            return r;
    }
    for (i = 0; i < n; i++) {
        r = &q->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size) {
            q->last_region = i;
            return r;
        }
    }
    return NULL;
}

/* Translate [gpa, gpa+len) into iovecs (split at region ends). -1 if not all inside. */
static int translate(struct vsd_queue *q, uint64_t gpa, uint32_t len,
                     struct iovec *iov, int *niov, int max)
{
    while (len) {
        struct vsd_region *r;
        uint64_t off, n;
        if (gpa + len < gpa)
            return -1;
        r = find_region(q, gpa);
        if (!r)
            return -1;
        off = gpa - r->gpa;
        n = r->size - off;
        if (n > len)
            n = len;
        if (*niov >= max)
            return -2;
        iov[*niov].iov_base = r->host + off;
        iov[*niov].iov_len = n;
        (*niov)++;
        gpa += n;
        len -= (uint32_t)n;
    }
    return 0;
}

static uint8_t *translate_one(struct vsd_queue *q, uint64_t gpa, uint64_t len)
{
    struct vsd_region *r;
    if (gpa + len < gpa)
        return NULL;
    r = find_region(q, gpa);
    if (r && len <= r->size - (gpa - r->gpa))
        return r->host + (gpa - r->gpa);
    return NULL;
}

/* ------------------------------------------------------------------ chains */

struct chain {
    struct iovec out[VSD_MAX_IOV];
    struct iovec in[VSD_MAX_IOV];
    int nout, nin;
    uint64_t out_len, in_len;
};

/* 0 = ok, -1 = malformed (Python will fail it), -2 = too many segments (Python handles) */
static int walk(struct vsd_queue *q, uint16_t head, struct chain *c)
{
    const uint8_t *table = q->desc;
    uint32_t limit = q->size, i = head, count = 0;
    int indirect = 0;
    c->nout = c->nin = 0;
    c->out_len = c->in_len = 0;
    for (;;) {
        const uint8_t *d = table + VIRTQ_DESC_SIZE * (size_t)i;
        uint64_t addr = ld64(d);
        uint32_t len = ld32(d + 8);
        uint16_t flags = ld16(d + 12);
        uint16_t next = ld16(d + 14);
        VSD_HOOK(q, "desc", (uint8_t *)d);      /* each descriptor is read once, above */
        if (flags & VIRTQ_DESC_F_INDIRECT) {
            if (indirect || count || (flags & VIRTQ_DESC_F_NEXT) || len == 0 || (len & 15)
                || len / 16 > 32768)
                return -1;
            table = translate_one(q, addr, len);
            if (!table)
                return -1;
            indirect = 1;
            limit = len / 16;
            i = 0;
            continue;
        }
        if (++count > limit)
            return -1;
        if (len) {
            int r;
            if (flags & VIRTQ_DESC_F_WRITE) {
                r = translate(q, addr, len, c->in, &c->nin, VSD_MAX_IOV);
                c->in_len += len;
            } else {
                if (c->nin)
                    return -1;
                r = translate(q, addr, len, c->out, &c->nout, VSD_MAX_IOV);
                c->out_len += len;
            }
            if (r)
                return r;
        }
        if (!(flags & VIRTQ_DESC_F_NEXT))
            break;
        if (next >= limit)
            return -1;
        i = next;
    }
    return 0;
}

/* Copy the first n bytes of an iovec list into dst (n <= total). */
static void gather(const struct iovec *iov, int niov, uint8_t *dst, size_t n)
{
    int k;
    for (k = 0; k < niov && n; k++) {
        size_t t = iov[k].iov_len < n ? iov[k].iov_len : n;
        memcpy(dst, iov[k].iov_base, t);
        dst += t;
        n -= t;
    }
}

/* Drop the first `skip` bytes of an iovec list in place; returns the new count. */
static int skip_iov(struct iovec *iov, int niov, size_t skip)
{
    int k = 0, j;
    while (k < niov && skip >= iov[k].iov_len) {
        skip -= iov[k].iov_len;
        k++;
    }
    if (k < niov && skip) {
        iov[k].iov_base = (uint8_t *)iov[k].iov_base + skip;
        iov[k].iov_len -= skip;
    }
    for (j = 0; k < niov; j++, k++)
        iov[j] = iov[k];
    return j;
}

/* ------------------------------------------------------------------ inflight + used ring */

static inline uint8_t *inflight_entry(struct vsd_queue *q, uint16_t head)
{
    return q->inflight + VSD_INFLIGHT_HEADER + VSD_INFLIGHT_DESC * (size_t)head;
}

/* A head popped from the available ring: mark it in flight (a new request:
 * never resubmitted). */
static inline void inflight_get(struct vsd_queue *q, uint16_t head)
{
    if (q->inflight) {
        uint8_t *e = inflight_entry(q, head);
        uint64_t ctr = ++q->counter;
        memcpy(e + VSD_INFLIGHT_E_COUNTER, &ctr, 8);
        e[VSD_INFLIGHT_E_RESUBMITS] = 0;
        e[VSD_INFLIGHT_E_INFLIGHT] = 1;
    }
}

/* Take a head that the driver did not just offer (a request recovered from the
 * inflight region after a crash): it must not be held already. 0 or -1. */
int vsd_claim(struct vsd_queue *q, uint16_t head)
{
    if (head >= q->size || q->hstate[head] != VSD_HEAD_FREE)
        return -1;
    q->hstate[head] = VSD_HEAD_BUSY;
    return 0;
}

/* Stage a used element for a head being served. Returns -1 (and writes
 * nothing) for a head that is not BUSY: nothing can be completed twice, and
 * the staged entries never exceed the queue size. */
static int push(struct vsd_queue *q, uint16_t head, uint32_t written)
{
    uint8_t *e;
    if (head >= q->size || q->hstate[head] != VSD_HEAD_BUSY || q->ncompleted >= q->size)
        return -1;
    e = q->used + 4 + 8 * (size_t)(q->used_idx & q->mask);
    st32(e, head);
    st32(e + 4, written);
    q->used_idx++;
    q->hstate[head] = VSD_HEAD_DONE;
    q->completed[q->ncompleted++] = head;
    return 0;
}

static int async_active(struct vsd_queue *q, uint16_t head);

/* The reference path completes a head it served: never one whose I/O the
 * engine has in flight (its completion would later land on a reused head). */
int vsd_push(struct vsd_queue *q, uint16_t head, uint32_t written)
{
    if (async_active(q, head))
        return -1;
    return push(q, head, written);
}

/* Publish pushed entries; clear them in the inflight region; signal if wanted.
 * Returns 1 if the call eventfd was written. */
int vsd_flush(struct vsd_queue *q)
{
    uint32_t k;
    uint16_t old, new_idx;
    int notify;
    if (!q->ncompleted)
        return 0;
    st16_rel(q->used + 2, q->used_idx);
    if (q->inflight) {
        st16(q->inflight + VSD_INFLIGHT_OFF_LAST_BATCH, q->completed[q->ncompleted - 1]);
        for (k = 0; k < q->ncompleted; k++)
            inflight_entry(q, q->completed[k])[VSD_INFLIGHT_E_INFLIGHT] = 0;
        st16(q->inflight + VSD_INFLIGHT_OFF_USED_IDX, q->used_idx);
    }
    for (k = 0; k < q->ncompleted; k++)
        q->hstate[q->completed[k]] = VSD_HEAD_FREE;     /* the driver owns them again */
    q->ncompleted = 0;
    q->st->q.batches++;
    mb();
    if (q->event_idx) {
        old = q->signalled_used;
        new_idx = q->signalled_used = q->used_idx;
        if (!q->signalled_valid) {
            q->signalled_valid = 1;
            notify = 1;
        } else {
            uint16_t ev = ld16(q->avail + used_event_off(q->size));
            notify = need_event(ev, new_idx, old);
        }
    } else {
        notify = !(ld16(q->avail) & VIRTQ_AVAIL_F_NO_INTERRUPT);
    }
    if (notify && q->call_fd >= 0) {
        uint64_t one = 1;
        if (write(q->call_fd, &one, 8) == 8) {
            q->st->q.calls++;
            q->call_used = q->used_idx;
        }
        return 1;
    }
    return 0;
}

/* Before the queue sleeps: has the driver asked for a call that was never sent?
 * With EVENT_IDX, its used_event names an entry published since the last call;
 * without, interrupts are enabled and entries were published since. A driver
 * whose store of used_event (or of avail->flags) became visible only after
 * vsd_flush read it -- a guest that orders its own stores and loads wrongly, as
 * QEMU 7.2's TCG does for a one-vCPU guest -- would otherwise wait forever
 * with every completion published. A needless call is harmless. Returns 1 if
 * the call eventfd was written. */
int vsd_late_call(struct vsd_queue *q)
{
    uint64_t one = 1;
    int wanted;
    if (q->call_fd < 0 || q->ncompleted || q->used_idx == q->call_used)
        return 0;
    mb();
    if (q->event_idx)
        wanted = q->signalled_valid
                 && need_event(ld16(q->avail + used_event_off(q->size)), q->used_idx,
                               q->call_used);
    else
        wanted = !(ld16(q->avail) & VIRTQ_AVAIL_F_NO_INTERRUPT);
    if (!wanted)
        return 0;
    /* counted first: whoever the call wakes sees it counted */
    q->st->q.calls++;
    q->st->q.late_calls++;
    if (write(q->call_fd, &one, 8) != 8) {
        q->st->q.calls--;
        q->st->q.late_calls--;
        return 0;
    }
    q->call_used = q->used_idx;
    return 1;
}

static void disable_kicks(struct vsd_queue *q)
{
    if (!q->event_idx)
        st16(q->used, VIRTQ_USED_F_NO_NOTIFY);
}

/* Returns 1 if more work arrived meanwhile. */
static int enable_kicks(struct vsd_queue *q)
{
    if (q->event_idx)
        st16(q->used + avail_event_off(q->size), q->last_avail);
    else
        st16(q->used, 0);
    mb();
    return ld16_acq(q->avail + 2) != q->last_avail;
}

/* ------------------------------------------------------------------ io_uring (raw syscalls) */

enum { IO_READ, IO_WRITE, IO_FSYNC };

struct vsd_io {
    uint16_t head;
    uint16_t active;       /* submitted and not reaped yet */
    uint32_t written;      /* bytes to report in the used entry on success */
    uint64_t expect;       /* bytes the I/O must transfer (what an inline attempt left) */
    uint64_t bytes;        /* bytes of the request, for the statistics */
    uint8_t *resp;         /* response header (VIRTIO_SCSI_RESP_HDR bytes) */
    int kind;              /* IO_* */
    uint16_t slot;         /* the LUN's slot (statistics) */
    uint64_t t0;           /* when it started, if timed (0: not timed) */
    struct iovec iov[VSD_MAX_IOV];
    int niov;
    struct __kernel_timespec ts;
};

struct vsd_uring {
    int fd;
    unsigned sq_entries, cq_entries;
    uint8_t *sq_ring, *cq_ring;
    size_t sq_ring_sz, cq_ring_sz;
    struct io_uring_sqe *sqes;
    size_t sqes_sz;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    /* Our submission tail: SQEs up to here are prepared. submit() publishes it;
     * the kernel consumes from *sq_head, and whatever one io_uring_enter did not
     * consume stays published and is passed again by the next submit(). */
    unsigned tail;
    unsigned nheads;
    struct vsd_io *ios;          /* one per descriptor head */
    int event_fd;
};

static int sys_setup(unsigned entries, struct io_uring_params *p)
{
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags)
{
    return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
}

static int sys_register(int fd, unsigned op, void *arg, unsigned n)
{
    return (int)syscall(__NR_io_uring_register, fd, op, arg, n);
}

void vsd_uring_free(struct vsd_uring *u)
{
    if (!u)
        return;
    if (u->sqes && u->sqes != MAP_FAILED)
        munmap(u->sqes, u->sqes_sz);
    if (u->cq_ring && u->cq_ring != MAP_FAILED && u->cq_ring != u->sq_ring)
        munmap(u->cq_ring, u->cq_ring_sz);
    if (u->sq_ring && u->sq_ring != MAP_FAILED)
        munmap(u->sq_ring, u->sq_ring_sz);
    if (u->fd >= 0)
        close(u->fd);
    free(u->ios);
    free(u);
}

/* A ring of `entries` SQEs (>= 2 per head: a latency timer and the I/O) with
 * bookkeeping for `nheads` descriptor heads. NULL and *err = -errno when
 * io_uring is unavailable (the caller keeps the synchronous path). */
struct vsd_uring *vsd_uring_new(unsigned entries, int event_fd, unsigned nheads, int *err)
{
    struct io_uring_params p;
    struct vsd_uring *u = calloc(1, sizeof *u);
    int e = -ENOMEM;
    if (!u)
        goto fail;
    u->fd = -1;
    u->event_fd = -1;
    u->nheads = nheads;
    u->ios = calloc(nheads, sizeof *u->ios);
    if (!u->ios)
        goto fail;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_CQSIZE;
    p.cq_entries = entries * 2;
    u->fd = sys_setup(entries, &p);
    if (u->fd < 0)
        goto fail_errno;
    u->sq_entries = p.sq_entries;
    u->cq_entries = p.cq_entries;
    u->sq_ring_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    u->cq_ring_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (u->cq_ring_sz > u->sq_ring_sz)
            u->sq_ring_sz = u->cq_ring_sz;
        u->cq_ring_sz = u->sq_ring_sz;
    }
    u->sq_ring = mmap(NULL, u->sq_ring_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      u->fd, IORING_OFF_SQ_RING);
    if (u->sq_ring == MAP_FAILED) {
        u->sq_ring = NULL;
        goto fail_errno;
    }
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        u->cq_ring = u->sq_ring;
    } else {
        u->cq_ring = mmap(NULL, u->cq_ring_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                          u->fd, IORING_OFF_CQ_RING);
        if (u->cq_ring == MAP_FAILED) {
            u->cq_ring = NULL;
            goto fail_errno;
        }
    }
    u->sqes_sz = p.sq_entries * sizeof(struct io_uring_sqe);
    u->sqes = mmap(NULL, u->sqes_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   u->fd, IORING_OFF_SQES);
    if (u->sqes == MAP_FAILED) {
        u->sqes = NULL;
        goto fail_errno;
    }
    u->sq_head = (unsigned *)(u->sq_ring + p.sq_off.head);
    u->sq_tail = (unsigned *)(u->sq_ring + p.sq_off.tail);
    u->sq_mask = (unsigned *)(u->sq_ring + p.sq_off.ring_mask);
    u->sq_array = (unsigned *)(u->sq_ring + p.sq_off.array);
    u->cq_head = (unsigned *)(u->cq_ring + p.cq_off.head);
    u->cq_tail = (unsigned *)(u->cq_ring + p.cq_off.tail);
    u->cq_mask = (unsigned *)(u->cq_ring + p.cq_off.ring_mask);
    u->cqes = (struct io_uring_cqe *)(u->cq_ring + p.cq_off.cqes);
    u->tail = *u->sq_tail;
    if (event_fd >= 0) {
        if (sys_register(u->fd, IORING_REGISTER_EVENTFD, &event_fd, 1) < 0)
            goto fail_errno;
        u->event_fd = event_fd;
    }
    return u;
fail_errno:
    e = -errno;
fail:
    vsd_uring_free(u);
    if (err)
        *err = e;
    return NULL;
}

static int async_active(struct vsd_queue *q, uint16_t head)
{
    return q->uring && head < q->uring->nheads && q->uring->ios[head].active;
}

/* Free submission slots (prepared but unconsumed SQEs count as used). */
static inline unsigned sq_space(struct vsd_uring *u)
{
    return u->sq_entries - (u->tail - __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE));
}

static struct io_uring_sqe *get_sqe(struct vsd_uring *u)
{
    struct io_uring_sqe *sqe;
    unsigned idx;
    if (!sq_space(u))
        return NULL;
    idx = u->tail & *u->sq_mask;
    sqe = &u->sqes[idx];
    memset(sqe, 0, sizeof *sqe);
    u->sq_array[idx] = idx;
    u->tail++;
    return sqe;
}

/* Publish the prepared SQEs and have the kernel consume every unconsumed one.
 * Returns what io_uring_enter returned (0 when nothing was pending). */
static int submit(struct vsd_uring *u)
{
    unsigned pending;
    __atomic_store_n(u->sq_tail, u->tail, __ATOMIC_RELEASE);
    pending = u->tail - __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE);
    if (!pending)
        return 0;
    return sys_enter(u->fd, pending, 0, 0);
}

/* ------------------------------------------------------------------ the fast path */

static inline void ok_response(uint8_t *resp)
{
    memset(resp, 0, VIRTIO_SCSI_RESP_HDR);  /* sense_len 0, residual 0, qualifier 0, GOOD, S_OK */
}

static int do_sync_io(int fd, int is_write, struct iovec *iov, int niov,
                      uint64_t off, uint64_t len, int fua)
{
    while (len) {
        ssize_t n;
        if (is_write)
            n = pwritev2(fd, iov, niov, (off_t)off, fua ? RWF_DSYNC : 0);
        else
            n = preadv(fd, iov, niov, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0)
            return -1;
        len -= (uint64_t)n;
        off += (uint64_t)n;
        if (len)
            niov = skip_iov(iov, niov, (size_t)n);
    }
    return 0;
}

#define MAP_MTIME_NS 1000000000ull   /* writes through a mapping: mtime at most 1 s behind */

/* A read or write of a memory file by a copy through its mapping. The mapping is
 * guarded (vscsid/virtio/ring.c): a page that faults (the file truncated under
 * us, a hole when the tmpfs is full) becomes an anonymous page and the copy
 * completes, but the data went nowhere (or came from nowhere). The guard counts
 * that fault in *l->map_faults; if it rose during the copy, the engine gives
 * the mapping up for this LUN and returns -1, and the caller hands the request
 * to the reference path, which does it again by a system call (the whole
 * request: redoing what did reach the file writes the same bytes again) and
 * answers with that call's result or its error. */
static int map_copy(struct vsd_queue *q, struct vsd_lun *l, int is_write, const struct iovec *iov,
                    int niov, uint64_t off)
{
    unsigned long f0 = __atomic_load_n(l->map_faults, __ATOMIC_SEQ_CST);
    uint8_t *p = l->map + off;
    int k;
    for (k = 0; k < niov; k++) {
        if (is_write)
            memcpy(p, iov[k].iov_base, iov[k].iov_len);
        else
            memcpy(iov[k].iov_base, p, iov[k].iov_len);
        p += iov[k].iov_len;
    }
    __atomic_signal_fence(__ATOMIC_SEQ_CST);    /* the handler ran in this thread, in a copy */
    if (__atomic_load_n(l->map_faults, __ATOMIC_SEQ_CST) != f0) {
        l->map = NULL;
        l->flags &= ~(uint32_t)LUN_MAP_WRITE;
        q->st->q.map_faults++;
        return -1;
    }
    if (is_write) {
        struct timespec ts;
        uint64_t now;
        clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
        now = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
        if (now >= l->map_mtime_next) {
            static const struct timespec mtime_now[2] = {{0, UTIME_OMIT}, {0, UTIME_NOW}};
            futimens(l->fd, mtime_now);
            l->map_mtime_next = now + MAP_MTIME_NS;
        }
    }
    return 0;
}

/* O_DIRECT needs the file offset, the length and every buffer aligned. */
static int dio_aligned(const struct vsd_lun *l, const struct iovec *iov, int niov, uint64_t off,
                       uint64_t len)
{
    int k;
    if ((off | len) & (l->dio_align - 1))
        return 0;
    for (k = 0; k < niov; k++)
        if (((uintptr_t)iov[k].iov_base | iov[k].iov_len) & (l->mem_align - 1))
            return 0;
    return 1;
}

/* ------------------------------------------------------------------ statistics
 * Counters live in q->st (the queue's shared statistics page): the fast path
 * counts what it completes, per queue and per LUN slot; one request in
 * q->lat_every is timed (two clock reads) for the latency histograms. */

static inline uint64_t now_ns(void);   /* (defined with the serve loop) */

uint64_t vsd_now_ns(void)
{
    return now_ns();
}

/* Bucket of a latency: microseconds 0-3 each, then four buckets per power of two. */
unsigned vsd_hist_bucket(uint64_t ns)
{
    uint64_t us = ns / 1000;
    unsigned e, i;
    if (us < 4)
        return (unsigned)us;
    e = 63u - (unsigned)__builtin_clzll(us);
    i = 4 * (e - 1) + (unsigned)((us >> (e - 2)) & 3);
    return i < VSD_HIST_BUCKETS ? i : VSD_HIST_BUCKETS - 1;
}

uint64_t vsd_hist_lower_us(unsigned bucket)
{
    if (bucket < 4)
        return bucket;
    return (uint64_t)(4 + (bucket & 3)) << (bucket / 4 - 1);
}

/* Take one pending unit attention of a LUN (the n bytes of its record in the
 * shared state page): the kind whose byte this call swapped from 1 to 0, or -1.
 * Of all the queues that try, exactly one gets each. */
int vsd_ua_take(uint8_t *ua, int n)
{
    int k;
    for (k = 0; k < n; k++)
        if (__atomic_load_n(&ua[k], __ATOMIC_RELAXED) &&
            __atomic_exchange_n(&ua[k], 0, __ATOMIC_ACQ_REL))
            return k;
    return -1;
}

/* The start time of a request the fast path serves, or 0 when it is not timed. */
static inline uint64_t lat_start(struct vsd_queue *q)
{
    if (!q->lat_every || ++q->lat_tick < q->lat_every)
        return 0;
    q->lat_tick = 0;
    return now_ns();
}

static inline void count_done(struct vsd_queue *q, unsigned slot, int kind, uint64_t bytes,
                              uint64_t t0, uint64_t t1)
{
    struct vsd_lunstats *ls = &q->st->luns[slot];
    int op = kind == IO_WRITE ? VSD_OP_WRITE : kind == IO_READ ? VSD_OP_READ : VSD_OP_OTHER;
    if (kind == IO_WRITE) {
        q->st->q.bytes_out += bytes;
        ls->bytes_out += bytes;
    } else if (kind == IO_READ) {
        q->st->q.bytes_in += bytes;
        ls->bytes_in += bytes;
    }
    q->st->q.fast++;
    ls->ops[op]++;
    if (t0) {
        uint64_t d = t1 > t0 ? t1 - t0 : 0;
        ls->lat_count[op]++;
        ls->lat_sum_ns[op] += d;
        ls->lat[op][vsd_hist_bucket(d)]++;
    }
}

/* The slot of target:lun, or -1. */
static inline int lun_slot(struct vsd_queue *q, unsigned target, unsigned lun)
{
    if (!q->lunmap)
        return (target == 0 && lun < (unsigned)q->nluns) ? (int)lun : -1;
    if (lun >= VSD_TARGET_LUNS)
        return -1;
    return (int)q->lunmap[target * VSD_TARGET_LUNS + lun] - 1;
}

/* Queue one asynchronous I/O (READV, WRITEV, FSYNC or, for a null LUN, NOP), behind
 * a hard-linked timeout when the LUN has injected latency. 1 = in flight, 0 = no
 * room (the caller punts). The head is BUSY, so its slot in ios[] is free. */
static int submit_async(struct vsd_queue *q, struct vsd_lun *l, uint16_t head, int kind, int fd,
                        const struct iovec *iov, int niov, uint64_t off, uint64_t expect,
                        uint32_t written, uint64_t bytes, uint8_t *resp, int fua, uint64_t t0)
{
    struct vsd_uring *u = q->uring;
    struct vsd_io *io = &u->ios[head];
    struct io_uring_sqe *sqe, *tsqe;
    if (io->active || sq_space(u) < 2)
        return 0;
    io->head = head;
    io->kind = kind;
    io->expect = expect;
    io->bytes = bytes;
    io->resp = resp;
    io->written = written;
    io->niov = niov;
    io->slot = (uint16_t)(l - q->luns);
    io->t0 = t0;
    if (niov)
        memcpy(io->iov, iov, sizeof(struct iovec) * (size_t)niov);
    if (l->delay_ns) {
        tsqe = get_sqe(u);
        io->ts.tv_sec = (long long)(l->delay_ns / 1000000000ULL);
        io->ts.tv_nsec = (long long)(l->delay_ns % 1000000000ULL);
        tsqe->opcode = IORING_OP_TIMEOUT;
        tsqe->addr = (uint64_t)(uintptr_t)&io->ts;
        tsqe->len = 1;
        tsqe->flags = IOSQE_IO_HARDLINK;
        tsqe->user_data = ((uint64_t)head << 1) | 1;     /* odd: the timer part */
    }
    sqe = get_sqe(u);
    if (l->flags & LUN_NULL) {
        sqe->opcode = IORING_OP_NOP;
        io->expect = 0;
        if (kind == IO_READ) {
            int k;
            for (k = 0; k < niov; k++)
                memset(io->iov[k].iov_base, 0, io->iov[k].iov_len);
        }
    } else if (kind == IO_FSYNC) {
        sqe->opcode = IORING_OP_FSYNC;
        sqe->fd = fd;
        sqe->fsync_flags = IORING_FSYNC_DATASYNC;
    } else {
        sqe->opcode = kind == IO_WRITE ? IORING_OP_WRITEV : IORING_OP_READV;
        sqe->fd = fd;
        sqe->off = off;
        sqe->addr = (uint64_t)(uintptr_t)io->iov;
        sqe->len = (unsigned)niov;
        if (kind == IO_WRITE && fua)
            sqe->rw_flags = RWF_DSYNC;
    }
    sqe->user_data = (uint64_t)head << 1;
    io->active = 1;
    q->in_flight++;
    if (q->in_flight > q->st->q.max_in_flight)
        q->st->q.max_in_flight = q->in_flight;
    q->st->q.async++;
    q->st->luns[io->slot].in_flight++;
    return 1;
}

static void complete_fast(struct vsd_queue *q, struct vsd_lun *l, uint16_t head, int kind,
                          uint64_t bytes, uint8_t *resp, uint32_t written, uint64_t t0)
{
    ok_response(resp);
    count_done(q, (unsigned)(l - q->luns), kind, bytes, t0, t0 ? now_ns() : 0);
    push(q, head, written);
}

/* A buffered write that took this long blocked (dirty throttling, block allocation,
 * writeback): the LUN's writes then go through io_uring for a while, so that one
 * queue never waits on the page cache twice in a row. */
#define WRITE_BLOCKED_NS 200000ULL
#define WRITE_ASYNC_HOLD_NS 1000000000ULL

/* Serve one request if it is on the fast path. 1 = completed or in flight, 0 = punt. */
static int fast_one(struct vsd_queue *q, uint16_t head)
{
    static __thread struct chain c;
    uint8_t hdr[VIRTIO_SCSI_REQ_HDR + 64];
    const uint8_t *h, *cdb;
    uint32_t hdr_len = VIRTIO_SCSI_REQ_HDR + q->cdb_size;
    uint32_t resp_len = VIRTIO_SCSI_RESP_HDR + q->sense_size;
    uint8_t op, flags;
    uint64_t lba, nblocks, bytes, off, t0;
    struct vsd_lun *l;
    unsigned lun;
    int kind, fua = 0, fd, niov, slot;
    struct iovec *iov;
    uint8_t *resp;
    uint32_t written;

    if (q->cdb_size > 64 || walk(q, head, &c))
        return 0;
    if (c.out_len < hdr_len || c.in_len < resp_len || c.in[0].iov_len < VIRTIO_SCSI_RESP_HDR)
        return 0;
    /* A private copy: the guest may rewrite the header while we decode it. */
    gather(c.out, c.nout, hdr, hdr_len);
    h = hdr;
    /* LUN: 1, the target, flat-space single-level LUN, four zero bytes */
    if (h[0] != 1 || (h[2] >> 6) != 1 || h[4] | h[5] | h[6] | h[7])
        return 0;
    lun = ((unsigned)(h[2] & 0x3F) << 8) | h[3];
    slot = lun_slot(q, h[1], lun);
    if (slot < 0)
        return 0;
    l = &q->luns[slot];
    if ((l->flags & (LUN_PRESENT | LUN_FAST)) != (LUN_PRESENT | LUN_FAST))
        return 0;
    if (l->ua && __atomic_load_n(l->ua, __ATOMIC_RELAXED))
        return 0;       /* a unit attention to report: the reference path does */
    cdb = h + VIRTIO_SCSI_REQ_HDR;
    op = cdb[0];
    flags = cdb[1];
    switch (op) {
    case 0x28:  /* READ(10) */
    case 0x2A:  /* WRITE(10) */
        if ((cdb[6] & 0xC0) || (cdb[9] & 0x04))
            return 0;
        lba = be32(cdb + 2);
        nblocks = ((uint32_t)cdb[7] << 8) | cdb[8];
        kind = op == 0x28 ? IO_READ : IO_WRITE;
        break;
    case 0x88:  /* READ(16) */
    case 0x8A:  /* WRITE(16) */
        if ((cdb[14] & 0xC0) || (cdb[15] & 0x04))
            return 0;
        lba = be64(cdb + 2);
        nblocks = be32(cdb + 10);
        kind = op == 0x88 ? IO_READ : IO_WRITE;
        break;
    case 0x35:  /* SYNCHRONIZE CACHE(10) */
        if ((flags & ~0x02) || (cdb[6] & 0xE0) || (cdb[9] & 0x04))   /* IMMED only */
            return 0;
        lba = be32(cdb + 2);
        nblocks = ((uint32_t)cdb[7] << 8) | cdb[8];
        kind = IO_FSYNC;
        break;
    case 0x91:  /* SYNCHRONIZE CACHE(16) */
        if ((flags & ~0x02) || (cdb[14] & 0xE0) || (cdb[15] & 0x04))
            return 0;
        lba = be64(cdb + 2);
        nblocks = be32(cdb + 10);
        kind = IO_FSYNC;
        break;
    default:
        return 0;
    }
    t0 = lat_start(q);
    if (kind == IO_FSYNC) {
        /* The flush runs in io_uring (or the reference path): never in this loop. */
        if (lba > l->num_blocks || nblocks > l->num_blocks - lba)
            return 0;
        if (c.out_len != hdr_len || c.in_len != resp_len)
            return 0;
        resp = c.in[0].iov_base;
        if (l->flags & LUN_NULL) {
            if (l->delay_ns)
                return q->uring && (l->flags & LUN_ASYNC)
                    && submit_async(q, l, head, IO_FSYNC, -1, NULL, 0, 0, 0, resp_len, 0,
                                    resp, 0, t0);
            complete_fast(q, l, head, IO_FSYNC, 0, resp, resp_len, t0);
            return 1;
        }
        if (!q->uring)
            return 0;
        return submit_async(q, l, head, IO_FSYNC, l->fd, NULL, 0, 0, 0, resp_len, 0, resp, 0, t0);
    }
    if (kind == IO_WRITE) {
        if (flags & ~0x18)              /* only DPO and FUA */
            return 0;
        if (l->flags & LUN_RO)
            return 0;
        fua = (flags & 0x08) || (l->state && !(*(volatile uint8_t *)l->state & STATE_WCE));
    } else if (flags & ~0x10) {         /* only DPO (FUA reads take the reference path) */
        return 0;
    }
    if (nblocks == 0 || lba >= l->num_blocks || nblocks > l->num_blocks - lba)
        return 0;
    /* Injected latency needs io_uring's timers; without them the reference
     * path serves the LUN (with its own timers). */
    if (l->delay_ns && !(q->uring && (l->flags & LUN_ASYNC)))
        return 0;
    bytes = nblocks << l->block_shift;
    if (bytes > l->max_transfer_bytes)
        return 0;
    if (kind == IO_WRITE) {
        if (c.in_len != resp_len || c.out_len - hdr_len != bytes)
            return 0;
    } else {
        if (c.out_len != hdr_len || c.in_len - resp_len != bytes)
            return 0;
    }
    resp = c.in[0].iov_base;
    if (kind == IO_WRITE) {
        c.nout = skip_iov(c.out, c.nout, hdr_len);
        iov = c.out;
        niov = c.nout;
        written = resp_len;
    } else {
        c.nin = skip_iov(c.in, c.nin, resp_len);
        iov = c.in;
        niov = c.nin;
        written = resp_len + (uint32_t)bytes;
    }
    off = lba << l->block_shift;

    if (l->flags & LUN_NULL) {
        if (l->delay_ns)
            return submit_async(q, l, head, kind, -1, iov, niov, off, 0, written, bytes, resp,
                                fua, t0);
        if (kind == IO_READ) {
            int k;
            for (k = 0; k < niov; k++)
                memset(iov[k].iov_base, 0, iov[k].iov_len);
        }
        complete_fast(q, l, head, kind, bytes, resp, written, t0);
        return 1;
    }
    fd = l->fd;
    if ((l->flags & LUN_DIRECT) && !dio_aligned(l, iov, niov, off, bytes)) {
        /* O_DIRECT cannot take it: the same file through the page cache (the
         * kernel keeps both views coherent and does the read-modify-write). */
        if (l->buffered_fd < 0)
            return 0;
        fd = l->buffered_fd;
        q->st->q.unaligned++;
        /* Never in this loop: a miss, or the partial page a write fills in, waits
         * for the disk. io_uring reads it asynchronously (or its workers write). */
        if (q->uring && !(l->flags & LUN_SYNC))
            return submit_async(q, l, head, kind, fd, iov, niov, off, bytes, written, bytes,
                                resp, fua, t0);
    } else if (q->uring && (l->flags & LUN_ASYNC)) {
        return submit_async(q, l, head, kind, fd, iov, niov, off, bytes, written, bytes, resp,
                            fua, t0);
    }
    if (l->map && (kind == IO_READ || ((l->flags & LUN_MAP_WRITE) && !fua))) {
        /* A memory file (tmpfs): its pages are the data; a copy, no system call. */
        if (map_copy(q, l, kind == IO_WRITE, iov, niov, off))
            return 0;       /* it faulted: the reference path answers by a system call */
        complete_fast(q, l, head, kind, bytes, resp, written, t0);
        return 1;
    }
    if (kind == IO_READ && q->uring && (l->flags & LUN_NOWAIT)) {
        /* Cached data inline; what would wait for the disk goes to io_uring. */
        ssize_t n = preadv2(fd, iov, niov, (off_t)off, RWF_NOWAIT);
        if (n == (ssize_t)bytes) {
            complete_fast(q, l, head, kind, bytes, resp, written, t0);
            return 1;
        }
        if (n < 0 && errno == EOPNOTSUPP) {
            l->flags &= ~LUN_NOWAIT;            /* e.g. tmpfs: reads never wait for I/O */
        } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
            return 0;                           /* the reference path answers the error */
        } else {
            if (n > 0) {
                niov = skip_iov(iov, niov, (size_t)n);
                off += (uint64_t)n;
            }
            q->st->q.nowait_miss++;
            return submit_async(q, l, head, kind, fd, iov, niov, off, bytes - (n > 0 ? n : 0),
                                written, bytes, resp, fua, t0);
        }
    }
    if (kind == IO_WRITE && q->uring && !(l->flags & LUN_SYNC)) {
        /* A durable write, or writes of a LUN whose last inline write blocked. */
        if (fua || (l->write_async_until && now_ns() < l->write_async_until))
            return submit_async(q, l, head, kind, fd, iov, niov, off, bytes, written, bytes,
                                resp, fua, t0);
        if (l->map) {
            /* A memory file has no disk to wait for: a slow write there was the worker
             * being preempted (another worker on its CPU), not a reason for io_uring. */
            if (do_sync_io(fd, 1, iov, niov, off, bytes, 0))
                return 0;
        } else {
            uint64_t t0 = now_ns();
            if (do_sync_io(fd, 1, iov, niov, off, bytes, 0))
                return 0;       /* let the reference path produce the right sense */
            if (now_ns() - t0 > WRITE_BLOCKED_NS) {
                l->write_async_until = now_ns() + WRITE_ASYNC_HOLD_NS;
                q->st->q.write_blocked++;
            } else {
                l->write_async_until = 0;
            }
        }
        complete_fast(q, l, head, kind, bytes, resp, written, t0);
        return 1;
    }
    if (do_sync_io(fd, kind == IO_WRITE, iov, niov, off, bytes, fua))
        return 0;   /* let the reference path produce the right sense */
    complete_fast(q, l, head, kind, bytes, resp, written, t0);
    return 1;
}

/* Reap io_uring completions. Returns the number of requests completed; heads
 * whose I/O failed or came up short are written to `slow` for the reference path. */
static int reap(struct vsd_queue *q, uint16_t *slow, int *nslow, int max_slow)
{
    struct vsd_uring *u = q->uring;
    unsigned head, tail;
    int done = 0;
    uint64_t t1 = 0;       /* one clock read per reap, for the timed completions */
    if (!u)
        return 0;
    head = *u->cq_head;
    tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
    while (head != tail) {
        struct io_uring_cqe *cqe = &u->cqes[head & *u->cq_mask];
        uint64_t ud = cqe->user_data;
        int res = cqe->res;
        head++;
        if (ud & 1)
            continue;                   /* the latency timer fired (-ETIME): expected */
        if (*nslow >= max_slow) {
            head--;                     /* no room to hand a failure back: next pass */
            break;
        }
        {
            uint16_t h = (uint16_t)(ud >> 1);
            struct vsd_io *io;
            if (h >= u->nheads || !u->ios[h].active)
                continue;               /* not ours (cannot happen): never complete twice */
            io = &u->ios[h];
            io->active = 0;
            if (q->in_flight)
                q->in_flight--;
            if (q->st->luns[io->slot].in_flight)
                q->st->luns[io->slot].in_flight--;
            /* A NOP (null LUN) and an fsync report 0; a read or write must move
             * every byte it was given. Short or failed transfers are redone by the
             * reference path, which loops on short I/O and turns errors into the
             * right sense data. */
            if (res >= 0 && (uint64_t)res == io->expect) {
                ok_response(io->resp);
                if (io->t0 && !t1)
                    t1 = now_ns();
                count_done(q, io->slot, io->kind, io->bytes, io->t0, t1);
                if (push(q, h, io->written) == 0)
                    done++;
            } else {
                slow[(*nslow)++] = h;
            }
        }
    }
    __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
    return done;
}

/* A long pass publishes its completions (and signals, if the driver asks for it) every
 * PUBLISH_EVERY of them, not only at its end: a driver that waits for an interrupt
 * gets the first completions while the rest are served, and its new requests are
 * there before the pass ends -- the two sides overlap instead of taking turns. */
#define PUBLISH_EVERY 8

/*
 * One pass over the queue: reap finished asynchronous I/O, pop new requests
 * (up to `budget`), serve the fast ones and return the rest in `slow` for the
 * reference path. Returns the number of slow heads, or -1 when the ring is
 * broken (q->broken says why: VSD_BROKEN_*, with the head in q->broken_head).
 * q->more is set when the pass stopped early and should be repeated soon.
 */
int vsd_run(struct vsd_queue *q, uint16_t *slow, int max_slow, int budget)
{
    int nslow = 0, done = 0;
    q->more = 0;
    if (q->broken) {
        /* Nothing more is popped, but what is in flight still completes. */
        reap(q, slow, &nslow, max_slow);
        return nslow ? nslow : -1;
    }
    reap(q, slow, &nslow, max_slow);
    for (;;) {
        uint16_t avail_idx, n;
        disable_kicks(q);
        avail_idx = ld16_acq(q->avail + 2);
        VSD_HOOK(q, "avail_idx", q->avail + 2);
        n = (uint16_t)(avail_idx - q->last_avail);
        if (n > q->size) {
            q->broken = VSD_BROKEN_AVAIL_JUMP;
            break;
        }
        rmb();
        while (n) {
            uint16_t head;
            uint8_t *slot;
            if (nslow >= max_slow || done >= budget) {
                q->more = 1;
                goto out;
            }
            slot = q->avail + 4 + 2 * (size_t)(q->last_avail & q->mask);
            head = ld16(slot);
            VSD_HOOK(q, "avail_entry", slot);
            if (head >= q->size) {
                q->broken = VSD_BROKEN_HEAD_RANGE;
                q->broken_head = head;
                goto out;
            }
            if (q->hstate[head] != VSD_HEAD_FREE) {
                /* Offered again while we still hold it (e.g. a buffer the device
                 * writes overlays the available ring): never serve it twice. */
                q->broken = VSD_BROKEN_HEAD_BUSY;
                q->broken_head = head;
                goto out;
            }
            q->hstate[head] = VSD_HEAD_BUSY;
            q->last_avail++;
            n--;
            done++;
            inflight_get(q, head);
            if (!fast_one(q, head)) {
                q->st->q.slow++;
                slow[nslow++] = head;
            }
            if (q->ncompleted >= PUBLISH_EVERY)
                vsd_flush(q);
        }
        if (q->uring)
            submit(q->uring);
        if (!enable_kicks(q))
            break;
    }
out:
    if (q->uring) {
        submit(q->uring);
        /* Buffered I/O on cached data completes inside io_uring_enter: pick
         * those completions up now instead of after another wake-up. */
        reap(q, slow, &nslow, max_slow);
    }
    if (q->broken && nslow == 0)
        return -1;
    return nslow;
}

/* Resubmitted heads (recovered from the inflight region): serve or punt them.
 * A head that is out of range or already held is skipped (the region is
 * untrusted memory). */
int vsd_resubmit(struct vsd_queue *q, const uint16_t *heads, int n, uint16_t *slow)
{
    int k, nslow = 0;
    for (k = 0; k < n; k++) {
        if (vsd_claim(q, heads[k]))
            continue;
        if (!fast_one(q, heads[k]))
            slow[nslow++] = heads[k];
    }
    if (q->uring)
        submit(q->uring);
    return nslow;
}

/* Wait for every asynchronous I/O to finish (before a stop or a memory change).
 * Returns the number of slow heads handed back (failed I/O to redo in Python),
 * or -errno if io_uring itself failed with I/O still outstanding. */
int vsd_drain(struct vsd_queue *q, uint16_t *slow, int max_slow)
{
    int nslow = 0;
    struct vsd_uring *u = q->uring;
    if (!u)
        return 0;
    while (q->in_flight > 0 && nslow < max_slow) {
        int r = submit(u);
        unsigned h = *u->cq_head, t = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
        if (r < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY)
            return -errno;
        if (h == t) {
            r = sys_enter(u->fd, 0, 1, IORING_ENTER_GETEVENTS);
            if (r < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY)
                return -errno;
        }
        reap(q, slow, &nslow, max_slow);
    }
    return nslow;
}

int vsd_uring_pending(struct vsd_queue *q)
{
    if (!q->uring)
        return 0;
    return *q->uring->cq_head != __atomic_load_n(q->uring->cq_tail, __ATOMIC_ACQUIRE);
}

/* ------------------------------------------------------------------ test hook
 * Walk one chain the way the fast path does and report what it found, so tests
 * can check the C walker against the Python reference on arbitrary rings.
 * Returns 0 (valid), -1 (malformed) or -2 (more segments than the fast path
 * takes; the reference path serves those). */
int vsd_walk_info(struct vsd_queue *q, uint16_t head, uint64_t *out_len, uint64_t *in_len,
                  int *nout, int *nin)
{
    static struct chain c;
    int r;
    if (head >= q->size)
        return -1;
    r = walk(q, head, &c);
    *out_len = c.out_len;
    *in_len = c.in_len;
    *nout = c.nout;
    *nin = c.nin;
    return r;
}

/* ------------------------------------------------------------------ the serve loop
 *
 * Waits for and serves requests without returning to Python, as long as only
 * the ring needs attention. Before sleeping it busy-polls the ring for up to
 * q->poll_ns (adaptive, like QEMU's aio poll: the window grows when a sleep was
 * short enough that polling a little longer would have caught the request, and
 * shrinks when sleeps are long), so at low queue depth a request that arrives
 * shortly after the previous completion costs no wake-up.
 *
 * Returns to Python (the caller) when there are slow heads to run (>0), when
 * the control channel (or any fd other than kick/uring) is readable, on
 * timeout, when q->more is set, or when the ring broke (-1).
 */
#include <sys/epoll.h>

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int work_pending(struct vsd_queue *q)
{
    if (ld16_acq(q->avail + 2) != q->last_avail)
        return 1;
    if (q->uring && *q->uring->cq_head != __atomic_load_n(q->uring->cq_tail, __ATOMIC_ACQUIRE))
        return 1;
    return 0;
}

static void drain_eventfd(int fd)
{
    uint64_t v;
    if (fd >= 0)
        while (read(fd, &v, 8) == 8)
            ;
}

int vsd_serve(struct vsd_queue *q, int epfd, int kick_fd, int uring_fd, int timeout_ms,
              uint16_t *slow, int max_slow, int budget)
{
    struct epoll_event evs[8];
    for (;;) {
        int n = vsd_run(q, slow, max_slow, budget);
        vsd_flush(q);
        if (n != 0 || q->more || q->broken)
            return q->broken && n == 0 ? -1 : n;
        /* poll phase */
        if (q->poll_ns) {
            uint64_t start = now_ns(), deadline = start + q->poll_ns;
            int hit = 0;
            do {
                if (work_pending(q)) {
                    hit = 1;
                    break;
                }
                __builtin_ia32_pause();
            } while (now_ns() < deadline);
            if (hit) {
                q->st->q.poll_hits++;
                continue;
            }
        }
        /* sleep */
        {
            uint64_t t0 = now_ns(), slept;
            int k, nev, other = 0;
            vsd_late_call(q);
            nev = epoll_wait(epfd, evs, 8, timeout_ms);
            slept = now_ns() - t0;
            if (q->poll_max_ns) {
                if (slept > q->poll_max_ns) {
                    q->poll_ns /= 2;               /* long idle: stop burning CPU */
                    if (q->poll_ns < 4000)
                        q->poll_ns = 0;
                } else if (slept > q->poll_ns) {
                    q->poll_ns = q->poll_ns ? q->poll_ns * 2 : 4000;   /* a bit more would do */
                    if (q->poll_ns > q->poll_max_ns)
                        q->poll_ns = q->poll_max_ns;
                }
            }
            if (nev < 0) {
                if (errno == EINTR)
                    return 0;
                return 0;
            }
            if (nev == 0)
                return 0;                          /* timeout: Python's timers / checks */
            for (k = 0; k < nev; k++) {
                int fd = evs[k].data.fd;
                if (fd == kick_fd) {
                    drain_eventfd(kick_fd);
                    q->st->q.kicks++;
                } else if (fd == uring_fd) {
                    drain_eventfd(uring_fd);
                } else {
                    other = 1;
                }
            }
            if (other)
                return 0;                          /* the control channel: Python's turn */
        }
    }
}

/* ------------------------------------------------------------------ timers
 * epoll_wait's timeout has millisecond resolution; injected latencies are
 * microseconds. The reference path arms a timerfd (nanoseconds) for its next
 * deadline instead. */
#include <sys/timerfd.h>

int vsd_timerfd_create(void)
{
    return timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
}

/* Arm for an absolute CLOCK_MONOTONIC deadline in ns (0 disarms). */
int vsd_timerfd_arm(int fd, uint64_t deadline_ns)
{
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    if (deadline_ns) {
        its.it_value.tv_sec = (time_t)(deadline_ns / 1000000000ULL);
        its.it_value.tv_nsec = (long)(deadline_ns % 1000000000ULL);
    }
    return timerfd_settime(fd, TFD_TIMER_ABSTIME, &its, NULL);
}
