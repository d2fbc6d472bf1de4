/*
 * ring_core: virtio split-ring engine in plain C (no Python.h).  See ring_core.h for why.
 *
 * Rules kept throughout:
 *  - every guest address is translated through the region table with overflow and bounds checks,
 *    so a malformed ring yields an rc_err, never an access outside a region;
 *  - guest memory is read with memcpy (no alignment assumptions about indirect tables);
 *  - ring entries are written first and the 16-bit index last (release store), and the index is
 *    read with an acquire load before the entries it covers.
 */
#define _GNU_SOURCE
#include "ring_core.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

static const char *const err_names[RC_E_COUNT] = {
    "ok", "no_region", "overflow", "chain_loop", "nested_indirect", "next_range",
    "read_after_write", "avail_ahead", "head_range", "indirect_len", "indirect_next",
    "bad_queue", "nomem", "regions_full", "region_overlap", "not_in_flight", "too_large",
    "not_held", "wrong_direction", "no_room", "needs_reply",
};

const char *rc_err_name(int err)
{
    if (err < 0)
        err = -err;
    return err < RC_E_COUNT ? err_names[err] : "unknown";
}

uint64_t rc_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ memory map */

void rc_mem_init(struct rc_memmap *m)
{
    memset(m, 0, sizeof(*m));
}

int rc_mem_add(struct rc_memmap *m, uint64_t gpa, uint64_t size, uint64_t uva, uint8_t *host)
{
    if (size == 0 || gpa + size < gpa || uva + size < uva)
        return -RC_E_OVERFLOW;
    if (m->n >= RC_MAX_REGIONS)
        return -RC_E_REGIONS_FULL;
    for (int i = 0; i < m->n; i++) {
        const struct rc_region *r = &m->r[i];
        if (gpa < r->gpa + r->size && r->gpa < gpa + size)
            return -RC_E_REGION_OVERLAP;
    }
    m->r[m->n].gpa = gpa;
    m->r[m->n].size = size;
    m->r[m->n].uva = uva;
    m->r[m->n].host = host;
    return m->n++;
}

int rc_mem_remove(struct rc_memmap *m, uint64_t gpa)
{
    for (int i = 0; i < m->n; i++) {
        if (m->r[i].gpa == gpa) {
            memmove(&m->r[i], &m->r[i + 1], (size_t)(m->n - i - 1) * sizeof(m->r[0]));
            m->n--;
            m->last_hit = 0;
            return i;
        }
    }
    return -RC_E_NO_REGION;
}

static inline int region_has(const struct rc_region *r, uint64_t gpa, uint64_t len)
{
    /* gpa+len does not overflow (checked by callers); a zero length still needs gpa mapped */
    return gpa >= r->gpa && gpa - r->gpa < r->size && len <= r->size - (gpa - r->gpa);
}

int rc_mem_find(struct rc_memmap *m, uint64_t gpa, uint64_t len, uint64_t *off)
{
    if (gpa + len < gpa)
        return -RC_E_OVERFLOW;
    /* last_hit is shared by the path threads and the Python side: a relaxed hint, never trusted */
    int h = __atomic_load_n(&m->last_hit, __ATOMIC_RELAXED);
    if (h >= 0 && h < m->n && region_has(&m->r[h], gpa, len)) {
        *off = gpa - m->r[h].gpa;
        return h;
    }
    for (int i = 0; i < m->n; i++) {
        if (region_has(&m->r[i], gpa, len)) {
            __atomic_store_n(&m->last_hit, i, __ATOMIC_RELAXED);
            *off = gpa - m->r[i].gpa;
            return i;
        }
    }
    return -RC_E_NO_REGION;
}

uint8_t *rc_mem_ptr(struct rc_memmap *m, uint64_t gpa, uint64_t len, int *err)
{
    uint64_t off;
    int i = rc_mem_find(m, gpa, len, &off);
    if (i < 0) {
        *err = -i;
        return NULL;
    }
    *err = RC_OK;
    return m->r[i].host + off;
}

int rc_mem_uva_to_gpa(const struct rc_memmap *m, uint64_t uva, uint64_t *gpa)
{
    for (int i = 0; i < m->n; i++) {
        const struct rc_region *r = &m->r[i];
        if (uva >= r->uva && uva - r->uva < r->size) {
            *gpa = r->gpa + (uva - r->uva);
            return i;
        }
    }
    return -RC_E_NO_REGION;
}

/* ------------------------------------------------------------------ chains */

void rc_chain_init(struct rc_chain *c)
{
    memset(c, 0, sizeof(*c));
}

void rc_chain_free(struct rc_chain *c)
{
    free(c->layout);
    free(c->seg);
    rc_chain_init(c);
}

static int chain_add_layout(struct rc_chain *c, uint64_t addr, uint32_t len, uint16_t flags)
{
    if (c->nlayout == c->cap_layout) {
        uint32_t ncap = c->cap_layout ? c->cap_layout * 2 : 8;
        void *p = realloc(c->layout, (size_t)ncap * sizeof(*c->layout));
        if (!p)
            return RC_E_NOMEM;
        c->layout = p;
        c->cap_layout = ncap;
    }
    struct rc_layout *l = &c->layout[c->nlayout++];
    l->addr = addr;
    l->len = len;
    l->flags = flags;
    l->pad = 0;
    return RC_OK;
}

static int chain_add_seg(struct rc_chain *c, uint8_t *host, uint32_t len, int write, int region)
{
    if (c->nseg == c->cap_seg) {
        uint32_t ncap = c->cap_seg ? c->cap_seg * 2 : 8;
        void *p = realloc(c->seg, (size_t)ncap * sizeof(*c->seg));
        if (!p)
            return RC_E_NOMEM;
        c->seg = p;
        c->cap_seg = ncap;
    }
    struct rc_seg *s = &c->seg[c->nseg++];
    s->host = host;
    s->len = len;
    s->write = (uint16_t)write;
    s->region = (uint16_t)region;
    return RC_OK;
}

/* Map [addr, addr+len) into segments; a buffer may span regions that are adjacent in GPA space. */
static int chain_map(struct rc_chain *c, struct rc_memmap *m, uint64_t addr, uint32_t len, int write)
{
    if (addr + len < addr)
        return RC_E_OVERFLOW;
    uint64_t left = len;
    while (left) {
        uint64_t off;
        int r = rc_mem_find(m, addr, 1, &off);
        if (r < 0)
            return -r;
        uint64_t chunk = m->r[r].size - off;
        if (chunk > left)
            chunk = left;
        int e = chain_add_seg(c, m->r[r].host + off, (uint32_t)chunk, write, r);
        if (e)
            return e;
        addr += chunk;
        left -= chunk;
    }
    if (write)
        c->writable_len += len;
    else
        c->readable_len += len;
    return RC_OK;
}

