// SPDX-License-Identifier: GPL-2.0
/*
 * softpage: tell dom0 which guest pages are "soft" (free, clean page cache,
 * and at suspend every page still free) so that a Xen migration can send them
 * as allocate-only pages without their contents.
 *
 * The contract with dom0 is docs/spec/guest-protocol.md; the layout of the
 * shared pages is owned by uapi/softpage_abi.h.
 *
 * Safety does not depend on the precopy snapshots being exact: dom0 sends in
 * the final round every page it skipped earlier unless this module reports it
 * HELD.  So the precopy scans read struct page without locks (as
 * /proc/kpageflags does) and only the HELD bitmap has to be, and is, exact: it
 * is the free pages, buddy blocks and per-CPU lists, scanned from a syscore
 * suspend callback with one CPU running and interrupts off, the last thing the
 * guest does before HYPERVISOR_suspend.  Nothing can allocate, and so touch,
 * one of them until the domain runs again.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bitmap.h>
#include <linux/device.h>
#include <linux/fs.h>
#include <linux/gfp.h>
#include <linux/ktime.h>
#include <linux/list.h>
#include <linux/mm.h>
#include <linux/mmzone.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/page-flags.h>
#include <linux/pagemap.h>
#include <linux/platform_device.h>
#include <linux/poison.h>
#include <linux/highmem.h>
#include <linux/slab.h>
#include <linux/syscore_ops.h>
#include <linux/vmalloc.h>
#include <linux/vmstat.h>
#include <linux/workqueue.h>

#include <asm/xen/hypercall.h>
#include <xen/events.h>
#include <xen/grant_table.h>
#include <xen/interface/event_channel.h>
#include <xen/page.h>
#include <xen/xen.h>
#include <xen/xenbus.h>

#include "uapi/softpage_abi.h"

#ifndef SOFTPAGE_MODULE_VERSION
#error "build through guest_kmod/Makefile: it passes the version from dkms.conf"
#endif

#ifndef __LITTLE_ENDIAN
#error "the softpage ABI is little-endian (x86 guests only)"
#endif

/*
 * The largest buddy order: MAX_PAGE_ORDER since 6.8 (6.12), MAX_ORDER - 1
 * before 6.4 (6.1).  Kernels 6.4-6.7 meant the largest order by MAX_ORDER; on
 * them whole blocks of that order count as one page, which reports less.
 */
#ifdef MAX_PAGE_ORDER
#define SOFTPAGE_MAX_PAGE_ORDER	MAX_PAGE_ORDER
#else
#define SOFTPAGE_MAX_PAGE_ORDER	(MAX_ORDER - 1)
#endif

/* Watched paths, relative: the watch follows the guest into a new domain. */
#define SOFTPAGE_XS_ARMED_PATH	SOFTPAGE_XS_DIR "/" SOFTPAGE_XS_ARMED
#define SOFTPAGE_XS_DROP_PATH	SOFTPAGE_XS_DIR "/" SOFTPAGE_XS_DROP
#define SOFTPAGE_DOM0		0
/* The scan yields the CPU this often; a 1 GiB guest has 262144 PFNs. */
#define SOFTPAGE_SCAN_BATCH	4096
#define SOFTPAGE_LONGS_PER_FRAME BITS_TO_LONGS(SOFTPAGE_PFNS_PER_FRAME)

static bool report_free = true;
module_param(report_free, bool, 0644);
MODULE_PARM_DESC(report_free, "Report free pages (buddy and per-CPU lists) in the FREE bitmap");

static bool report_cache = true;
module_param(report_cache, bool, 0644);
MODULE_PARM_DESC(report_cache,
		 "Report clean, unmapped, unlocked page cache in the CACHE bitmap");

static uint cold_age_ms = 30000;
module_param(cold_age_ms, uint, 0644);
MODULE_PARM_DESC(cold_age_ms,
		 "With prune-cache=cold, a referenced page cache page is cold once not accessed for this long; also the period of the aging pass that tells (0: no aging pass, only never-referenced pages are cold)");

static uint drop_caches_at_freeze = 3;
module_param(drop_caches_at_freeze, uint, 0644);
MODULE_PARM_DESC(drop_caches_at_freeze,
		 "Value written to /proc/sys/vm/drop_caches at an armed suspend: 0 none, 1 page cache, 2 reclaimable slab, 3 both");

static uint freeze_drop_min_pages = 1024;
module_param(freeze_drop_min_pages, uint, 0644);
MODULE_PARM_DESC(freeze_drop_min_pages,
		 "After the early drop dom0 asked for, .freeze drops again only if page cache and reclaimable slab grew by at least this many pages since (0: always)");

static uint scan_interval_ms = 1000;
module_param(scan_interval_ms, uint, 0644);
MODULE_PARM_DESC(scan_interval_ms,
		 "Rescan period while data/softpage/armed is 1, until a drop dom0 asks for (0: only on dom0 requests)");

/*
 * Fault injection, for proving on real Xen that dom0 survives what a buggy or
 * hostile guest could publish.  Nothing here can hurt anything but this guest:
 * a lie only makes dom0 resend, in the final round, what it skipped.
 */
enum softpage_fault {
	SOFTPAGE_FAULT_NONE,
	/* Well-formed but false: every PFN FREE in each precopy snapshot. */
	SOFTPAGE_FAULT_LIE_FREE,
	/* Malformed: the FREE count of every header disagrees with its bitmap. */
	SOFTPAGE_FAULT_BAD_COUNT,
};

static uint inject_fault;
module_param(inject_fault, uint, 0644);
MODULE_PARM_DESC(inject_fault,
		 "Testing only: 0 none, 1 report every PFN free in precopy snapshots, 2 publish headers whose free count disagrees with the bitmap");

/* Guest-side counters, shown under /sys/devices/platform/softpage/stats/. */
struct softpage_stats {
	u64 scans;
	u64 last_scan_ns;
	u64 max_scan_ns;
	u64 last_request_id;
	u64 count[SOFTPAGE_NR_CATEGORIES];
	u64 dropped_cache_pages;	/* NR_FILE_PAGES fall across the drop */
	u64 dropped_slab_pages;		/* reclaimable slab fall across the drop */
	s64 drop_error;			/* last drop_caches error, 0 if none */
	u64 drop_ns;			/* the drop at the last armed .freeze */
	u64 freeze_drops_skipped;	/* .freeze found too little to drop */
	u64 early_drops;		/* drops dom0 asked for before a suspend */
	u64 early_drop_ns;		/* the last of them */
	u64 held_pages;			/* HELD at the last armed suspend */
	u64 final_scan_ns;		/* its scan, interrupts off */
	u64 held_reinit_pages;		/* HELD pages rewritten at the last resume */
	u64 held_reinit_ns;		/* that resume's check of HELD, interrupts off */
	u64 age_passes;			/* aging passes (cold_age_ms) */
	u64 last_age_ns;		/* the last one's walk */
	u64 cache_cold;			/* the last scan applied prune-cache=cold */
	u64 evict_candidates;		/* reported cache still cold at the last drop */
	u64 evicted_cache_pages;	/* of them evicted by that targeted drop */
	u64 remembered_cache;		/* reported cache PFNs it left to evict */
	u64 last_mark_ns;		/* the walk after a first cold drop */
	u64 freezes;			/* armed suspends */
	u64 thaws;
	u64 restores;
};

struct softpage {
	struct device *dev;
	/* Serialises scans, publication, the PM callbacks and the counters. */
	struct mutex lock;

	unsigned long nr_pfns;
	unsigned int frames_per_category;
	unsigned int nr_list_frames;
	/* [0] header, then the list pages, then the bitmap pages. */
	unsigned int nr_shared;
	struct page **shared;
	grant_ref_t *grefs;
	unsigned int nr_granted;
	struct softpage_header *header;
	unsigned long *shared_bitmaps;	/* vmap of the bitmap pages */
	unsigned long *scan_bitmaps;	/* private copy, same layout */
	u64 generation;

	evtchn_port_t port;
	int irq;
	struct work_struct request_work;
	struct delayed_work periodic_work;
	struct work_struct drop_work;
	struct delayed_work age_work;
	/* node is set while registered */
	struct xenbus_watch armed_watch;
	struct xenbus_watch drop_watch;
	u64 last_drop_id;
	/*
	 * Page cache and reclaimable slab left by the early drop of this armed
	 * period, valid while early_dropped: .freeze skips its own drop if they
	 * grew by less than freeze_drop_min_pages since.
	 */
	bool early_dropped;
	unsigned long early_drop_left;
	bool armed;
	/*
	 * From an armed .freeze to .thaw/.restore: only the syscore callback
	 * publishes (FINAL).  Also set while the device goes away.
	 */
	bool frozen;
	bool stopping;
	/* Read at .freeze; the syscore callback publishes FINAL for it. */
	bool final_pending;
	u64 final_request_id;
	/* FINAL was published: the syscore resume callback checks HELD. */
	bool held_published;

