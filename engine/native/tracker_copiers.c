/* The copier threads: claim owed units (hinted ones first, then in order), copy them into
 * pooled batches, hash them and hand them over, while the guest runs. */
#define _GNU_SOURCE
#define OPENSSL_SUPPRESS_DEPRECATED /* the one-shot SHA256 API skips EVP's per-call overhead */
#include <openssl/sha.h>

#include "tracker_int.h"

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

/* Copies unit u into b if it is still owed and nobody else took it. */
static void take_unit(struct trk *t, uint64_t u, struct batch *b)
{
    if (claim_unit(t, u)) {
        copy_unit(t, u, b);
        atomic_fetch_add_explicit(&t->copier_copies, 1, memory_order_relaxed);
    }
}

/* Claims owed units, hinted ones first, and copies them into b until it is full or none are
 * left. */
static void fill_batch(struct trk *t, struct batch *b)
{
    b->n = 0;
    for (;;) {
        uint64_t r = atomic_load(&t->hint_r);
        if (b->n + (int)t->ppu > t->batch_pages || r >= atomic_load(&t->hint_w))
            break;
        if (!atomic_compare_exchange_weak(&t->hint_r, &r, r + 1))
            continue;
        uint64_t u = atomic_load_explicit(&t->hints[r % HINTS], memory_order_relaxed);
        if (u < t->nunits)
            take_unit(t, u, b);
    }
    while (b->n + (int)t->ppu <= t->batch_pages) {
        uint64_t i = atomic_fetch_add(&t->cursor, 1);
        if (i >= t->owed_n)
            break;
        take_unit(t, t->owed[i], b);
    }
}

/* Fills b, a batch this thread took (counted inflight), hashes it unless the collector will
 * (a stop-and-copy batch), and hands it over. */
void copy_batch(struct trk *t, struct batch *b)
{
    fill_batch(t, b);
    b->hashed = !b->later;
    if (b->hashed)
        trk_hash_pages(b->data, b->n, b->ids, b->zero);

    pthread_mutex_lock(&t->q_lock);
    t->inflight--;
    put_batch(t, b);
    pthread_mutex_unlock(&t->q_lock);
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
void *copier_main(void *arg)
{
    struct trk *t = arg;
    struct batch *b;

    while ((b = take_batch(t)))
        copy_batch(t, b);
    return NULL;
}