int rc_walk_chain(struct rc_memmap *m, const uint8_t *desc, uint16_t num, uint16_t head, struct rc_chain *c)
{
    c->head = head;
    c->nlayout = c->nseg = 0;
    c->readable_len = c->writable_len = 0;
    c->err = RC_OK;
    int err = RC_OK;
    if (head >= num) {
        err = RC_E_HEAD_RANGE;
        goto out;
    }
    const uint8_t *table = desc;
    uint32_t tlen = num, count = 0, idx = head;
    int indirect = 0, seen_write = 0;
    for (;;) {
        if (idx >= tlen) {
            err = RC_E_NEXT_RANGE;
            break;
        }
        if (++count > tlen) {
            err = RC_E_CHAIN_LOOP;
            break;
        }
        struct rc_vring_desc d;
        memcpy(&d, table + (size_t)idx * sizeof(d), sizeof(d));
        if (d.flags & RC_VRING_DESC_F_INDIRECT) {
            if (indirect) {
                err = RC_E_NESTED_INDIRECT;
                break;
            }
            if ((err = chain_add_layout(c, d.addr, d.len, d.flags)))
                break;
            if (d.flags & RC_VRING_DESC_F_NEXT) {
                err = RC_E_INDIRECT_NEXT;
                break;
            }
            if (d.len == 0 || d.len % sizeof(d) || d.len / sizeof(d) > RC_MAX_QUEUE_SIZE) {
                err = RC_E_INDIRECT_LEN;
                break;
            }
            const uint8_t *t = rc_mem_ptr(m, d.addr, d.len, &err);
            if (!t)
                break;
            table = t;
            tlen = d.len / sizeof(d);
            indirect = 1;
            count = 0;
            idx = 0;
            continue;
        }
        uint16_t lflags = (uint16_t)(d.flags | (indirect ? RC_LAYOUT_F_FROM_INDIRECT : 0));
        if ((err = chain_add_layout(c, d.addr, d.len, lflags)))
            break;
        int write = (d.flags & RC_VRING_DESC_F_WRITE) != 0;
        if (!write && seen_write) {
            err = RC_E_READ_AFTER_WRITE;
            break;
        }
        seen_write |= write;
        if ((err = chain_map(c, m, d.addr, d.len, write)))
            break;
        if (c->readable_len > RC_MAX_GATHER) {
            err = RC_E_TOO_LARGE;
            break;
        }
        if (!(d.flags & RC_VRING_DESC_F_NEXT))
            break;
        idx = d.next;
    }
out:
    c->err = err;
    return err;
}

uint64_t rc_chain_gather(const struct rc_chain *c, uint8_t *dst, uint64_t max)
{
    uint64_t n = 0;
    for (uint32_t i = 0; i < c->nseg && n < max; i++) {
        const struct rc_seg *s = &c->seg[i];
        if (s->write)
            continue;
        uint64_t k = s->len < max - n ? s->len : max - n;
        memcpy(dst + n, s->host, k);
        n += k;
    }
    return n;
}

uint64_t rc_chain_gather_writable(const struct rc_chain *c, uint8_t *dst, uint64_t max)
{
    uint64_t n = 0;
    for (uint32_t i = 0; i < c->nseg && n < max; i++) {
        const struct rc_seg *s = &c->seg[i];
        if (!s->write)
            continue;
        uint64_t k = s->len < max - n ? s->len : max - n;
        memcpy(dst + n, s->host, k);
        n += k;
    }
    return n;
}

/* ------------------------------------------------------------------ split queue */

uint16_t rc_ring_load_idx(const uint8_t *ring)
{
    return __atomic_load_n((const uint16_t *)(ring + 2), __ATOMIC_ACQUIRE);
}

void rc_ring_store_idx(uint8_t *ring, uint16_t idx)
{
    __atomic_store_n((uint16_t *)(ring + 2), idx, __ATOMIC_RELEASE);
}

static inline uint16_t avail_entry(const uint8_t *avail, uint16_t num, uint16_t i)
{
    uint16_t h;
    memcpy(&h, avail + RC_VRING_AVAIL_RING_OFF + 2u * (uint32_t)(i & (num - 1)), 2);
    return h;
}

static int ring_ptrs(struct rc_memmap *m, uint32_t num, uint64_t desc_gpa, uint64_t avail_gpa,
                     uint64_t used_gpa, uint8_t **desc, uint8_t **avail, uint8_t **used)
{
    if (num == 0 || num > RC_MAX_QUEUE_SIZE || (num & (num - 1)))
        return RC_E_BAD_QUEUE;
    /* virtio 1.2 2.7: alignment 16 / 2 / 4; we need it for the atomic 16-bit index accesses */
    if ((desc_gpa & 15) || (avail_gpa & 1) || (used_gpa & 3))
        return RC_E_BAD_QUEUE;
    int err;
    if (!(*desc = rc_mem_ptr(m, desc_gpa, 16ull * num, &err)))
        return err;
    if (!(*avail = rc_mem_ptr(m, avail_gpa, 4ull + 2ull * num + 2, &err)))
        return err;
    if (!(*used = rc_mem_ptr(m, used_gpa, 4ull + 8ull * num + 2, &err)))
        return err;
    if (((uintptr_t)*avail & 1) || ((uintptr_t)*used & 3))
        return RC_E_BAD_QUEUE;
    return RC_OK;
}

int rc_queue_init(struct rc_queue *q, struct rc_memmap *m, uint32_t num, uint64_t desc_gpa,
                  uint64_t avail_gpa, uint64_t used_gpa)
{
    memset(q, 0, sizeof(*q));
    int err = ring_ptrs(m, num, desc_gpa, avail_gpa, used_gpa, &q->desc, &q->avail, &q->used);
    if (err)
        return err;
    q->mem = m;
    q->num = (uint16_t)num;
    q->desc_gpa = desc_gpa;
    q->avail_gpa = avail_gpa;
    q->used_gpa = used_gpa;
    return RC_OK;
}

int rc_queue_avail(struct rc_queue *q)
{
    uint16_t n = (uint16_t)(rc_ring_load_idx(q->avail) - q->last_avail_idx);
    if (n > q->num)
        return -RC_E_AVAIL_AHEAD;
    return n;
}

int rc_queue_pop(struct rc_queue *q, struct rc_chain *c)
{
    uint16_t head = avail_entry(q->avail, q->num, q->last_avail_idx);
    q->last_avail_idx++;
    return rc_walk_chain(q->mem, q->desc, q->num, head, c);
}

int rc_queue_push_used(struct rc_queue *q, const struct rc_vring_used_elem *e, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        if (e[i].id >= q->num)
            return RC_E_HEAD_RANGE;
    uint16_t idx = q->used_idx;
    for (uint32_t i = 0; i < n; i++, idx++)
        memcpy(q->used + RC_VRING_USED_RING_OFF + 8u * (uint32_t)(idx & (q->num - 1)), &e[i], 8);
    q->used_idx = idx;
    rc_ring_store_idx(q->used, idx);
    return RC_OK;
}

/* ------------------------------------------------------------------ capture buffer */

int rc_capture_init(struct rc_capture *c, uint64_t capacity, int policy)
{
    memset(c, 0, sizeof(*c));
    capacity &= ~7ull;
    if (capacity < 4096)
        capacity = 4096;
    c->buf = malloc(capacity);
    if (!c->buf)
        return RC_E_NOMEM;
    c->cap = capacity;
    c->policy = policy;
    c->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->notify_fd < 0) {
        free(c->buf);
        return RC_E_NOMEM;
    }
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->space, NULL);
    return RC_OK;
}

void rc_capture_destroy(struct rc_capture *c)
{
    if (!c->buf)
        return;
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->space);
    if (c->notify_fd >= 0)
        close(c->notify_fd);
    free(c->buf);
    c->buf = NULL;
}

/* Bytes needed at position head for a record of len bytes, including a pad record on wrap. */
static inline uint64_t cap_need(const struct rc_capture *c, uint64_t len)
{
    uint64_t off = c->head % c->cap, end = c->cap - off;
    return len <= end ? len : end + len;
}