	/*
	 * prune-cache=cold (docs/design.md, "Keep the hot cache").  aged[i]:
	 * the clean, inactive, referenced page cache of an aging pass that
	 * ended at aged_at[i] (0: none yet); aged_newest is the later of the
	 * two.  reported_cache: every CACHE PFN reported since dom0 armed us,
	 * which is all that a cold drop may evict; a drop clears the bits of
	 * the pages it evicts and of those that left the page cache.
	 */
	unsigned long *aged[2];
	u64 aged_at[2];
	unsigned int aged_newest;
	unsigned long *reported_cache;
	/*
	 * prune-cache=cold: the clean cache right after the first drop of this
	 * armed period, valid while cached_marked.  Cache that came in since
	 * and was read is the application's own reads during the migration:
	 * hot, however long ago (softpage_is_cold()).
	 */
	unsigned long *cached_at_drop;
	bool cached_marked;

	struct softpage_stats stats;
};

static unsigned int softpage_bitmap_frames(const struct softpage *sp)
{
	return SOFTPAGE_NR_CATEGORIES * sp->frames_per_category;
}

static unsigned long *softpage_category(const struct softpage *sp,
					unsigned long *bitmaps,
					unsigned int category)
{
	return bitmaps + (size_t)category * sp->frames_per_category *
			 SOFTPAGE_LONGS_PER_FRAME;
}

/*
 * RAM zones only: node spans also cover ZONE_DEVICE ranges (Xen's
 * unpopulated-alloc for grant mappings), which are not RAM and never migrate.
 */
static bool softpage_is_ram_zone(struct zone *zone)
{
	return populated_zone(zone) && !zone_is_zone_device(zone);
}

/* Bitmaps cover [0, highest RAM PFN); max_pfn is not exported to modules. */
static unsigned long softpage_highest_ram_pfn(void)
{
	unsigned long end = 0;
	int nid, zid;

	for_each_online_node(nid) {
		for (zid = 0; zid < MAX_NR_ZONES; zid++) {
			struct zone *zone = &NODE_DATA(nid)->node_zones[zid];

			if (softpage_is_ram_zone(zone))
				end = max(end, zone_end_pfn(zone));
		}
	}
	return end;
}

static u32 softpage_guest_flags(void)
{
	u32 flags = 0;

	/*
	 * With init_on_free the allocator trusts free pages to be zero, which
	 * an allocate-only page on the destination is not; dom0 decides.
	 */
	if (want_init_on_free())
		flags |= SOFTPAGE_FLAG_INIT_ON_FREE;
	if (page_poisoning_enabled())
		flags |= SOFTPAGE_FLAG_PAGE_POISON;
	/*
	 * softpage_syscore_resume() restores what the allocator expects, but it
	 * cannot read free pages that debug_pagealloc took out of the direct map
	 * (docs/free-page-audit.md): without the flag dom0 sends every stale page.
	 */
	if (!debug_pagealloc_enabled_static())
		flags |= SOFTPAGE_FLAG_HELD_REINIT;
	return flags;
}

/*
 * Asked of the folio the page is part of: its flags are the head page's, as
 * the PageXxx() tests of 6.1 read them (6.12 has only the folio tests).  No
 * reference is held: a racing free or split makes the answer stale, and dom0
 * sends every page written after the report anyway.
 */
static bool softpage_is_clean_cache(struct folio *folio)
{
	if (!folio_test_lru(folio) || folio_test_anon(folio) ||
	    folio_test_swapbacked(folio))
		return false;
	/* ramfs and mlocked pages cannot be dropped at suspend. */
	if (folio_test_unevictable(folio))
		return false;
	if (folio_test_dirty(folio) || folio_test_writeback(folio) ||
	    folio_test_locked(folio))
		return false;
	/* drop_caches (invalidate_mapping_pages) keeps mapped pages. */
	if (folio_mapped(folio))
		return false;
	return folio_mapping(folio);
}

/*
 * prune-cache=cold: has this clean cache folio gone unused for cold_age_ms?
 * An access through read(), write() or readahead marks it
 * (folio_mark_accessed()): the first sets PG_referenced, the next one
 * activates it (PG_active; with MGLRU, PG_workingset), reclaim sets
 * PG_workingset when it deactivates an active folio, and a refault sets it on
 * a folio that was active before its eviction.  So an inactive, unreferenced
 * folio, not in the workingset, has not been used since it came in or since
 * reclaim aged it; a referenced one that was already inactive and referenced
 * at an aging pass at least cold_age_ms ago (@aged) has not been used since
 * that pass, or it would be active now.  A referenced one that came in after
 * the migration's first drop (@cached_then) was read during the migration and
 * is hot whatever its age.  Mapped folios are never soft
 * (softpage_is_clean_cache()), so the young bits of page tables, which this
 * cannot see, do not matter.
 */
static bool softpage_is_cold(struct folio *folio, unsigned long pfn,
			     const unsigned long *aged,
			     const unsigned long *cached_then)
{
	if (folio_test_active(folio) || folio_test_workingset(folio))
		return false;
	if (!folio_test_referenced(folio))
		return true;
	/*
	 * Read since the migration's first drop (@cached_then): the
	 * application asked for it while the migration ran.  A PFN that was
	 * cache then and holds another file's page now falls to the aging
	 * rule, which may call it cold early: a re-read, never a stale page.
	 */
	if (cached_then && !test_bit(pfn, cached_then))
		return false;
	return aged && test_bit(pfn, aged);
}

/* What one walk of the memory map looks for. */
struct softpage_walk_spec {
	bool free;
	bool held;			/* free pages into HELD, nothing else */
	bool cache;
	bool cold;			/* prune-cache=cold: hot cache left out */
	const unsigned long *aged;	/* for softpage_is_cold(), or NULL */
	const unsigned long *cached_then; /* for softpage_is_cold(), or NULL */
	unsigned long *age_into;	/* an aging pass: fill this instead */
	unsigned long *cached_into;	/* every clean cache PFN: fill this instead */
};

/* Where a walk puts the free pages it finds. */
static unsigned long *softpage_free_into(const struct softpage *sp,
					 const struct softpage_walk_spec *spec)
{
	return softpage_category(sp, sp->scan_bitmaps,
				 spec->held ? SOFTPAGE_CAT_HELD :
					      SOFTPAGE_CAT_FREE);
}

/*
 * Classify the page at @pfn and return how many PFNs it accounts for: a whole
 * free buddy block at once, a whole subsection for a hole.
 */
static unsigned long softpage_classify(const struct softpage *sp,
				       unsigned long pfn, unsigned long end,
				       const struct softpage_walk_spec *spec)
{
	struct page *page = pfn_to_online_page(pfn);
	unsigned long order, nr;
	struct folio *folio;

	if (!page)
		return min(SUBSECTION_ALIGN_UP(pfn + 1), end) - pfn;

	if (PageBuddy(page)) {
		/* buddy_order_unsafe(): mm/internal.h is not for modules. */
		order = READ_ONCE(page_private(page));
		/* A racing allocation may reuse private: trust it no further. */
		if (order > SOFTPAGE_MAX_PAGE_ORDER || !PageBuddy(page))
			order = 0;
		nr = min(1UL << order, end - pfn);
		if (spec->free)
			bitmap_set(softpage_free_into(sp, spec), pfn, nr);
		return nr;
	}

	if (!spec->cache && !spec->age_into && !spec->cached_into)
		return 1;
	folio = page_folio(page);
	if (!softpage_is_clean_cache(folio))
		return 1;
	if (spec->cached_into) {
		__set_bit(pfn, spec->cached_into);
		return 1;
	}
	if (spec->age_into) {
		if (!folio_test_active(folio) &&
		    !folio_test_workingset(folio) &&
		    folio_test_referenced(folio))
			__set_bit(pfn, spec->age_into);
		return 1;
	}
	if (!spec->cold ||
	    softpage_is_cold(folio, pfn, spec->aged, spec->cached_then))
		__set_bit(pfn, softpage_category(sp, sp->scan_bitmaps,
						 SOFTPAGE_CAT_CACHE));
	return 1;
}

/* The order of the pages on per-CPU list @pindex: pindex_to_order() in 6.1. */
static unsigned int softpage_pcp_order(unsigned int pindex)
{
#ifdef CONFIG_TRANSPARENT_HUGEPAGE
	if (pindex >= NR_LOWORDER_PCP_LISTS)
		return pageblock_order;
#endif
	return pindex / MIGRATE_PCPTYPES;
}

