/*
 * Self-tests of the data-plane engine's internals that Python cannot reach:
 * the io_uring submission accounting and the head-state bookkeeping. The engine
 * is included whole (its static functions are under test). Built and run by
 * tests/unit/test_engine_c.py; exits non-zero with a message on the first
 * failure.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The adversary of test_read_once: zero each descriptor right after it is read. */
static int scribble;
#define VSD_HOOK(q, what, ptr) do { \
        if (scribble && !strcmp((what), "desc")) memset((ptr), 0, 16); } while (0)
#include "_engine.c"

#define CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
    fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); exit(1); } } while (0)

static unsigned cq_count(struct vsd_uring *u)
{
    unsigned n = 0, h = *u->cq_head, t = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
    while (h != t) {
        n++;
        h++;
    }
    __atomic_store_n(u->cq_head, h, __ATOMIC_RELEASE);
    return n;
}

/* After an io_uring_enter that consumed fewer SQEs than were pending (here: an
 * invalid SQE stops the kernel's submission loop), the next submit passes the
 * rest again and never publishes slots that hold no prepared SQE. */
static void test_short_submit(void)
{
    int err = 0, i, r;
    struct vsd_uring *u = vsd_uring_new(8, -1, 4, &err);
    CHECK(u, "io_uring unavailable: %d", err);
    for (i = 0; i < 3; i++) {
        struct io_uring_sqe *sqe = get_sqe(u);
        CHECK(sqe, "no SQE");
        sqe->opcode = i == 1 ? 0xEE : IORING_OP_NOP;    /* 0xEE: no such opcode */
        sqe->user_data = (uint64_t)i + 100;
    }
    r = submit(u);
    CHECK(r == 2, "first enter consumed %d, expected 2 (the invalid SQE stops it)", r);
    CHECK(*u->sq_tail == u->tail && u->tail - *u->sq_head == 1,
          "tail %u head %u prepared %u", *u->sq_tail, *u->sq_head, u->tail);
    r = submit(u);
    CHECK(r == 1, "second enter consumed %d, expected the 1 left", r);
    r = submit(u);
    CHECK(r == 0, "nothing is pending, yet enter consumed %d", r);
    CHECK(*u->sq_tail == 3 && *u->sq_head == 3, "tail %u head %u", *u->sq_tail, *u->sq_head);
    r = (int)cq_count(u);
    CHECK(r == 3, "%d completions for 3 SQEs (a stale slot was submitted?)", r);
    CHECK(sq_space(u) == u->sq_entries, "space %u of %u", sq_space(u), u->sq_entries);
    vsd_uring_free(u);
    printf("ok short_submit\n");
}

/* A tiny guest: one region holding a queue of size 4 and the requests. */
static uint8_t guest[1 << 16] __attribute__((aligned(4096)));
#define DESC_OFF 0x0000
#define AVAIL_OFF 0x1000
#define USED_OFF 0x2000

static struct vsd_stats stats;     /* the engine's counters (a shared page in a worker) */

static void setup_queue(struct vsd_queue *q, uint16_t *completed, uint8_t *hstate)
{
    memset(q, 0, sizeof *q);
    q->st = &stats;
    memset(guest, 0, sizeof guest);
    q->desc = guest + DESC_OFF;
    q->avail = guest + AVAIL_OFF;
    q->used = guest + USED_OFF;
    q->size = 4;
    q->mask = 3;
    q->call_fd = -1;
    q->regions[0].gpa = 0;
    q->regions[0].size = sizeof guest;
    q->regions[0].host = guest;
    q->nregions = 1;
    q->cdb_size = 32;
    q->sense_size = 96;
    q->completed = completed;
    q->hstate = hstate;
    memset(hstate, 0, 4);
}

static void offer(struct vsd_queue *q, uint16_t idx, const uint16_t *heads, int n)
{
    int k;
    for (k = 0; k < n; k++)
        st16(q->avail + 4 + 2 * ((idx + k) & 3), heads[k]);
    st16(q->avail + 2, (uint16_t)(idx + n));
}

/* A head offered while the device holds it breaks the ring; completion
 * bookkeeping never exceeds the queue size; nothing completes twice. */