uint8_t *rc_capture_reserve(struct rc_capture *c, uint32_t len, int may_wait, int *stop,
                            uint64_t *stalls, int count_drop)
{
    pthread_mutex_lock(&c->lock);
    int waited = 0;
    for (;;) {
        uint64_t free_b = c->cap - (c->head - __atomic_load_n(&c->tail, __ATOMIC_ACQUIRE));
        if (cap_need(c, len) <= free_b)
            break;
        if (c->policy != RC_POLICY_LOSSLESS || !may_wait || (stop && __atomic_load_n(stop, __ATOMIC_ACQUIRE)) || c->closing) {
            if (count_drop) {
                c->dropped++;
                c->dropped_bytes += len;
            }
            pthread_mutex_unlock(&c->lock);
            return NULL;
        }
        if (!waited) {
            waited = 1;
            c->stalls++;
            if (stalls)
                (*stalls)++;
        }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 50 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&c->space, &c->lock, &ts);
    }
    uint64_t off = c->head % c->cap;
    if (len > c->cap - off) { /* pad to the end, start at 0 */
        struct rc_cap_hdr pad;
        memset(&pad, 0, sizeof(pad));
        pad.rec_len = (uint32_t)(c->cap - off);
        pad.kind = RC_CAP_PAD;
        memcpy(c->buf + off, &pad, 8); /* only rec_len+kind are read for a pad; at least 8 bytes fit */
        /* release: the consumer may follow head past the pad before the record is committed */
        __atomic_store_n(&c->head, c->head + (c->cap - off), __ATOMIC_RELEASE);
        off = 0;
    }
    return c->buf + off; /* lock stays held until rc_capture_commit */
}

void rc_capture_commit(struct rc_capture *c)
{
    const struct rc_cap_hdr *h = (const struct rc_cap_hdr *)(c->buf + c->head % c->cap);
    __atomic_store_n(&c->head, c->head + h->rec_len, __ATOMIC_RELEASE);
    c->captured++;
    pthread_mutex_unlock(&c->lock);
}

/* No lock here: a producer must never wait behind the consumer (a descheduled lock holder would stall
 * the guest's path).  rc_capture_close runs once no producer is left (the proxy closes its paths first). */
void rc_capture_notify(struct rc_capture *c)
{
    int fd = __atomic_load_n(&c->notify_fd, __ATOMIC_ACQUIRE);
    if (fd >= 0) {
        uint64_t one = 1;
        ssize_t r = write(fd, &one, sizeof(one));
        (void)r;
    }
}

void rc_capture_close(struct rc_capture *c)
{
    int fd = __atomic_exchange_n(&c->notify_fd, -1, __ATOMIC_ACQ_REL);
    if (fd >= 0)
        close(fd);
}

const struct rc_cap_hdr *rc_capture_peek(struct rc_capture *c, uint64_t *pos)
{
    for (;;) {
        uint64_t head = __atomic_load_n(&c->head, __ATOMIC_ACQUIRE);
        if (*pos >= head)
            return NULL;
        const struct rc_cap_hdr *h = (const struct rc_cap_hdr *)(c->buf + *pos % c->cap);
        if (h->kind == RC_CAP_PAD) {
            *pos += h->rec_len;
            continue;
        }
        return h;
    }
}

void rc_capture_release(struct rc_capture *c, uint64_t upto)
{
    pthread_mutex_lock(&c->lock);
    __atomic_store_n(&c->tail, upto, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&c->space);
    pthread_mutex_unlock(&c->lock);
}

void rc_capture_wake_all(struct rc_capture *c)
{
    pthread_mutex_lock(&c->lock);
    pthread_cond_broadcast(&c->space);
    pthread_mutex_unlock(&c->lock);
}

uint64_t rc_capture_used_bytes(struct rc_capture *c)
{
    return __atomic_load_n(&c->head, __ATOMIC_ACQUIRE) - __atomic_load_n(&c->tail, __ATOMIC_ACQUIRE);
}

/* ------------------------------------------------------------------ shadow path */

static inline int path_stopping(struct rc_path *p)
{
    return __atomic_load_n(&p->stop, __ATOMIC_ACQUIRE);
}

