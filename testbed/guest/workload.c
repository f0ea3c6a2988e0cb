// SPDX-License-Identifier: GPL-2.0-only
/*
 * softpage guest workload: memory whose every byte can be checked after a save/restore or a
 * migration, and a page cache filled from a data disk whose files carry a checksum manifest.
 *
 *   workload gendata DIR TOTAL_MB
 *       (host side, at testbed build) writes DIR/data-NNN files of deterministic pseudo-random
 *       content and DIR/MANIFEST ("name bytes checksum" lines).
 *   workload run [--anon-mb N] [--cache-mb M] [--dirty-rate PAGES_PER_S] [--data-dir DIR]
 *                [--verify-every SECONDS] [--pidfile FILE]
 *       (guest side) fills N MiB of anonymous memory, reads M MiB of the data files into the page
 *       cache, then keeps rewriting pages at the given rate. SIGUSR1, or every SECONDS if set,
 *       checks every anonymous byte and re-reads the cached files against the manifest.
 *   workload files DIR FIRST COUNT resident|check
 *       (guest side) for the manifest's files FIRST..FIRST+COUNT-1: how many of their pages are
 *       in the page cache (mincore, which reads nothing), and with "check" then reads each file
 *       and compares it with the manifest, timing the reads.
 *   workload spin [--mb N]
 *       (guest side, the link bench's neighbour guest: tests/bench/link_bench.py) a steady
 *       CPU-and-memory load: rewrites N MiB (default 32) page by page, mixing every word, round
 *       after round, and prints one WORKLOAD SPIN line per second (its own monotonic clock) with
 *       how many pages it rewrote in that second: its throughput, which a migration in the same
 *       host's dom0 takes CPU from.
 *
 * Output lines (machine-readable, one per event, on stdout = the guest console):
 *   WORKLOAD READY anon_pages=N files=M cache_bytes=B dirty_rate=R
 *   WORKLOAD VERIFY ok seq=K anon_pages=N files=M cache_bytes=B resident_file_pages=P dirtied=D
 *   WORKLOAD VERIFY FAIL seq=K bad_anon_pages=X first_bad_page=I bad_files=Y first_bad_file=NAME
 *   WORKLOAD FILES first=F count=C pages=P resident=R [bad=B read_s=S]
 *   WORKLOAD SPIN READY mb=N
 *   WORKLOAD SPIN seq=K pages=P seconds=S      (P pages rewritten in the last S s; K counts lines)
 *   WORKLOAD ERROR <what failed>
 * Each anonymous page holds a pattern derived from (page index, generation); the generation of
 * every page is kept in a separate array, so a page that reverts to an older content (a lost
 * dirty page) fails exactly like a corrupted one.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "say.h"

#define PAGE_BYTES 4096u
#define WORDS_PER_PAGE (PAGE_BYTES / sizeof(uint64_t))
#define DATA_FILE_BYTES (16u << 20)
#define FILE_SEED 0x536f667450616765ull	/* "SoftPage" */
#define ANON_SEED 0x416e6f6e4d656d21ull	/* "AnonMem!" */
#define CHECKSUM_BASIS 0xcbf29ce484222325ull
#define CHECKSUM_PRIME 0x100000001b3ull
#define MAX_FILES 4096
/*
 * Pages are dirtied in bursts, ten a second. Each wakeup of the idle vCPU costs VM exits (timer
 * hypercall, HLT, interrupt), and under TCG's nested SVM any exit can end in a guest triple
 * fault now and then: fewer wakeups, fewer chances (testbed/README.md).
 */
#define TICK_NS 100000000L
/* After a pause (save, migration) the guest clock jumps: cap the catch-up to this much. */
#define MAX_CATCHUP_S 0.5

static volatile sig_atomic_t verify_requested;

static uint64_t mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static uint64_t file_word(unsigned int file_index, uint64_t word_index)
{
	return mix64(FILE_SEED ^ ((uint64_t)file_index << 40) ^ word_index);
}

/*
 * One hash per page and an add per word: filling and checking memory under TCG (nested paging
 * emulated in software) is slow enough that a hash per word would dominate the test time. Any
 * changed, swapped or stale word still breaks the sequence.
 */