/*
 * The pages on @zone's per-CPU free lists are as free as the buddy
 * allocator's but not PageBuddy.  There are many: up to pcp->high per CPU,
 * the zone's low watermark split between its CPUs (about 7000 pages per CPU
 * for a 1 GiB guest with two), and a cache drop frees into them first.
 * trylock: the walk never waits for the allocator; a list that is busy at that
 * moment is left out and its pages are sent.  In the syscore callback no lock
 * can be held (holders run with preemption off, which stop_machine waits for).
 */
static void softpage_mark_pcp_free(struct softpage *sp, struct zone *zone,
				   unsigned long *free)
{
	unsigned int cpu, pindex;

	for_each_possible_cpu(cpu) {
		struct per_cpu_pages *pcp;
		unsigned long flags;

		pcp = per_cpu_ptr(zone->per_cpu_pageset, cpu);
		if (!spin_trylock_irqsave(&pcp->lock, flags))
			continue;
		for (pindex = 0; pindex < NR_PCP_LISTS; pindex++) {
			unsigned long nr = 1UL << softpage_pcp_order(pindex);
			struct page *page;

			list_for_each_entry(page, &pcp->lists[pindex], pcp_list) {
				unsigned long pfn = page_to_pfn(page);

				if (pfn < sp->nr_pfns)
					bitmap_set(free, pfn,
						   min(nr, sp->nr_pfns - pfn));
			}
		}
		spin_unlock_irqrestore(&pcp->lock, flags);
	}
}

/*
 * Fill the private bitmaps from a walk of every RAM zone (the final walk:
 * HELD only, the rest left as last published).  The SLAB bitmap
 * stays empty: telling reclaimable slab pages apart needs struct slab, which
 * is private to mm/.  Reclaimable slab is instead freed by the drop at an
 * armed suspend, after which those pages are free and end up HELD.
 * @may_sleep is false in the syscore callback, where nothing may sleep.
 */
static u64 softpage_walk(struct softpage *sp,
			 const struct softpage_walk_spec *spec, bool may_sleep)
{
	unsigned long since_resched = 0;
	u64 start = ktime_get_ns();
	int nid, zid;

	if (spec->age_into || spec->cached_into) {
		bitmap_zero(spec->age_into ?: spec->cached_into, sp->nr_pfns);
	} else if (spec->held) {
		unsigned long *held = softpage_free_into(sp, spec);

		/*
		 * Every page written here is sent again in the final round:
		 * HELD is empty outside FINAL, so this clears nothing but
		 * after a FINAL nobody published over.
		 */
		if (!bitmap_empty(held, sp->nr_pfns))
			bitmap_zero(held, sp->nr_pfns);
	} else {
		memset(sp->scan_bitmaps, 0,
		       (size_t)softpage_bitmap_frames(sp) * PAGE_SIZE);
	}
	for_each_online_node(nid) {
		for (zid = 0; zid < MAX_NR_ZONES; zid++) {
			struct zone *zone = &NODE_DATA(nid)->node_zones[zid];
			unsigned long end, pfn;

			if (!softpage_is_ram_zone(zone))
				continue;
			end = min(zone_end_pfn(zone), sp->nr_pfns);
			pfn = zone->zone_start_pfn;
			while (pfn < end) {
				unsigned long nr;

				nr = softpage_classify(sp, pfn, end, spec);
				pfn += nr;
				since_resched += nr;
				if (may_sleep &&
				    since_resched >= SOFTPAGE_SCAN_BATCH) {
					since_resched = 0;
					cond_resched();
				}
			}
			if (spec->free)
				softpage_mark_pcp_free(sp, zone,
						       softpage_free_into(sp, spec));
		}
	}
	return ktime_get_ns() - start;
}

/*
 * Whether dom0 asked for prune-cache=cold; anything else, the key absent
 * included (a dom0 from before it), means all clean cache, as before.
 */
static bool softpage_cache_cold_wanted(void)
{
	char *mode = xenbus_read(XBT_NIL, SOFTPAGE_XS_DIR,
				 SOFTPAGE_XS_PRUNE_CACHE, NULL);
	bool cold;

	if (IS_ERR(mode))
		return false;
	cold = !strcmp(mode, SOFTPAGE_XS_PRUNE_CACHE_COLD);
	kfree(mode);
	return cold;
}

/*
 * The newer aging pass that ended at least cold_age_ms before @now, or NULL
 * if there is none yet (then only unreferenced cache is cold).
 */
static const unsigned long *softpage_aged_before(const struct softpage *sp,
						 u64 now)
{
	u64 age = (u64)READ_ONCE(cold_age_ms) * NSEC_PER_MSEC;
	unsigned int i = sp->aged_newest;

	if (sp->aged_at[i] && now - sp->aged_at[i] >= age)
		return sp->aged[i];
	i ^= 1;
	if (sp->aged_at[i] && now - sp->aged_at[i] >= age)
		return sp->aged[i];
	return NULL;
}

/* The clean cache right after this armed period's first drop, or NULL. */
static const unsigned long *softpage_cached_then(const struct softpage *sp)
{
	return sp->cached_marked ? sp->cached_at_drop : NULL;
}

/* A precopy snapshot, from process context. */
static u64 softpage_scan(struct softpage *sp)
{
	struct softpage_walk_spec spec = {
		.free = READ_ONCE(report_free),
		.cache = READ_ONCE(report_cache),
	};

	if (spec.cache && softpage_cache_cold_wanted()) {
		spec.cold = true;
		spec.aged = softpage_aged_before(sp, ktime_get_ns());
		spec.cached_then = softpage_cached_then(sp);
	}
	sp->stats.cache_cold = spec.cold;
	return softpage_walk(sp, &spec, true);
}

/*
 * Copy the private bitmaps into the granted pages and update the header under
 * the generation sequence lock (odd while writing, even when stable).
 */
static void softpage_publish(struct softpage *sp, u32 state, u64 request_id,
			     u64 scan_ns, u32 state_flags)
{
	struct softpage_header *header = sp->header;
	unsigned int category, frame;

	WRITE_ONCE(header->generation, ++sp->generation);
	/* dom0 reads from another domain: order against it, even on UP. */
	virt_wmb();
	/*
	 * A frame written is a page the next round sends: copy only those that
	 * changed (FINAL's FREE, CACHE and SLAB never do).
	 */
	for (frame = 0; frame < softpage_bitmap_frames(sp); frame++) {
		void *to = (char *)sp->shared_bitmaps + (size_t)frame * PAGE_SIZE;
		const void *from = (const char *)sp->scan_bitmaps +
				   (size_t)frame * PAGE_SIZE;

		if (memcmp(to, from, PAGE_SIZE))
			memcpy(to, from, PAGE_SIZE);
	}
	for (category = 0; category < SOFTPAGE_NR_CATEGORIES; category++) {
		unsigned long *bitmap = softpage_category(sp, sp->scan_bitmaps,
							  category);
		unsigned long weight = bitmap_weight(bitmap, sp->nr_pfns);

		header->count[category] = weight;
		sp->stats.count[category] = weight;
	}
	if (READ_ONCE(inject_fault) == SOFTPAGE_FAULT_BAD_COUNT) {
		dev_notice_once(sp->dev, "injecting fault: bad free count\n");
		header->count[SOFTPAGE_CAT_FREE]++;
	}
	header->flags = softpage_guest_flags() | state_flags;
	header->state = state;
	header->request_id = request_id;
	header->scan_ns = scan_ns;
	/* The even generation must not become visible before the data. */
	virt_wmb();
	WRITE_ONCE(header->generation, ++sp->generation);
	sp->stats.last_request_id = request_id;
}

static void softpage_publish_empty(struct softpage *sp)
{
	memset(sp->scan_bitmaps, 0,
	       (size_t)softpage_bitmap_frames(sp) * PAGE_SIZE);
	softpage_publish(sp, SOFTPAGE_STATE_EMPTY, 0, 0, 0);
}

static int softpage_read_u64(const char *node, u64 *value)
{
	int found = xenbus_scanf(XBT_NIL, SOFTPAGE_XS_DIR, node, "%llu",
				 value);

	if (found < 0)
		return found;
	return found == 1 ? 0 : -EINVAL;
}

static void softpage_account_scan(struct softpage *sp, u64 scan_ns)
{
	sp->stats.scans++;
	sp->stats.last_scan_ns = scan_ns;
	sp->stats.max_scan_ns = max(sp->stats.max_scan_ns, scan_ns);
}

