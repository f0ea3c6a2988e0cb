// SPDX-License-Identifier: GPL-2.0-only
/*
 * freemem: does the guest get back, after a migration, free memory that holds what its kernel
 * believes it holds?  The workload only reads what it wrote; this reads memory it never wrote.
 *
 *   freemem churn [--regions N] [--region-mb M] [--fill BYTE]
 *       fills N regions of M MiB of anonymous memory with BYTE, then frees region i (munmap)
 *       once softpage.ko has seen i + 2 new dom0 requests (its stats/last_request_id changed:
 *       round 1 asked, and the next round's request came after round 1 was sent), or as soon as
 *       dom0 asks for the early cache drop right before the suspend (stats/early_drops grew).
 *       A drop before two requests were seen is the first drop of cache=cold, before round 1
 *       (the request before it asked for the report that drop needs): the count starts again.
 *       Every region is thus sent with data first and freed before the suspend.  After the fill
 *       it polls as a real-time task (SCHED_FIFO): at normal priority, on a loaded machine, it
 *       once ran only after the guest's freeze (CI, Xen 4.17.7) and freed two regions too late.
 *   freemem check [--mb N]
 *       maps N MiB of fresh anonymous memory (default: all free memory but 32 MiB), writes the
 *       first word of each page so that it is really faulted in, and counts the pages whose
 *       other bytes are not zero: the kernel hands anonymous memory out zeroed, and with
 *       init_on_free it trusts a free page to be zero already.
 *
 * Output lines, one per event, on stdout = the guest console:
 *   FREEMEM FILLED regions=N region_mb=M fill=0xBB
 *   FREEMEM FREED region=I requests=K early_drop=0|1 before_suspend=0|1
 *   FREEMEM CHECK pages=P nonzero=Z filled=F first_nonzero=PAGE|-1
 *   FREEMEM ERROR <what failed>
 * before_suspend is 1 when the module had not yet seen an armed suspend (stats/freezes) since the
 * churn started: the free happened on the source, before the migration's stop-and-copy.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "say.h"

#define PAGE_BYTES 4096u
#define STATS "/sys/devices/platform/softpage/stats/"
#define MAX_REGIONS 64
/* Give up waiting for requests after this long: the test fails on the missing FREED lines. */
#define CHURN_TIMEOUT_S 900
#define POLL_NS 10000000L

static int read_stat(const char *name, uint64_t *value)
{
	char path[128];
	FILE *file;
	int ok;

	snprintf(path, sizeof(path), STATS "%s", name);
	file = fopen(path, "r");
	if (!file)
		return -1;
	ok = fscanf(file, "%" SCNu64, value) == 1;
	fclose(file);
	return ok ? 0 : -1;
}

static int churn(unsigned long regions, unsigned long region_mb, int fill)
{
	size_t bytes = region_mb << 20;
	uint64_t request, last_request, drops, first_drops, freezes, first_freezes;
	unsigned long requests = 0, freed = 0, i;
	struct timespec poll = { 0, POLL_NS };
	struct sched_param realtime = { .sched_priority = 1 };
	char *region[MAX_REGIONS];
	time_t started = time(NULL);

	if (regions == 0 || regions > MAX_REGIONS || region_mb == 0) {
		say("FREEMEM ERROR expected 1-%d regions of at least 1 MiB", MAX_REGIONS);
		return 2;
	}
	if (read_stat("last_request_id", &last_request) || read_stat("early_drops", &first_drops) ||
	    read_stat("freezes", &first_freezes)) {
		say("FREEMEM ERROR cannot read " STATS " (softpage.ko not loaded?)");
		return 1;
	}
	for (i = 0; i < regions; i++) {
		region[i] = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (region[i] == MAP_FAILED) {
			say("FREEMEM ERROR mmap of %lu MiB failed", region_mb);
			return 1;
		}
		memset(region[i], fill, bytes);
	}
	if (sched_setscheduler(0, SCHED_FIFO, &realtime)) {
		say("FREEMEM ERROR cannot poll as a real-time task: %s", strerror(errno));
		return 1;
	}
	say("FREEMEM FILLED regions=%lu region_mb=%lu fill=%#x", regions, region_mb, fill);
	while (freed < regions && time(NULL) - started < CHURN_TIMEOUT_S) {
		int early_drop;

		nanosleep(&poll, NULL);
		if (read_stat("last_request_id", &request) || read_stat("early_drops", &drops) ||
		    read_stat("freezes", &freezes))
			continue;
		if (request != last_request) {
			last_request = request;
			requests++;
		}
		if (drops != first_drops && requests < 2) {
			/* the first drop, before round 1: count round 1's request from here */
			first_drops = drops;
			requests = 0;
		}
		early_drop = drops != first_drops;
		while (freed < regions && (early_drop || requests >= freed + 2)) {
			munmap(region[freed], bytes);
			say("FREEMEM FREED region=%lu requests=%lu early_drop=%d before_suspend=%d", freed,
			    requests, early_drop, freezes == first_freezes);
			freed++;
		}
	}
	return freed == regions ? 0 : 1;
}