#define ANON_WORD_STEP 0x9e3779b97f4a7c15ull
static uint64_t anon_page_base(uint64_t page, uint32_t generation)
{
	return mix64(ANON_SEED ^ (page << 24) ^ generation);
}

static uint64_t checksum_update(uint64_t sum, const uint64_t *words, size_t count)
{
	for (size_t i = 0; i < count; i++)
		sum = (sum ^ words[i]) * CHECKSUM_PRIME;
	return sum;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int gendata(const char *dir, unsigned long total_mb)
{
	static uint64_t block[WORDS_PER_PAGE * 64];
	unsigned long total = total_mb << 20;
	unsigned int nfiles = (unsigned int)((total + DATA_FILE_BYTES - 1) / DATA_FILE_BYTES);
	char path[4096];
	FILE *manifest;

	snprintf(path, sizeof(path), "%s/MANIFEST", dir);
	manifest = fopen(path, "w");
	if (!manifest) {
		perror(path);
		return 1;
	}
	for (unsigned int f = 0; f < nfiles; f++) {
		unsigned long bytes = total - (unsigned long)f * DATA_FILE_BYTES;
		uint64_t sum = CHECKSUM_BASIS, word = 0;
		int fd;

		if (bytes > DATA_FILE_BYTES)
			bytes = DATA_FILE_BYTES;
		snprintf(path, sizeof(path), "%s/data-%03u", dir, f);
		fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0444);
		if (fd < 0) {
			perror(path);
			return 1;
		}
		for (unsigned long done = 0; done < bytes; done += sizeof(block)) {
			size_t chunk = bytes - done < sizeof(block) ? bytes - done : sizeof(block);
			size_t words = chunk / sizeof(uint64_t);

			for (size_t i = 0; i < words; i++)
				block[i] = file_word(f, word++);
			sum = checksum_update(sum, block, words);
			if (write(fd, block, chunk) != (ssize_t)chunk) {
				perror(path);
				return 1;
			}
		}
		close(fd);
		fprintf(manifest, "data-%03u %lu %016" PRIx64 "\n", f, bytes, sum);
	}
	return fclose(manifest) ? 1 : 0;
}

struct data_file {
	char name[64];
	unsigned long bytes;
	uint64_t checksum;
};

struct workload {
	uint8_t *anon;
	uint32_t *generation;
	uint64_t anon_pages;
	uint64_t dirtied;
	uint64_t rng;
	char data_dir[1024];
	struct data_file files[MAX_FILES];
	unsigned int cached_files;
	unsigned long cache_bytes;
	unsigned long verify_seq;
};

static void write_anon_page(struct workload *w, uint64_t page)
{
	uint64_t *words = (uint64_t *)(w->anon + page * PAGE_BYTES);
	uint64_t expected = anon_page_base(page, w->generation[page]);

	for (unsigned int i = 0; i < WORDS_PER_PAGE; i++, expected += ANON_WORD_STEP)
		words[i] = expected;
}

static int anon_page_ok(const struct workload *w, uint64_t page)
{
	const uint64_t *words = (const uint64_t *)(w->anon + page * PAGE_BYTES);
	uint64_t expected = anon_page_base(page, w->generation[page]);

	for (unsigned int i = 0; i < WORDS_PER_PAGE; i++, expected += ANON_WORD_STEP)
		if (words[i] != expected)
			return 0;
	return 1;
}

/* Reads a whole data file; returns its checksum, or sets *failed. */
static uint64_t file_checksum(const struct workload *w, const struct data_file *file, int *failed)
{
	static uint64_t block[WORDS_PER_PAGE * 64];
	uint64_t sum = CHECKSUM_BASIS;
	unsigned long done = 0;
	char path[1200];
	int fd;

	snprintf(path, sizeof(path), "%s/%s", w->data_dir, file->name);
	fd = open(path, O_RDONLY);
	if (fd < 0) {
		*failed = 1;
		return 0;
	}
	while (done < file->bytes) {
		ssize_t got = read(fd, block, sizeof(block));

		if (got <= 0 || got % sizeof(uint64_t)) {
			*failed = 1;
			break;
		}
		sum = checksum_update(sum, block, (size_t)got / sizeof(uint64_t));
		done += (unsigned long)got;
	}
	close(fd);
	return sum;
}