/* Answer the newest request: read it first, so the scan starts after it. */
static void softpage_answer_request(struct softpage *sp)
{
	u64 request_id, scan_ns;
	int err;

	lockdep_assert_held(&sp->lock);
	if (sp->frozen || sp->stopping)
		return;
	err = softpage_read_u64(SOFTPAGE_XS_REQUEST, &request_id);
	if (err) {
		dev_warn_ratelimited(sp->dev, "cannot read request: %d\n",
				     err);
		return;
	}
	scan_ns = softpage_scan(sp);
	softpage_account_scan(sp, scan_ns);
	if (READ_ONCE(inject_fault) == SOFTPAGE_FAULT_LIE_FREE) {
		dev_notice_once(sp->dev, "injecting fault: every page free\n");
		bitmap_set(softpage_category(sp, sp->scan_bitmaps,
					     SOFTPAGE_CAT_FREE), 0, sp->nr_pfns);
	}
	/*
	 * Whatever dom0 may have skipped: not only while armed, because the
	 * armed watch can fire after the first request of a migration.
	 */
	bitmap_or(sp->reported_cache, sp->reported_cache,
		  softpage_category(sp, sp->scan_bitmaps, SOFTPAGE_CAT_CACHE),
		  sp->nr_pfns);
	softpage_publish(sp, SOFTPAGE_STATE_SNAPSHOT, request_id, scan_ns,
			 0);
}

static void softpage_request_work(struct work_struct *work)
{
	struct softpage *sp = container_of(work, struct softpage,
					   request_work);

	mutex_lock(&sp->lock);
	softpage_answer_request(sp);
	mutex_unlock(&sp->lock);
}

static void softpage_queue_periodic(struct softpage *sp)
{
	uint interval = READ_ONCE(scan_interval_ms);

	lockdep_assert_held(&sp->lock);
	/*
	 * dom0 asks for every report it uses through the event channel; a
	 * periodic rescan answers its newest request again (or one whose notify
	 * was lost).  Not after a drop dom0 asked for (the first drop before
	 * round 1 with prune-cache=cold, the early drop at stop-and-copy): each
	 * rescan rewrites the private bitmaps, pages the next round, or the
	 * final one, has to carry.
	 */
	if (sp->armed && interval && !sp->frozen && !sp->stopping &&
	    !sp->early_dropped)
		mod_delayed_work(system_wq, &sp->periodic_work,
				 msecs_to_jiffies(interval));
	else
		cancel_delayed_work(&sp->periodic_work);
}

static void softpage_periodic_work(struct work_struct *work)
{
	struct softpage *sp = container_of(to_delayed_work(work),
					   struct softpage, periodic_work);

	mutex_lock(&sp->lock);
	softpage_answer_request(sp);
	softpage_queue_periodic(sp);
	mutex_unlock(&sp->lock);
}

static void softpage_queue_aging(struct softpage *sp)
{
	uint interval = READ_ONCE(cold_age_ms);

	lockdep_assert_held(&sp->lock);
	if (interval && !sp->frozen && !sp->stopping)
		mod_delayed_work(system_wq, &sp->age_work,
				 msecs_to_jiffies(interval));
	else
		cancel_delayed_work(&sp->age_work);
}

/*
 * Every cold_age_ms, armed or not: note the cache that is inactive and
 * referenced now, so that a scan cold_age_ms or more later can tell which of
 * it went unused since (softpage_is_cold()).  The pass replaces the older of
 * the two it keeps and is stamped when it ends, the later bound of when it
 * looked at each page.
 */
static void softpage_age_work(struct work_struct *work)
{
	struct softpage *sp = container_of(to_delayed_work(work),
					   struct softpage, age_work);

	mutex_lock(&sp->lock);
	if (!sp->frozen && !sp->stopping) {
		unsigned int older = sp->aged_newest ^ 1;
		struct softpage_walk_spec spec = {
			.age_into = sp->aged[older],
		};

		sp->stats.last_age_ns = softpage_walk(sp, &spec, true);
		sp->aged_at[older] = ktime_get_ns();
		sp->aged_newest = older;
		sp->stats.age_passes++;
	}
	softpage_queue_aging(sp);
	mutex_unlock(&sp->lock);
}

static irqreturn_t softpage_interrupt(int irq, void *dev_id)
{
	struct softpage *sp = dev_id;

	/* Scanning sleeps; do it in process context. */
	schedule_work(&sp->request_work);
	return IRQ_HANDLED;
}

static void softpage_armed_changed(struct xenbus_watch *watch,
				   const char *path, const char *token)
{
	struct softpage *sp = container_of(watch, struct softpage,
					   armed_watch);
	u64 armed;

	mutex_lock(&sp->lock);
	sp->armed = !softpage_read_u64(SOFTPAGE_XS_ARMED, &armed) && armed == 1;
	if (!sp->armed) {
		sp->early_dropped = false;
		sp->cached_marked = false;
		/* Disarmed: that migration's reports are history. */
		if (!sp->frozen)
			bitmap_zero(sp->reported_cache, sp->nr_pfns);
	}
	softpage_queue_periodic(sp);
	mutex_unlock(&sp->lock);
}

/*
 * Grant every shared page read-only to dom0.  After a resume in a new domain
 * the grant table is fresh but Linux still owns our reference numbers, so the
 * same references are filled again (with the new frame numbers on PV) and the
 * list pages and header stay valid.
 */
static int softpage_grant_all(struct softpage *sp)
{
	unsigned int i;

	for (i = 0; i < sp->nr_shared; i++) {
		int ref = gnttab_grant_foreign_access(SOFTPAGE_DOM0,
						      xen_page_to_gfn(sp->shared[i]),
						      1);

		if (ref < 0)
			return ref;
		sp->grefs[i] = ref;
		sp->nr_granted = i + 1;
	}
	return 0;
}

static void softpage_regrant_all(struct softpage *sp)
{
	unsigned int i;

	for (i = 0; i < sp->nr_granted; i++)
		gnttab_grant_foreign_access_ref(sp->grefs[i], SOFTPAGE_DOM0,
						xen_page_to_gfn(sp->shared[i]),
						1);
}

/* Fill the list pages and the header fields that never change. */
static void softpage_write_layout(struct softpage *sp)
{
	unsigned int nr_bitmap = softpage_bitmap_frames(sp);
	struct softpage_header *header = sp->header;
	unsigned int i;

	for (i = 0; i < nr_bitmap; i++) {
		u32 *list = page_address(sp->shared[1 + i /
					 SOFTPAGE_REFS_PER_LIST_FRAME]);

		list[i % SOFTPAGE_REFS_PER_LIST_FRAME] =
			sp->grefs[1 + sp->nr_list_frames + i];
	}
	header->magic = SOFTPAGE_MAGIC;
	header->version = SOFTPAGE_VERSION;
	header->header_size = sizeof(*header);
	header->nr_pfns = sp->nr_pfns;
	header->frames_per_category = sp->frames_per_category;
	header->nr_list_frames = sp->nr_list_frames;
	for (i = 0; i < sp->nr_list_frames; i++)
		header->list_gref[i] = sp->grefs[1 + i];
}

static int softpage_bind_event_channel(struct softpage *sp)
{
	struct evtchn_alloc_unbound alloc = {
		.dom = DOMID_SELF,
		.remote_dom = SOFTPAGE_DOM0,
	};
	int err;

	err = HYPERVISOR_event_channel_op(EVTCHNOP_alloc_unbound, &alloc);
	if (err)
		return err;
	err = bind_evtchn_to_irqhandler(alloc.port, softpage_interrupt, 0,
					KBUILD_MODNAME, sp);
	if (err < 0) {
		struct evtchn_close close = { .port = alloc.port };

		HYPERVISOR_event_channel_op(EVTCHNOP_close, &close);
		return err;
	}
	sp->port = alloc.port;
	sp->irq = err;
	return 0;
}

static void softpage_unbind_event_channel(struct softpage *sp)
{
	/* Closes the port too, unless a resume already forgot it. */
	if (sp->irq > 0)
		unbind_from_irqhandler(sp->irq, sp);
	sp->irq = 0;
	sp->port = 0;
}

