#define _GNU_SOURCE
#define OPENSSL_SUPPRESS_DEPRECATED /* the one-shot SHA256 API skips EVP's per-call overhead */
#include "tracker.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <openssl/sha.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* Per-unit copy state. A unit is never un-protected while it is OWED or COPYING. */
enum { ST_NONE = 0, ST_OWED = 1, ST_COPYING = 2 };

#define HINT_AHEAD 64 /* units after a copy-on-write fault that copiers take first */
#define COW_RESERVE 1 /* pooled batches copiers leave to the fault thread */

struct batch {
    struct batch *next;
    int n;          /* pages filled */
    int hashed;     /* copier batches are hashed by the copier; fault batches by the collector */
    int later;      /* a stop-and-copy batch: the collector hashes it */
    int pooled;     /* from the bounded pool, or allocated for an async stop-and-copy */
    uint64_t *pfns;
    uint8_t *ids;
    uint8_t *zero;
    uint8_t *data;
};

struct bqueue {
    struct batch *head, *tail;
};

struct trk {
    struct trk_config cfg;
    uint64_t nunits;
    uint32_t ppu;          /* 4 KiB pages per unit */
    int batch_pages;       /* pages per batch: a whole number of units */
    uint64_t pool_batches; /* batches in the pool: --buffer */
    const uint8_t *ram;    /* our read-only view of guest RAM */
    int evfd;              /* wakes the fault thread to stop */
    atomic_int stopping;

    /* Tracking state. dirty is written by the fault thread only, read and cleared by arm;
     * both under arm_lock, which also orders every un-protect against arm's write-protect. */
    pthread_mutex_t arm_lock;
    uint64_t *dirty;
    uint64_t dirty_units;
    _Atomic uint8_t *st;
    uint64_t *owed;        /* owed unit indices of the checkpoint in flight, ascending */
    uint64_t owed_n;
    atomic_uint_fast64_t cursor;     /* next owed[] slot a copier claims */
    atomic_uint_fast64_t remaining;  /* owed units not yet copied */
    int armed_once;
    int async_on;        /* the range is on the async uffd (TRK_ASYNC after the first arm;
                            TRK_HYBRID between a drain and the next arm) */
    int released;        /* copiers may start on the owed set (q_lock) */
    int stop_copy;       /* TRK_ASYNC arm: copiers copy without waiting, unhashed (q_lock) */

    /* Batches, all from one pool of --buffer bytes, so the engine's memory does not grow with
     * the guest's writes. Copiers leave COW_RESERVE batches to the fault thread, which waits
     * for a free one only when the store has fallen a whole buffer behind: the guest's write
     * then waits for the store, as under QEMU's background-snapshot. The exception is an async
     * arm's stop-and-copy, which must hold the whole written set before the guest resumes: its
     * batches are allocated for it and freed once collected. All queues under q_lock. */
    pthread_mutex_t q_lock;
    pthread_cond_t q_ready, q_free, q_work;
    struct bqueue ready, free_pool;
    int free_n;            /* batches in free_pool */
    int cow_holds;         /* the fault thread holds a batch (cow_cur): the reserve is in use */
    int inflight;          /* batches held by copiers */
    pthread_mutex_t cow_lock;
    struct batch *cow_cur;

    pthread_t fault_thread;
    pthread_t *copiers;
    int ncopiers_started;

    /* Copy priority hints: units the guest is likely to write next (after a copy-on-write
     * fault), a ring the fault thread overwrites freely and copiers read first. Advisory:
     * a stale hint costs one failed claim. */
    _Atomic uint64_t hints[256];
    atomic_uint_fast64_t hint_w, hint_r;

