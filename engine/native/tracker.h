/*
 * The tracker: the hot path of vmckpt, in C threads that never touch Python or the store.
 *
 * A fault-service thread serves write-protect faults on the VMM's guest RAM (copy-on-write of
 * pages still owed to the checkpoint in flight, dirty marking for the next one, un-protect);
 * copier threads copy and hash every owed page into a bounded pool of batches while the guest
 * runs; the engine collects finished batches with trk_collect() and stores them.
 */
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "tracker_cdef.h"

#define TRK_PAGE 4096u
#define TRK_ID_BYTES 32u