/* Write every key of guest-protocol.md; state last, in one transaction. */
static int softpage_advertise(struct softpage *sp)
{
	struct xenbus_transaction xbt;
	int err;

	do {
		err = xenbus_transaction_start(&xbt);
		if (err)
			return err;
		err = xenbus_printf(xbt, SOFTPAGE_XS_DIR, SOFTPAGE_XS_VERSION, "%u",
				    SOFTPAGE_VERSION);
		if (!err)
			err = xenbus_printf(xbt, SOFTPAGE_XS_DIR,
					    SOFTPAGE_XS_HEADER_GREF, "%u",
					    sp->grefs[0]);
		if (!err)
			err = xenbus_printf(xbt, SOFTPAGE_XS_DIR,
					    SOFTPAGE_XS_EVENT_CHANNEL, "%u",
					    sp->port);
		if (!err)
			err = xenbus_printf(xbt, SOFTPAGE_XS_DIR,
					    SOFTPAGE_XS_REQUEST, "0");
		if (!err)
			err = xenbus_printf(xbt, SOFTPAGE_XS_DIR,
					    SOFTPAGE_XS_ARMED, "0");
		if (!err)
			err = xenbus_printf(xbt, SOFTPAGE_XS_DIR,
					    SOFTPAGE_XS_DROP, "0");
		if (!err)
			err = xenbus_printf(xbt, SOFTPAGE_XS_DIR,
					    SOFTPAGE_XS_DROPPED, "0");
		if (!err)
			err = xenbus_printf(xbt, SOFTPAGE_XS_DIR,
					    SOFTPAGE_XS_FEATURE_DROP, "1");
		if (!err)
			err = xenbus_printf(xbt, SOFTPAGE_XS_DIR,
					    SOFTPAGE_XS_PRUNE_CACHE, "%s",
					    SOFTPAGE_XS_PRUNE_CACHE_ALL);
		if (!err)
			err = xenbus_printf(xbt, SOFTPAGE_XS_DIR,
					    SOFTPAGE_XS_FEATURE_CACHE_COLD, "1");
		if (!err)
			err = xenbus_printf(xbt, SOFTPAGE_XS_DIR,
					    SOFTPAGE_XS_STATE, "%s",
					    SOFTPAGE_XS_STATE_READY);
		if (err) {
			xenbus_transaction_end(xbt, 1);
			return err;
		}
		err = xenbus_transaction_end(xbt, 0);
	} while (err == -EAGAIN);
	return err;
}

/* Drop clean page cache and/or reclaimable slab, as root writing the sysctl. */
static int softpage_drop_caches(unsigned int mode)
{
	char value[8];
	struct file *file;
	loff_t pos = 0;
	ssize_t written;
	int len;

	if (!mode)
		return 0;
	file = filp_open("/proc/sys/vm/drop_caches", O_WRONLY, 0);
	if (IS_ERR(file))
		return PTR_ERR(file);
	len = scnprintf(value, sizeof(value), "%u\n", mode);
	written = kernel_write(file, value, len, &pos);
	filp_close(file, NULL);
	if (written < 0)
		return written;
	return written == len ? 0 : -EIO;
}

static unsigned long softpage_droppable_pages(void)
{
	return global_node_page_state(NR_FILE_PAGES) +
	       global_node_page_state_pages(NR_SLAB_RECLAIMABLE_B);
}

/*
 * Evict the folios of @mapping in [@first, @last], which the caller found
 * cold, and let go of the inode that kept @mapping alive meanwhile.
 * invalidate_mapping_pages() takes each folio's lock with a trylock and leaves
 * alone one that is dirty, under writeback or mapped (its reference count
 * says so), as drop_caches does.
 */
static unsigned long softpage_evict_range(struct address_space *mapping,
					  struct inode *inode, pgoff_t first,
					  pgoff_t last)
{
	unsigned long evicted;

	if (!inode)
		return 0;
	evicted = invalidate_mapping_pages(mapping, first, last);
	iput(inode);
	return evicted;
}

/*
 * Has the page at a PFN that was reported as cache left the page cache since
 * (freed, truncated, or taken for anonymous memory)?  Then its bit in
 * reported_cache names a page that no longer exists: if the PFN comes back
 * as another file's page, only a report of its own may make it evictable.
 * Transient states (locked, isolated from the LRU, under writeback) do not
 * count: the folio is still the file page that was reported.
 */
static bool softpage_left_the_cache(struct folio *folio)
{
	return folio_test_anon(folio) || folio_test_swapbacked(folio) ||
	       !folio_mapping(folio);
}

/*
 * prune-cache=cold: evict the page cache reported soft since dom0 armed us
 * that is still clean, unmapped and cold, and nothing else.  Each folio is
 * checked with a reference and its lock held: while it is locked and in
 * @mapping, the inode cannot be evicted (truncation waits for the lock), so
 * igrab() pins it for the invalidation after the folio is let go.  Folios
 * that follow each other in the file are evicted with one call.
 */
static unsigned long softpage_evict_reported_cache(struct softpage *sp)
{
	const unsigned long *aged = softpage_aged_before(sp, ktime_get_ns());
	const unsigned long *cached_then = softpage_cached_then(sp);
	struct address_space *run_mapping = NULL;
	struct inode *run_inode = NULL;
	pgoff_t run_first = 0, run_last = 0;
	unsigned long pfn, evicted = 0, candidates = 0, since_resched = 0;

	lockdep_assert_held(&sp->lock);
	for_each_set_bit(pfn, sp->reported_cache, sp->nr_pfns) {
		struct page *page = pfn_to_online_page(pfn);
		struct address_space *mapping;
		struct inode *inode;
		struct folio *folio;
		pgoff_t first, last;

		if (++since_resched >= SOFTPAGE_SCAN_BATCH) {
			since_resched = 0;
			cond_resched();
		}
		if (!page) {
			__clear_bit(pfn, sp->reported_cache);
			continue;
		}
		folio = page_folio(page);
		if (softpage_left_the_cache(folio)) {
			__clear_bit(pfn, sp->reported_cache);
			continue;
		}
		if (!softpage_is_clean_cache(folio) ||
		    !softpage_is_cold(folio, pfn, aged, cached_then))
			continue;
		if (!folio_try_get(folio))
			continue;
		if (page_folio(page) != folio || !folio_trylock(folio)) {
			folio_put(folio);
			continue;
		}
		candidates++;
		/*
		 * Evicted now, or kept by the kernel (mapped or dirtied since):
		 * either way no longer the page dom0 was told about.  A later
		 * report marks it again if it is still soft.
		 */
		__clear_bit(pfn, sp->reported_cache);
		mapping = folio_mapping(folio);
		first = folio->index;
		last = first + folio_nr_pages(folio) - 1;
		if (mapping && mapping == run_mapping &&
		    first >= run_first && first <= run_last + 1) {
			/* The next folio of the run, or a tail page of one. */
			run_last = max(run_last, last);
			folio_unlock(folio);
			folio_put(folio);
			continue;
		}
		inode = mapping ? igrab(mapping->host) : NULL;
		folio_unlock(folio);
		folio_put(folio);
		if (!inode)
			continue;
		evicted += softpage_evict_range(run_mapping, run_inode,
						run_first, run_last);
		run_mapping = mapping;
		run_inode = inode;
		run_first = first;
		run_last = last;
	}
	evicted += softpage_evict_range(run_mapping, run_inode, run_first,
					run_last);
	sp->stats.evict_candidates = candidates;
	sp->stats.evicted_cache_pages = evicted;
	sp->stats.remembered_cache = bitmap_weight(sp->reported_cache,
						   sp->nr_pfns);
	return evicted;
}

/*
 * Drop what an armed suspend drops: with prune-cache=all, page cache and
 * reclaimable slab through drop_caches (drop_caches_at_freeze); with
 * prune-cache=cold only the page cache softpage_evict_reported_cache() picks,
 * and no slab: shrinking the inode cache evicts every unused inode with all
 * of its page cache, hot or not (inode_lru_isolate()), and the dentry cache
 * holds the last reference of many of them.  Returns the time it took, in ns.
 */
static u64 softpage_drop_and_account(struct softpage *sp)
{
	uint mode = READ_ONCE(drop_caches_at_freeze);
	u64 start = ktime_get_ns();
	unsigned long file_before = global_node_page_state(NR_FILE_PAGES);
	unsigned long slab_before =
		global_node_page_state_pages(NR_SLAB_RECLAIMABLE_B);
	unsigned long file_after, slab_after;
	int err = 0;

	if (softpage_cache_cold_wanted()) {
		sp->stats.cache_cold = 1;
		if (mode & 1)
			softpage_evict_reported_cache(sp);
	} else {
		sp->stats.cache_cold = 0;
		sp->stats.evict_candidates = 0;
		sp->stats.evicted_cache_pages = 0;
		err = softpage_drop_caches(mode);
	}
	sp->stats.drop_error = err;
	if (err)
		dev_warn(sp->dev, "drop_caches at suspend failed: %d\n", err);
	file_after = global_node_page_state(NR_FILE_PAGES);
	slab_after = global_node_page_state_pages(NR_SLAB_RECLAIMABLE_B);
	sp->stats.dropped_cache_pages = file_before > file_after ?
					file_before - file_after : 0;
	sp->stats.dropped_slab_pages = slab_before > slab_after ?
				       slab_before - slab_after : 0;
	return ktime_get_ns() - start;
}

