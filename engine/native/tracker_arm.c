/* Arming a checkpoint (the target paused, or running for a pre-arm): owed <- dirty,
 * dirty <- {}, protect the owed set; the first arm owes every populated unit. Also the dirty
 * set's other writers: trk_redirty, and the switch to async tracking. */
#define _GNU_SOURCE
#include <errno.h>
#include <unistd.h>

#include "tracker_int.h"

/* Appends to t->owed[0..n) the units covering byte offsets [from, to) of the range, the first
 * of them only if it is not already the last there; returns the new count. */
uint64_t add_units(struct trk *t, uint64_t n, uint64_t from, uint64_t to)
{
    for (uint64_t u = from / t->cfg.unit; u < (to + t->cfg.unit - 1) / t->cfg.unit; u++)
        if (!n || t->owed[n - 1] != u)
            t->owed[n++] = u;
    return n;
}

/* Makes t->owed[0..n) the owed set of the checkpoint being armed. Copiers are held off
 * (released is clear) and faults by arm_lock, so the counters are whole before the first unit
 * becomes OWED. */
void owe(struct trk *t, uint64_t n)
{
    atomic_store(&t->cursor, 0);
    atomic_store(&t->remaining, n);
    t->owed_n = n;
    for (uint64_t i = 0; i < n; i++)
        atomic_store_explicit(&t->st[t->owed[i]], ST_OWED, memory_order_relaxed);
}

/* Units holding data: SEEK_DATA/SEEK_HOLE skips never-touched holes (not on hugetlbfs). */
static uint64_t populated_units(struct trk *t)
{
    off_t base = (off_t)t->cfg.offset, end = base + (off_t)t->cfg.length, pos = base;
    uint64_t n = 0;

    /* ENXIO just means no data at all; other errors mean SEEK_DATA is not supported. */
    if (t->cfg.owe_all || (lseek(t->cfg.ramfd, base, SEEK_DATA) < 0 && errno != ENXIO))
        return add_units(t, 0, 0, t->cfg.length);
    while (pos < end) {
        off_t data = lseek(t->cfg.ramfd, pos, SEEK_DATA), hole;
        if (data < 0 || data >= end)
            break;
        hole = lseek(t->cfg.ramfd, data, SEEK_HOLE);
        if (hole < 0 || hole > end)
            hole = end;
        n = add_units(t, n, (uint64_t)(data - base), (uint64_t)(hole - base));
        pos = hole;
    }
    return n;
}

/* Marks t->owed[from..to) dirty (the written set of a scan joins the fault-dirtied set). */
static void mark_dirty(struct trk *t, uint64_t from, uint64_t to)
{
    for (uint64_t i = from; i < to; i++)
        set_dirty(t, t->owed[i]);
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

void trk_release(trk_t *t)
{
    pthread_mutex_lock(&t->q_lock);
    t->released = 1;
    pthread_cond_broadcast(&t->q_work);
    pthread_mutex_unlock(&t->q_lock);
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
        else
            set_dirty(t, u);
    }
    pthread_mutex_unlock(&t->arm_lock);
    return rc;
}
