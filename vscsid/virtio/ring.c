/*
 * The shared virtio layer's C helpers for Python (vscsid.virtio._ring): fences
 * and atomic ring accesses (the inline definitions in fences.h), the EVENT_IDX
 * test, and the SIGBUS guard for guest memory. One copy per process: the guard's
 * table of mappings must be the one its signal handler reads.
 */
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "virtio.h"
#include "fences.h"
#include "ring.h"

void vq_mb(void)  { vsd_mb(); }
void vq_rmb(void) { vsd_rmb(); }
void vq_wmb(void) { vsd_wmb(); }

uint16_t vq_load_u16(const uint8_t *base, size_t off)
{
    return ld16_acq(base + off);
}

void vq_store_u16(uint8_t *base, size_t off, uint16_t value)
{
    st16_rel(base + off, value);
}

int vq_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return need_event(event_idx, new_idx, old_idx);
}

size_t vq_used_event_off(uint32_t size)
{
    return used_event_off(size);
}

size_t vq_avail_event_off(uint32_t size)
{
    return avail_event_off(size);
}

/* ------------------------------------------------------------------ SIGBUS containment
 *
 * Guest memory is a shared mapping of the front end's file. If the front end
 * truncates that file (possible when it is not sealed against shrinking),
 * every access to the lost pages raises SIGBUS, which would kill the process.
 * The handler below checks whether the faulting address lies in a registered
 * guest-memory mapping; if so it maps an anonymous zero page over the faulting
 * page and returns, so the access completes (reading zeros) and the process
 * lives. The fault is counted; the caller notices the count change and drops
 * the front end. A mapping registered with its own counter (a LUN's memory
 * file, vsd_guard_add_counted) counts there instead: its owner stops using the
 * mapping, and the front end is not to blame. Faults anywhere else go to the
 * previous handler (e.g. Python's faulthandler), unchanged.
 */
#define VSD_MAX_GUARDS 128

static struct {
    uintptr_t start, end;
    unsigned long *faults;          /* its own counter, or NULL: guest memory */
} vsd_guards[VSD_MAX_GUARDS];
static volatile int vsd_nguards;
static volatile unsigned long vsd_faults;
static struct sigaction vsd_old_bus;
static int vsd_installed;

static void vsd_on_sigbus(int sig, siginfo_t *si, void *uctx)
{
    uintptr_t a = (uintptr_t)si->si_addr;
    int i;
    for (i = 0; i < vsd_nguards; i++) {
        if (a >= vsd_guards[i].start && a < vsd_guards[i].end) {
            long pg = sysconf(_SC_PAGESIZE);
            void *page = (void *)(a & ~(uintptr_t)(pg - 1));
            if (mmap(page, (size_t)pg, PROT_READ | PROT_WRITE,
                     MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) != MAP_FAILED) {
                if (vsd_guards[i].faults)
                    __atomic_add_fetch(vsd_guards[i].faults, 1, __ATOMIC_SEQ_CST);
                else
                    vsd_faults++;
                return;
            }
            break;
        }
    }
    /* Not guest memory (or remapping failed): behave as before we were installed. */
    sigaction(SIGBUS, &vsd_old_bus, NULL);
    (void)sig;
    (void)uctx;
}

int vsd_sigbus_install(void)
{
    struct sigaction sa;
    if (vsd_installed)
        return 0;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = vsd_on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &vsd_old_bus) != 0)
        return -errno;
    vsd_installed = 1;
    return 0;
}

int vsd_guard_add_counted(uint8_t *start, uint64_t len, unsigned long *faults)
{
    int n = vsd_nguards;
    if (n >= VSD_MAX_GUARDS)
        return -1;
    vsd_guards[n].start = (uintptr_t)start;
    vsd_guards[n].end = (uintptr_t)start + len;
    vsd_guards[n].faults = faults;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    vsd_nguards = n + 1;
    return 0;
}

int vsd_guard_add(uint8_t *start, uint64_t len)
{
    return vsd_guard_add_counted(start, len, NULL);
}

void vsd_guard_remove(uint8_t *start)
{
    int i, n = vsd_nguards;
    for (i = 0; i < n; i++) {
        if (vsd_guards[i].start == (uintptr_t)start) {
            vsd_guards[i] = vsd_guards[n - 1];
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            vsd_nguards = n - 1;
            return;
        }
    }
}

unsigned long vsd_fault_count(void)
{
    return vsd_faults;
}

