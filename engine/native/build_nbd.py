"""cffi (API mode) build of vmckpt.engine._nbd: libnbd, to read a QEMU NBD export's blocks and
the extents its dirty bitmap or allocation names. The extent callback is C: block status
replies are collected into arrays without a Python call per reply."""

from cffi import FFI

ffi = FFI()
ffi.cdef("""
struct nbd_handle;
struct nbd_handle *nbd_create(void);
void nbd_close(struct nbd_handle *h);
const char *nbd_get_error(void);
int nbd_set_export_name(struct nbd_handle *h, const char *name);
int nbd_add_meta_context(struct nbd_handle *h, const char *name);
int nbd_connect_unix(struct nbd_handle *h, const char *unixsocket);
int nbd_can_meta_context(struct nbd_handle *h, const char *metacontext);
int64_t nbd_get_size(struct nbd_handle *h);
int nbd_pread(struct nbd_handle *h, void *buf, size_t count, uint64_t offset, uint32_t flags);
int nbd_shutdown(struct nbd_handle *h, uint32_t flags);

/* Extents of [0, size) whose flags & mask == want, adjacent ones merged, as (offset, length)
   pairs in *out (free with vk_free); their count, or -1 (nbd_get_error says why). */
int64_t vk_extents(struct nbd_handle *h, const char *context, uint64_t size, uint32_t mask,
                   uint32_t want, uint64_t **out);
void vk_free(void *p);
""")
ffi.set_source("vmckpt.engine._nbd", r"""
#include <errno.h>
#include <libnbd.h>
#include <stdlib.h>
#include <string.h>

struct vk_acc {
    const char *context;
    uint32_t mask, want;
    uint64_t *v;       /* offset, length pairs */
    size_t n, cap;     /* pairs */
    uint64_t reached;  /* end of the last extent the server described */
    int oom;
};

static int vk_on_extents(void *ud, const char *metacontext, uint64_t offset,
                         uint32_t *entries, size_t nr, int *error)
{
    struct vk_acc *a = ud;
    if (strcmp(metacontext, a->context) != 0)
        return 0;
    for (size_t i = 0; i + 1 < nr; i += 2) {
        uint64_t len = entries[i];
        if (len && (entries[i + 1] & a->mask) == a->want) {
            if (a->n && a->v[2 * a->n - 2] + a->v[2 * a->n - 1] == offset) {
                a->v[2 * a->n - 1] += len;
            } else {
                if (a->n == a->cap) {
                    size_t cap = a->cap ? 2 * a->cap : 256;
                    uint64_t *v = realloc(a->v, cap * 2 * sizeof *v);
                    if (!v) { a->oom = 1; *error = ENOMEM; return -1; }
                    a->v = v, a->cap = cap;
                }
                a->v[2 * a->n] = offset, a->v[2 * a->n + 1] = len, a->n++;
            }
        }
        offset += len;
    }
    if (offset > a->reached)
        a->reached = offset;
    return 0;
}

int64_t vk_extents(struct nbd_handle *h, const char *context, uint64_t size, uint32_t mask,
                   uint32_t want, uint64_t **out)
{
    struct vk_acc a = { .context = context, .mask = mask, .want = want };
    uint64_t pos = 0;
    while (pos < size) {
        /* A reply may describe less than asked: ask again from where it stopped. */
        uint64_t count = size - pos < (1u << 30) ? size - pos : (1u << 30);
        a.reached = pos;
        nbd_extent_callback cb = { .callback = vk_on_extents, .user_data = &a };
        if (nbd_block_status(h, count, pos, cb, 0) == -1 || a.reached <= pos) {
            free(a.v);
            return -1;
        }
        pos = a.reached;
    }
    *out = a.v;
    return (int64_t)a.n;
}

void vk_free(void *p) { free(p); }
""", libraries=["nbd"], extra_compile_args=["-O2", "-Wall", "-Wextra"])

if __name__ == "__main__":
    ffi.compile(verbose=True)
