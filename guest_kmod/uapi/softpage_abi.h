/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR MIT */
/*
 * softpage bitmap-page ABI, shared by the guest module (guest_kmod/) and the
 * dom0 library (python/, through cffi).  This file is the single owner of the
 * layout; the normative description is docs/spec/bitmap-page.md.
 *
 * The guest grants one header page and a set of list and bitmap pages
 * read-only to dom0:
 *
 *   header page:  struct softpage_header, then zero up to the page end.
 *   list pages:   nr_list_frames pages, each an array of
 *                 SOFTPAGE_REFS_PER_LIST_FRAME uint32_t grant references of
 *                 bitmap pages; unused trailing entries are zero.
 *   bitmap pages: SOFTPAGE_NR_CATEGORIES * frames_per_category pages,
 *                 category-major: bitmap page i = cat * frames_per_category + j
 *                 holds bit (pfn - j * SOFTPAGE_PFNS_PER_FRAME) for the PFNs
 *                 [j * SOFTPAGE_PFNS_PER_FRAME, (j + 1) * SOFTPAGE_PFNS_PER_FRAME)
 *                 of category cat.  Bit n of a page is bit (n % 8) of byte
 *                 (n / 8): the little-endian Linux bitmap order.  Bits at or
 *                 beyond nr_pfns are zero.
 *
 * All fields are little-endian (x86 guests and dom0 only).  Publication is a
 * sequence lock on 'generation': the guest makes it odd, writes the bitmaps and
 * every other field, then makes it even.  A reader that sees an odd value, or
 * a different value after copying, has a torn snapshot.
 */
#ifndef SOFTPAGE_UAPI_ABI_H
#define SOFTPAGE_UAPI_ABI_H

#ifdef __KERNEL__
#include <linux/build_bug.h>
#include <linux/types.h>
#else
#include <stdint.h>
#endif

/* cffi-cdef-begin: only integer #defines and fixed-width structs below */
#define SOFTPAGE_MAGIC                0x47505353 /* "SSPG" in memory order */
#define SOFTPAGE_VERSION              1
#define SOFTPAGE_PAGE_SIZE            4096
#define SOFTPAGE_PFNS_PER_FRAME       32768      /* bits in one bitmap page */
#define SOFTPAGE_REFS_PER_LIST_FRAME  1024       /* uint32_t refs per list page */
#define SOFTPAGE_MAX_LIST_FRAMES      64

/* Categories: index into count[] and into the bitmap pages. */
#define SOFTPAGE_CAT_FREE             0 /* in the buddy allocator */
#define SOFTPAGE_CAT_CACHE            1 /* clean, unmapped, unlocked page cache */
#define SOFTPAGE_CAT_SLAB             2 /* reclaimable slab */
#define SOFTPAGE_CAT_HELD             3 /* held by the module across suspend */
#define SOFTPAGE_NR_CATEGORIES        4

/* state: what the published bitmaps mean. */
#define SOFTPAGE_STATE_EMPTY          0 /* nothing published yet */
#define SOFTPAGE_STATE_SNAPSHOT       1 /* a precopy snapshot; held is empty */
#define SOFTPAGE_STATE_FINAL          2 /* suspend-time set; held is valid */

/* flags: facts about the guest dom0 may report; unknown bits are an error. */
#define SOFTPAGE_FLAG_INIT_ON_FREE    0x1 /* guest zeroes pages when freed */
#define SOFTPAGE_FLAG_PAGE_POISON     0x2 /* guest poisons pages when freed */
#define SOFTPAGE_FLAG_HOLD_SHORT      0x4 /* FINAL: hold stopped at the reserve */
/*
 * The module rewrites, at resume and before anything can allocate them, every
 * HELD page that does not hold what the guest's allocator expects of a free
 * page: zero with INIT_ON_FREE, the poison pattern with PAGE_POISON.  Without
 * it dom0 must not honour HELD for a guest with either of those two flags.
 */
#define SOFTPAGE_FLAG_HELD_REINIT     0x8
#define SOFTPAGE_FLAGS_KNOWN          0xf

struct softpage_header {
	uint32_t magic;               /*   0: SOFTPAGE_MAGIC */
	uint16_t version;             /*   4: SOFTPAGE_VERSION */
	uint16_t header_size;         /*   6: sizeof(struct softpage_header) */
	uint32_t flags;               /*   8: SOFTPAGE_FLAG_* */
	uint32_t state;               /*  12: SOFTPAGE_STATE_* */
	uint64_t generation;          /*  16: sequence lock, even when stable */
	uint64_t request_id;          /*  24: the dom0 request this answers */
	uint64_t nr_pfns;             /*  32: bitmaps cover PFNs [0, nr_pfns) */
	uint32_t frames_per_category; /*  40: ceil(nr_pfns / PFNS_PER_FRAME) */
	uint32_t nr_list_frames;      /*  44: ceil(4 * fpc / REFS_PER_LIST) */
	uint64_t count[4];            /*  48: set bits per category */
	uint64_t scan_ns;             /*  80: time the guest spent scanning */
	uint64_t reserved[21];        /*  88: zero */
	uint32_t list_gref[64];       /* 256: grant refs of the list pages */
};                                    /* 512 */
/* cffi-cdef-end */

/*
 * Xenstore keys under the guest's data/softpage/ and the values with a fixed
 * meaning (docs/spec/guest-protocol.md, "Xenstore keys").  Strings only, so
 * outside the cffi cdef above; the build script of softpage._abi stamps each
 * into the compiled module and tests/unit/test_abi.py checks dom0's mirror
 * (softpage.abi.XS_*) against it.
 */
/* xenstore-keys-begin */
#define SOFTPAGE_XS_DIR                "data/softpage"
#define SOFTPAGE_XS_VERSION            "version"
#define SOFTPAGE_XS_HEADER_GREF        "header-gref"
#define SOFTPAGE_XS_EVENT_CHANNEL      "event-channel"
#define SOFTPAGE_XS_STATE              "state"
#define SOFTPAGE_XS_REQUEST            "request"
#define SOFTPAGE_XS_ARMED              "armed"
#define SOFTPAGE_XS_FEATURE_DROP       "feature-drop"
#define SOFTPAGE_XS_DROP               "drop"
#define SOFTPAGE_XS_DROPPED            "dropped"
/* "1": the guest knows SOFTPAGE_XS_PRUNE_CACHE (absent: it reports all cache) */
#define SOFTPAGE_XS_FEATURE_CACHE_COLD "feature-cache-cold"
/* dom0 writes which page cache to report soft and drop; the guest creates it "all" */
#define SOFTPAGE_XS_PRUNE_CACHE        "prune-cache"
#define SOFTPAGE_XS_STATE_READY        "ready"
#define SOFTPAGE_XS_PRUNE_CACHE_COLD   "cold"
#define SOFTPAGE_XS_PRUNE_CACHE_ALL    "all"
/* xenstore-keys-end */

#ifdef __KERNEL__
static_assert(sizeof(struct softpage_header) == 512,
	      "softpage ABI: header size");
#else
_Static_assert(sizeof(struct softpage_header) == 512,
	       "softpage ABI: header size");
#endif

#endif /* SOFTPAGE_UAPI_ABI_H */