    /* Figures */
    atomic_uint_fast64_t faults, cow_copies, copier_copies, copier_waits, cow_waits;
    atomic_uint_fast64_t hist[48];
    uint64_t faults_at_arm;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void q_push(struct bqueue *q, struct batch *b)
{
    b->next = NULL;
    if (q->tail)
        q->tail->next = b;
    else
        q->head = b;
    q->tail = b;
}

static struct batch *q_pop(struct bqueue *q)
{
    struct batch *b = q->head;
    if (b) {
        q->head = b->next;
        if (!q->head)
            q->tail = NULL;
    }
    return b;
}

static struct batch *batch_new(int pages, int pooled)
{
    struct batch *b = calloc(1, sizeof *b);
    if (!b)
        return NULL;
    b->pooled = pooled;
    b->pfns = malloc(sizeof(uint64_t) * pages);
    b->ids = malloc((size_t)TRK_ID_BYTES * pages);
    b->zero = malloc(pages);
    b->data = aligned_alloc(TRK_PAGE, (size_t)TRK_PAGE * pages);
    if (!b->pfns || !b->ids || !b->zero || !b->data) {
        free(b->pfns), free(b->ids), free(b->zero), free(b->data), free(b);
        return NULL;
    }
    return b;
}

static void batch_free(struct batch *b)
{
    free(b->pfns), free(b->ids), free(b->zero), free(b->data), free(b);
}

static int is_zero_page(const uint8_t *p)
{
    /* Early exit on the first word keeps non-zero pages at a few ns. */
    return *(const uint64_t *)p == 0 && memcmp(p, p + 8, TRK_PAGE - 8) == 0;
}

void trk_hash_pages(const uint8_t *pages, int n, uint8_t *ids, uint8_t *zero)
{
    for (int i = 0; i < n; i++) {
        const uint8_t *p = pages + (size_t)i * TRK_PAGE;
        zero[i] = (uint8_t)is_zero_page(p);
        if (zero[i])
            memset(ids + (size_t)i * TRK_ID_BYTES, 0, TRK_ID_BYTES);
        else
            SHA256(p, TRK_PAGE, ids + (size_t)i * TRK_ID_BYTES);
    }
}

int trk_wp_range(int uffd, uint64_t start, uint64_t len, int protect)
{
    struct uffdio_writeprotect wp = {
        .range = {.start = start, .len = len},
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    /* EAGAIN: the VMM's address space is changing under us (mremap, fork); try again. */
    while (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0) {
        if (errno != EAGAIN)
            return -errno;
    }
    return 0;
}

/* Copies unit u into batch b; the caller owns u (it moved it OWED -> COPYING). */
static void copy_unit(struct trk *t, uint64_t u, struct batch *b)
{
    memcpy(b->data + (size_t)b->n * TRK_PAGE, t->ram + u * t->cfg.unit, t->cfg.unit);
    for (uint32_t k = 0; k < t->ppu; k++)
        b->pfns[b->n + k] = u * t->ppu + k;
    b->n += t->ppu;
    atomic_store_explicit(&t->st[u], ST_NONE, memory_order_release);
    atomic_fetch_sub(&t->remaining, 1);
}

static int claim_unit(struct trk *t, uint64_t u)
{
    uint8_t expect = ST_OWED;
    return atomic_compare_exchange_strong(&t->st[u], &expect, ST_COPYING);
}

static void bump_hist(struct trk *t, uint64_t ns)
{
    int b = ns ? 63 - __builtin_clzll(ns) : 0;
    atomic_fetch_add_explicit(&t->hist[b < 48 ? b : 47], 1, memory_order_relaxed);
}

/* Pool accounting (q_lock held). */
static void pool_put(struct trk *t, struct batch *b)
{
    b->later = 0;
    q_push(&t->free_pool, b);
    t->free_n++;
    /* the fault thread and copiers wait on q_free for different counts: wake them all */
    pthread_cond_broadcast(&t->q_free);
}

static struct batch *pool_get(struct trk *t)
{
    struct batch *b = q_pop(&t->free_pool);
    if (b)
        t->free_n--;
    return b;
}

/* A batch for an async arm's stop-and-copy (q_lock held): from the pool, which holds the whole
 * written set when the arm chose to copy it (async_fits); outside it only if that estimate was
 * short, since nothing frees a batch before the copy ends. Hashed later, by the collector: the
 * target is paused meanwhile. */
static struct batch *stop_copy_batch(struct trk *t)
{
    struct batch *b = pool_get(t);
    if (!b && !(b = batch_new(t->batch_pages, 0)))
        abort(); /* out of memory: dying drops the uffd, the guest runs on */
    b->later = 1;
    return b;
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
        if (t->cfg.priority) {
            uint64_t w = atomic_load(&t->hint_w);
            for (uint64_t k = 0; k < HINT_AHEAD; k++)
                atomic_store_explicit(&t->hints[(w + k) % 256], u + 1 + k, memory_order_relaxed);
            atomic_store(&t->hint_w, w + HINT_AHEAD);
            /* a reader too far behind skips what was overwritten */
            uint64_t r = atomic_load(&t->hint_r);
            if (w + HINT_AHEAD - r > 256)
                atomic_compare_exchange_strong(&t->hint_r, &r, w + HINT_AHEAD - 256);
        }
    } else
        /* A copier holds it: its copy takes a microsecond; the page stays protected until then. */
        while (atomic_load_explicit(&t->st[u], memory_order_acquire) == ST_COPYING)
            __builtin_ia32_pause();
    if (!(t->dirty[u / 64] & (1ull << (u % 64)))) {
        t->dirty[u / 64] |= 1ull << (u % 64);
        t->dirty_units++;
    }
    trk_wp_range(t->cfg.uffd, t->cfg.target_base + u * t->cfg.unit, t->cfg.unit, 0);
    pthread_mutex_unlock(&t->arm_lock);
    atomic_fetch_add_explicit(&t->faults, 1, memory_order_relaxed);
    bump_hist(t, now_ns() - t0);
}

static void *fault_main(void *arg)
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

/* Claims owed units in order and copies them into b until it is full or none are left. */
static void fill_batch(struct trk *t, struct batch *b)
{
    b->n = 0;
    for (;;) {
        uint64_t r = atomic_load(&t->hint_r);
        if (b->n + (int)t->ppu > t->batch_pages || r >= atomic_load(&t->hint_w))
            break;
        if (!atomic_compare_exchange_weak(&t->hint_r, &r, r + 1))
            continue;
        uint64_t u = atomic_load_explicit(&t->hints[r % 256], memory_order_relaxed);
        if (u < t->nunits && claim_unit(t, u)) {
            copy_unit(t, u, b);
            atomic_fetch_add_explicit(&t->copier_copies, 1, memory_order_relaxed);
        }
    }
    while (b->n + (int)t->ppu <= t->batch_pages) {
        uint64_t i = atomic_fetch_add(&t->cursor, 1);
        if (i >= t->owed_n)
            break;
        if (claim_unit(t, t->owed[i])) {
            copy_unit(t, t->owed[i], b);
            atomic_fetch_add_explicit(&t->copier_copies, 1, memory_order_relaxed);
        }
    }
}

/* Hands a filled batch over (or back, if empty); q_lock held. */
static void put_batch(struct trk *t, struct batch *b)
{
    if (b->n)
        q_push(&t->ready, b);
    else if (b->pooled)
        pool_put(t, b);
    else
        batch_free(b);
    pthread_cond_broadcast(&t->q_ready);
}

/* Waits until this copier may start on the owed set and has a batch to fill; NULL when
 * stopping. Every condition is checked again after every wake-up, under q_lock: a copier woken
 * for pool space must not start on an owed set that a new arm is still publishing (trk_arm
 * clears released first), and it counts as inflight from the moment it may claim. */
static struct batch *take_batch(struct trk *t)
{
    struct batch *b = NULL;