static unsigned long free_mb(void)
{
	char line[128];
	unsigned long kb = 0;
	FILE *file = fopen("/proc/meminfo", "r");

	if (!file)
		return 0;
	while (fgets(line, sizeof(line), file))
		if (sscanf(line, "MemFree: %lu kB", &kb) == 1)
			break;
	fclose(file);
	return kb / 1024 > 32 ? kb / 1024 - 32 : 0;
}

static int check(unsigned long mb)
{
	size_t pages, page, nonzero = 0, filled = 0;
	long first_nonzero = -1;
	unsigned char *memory;

	if (mb == 0)
		mb = free_mb();
	pages = (mb << 20) / PAGE_BYTES;
	memory = mmap(NULL, pages * PAGE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		      -1, 0);
	if (!pages || memory == MAP_FAILED) {
		say("FREEMEM ERROR cannot map %lu MiB", mb);
		return 1;
	}
	for (page = 0; page < pages; page++) {
		unsigned char *bytes = memory + page * PAGE_BYTES;
		size_t at, set = 0;

		/* A write fault: the kernel allocates the page now, zeroed or trusted to be. */
		*(volatile uint64_t *)bytes = 1;
		for (at = sizeof(uint64_t); at < PAGE_BYTES; at++)
			set += bytes[at] != 0;
		if (set) {
			nonzero++;
			if (first_nonzero < 0)
				first_nonzero = (long)page;
		}
		if (set == PAGE_BYTES - sizeof(uint64_t))
			filled++;
	}
	say("FREEMEM CHECK pages=%zu nonzero=%zu filled=%zu first_nonzero=%ld", pages, nonzero, filled,
	    first_nonzero);
	munmap(memory, pages * PAGE_BYTES);
	return nonzero ? 3 : 0;
}

int main(int argc, char **argv)
{
	unsigned long regions = 4, region_mb = 40, mb = 0;
	int fill = 0xa5, i;

	if (argc < 2)
		goto usage;
	for (i = 2; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--regions"))
			regions = strtoul(argv[i + 1], NULL, 0);
		else if (!strcmp(argv[i], "--region-mb"))
			region_mb = strtoul(argv[i + 1], NULL, 0);
		else if (!strcmp(argv[i], "--fill"))
			fill = (int)strtoul(argv[i + 1], NULL, 0) & 0xff;
		else if (!strcmp(argv[i], "--mb"))
			mb = strtoul(argv[i + 1], NULL, 0);
		else
			goto usage;
	}
	if (i != argc)
		goto usage;
	if (!strcmp(argv[1], "churn"))
		return churn(regions, region_mb, fill);
	if (!strcmp(argv[1], "check"))
		return check(mb);
usage:
	fprintf(stderr, "usage: freemem churn [--regions N] [--region-mb M] [--fill BYTE] | "
			"freemem check [--mb N]\n");
	return 2;
}