/*
 * The drop walks every superblock's inodes and shrinks every slab cache even
 * when there is nothing left to free: 0.2-0.5 s under TCG, all of it
 * downtime.  Right after an early drop, what was read back meanwhile costs
 * less to send in the final round than that walk.
 */
static bool softpage_freeze_drop_needed(struct softpage *sp)
{
	unsigned long now;

	if (!sp->early_dropped || !freeze_drop_min_pages)
		return true;
	now = softpage_droppable_pages();
	return now > sp->early_drop_left &&
	       now - sp->early_drop_left >= freeze_drop_min_pages;
}

/*
 * dom0 asks for the drop of .freeze while the guest still runs, right before
 * it asks for the suspend, so that the drop is not part of the downtime (it
 * took 4 s for 850 MiB of page cache under TCG).  .freeze drops again: only
 * what was read back meanwhile.  Answered with dropped = the id, done or not.
 */
static void softpage_drop_work(struct work_struct *work)
{
	struct softpage *sp = container_of(work, struct softpage, drop_work);
	u64 drop_id;
	int err;

	mutex_lock(&sp->lock);
	if (sp->frozen || sp->stopping ||
	    softpage_read_u64(SOFTPAGE_XS_DROP, &drop_id) || drop_id <= sp->last_drop_id)
		goto out;
	sp->last_drop_id = drop_id;
	if (sp->armed) {
		sp->stats.early_drop_ns = softpage_drop_and_account(sp);
		sp->stats.early_drops++;
		sp->early_dropped = !sp->stats.drop_error;
		sp->early_drop_left = softpage_droppable_pages();
		softpage_queue_periodic(sp);
		if (sp->stats.cache_cold && !sp->cached_marked) {
			struct softpage_walk_spec spec = {
				.cached_into = sp->cached_at_drop,
			};

			sp->stats.last_mark_ns = softpage_walk(sp, &spec, true);
			sp->cached_marked = true;
		}
		dev_info(sp->dev, "early drop %llu: dropped %llu cache and %llu slab pages in %llu ms\n",
			 drop_id, sp->stats.dropped_cache_pages,
			 sp->stats.dropped_slab_pages,
			 sp->stats.early_drop_ns / NSEC_PER_MSEC);
	}
	err = xenbus_printf(XBT_NIL, SOFTPAGE_XS_DIR, SOFTPAGE_XS_DROPPED,
			    "%llu", drop_id);
	if (err)
		dev_warn(sp->dev, "cannot answer drop %llu: %d\n", drop_id, err);
out:
	mutex_unlock(&sp->lock);
}

static void softpage_drop_requested(struct xenbus_watch *watch,
				    const char *path, const char *token)
{
	struct softpage *sp = container_of(watch, struct softpage, drop_watch);

	/* The drop takes seconds; xenwatch must go on serving other watches. */
	schedule_work(&sp->drop_work);
}

/* Stop the scan workers; they see frozen/stopping and do not requeue. */
static void softpage_quiesce(struct softpage *sp)
{
	cancel_delayed_work_sync(&sp->periodic_work);
	cancel_delayed_work_sync(&sp->age_work);
	cancel_work_sync(&sp->request_work);
	cancel_work_sync(&sp->drop_work);
}

/* The device the syscore callback publishes for; syscore_ops carry no data. */
static struct softpage *softpage_suspending;

/*
 * Runs in the xenwatch thread from do_suspend(): user space and freezable
 * kernel threads are frozen, xenstore still works.  Frees what can be freed;
 * softpage_syscore_suspend() reports it once nothing else runs.
 */
static int softpage_pm_freeze(struct device *dev)
{
	struct softpage *sp = dev_get_drvdata(dev);
	u64 armed, request_id;
	int err;

	mutex_lock(&sp->lock);
	if (softpage_read_u64(SOFTPAGE_XS_ARMED, &armed) || armed != 1) {
		/* Stock xl save/migrate: stay out of the way. */
		mutex_unlock(&sp->lock);
		return 0;
	}
	sp->frozen = true;
	mutex_unlock(&sp->lock);
	softpage_quiesce(sp);

	mutex_lock(&sp->lock);
	sp->stats.freezes++;
	err = softpage_read_u64(SOFTPAGE_XS_REQUEST, &request_id);
	if (err) {
		/* Without Rf dom0 would not use FINAL anyway. */
		dev_warn(dev, "armed suspend without a request: %d\n", err);
		mutex_unlock(&sp->lock);
		return 0;
	}
	if (softpage_freeze_drop_needed(sp)) {
		sp->stats.drop_ns = softpage_drop_and_account(sp);
		dev_info(dev, "freeze: request %llu, dropped %llu cache and %llu slab pages in %llu us\n",
			 request_id, sp->stats.dropped_cache_pages,
			 sp->stats.dropped_slab_pages, sp->stats.drop_ns / 1000);
	} else {
		sp->stats.drop_ns = 0;
		sp->stats.dropped_cache_pages = 0;
		sp->stats.dropped_slab_pages = 0;
		sp->stats.freeze_drops_skipped++;
		dev_info(dev, "freeze: request %llu, no drop: under %u pages read back since the early drop\n",
			 request_id, freeze_drop_min_pages);
	}
	sp->final_request_id = request_id;
	sp->final_pending = true;
	WRITE_ONCE(softpage_suspending, sp);
	mutex_unlock(&sp->lock);
	return 0;
}

/*
 * xen_suspend() calls this under stop_machine, interrupts off, right before
 * HYPERVISOR_suspend: no other CPU runs and nothing here may sleep, so the
 * free pages, buddy blocks and per-CPU lists, stay free until the domain runs
 * again.  They are FINAL's HELD set.  No lock: everything else that publishes
 * is stopped (frozen), and sp->lock may be held by a task stopped on another
 * CPU.
 */
static int softpage_syscore_suspend(void)
{
	/*
	 * Whatever this writes, the final round sends: HELD alone is filled,
	 * and only the shared frames that changed are copied (at 2 GiB, 16
	 * private and 16 shared pages instead of 64 and 64).
	 */
	static const struct softpage_walk_spec final_spec = {
		.free = true,
		.held = true,
	};
	struct softpage *sp = READ_ONCE(softpage_suspending);
	u64 scan_ns;

	if (!sp || !sp->final_pending)
		return 0;
	sp->final_pending = false;
	scan_ns = softpage_walk(sp, &final_spec, false);
	softpage_account_scan(sp, scan_ns);
	sp->stats.final_scan_ns = scan_ns;
	softpage_publish(sp, SOFTPAGE_STATE_FINAL, sp->final_request_id,
			 scan_ns, 0);
	sp->stats.held_pages = sp->stats.count[SOFTPAGE_CAT_HELD];
	sp->held_published = true;
	return 0;
}

/*
 * What the allocator trusts a free page to hold, as one byte repeated, or -1
 * if it trusts nothing (it writes a page before anything reads it).  Page
 * poisoning takes precedence over init_on_free (mm/page_alloc.c,
 * init_mem_debugging_and_hardening()), so at most one applies.
 */
static int softpage_free_page_byte(void)
{
	if (page_poisoning_enabled())
		return PAGE_POISON;
	if (want_init_on_free())
		return 0;
	return -1;
}

/*
 * The syscore resume callback: still one CPU, interrupts off, right after
 * HYPERVISOR_suspend returned, on the destination or (cancelled) the source.
 * A HELD page was not sent: on the destination it holds the last data dom0
 * sent for it in an earlier round, or whatever frame Xen populated for its
 * XALLOC entry, which Xen scrubs only if it was marked for scrubbing
 * (free_domheap_pages() leaves a frame a live domain gave back as it was).
 * With init_on_free or page poisoning the allocator hands such a page out
 * trusting its contents, so rewrite every HELD page that differs before
 * anything can allocate it.  On a cancelled suspend they all match.
 */
static void softpage_syscore_resume(void)
{
	struct softpage *sp = READ_ONCE(softpage_suspending);
	unsigned long pfn, rewritten = 0;
	const unsigned long *held;
	u64 start;
	int byte;

	if (!sp || !sp->held_published)
		return;
	sp->held_published = false;
	byte = softpage_free_page_byte();
	if (byte < 0 || debug_pagealloc_enabled_static())
		return;
	start = ktime_get_ns();
	held = softpage_category(sp, sp->scan_bitmaps, SOFTPAGE_CAT_HELD);
	for_each_set_bit(pfn, held, sp->nr_pfns) {
		struct page *page = pfn_to_page(pfn);
		void *addr;

		/* The allocator never hands it out (check_new_page_bad()). */
		if (PageHWPoison(page))
			continue;
		addr = kmap_local_page(page);

		if (memchr_inv(addr, byte, PAGE_SIZE)) {
			memset(addr, byte, PAGE_SIZE);
			rewritten++;
		}
		kunmap_local(addr);
	}
	sp->stats.held_reinit_pages = rewritten;
	sp->stats.held_reinit_ns = ktime_get_ns() - start;
}

