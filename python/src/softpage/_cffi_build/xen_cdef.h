/*
 * The subset of the Xen 4.17 tool libraries softpage calls, as cffi cdef.
 *
 * Parsed by cffi only (not by a C compiler); build_xen.py compiles the real
 * headers (xenctrl.h, xenguest.h, ...) in API mode, so every "..." below is
 * filled in by the compiler and a mismatch with the installed headers is a
 * build error, not a silent ABI break.  Signatures: /usr/include of
 * libxen-dev 4.17.7.
 */

typedef unsigned long xen_pfn_t;  /* x86 (arch-x86/xen.h) */
typedef uint16_t domid_t;
typedef uint32_t evtchn_port_t;
typedef int xenevtchn_port_or_error_t;

/* Build stamp: lets softpage.xen._binding refuse a stale compiled module. */
#define SOFTPAGE_XEN_BINDING_ABI ...
#define XEN_DOMCTL_INTERFACE_VERSION ...

/* ---- libxentoollog / handles (opaque) ---------------------------------- */
typedef struct xentoollog_logger xentoollog_logger;
typedef struct xc_interface_core xc_interface;
typedef struct xenforeignmemory_handle xenforeignmemory_handle;
typedef struct xengntdev_handle xengnttab_handle;
typedef struct xenevtchn_handle xenevtchn_handle;
typedef struct xc_cpu_policy xc_cpu_policy_t;

/* ---- libxenctrl: interface and version ---------------------------------- */
xc_interface *xc_interface_open(xentoollog_logger *logger,
                                xentoollog_logger *dombuild_logger,
                                unsigned open_flags);
int xc_interface_close(xc_interface *xch);

#define XENVER_version ...
int xc_version(xc_interface *xch, int cmd, void *arg);

/* ---- domain info --------------------------------------------------------- */
#define XEN_DOMINF_dying ...
#define XEN_DOMINF_hvm_guest ...
#define XEN_DOMINF_shutdown ...
#define XEN_DOMINF_paused ...
#define XEN_DOMINF_running ...
#define XEN_DOMINF_hap ...
#define XEN_DOMINF_shutdownmask ...
#define XEN_DOMINF_shutdownshift ...
#define XEN_X86_EMU_PIT ...
#define XEN_X86_EMU_ALL ...

#define SHUTDOWN_poweroff ...
#define SHUTDOWN_reboot ...
#define SHUTDOWN_suspend ...
#define SHUTDOWN_crash ...

struct xen_arch_domainconfig {
    uint32_t emulation_flags;
    ...;
};

typedef struct xen_domctl_getdomaininfo {
    domid_t domain;
    uint32_t flags;
    uint64_t tot_pages;
    uint64_t max_pages;
    uint32_t nr_online_vcpus;
    uint32_t max_vcpu_id;
    uint64_t shared_info_frame;
    struct xen_arch_domainconfig arch_config;
    ...;
} xc_domaininfo_t;

int xc_domain_getinfolist(xc_interface *xch, uint32_t first_domain,
                          unsigned int max_domains, xc_domaininfo_t *info);
int xc_domain_maximum_gpfn(xc_interface *xch, uint32_t domid, xen_pfn_t *gpfns);
int xc_domain_shutdown(xc_interface *xch, uint32_t domid, int reason);

/* ---- hypercall buffers (the DECLARE_HYPERCALL_BUFFER macros are not
 *      callable from cffi, so the struct is declared here and initialised
 *      by softpage.xen.ctrl the way HYPERCALL_BUFFER_INIT_NO_BOUNCE does) -- */
struct xc_hypercall_buffer {
    void *hbuf;
    struct xc_hypercall_buffer *param_shadow;
    int dir;
    void *ubuf;
    size_t sz;
};
typedef struct xc_hypercall_buffer xc_hypercall_buffer_t;
void *xc__hypercall_buffer_alloc_pages(xc_interface *xch, xc_hypercall_buffer_t *b,
                                       int nr_pages);
