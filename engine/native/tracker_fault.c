/* The fault-service thread: serves the target's write-protect faults. A unit still owed to the
 * checkpoint in flight is copied first (copy-on-write), then marked dirty and un-protected. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <unistd.h>

#include "tracker_int.h"

#define HINT_AHEAD 64 /* units after a copy-on-write fault that copiers take first */

static void bump_hist(struct trk *t, uint64_t ns)
{
    int b = ns ? 63 - __builtin_clzll(ns) : 0;
    atomic_fetch_add_explicit(&t->hist[b < 48 ? b : 47], 1, memory_order_relaxed);
}

/* Copy-on-write into the fault thread's own batch. Returns 0 without copying only when the
 * tracker is stopping (the unit stays protected; closing the uffd lets the write through). */
static int cow_copy(struct trk *t, uint64_t u)
{
    pthread_mutex_lock(&t->cow_lock);
    if (!t->cow_cur) {
        struct batch *b;
        pthread_mutex_lock(&t->q_lock);
        while (!(b = pool_get(t)) && !atomic_load(&t->stopping)) {
            atomic_fetch_add_explicit(&t->cow_waits, 1, memory_order_relaxed);
            pthread_cond_wait(&t->q_free, &t->q_lock);
        }
        if (b) {
            /* copiers may take the last free batch while this one is held */
            t->cow_holds = 1;
            pthread_cond_broadcast(&t->q_free);
        }
        pthread_mutex_unlock(&t->q_lock);
        if (!b) {
            pthread_mutex_unlock(&t->cow_lock);
            return 0;
        }
        b->n = 0;
        b->hashed = 0;
        t->cow_cur = b;
    }
    copy_unit(t, u, t->cow_cur);
    if (t->cow_cur->n + (int)t->ppu > t->batch_pages) {
        pthread_mutex_lock(&t->q_lock);
        q_push(&t->ready, t->cow_cur);
        t->cow_holds = 0;
        pthread_cond_signal(&t->q_ready);
        pthread_mutex_unlock(&t->q_lock);
        t->cow_cur = NULL;
    }
    pthread_mutex_unlock(&t->cow_lock);
    return 1;
}

/* Points the copiers at the units after a copy-on-write fault at u (cfg.priority). */
static void hint_after(struct trk *t, uint64_t u)
{
    uint64_t w = atomic_load(&t->hint_w);
    for (uint64_t k = 0; k < HINT_AHEAD; k++)
        atomic_store_explicit(&t->hints[(w + k) % HINTS], u + 1 + k, memory_order_relaxed);
    atomic_store(&t->hint_w, w + HINT_AHEAD);
    /* a reader too far behind skips what was overwritten */
    uint64_t r = atomic_load(&t->hint_r);
    if (w + HINT_AHEAD - r > HINTS)
        atomic_compare_exchange_strong(&t->hint_r, &r, w + HINT_AHEAD - HINTS);
}

static void serve_fault(struct trk *t, uint64_t addr)
{
    uint64_t u = (addr - t->cfg.target_base) / t->cfg.unit;
    uint64_t t0 = now_ns();

    if (u >= t->nunits)
        return;
    pthread_mutex_lock(&t->arm_lock);
    if (claim_unit(t, u)) {
        if (!cow_copy(t, u)) {
            pthread_mutex_unlock(&t->arm_lock);
            return;
        }
        atomic_fetch_add_explicit(&t->cow_copies, 1, memory_order_relaxed);
        if (t->cfg.priority)
            hint_after(t, u);
    } else
        /* A copier holds it: its copy takes a microsecond; the page stays protected until then. */
        while (atomic_load_explicit(&t->st[u], memory_order_acquire) == ST_COPYING)
            __builtin_ia32_pause();
    set_dirty(t, u);
    trk_wp_range(t->cfg.uffd, t->cfg.target_base + u * t->cfg.unit, t->cfg.unit, 0);
    pthread_mutex_unlock(&t->arm_lock);
    atomic_fetch_add_explicit(&t->faults, 1, memory_order_relaxed);
    bump_hist(t, now_ns() - t0);
}

void *fault_main(void *arg)
{
    struct trk *t = arg;
    struct uffd_msg msgs[64];
    struct pollfd pfd[2] = {{.fd = t->cfg.uffd, .events = POLLIN}, {.fd = t->evfd, .events = POLLIN}};

    while (!atomic_load(&t->stopping)) {
        ssize_t n = read(t->cfg.uffd, msgs, sizeof msgs);
        if (n < 0) {
            if (errno == EAGAIN) {
                poll(pfd, 2, -1);
                continue;
            }
            if (errno == EINTR)
                continue;
            break;
        }
        for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++)
            if (msgs[i].event == UFFD_EVENT_PAGEFAULT)
                serve_fault(t, msgs[i].arg.pagefault.address & ~(uint64_t)(t->cfg.unit - 1));
    }
    return NULL;
}