/*
 * Newer kernels (Debian's 6.12.118 among them) pass the callbacks a data
 * pointer and register a struct syscore; Kbuild tells which from the header.
 */
#ifdef SOFTPAGE_SYSCORE_WITH_DATA
static int softpage_syscore_suspend_data(void *data)
{
	return softpage_syscore_suspend();
}

static void softpage_syscore_resume_data(void *data)
{
	softpage_syscore_resume();
}

static const struct syscore_ops softpage_syscore_ops = {
	.suspend = softpage_syscore_suspend_data,
	.resume = softpage_syscore_resume_data,
};

static struct syscore softpage_syscore = {
	.ops = &softpage_syscore_ops,
};

static void softpage_register_syscore(void)
{
	register_syscore(&softpage_syscore);
}

static void softpage_unregister_syscore(void)
{
	unregister_syscore(&softpage_syscore);
}
#else
static struct syscore_ops softpage_syscore_ops = {
	.suspend = softpage_syscore_suspend,
	.resume = softpage_syscore_resume,
};

static void softpage_register_syscore(void)
{
	register_syscore_ops(&softpage_syscore_ops);
}

static void softpage_unregister_syscore(void)
{
	unregister_syscore_ops(&softpage_syscore_ops);
}
#endif

/* After an armed suspend, in either resume callback. */
static void softpage_end_suspend(struct softpage *sp)
{
	lockdep_assert_held(&sp->lock);
	WRITE_ONCE(softpage_suspending, NULL);
	sp->final_pending = false;
	sp->held_published = false;
	sp->armed = false;
	sp->early_dropped = false;
	sp->cached_marked = false;
	sp->frozen = false;
	bitmap_zero(sp->reported_cache, sp->nr_pfns);
}

/* The suspend was cancelled: same domain, same grants and port. */
static int softpage_pm_thaw(struct device *dev)
{
	struct softpage *sp = dev_get_drvdata(dev);
	int err;

	mutex_lock(&sp->lock);
	if (!sp->frozen) {
		mutex_unlock(&sp->lock);
		return 0;
	}
	sp->stats.thaws++;
	softpage_publish_empty(sp);
	softpage_end_suspend(sp);
	softpage_queue_periodic(sp);
	softpage_queue_aging(sp);
	err = xenbus_printf(XBT_NIL, SOFTPAGE_XS_DIR, SOFTPAGE_XS_ARMED, "0");
	if (err)
		dev_warn(dev, "cannot clear armed: %d\n", err);
	mutex_unlock(&sp->lock);
	return 0;
}

/*
 * Resumed in a new domain (restore or migration): grants, the event channel
 * and our xenstore keys are gone.
 */
static int softpage_pm_restore(struct device *dev)
{
	struct softpage *sp = dev_get_drvdata(dev);
	int err;

	mutex_lock(&sp->lock);
	sp->stats.restores++;
	softpage_regrant_all(sp);
	softpage_unbind_event_channel(sp);
	err = softpage_bind_event_channel(sp);
	if (err) {
		dev_err(dev, "no event channel after resume: %d\n", err);
		goto out;
	}
	softpage_publish_empty(sp);
	softpage_end_suspend(sp);
	/* A new domain: dom0 numbers its requests afresh from request = 0. */
	sp->last_drop_id = 0;
	softpage_queue_periodic(sp);
	/* Same memory, same pages: the aging passes still hold. */
	softpage_queue_aging(sp);
	err = softpage_advertise(sp);
	if (err)
		dev_err(dev, "cannot advertise after resume: %d\n", err);
	else
		dev_info(dev, "republished: header-gref %u, event-channel %u\n",
			 sp->grefs[0], sp->port);
out:
	mutex_unlock(&sp->lock);
	/* Failing here would only abort the resume of every other device. */
	return 0;
}

static const struct dev_pm_ops softpage_pm_ops = {
	.freeze = softpage_pm_freeze,
	.thaw = softpage_pm_thaw,
	.restore = softpage_pm_restore,
};

static void softpage_free_shared(struct softpage *sp)
{
	unsigned int i;

	if (sp->shared_bitmaps)
		vunmap(sp->shared_bitmaps);
	vfree(sp->scan_bitmaps);
	vfree(sp->aged[0]);
	vfree(sp->aged[1]);
	vfree(sp->reported_cache);
	vfree(sp->cached_at_drop);
	if (!sp->shared)
		return;
	/* A page dom0 still maps is freed once dom0 lets go of it. */
	for (i = 0; i < sp->nr_granted; i++)
		gnttab_end_foreign_access(sp->grefs[i], sp->shared[i]);
	for (; i < sp->nr_shared; i++)
		if (sp->shared[i])
			__free_page(sp->shared[i]);
	kfree(sp->grefs);
	kfree(sp->shared);
}

static int softpage_alloc_shared(struct softpage *sp)
{
	unsigned int nr_bitmap, i;

	sp->nr_pfns = softpage_highest_ram_pfn();
	sp->frames_per_category = DIV_ROUND_UP(sp->nr_pfns,
					       SOFTPAGE_PFNS_PER_FRAME);
	nr_bitmap = softpage_bitmap_frames(sp);
	sp->nr_list_frames = DIV_ROUND_UP(nr_bitmap,
					  SOFTPAGE_REFS_PER_LIST_FRAME);
	if (!sp->nr_pfns || sp->nr_list_frames > SOFTPAGE_MAX_LIST_FRAMES) {
		dev_err(sp->dev, "%lu PFNs do not fit the ABI\n", sp->nr_pfns);
		return -E2BIG;
	}
	sp->nr_shared = 1 + sp->nr_list_frames + nr_bitmap;
	sp->shared = kcalloc(sp->nr_shared, sizeof(*sp->shared), GFP_KERNEL);
	sp->grefs = kcalloc(sp->nr_shared, sizeof(*sp->grefs), GFP_KERNEL);
	if (!sp->shared || !sp->grefs)
		return -ENOMEM;
	for (i = 0; i < sp->nr_shared; i++) {
		sp->shared[i] = alloc_page(GFP_KERNEL | __GFP_ZERO);
		if (!sp->shared[i])
			return -ENOMEM;
	}
	sp->header = page_address(sp->shared[0]);
	sp->shared_bitmaps = vmap(&sp->shared[1 + sp->nr_list_frames],
				  nr_bitmap, VM_MAP, PAGE_KERNEL);
	sp->scan_bitmaps = vzalloc((size_t)nr_bitmap * PAGE_SIZE);
	sp->aged[0] = vzalloc(BITS_TO_LONGS(sp->nr_pfns) * sizeof(long));
	sp->aged[1] = vzalloc(BITS_TO_LONGS(sp->nr_pfns) * sizeof(long));
	sp->reported_cache = vzalloc(BITS_TO_LONGS(sp->nr_pfns) *
				     sizeof(long));
	sp->cached_at_drop = vzalloc(BITS_TO_LONGS(sp->nr_pfns) *
				     sizeof(long));
	if (!sp->shared_bitmaps || !sp->scan_bitmaps || !sp->aged[0] ||
	    !sp->aged[1] || !sp->reported_cache || !sp->cached_at_drop)
		return -ENOMEM;
	return softpage_grant_all(sp);
}

/*
 * Watch a key under data/softpage/: a relative path, so the watch follows the
 * guest into a new domain after a migration.
 */
static int softpage_watch(struct xenbus_watch *watch, const char *node,
			  void (*callback)(struct xenbus_watch *, const char *,
					   const char *))
{
	int err;

	watch->node = node;
	watch->callback = callback;
	err = register_xenbus_watch(watch);
	if (err)
		watch->node = NULL;
	return err;
}

static void softpage_unwatch(struct xenbus_watch *watch)
{
	if (!watch->node)
		return;
	unregister_xenbus_watch(watch);
	watch->node = NULL;
}

static void softpage_teardown(struct softpage *sp)
{
	mutex_lock(&sp->lock);
	sp->stopping = true;
	mutex_unlock(&sp->lock);
	softpage_unwatch(&sp->armed_watch);
	softpage_unwatch(&sp->drop_watch);
	/* Before quiescing: an event would queue the request work again. */
	softpage_unbind_event_channel(sp);
	softpage_quiesce(sp);
	/* dom0 must not find a header that is about to disappear. */
	xenbus_rm(XBT_NIL, "data", "softpage");
	WRITE_ONCE(softpage_suspending, NULL);
	softpage_free_shared(sp);
}