void xc__hypercall_buffer_free_pages(xc_interface *xch, xc_hypercall_buffer_t *b,
                                     int nr_pages);

/* ---- log-dirty ----------------------------------------------------------- */
#define XEN_DOMCTL_SHADOW_OP_OFF ...
#define XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY ...
#define XEN_DOMCTL_SHADOW_OP_CLEAN ...
#define XEN_DOMCTL_SHADOW_OP_PEEK ...
#define XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL ...

typedef struct xen_domctl_shadow_op_stats {
    uint32_t fault_count;
    uint32_t dirty_count;
} xc_shadow_op_stats_t;

int xc_shadow_control(xc_interface *xch, uint32_t domid, unsigned int sop,
                      unsigned int *mb, unsigned int mode);
long long xc_logdirty_control(xc_interface *xch, uint32_t domid, unsigned int sop,
                              xc_hypercall_buffer_t *dirty_bitmap, unsigned long pages,
                              unsigned int mode, xc_shadow_op_stats_t *stats);

/* ---- page types (libxenctrl private, exported: declared in build_xen.py) - */
#define XEN_DOMCTL_PFINFO_LTAB_SHIFT ...
#define XEN_DOMCTL_PFINFO_NOTAB ...
#define XEN_DOMCTL_PFINFO_XTAB ...
#define XEN_DOMCTL_PFINFO_XALLOC ...
#define XEN_DOMCTL_PFINFO_BROKEN ...
#define XEN_DOMCTL_PFINFO_LTAB_MASK ...
#define XEN_DOMCTL_PFINFO_LPINTAB ...
int xc_get_pfn_type_batch(xc_interface *xch, uint32_t dom, unsigned int num,
                          xen_pfn_t *arr);

/* ---- end-of-checkpoint state --------------------------------------------- */
int xc_domain_hvm_getcontext(xc_interface *xch, uint32_t domid, uint8_t *ctxt_buf,
                             uint32_t size);
int xc_hvm_param_get(xc_interface *handle, uint32_t dom, uint32_t param,
                     uint64_t *value);
int xc_domain_get_tsc_info(xc_interface *xch, uint32_t domid, uint32_t *tsc_mode,
                           uint64_t *elapsed_nsec, uint32_t *gtsc_khz,
                           uint32_t *incarnation);

/* The list write_hvm_params() (xg_sr_save_x86_hvm.c) saves. */
#define HVM_PARAM_STORE_PFN ...
#define HVM_PARAM_IOREQ_PFN ...
#define HVM_PARAM_BUFIOREQ_PFN ...
#define HVM_PARAM_PAGING_RING_PFN ...
#define HVM_PARAM_MONITOR_RING_PFN ...
#define HVM_PARAM_SHARING_RING_PFN ...
#define HVM_PARAM_VM86_TSS_SIZED ...
#define HVM_PARAM_CONSOLE_PFN ...
#define HVM_PARAM_ACPI_IOPORTS_LOCATION ...
#define HVM_PARAM_VIRIDIAN ...
#define HVM_PARAM_IDENT_PT ...
#define HVM_PARAM_VM_GENERATION_ID_ADDR ...
#define HVM_PARAM_IOREQ_SERVER_PFN ...
#define HVM_PARAM_NR_IOREQ_SERVER_PAGES ...
#define HVM_PARAM_X87_FIP_WIDTH ...
#define HVM_PARAM_MCA_CAP ...

/* ---- libxenguest: CPU policy, resume -------------------------------------- */
typedef struct xen_cpuid_leaf {
    uint32_t leaf, subleaf;
    uint32_t a, b, c, d;
} xen_cpuid_leaf_t;
typedef struct xen_msr_entry {
    uint32_t idx;
    uint32_t flags;
    uint64_t val;
} xen_msr_entry_t;

