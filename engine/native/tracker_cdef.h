/* The tracker's API as cffi sees it (a subset of tracker.h: no includes, no macros). */

struct trk_config {
    int uffd;               /* userfaultfd registered (WP mode) on the target's mapping; the
                               tracker owns it: closing it drops the registration */
    int ramfd;              /* the guest-RAM memfd / shm file, mapped read-only here */
    uint64_t target_base;   /* address of the mapping in the target's address space */
    uint64_t length;        /* bytes of guest RAM */
    uint64_t offset;        /* file offset of the mapping */
    uint32_t unit;          /* tracking unit: 4096, or 2 MiB for hugetlb memory */
    int copiers;            /* copier threads */
    uint64_t buffer_bytes;  /* bound on copied-but-uncollected pages (at least one batch per
                               copier and one for the fault thread) */
    int owe_all;            /* first arm owes every unit instead of SEEK_DATA's populated set */
    int tracking;           /* TRK_WP, TRK_ASYNC or TRK_HYBRID (below) */
    int priority;           /* after a copy-on-write fault at unit u, copiers take the owed
                               units after u first: the guest is likely to write them next */
    int async_uffd;         /* TRK_ASYNC, TRK_HYBRID: an unregistered uffd with
                               UFFD_FEATURE_WP_ASYNC (owned) */
    int pagemap_fd;         /* TRK_ASYNC, TRK_HYBRID: the target's /proc/PID/pagemap, for
                               PAGEMAP_SCAN (owned) */
};

/* TRK_WP: every first write after a checkpoint faults to the fault thread (copy-on-write).
 * TRK_ASYNC: after the first checkpoint, the kernel records writes itself (WP_ASYNC, no fault
 * round trip); each arm finds them with one PAGEMAP_SCAN that also re-protects them, and copies
 * them before returning (stop-and-copy of the dirty set).
 * TRK_HYBRID: async between checkpoints, sync write-protect while a checkpoint drains. Each arm
 * after the first scans the async range (the written set, joined with what was dirtied by faults
 * before the last switch), moves the range onto the sync uffd and protects all of it: the written
 * set is owed and drained copy-on-write like TRK_WP. Once drained, trk_to_async() (target
 * paused) moves the range back. */
#define TRK_WP 0
#define TRK_ASYNC 1
#define TRK_HYBRID 2

struct trk_arm_stats {
    uint64_t units_owed;    /* units owed to the checkpoint just armed */
    uint64_t runs;          /* write-protect ioctls issued */
    uint64_t faults;        /* write faults served since the previous arm (each dirtied a unit) */
    uint64_t dirty_units;   /* units dirtied since the previous arm (== units_owed after the first) */
    uint64_t arm_ns;        /* time spent inside trk_arm */
    uint64_t copied_in_arm; /* TRK_ASYNC: units copied inside trk_arm */
};

struct trk_stats {            /* counts since trk_create */
    uint64_t faults;
    uint64_t cow_copies;         /* owed units copied by the fault thread (copy-on-write) */
    uint64_t copier_copies;
    uint64_t copier_waits;       /* times a copier waited for buffer space */
    uint64_t cow_waits;          /* times the fault thread waited for buffer space (the
                                    store a whole buffer behind) */
    uint64_t fault_hist[48];     /* fault service time histogram, bucket i = [2^i, 2^(i+1)) ns */
};

typedef struct trk trk_t;

trk_t *trk_create(const struct trk_config *cfg, char *err, size_t errlen);
int trk_arm(trk_t *t, int paused, struct trk_arm_stats *st);
/* Lets the copiers start on the armed checkpoint: after the target resumed, so that they do
 * not take CPU from what the pause is waiting for (QEMU saving its device state). Faults are
 * served (copy-on-write included) from trk_arm on, released or not. */
void trk_release(trk_t *t);
/* TRK_HYBRID, with the target paused and the armed checkpoint drained (else -EBUSY): moves the
 * range from the sync uffd to the async one and protects all of it. Units dirtied by faults so
 * far stay in the dirty set and are owed by the next arm. 0 if the range already is async. */
int trk_to_async(trk_t *t);
int trk_collect(trk_t *t, uint8_t *pages, uint8_t *ids, uint64_t *pfns, uint8_t *zero,
                int max_pages, int timeout_ms, int *done);
void trk_get_stats(trk_t *t, struct trk_stats *st);
void trk_reset_hist(trk_t *t);
const uint8_t *trk_ram(trk_t *t);
void trk_destroy(trk_t *t);

/* Baselines for the benchmarks, sharing the tracker's own primitives. */
int trk_wp_range(int uffd, uint64_t start, uint64_t len, int protect);
/* Write-protects sorted unit indices in coalesced runs (across short already-protected gaps). */
int trk_wp_units(int uffd, uint64_t base, const uint64_t *units, uint64_t n, uint32_t unit,
                 uint64_t *runs);
void trk_hash_pages(const uint8_t *pages, int n, uint8_t *ids, uint8_t *zero);

/* A dropped checkpoint's pages (4 KiB page numbers) are owed again by the next arm. */
int trk_redirty(trk_t *t, const uint64_t *pfns, uint64_t n);