static unsigned long resident_pages(const struct workload *w, const struct data_file *file)
{
	unsigned long pages = (file->bytes + PAGE_BYTES - 1) / PAGE_BYTES, resident = 0;
	unsigned char *vec;
	char path[1200];
	void *map;
	int fd;

	snprintf(path, sizeof(path), "%s/%s", w->data_dir, file->name);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return 0;
	map = mmap(NULL, file->bytes, PROT_READ, MAP_SHARED, fd, 0);
	close(fd);
	if (map == MAP_FAILED)
		return 0;
	vec = malloc(pages);
	if (vec && mincore(map, file->bytes, vec) == 0)
		for (unsigned long i = 0; i < pages; i++)
			resident += vec[i] & 1;
	free(vec);
	munmap(map, file->bytes);
	return resident;
}

static void verify(struct workload *w)
{
	uint64_t bad_pages = 0, first_bad_page = 0;
	unsigned int bad_files = 0;
	const char *first_bad_file = "-";
	unsigned long resident = 0;

	w->verify_seq++;
	/* residency first: the checksum re-read below pulls every file back into the cache */
	for (unsigned int f = 0; f < w->cached_files; f++)
		resident += resident_pages(w, &w->files[f]);
	for (uint64_t page = 0; page < w->anon_pages; page++) {
		if (!anon_page_ok(w, page)) {
			if (!bad_pages)
				first_bad_page = page;
			bad_pages++;
		}
	}
	for (unsigned int f = 0; f < w->cached_files; f++) {
		int failed = 0;
		uint64_t sum = file_checksum(w, &w->files[f], &failed);

		if (failed || sum != w->files[f].checksum) {
			if (!bad_files)
				first_bad_file = w->files[f].name;
			bad_files++;
		}
	}
	if (bad_pages || bad_files)
		say("WORKLOAD VERIFY FAIL seq=%lu bad_anon_pages=%" PRIu64 " first_bad_page=%" PRIu64
		    " anon_pages=%" PRIu64 " bad_files=%u first_bad_file=%s files=%u",
		    w->verify_seq, bad_pages, first_bad_page, w->anon_pages, bad_files, first_bad_file,
		    w->cached_files);
	else
		say("WORKLOAD VERIFY ok seq=%lu anon_pages=%" PRIu64 " files=%u cache_bytes=%lu"
		    " resident_file_pages=%lu dirtied=%" PRIu64,
		    w->verify_seq, w->anon_pages, w->cached_files, w->cache_bytes, resident, w->dirtied);
}

static int load_manifest(struct workload *w, unsigned long cache_bytes_wanted)
{
	char path[1200], name[64];
	unsigned long bytes;
	uint64_t sum;
	FILE *manifest;

	snprintf(path, sizeof(path), "%s/MANIFEST", w->data_dir);
	manifest = fopen(path, "r");
	if (!manifest) {
		say("WORKLOAD ERROR cannot open %s: %s", path, strerror(errno));
		return -1;
	}
	while (w->cache_bytes < cache_bytes_wanted && w->cached_files < MAX_FILES &&
	       fscanf(manifest, "%63s %lu %" SCNx64, name, &bytes, &sum) == 3) {
		struct data_file *file = &w->files[w->cached_files];
		int failed = 0;

		snprintf(file->name, sizeof(file->name), "%s", name);
		file->bytes = bytes;
		file->checksum = sum;
		/* the first read both fills the page cache and proves the disk content is right */
		if (file_checksum(w, file, &failed) != sum || failed) {
			say("WORKLOAD ERROR data file %s does not match its manifest", name);
			fclose(manifest);
			return -1;
		}
		w->cached_files++;
		w->cache_bytes += bytes;
	}
	fclose(manifest);
	if (w->cache_bytes < cache_bytes_wanted)
		say("WORKLOAD ERROR data disk holds only %lu of %lu bytes asked for", w->cache_bytes,
		    cache_bytes_wanted);
	return 0;
}

