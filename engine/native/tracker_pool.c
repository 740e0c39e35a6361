/* Batches of copied pages: the bounded pool they come from, the queue of filled ones, and
 * trk_collect, which hands them to the engine and returns them to the pool. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>

#include "tracker_int.h"

void q_push(struct bqueue *q, struct batch *b)
{
    b->next = NULL;
    if (q->tail)
        q->tail->next = b;
    else
        q->head = b;
    q->tail = b;
}

struct batch *q_pop(struct bqueue *q)
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
        batch_free(b);
        return NULL;
    }
    return b;
}

void batch_free(struct batch *b)
{
    free(b->pfns), free(b->ids), free(b->zero), free(b->data), free(b);
}

/* Pool accounting (q_lock held). */
void pool_put(struct trk *t, struct batch *b)
{
    b->later = 0;
    q_push(&t->free_pool, b);
    t->free_n++;
    /* the fault thread and copiers wait on q_free for different counts: wake them all */
    pthread_cond_broadcast(&t->q_free);
}

struct batch *pool_get(struct trk *t)
{
    struct batch *b = q_pop(&t->free_pool);
    if (b)
        t->free_n--;
    return b;
}

/* Fills the pool with nbatches batches (at trk_create, no thread running yet). */
int pool_fill(struct trk *t, uint64_t nbatches)
{
    t->pool_batches = nbatches;
    for (uint64_t i = 0; i < nbatches; i++) {
        struct batch *b = batch_new(t->batch_pages, 1);
        if (!b)
            return -ENOMEM;
        pool_put(t, b);
    }
    return 0;
}

/* Frees every batch, pooled or not (at trk_destroy, every thread joined). */
void pool_drop(struct trk *t)
{
    struct batch *b;

    while ((b = q_pop(&t->free_pool)))
        batch_free(b);
    while ((b = q_pop(&t->ready)))
        batch_free(b);
    if (t->cow_cur)
        batch_free(t->cow_cur);
}

/* A batch for an async arm's stop-and-copy (q_lock held): from the pool, which holds the whole
 * written set when the arm chose to copy it (async_fits); outside it only if that estimate was
 * short, since nothing frees a batch before the copy ends. Hashed later, by the collector: the
 * target is paused meanwhile. */
struct batch *stop_copy_batch(struct trk *t)
{
    struct batch *b = pool_get(t);
    if (!b && !(b = batch_new(t->batch_pages, 0)))
        abort(); /* out of memory: dying drops the uffd, the guest runs on */
    b->later = 1;
    return b;
}

/* A batch the engine is done with (or an empty one) goes back to the pool, or is freed if it
 * was allocated for a stop-and-copy; q_lock held. */
static void batch_done(struct trk *t, struct batch *b)
{
    if (b->pooled)
        pool_put(t, b);
    else
        batch_free(b);
}

/* Hands a filled batch over (or back, if empty); q_lock held. */
void put_batch(struct trk *t, struct batch *b)
{
    if (b->n)
        q_push(&t->ready, b);
    else
        batch_done(t, b);
    pthread_cond_broadcast(&t->q_ready);
}

/* Units a stop-and-copy can take from the pool, every batch of which is free at an arm: the
 * copiers and the arming thread each leave at most one batch part-filled. */
uint64_t pool_units(struct trk *t)
{
    uint64_t spare = (uint64_t)t->cfg.copiers + 1;
    return t->pool_batches > spare ? (t->pool_batches - spare) * (t->batch_pages / t->ppu) : 0;
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
        batch_done(t, b);
    }
    pthread_mutex_unlock(&t->q_lock);
    return out;
}
