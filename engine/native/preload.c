/*
 * vmckpt preload library: loaded into a VMM (QEMU, or any program) with LD_PRELOAD.
 *
 * When the process maps a large shared tmpfs/hugetlbfs file (a memfd or a file under /dev/shm),
 * it registers that mapping with a fresh userfaultfd in write-protect mode and hands the uffd
 * and the RAM fd to the vmckpt engine over the Unix socket named by VMCKPT_SOCKET (SCM_RIGHTS;
 * only to a listener of this process's user or root), then closes its own copy of the uffd:
 * the engine holds the only reference, so if the engine dies the kernel drops the
 * registration and the VMM runs on untracked.
 *
 * Environment:
 *   VMCKPT_SOCKET     engine socket path (unset: the library does nothing)
 *   VMCKPT_MIN_BYTES  smallest mapping to track (default 32 MiB), skips ROMs and small buffers
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "handoff.h"

#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#define WP_FEATURES (UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED)

typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);

static mmap_fn real_mmap;
static mmap_fn real_mmap64;
static pthread_mutex_t handoff_lock = PTHREAD_MUTEX_INITIALIZER;
static __thread int in_hook; /* our own calls (e.g. stdio buffers) must pass straight through */
static int warned;

static void warn_once(const char *fmt, const char *a, const char *b)
{
    if (warned)
        return;
    warned = 1;
    fprintf(stderr, "vmckpt-preload: ");
    fprintf(stderr, fmt, a, b);
    fputc('\n', stderr);
}

static int is_guest_ram(int fd, size_t len, int flags, int prot, char *path, size_t pathlen,
                        uint32_t *page_size)
{
    static size_t min_bytes;
    struct statfs sfs;
    char link[64];
    ssize_t n;

    if (fd < 0 || !(flags & MAP_SHARED) || !(prot & PROT_WRITE))
        return 0;
    if (!min_bytes) {
        const char *m = getenv("VMCKPT_MIN_BYTES");
        min_bytes = m ? strtoull(m, NULL, 0) : (32u << 20);
    }
    if (len < min_bytes)
        return 0;
    if (fstatfs(fd, &sfs) < 0)
        return 0;
    if (sfs.f_type != TMPFS_MAGIC && sfs.f_type != HUGETLBFS_MAGIC)
        return 0;
    *page_size = sfs.f_type == HUGETLBFS_MAGIC ? (uint32_t)sfs.f_bsize : 4096;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, pathlen - 1);
    path[n > 0 ? n : 0] = 0;
    return 1;
}

/* Features the kernel offers. UFFDIO_API works once per fd and reports every available
 * feature, so ask on a spare fd. */
static int64_t probe_features(void)
{
    struct uffdio_api api = {.api = UFFD_API};
    int probe = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (probe < 0)
        return -errno;
    if (ioctl(probe, UFFDIO_API, &api) < 0) {
        int e = errno;
        close(probe);
        return -e;
    }
    close(probe);
    return (int64_t)api.features;
}

/* A uffd with the offered subset of wanted; *features says which it got. */
static int make_uffd(uint64_t offered, uint64_t wanted, uint64_t *features)
{
    struct uffdio_api api = {.api = UFFD_API, .features = offered & wanted};
    int uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0)
        return -errno;
    if (ioctl(uffd, UFFDIO_API, &api) < 0) {
        int e = errno;
        close(uffd);
        return -e;
    }
    *features = api.features;
    return uffd;
}

/* Connects to the engine at sock_path; guest RAM goes only to a listener of our own user or
 * root. SO_PEERCRED of a connected socket names the process that called listen(). Returns the
 * socket, -errno, or -EPERM with *peer_uid set when the listener is someone else. */
static int connect_engine(const char *sock_path, uid_t *peer_uid)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    struct ucred cred;
    socklen_t credlen = sizeof cred;
    int s;

    if (strlen(sock_path) >= sizeof sa.sun_path)
        return -ENAMETOOLONG;
    strcpy(sa.sun_path, sock_path);
    s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -errno;
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0 ||
        getsockopt(s, SOL_SOCKET, SO_PEERCRED, &cred, &credlen) < 0) {
        int e = errno;
        close(s);
        return -e;
    }
    if (cred.uid != geteuid() && cred.uid != 0) {
        *peer_uid = cred.uid;
        close(s);
        return -EPERM;
    }
    return s;
}

/* Sends the handoff on s (connected by connect_engine) and waits for the engine's answer. */
static int send_handoff(int s, const int *fds, int nfds, const struct vmckpt_handoff *h)
{
    char cbuf[CMSG_SPACE(3 * sizeof(int))];
    struct iovec iov = {.iov_base = (void *)h, .iov_len = sizeof *h};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                         .msg_controllen = CMSG_SPACE(nfds * sizeof(int))};
    struct cmsghdr *c;
    struct timeval ack_timeout = {.tv_sec = 10};
    ssize_t n;
    char ack;

    memset(cbuf, 0, sizeof cbuf);
    c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    /* A signal to the VMM's thread (QEMU gets some while it starts) must not end the handoff:
     * the engine would hold the fds while this side gave up on them. */
    do
        n = sendmsg(s, &msg, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n != (ssize_t)sizeof *h)
        return n < 0 ? -errno : -EIO;
    /* The engine answers 'k' when it took the fds, anything else when it refused them (another
     * user, a RAM region it does not track): the refusal is then said in the VMM's own stderr.
     * Bounded, so a wedged engine cannot hang the VMM's start. */
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &ack_timeout, sizeof ack_timeout);
    do
        n = read(s, &ack, 1);
    while (n < 0 && errno == EINTR);
    if (n != 1 || ack != 'k')
        return -ECONNREFUSED;
    return 0;
}

