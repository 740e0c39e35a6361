/* The bare write-protect bench/bench_pause.py compares the engine's arm with: one plain
 * UFFDIO_WRITEPROTECT per run of consecutive dirty pages, nothing merged, nothing else.
 * Written apart from the engine's tracker on purpose (it must not share its code).
 *
 *   int64_t bare_wp_runs(int uffd, uint64_t base, const uint64_t *pfns, uint64_t n,
 *                        uint64_t page)   pfns sorted; returns the runs protected, or -errno */
#include <errno.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <sys/ioctl.h>

int64_t bare_wp_runs(int uffd, uint64_t base, const uint64_t *pfns, uint64_t n, uint64_t page)
{
    int64_t runs = 0;
    for (uint64_t i = 0; i < n;) {
        uint64_t j = i + 1;
        while (j < n && pfns[j] == pfns[j - 1] + 1)
            j++;
        struct uffdio_writeprotect w = {
            .range = {base + pfns[i] * page, (pfns[j - 1] - pfns[i] + 1) * page},
            .mode = UFFDIO_WRITEPROTECT_MODE_WP};
        if (ioctl(uffd, UFFDIO_WRITEPROTECT, &w))
            return -errno;
        runs++;
        i = j;
    }
    return runs;
}
