/* Times first writes to write-protected shared pages, one page at a time, from the writer's
 * side: the fault round trip a guest vCPU sees.
 *
 *   faultprobe bare   MIB NPAGES   its own uffd and a bare handler thread (read, un-protect)
 *   faultprobe engine MIB NPAGES   under the vmckpt preload library: the engine's tracker
 *                                  serves the faults; waits for a line on stdin (armed) first
 *
 * Prints one JSON line: {"p50_ns":…,"p99_ns":…,"n":…}. Pages are never populated before, so
 * no fault copies anything (WP_UNPOPULATED protects holes): both handlers only track. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#define PAGE 4096UL

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void wp(int uffd, char *addr, size_t len, int on)
{
    struct uffdio_writeprotect w = {
        .range = {(uintptr_t)addr, len}, .mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0};
    if (ioctl(uffd, UFFDIO_WRITEPROTECT, &w))
        die("UFFDIO_WRITEPROTECT");
}

static void *bare_handler(void *arg)
{
    int uffd = (int)(intptr_t)arg;
    struct uffd_msg m;
    struct pollfd p = {uffd, POLLIN, 0};
    for (;;) {
        if (poll(&p, 1, -1) < 0)
            die("poll");
        if (read(uffd, &m, sizeof m) != sizeof m)
            continue;
        if (m.event == UFFD_EVENT_PAGEFAULT)
            wp(uffd, (char *)(uintptr_t)(m.arg.pagefault.address & ~(PAGE - 1)), PAGE, 0);
    }
    return NULL;
}

static void bare_setup(char *ram, size_t len)
{
    int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_WP_UNPOPULATED};
    struct uffdio_register reg = {.range = {(uintptr_t)ram, len},
                                  .mode = UFFDIO_REGISTER_MODE_WP};
    pthread_t th;
    if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api) || ioctl(uffd, UFFDIO_REGISTER, &reg))
        die("userfaultfd");
    wp(uffd, ram, len, 1);
    if (pthread_create(&th, NULL, bare_handler, (void *)(intptr_t)uffd))
        die("pthread_create");
}

static int cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return fprintf(stderr, "usage: faultprobe bare|engine MIB NPAGES\n"), 2;
    size_t len = strtoul(argv[2], NULL, 0) << 20, n = strtoul(argv[3], NULL, 0);
    if (n > len / PAGE)
        n = len / PAGE;
    int fd = memfd_create("faultprobe", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)len))
        die("memfd");
    char *ram = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    uint64_t *lat = calloc(n, sizeof *lat);
    if (ram == MAP_FAILED || !lat)
        die("mmap");
    if (!strcmp(argv[1], "bare")) {
        bare_setup(ram, len);
    } else {
        char line[64];
        printf("READY\n");
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin))
            return 1;
    }
    for (size_t i = 0; i < n; i++) {
        volatile uint64_t *p = (volatile uint64_t *)(ram + i * PAGE);
        uint64_t t0 = now_ns();
        *p = i + 1;
        lat[i] = now_ns() - t0;
    }
    qsort(lat, n, sizeof *lat, cmp);
    printf("{\"p50_ns\": %lu, \"p99_ns\": %lu, \"n\": %zu}\n", (unsigned long)lat[n / 2],
           (unsigned long)lat[n * 99 / 100], n);
    fflush(stdout);
    return 0;
}