static void maybe_hand_off(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    const char *sock_path = getenv(VMCKPT_SOCKET_ENV);
    struct vmckpt_handoff h;
    struct uffdio_register reg;
    uint64_t features = 0, async_features = 0;
    int64_t offered;
    int s, uffd, async_uffd = -1, rc, fds[3];
    uid_t peer_uid = 0;
    char uid_text[16];

    if (!sock_path || !*sock_path)
        return;
    memset(&h, 0, sizeof h);
    if (!is_guest_ram(fd, len, flags, prot, h.path, sizeof h.path, &h.page_size))
        return;
    /* Who listens is checked before anything is made for it: guest RAM is the guest's secrets. */
    s = connect_engine(sock_path, &peer_uid);
    if (s == -EPERM) {
        snprintf(uid_text, sizeof uid_text, "%u", (unsigned)peer_uid);
        warn_once("the listener on %s is uid %s, neither this process's user nor root: guest "
                  "RAM not handed over, it runs untracked", sock_path, uid_text);
        return;
    }
    if (s < 0) {
        warn_once("no engine took guest RAM at %s (%s); guest RAM runs untracked", sock_path,
                  strerror(-s));
        return;
    }
    offered = probe_features();
    uffd = offered < 0 ? (int)offered
           : !(offered & UFFD_FEATURE_WP_HUGETLBFS_SHMEM) ? -ENOTSUP
           : make_uffd((uint64_t)offered, WP_FEATURES, &features);
    if (uffd < 0) {
        warn_once("cannot create a userfaultfd (%s)%s; guest RAM runs untracked",
                  strerror(-uffd), "");
        close(s);
        return;
    }
    reg.range.start = (uintptr_t)addr;
    reg.range.len = len;
    reg.mode = UFFDIO_REGISTER_MODE_WP;
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
        warn_once("cannot register guest RAM for write-protect (%s)%s; runs untracked",
                  strerror(errno), "");
        close(uffd);
        close(s);
        return;
    }
    memcpy(h.magic, VMCKPT_HANDOFF_MAGIC, sizeof h.magic);
    h.version = VMCKPT_HANDOFF_VERSION;
    h.size = sizeof h;
    h.addr = (uintptr_t)addr;
    h.length = len;
    h.offset = (uint64_t)off;
    h.features = features;
    h.pid = (uint32_t)getpid();
    /* A second, unregistered uffd for the engine's async tracking (the kernel records writes
     * itself); the engine moves the range onto it. Only where the kernel has WP_ASYNC. */
    if (offered & UFFD_FEATURE_WP_ASYNC)
        async_uffd = make_uffd((uint64_t)offered, WP_FEATURES | UFFD_FEATURE_WP_ASYNC,
                               &async_features);
    h.async_features = async_uffd >= 0 ? async_features : 0;
    fds[0] = uffd, fds[1] = fd, fds[2] = async_uffd;
    rc = send_handoff(s, fds, async_uffd >= 0 ? 3 : 2, &h);
    close(s);
    /* Closing our copies unregisters nothing while the engine holds the fds; if the handoff
     * failed it drops the registration, and the VMM runs on as if we were never here. */
    close(uffd);
    if (async_uffd >= 0)
        close(async_uffd);
    if (rc < 0)
        warn_once("no engine took guest RAM at %s (%s); guest RAM runs untracked", sock_path,
                  strerror(-rc));
}

static void *hooked(mmap_fn *real, const char *name, void *addr, size_t len, int prot, int flags,
                    int fd, off_t off)
{
    void *p;

    if (!*real)
        *real = (mmap_fn)dlsym(RTLD_NEXT, name);
    p = (*real)(addr, len, prot, flags, fd, off);
    if (p == MAP_FAILED || in_hook || fd < 0 || !(flags & MAP_SHARED))
        return p;
    in_hook = 1;
    pthread_mutex_lock(&handoff_lock);
    maybe_hand_off(p, len, prot, flags, fd, off);
    pthread_mutex_unlock(&handoff_lock);
    in_hook = 0;
    return p;
}

__attribute__((visibility("default"))) void *mmap(void *addr, size_t len, int prot, int flags,
                                                  int fd, off_t off)
{
    return hooked(&real_mmap, "mmap", addr, len, prot, flags, fd, off);
}

__attribute__((visibility("default"))) void *mmap64(void *addr, size_t len, int prot, int flags,
                                                    int fd, off_t off)
{
    return hooked(&real_mmap64, "mmap64", addr, len, prot, flags, fd, off);
}
