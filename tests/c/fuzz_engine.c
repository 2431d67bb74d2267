/*
 * libFuzzer harness for the data-plane engine (workers/_engine.c), built with
 * AddressSanitizer and UBSan:
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Iworkers -Ivscsid/virtio \
 *         tests/c/fuzz_engine.c \
 *         -o fuzz_engine && ./fuzz_engine -max_total_time=60 CORPUS_DIR
 *
 * The input drives a stateful adversary: it lays out guest memory (optionally
 * starting from well-formed READ/WRITE requests to four LUNs: null, a file, and
 * both again through io_uring), publishes heads, lets the engine run passes of
 * chosen budgets, completes punted heads (as the reference path would) now or
 * later, resubmits heads as after a crash, and rewrites guest memory between
 * passes and at the very points where the engine has just read it (VSD_HOOK:
 * after avail->idx, after an available entry, after each descriptor). The
 * file LUN may be served through a shared mapping of its memfd (as a tmpfs
 * file is), and that file may be emptied for the input (the whole mapping
 * faults: the guard counts it, and the engine must give the mapping
 * up and punt the request). After every step the engine's bookkeeping must
 * hold its invariants; any access outside guest memory or the engine's own
 * arrays is an ASan report.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>

struct vsd_queue;
static void fuzz_hook(struct vsd_queue *q, const char *what, uint8_t *ptr);
#define VSD_HOOK(q, what, ptr) fuzz_hook((q), (what), (ptr))
#include "_engine.c"
#include "ring.c"                   /* the SIGBUS guard a LUN's mapping is registered with */

#define GUEST_SIZE (1 << 16)
#define DESC_OFF 0x0000
#define AVAIL_OFF 0x1000
#define USED_OFF 0x2000
#define BUF_OFF 0x3000
#define MAX_SIZE 16
#define FILE_SIZE (1 << 20)

static uint8_t *guest;             /* mmap'ed: an overrun hits a guard page or ASan */
static const uint8_t *in;
static size_t in_len, in_pos;
static int file_fd = -1;
static unsigned long map_faults;   /* the mapping's guard counter */
static struct vsd_uring *uring;

static int take(uint8_t *b)
{
    if (in_pos >= in_len)
        return 0;
    *b = in[in_pos++];
    return 1;
}

static uint16_t take16(void)
{
    uint8_t a = 0, b = 0;
    take(&a);
    take(&b);
    return (uint16_t)(a | (b << 8));
}

#define FAIL(...) do { fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); abort(); } while (0)

/* The guest rewrites memory the engine has just read (or anywhere). */
static void fuzz_hook(struct vsd_queue *q, const char *what, uint8_t *ptr)
{
    uint8_t b;
    (void)q;
    (void)what;
    if (!take(&b) || b < 0xC0)
        return;
    if (b < 0xE0) {
        ptr[b & 1] ^= (uint8_t)(b | 1);     /* the field just read changes under us */
    } else {
        uint16_t off = take16();
        uint8_t v = 0;
        take(&v);
        guest[off % GUEST_SIZE] = v;
    }
}

static void st16g(size_t off, uint16_t v) { memcpy(guest + off, &v, 2); }
static void st32g(size_t off, uint32_t v) { memcpy(guest + off, &v, 4); }
static void st64g(size_t off, uint64_t v) { memcpy(guest + off, &v, 8); }

static void desc(unsigned i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    size_t d = DESC_OFF + 16 * (size_t)i;
    st64g(d, addr);
    st32g(d + 8, len);
    st16g(d + 12, flags);
    st16g(d + 14, next);
}

/* A well-formed request on descriptors 3k..3k+2: header, response, data. */
static void request(unsigned k, unsigned size, uint8_t sel)
{
    unsigned head = (3 * k) % size, d1 = (head + 1) % size, d2 = (head + 2) % size;
    size_t hdr = BUF_OFF + 0x1000 * (size_t)k, resp = hdr + 0x100, data = hdr + 0x200;
    unsigned lun = sel & 3, write = (sel >> 2) & 1, blocks = 1 + ((sel >> 3) & 3);
    uint8_t *h = guest + hdr;
    memset(h, 0, 51);
    h[0] = 1;
    h[2] = 0x40;
    h[3] = (uint8_t)lun;
    h[19] = write ? 0x2A : 0x28;           /* WRITE(10) / READ(10) */
    h[19 + 5] = (uint8_t)k;                /* LBA */
    h[19 + 8] = (uint8_t)blocks;
    if (write) {
        desc(head, hdr, 51, VIRTQ_DESC_F_NEXT, d2);
        desc(d2, data, 512 * blocks, VIRTQ_DESC_F_NEXT, d1);
        desc(d1, resp, 108, VIRTQ_DESC_F_WRITE, 0);
    } else {
        desc(head, hdr, 51, VIRTQ_DESC_F_NEXT, d1);
        desc(d1, resp, 108, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, d2);
        desc(d2, data, 512 * blocks, VIRTQ_DESC_F_WRITE, 0);
    }
}

