/* userfaultfd write protection: protect and un-protect a range, and a set of units in
 * coalesced runs (also the benchmarks' baselines). */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>

#include "tracker_int.h"

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
