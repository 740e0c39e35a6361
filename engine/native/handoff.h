/* The message the preload library sends the engine, with SCM_RIGHTS [uffd, ramfd] or
 * [uffd, ramfd, async_uffd]; no padding. Mirrored by vmckpt/engine/handoff.py (struct format
 * "<8sIIQQQQIIQ256s"). */
#pragma once
#include <stdint.h>

#define VMCKPT_SOCKET_ENV "VMCKPT_SOCKET"
#define VMCKPT_HANDOFF_MAGIC "VMCKPT\0\1"
#define VMCKPT_HANDOFF_VERSION 2

struct vmckpt_handoff {
    char magic[8];
    uint32_t version;
    uint32_t size;       /* sizeof(struct vmckpt_handoff) */
    uint64_t addr;       /* mapping address in the VMM */
    uint64_t length;     /* mapping length */
    uint64_t offset;     /* file offset of the mapping */
    uint64_t features;   /* UFFD features enabled on the uffd */
    uint32_t pid;        /* the VMM (also checked with SO_PEERCRED) */
    uint32_t page_size;  /* 4096, or the hugetlbfs page size */
    uint64_t async_features; /* UFFD features of the async uffd (0: none sent) */
    char path[256];      /* what /proc/self/fd/N says of the RAM fd, for messages */
};