static void on_sigusr1(int sig)
{
	(void)sig;
	verify_requested = 1;
}

static int run(int argc, char **argv)
{
	static struct workload w;
	unsigned long anon_mb = 64, cache_mb = 0, dirty_rate = 100, verify_every = 0;
	const char *pidfile = NULL;
	double last_verify, owed = 0, last_tick;

	snprintf(w.data_dir, sizeof(w.data_dir), "/data");
	for (int i = 0; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--anon-mb"))
			anon_mb = strtoul(argv[i + 1], NULL, 0);
		else if (!strcmp(argv[i], "--cache-mb"))
			cache_mb = strtoul(argv[i + 1], NULL, 0);
		else if (!strcmp(argv[i], "--dirty-rate"))
			dirty_rate = strtoul(argv[i + 1], NULL, 0);
		else if (!strcmp(argv[i], "--verify-every"))
			verify_every = strtoul(argv[i + 1], NULL, 0);
		else if (!strcmp(argv[i], "--data-dir"))
			snprintf(w.data_dir, sizeof(w.data_dir), "%s", argv[i + 1]);
		else if (!strcmp(argv[i], "--pidfile"))
			pidfile = argv[i + 1];
		else {
			say("WORKLOAD ERROR unknown option %s", argv[i]);
			return 2;
		}
	}
	if (pidfile) {
		FILE *f = fopen(pidfile, "w");

		if (f) {
			fprintf(f, "%d\n", getpid());
			fclose(f);
		}
	}
	signal(SIGUSR1, on_sigusr1);

	w.anon_pages = (uint64_t)anon_mb * (1u << 20) / PAGE_BYTES;
	w.rng = 0x2545f4914f6cdd1dull;
	if (w.anon_pages) {
		w.anon = mmap(NULL, w.anon_pages * PAGE_BYTES, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
		w.generation = calloc(w.anon_pages, sizeof(*w.generation));
		if (w.anon == MAP_FAILED || !w.generation) {
			say("WORKLOAD ERROR cannot allocate %lu MiB", anon_mb);
			return 1;
		}
	}
	for (uint64_t page = 0; page < w.anon_pages; page++)
		write_anon_page(&w, page);
	if (cache_mb && load_manifest(&w, cache_mb << 20))
		return 1;
	say("WORKLOAD READY anon_pages=%" PRIu64 " files=%u cache_bytes=%lu dirty_rate=%lu",
	    w.anon_pages, w.cached_files, w.cache_bytes, dirty_rate);

	last_verify = last_tick = now_s();
	for (;;) {
		struct timespec tick = { 0, TICK_NS };
		double now;

		nanosleep(&tick, NULL);
		now = now_s();
		owed += (now - last_tick) * (double)dirty_rate;
		if (owed > MAX_CATCHUP_S * (double)dirty_rate + 1)
			owed = MAX_CATCHUP_S * (double)dirty_rate + 1;
		last_tick = now;
		while (owed >= 1 && w.anon_pages) {
			uint64_t page;

			w.rng ^= w.rng << 13;
			w.rng ^= w.rng >> 7;
			w.rng ^= w.rng << 17;
			page = w.rng % w.anon_pages;
			w.generation[page]++;
			write_anon_page(&w, page);
			w.dirtied++;
			owed -= 1;
		}
		if (verify_requested || (verify_every && now - last_verify >= (double)verify_every)) {
			verify_requested = 0;
			verify(&w);
			last_verify = now_s();
			last_tick = last_verify;
		}
	}
}

static int files(const char *dir, unsigned long first, unsigned long count, int check)
{
	static struct workload w;
	unsigned long pages = 0, resident = 0, bad = 0, index = 0;
	char path[1200], name[64];
	unsigned long bytes;
	double started;
	uint64_t sum;
	FILE *manifest;

	snprintf(w.data_dir, sizeof(w.data_dir), "%s", dir);
	snprintf(path, sizeof(path), "%s/MANIFEST", dir);
	manifest = fopen(path, "r");
	if (!manifest) {
		say("WORKLOAD ERROR cannot open %s: %s", path, strerror(errno));
		return 1;
	}
	while (w.cached_files < MAX_FILES && index < first + count &&
	       fscanf(manifest, "%63s %lu %" SCNx64, name, &bytes, &sum) == 3) {
		struct data_file *file = &w.files[w.cached_files];

		if (index++ < first)
			continue;
		snprintf(file->name, sizeof(file->name), "%s", name);
		file->bytes = bytes;
		file->checksum = sum;
		w.cached_files++;
	}
	fclose(manifest);
	if (w.cached_files != count) {
		say("WORKLOAD ERROR the manifest has no files %lu..%lu", first, first + count - 1);
		return 1;
	}
	/* residency first: reading the files brings them back into the cache */
	for (unsigned int f = 0; f < w.cached_files; f++) {
		pages += (w.files[f].bytes + PAGE_BYTES - 1) / PAGE_BYTES;
		resident += resident_pages(&w, &w.files[f]);
	}
	if (!check) {
		say("WORKLOAD FILES first=%lu count=%lu pages=%lu resident=%lu", first, count, pages,
		    resident);
		return 0;
	}
	started = now_s();
	for (unsigned int f = 0; f < w.cached_files; f++) {
		int failed = 0;

		if (file_checksum(&w, &w.files[f], &failed) != w.files[f].checksum || failed)
			bad++;
	}
	say("WORKLOAD FILES first=%lu count=%lu pages=%lu resident=%lu bad=%lu read_s=%.3f", first,
	    count, pages, resident, bad, now_s() - started);
	return bad ? 1 : 0;
}

#define SPIN_REPORT_S 1.0
#define SPIN_BATCH_PAGES 64u	/* pages between two looks at the clock */

static int spin(int argc, char **argv)
{
	unsigned long mb = 32, pages, page = 0, done = 0, seq = 0;
	uint64_t *memory, carry = ANON_SEED;
	double last;

	for (int i = 0; i < argc; i++) {
		if (!strcmp(argv[i], "--mb") && i + 1 < argc) {
			mb = strtoul(argv[++i], NULL, 0);
		} else {
			fprintf(stderr, "workload spin: unknown option %s\n", argv[i]);
			return 2;
		}
	}
	pages = (mb << 20) / PAGE_BYTES;
	if (!pages) {
		fprintf(stderr, "workload spin: --mb must be at least 1\n");
		return 2;
	}
	memory = mmap(NULL, pages * PAGE_BYTES, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (memory == MAP_FAILED) {
		say("WORKLOAD ERROR spin: mmap %lu MiB: %s", mb, strerror(errno));
		return 1;
	}
	say("WORKLOAD SPIN READY mb=%lu", mb);
	last = now_s();
	for (;;) {
		double now;

		for (unsigned int b = 0; b < SPIN_BATCH_PAGES; b++) {
			uint64_t *words = memory + page * WORDS_PER_PAGE;

			/* read, mix and write back every word: both the CPU and the memory work */
			for (unsigned int w = 0; w < WORDS_PER_PAGE; w++) {
				carry = mix64(carry ^ words[w]);
				words[w] = carry;
			}
			page = (page + 1) % pages;
		}
		done += SPIN_BATCH_PAGES;
		now = now_s();
		if (now - last >= SPIN_REPORT_S) {
			say("WORKLOAD SPIN seq=%lu pages=%lu seconds=%.3f", seq++, done, now - last);
			done = 0;
			last = now;
		}
	}
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "gendata"))
		return gendata(argv[2], strtoul(argv[3], NULL, 0));
	if (argc >= 2 && !strcmp(argv[1], "run"))
		return run(argc - 2, argv + 2);
	if (argc >= 2 && !strcmp(argv[1], "spin"))
		return spin(argc - 2, argv + 2);
	if (argc == 6 && !strcmp(argv[1], "files") &&
	    (!strcmp(argv[5], "resident") || !strcmp(argv[5], "check")))
		return files(argv[2], strtoul(argv[3], NULL, 0), strtoul(argv[4], NULL, 0),
			     !strcmp(argv[5], "check"));
	fprintf(stderr, "usage: workload gendata DIR TOTAL_MB | workload run [options] | "
		"workload files DIR FIRST COUNT resident|check | workload spin [--mb N]\n");
	return 2;
}
