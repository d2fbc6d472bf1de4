/*
 * ring_core: virtio split-ring engine in plain C (no Python.h).
 *
 * Why plain C: the proxy's shadow-ring data path runs on a native thread that must never wait for the
 * GIL, and the same core is compiled standalone under AddressSanitizer by the fuzz test.  The CPython
 * binding (_ringmodule.c) is a thin layer over this file; dissectors/ring/_native.py is the pure-Python
 * twin with the same behaviour.
 *
 * Layouts follow include/uapi/linux/virtio_ring.h (little endian, x86-64 host); tests check the sizes,
 * offsets and flag values below against dissectors/spec/virtio.py.
 */
#ifndef FSINSPECT_RING_CORE_H
#define FSINSPECT_RING_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <pthread.h>

/* ---- virtio split ring structures (virtio 1.2, 2.7) ---- */
struct rc_vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};
struct rc_vring_used_elem {
    uint32_t id;
    uint32_t len;
};
#define RC_VRING_DESC_F_NEXT 1u
#define RC_VRING_DESC_F_WRITE 2u
#define RC_VRING_DESC_F_INDIRECT 4u
#define RC_VRING_AVAIL_RING_OFF 4u   /* u16 flags; u16 idx; u16 ring[num] */
#define RC_VRING_AVAIL_F_NO_INTERRUPT 1u
#define RC_VRING_USED_RING_OFF 4u    /* u16 flags; u16 idx; vring_used_elem ring[num] */
#define RC_MAX_QUEUE_SIZE 32768u
/* Upper bound on a chain's readable bytes (what pop gathers into memory).  FUSE requests are at most
 * max_pages (<= 65535) pages plus headers; a guest can otherwise describe terabytes by repeating one
 * buffer, which would be a memory DoS on the daemon. */
#define RC_MAX_GATHER (256ull << 20)
/* Layout entries of descriptors that came from an indirect table carry this extra (non-virtio) bit. */
#define RC_LAYOUT_F_FROM_INDIRECT 0x8000u

/* ---- error reasons (stable numbers: the Python side maps them to names) ---- */
enum rc_err {
    RC_OK = 0,
    RC_E_NO_REGION = 1,        /* a descriptor (or ring) outside every memory region */
    RC_E_OVERFLOW = 2,         /* addr + len wraps around 2^64 */
    RC_E_CHAIN_LOOP = 3,       /* chain longer than the queue size / indirect table: a loop */
    RC_E_NESTED_INDIRECT = 4,  /* an INDIRECT descriptor inside an indirect table */
    RC_E_NEXT_RANGE = 5,       /* next >= num (or >= the indirect table's length) */
    RC_E_READ_AFTER_WRITE = 6, /* a device-readable descriptor after a device-writable one */
    RC_E_AVAIL_AHEAD = 7,      /* avail->idx runs more than num ahead of the last seen index */
    RC_E_HEAD_RANGE = 8,       /* an avail (or used) ring entry names a head >= num */
    RC_E_INDIRECT_LEN = 9,     /* indirect table length 0, not a multiple of 16, or too long */
    RC_E_INDIRECT_NEXT = 10,   /* INDIRECT together with NEXT (forbidden by the spec) */
    RC_E_BAD_QUEUE = 11,       /* queue size not a power of two in 1..32768, or rings misplaced */
    RC_E_NOMEM = 12,           /* allocation failure */
    RC_E_REGIONS_FULL = 13,    /* too many memory regions */
    RC_E_REGION_OVERLAP = 14,  /* a new region overlaps an existing one */
    RC_E_NOT_IN_FLIGHT = 15,   /* a used entry for a head the path never forwarded */
    RC_E_TOO_LARGE = 16,       /* readable bytes beyond RC_MAX_GATHER: refuse rather than allocate */
    RC_E_NOT_HELD = 17,        /* a verdict for a head that is not held (unknown, or already resumed) */
    RC_E_WRONG_DIRECTION = 18, /* answer/drop on a held reply, rewrite on a held request */
    RC_E_NO_ROOM = 19,         /* verdict data larger than the chain's writable segments */
    RC_E_NEEDS_REPLY = 20,     /* drop of a held request that has writable segments (it expects a reply) */
    RC_E_COUNT
};
const char *rc_err_name(int err);