static void test_head_states(void)
{
    struct vsd_queue q;
    uint16_t completed[4], slow[4];
    uint8_t hstate[4];
    uint16_t heads[3] = {1, 2, 1};
    int n;
    setup_queue(&q, completed, hstate);
    /* Descriptors 1 and 2: zero-length readable buffers (malformed requests:
     * punted to the reference path, which is the test here). */
    offer(&q, 0, heads, 3);
    n = vsd_run(&q, slow, 4, 64);
    CHECK(n == 2 && slow[0] == 1 && slow[1] == 2, "n=%d", n);
    CHECK(q.broken == VSD_BROKEN_HEAD_BUSY && q.broken_head == 1, "broken=%d head=%u",
          q.broken, q.broken_head);
    CHECK(q.last_avail == 2, "the duplicate was consumed (last_avail %u)", q.last_avail);
    CHECK(vsd_push(&q, 1, 0) == 0 && vsd_push(&q, 1, 0) == -1, "head 1 completed twice");
    CHECK(vsd_push(&q, 3, 0) == -1, "a head never popped was completed");
    CHECK(vsd_push(&q, 2, 0) == 0 && q.ncompleted == 2, "ncompleted %u", q.ncompleted);
    vsd_flush(&q);
    CHECK(ld16(q.used + 2) == 2 && hstate[1] == VSD_HEAD_FREE && hstate[2] == VSD_HEAD_FREE,
          "used idx %u", ld16(q.used + 2));
    CHECK(vsd_claim(&q, 2) == 0 && vsd_claim(&q, 2) == -1 && vsd_claim(&q, 9) == -1,
          "claim");
    printf("ok head_states\n");
}

/* Each descriptor is read from guest memory once: rewriting it right after the
 * read changes nothing in the walk (direct chain, then an indirect table). */
static void test_read_once(void)
{
    struct vsd_queue q;
    uint16_t completed[4];
    uint8_t hstate[4];
    uint64_t out_len[2], in_len[2];
    int nout[2], nin[2], r[2], pass, k;
    setup_queue(&q, completed, hstate);
    for (k = 0; k < 2; k++) {
        for (pass = 0; pass < 2; pass++) {
            uint8_t *d = guest + DESC_OFF, *t = guest + 0x4000;
            memset(guest, 0, 0x5000);
            if (k == 0) {      /* 3 descriptors: 51 readable, 108 + 512 writable */
                st64(d, 0x8000); st32(d + 8, 51); st16(d + 12, VIRTQ_DESC_F_NEXT); st16(d + 14, 1);
                st64(d + 16, 0x8100); st32(d + 24, 108);
                st16(d + 28, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT); st16(d + 30, 2);
                st64(d + 32, 0x8200); st32(d + 40, 512); st16(d + 44, VIRTQ_DESC_F_WRITE);
            } else {           /* the same through an indirect table */
                st64(d, 0x4000); st32(d + 8, 48); st16(d + 12, VIRTQ_DESC_F_INDIRECT);
                st64(t, 0x8000); st32(t + 8, 51); st16(t + 12, VIRTQ_DESC_F_NEXT); st16(t + 14, 1);
                st64(t + 16, 0x8100); st32(t + 24, 108);
                st16(t + 28, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT); st16(t + 30, 2);
                st64(t + 32, 0x8200); st32(t + 40, 512); st16(t + 44, VIRTQ_DESC_F_WRITE);
            }
            scribble = pass;
            r[pass] = vsd_walk_info(&q, 0, &out_len[pass], &in_len[pass], &nout[pass], &nin[pass]);
            scribble = 0;
        }
        CHECK(r[0] == 0 && out_len[0] == 51 && in_len[0] == 620, "reference walk %d", k);
        CHECK(r[1] == r[0] && out_len[1] == out_len[0] && in_len[1] == in_len[0]
              && nout[1] == nout[0] && nin[1] == nin[0],
              "walk %d changed when descriptors were rewritten after their read", k);
    }
    printf("ok read_once\n");
}

int main(void)
{
    test_short_submit();
    test_head_states();
    test_read_once();
    return 0;
}