#define SOFTPAGE_STAT_ATTR(name, field)					\
static ssize_t name##_show(struct device *dev,				\
			   struct device_attribute *attr, char *buf)	\
{									\
	struct softpage *sp = dev_get_drvdata(dev);			\
	ssize_t len;							\
									\
	mutex_lock(&sp->lock);						\
	len = sysfs_emit(buf, "%lld\n", (long long)sp->stats.field);	\
	mutex_unlock(&sp->lock);					\
	return len;							\
}									\
static DEVICE_ATTR_RO(name)

SOFTPAGE_STAT_ATTR(scans, scans);
SOFTPAGE_STAT_ATTR(last_scan_ns, last_scan_ns);
SOFTPAGE_STAT_ATTR(max_scan_ns, max_scan_ns);
SOFTPAGE_STAT_ATTR(last_request_id, last_request_id);
SOFTPAGE_STAT_ATTR(free_pages, count[SOFTPAGE_CAT_FREE]);
SOFTPAGE_STAT_ATTR(cache_pages, count[SOFTPAGE_CAT_CACHE]);
SOFTPAGE_STAT_ATTR(slab_pages, count[SOFTPAGE_CAT_SLAB]);
SOFTPAGE_STAT_ATTR(held_bitmap_pages, count[SOFTPAGE_CAT_HELD]);
SOFTPAGE_STAT_ATTR(dropped_cache_pages, dropped_cache_pages);
SOFTPAGE_STAT_ATTR(dropped_slab_pages, dropped_slab_pages);
SOFTPAGE_STAT_ATTR(drop_error, drop_error);
SOFTPAGE_STAT_ATTR(drop_ns, drop_ns);
SOFTPAGE_STAT_ATTR(freeze_drops_skipped, freeze_drops_skipped);
SOFTPAGE_STAT_ATTR(early_drops, early_drops);
SOFTPAGE_STAT_ATTR(early_drop_ns, early_drop_ns);
SOFTPAGE_STAT_ATTR(held_pages, held_pages);
SOFTPAGE_STAT_ATTR(final_scan_ns, final_scan_ns);
SOFTPAGE_STAT_ATTR(held_reinit_pages, held_reinit_pages);
SOFTPAGE_STAT_ATTR(held_reinit_ns, held_reinit_ns);
SOFTPAGE_STAT_ATTR(age_passes, age_passes);
SOFTPAGE_STAT_ATTR(last_age_ns, last_age_ns);
SOFTPAGE_STAT_ATTR(last_mark_ns, last_mark_ns);
SOFTPAGE_STAT_ATTR(cache_cold, cache_cold);
SOFTPAGE_STAT_ATTR(evict_candidates, evict_candidates);
SOFTPAGE_STAT_ATTR(evicted_cache_pages, evicted_cache_pages);
SOFTPAGE_STAT_ATTR(remembered_cache, remembered_cache);
SOFTPAGE_STAT_ATTR(freezes, freezes);
SOFTPAGE_STAT_ATTR(thaws, thaws);
SOFTPAGE_STAT_ATTR(restores, restores);

static ssize_t nr_pfns_show(struct device *dev, struct device_attribute *attr,
			    char *buf)
{
	struct softpage *sp = dev_get_drvdata(dev);

	return sysfs_emit(buf, "%lu\n", sp->nr_pfns);
}
static DEVICE_ATTR_RO(nr_pfns);

static struct attribute *softpage_stats_attrs[] = {
	&dev_attr_scans.attr,
	&dev_attr_last_scan_ns.attr,
	&dev_attr_max_scan_ns.attr,
	&dev_attr_last_request_id.attr,
	&dev_attr_free_pages.attr,
	&dev_attr_cache_pages.attr,
	&dev_attr_slab_pages.attr,
	&dev_attr_held_bitmap_pages.attr,
	&dev_attr_dropped_cache_pages.attr,
	&dev_attr_dropped_slab_pages.attr,
	&dev_attr_drop_error.attr,
	&dev_attr_drop_ns.attr,
	&dev_attr_freeze_drops_skipped.attr,
	&dev_attr_early_drops.attr,
	&dev_attr_early_drop_ns.attr,
	&dev_attr_held_pages.attr,
	&dev_attr_final_scan_ns.attr,
	&dev_attr_held_reinit_pages.attr,
	&dev_attr_held_reinit_ns.attr,
	&dev_attr_age_passes.attr,
	&dev_attr_last_age_ns.attr,
	&dev_attr_last_mark_ns.attr,
	&dev_attr_cache_cold.attr,
	&dev_attr_evict_candidates.attr,
	&dev_attr_evicted_cache_pages.attr,
	&dev_attr_remembered_cache.attr,
	&dev_attr_freezes.attr,
	&dev_attr_thaws.attr,
	&dev_attr_restores.attr,
	&dev_attr_nr_pfns.attr,
	NULL,
};

static const struct attribute_group softpage_stats_group = {
	.name = "stats",
	.attrs = softpage_stats_attrs,
};

static const struct attribute_group *softpage_groups[] = {
	&softpage_stats_group,
	NULL,
};

static int softpage_probe(struct platform_device *pdev)
{
	struct softpage *sp;
	int err;

	sp = devm_kzalloc(&pdev->dev, sizeof(*sp), GFP_KERNEL);
	if (!sp)
		return -ENOMEM;
	sp->dev = &pdev->dev;
	mutex_init(&sp->lock);
	INIT_WORK(&sp->request_work, softpage_request_work);
	INIT_DELAYED_WORK(&sp->periodic_work, softpage_periodic_work);
	INIT_WORK(&sp->drop_work, softpage_drop_work);
	INIT_DELAYED_WORK(&sp->age_work, softpage_age_work);
	platform_set_drvdata(pdev, sp);

	err = softpage_alloc_shared(sp);
	if (err)
		goto fail;
	softpage_write_layout(sp);
	softpage_publish_empty(sp);
	err = softpage_bind_event_channel(sp);
	if (err)
		goto fail;
	err = softpage_advertise(sp);
	if (err)
		goto fail;
	err = softpage_watch(&sp->armed_watch, SOFTPAGE_XS_ARMED_PATH,
			     softpage_armed_changed);
	if (!err)
		err = softpage_watch(&sp->drop_watch, SOFTPAGE_XS_DROP_PATH,
				     softpage_drop_requested);
	if (err)
		goto fail;
	dev_info(sp->dev,
		 "publishing %lu PFNs in %u+%u pages: header-gref %u, event-channel %u, flags %#x\n",
		 sp->nr_pfns, sp->nr_list_frames, softpage_bitmap_frames(sp),
		 sp->grefs[0], sp->port, softpage_guest_flags());
	mutex_lock(&sp->lock);
	softpage_queue_aging(sp);
	mutex_unlock(&sp->lock);
	return 0;

fail:
	dev_err(sp->dev, "cannot start: %d\n", err);
	softpage_teardown(sp);
	return err;
}

/* platform_driver.remove returns void since 6.11 (Kbuild tells). */
#ifdef SOFTPAGE_REMOVE_RETURNS_VOID
static void softpage_remove(struct platform_device *pdev)
{
	softpage_teardown(platform_get_drvdata(pdev));
}
#else
static int softpage_remove(struct platform_device *pdev)
{
	softpage_teardown(platform_get_drvdata(pdev));
	return 0;
}
#endif

static struct platform_driver softpage_driver = {
	.remove = softpage_remove,
	.driver = {
		.name = KBUILD_MODNAME,
		.pm = &softpage_pm_ops,
		.dev_groups = softpage_groups,
	},
};

/* The device exists only for dev_pm_ops; exit needs it to unregister. */
static struct platform_device *softpage_pdev;

static int __init softpage_init(void)
{
	if (!xen_domain()) {
		pr_err("not running in a Xen guest; refusing to load\n");
		return -ENODEV;
	}
	softpage_pdev = platform_create_bundle(&softpage_driver,
					       softpage_probe, NULL, 0, NULL,
					       0);
	if (IS_ERR(softpage_pdev))
		return PTR_ERR(softpage_pdev);
	softpage_register_syscore();
	return 0;
}

static void __exit softpage_exit(void)
{
	softpage_unregister_syscore();
	platform_device_unregister(softpage_pdev);
	platform_driver_unregister(&softpage_driver);
}

module_init(softpage_init);
module_exit(softpage_exit);

MODULE_DESCRIPTION("Publish soft (free, clean cache) pages to dom0 for Xen migration");
MODULE_LICENSE("GPL");
MODULE_VERSION(SOFTPAGE_MODULE_VERSION);