/* ---- guest memory: region table with GPA -> host translation ---- */
#define RC_MAX_REGIONS 64
struct rc_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t uva;   /* the frontend's user address of the region start (SET_VRING_ADDR uses these) */
    uint8_t *host;  /* our mapping of the region start (mapping base + mmap_offset) */
};
struct rc_memmap {
    int n;
    int last_hit;
    struct rc_region r[RC_MAX_REGIONS];
};
void rc_mem_init(struct rc_memmap *m);
/* Returns the slot index (>= 0) or -RC_E_*. */
int rc_mem_add(struct rc_memmap *m, uint64_t gpa, uint64_t size, uint64_t uva, uint8_t *host);
int rc_mem_remove(struct rc_memmap *m, uint64_t gpa);
/* Region holding [gpa, gpa+len) entirely (len may be 0: the byte at gpa must still be mapped).
 * Returns the region index and sets *off, or -RC_E_NO_REGION / -RC_E_OVERFLOW. */
int rc_mem_find(struct rc_memmap *m, uint64_t gpa, uint64_t len, uint64_t *off);
/* Host pointer for [gpa, gpa+len) inside one region, or NULL with *err set. */
uint8_t *rc_mem_ptr(struct rc_memmap *m, uint64_t gpa, uint64_t len, int *err);
int rc_mem_uva_to_gpa(const struct rc_memmap *m, uint64_t uva, uint64_t *gpa);

/* ---- a popped chain: effective descriptors (after indirect expansion) and host segments ---- */
struct rc_layout {
    uint64_t addr;
    uint32_t len;
    uint16_t flags; /* VRING_DESC_F_WRITE, plus RC_LAYOUT_F_FROM_INDIRECT; INDIRECT itself is also listed */
    uint16_t pad;
};
struct rc_seg {
    uint8_t *host;
    uint32_t len;
    uint16_t write;
    uint16_t region;
};
struct rc_chain {
    uint16_t head;
    uint32_t nlayout, cap_layout;
    struct rc_layout *layout;
    uint32_t nseg, cap_seg;
    struct rc_seg *seg;
    uint64_t readable_len, writable_len;
    int err;          /* RC_OK or the reason the walk stopped */
};
void rc_chain_init(struct rc_chain *c);
void rc_chain_free(struct rc_chain *c);
/* Walk the chain starting at `head` in the descriptor table (num entries at host pointer desc). */
int rc_walk_chain(struct rc_memmap *m, const uint8_t *desc, uint16_t num, uint16_t head, struct rc_chain *c);
/* Copy the chain's readable bytes (at most max) to dst; returns bytes copied. */
uint64_t rc_chain_gather(const struct rc_chain *c, uint8_t *dst, uint64_t max);
/* Copy the first `max` bytes of the chain's writable segments to dst; returns bytes copied. */
uint64_t rc_chain_gather_writable(const struct rc_chain *c, uint8_t *dst, uint64_t max);

/* ---- a split queue seen by a device ---- */
struct rc_queue {
    struct rc_memmap *mem;
    uint16_t num;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint8_t *desc, *avail, *used; /* host pointers, resolved by rc_queue_init */
    uint16_t last_avail_idx;      /* next avail entry to pop */
    uint16_t used_idx;            /* next used entry to publish */
    int event_idx;                /* VIRTIO_RING_F_EVENT_IDX negotiated */
    int signalled_valid;          /* signalled_used holds the used index of the last call */
    uint16_t signalled_used;
};
int rc_queue_init(struct rc_queue *q, struct rc_memmap *m, uint32_t num, uint64_t desc_gpa,
                  uint64_t avail_gpa, uint64_t used_gpa);
/* Number of available, unpopped entries, or -RC_E_AVAIL_AHEAD. */
int rc_queue_avail(struct rc_queue *q);
/* Pop one chain (caller checked rc_queue_avail() > 0).  On a malformed chain the entry is still
 * consumed and c->err / the return value tell why. */
int rc_queue_pop(struct rc_queue *q, struct rc_chain *c);
/* Write used elements, then publish the 16-bit index once (entries first, index last). */
int rc_queue_push_used(struct rc_queue *q, const struct rc_vring_used_elem *e, uint32_t n);
/* rc_queue_push_used(), then whether the driver wants a call for these entries (*call = 1): with
 * EVENT_IDX when used->idx moved past its used_event since the last call, without it unless the driver
 * set VRING_AVAIL_F_NO_INTERRUPT.  The index store and the flag/event load are ordered (seq-cst), so a
 * driver re-enabling calls either sees the entries or is called. */
int rc_queue_publish(struct rc_queue *q, const struct rc_vring_used_elem *e, uint32_t n, int *call);
/* EVENT_IDX: ask for a kick at the next avail entry (avail_event = last_avail_idx, then a full fence).
 * Call it before rc_queue_avail(), and pop until that says 0: then no entry can slip in unkicked. */
