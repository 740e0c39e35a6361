/* The tracker's life: create (map guest RAM, allocate its state and pool, start the threads),
 * destroy, and its figures. The rest of it: tracker_int.h says which file does what. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "tracker_int.h"

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
    if (pool_fill(t, nbatches)) {
        fail(err, errlen, "copy buffer", ENOMEM);
        goto out;
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
            goto out;
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
    pool_drop(t);
    if (t->ram)
        munmap((void *)t->ram, t->cfg.length);
    if (t->evfd >= 0)
        close(t->evfd);
    free(t->copiers), free(t->dirty), free((void *)t->st), free(t->owed), free(t);
}
