/* What only TRK_ASYNC and TRK_HYBRID do: move the range between the sync and the async uffd,
 * find what was written with PAGEMAP_SCAN, and copy a written set inside the pause
 * (stop-and-copy). */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>

#include "tracker_int.h"

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
int move_range(struct trk *t, int from, int to)
{
    struct uffdio_range r = {.start = t->cfg.target_base, .len = t->cfg.length};
    struct uffdio_register reg = {.range = r, .mode = UFFDIO_REGISTER_MODE_WP};

    if (ioctl(from, UFFDIO_UNREGISTER, &r) < 0 || ioctl(to, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    t->async_on = to == t->cfg.async_uffd;
    return trk_wp_range(to, r.start, r.len, 1);
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
int scan_written(struct trk *t, uint64_t *n)
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
            *n = add_units(t, *n, regs[i].start - base, regs[i].end - base);
        /* walk_end can stop short of end even when the walk is complete: a short vector is
         * the reliable end. */
        if (r < 512)
            break;
        start = a.walk_end;
    }
    return 0;
}

/* An async arm's stop-and-copy of t->owed[0..n): the copiers and this thread together;
 * returns when every unit is copied. */
void stop_and_copy(struct trk *t, uint64_t n)
{
    owe(t, n);
    pthread_mutex_lock(&t->q_lock);
    t->stop_copy = t->released = 1;
    pthread_cond_broadcast(&t->q_work);
    while (atomic_load(&t->cursor) < n) {
        struct batch *b = stop_copy_batch(t);
        t->inflight++;
        pthread_mutex_unlock(&t->q_lock);
        copy_batch(t, b);
        pthread_mutex_lock(&t->q_lock);
    }
    while (atomic_load(&t->remaining) || t->inflight)
        pthread_cond_wait(&t->q_ready, &t->q_lock);
    t->stop_copy = 0;
    pthread_mutex_unlock(&t->q_lock);
}
