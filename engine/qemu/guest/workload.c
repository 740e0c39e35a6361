/* Test-guest workload: prints a tick counter on the serial console every 0.5 s and dirties
 * guest memory at a chosen rate, so checkpoints and restores can be checked from outside.
 *
 *   workload MODE RATE MB TICKS
 *   MODE  idle (ticks only) | dirty (distinct pages) | dup (pages from 16 patterns or zero)
 *   RATE  pages per second to write; 0 = as fast as possible
 *   MB    working set in MiB
 *   TICKS exit after this many ticks (0 = never)
 *
 * Output: "VMCKPT-TICK <n> pages=<pages written so far> work=<mode>". The counters live in
 * guest memory, so a restored guest continues from where it was checkpointed. */
#define _GNU_SOURCE
#include <errno.h>
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

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: workload idle|dirty|dup RATE MB TICKS\n");
		return 2;
	}
	const char *mode = argv[1];
	uint64_t rate = strtoull(argv[2], NULL, 10), mb = strtoull(argv[3], NULL, 10);
	uint64_t ticks = strtoull(argv[4], NULL, 10);
	int idle = strcmp(mode, "dirty") != 0 && strcmp(mode, "dup") != 0;
	if (idle && strcmp(mode, "idle") != 0)
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

	uint64_t n = 0, t = now_ns(), next_tick = t + TICK_NS, next_slice = t + SLICE_NS;
	uint64_t pace_base = t, pace_done = 0;
	for (;;) {
		if (!idle && rate == 0) {
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
			char line[128];
			int len = snprintf(line, sizeof line, "VMCKPT-TICK %llu pages=%llu work=%s\n",
					   (unsigned long long)++n, (unsigned long long)written, mode);
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