    pthread_mutex_lock(&t->q_lock);
    while (!atomic_load(&t->stopping)) {
        if (!t->released || atomic_load(&t->cursor) >= t->owed_n) {
            pthread_cond_wait(&t->q_work, &t->q_lock);
        } else if (!t->stop_copy && t->free_n <= (t->cow_holds ? 0 : COW_RESERVE)) {
            atomic_fetch_add_explicit(&t->copier_waits, 1, memory_order_relaxed);
            pthread_cond_wait(&t->q_free, &t->q_lock);
        } else {
            b = t->stop_copy ? stop_copy_batch(t) : pool_get(t);
            t->inflight++;
            break;
        }
    }
    pthread_mutex_unlock(&t->q_lock);
    return b;
}

/* A copier: claim owed units in order, copy them into a pooled batch, hash, hand over (during
 * an async arm's stop-and-copy, see stop_copy_batch). */
static void *copier_main(void *arg)
{
    struct trk *t = arg;
    struct batch *b;

    while ((b = take_batch(t))) {
        fill_batch(t, b);
        b->hashed = !b->later;
        if (b->hashed)
            trk_hash_pages(b->data, b->n, b->ids, b->zero);

        pthread_mutex_lock(&t->q_lock);
        t->inflight--;
        put_batch(t, b);
        pthread_mutex_unlock(&t->q_lock);
    }
    return NULL;
}

/* Makes t->owed[0..n) the owed set of the checkpoint being armed. Copiers are held off
 * (released is clear) and faults by arm_lock, so the counters are whole before the first unit
 * becomes OWED. */
static void owe(struct trk *t, uint64_t n)
{
    atomic_store(&t->cursor, 0);
    atomic_store(&t->remaining, n);
    t->owed_n = n;
    for (uint64_t i = 0; i < n; i++)
        atomic_store_explicit(&t->st[t->owed[i]], ST_OWED, memory_order_relaxed);
}

/* An async arm's stop-and-copy of t->owed[0..n): the copiers and this thread together;
 * returns when every unit is copied. */
static void stop_and_copy(struct trk *t, uint64_t n)
{
    owe(t, n);
    pthread_mutex_lock(&t->q_lock);
    t->stop_copy = t->released = 1;
    pthread_cond_broadcast(&t->q_work);
    while (atomic_load(&t->cursor) < n) {
        struct batch *b = stop_copy_batch(t);
        t->inflight++;
        pthread_mutex_unlock(&t->q_lock);
        fill_batch(t, b);
        b->hashed = 0;
        pthread_mutex_lock(&t->q_lock);
        t->inflight--;
        put_batch(t, b);
    }
    while (atomic_load(&t->remaining) || t->inflight)
        pthread_cond_wait(&t->q_ready, &t->q_lock);
    t->stop_copy = 0;
    pthread_mutex_unlock(&t->q_lock);
}

/* Units holding data: SEEK_DATA/SEEK_HOLE skips never-touched holes (not on hugetlbfs). */
static uint64_t populated_units(struct trk *t)
{
    off_t base = (off_t)t->cfg.offset, end = base + (off_t)t->cfg.length, pos = base;
    uint64_t n = 0;

    /* ENXIO just means no data at all; other errors mean SEEK_DATA is not supported. */
    if (t->cfg.owe_all || (lseek(t->cfg.ramfd, base, SEEK_DATA) < 0 && errno != ENXIO)) {
        for (uint64_t u = 0; u < t->nunits; u++)
            t->owed[n++] = u;
        return n;
    }
    while (pos < end) {
        off_t data = lseek(t->cfg.ramfd, pos, SEEK_DATA), hole;
        if (data < 0 || data >= end)
            break;
        hole = lseek(t->cfg.ramfd, data, SEEK_HOLE);
        if (hole < 0 || hole > end)
            hole = end;
        for (uint64_t u = (uint64_t)(data - base) / t->cfg.unit;
             u < (uint64_t)(hole - base + t->cfg.unit - 1) / t->cfg.unit; u++)
            if (!n || t->owed[n - 1] != u)
                t->owed[n++] = u;
        pos = hole;
    }
    return n;
}

/* Protects the given units (ascending) in as few ioctls as pays: a run goes on across a gap of
 * up to WP_GAP_UNITS units outside the set. That is safe for the tracker's dirty set: a unit
 * outside it is write-protected already (the first arm protects the whole range, and only a
 * fault, which marks the unit dirty, un-protects one), so protecting it again changes nothing. */
#define WP_GAP_UNITS 32
int trk_wp_units(int uffd, uint64_t base, const uint64_t *units, uint64_t n, uint32_t unit,
                 uint64_t *runs)
{
    uint64_t i = 0;
    while (i < n) {
        uint64_t j = i + 1;
        while (j < n && units[j] - units[j - 1] <= WP_GAP_UNITS + 1)
            j++;
        int rc = trk_wp_range(uffd, base + units[i] * unit, (units[j - 1] - units[i] + 1) * unit,
                              1);
        if (rc < 0)
            return rc;
        (*runs)++;
        i = j;
    }
    return 0;
}

/* PAGEMAP_SCAN (Linux 6.7+; the installed headers are older). */
struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
struct page_region {
    uint64_t start, end, categories;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGE_IS_WRITTEN (1 << 1)

/* Units written since the last scan, into t->owed; re-protects them in the same walk. */
static int scan_written(struct trk *t, uint64_t *n)
{
    struct page_region regs[512];
    uint64_t base = t->cfg.target_base, end = base + t->cfg.length, start = base;

    *n = 0;
    while (start < end) {
        struct pm_scan_arg a = {
            .size = sizeof a, .flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            .start = start, .end = end, .vec = (uintptr_t)regs, .vec_len = 512,
            .category_mask = PAGE_IS_WRITTEN, .return_mask = PAGE_IS_WRITTEN,
        };
        int r = ioctl(t->cfg.pagemap_fd, PAGEMAP_SCAN, &a);
        if (r < 0)
            return -errno;
        for (int i = 0; i < r; i++)
            for (uint64_t u = (regs[i].start - base) / t->cfg.unit;
                 u < (regs[i].end - base + t->cfg.unit - 1) / t->cfg.unit; u++)
                if (!*n || t->owed[*n - 1] != u)
                    t->owed[(*n)++] = u;
        /* walk_end can stop short of end even when the walk is complete: a short vector is
         * the reliable end. */
        if (r < 512)
            break;
        start = a.walk_end;
    }
    return 0;
}

/* Moves the range from one uffd to the other and write-protects all of it there; the target
 * must be paused, since no write is tracked in between. Measured on Linux 6.18 (shmem):
 * - a range is on one uffd at a time: UFFDIO_REGISTER on the other fails with EBUSY while it is
 *   registered, so it must be unregistered first;
 * - UFFDIO_UNREGISTER clears every uffd-wp bit of the range (pagemap bit 57 -> 0, markers of
 *   never-touched pages included), and right after UFFDIO_REGISTER on the async uffd
 *   PAGEMAP_SCAN reports every page as written: nothing of the old protection survives, so the
 *   whole range is protected again here, and a write between the unregister and that protect
 *   would be seen by neither uffd (hence the pause);
 * - unregister and protect-all take time with the populated size (a hybrid record's
 *   switch_move is the whole move).
 * After the protect-all a PAGEMAP_SCAN with PM_SCAN_WP_MATCHING reports exactly the pages
 * written since (never-touched ones included). */
static int move_range(struct trk *t, int from, int to)
{
    struct uffdio_range r = {.start = t->cfg.target_base, .len = t->cfg.length};
    struct uffdio_register reg = {.range = r, .mode = UFFDIO_REGISTER_MODE_WP};

    if (ioctl(from, UFFDIO_UNREGISTER, &r) < 0 || ioctl(to, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    t->async_on = to == t->cfg.async_uffd;
    return trk_wp_range(to, r.start, r.len, 1);
}

/* Marks t->owed[from..to) dirty (the written set of a scan joins the fault-dirtied set). */
static void mark_dirty(struct trk *t, uint64_t from, uint64_t to)
{
    for (uint64_t i = from; i < to; i++) {
        uint64_t u = t->owed[i];
        if (!(t->dirty[u / 64] & (1ull << (u % 64)))) {
            t->dirty[u / 64] |= 1ull << (u % 64);
            t->dirty_units++;
        }
    }
}

/* The dirty bitmap (sync faults) into t->owed; clears it. Scans 64 units per word. */
static uint64_t take_dirty(struct trk *t)
{
    uint64_t n = 0, words = (t->nunits + 63) / 64;
    for (uint64_t w = 0; w < words; w++) {
        uint64_t bits = t->dirty[w];
        t->dirty[w] = 0;
        while (bits) {
            t->owed[n++] = w * 64 + (uint64_t)__builtin_ctzll(bits);
            bits &= bits - 1;
        }
    }
    return n;
}

/* Units a stop-and-copy can take from the pool, every batch of which is free at an arm: the
 * copiers and the arming thread each leave at most one batch part-filled. */
static uint64_t pool_units(struct trk *t)
{
    uint64_t spare = (uint64_t)t->cfg.copiers + 1;
    return t->pool_batches > spare ? (t->pool_batches - spare) * (t->batch_pages / t->ppu) : 0;
}

int trk_arm(trk_t *t, int paused, struct trk_arm_stats *st)
{
    uint64_t t0 = now_ns(), n = 0;
    int rc = 0, kept = 0;

    memset(st, 0, sizeof *st);
    pthread_mutex_lock(&t->q_lock);
    if (atomic_load(&t->remaining) || t->ready.head || t->inflight || t->cow_cur) {
        pthread_mutex_unlock(&t->q_lock);
        return -EBUSY; /* the previous checkpoint has not been collected whole */
    }
    /* From here no copier claims a unit until trk_release: take_batch checks released under
     * q_lock, and a copier already claiming counts as inflight (busy above). */
    t->released = 0;
    pthread_mutex_unlock(&t->q_lock);

    pthread_mutex_lock(&t->arm_lock);
    if (!t->armed_once) {
        /* First checkpoint: everything populated is owed; protect the whole range at once. */
        n = populated_units(t);
        owe(t, n);
        rc = trk_wp_range(t->cfg.uffd, t->cfg.target_base, t->cfg.length, 1);
        st->runs = 1;
    } else if (t->async_on && (rc = scan_written(t, &n))) {
        /* the written set is unknown: nothing is armed */
    } else {
        if (t->async_on)
            mark_dirty(t, 0, n); /* the scan re-protected what it reported */
        if (t->cfg.tracking == TRK_ASYNC && (t->async_on || paused) &&
            (t->dirty_units <= pool_units(t) || !paused)) {
            /* The written set, copied now, from the pool (so within --buffer); nothing is
             * left owed. A pre-arm (the target running) copies what the pool holds and
             * leaves the rest dirty for the pause's arm: a running target's range cannot
             * move between uffds, and a page written after its copy is copied again. A larger
             * set at the pause is drained as under TRK_WP (below). */
            uint64_t all = take_dirty(t), fits = pool_units(t);
            n = paused || all < fits ? all : fits;
            st->dirty_units = all;
            t->dirty_units = 0;
            mark_dirty(t, n, all);
            kept = 1;
            if (!t->async_on)
                rc = move_range(t, t->cfg.uffd, t->cfg.async_uffd);
            st->runs = 1;
            if (!rc && n)
                stop_and_copy(t, n);
            st->copied_in_arm = n;
        } else {
            /* owed <- dirty; dirty <- {}; protect the owed set. After async tracking
             * (TRK_HYBRID after a switch, TRK_ASYNC with a written set larger than the pool)
             * the range moves back onto the sync uffd, all of it protected: the owed set for
             * copy-on-write, the rest so that its first write is recorded. */
            int moved = t->async_on;
            if (moved) {
                rc = move_range(t, t->cfg.async_uffd, t->cfg.uffd);
                st->runs = 1;
            }
            n = take_dirty(t);
            owe(t, n);
            if (!moved)
                rc = trk_wp_units(t->cfg.uffd, t->cfg.target_base, t->owed, n, t->cfg.unit,
                                  &st->runs);
        }
    }
    if (!kept) {
        st->dirty_units = t->dirty_units;
        t->dirty_units = 0;
    }
    st->faults = atomic_load(&t->faults) - t->faults_at_arm;
    t->faults_at_arm = atomic_load(&t->faults);
    st->units_owed = n;
    t->armed_once = 1;
    pthread_mutex_unlock(&t->arm_lock);
    st->arm_ns = now_ns() - t0;
    return rc;
}

int trk_to_async(trk_t *t)
{
    int rc = 0;

    if (t->cfg.tracking != TRK_HYBRID)
        return -EINVAL;
    pthread_mutex_lock(&t->arm_lock);
    /* Nothing owed is left (so no unit needs copy-on-write any more); a fault the fault thread
     * serves after the move marks its unit dirty (owed next time, harmlessly) and fails to
     * un-protect it on the now unregistered sync uffd; the write it held is retried and lands
     * on the async uffd, where the kernel records it. */
    if (atomic_load(&t->remaining))
        rc = -EBUSY;
    else if (!t->async_on)
        rc = move_range(t, t->cfg.uffd, t->cfg.async_uffd);
    pthread_mutex_unlock(&t->arm_lock);
    return rc;
}

void trk_release(trk_t *t)
{
    pthread_mutex_lock(&t->q_lock);
    t->released = 1;
    pthread_cond_broadcast(&t->q_work);
    pthread_mutex_unlock(&t->q_lock);
}

/* True when every owed unit is copied and every batch handed over. Caller holds q_lock. */
static int drained(struct trk *t)
{
    return !atomic_load(&t->remaining) && !t->inflight && !t->ready.head;
}

int trk_collect(trk_t *t, uint8_t *pages, uint8_t *ids, uint64_t *pfns, uint8_t *zero,
                int max_pages, int timeout_ms, int *done)
{
    struct timespec dl;
    int out = 0;

    *done = 0;
    if (max_pages < t->batch_pages)
        return -EINVAL;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += timeout_ms / 1000;
    dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (dl.tv_nsec >= 1000000000L)
        dl.tv_sec++, dl.tv_nsec -= 1000000000L;

    pthread_mutex_lock(&t->q_lock);
    while (!t->ready.head && !drained(t) && !atomic_load(&t->stopping))
        if (pthread_cond_timedwait(&t->q_ready, &t->q_lock, &dl) == ETIMEDOUT)
            break;
    for (;;) {
        struct batch *b = t->ready.head;
        if (!b && drained(t)) {
            /* The fault thread's partial batch is the last to go. */
            pthread_mutex_unlock(&t->q_lock);
            pthread_mutex_lock(&t->cow_lock);
            b = t->cow_cur;
            if (b && out + b->n <= max_pages)
                t->cow_cur = NULL;
            else
                b = NULL;
            pthread_mutex_unlock(&t->cow_lock);
            pthread_mutex_lock(&t->q_lock);
            if (!b) {
                *done = out == 0 && !t->cow_cur && drained(t);
                break;
            }
            t->cow_holds = 0;
        } else if (!b || out + b->n > max_pages) {
            break;
        } else {
            q_pop(&t->ready);
        }
        pthread_mutex_unlock(&t->q_lock);

        if (!b->hashed)
            trk_hash_pages(b->data, b->n, b->ids, b->zero);
        memcpy(pfns + out, b->pfns, sizeof(uint64_t) * b->n);
        memcpy(ids + (size_t)out * TRK_ID_BYTES, b->ids, (size_t)TRK_ID_BYTES * b->n);
        memcpy(zero + out, b->zero, b->n);
        for (int i = 0; i < b->n; i++)
            if (!b->zero[i])
                memcpy(pages + (size_t)(out + i) * TRK_PAGE, b->data + (size_t)i * TRK_PAGE,
                       TRK_PAGE);
        out += b->n;

        pthread_mutex_lock(&t->q_lock);
        if (b->pooled)
            pool_put(t, b);
        else
            batch_free(b);
    }
    pthread_mutex_unlock(&t->q_lock);
    return out;
}

void trk_get_stats(trk_t *t, struct trk_stats *st)
{
    st->faults = atomic_load(&t->faults);
    st->cow_copies = atomic_load(&t->cow_copies);
    st->copier_copies = atomic_load(&t->copier_copies);
    st->copier_waits = atomic_load(&t->copier_waits);
    st->cow_waits = atomic_load(&t->cow_waits);
    for (int i = 0; i < 48; i++)
        st->fault_hist[i] = atomic_load(&t->hist[i]);
}

void trk_reset_hist(trk_t *t)
{
    for (int i = 0; i < 48; i++)
        atomic_store(&t->hist[i], 0);
}

const uint8_t *trk_ram(trk_t *t)
{
    return t->ram;
}

static int fail(char *err, size_t errlen, const char *what, int e)
{
    snprintf(err, errlen, "%s: %s", what, strerror(e));
    return -e;
}

trk_t *trk_create(const struct trk_config *cfg, char *err, size_t errlen)
{
    struct trk *t;
    uint64_t nbatches;
    int rc;

    if (!cfg->unit || cfg->unit % TRK_PAGE || cfg->length % cfg->unit || cfg->copiers < 1) {
        fail(err, errlen, "bad tracker configuration", EINVAL);
        return NULL;
    }
    t = calloc(1, sizeof *t);
    if (!t) {
        fail(err, errlen, "tracker", ENOMEM);
        return NULL;
    }
    t->cfg = *cfg;
    t->nunits = cfg->length / cfg->unit;
    t->ppu = cfg->unit / TRK_PAGE;
    t->batch_pages = t->ppu >= 64 ? (int)t->ppu : 64;
    t->evfd = -1;
    pthread_mutex_init(&t->arm_lock, NULL);
    pthread_mutex_init(&t->q_lock, NULL);
    pthread_mutex_init(&t->cow_lock, NULL);
    pthread_cond_init(&t->q_ready, NULL);
    pthread_cond_init(&t->q_free, NULL);
    pthread_cond_init(&t->q_work, NULL);

    t->ram = mmap(NULL, cfg->length, PROT_READ, MAP_SHARED, cfg->ramfd, (off_t)cfg->offset);
    if (t->ram == MAP_FAILED) {
        t->ram = NULL;
        fail(err, errlen, "mapping guest RAM", errno);
        goto out;
    }
    t->dirty = calloc((t->nunits + 63) / 64, sizeof(uint64_t));
    t->st = calloc(t->nunits, 1);
    t->owed = malloc(sizeof(uint64_t) * t->nunits);
    t->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!t->dirty || !t->st || !t->owed || t->evfd < 0) {
        fail(err, errlen, "tracker state", errno ? errno : ENOMEM);
        goto out;
    }
    /* --buffer, but at least one batch a copier and the fault thread's reserve */
    nbatches = cfg->buffer_bytes / ((uint64_t)t->batch_pages * TRK_PAGE);
    if (nbatches < (uint64_t)cfg->copiers + COW_RESERVE)
        nbatches = (uint64_t)cfg->copiers + COW_RESERVE;
    t->pool_batches = nbatches;
    for (uint64_t i = 0; i < nbatches; i++) {
        struct batch *b = batch_new(t->batch_pages, 1);
        if (!b) {
            fail(err, errlen, "copy buffer", ENOMEM);
            goto out;
        }
        pool_put(t, b);
    }
    rc = pthread_create(&t->fault_thread, NULL, fault_main, t);
    if (rc) {
        fail(err, errlen, "fault thread", rc);
        goto out;
    }
    t->copiers = calloc((size_t)cfg->copiers, sizeof(pthread_t));
    for (int i = 0; i < cfg->copiers; i++) {
        rc = pthread_create(&t->copiers[i], NULL, copier_main, t);
        if (rc) {
            fail(err, errlen, "copier thread", rc);
            trk_destroy(t);
            return NULL;
        }
        t->ncopiers_started++;
    }
    return t;
out:
    trk_destroy(t);
    return NULL;
}

void trk_destroy(trk_t *t)
{
    struct batch *b;
    uint64_t one = 1;

    if (!t)
        return;
    atomic_store(&t->stopping, 1);
    if (t->evfd >= 0 && write(t->evfd, &one, sizeof one) < 0)
        perror("vmckpt tracker: eventfd");
    pthread_mutex_lock(&t->q_lock);
    pthread_cond_broadcast(&t->q_work);
    pthread_cond_broadcast(&t->q_free);
    pthread_cond_broadcast(&t->q_ready);
    pthread_mutex_unlock(&t->q_lock);
    if (t->fault_thread)
        pthread_join(t->fault_thread, NULL);
    for (int i = 0; i < t->ncopiers_started; i++)
        pthread_join(t->copiers[i], NULL);
    /* Closing the uffd drops the registration: the VMM runs on untracked. */
    if (t->cfg.uffd >= 0)
        close(t->cfg.uffd);
    if (t->cfg.async_uffd >= 0)
        close(t->cfg.async_uffd);
    if (t->cfg.pagemap_fd >= 0)
        close(t->cfg.pagemap_fd);
    while ((b = q_pop(&t->free_pool)))
        batch_free(b);
    while ((b = q_pop(&t->ready)))
        batch_free(b);
    if (t->cow_cur)
        batch_free(t->cow_cur);
    if (t->ram)
        munmap((void *)t->ram, t->cfg.length);
    if (t->evfd >= 0)
        close(t->evfd);
    free(t->copiers), free(t->dirty), free((void *)t->st), free(t->owed), free(t);
}

/* Marks the units holding pages pfns[0..n) (4 KiB page numbers) dirty again, so that the next
 * arm owes them: for a checkpoint dropped after its arm had taken the dirty set (the store
 * could not take its pages). Call once that checkpoint is collected whole. On the async uffd
 * a unit counts as written when it is not protected, so there it is un-protected instead. */
int trk_redirty(trk_t *t, const uint64_t *pfns, uint64_t n)
{
    int rc = 0;

    pthread_mutex_lock(&t->arm_lock);
    for (uint64_t i = 0; i < n && !rc; i++) {
        uint64_t u = pfns[i] / t->ppu;
        if (u >= t->nunits)
            rc = -EINVAL;
        else if (t->async_on)
            rc = trk_wp_range(t->cfg.async_uffd, t->cfg.target_base + u * t->cfg.unit,
                              t->cfg.unit, 0);
        else if (!(t->dirty[u / 64] & (1ull << (u % 64)))) {
            t->dirty[u / 64] |= 1ull << (u % 64);
            t->dirty_units++;
        }
    }
    pthread_mutex_unlock(&t->arm_lock);
    return rc;
}