void rc_queue_want_kick(struct rc_queue *q);
uint16_t rc_ring_load_idx(const uint8_t *ring);
void rc_ring_store_idx(uint8_t *ring, uint16_t idx);

/* ---- capture buffer: bounded, many producers (one per queue thread), one consumer ---- */
enum rc_cap_kind { RC_CAP_PAD = 0, RC_CAP_REQUEST = 1, RC_CAP_REPLY = 2, RC_CAP_ERROR = 3 };
#define RC_CAP_F_TRUNCATED 1u
#define RC_CAP_F_HELD 2u       /* held by a rule: not forwarded (request) / not published (reply) yet */
#define RC_CAP_F_ANSWERED 4u   /* a reply the path wrote itself (answer, drop, safety EIO) */
#define RC_CAP_F_REWRITTEN 8u  /* a held reply, rewritten: the bytes the guest gets */
#define RC_CAP_F_RELEASED 16u  /* a held reply, released unchanged: now published to the guest */
/* One record in the byte ring, 8-byte aligned: header, nlayout rc_layout entries, data bytes. */
struct rc_cap_hdr {
    uint32_t rec_len;   /* bytes of the whole record, padded to 8 */
    uint16_t kind;
    uint16_t queue;
    uint64_t ts_ns;     /* CLOCK_REALTIME */
    uint16_t head;
    uint16_t reason;    /* rc_err for RC_CAP_ERROR records */
    uint32_t flags;
    uint32_t nlayout;
    uint32_t orig_len;  /* readable bytes (request) or used.len (reply) */
    uint32_t data_len;  /* bytes stored */
    uint32_t pad;
};
enum rc_policy { RC_POLICY_DROP = 0, RC_POLICY_LOSSLESS = 1 };
struct rc_capture {
    pthread_mutex_t lock;
    pthread_cond_t space;     /* signalled when the consumer frees space (lossless producers wait) */
    uint8_t *buf;
    uint64_t cap;             /* bytes, multiple of 8 */
    uint64_t head, tail;      /* monotonically increasing byte positions; head = write, tail = read */
    int policy;
    int notify_fd;            /* eventfd: written when the buffer goes from empty to non-empty */
    int closing;
    uint64_t captured, dropped, dropped_bytes, stalls, truncated;
};
int rc_capture_init(struct rc_capture *c, uint64_t capacity, int policy);
void rc_capture_destroy(struct rc_capture *c);
/* Close the eventfd (end of session): records still buffered stay readable; nothing waits on it again.
 * Only once no producer writes to it (every path using it closed) and the consumer has stopped. */
void rc_capture_close(struct rc_capture *c);
/* Reserve space for a record of `len` bytes (header included, len <= cap/2); NULL when full (drop
 * policy, or lossless with may_wait=0 / *stop set; counted as a drop if count_drop).  On success the
 * buffer lock stays held until rc_capture_commit, which serialises producers. */
uint8_t *rc_capture_reserve(struct rc_capture *c, uint32_t len, int may_wait, int *stop,
                            uint64_t *stalls, int count_drop);
void rc_capture_commit(struct rc_capture *c);
/* Wake the consumer (eventfd): producers call it once per batch, after their commits. */
void rc_capture_notify(struct rc_capture *c);
/* Consumer: pointer to the next record or NULL when empty (no lock needed: one consumer). */
const struct rc_cap_hdr *rc_capture_peek(struct rc_capture *c, uint64_t *pos);
void rc_capture_release(struct rc_capture *c, uint64_t upto);
void rc_capture_wake_all(struct rc_capture *c);
uint64_t rc_capture_used_bytes(struct rc_capture *c);