/* pushes: completions the harness made; the engine's own (fast path) are st->q.fast. */
static void check(struct vsd_queue *q, uint16_t used0, unsigned pushes)
{
    unsigned k, done = 0;
    if (q->ncompleted > q->size)
        FAIL("ncompleted %u > size %u", q->ncompleted, q->size);
    if (q->in_flight > q->size)
        FAIL("in_flight %u > size %u", q->in_flight, q->size);
    for (k = 0; k < q->size; k++) {
        if (q->hstate[k] > VSD_HEAD_DONE)
            FAIL("head %u state %u", k, q->hstate[k]);
        done += q->hstate[k] == VSD_HEAD_DONE;
    }
    if (done != q->ncompleted)
        FAIL("%u DONE heads, %u staged", done, q->ncompleted);
    pushes += (unsigned)q->st->q.fast;
    if ((uint16_t)(q->used_idx - used0) != (uint16_t)pushes)
        FAIL("used index moved by %u for %u pushes", (uint16_t)(q->used_idx - used0), pushes);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    int err = 0;
    (void)argc;
    (void)argv;
    guest = mmap(NULL, GUEST_SIZE + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                 -1, 0);
    mprotect(guest + GUEST_SIZE, 4096, PROT_NONE);
    file_fd = memfd_create("fuzz-lun", 0);
    if (file_fd < 0 || ftruncate(file_fd, FILE_SIZE))
        abort();
    uring = vsd_uring_new(4 * MAX_SIZE, -1, MAX_SIZE, &err);    /* NULL: no io_uring here */
    if (vsd_sigbus_install())
        abort();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct vsd_queue q;
    static struct vsd_stats stats;
    uint16_t completed[MAX_SIZE], slow[MAX_SIZE], held[MAX_SIZE];
    uint8_t hstate[MAX_SIZE], b = 0, mode = 0;
    unsigned nheld = 0, pushes = 0, qsize, k;
    uint16_t used0, avail_idx = 0;
    int steps = 0;

    in = data;
    in_len = size;
    in_pos = 0;
    take(&mode);
    qsize = 4u << (mode & 3);               /* 4, 8, 16, 32 -> capped below */
    if (qsize > MAX_SIZE)
        qsize = MAX_SIZE;
    memset(guest, 0, GUEST_SIZE);
    memset(&q, 0, sizeof q);
    memset(&stats, 0, sizeof stats);
    q.st = &stats;
    memset(hstate, 0, sizeof hstate);
    q.desc = guest + DESC_OFF;
    q.avail = guest + AVAIL_OFF;
    q.used = guest + USED_OFF;
    q.size = qsize;
    q.mask = qsize - 1;
    {
        /* a real call eventfd (drained below): vsd_flush and vsd_late_call signal it */
        static int call_fd = -2;
        uint64_t v;
        if (call_fd == -2)
            call_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (call_fd >= 0)
            while (read(call_fd, &v, 8) == 8)
                ;
        q.call_fd = call_fd;
    }
    q.event_idx = (mode >> 2) & 1;
    q.regions[0].gpa = 0;
    q.regions[0].size = GUEST_SIZE / 2;
    q.regions[0].host = guest;
    q.regions[1].gpa = 1ull << 32;                  /* a second region: GPA gap between */
    q.regions[1].size = GUEST_SIZE / 2;
    q.regions[1].host = guest + GUEST_SIZE / 2;
    q.nregions = 2;
    q.cdb_size = 32;
    q.sense_size = 96;
    q.completed = completed;
    q.hstate = hstate;
    q.uring = uring;
    q.nluns = 4;
    for (k = 0; k < 4; k++) {
        struct vsd_lun *l = &q.luns[k];
        l->flags = LUN_PRESENT | LUN_FAST | ((k & 1) ? 0 : LUN_NULL) | ((k & 2) ? LUN_ASYNC : 0);
        l->fd = (k & 1) ? file_fd : -1;
        l->block_size = 512;
        l->block_shift = 9;
        l->num_blocks = FILE_SIZE / 512;
        l->max_transfer_bytes = 1 << 16;
        l->delay_ns = (k == 2) ? 1000 : 0;
    }
    uint8_t *map = NULL;
    if (mode & 0x40) {                              /* the file LUN through a mapping */
        map = mmap(NULL, FILE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, file_fd, 0);
        if (map == MAP_FAILED || vsd_guard_add_counted(map, FILE_SIZE, &map_faults))
            abort();
        q.luns[1].map = map;
        q.luns[1].map_faults = &map_faults;
        q.luns[1].flags |= LUN_MAP_WRITE;
        if ((mode & 0x20) && ftruncate(file_fd, 0))  /* every page of the mapping faults */
            abort();
    }
    if (mode & 0x80) {                              /* start from well-formed requests */
        uint8_t n = 0;
        take(&n);
        for (k = 0; k < (unsigned)(n % 5) + 1 && 3 * k < qsize; k++) {
            take(&b);
            request(k, qsize, b);
            st16g(AVAIL_OFF + 4 + 2 * (k & q.mask), (uint16_t)((3 * k) % qsize));
        }
        avail_idx = (uint16_t)k;
        st16g(AVAIL_OFF + 2, avail_idx);
    }
    used0 = q.used_idx;
    while (take(&b) && steps++ < 64) {
        switch (b & 7) {
        case 0: {                                   /* write guest memory */
            uint16_t off = take16();
            uint8_t len = 0, v;
            take(&len);
            while (len--) {
                if (!take(&v))
                    break;
                guest[off++ % GUEST_SIZE] = v;
            }
            break;
        }
        case 1: {                                   /* publish a head */
            uint8_t h = 0;
            take(&h);
            st16g(AVAIL_OFF + 4 + 2 * (avail_idx & q.mask), h);
            st16g(AVAIL_OFF + 2, ++avail_idx);
            break;
        }
        case 2:
        case 3: {                                   /* a pass of the engine */
            uint8_t budget = 1;
            int n;
            take(&budget);
            n = vsd_run(&q, slow, (int)qsize, 1 + budget % 40);
            if (n > (int)qsize)
                FAIL("%d slow heads", n);
            for (k = 0; n > 0 && k < (unsigned)n; k++) {
                if (hstate[slow[k]] != VSD_HEAD_BUSY)
                    FAIL("slow head %u is not BUSY", slow[k]);
                if ((b & 8) && nheld < MAX_SIZE)
                    held[nheld++] = slow[k];        /* the reference path takes its time */
                else if (vsd_push(&q, slow[k], 12) == 0)
                    pushes++;
                else
                    FAIL("push of a BUSY head refused");
            }
            if (b & 16)
                vsd_flush(&q);
            break;
        }
        case 4:                                     /* the reference path completes */
            while (nheld) {
                uint16_t h = held[--nheld];
                if (vsd_push(&q, h, 0) == 0)
                    pushes++;
            }
            break;
        case 5: {                                   /* completions of nothing, or twice */
            uint8_t h = 0;
            take(&h);
            if (vsd_push(&q, h, 1) == 0) {
                /* only a BUSY head may be completed: one we hold */
                int mine = 0;
                for (k = 0; k < nheld; k++)
                    if (held[k] == h) {
                        held[k] = held[--nheld];
                        mine = 1;
                        break;
                    }
                if (!mine)
                    FAIL("completed head %u that nobody served", h);
                pushes++;
            }
            break;
        }
        case 6: {                                   /* resubmission after a crash */
            uint16_t heads[4];
            int n;
            for (k = 0; k < 4; k++)
                heads[k] = take16();
            n = vsd_resubmit(&q, heads, 4, slow);
            for (k = 0; n > 0 && k < (unsigned)n; k++)
                if (vsd_push(&q, slow[k], 0) == 0)
                    pushes++;
            break;
        }
        case 7:                                     /* the queue goes idle */
            vsd_flush(&q);
            if (vsd_late_call(&q) && q.call_used != q.used_idx)
                FAIL("late call at %u with used_idx %u", q.call_used, q.used_idx);
            break;
        }
        check(&q, used0, pushes);
        if (q.luns[1].map && stats.q.map_faults)
            FAIL("the mapping faulted (%lu) and is still used", map_faults);
    }
    /* Stop: wait for io_uring, finish what the reference path holds, publish. */
    {
        int n = vsd_drain(&q, slow, (int)qsize);
        if (n < 0)
            FAIL("drain failed: %d", n);
        for (k = 0; k < (unsigned)n; k++)
            if (vsd_push(&q, slow[k], 0) == 0)
                pushes++;
    }
    while (nheld)
        if (vsd_push(&q, held[--nheld], 0) == 0)
            pushes++;
    vsd_flush(&q);
    check(&q, used0, pushes);
    if (q.in_flight)
        FAIL("%u I/Os in flight after the drain", q.in_flight);
    for (k = 0; k < qsize; k++)
        if (hstate[k] == VSD_HEAD_DONE)
            FAIL("head %u left unpublished", k);
    if (map) {
        vsd_guard_remove(map);
        munmap(map, FILE_SIZE);
        if (ftruncate(file_fd, FILE_SIZE))
            abort();
    }
    return 0;
}
