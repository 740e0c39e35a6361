/*
 * The tracker's internals, shared by its files (tracker.h is the API):
 *   tracker.c          create, destroy, figures
 *   tracker_pool.c     batches, their bounded pool, the ready queue and trk_collect
 *   tracker_fault.c    the fault-service thread (copy-on-write, dirty marking, un-protect)
 *   tracker_copiers.c  the copier threads (claim owed units, copy, hash)
 *   tracker_arm.c      arming a checkpoint: the dirty set, the owed set, trk_arm
 *   tracker_async.c    TRK_ASYNC / TRK_HYBRID: switching uffds, PAGEMAP_SCAN, stop-and-copy
 *   tracker_wp.c       userfaultfd write protection of ranges and unit sets
 */
#pragma once
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include "tracker.h"

/* Per-unit copy state. A unit is never un-protected while it is OWED or COPYING. */
enum { ST_NONE = 0, ST_OWED = 1, ST_COPYING = 2 };

#define COW_RESERVE 1 /* pooled batches copiers leave to the fault thread */
#define HINTS 256     /* slots in the copy priority hint ring */

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
    _Atomic uint64_t hints[HINTS];
    atomic_uint_fast64_t hint_w, hint_r;

    /* Figures */
    atomic_uint_fast64_t faults, cow_copies, copier_copies, copier_waits, cow_waits;
    atomic_uint_fast64_t hist[48];
    uint64_t faults_at_arm;
};

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Adds unit u to the dirty set (arm_lock held): owed by the next arm. */
static inline void set_dirty(struct trk *t, uint64_t u)
{
    if (!(t->dirty[u / 64] & (1ull << (u % 64)))) {
        t->dirty[u / 64] |= 1ull << (u % 64);
        t->dirty_units++;
    }
}

/* Takes an owed unit for copying: OWED -> COPYING; false if it is not owed or already taken. */
static inline int claim_unit(struct trk *t, uint64_t u)
{
    uint8_t expect = ST_OWED;
    return atomic_compare_exchange_strong(&t->st[u], &expect, ST_COPYING);
}

/* Copies unit u into batch b; the caller owns u (it moved it OWED -> COPYING). */
static inline void copy_unit(struct trk *t, uint64_t u, struct batch *b)
{
    memcpy(b->data + (size_t)b->n * TRK_PAGE, t->ram + u * t->cfg.unit, t->cfg.unit);
    for (uint32_t k = 0; k < t->ppu; k++)
        b->pfns[b->n + k] = u * t->ppu + k;
    b->n += t->ppu;
    atomic_store_explicit(&t->st[u], ST_NONE, memory_order_release);
    atomic_fetch_sub(&t->remaining, 1);
}

#pragma GCC visibility push(hidden)

/* tracker_pool.c; the q_ functions and pool_put, pool_get, stop_copy_batch, put_batch with
 * q_lock held */
void q_push(struct bqueue *q, struct batch *b);
struct batch *q_pop(struct bqueue *q);
void batch_free(struct batch *b);
int pool_fill(struct trk *t, uint64_t nbatches);
void pool_drop(struct trk *t);
void pool_put(struct trk *t, struct batch *b);
struct batch *pool_get(struct trk *t);
struct batch *stop_copy_batch(struct trk *t);
void put_batch(struct trk *t, struct batch *b);
uint64_t pool_units(struct trk *t);

/* tracker_fault.c, tracker_copiers.c */
void *fault_main(void *arg);
void *copier_main(void *arg);
void copy_batch(struct trk *t, struct batch *b);

/* tracker_arm.c */
uint64_t add_units(struct trk *t, uint64_t n, uint64_t from, uint64_t to);
void owe(struct trk *t, uint64_t n);

/* tracker_async.c */
int move_range(struct trk *t, int from, int to);
int scan_written(struct trk *t, uint64_t *n);
void stop_and_copy(struct trk *t, uint64_t n);

#pragma GCC visibility pop
