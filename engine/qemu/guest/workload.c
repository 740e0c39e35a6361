/* Test-guest workload: prints a tick counter on the serial console every 0.5 s and dirties
 * guest memory at a chosen rate, so checkpoints and restores can be checked from outside.
 *
 *   workload MODE RATE MB TICKS [DISK]
 *   MODE  idle (ticks only) | dirty (distinct pages) | dup (pages from 16 patterns or zero)
 *         | cached (DISK: CACHED distinct blocks written once into the disk's second half
 *         through the page cache, then fsync'ed: in guest RAM and on disk at once; then idle)
 *         | diskwrite (DISK: distinct 64 KiB O_DIRECT writes over the second half, as fast as
 *         it goes; ticks add " disk_bytes=<bytes written so far>")
 *   RATE  pages per second to write; 0 = as fast as possible
 *   MB    working set in MiB
 *   TICKS exit after this many ticks (0 = never)
 *   DISK  a block device: tick n writes "VMCKPT-DISK n" to its 4 KiB block n (O_DIRECT), then
 *         reads block n+1, which must still be empty on the first pass over the disk
 *
 * Output: "VMCKPT-TICK <n> pages=<pages written so far> work=<mode>[ disk=ok|future:<m>]"
 * (future: block n+1 held tick m's write, a write from after this guest's instant). The
 * counters live in guest memory, so a restored guest continues from where it was
 * checkpointed. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define TICK_NS 500000000ULL
#define SLICE_NS 10000000ULL /* pacing slice: keeps the write rate steady, not bursty */
#define NPAT 16

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static void sleep_until(uint64_t t) /* absolute deadline: ticks do not drift */
{
	struct timespec ts = { .tv_sec = t / 1000000000ULL, .tv_nsec = t % 1000000000ULL };
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

static uint64_t mix(uint64_t x) /* splitmix64 finaliser: cheap pseudo-random choices */
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static uint64_t gcd(uint64_t a, uint64_t b)
{
	while (b) {
		uint64_t t = a % b;
		a = b;
		b = t;
	}
	return a;
}

static uint64_t *mem, npages, stride, cursor, written;
static int dup_mode;
static uint64_t patterns[NPAT][WORDS];

static void write_page(void)
{
	/* A stride coprime to npages visits every page once per pass, in a scattered order. */
	cursor = (cursor + stride) % npages;
	uint64_t *p = mem + cursor * WORDS, c = ++written;
	if (dup_mode) {
		uint64_t h = mix(c);
		if ((h & 3) == 0)
			memset(p, 0, PAGE); /* ~1/4 zero pages */
		else
			memcpy(p, patterns[(h >> 2) % NPAT], PAGE);
	} else {
		/* A unique counter plus a few scattered words: pages are non-zero and distinct. */
		p[0] = c;
		p[1 + c % (WORDS - 1)] ^= mix(c);
		p[WORDS / 2] = cursor;
		p[WORDS - 1] = c ^ cursor;
	}
}

static int disk_fd = -1;
static uint64_t disk_blocks;
static char *disk_buf; /* one aligned page: O_DIRECT */
static const char *disk_path;

#define CACHED 256
#define CHUNK (64 << 10)

/* A distinct block: its number and a pass counter in front of a pseudo-random page. */
static void fill_block(uint64_t *p, uint64_t block, uint64_t pass)
{
	for (int w = 0; w < WORDS; w++)
		p[w] = mix(block << 20 ^ pass << 40 ^ (uint64_t)w);
	p[0] = block;
	p[1] = pass;
}

/* cached: through the page cache, so each block is also a page of guest RAM. */
static void write_cached(void)
{
	int fd = open(disk_path, O_WRONLY);
	uint64_t first = disk_blocks / 2, page[WORDS];
	for (uint64_t b = 0; b < CACHED && fd >= 0; b++) {
		fill_block(page, first + b, 0);
		if (pwrite(fd, page, PAGE, (off_t)((first + b) * PAGE)) != PAGE)
			break;
	}
	if (fd < 0 || fsync(fd) || close(fd)) {
		perror("workload: cached");
		exit(1);
	}
	printf("VMCKPT-CACHED %d\n", CACHED);
	fflush(stdout);
}

static uint64_t *disk_chunk, disk_bytes, disk_cursor;

/* diskwrite: one 64 KiB O_DIRECT write of distinct blocks, cycling over the second half. */
static void write_chunk(void)
{
	uint64_t first = disk_blocks / 2, span = disk_blocks - first, per = CHUNK / PAGE;
	if (!disk_chunk && posix_memalign((void **)&disk_chunk, PAGE, CHUNK))
		exit(1);
	if (disk_cursor + per > span)
		disk_cursor = 0;
	for (uint64_t i = 0; i < per; i++)
		fill_block(disk_chunk + i * WORDS, first + disk_cursor + i, disk_bytes / PAGE + i + 1);
	if (pwrite(disk_fd, disk_chunk, CHUNK, (off_t)((first + disk_cursor) * PAGE)) != CHUNK) {
		perror("workload: diskwrite");
		exit(1);
	}
	disk_cursor += per;
	disk_bytes += CHUNK;
}

static void disk_open(const char *path)
{
	disk_fd = open(path, O_RDWR | O_DIRECT);
	off_t size = disk_fd < 0 ? -1 : lseek(disk_fd, 0, SEEK_END);
	if (size < 2 * PAGE || posix_memalign((void **)&disk_buf, PAGE, PAGE)) {
		perror("workload: disk");
		exit(1);
	}
	disk_blocks = (uint64_t)size / PAGE;
}

/* Writes tick n to block n, reads block n+1: " disk=ok", or " disk=future:M" when block n+1
 * already holds tick M's write on the first pass (a write this guest has not made yet). */
static const char *disk_tick(uint64_t n, char *word, size_t len)
{
	uint64_t block = n % disk_blocks, seen = 0;
	memset(disk_buf, 0, PAGE);
	snprintf(disk_buf, PAGE, "VMCKPT-DISK %llu\n", (unsigned long long)n);
	if (pwrite(disk_fd, disk_buf, PAGE, (off_t)(block * PAGE)) != PAGE)
		return " disk=write-error";
	if (n + 1 < disk_blocks) {
		if (pread(disk_fd, disk_buf, PAGE, (off_t)((n + 1) * PAGE)) != PAGE)
			return " disk=read-error";
		if (sscanf(disk_buf, "VMCKPT-DISK %llu", (unsigned long long *)&seen) == 1) {
			snprintf(word, len, " disk=future:%llu", (unsigned long long)seen);
			return word;
		}
	}
	return " disk=ok";
}

int main(int argc, char **argv)
{
	if (argc != 5 && argc != 6) {
		fprintf(stderr, "usage: workload idle|dirty|dup RATE MB TICKS [DISK]\n");
		return 2;
	}
	const char *mode = argv[1];
	int cached = strcmp(mode, "cached") == 0, diskwrite = strcmp(mode, "diskwrite") == 0;
	if (argc == 6)
		disk_open(disk_path = argv[5]);
	else if (cached || diskwrite) {
		fprintf(stderr, "workload: %s needs a disk\n", mode);
		return 2;
	}
	uint64_t rate = strtoull(argv[2], NULL, 10), mb = strtoull(argv[3], NULL, 10);
	uint64_t ticks = strtoull(argv[4], NULL, 10);
	int idle = strcmp(mode, "dirty") != 0 && strcmp(mode, "dup") != 0;
	if (idle && strcmp(mode, "idle") != 0 && !cached && !diskwrite)
		fprintf(stderr, "workload: unknown mode '%s', running idle\n", mode);
	dup_mode = strcmp(mode, "dup") == 0;

	npages = mb * (1 << 20) / PAGE;
	if (npages == 0)
		npages = 1;
	mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("workload: mmap");
		return 1;
	}
	for (uint64_t i = 0; i < npages; i++) /* touch: the working set is resident and non-zero */
		mem[i * WORDS] = i + 1;
	for (int k = 0; k < NPAT; k++)
		for (int w = 0; w < WORDS; w++)
			patterns[k][w] = mix((uint64_t)k << 16 | w);
	stride = npages * 618 / 1000 | 1;
	while (gcd(stride, npages) != 1)
		stride++;

	if (cached)
		write_cached();
	uint64_t n = 0, t = now_ns(), next_tick = t + TICK_NS, next_slice = t + SLICE_NS;
	uint64_t pace_base = t, pace_done = 0;
	for (;;) {
		if (diskwrite) {
			while (now_ns() < next_tick)
				write_chunk();
		} else if (!idle && rate == 0) {
			for (int i = 0; i < 256; i++) /* unpaced: check the clock now and then */
				write_page();
		} else {
			sleep_until(idle || next_tick < next_slice ? next_tick : next_slice);
		}
		t = now_ns();
		if (!idle && rate > 0) {
			uint64_t target = (uint64_t)((double)(t - pace_base) * rate / 1e9);
			if (target > pace_done + rate) { /* over 1 s behind (e.g. guest stalled): drop the backlog */
				pace_base = t;
				pace_done = target = 0;
			}
			for (; pace_done < target; pace_done++)
				write_page();
			next_slice += SLICE_NS;
			if (next_slice <= t)
				next_slice = t + SLICE_NS;
		}
		if (t >= next_tick) {
			char line[200], word[48], bytes[48] = "";
			const char *disk = disk_fd < 0 ? "" : disk_tick(n + 1, word, sizeof word);
			if (diskwrite)
				snprintf(bytes, sizeof bytes, " disk_bytes=%llu",
					 (unsigned long long)disk_bytes);
			int len = snprintf(line, sizeof line, "VMCKPT-TICK %llu pages=%llu work=%s%s%s\n",
					   (unsigned long long)++n, (unsigned long long)written, mode,
					   disk, bytes);
			if (write(1, line, len) < 0) /* unbuffered: the line is on the console at once */
				return 1;
			if (ticks && n >= ticks)
				return 0;
			next_tick += TICK_NS;
			if (next_tick + TICK_NS <= t) /* far behind: resync instead of a burst of ticks */
				next_tick = t + TICK_NS;
		}
	}
}