/* ---- hold points: a rule table matched natively, verdicts from any thread ---- */
#define RC_HOLD_REQUEST 1u
#define RC_HOLD_REPLY 2u
/* fuse_in_header / fuse_out_header (include/uapi/linux/fuse.h); tests check them against dissectors/spec */
#define RC_FUSE_IN_HEADER_LEN 40u    /* a request shorter than this is never held */
#define RC_FUSE_IN_OPCODE_OFF 4u
#define RC_FUSE_IN_UNIQUE_OFF 8u
#define RC_FUSE_OUT_HEADER_LEN 16u   /* u32 len, s32 error, u64 unique */
#define RC_OP_UNKNOWN 0xFFFFFFFFu    /* opcode of a request forwarded while no rules were set */
#define RC_FUSE_EIO 5
struct rc_hold_rule {
    uint32_t direction;  /* RC_HOLD_REQUEST and/or RC_HOLD_REPLY */
    uint32_t nops;       /* 0: every opcode */
    uint64_t queues;     /* bitmask of queue indices (0: every queue) */
    uint32_t *ops;       /* nops opcodes, inside the table's allocation */
};
/* Immutable once published; reference-counted so the setter never waits for the path thread. */
struct rc_hold_table {
    int refs;
    uint32_t n;
    struct rc_hold_rule *r;
};
/* One allocation with room for nrules rules and total_ops opcodes (rules[i].ops to be filled). */
struct rc_hold_table *rc_hold_table_new(uint32_t nrules, uint32_t total_ops);
void rc_hold_table_unref(struct rc_hold_table *t);
int rc_hold_match(const struct rc_hold_table *t, uint32_t direction, uint16_t queue, uint32_t op);

enum rc_verdict_kind { RC_V_RELEASE = 1, RC_V_ANSWER = 2, RC_V_REWRITE = 3, RC_V_DROP = 4, RC_V_EIO = 5 };
enum rc_held_state { RC_HS_NONE = 0, RC_HS_REQUEST = 1, RC_HS_REPLY = 2, RC_HS_PENDING = 0x80 };
struct rc_held_slot {
    uint32_t op;        /* the request's opcode (under proc_lock) */
    uint8_t state;      /* rc_held_state (under hold_lock) */
    uint32_t used_len;  /* held reply: the back-end's used.len */
    uint32_t wlen;      /* the chain's writable bytes when it was held */
};
struct rc_verdict {
    struct rc_verdict *next;
    uint16_t head;
    uint8_t kind;       /* rc_verdict_kind */
    uint8_t dir;        /* RC_HS_REQUEST or RC_HS_REPLY */
    uint32_t used_len;
    uint32_t len;
    uint8_t data[];
};

/* ---- the shadow-ring data path of one queue ---- */
struct rc_path_counters {
    uint64_t requests, replies, errors, unpaired, kicks_in, calls_in, kicks_out, calls_out;
    uint64_t stalls, dropped, wakeups, spin_hits;
    uint64_t busy_ns, busy_max_ns; /* time from a wake-up to done forwarding: total, and the longest */
    uint64_t kicks_suppressed, calls_suppressed; /* EVENT_IDX: notifications the other side did not ask for */
    uint64_t holds, released, answered, rewritten, hold_drops; /* hold points: held captures, verdicts */
    uint64_t safety; /* held items resolved by the safety rule at stop (EIO, release, drop) */
};
struct rc_path {
    struct rc_memmap *mem;
    int inited;
    int need_notify;
    uint16_t queue_index;
    uint16_t num;
    uint8_t *desc;                   /* shared descriptor table (guest memory) */
    uint8_t *g_avail, *g_used;       /* the guest's rings */
    uint8_t *s_avail, *s_used;       /* the backend's shadow rings */
    uint16_t next_avail;             /* next guest avail entry to forward */
    uint16_t s_avail_idx;            /* shadow avail->idx we published */
    uint16_t next_used;              /* next shadow used entry to copy */
    uint16_t g_used_idx;             /* guest used->idx we published */
    uint8_t *inflight;               /* per head: forwarded and not yet used */
    int event_idx;                   /* VIRTIO_RING_F_EVENT_IDX negotiated (both sides see the same rings) */
    int signalled_valid;             /* EVENT_IDX: signalled_used holds the used idx of our last call */
    uint16_t signalled_used;
    uint16_t kicked_avail;           /* EVENT_IDX: shadow avail idx at our last kick of the backend */
    struct rc_capture *cap;
    uint32_t snaplen;                /* 0 = whole chain */
    uint64_t spin_ns;                /* busy-poll budget after activity (0 = always sleep in poll) */
    int kick_fd, call_fd;            /* our dups of the frontend's fds (-1: none) */
    int backend_kick_fd, backend_call_fd;
    int ctl_fd;                      /* eventfd: stop / fd swap wake-up */
    int pending_kick_fd, pending_call_fd; /* -2: no change pending (atomic accesses) */
    int stop;                        /* atomic accesses */
    int running;
    int closed;                      /* rc_path_close ran: no fds, no thread, no ring access (under fd_lock) */
    int broken;                      /* last avail check failed (RC_E_AVAIL_AHEAD) */
    int last_error;
    pthread_t thread;
    pthread_mutex_t proc_lock;       /* held while forwarding; drain() takes it too */
    pthread_mutex_t fd_lock;         /* guards call_fd use/swap and kick_fd swaps on a stopped path */
    struct rc_chain chain;           /* scratch, under proc_lock */
    uint8_t *scratch;                /* gather buffer for truncation-free capture */
    struct rc_path_counters ctr;
    /* hold points */
    pthread_mutex_t hold_lock;       /* rules, slot[].state/used_len/wlen, the verdict queue; after proc_lock */
    struct rc_hold_table *rules;     /* the published table (atomic pointer; NULL: no rules) */
    struct rc_hold_table *rules_seen; /* the thread's reference (under proc_lock) */
    struct rc_held_slot *slot;       /* per head */
    struct rc_verdict *vq, **vq_tail; /* verdicts for the thread to apply (under hold_lock) */
    int vq_n;                        /* atomic hint: verdicts queued */
    int async_verdicts;              /* under hold_lock: the thread runs and applies queued verdicts */
    int no_hold;                     /* set by stop: nothing is held until start (drain never holds) */
    uint32_t nheld;                  /* under hold_lock */
};
/* All fds are dup'ed; the path owns and closes its copies.  avail_base: the backend's first avail
 * index (SET_VRING_BASE); the shadow used index starts at the guest's current used->idx. */