static int dup_or_none(int fd)
{
    return fd < 0 ? -1 : fcntl(fd, F_DUPFD_CLOEXEC, 0);
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static void signal_fd(int fd)
{
    if (fd < 0)
        return;
    uint64_t one = 1;
    ssize_t r = write(fd, &one, sizeof(one));
    (void)r;
}

/* Wake the path's thread.  Under fd_lock: rc_path_close closes ctl_fd under it, so a verdict or a rule
 * change from another thread never writes to a number that was closed (and maybe reused) meanwhile. */
static void path_wake(struct rc_path *p)
{
    pthread_mutex_lock(&p->fd_lock);
    signal_fd(p->ctl_fd);
    pthread_mutex_unlock(&p->fd_lock);
}

static void drain_fd(int fd)
{
    uint64_t v;
    ssize_t r = read(fd, &v, sizeof(v));
    (void)r;
}

int rc_path_init(struct rc_path *p, struct rc_memmap *m, uint16_t queue_index, uint32_t num,
                 uint64_t desc_gpa, uint64_t g_avail_gpa, uint64_t g_used_gpa, uint64_t s_avail_gpa,
                 uint64_t s_used_gpa, struct rc_capture *cap, int kick_fd, int call_fd,
                 int backend_kick_fd, int backend_call_fd, uint16_t avail_base, uint32_t snaplen,
                 uint32_t spin_us)
{
    memset(p, 0, sizeof(*p));
    p->spin_ns = (uint64_t)spin_us * 1000u;
    p->kick_fd = p->call_fd = p->backend_kick_fd = p->backend_call_fd = p->ctl_fd = -1;
    int err = ring_ptrs(m, num, desc_gpa, g_avail_gpa, g_used_gpa, &p->desc, &p->g_avail, &p->g_used);
    if (err)
        return err;
    uint8_t *unused;
    err = ring_ptrs(m, num, desc_gpa, s_avail_gpa, s_used_gpa, &unused, &p->s_avail, &p->s_used);
    if (err)
        return err;
    p->inflight = calloc(num, 1);
    p->slot = calloc(num, sizeof(*p->slot));
    p->scratch = NULL;
    if (!p->inflight || !p->slot) {
        free(p->inflight);
        free(p->slot);
        p->inflight = NULL;
        p->slot = NULL;
        return RC_E_NOMEM;
    }
    p->vq_tail = &p->vq;
    p->mem = m;
    p->queue_index = queue_index;
    p->num = (uint16_t)num;
    p->cap = cap;
    p->snaplen = snaplen;
    /* Shadow indices start where the backend and the guest are (proxy-notes: initialise before
     * forwarding SET_VRING_ADDR / SET_VRING_BASE). */
    p->next_avail = avail_base;
    p->s_avail_idx = avail_base;
    rc_ring_store_idx(p->s_avail, avail_base);
    memset(p->s_avail, 0, 2); /* shadow avail flags stay 0: the backend always calls */
    p->g_used_idx = rc_ring_load_idx(p->g_used);
    p->next_used = p->g_used_idx;
    rc_ring_store_idx(p->s_used, p->g_used_idx);
    p->kick_fd = dup_or_none(kick_fd);
    p->call_fd = dup_or_none(call_fd);
    p->backend_kick_fd = dup_or_none(backend_kick_fd);
    p->backend_call_fd = dup_or_none(backend_call_fd);
    p->ctl_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    p->pending_kick_fd = -2;
    p->pending_call_fd = -2;
    rc_chain_init(&p->chain);
    pthread_mutex_init(&p->proc_lock, NULL);
    pthread_mutex_init(&p->fd_lock, NULL);
    pthread_mutex_init(&p->hold_lock, NULL);
    p->inited = 1;
    if (p->ctl_fd < 0 || (kick_fd >= 0 && p->kick_fd < 0) || (call_fd >= 0 && p->call_fd < 0) ||
        (backend_kick_fd >= 0 && p->backend_kick_fd < 0) || (backend_call_fd >= 0 && p->backend_call_fd < 0)) {
        rc_path_destroy(p);
        return RC_E_NOMEM;
    }
    return RC_OK;
}

/* Write one capture record for the chain in p->chain.  Returns 0, 1 when it was dropped (no room), or
 * -1 when lossless waiting was interrupted by stop (the caller must not forward the entry). */
static int path_capture(struct rc_path *p, int kind, uint16_t head, int reason, uint32_t orig_len,
                        int writable, int may_wait, int *flushed, void (*flush)(struct rc_path *), uint32_t xflags)
{
    const struct rc_chain *c = &p->chain;
    uint64_t avail_bytes = writable ? (orig_len < c->writable_len ? orig_len : c->writable_len)
                                    : c->readable_len;
    if (kind == RC_CAP_ERROR)
        avail_bytes = 0;
    uint64_t data_len = avail_bytes;
    uint32_t flags = xflags;
    if (p->snaplen && data_len > p->snaplen)
        data_len = p->snaplen, flags |= RC_CAP_F_TRUNCATED;
    uint64_t fixed = sizeof(struct rc_cap_hdr) + (uint64_t)c->nlayout * sizeof(struct rc_layout);
    uint64_t max_rec = p->cap->cap / 2;
    uint32_t nlayout = c->nlayout;
    if (fixed > max_rec) {
        nlayout = (uint32_t)((max_rec - sizeof(struct rc_cap_hdr)) / sizeof(struct rc_layout) / 2);
        fixed = sizeof(struct rc_cap_hdr) + (uint64_t)nlayout * sizeof(struct rc_layout);
        flags |= RC_CAP_F_TRUNCATED;
    }
    if (fixed + data_len > max_rec)
        data_len = max_rec - fixed, flags |= RC_CAP_F_TRUNCATED;
    if (kind == RC_CAP_REPLY && orig_len > c->writable_len)
        flags |= RC_CAP_F_TRUNCATED; /* the backend claims more than the chain can hold */
    uint32_t rec_len = (uint32_t)((fixed + data_len + 7) & ~7ull);
    uint8_t *dst;
    if (p->cap->policy == RC_POLICY_LOSSLESS && may_wait) {
        dst = rc_capture_reserve(p->cap, rec_len, 0, &p->stop, NULL, 0);
        if (!dst) {
            /* publish what is already forwarded, wake the consumer, then hold this entry back */
            if (flush && !*flushed) {
                flush(p);
                *flushed = 1;
            }
            rc_capture_notify(p->cap);
            dst = rc_capture_reserve(p->cap, rec_len, 1, &p->stop, &p->ctr.stalls, 1);
            if (!dst && path_stopping(p))
                return -1;
        }
    } else {
        dst = rc_capture_reserve(p->cap, rec_len, 0, &p->stop, NULL, 1);
    }
    if (!dst) {
        p->ctr.dropped++;
        return 1;
    }
    struct rc_cap_hdr h;
    memset(&h, 0, sizeof(h));
    h.rec_len = rec_len;
    h.kind = (uint16_t)kind;
    h.queue = p->queue_index;
    h.ts_ns = rc_now_ns();
    h.head = head;
    h.reason = (uint16_t)reason;
    h.flags = flags;
    h.nlayout = nlayout;
    h.orig_len = orig_len;
    h.data_len = (uint32_t)data_len;
    memcpy(dst, &h, sizeof(h));
    if (nlayout)
        memcpy(dst + sizeof(h), c->layout, (size_t)nlayout * sizeof(struct rc_layout));
    uint8_t *data = dst + fixed;
    if (writable)
        rc_chain_gather_writable(c, data, data_len);
    else
        rc_chain_gather(c, data, data_len);
    rc_capture_commit(p->cap);
    p->need_notify = 1;
    return 0;
}

static void path_notify(struct rc_path *p)
{
    if (p->need_notify) {
        p->need_notify = 0;
        rc_capture_notify(p->cap);
    }
}

/* EVENT_IDX fields (virtio 1.2 2.7.7, 2.7.10): used_event follows the avail ring, avail_event the
 * used ring.  The ring pointers were bounds-checked with room for them. */
static inline uint8_t *used_event_of(uint8_t *avail, uint16_t num) { return avail + RC_VRING_AVAIL_RING_OFF + 2u * num; }
static inline uint8_t *avail_event_of(uint8_t *used, uint16_t num) { return used + RC_VRING_USED_RING_OFF + 8u * num; }

/* Sequentially consistent 16-bit accesses: an index store followed by an event load (and an event
 * store followed by an index load) must not be reordered, or a notification is lost.  (Not a fence:
 * ThreadSanitizer, which tests/ring_threads.c runs under, does not model fences.) */
static inline uint16_t ev_load(const uint8_t *at)
{
    return __atomic_load_n((const uint16_t *)(const void *)at, __ATOMIC_SEQ_CST);
}

static inline void ev_store(uint8_t *at, uint16_t v)
{
    __atomic_store_n((uint16_t *)(void *)at, v, __ATOMIC_SEQ_CST);
}

/* vring_need_event(): did the index move past what the other side asked to be told about? */
static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

int rc_queue_publish(struct rc_queue *q, const struct rc_vring_used_elem *e, uint32_t n, int *call)
{
    *call = 0;
    if (n == 0)
        return RC_OK;
    int err = rc_queue_push_used(q, e, n);
    if (err)
        return err;
    ev_store(q->used + 2, q->used_idx); /* again, seq-cst: ordered before the flags/used_event load */
    if (q->event_idx) {
        /* libvhost-user's vu_should_notify(): the first publication always calls */
        int valid = q->signalled_valid;
        uint16_t from = q->signalled_used;
        q->signalled_used = q->used_idx;
        q->signalled_valid = 1;
        *call = !valid || need_event(ev_load(used_event_of(q->avail, q->num)), q->used_idx, from);
    } else {
        *call = !(ev_load(q->avail) & RC_VRING_AVAIL_F_NO_INTERRUPT);
    }
    return RC_OK;
}

void rc_queue_want_kick(struct rc_queue *q)
{
    if (q->event_idx) {
        ev_store(avail_event_of(q->used, q->num), q->last_avail_idx);
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the store before the caller's avail->idx load */
    }
}

void rc_path_set_event_idx(struct rc_path *p, int on)
{
    p->event_idx = on ? 1 : 0;
    p->signalled_valid = 0;
    p->kicked_avail = p->s_avail_idx;
    if (p->event_idx) {
        ev_store(avail_event_of(p->g_used, p->num), p->next_avail);
        ev_store(used_event_of(p->s_avail, p->num), p->next_used);
    }
}

static void flush_avail(struct rc_path *p)
{
    if (p->event_idx) {
        ev_store(p->s_avail + 2, p->s_avail_idx); /* the index before the backend's avail_event */
        uint16_t old = p->kicked_avail;
        p->kicked_avail = p->s_avail_idx;
        if (!need_event(ev_load(avail_event_of(p->s_used, p->num)), p->s_avail_idx, old)) {
            p->ctr.kicks_suppressed++;
            return;
        }
    } else {
        rc_ring_store_idx(p->s_avail, p->s_avail_idx);
    }
    signal_fd(p->backend_kick_fd);
    p->ctr.kicks_out++;
}

static void flush_used(struct rc_path *p)
{
    if (p->event_idx) {
        ev_store(p->g_used + 2, p->g_used_idx); /* the index before the guest's used_event */
        int valid = p->signalled_valid;
        uint16_t old = p->signalled_used;
        p->signalled_used = p->g_used_idx;
        p->signalled_valid = 1;
        if (valid && !need_event(ev_load(used_event_of(p->g_avail, p->num)), p->g_used_idx, old)) {
            p->ctr.calls_suppressed++;
            return;
        }
    } else {
        rc_ring_store_idx(p->g_used, p->g_used_idx);
    }
    pthread_mutex_lock(&p->fd_lock);
    signal_fd(p->call_fd);
    pthread_mutex_unlock(&p->fd_lock);
    p->ctr.calls_out++;
}

/* ---- hold points */

struct rc_hold_table *rc_hold_table_new(uint32_t nrules, uint32_t total_ops)
{
    size_t sz = sizeof(struct rc_hold_table) + (size_t)nrules * sizeof(struct rc_hold_rule) +
                (size_t)total_ops * sizeof(uint32_t);
    struct rc_hold_table *t = calloc(1, sz);
    if (!t)
        return NULL;
    t->refs = 1;
    t->n = nrules;
    t->r = (struct rc_hold_rule *)(t + 1);
    uint32_t *ops = (uint32_t *)(t->r + nrules);
    for (uint32_t i = 0; i < nrules; i++)
        t->r[i].ops = ops; /* the caller sets nops and advances its own cursor; see rc_hold_table_fill */
    return t;
}

void rc_hold_table_unref(struct rc_hold_table *t)
{
    if (t && __atomic_sub_fetch(&t->refs, 1, __ATOMIC_ACQ_REL) == 0)
        free(t);
}

int rc_hold_match(const struct rc_hold_table *t, uint32_t direction, uint16_t queue, uint32_t op)
{
    for (uint32_t i = 0; i < t->n; i++) {
        const struct rc_hold_rule *r = &t->r[i];
        if (!(r->direction & direction))
            continue;
        if (r->queues && (queue >= 64 || !((r->queues >> queue) & 1)))
            continue;
        if (!r->nops)
            return 1;
        for (uint32_t k = 0; k < r->nops; k++)
            if (r->ops[k] == op)
                return 1;
    }
    return 0;
}

void rc_path_set_hold_rules(struct rc_path *p, struct rc_hold_table *t)
{
    if (t && t->n == 0) {
        rc_hold_table_unref(t);
        t = NULL;
    }
    pthread_mutex_lock(&p->hold_lock);
    struct rc_hold_table *old = p->rules;
    __atomic_store_n(&p->rules, t, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&p->hold_lock);
    rc_hold_table_unref(old);
    path_wake(p);
}

/* Under proc_lock: take a reference to the table published last.  Requests forwarded while no rules
 * were set have no recorded opcode: when rules appear, every head's opcode starts out unknown. */
static void refresh_rules(struct rc_path *p)
{
    if (__atomic_load_n(&p->rules, __ATOMIC_ACQUIRE) == p->rules_seen)
        return;
    pthread_mutex_lock(&p->hold_lock);
    struct rc_hold_table *t = p->rules;
    if (t)
        __atomic_add_fetch(&t->refs, 1, __ATOMIC_ACQ_REL);
    pthread_mutex_unlock(&p->hold_lock);
    if (t && !p->rules_seen)
        for (uint32_t i = 0; i < p->num; i++)
            p->slot[i].op = RC_OP_UNKNOWN;
    rc_hold_table_unref(p->rules_seen);
    p->rules_seen = t;
}

/* The opcode of the request in p->chain (fuse_in_header.opcode), or RC_OP_UNKNOWN if it is shorter
 * than a fuse_in_header. */
static uint32_t chain_opcode(const struct rc_chain *c)
{
    if (c->readable_len < RC_FUSE_IN_HEADER_LEN)
        return RC_OP_UNKNOWN;
    uint8_t h[RC_FUSE_IN_OPCODE_OFF + 4];
    rc_chain_gather(c, h, sizeof(h));
    uint32_t op;
    memcpy(&op, h + RC_FUSE_IN_OPCODE_OFF, 4);
    return op;
}

/* Not held already (a head the guest re-posts while it is held is forwarded, never held twice). */
static int slot_free(struct rc_path *p, uint16_t head)
{
    pthread_mutex_lock(&p->hold_lock);
    int free_ = p->slot[head].state == RC_HS_NONE;
    pthread_mutex_unlock(&p->hold_lock);
    return free_;
}

/* Mark a head held before its capture is committed: the consumer may give a verdict as soon as it
 * sees the capture. */
static void hold_slot(struct rc_path *p, uint16_t head, uint8_t state, uint32_t used_len)
{
    pthread_mutex_lock(&p->hold_lock);
    p->slot[head].state = state;
    p->slot[head].used_len = used_len;
    p->slot[head].wlen = p->chain.writable_len > UINT32_MAX ? UINT32_MAX : (uint32_t)p->chain.writable_len;
    p->nheld++;
    pthread_mutex_unlock(&p->hold_lock);
}

/* The held capture was not recorded (dropped, or a lossless wait cut short by stop): nobody would know
 * it is held, so it is not.  Returns 0 if a verdict (given from held()) got there first: still held. */
static int unhold_slot(struct rc_path *p, uint16_t head)
{
    pthread_mutex_lock(&p->hold_lock);
    int undone = !(p->slot[head].state & RC_HS_PENDING);
    if (undone) {
        p->slot[head].state = RC_HS_NONE;
        p->nheld--;
    }
    pthread_mutex_unlock(&p->hold_lock);
    return undone;
}

/* After path_capture() of a held entry: 1 if it stays held. */
static int hold_kept(struct rc_path *p, uint16_t head, int r)
{
    if (r != 0 && unhold_slot(p, head))
        return 0;
    p->ctr.holds++;
    return 1;
}

static void publish_used(struct rc_path *p, uint16_t head, uint32_t len)
{
    struct rc_vring_used_elem e = {head, len};
    memcpy(p->g_used + RC_VRING_USED_RING_OFF + 8u * (uint32_t)(p->g_used_idx & (p->num - 1)), &e, 8);
    p->g_used_idx++;
}

/* Scatter len bytes into p->chain's writable segments; returns how many fitted. */
static uint32_t chain_scatter(struct rc_chain *c, const uint8_t *data, uint32_t len)
{
    uint32_t done = 0;
    for (uint32_t i = 0; i < c->nseg && done < len; i++) {
        struct rc_seg *s = &c->seg[i];
        if (!s->write)
            continue;
        uint32_t k = s->len < len - done ? s->len : len - done;
        memcpy(s->host, data + done, k);
        done += k;
    }
    return done;
}

/* Apply one verdict (under proc_lock; the slot is already cleared).  stopping: the back-end takes no
 * more requests, so a released request is answered EIO.  Counts what it forwarded/published. */
static void apply_verdict(struct rc_path *p, const struct rc_verdict *v, int stopping, int may_wait, int *fwd,
                          int *pub)
{
    int flushed = 0, kind = v->kind;
    uint16_t head = v->head;
    if (kind == RC_V_RELEASE && v->dir == RC_HS_REQUEST) {
        if (!stopping) {
            p->inflight[head] = 1;
            uint16_t slot = (uint16_t)(p->s_avail_idx & (p->num - 1));
            memcpy(p->s_avail + RC_VRING_AVAIL_RING_OFF + 2u * slot, &head, 2);
            p->s_avail_idx++;
            p->ctr.released++;
            (*fwd)++;
            return;
        }
        kind = RC_V_EIO;
    }
    int err = rc_walk_chain(p->mem, p->desc, p->num, head, &p->chain);
    if (kind == RC_V_EIO && !err && p->chain.writable_len == 0)
        kind = RC_V_DROP; /* FORGET, BATCH_FORGET: no reply to give */
    uint32_t len = kind == RC_V_RELEASE ? v->used_len : 0, flags = RC_CAP_F_ANSWERED;
    if (err) { /* the guest rewrote an outstanding chain: complete it empty, flagged */
        p->ctr.errors++;
        p->last_error = err;
    } else if (kind == RC_V_RELEASE) {
        flags = RC_CAP_F_RELEASED;
    } else if (kind == RC_V_EIO) {
        uint8_t h[RC_FUSE_OUT_HEADER_LEN];
        uint8_t in[RC_FUSE_IN_UNIQUE_OFF + 8];
        memset(in, 0, sizeof(in));
        rc_chain_gather(&p->chain, in, sizeof(in));
        uint32_t olen = RC_FUSE_OUT_HEADER_LEN;
        int32_t error = -RC_FUSE_EIO;
        memcpy(h, &olen, 4);
        memcpy(h + 4, &error, 4);
        memcpy(h + 8, in + RC_FUSE_IN_UNIQUE_OFF, 8); /* unique, from the request's own header */
        len = chain_scatter(&p->chain, h, sizeof(h));
    } else if (kind != RC_V_DROP) {
        len = chain_scatter(&p->chain, v->data, v->len);
        if (kind == RC_V_REWRITE)
            flags = RC_CAP_F_REWRITTEN;
    }
    switch (kind) {
    case RC_V_RELEASE: p->ctr.released++; break;
    case RC_V_REWRITE: p->ctr.rewritten++; break;
    case RC_V_DROP: p->ctr.hold_drops++; break;
    default: p->ctr.answered++; break;
    }
    if (err)
        path_capture(p, RC_CAP_ERROR, head, err, len, 1, may_wait, &flushed, flush_used, 0);
    else
        path_capture(p, RC_CAP_REPLY, head, 0, len, 1, may_wait, &flushed, flush_used, flags);
    publish_used(p, head, len);
    (*pub)++;
}

static void finish_verdicts(struct rc_path *p, int fwd, int pub)
{
    if (fwd)
        flush_avail(p);
    if (pub)
        flush_used(p);
    path_notify(p);
}

/* The thread's side: apply what verdict callers queued (under proc_lock). */
static void apply_queued(struct rc_path *p, int stopping, int may_wait)
{
    if (!__atomic_load_n(&p->vq_n, __ATOMIC_ACQUIRE))
        return;
    pthread_mutex_lock(&p->hold_lock);
    struct rc_verdict *v = p->vq;
    p->vq = NULL;
    p->vq_tail = &p->vq;
    __atomic_store_n(&p->vq_n, 0, __ATOMIC_RELEASE);
    for (struct rc_verdict *x = v; x; x = x->next)
        p->slot[x->head].state = RC_HS_NONE;
    pthread_mutex_unlock(&p->hold_lock);
    int fwd = 0, pub = 0;
    while (v) {
        struct rc_verdict *next = v->next;
        apply_verdict(p, v, stopping, may_wait, &fwd, &pub);
        free(v);
        v = next;
    }
    finish_verdicts(p, fwd, pub);
}

static int verdict_check(struct rc_path *p, uint16_t head, int kind, uint32_t len)
{
    const struct rc_held_slot *s = &p->slot[head];
    if (s->state != RC_HS_REQUEST && s->state != RC_HS_REPLY)
        return RC_E_NOT_HELD;
    switch (kind) {
    case RC_V_RELEASE:
        return RC_OK;
    case RC_V_ANSWER:
    case RC_V_REWRITE:
        if (s->state != (kind == RC_V_ANSWER ? RC_HS_REQUEST : RC_HS_REPLY))
            return RC_E_WRONG_DIRECTION;
        return len > s->wlen ? RC_E_NO_ROOM : RC_OK;
    case RC_V_DROP:
        if (s->state != RC_HS_REQUEST)
            return RC_E_WRONG_DIRECTION;
        return s->wlen ? RC_E_NEEDS_REPLY : RC_OK;
    default:
        return RC_E_NOT_HELD;
    }
}

int rc_path_verdict(struct rc_path *p, uint16_t head, int kind, const uint8_t *data, uint32_t len)
{
    if (head >= p->num)
        return RC_E_NOT_HELD;
    int locked_proc = 0, err;
    for (;;) {
        pthread_mutex_lock(&p->hold_lock);
        err = verdict_check(p, head, kind, len);
        if (err || p->async_verdicts || locked_proc)
            break;
        /* a stopped path: apply it here, under proc_lock (taken before hold_lock, as everywhere) */
        pthread_mutex_unlock(&p->hold_lock);
        pthread_mutex_lock(&p->proc_lock);
        locked_proc = 1;
    }
    struct rc_verdict *v = NULL;
    if (!err) {
        v = malloc(sizeof(*v) + (kind == RC_V_ANSWER || kind == RC_V_REWRITE ? len : 0));
        if (!v) {
            err = RC_E_NOMEM;
        } else {
            struct rc_held_slot *s = &p->slot[head];
            v->next = NULL;
            v->head = head;
            v->kind = (uint8_t)kind;
            v->dir = s->state;
            v->used_len = s->used_len;
            v->len = kind == RC_V_ANSWER || kind == RC_V_REWRITE ? len : 0;
            if (v->len)
                memcpy(v->data, data, len);
            p->nheld--;
            if (p->async_verdicts) {
                s->state = RC_HS_PENDING | s->state;
                *p->vq_tail = v;
                p->vq_tail = &v->next;
                __atomic_add_fetch(&p->vq_n, 1, __ATOMIC_ACQ_REL);
                pthread_mutex_unlock(&p->hold_lock);
                if (locked_proc)
                    pthread_mutex_unlock(&p->proc_lock);
                path_wake(p);
                return RC_OK;
            }
            s->state = RC_HS_NONE;
        }
    }
    pthread_mutex_unlock(&p->hold_lock);
    if (v) {
        int fwd = 0, pub = 0;
        apply_verdict(p, v, 0, 0, &fwd, &pub);
        finish_verdicts(p, fwd, pub);
        free(v);
    }
    if (locked_proc)
        pthread_mutex_unlock(&p->proc_lock);
    return err;
}

uint32_t rc_path_held(struct rc_path *p, uint32_t *out, uint32_t max)
{
    uint32_t n = 0;
    pthread_mutex_lock(&p->hold_lock);
    for (uint32_t h = 0; h < p->num; h++) {
        uint8_t st = p->slot[h].state;
        if (st == RC_HS_REQUEST || st == RC_HS_REPLY) {
            if (n < max)
                out[n] = h | (uint32_t)(st == RC_HS_REQUEST ? RC_HOLD_REQUEST : RC_HOLD_REPLY) << 16;
            n++;
        }
    }
    pthread_mutex_unlock(&p->hold_lock);
    return n;
}

/* The safety rule (rc_path_stop): queued verdicts first, then everything still held. */
static void path_resolve_all(struct rc_path *p)
{
    pthread_mutex_lock(&p->proc_lock);
    pthread_mutex_lock(&p->hold_lock);
    p->async_verdicts = 0;
    pthread_mutex_unlock(&p->hold_lock);
    apply_queued(p, 1, 0);
    int fwd = 0, pub = 0;
    pthread_mutex_lock(&p->hold_lock);
    uint32_t held = p->nheld; /* only verdict callers change it now, and only downwards */
    pthread_mutex_unlock(&p->hold_lock);
    for (uint32_t h = 0; held && h < p->num; h++) {
        pthread_mutex_lock(&p->hold_lock);
        uint8_t st = p->slot[h].state;
        struct rc_verdict v = {.head = (uint16_t)h, .dir = st, .used_len = p->slot[h].used_len};
        if (st == RC_HS_REQUEST || st == RC_HS_REPLY) {
            p->slot[h].state = RC_HS_NONE;
            p->nheld--;
        }
        pthread_mutex_unlock(&p->hold_lock);
        if (st != RC_HS_REQUEST && st != RC_HS_REPLY)
            continue;
        v.kind = st == RC_HS_REQUEST ? RC_V_EIO : RC_V_RELEASE;
        p->ctr.safety++;
        apply_verdict(p, &v, 1, 0, &fwd, &pub);
    }
    finish_verdicts(p, fwd, pub);
    p->no_hold = 1;
    pthread_mutex_unlock(&p->proc_lock);
}

int rc_path_forward_avail(struct rc_path *p, int may_wait)
{
    uint16_t idx = rc_ring_load_idx(p->g_avail);
    uint16_t n = (uint16_t)(idx - p->next_avail);
    if (n > p->num) {
        if (!p->broken)
            p->ctr.errors++;
        p->broken = 1;
        p->last_error = RC_E_AVAIL_AHEAD;
        return -RC_E_AVAIL_AHEAD;
    }
    p->broken = 0;
    refresh_rules(p);
    const struct rc_hold_table *rules = p->rules_seen;
    int flushed = 0, moved = 0, forwarded = 0;
    for (uint16_t i = 0; i < n; i++) {
        uint16_t head = avail_entry(p->g_avail, p->num, p->next_avail);
        int err = rc_walk_chain(p->mem, p->desc, p->num, head, &p->chain);
        int r, hold = 0;
        if (err) {
            p->ctr.errors++;
            p->last_error = err;
            r = path_capture(p, RC_CAP_ERROR, head, err, 0, 0, may_wait, &flushed, flush_avail, 0);
        } else {
            if (rules) {
                uint32_t op = chain_opcode(&p->chain);
                p->slot[head].op = op;
                hold = !p->no_hold && op != RC_OP_UNKNOWN && rc_hold_match(rules, RC_HOLD_REQUEST, p->queue_index, op)
                       && slot_free(p, head);
                if (hold)
                    hold_slot(p, head, RC_HS_REQUEST, 0);
            }
            r = path_capture(p, RC_CAP_REQUEST, head, 0, (uint32_t)p->chain.readable_len, 0, may_wait,
                             &flushed, flush_avail, hold ? RC_CAP_F_HELD : 0);
            if (hold)
                hold = hold_kept(p, head, r);
        }
        if (r < 0 && !hold)
            break;
        if (!hold) {
            if (head < p->num)
                p->inflight[head] = 1;
            uint16_t slot = (uint16_t)(p->s_avail_idx & (p->num - 1));
            memcpy(p->s_avail + RC_VRING_AVAIL_RING_OFF + 2u * slot, &head, 2);
            p->s_avail_idx++;
            forwarded++;
        }
        p->next_avail++;
        p->ctr.requests++;
        moved++;
        flushed = 0;
    }
    if (forwarded)
        flush_avail(p);
    if (p->event_idx) /* tell the guest to kick for the next entry */
        ev_store(avail_event_of(p->g_used, p->num), p->next_avail);
    path_notify(p);
    return moved;
}

int rc_path_forward_used(struct rc_path *p, int may_wait)
{
    uint16_t idx = rc_ring_load_idx(p->s_used);
    uint16_t n = (uint16_t)(idx - p->next_used);
    if (n > p->num) {
        p->ctr.errors++;
        p->last_error = RC_E_AVAIL_AHEAD;
        return -RC_E_AVAIL_AHEAD;
    }
    refresh_rules(p);
    const struct rc_hold_table *rules = p->rules_seen;
    int flushed = 0, moved = 0, published = 0;
    for (uint16_t i = 0; i < n; i++) {
        struct rc_vring_used_elem e;
        memcpy(&e, p->s_used + RC_VRING_USED_RING_OFF + 8u * (uint32_t)(p->next_used & (p->num - 1)), 8);
        int r, hold = 0;
        if (e.id < p->num && p->inflight[e.id]) {
            int err = rc_walk_chain(p->mem, p->desc, p->num, (uint16_t)e.id, &p->chain);
            if (err) { /* the request was already flagged; capture the reply as an error too */
                p->ctr.errors++;
                p->last_error = err;
                r = path_capture(p, RC_CAP_ERROR, (uint16_t)e.id, err, e.len, 1, may_wait, &flushed, flush_used, 0);
            } else {
                hold = rules && !p->no_hold && rc_hold_match(rules, RC_HOLD_REPLY, p->queue_index, p->slot[e.id].op)
                       && slot_free(p, (uint16_t)e.id);
                if (hold)
                    hold_slot(p, (uint16_t)e.id, RC_HS_REPLY, e.len);
                r = path_capture(p, RC_CAP_REPLY, (uint16_t)e.id, 0, e.len, 1, may_wait, &flushed, flush_used,
                                 hold ? RC_CAP_F_HELD : 0);
                if (hold)
                    hold = hold_kept(p, (uint16_t)e.id, r);
            }
        } else {
            p->ctr.unpaired++;
            p->ctr.errors++;
            p->last_error = e.id < p->num ? RC_E_NOT_IN_FLIGHT : RC_E_HEAD_RANGE;
            p->chain.nlayout = p->chain.nseg = 0;
            p->chain.readable_len = p->chain.writable_len = 0;
            r = path_capture(p, RC_CAP_ERROR, (uint16_t)e.id, p->last_error, e.len, 1, may_wait, &flushed,
                             flush_used, 0);
        }
        if (r < 0 && !hold)
            break;
        if (e.id < p->num)
            p->inflight[e.id] = 0;
        if (!hold) {
            memcpy(p->g_used + RC_VRING_USED_RING_OFF + 8u * (uint32_t)(p->g_used_idx & (p->num - 1)), &e, 8);
            p->g_used_idx++;
            published++;
        }
        p->next_used++;
        p->ctr.replies++;
        moved++;
        flushed = 0;
    }
    if (published)
        flush_used(p);
    if (p->event_idx) /* tell the backend to call for the next entry */
        ev_store(used_event_of(p->s_avail, p->num), p->next_used);
    path_notify(p);
    return moved;
}

/* EVENT_IDX: the events published above ask for the next entries, but an entry that landed before
 * the other side saw them brings no notification.  Look again (sequentially consistent loads after
 * the event stores).  After a few busy rounds, wake our own poll() instead of looping here, so the
 * lock is released and nothing is lost; a runaway index (more than num ahead) is not "more work". */
static int path_more_work(struct rc_path *p, int *more_avail, int *more_used)
{
    uint16_t da = (uint16_t)(ev_load(p->g_avail + 2) - p->next_avail);
    uint16_t du = (uint16_t)(ev_load(p->s_used + 2) - p->next_used);
    *more_avail = !p->broken && da && da <= p->num;
    *more_used = du && du <= p->num;
    return *more_avail || *more_used;
}

static void path_recheck(struct rc_path *p)
{
    int more_avail, more_used;
    for (int round = 0; p->event_idx && !path_stopping(p) && path_more_work(p, &more_avail, &more_used);
         round++) {
        if (round == 4) {
            path_wake(p);
            return;
        }
        if (more_avail)
            rc_path_forward_avail(p, 1);
        if (more_used)
            rc_path_forward_used(p, 1);
    }
}

static void apply_pending_fds(struct rc_path *p)
{
    int k = __atomic_exchange_n(&p->pending_kick_fd, -2, __ATOMIC_ACQ_REL);
    if (k != -2) {
        close_fd(&p->kick_fd);
        p->kick_fd = k;
    }
}

/* Busy-poll the two rings for up to spin_ns after the last activity: trades a core for the two
 * thread wake-ups the path otherwise adds per round trip.  Returns 1 if it forwarded something. */
static int path_spin(struct rc_path *p)
{
    uint64_t deadline = rc_now_ns() + p->spin_ns;
    int moved = 0;
    while (!path_stopping(p) && __atomic_load_n(&p->pending_kick_fd, __ATOMIC_ACQUIRE) == -2) {
        int verdicts = __atomic_load_n(&p->vq_n, __ATOMIC_ACQUIRE);
        if (verdicts || rc_ring_load_idx(p->g_avail) != p->next_avail ||
            rc_ring_load_idx(p->s_used) != p->next_used) {
            pthread_mutex_lock(&p->proc_lock);
            apply_queued(p, 0, 1);
            int a = rc_path_forward_avail(p, 1) + verdicts, u = rc_path_forward_used(p, 1);
            path_recheck(p);
            pthread_mutex_unlock(&p->proc_lock);
            if (a > 0 || u > 0) {
                moved = 1;
                p->ctr.spin_hits++;
                deadline = rc_now_ns() + p->spin_ns;
                continue;
            }
            if (p->broken) /* a runaway avail index would keep us spinning: sleep instead */
                break;
        }
        if (rc_now_ns() > deadline)
            break;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
    return moved;
}

static void *path_thread(void *arg)
{
    struct rc_path *p = arg;
    while (!path_stopping(p)) {
        if (p->spin_ns)
            path_spin(p);
        struct pollfd fds[3];
        int nfds = 0;
        fds[nfds++] = (struct pollfd){.fd = p->ctl_fd, .events = POLLIN};
        fds[nfds++] = (struct pollfd){.fd = p->kick_fd, .events = POLLIN};     /* -1 is ignored */
        fds[nfds++] = (struct pollfd){.fd = p->backend_call_fd, .events = POLLIN};
        int r = poll(fds, (nfds_t)nfds, -1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            p->last_error = RC_E_BAD_QUEUE;
            break;
        }
        p->ctr.wakeups++;
        uint64_t t0 = rc_now_ns();
        if (fds[0].revents & POLLIN)
            drain_fd(p->ctl_fd);
        if (fds[1].revents & POLLIN) {
            drain_fd(p->kick_fd);
            p->ctr.kicks_in++;
        }
        if (fds[2].revents & POLLIN) {
            drain_fd(p->backend_call_fd);
            p->ctr.calls_in++;
        }
        if (path_stopping(p))
            break;
        pthread_mutex_lock(&p->proc_lock);
        apply_pending_fds(p);
        apply_queued(p, 0, 1);
        /* kicks and calls coalesce: look at both rings on every wake-up */
        rc_path_forward_avail(p, 1);
        rc_path_forward_used(p, 1);
        path_recheck(p);
        pthread_mutex_unlock(&p->proc_lock);
        uint64_t dt = rc_now_ns() - t0;
        p->ctr.busy_ns += dt;
        if (dt > p->ctr.busy_max_ns)
            p->ctr.busy_max_ns = dt;
    }
    return NULL;
}

int rc_path_start(struct rc_path *p)
{
    if (p->running)
        return RC_OK;
    __atomic_store_n(&p->stop, 0, __ATOMIC_RELEASE);
    pthread_mutex_lock(&p->proc_lock);
    p->no_hold = 0;
    pthread_mutex_lock(&p->hold_lock);
    p->async_verdicts = 1;
    pthread_mutex_unlock(&p->hold_lock);
    pthread_mutex_unlock(&p->proc_lock);
    if (pthread_create(&p->thread, NULL, path_thread, p)) {
        pthread_mutex_lock(&p->hold_lock);
        p->async_verdicts = 0;
        pthread_mutex_unlock(&p->hold_lock);
        return RC_E_NOMEM;
    }
    p->running = 1;
    path_wake(p); /* look at the rings once: kicks may predate us */
    return RC_OK;
}

void rc_path_stop(struct rc_path *p)
{
    if (!p->inited || p->closed)
        return;
    if (p->running) {
        __atomic_store_n(&p->stop, 1, __ATOMIC_RELEASE);
        path_wake(p);
        rc_capture_wake_all(p->cap);
        pthread_join(p->thread, NULL);
        p->running = 0;
        pthread_mutex_lock(&p->fd_lock);
        apply_pending_fds(p);
        pthread_mutex_unlock(&p->fd_lock);
    }
    path_resolve_all(p);
}

int rc_path_drain(struct rc_path *p)
{
    pthread_mutex_lock(&p->proc_lock);
    /* never wait for the consumer here: GET_VRING_BASE must complete (lossless falls back to drop) */
    int n = rc_path_forward_used(p, 0);
    pthread_mutex_unlock(&p->proc_lock);
    return n;
}

/* Neither setter takes proc_lock: in lossless mode the thread may hold it while it waits for the
 * consumer, and the consumer may well be the thread that handles SET_VRING_CALL/KICK. */
int rc_path_set_kick_fd(struct rc_path *p, int fd)
{
    int nfd = dup_or_none(fd);
    if (fd >= 0 && nfd < 0)
        return RC_E_NOMEM;
    int old = __atomic_exchange_n(&p->pending_kick_fd, nfd, __ATOMIC_ACQ_REL);
    if (old >= 0)
        close(old); /* superseded before the thread picked it up */
    if (!p->running) {
        pthread_mutex_lock(&p->fd_lock);
        apply_pending_fds(p);
        pthread_mutex_unlock(&p->fd_lock);
    }
    path_wake(p);
    return RC_OK;
}

int rc_path_set_call_fd(struct rc_path *p, int fd)
{
    int nfd = dup_or_none(fd);
    if (fd >= 0 && nfd < 0)
        return RC_E_NOMEM;
    /* the call fd is only ever written under fd_lock, so swapping under it is race-free */
    pthread_mutex_lock(&p->fd_lock);
    close_fd(&p->call_fd);
    p->call_fd = nfd;
    pthread_mutex_unlock(&p->fd_lock);
    return RC_OK;
}

void rc_path_close(struct rc_path *p)
{
    if (!p->inited || p->closed)
        return;
    rc_path_stop(p); /* joins the thread; the safety rule leaves nothing held */
    /* proc_lock: a verdict or step() on another thread forwards (and signals) under it */
    pthread_mutex_lock(&p->proc_lock);
    pthread_mutex_lock(&p->fd_lock);
    int k = __atomic_exchange_n(&p->pending_kick_fd, -2, __ATOMIC_ACQ_REL);
    if (k >= 0)
        close(k);
    close_fd(&p->kick_fd);
    close_fd(&p->call_fd);
    close_fd(&p->backend_kick_fd);
    close_fd(&p->backend_call_fd);
    close_fd(&p->ctl_fd);
    p->closed = 1;
    pthread_mutex_unlock(&p->fd_lock);
    pthread_mutex_unlock(&p->proc_lock);
}

void rc_path_destroy(struct rc_path *p)
{
    if (!p->inited) {
        free(p->inflight);
        free(p->slot);
        p->inflight = NULL;
        p->slot = NULL;
        return;
    }
    rc_path_close(p); /* stops, and closes the fds unless close() did already */
    pthread_mutex_destroy(&p->proc_lock);
    pthread_mutex_destroy(&p->fd_lock);
    pthread_mutex_destroy(&p->hold_lock);
    p->inited = 0;
    rc_hold_table_unref(p->rules);
    rc_hold_table_unref(p->rules_seen);
    p->rules = p->rules_seen = NULL;
    while (p->vq) { /* none after stop; a failed init leaves none either */
        struct rc_verdict *v = p->vq;
        p->vq = v->next;
        free(v);
    }
    free(p->slot);
    p->slot = NULL;
    rc_chain_free(&p->chain);
    free(p->inflight);
    free(p->scratch);
    p->inflight = NULL;
    p->scratch = NULL;
}