xc_cpu_policy_t *xc_cpu_policy_init(void);
void xc_cpu_policy_destroy(xc_cpu_policy_t *policy);
int xc_cpu_policy_get_domain(xc_interface *xch, uint32_t domid, xc_cpu_policy_t *policy);
int xc_cpu_policy_get_size(xc_interface *xch, uint32_t *nr_leaves, uint32_t *nr_msrs);
int xc_cpu_policy_serialise(xc_interface *xch, const xc_cpu_policy_t *policy,
                            xen_cpuid_leaf_t *leaves, uint32_t *nr_leaves,
                            xen_msr_entry_t *msrs, uint32_t *nr_msrs);
int xc_domain_resume(xc_interface *xch, uint32_t domid, int fast);

/* ---- libxenforeignmemory -------------------------------------------------- */
xenforeignmemory_handle *xenforeignmemory_open(xentoollog_logger *logger,
                                               unsigned open_flags);
int xenforeignmemory_close(xenforeignmemory_handle *fmem);
void *xenforeignmemory_map(xenforeignmemory_handle *fmem, uint32_t dom, int prot,
                           size_t pages, const xen_pfn_t arr[], int err[]);
int xenforeignmemory_unmap(xenforeignmemory_handle *fmem, void *addr, size_t pages);

/* ---- libxengnttab --------------------------------------------------------- */
xengnttab_handle *xengnttab_open(xentoollog_logger *logger, unsigned open_flags);
int xengnttab_close(xengnttab_handle *xgt);
void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count,
                                      uint32_t domid, uint32_t *refs, int prot);
int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count);

/* ---- libxenevtchn --------------------------------------------------------- */
xenevtchn_handle *xenevtchn_open(xentoollog_logger *logger, unsigned int flags);
int xenevtchn_close(xenevtchn_handle *xce);
int xenevtchn_fd(xenevtchn_handle *xce);
int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port);
xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
                                                     evtchn_port_t remote_port);
int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port);
xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce);
int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port);

/* ---- mmap protection ------------------------------------------------------- */
#define PROT_READ ...

/* ---- PV guests (helpers defined in build_xen.py, PV_HELPERS) --------------- */
int xc_domain_get_guest_width(xc_interface *xch, uint32_t domid, unsigned int *guest_width);
int xc_maximum_ram_page(xc_interface *xch, unsigned long *max_mfn);

static const size_t SOFTPAGE_PV_VCPU_CONTEXT_SIZE;
static const size_t SOFTPAGE_PV_VCPU_RDX_OFFSET;
static const size_t SOFTPAGE_PV_VCPU_GDT_FRAMES_OFFSET;
static const size_t SOFTPAGE_PV_VCPU_GDT_ENTS_OFFSET;
static const size_t SOFTPAGE_PV_VCPU_CTRLREG_OFFSET;
static const size_t SOFTPAGE_SHINFO_MAX_PFN_OFFSET;
static const size_t SOFTPAGE_SHINFO_P2M_CR3_OFFSET;
static const size_t SOFTPAGE_SHINFO_P2M_VADDR_OFFSET;
static const size_t SOFTPAGE_SHINFO_P2M_GENERATION_OFFSET;
#define FIRST_RESERVED_GDT_ENTRY ...

int softpage_pv_vcpu_online(xc_interface *xch, uint32_t domid, uint32_t vcpu);
int softpage_pv_vcpu_context(xc_interface *xch, uint32_t domid, uint32_t vcpu,
                             uint8_t *buf, size_t *size);
int softpage_pv_vcpu_extended(xc_interface *xch, uint32_t domid, uint32_t vcpu,
                              uint8_t *buf, size_t *size);
int softpage_pv_vcpu_xsave(xc_interface *xch, uint32_t domid, uint32_t vcpu,
                           uint8_t *buf, size_t *size);
int softpage_pv_vcpu_msrs(xc_interface *xch, uint32_t domid, uint32_t vcpu,
                          uint8_t *buf, size_t *size);