int rc_path_init(struct rc_path *p, struct rc_memmap *m, uint16_t queue_index, uint32_t num,
                 uint64_t desc_gpa, uint64_t g_avail_gpa, uint64_t g_used_gpa, uint64_t s_avail_gpa,
                 uint64_t s_used_gpa, struct rc_capture *cap, int kick_fd, int call_fd,
                 int backend_kick_fd, int backend_call_fd, uint16_t avail_base, uint32_t snaplen,
                 uint32_t spin_us);
/* VIRTIO_RING_F_EVENT_IDX (before start, or on a stopped path): the guest's used_event and the
 * backend's avail_event decide whether to call/kick, and the path publishes avail_event in the guest's
 * used ring and used_event in the shadow avail ring, asking for every new entry. */
void rc_path_set_event_idx(struct rc_path *p, int on);
int rc_path_start(struct rc_path *p);
/* Join the thread, then the safety rule: verdicts still queued are applied (a released request is
 * answered EIO instead: the back-end is stopping), every held request is answered with a FUSE error
 * reply -EIO (its unique from its own header), held replies are released, held requests without
 * writable segments (FORGET, BATCH_FORGET) are completed with used.len 0.  Nothing is held after. */
void rc_path_stop(struct rc_path *p);
/* Forward pending used entries to the guest now (GET_VRING_BASE flush); returns how many. */
int rc_path_drain(struct rc_path *p);
/* Swap the frontend's kick/call fd (dup'ed; -1 = none).  Safe while the thread runs, and never waits
 * for a lossless-stalled thread. */
int rc_path_set_kick_fd(struct rc_path *p, int fd);
int rc_path_set_call_fd(struct rc_path *p, int fd);
/* End of the session: stop, then close every fd the path owns (ctl, kick, call, the backend's two).  Only
 * counters, indices and held() stay meaningful; the rings are never touched again.  Idempotent. */
void rc_path_close(struct rc_path *p);
void rc_path_destroy(struct rc_path *p);
/* Replace the rule table (ownership of t passes to the path; NULL or an empty table: no rules).  Never
 * waits for the path thread: it picks the new table up at its next pass (woken here). */
void rc_path_set_hold_rules(struct rc_path *p, struct rc_hold_table *t);
/* A verdict on a held head (rc_verdict_kind, not RC_V_EIO): RC_OK or RC_E_NOT_HELD / WRONG_DIRECTION /
 * NO_ROOM / NEEDS_REPLY / NOMEM.  While the thread runs the verdict is queued for it (never waits for
 * a lossless stall); on a stopped path it is applied at once. */
int rc_path_verdict(struct rc_path *p, uint16_t head, int kind, const uint8_t *data, uint32_t len);
/* Held heads now (verdicts queued excluded): out[i] = head | direction << 16, at most max; returns the
 * count (may exceed max). */
uint32_t rc_path_held(struct rc_path *p, uint32_t *out, uint32_t max);
/* One forwarding step without waiting (used by the thread and by tests): returns entries moved. */
int rc_path_forward_avail(struct rc_path *p, int may_wait);
int rc_path_forward_used(struct rc_path *p, int may_wait);

uint64_t rc_now_ns(void);

#endif
