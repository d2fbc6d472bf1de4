/*
 * Threaded harness for the shadow path in plain C, built under -fsanitize=thread (and address) by
 * tests/test_ring_fuzz_asan.py.  Per queue: a driver thread (the guest), the native path thread and a
 * device thread (the backend) exchange COUNT chains over real eventfds, while the main thread drains
 * the shared capture buffer.  The sanitizers check the locking and the acquire/release protocol on the
 * rings and the fd swaps (done from the consumer thread during traffic); the harness checks that
 * nothing is lost, duplicated or reordered, and that every capture pairs up.  With HOLD=1, hold rules
 * (replaced during traffic) hold a third of the requests and a third of the replies; the consumer
 * releases or rewrites each as it sees it, from its own thread, while the paths run.
 *
 * Each request is a fuse_in_header (48 readable bytes: opcode 1, 2 or 3 by sequence number, unique = the
 * sequence number) and 8 writable bytes, where the device echoes the sequence number.
 *
 * At the end, each path is closed (rc_path_close: the session's end) while another thread keeps changing
 * its rules and sending it verdicts (each wakes the path through its ctl eventfd), and the capture buffer
 * is closed while the consumer reads it: the sanitizers see the fds go under the locks their users take.
 *
 * usage: ring_threads COUNT QUEUES POLICY(0 drop, 1 lossless) [HOLD] -> "pairs=N requests=N replies=N"
 */
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "ring_core.h"

#define NUM 64
#define MAXQ 4
#define FAIL(...) do { fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); abort(); } while (0)

static uint8_t *guest;  /* guest RAM at GPA 0 */
static uint8_t *proxy;  /* proxy region at GPA 1<<40 */
#define GSIZE (1u << 22)
#define PGPA (1ull << 40)
#define PSIZE (1u << 20)
static struct rc_memmap mem;
static long count;

struct lane {
    int q;
    uint64_t desc, avail, used, s_avail, s_used, bufs;
    int g_kick, g_call, b_kick, b_call;
    struct rc_path path;
    struct rc_queue dev;
    int done;
};

static void wait_fd(int fd, int ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, ms) > 0) {
        uint64_t v;
        ssize_t r = read(fd, &v, 8);
        (void)r;
    }
}

static void kick(int fd)
{
    uint64_t one = 1;
    ssize_t r = write(fd, &one, 8);
    (void)r;
}

static void *driver(void *arg)
{
    struct lane *l = arg;
    uint8_t *avail = guest + l->avail, *used = guest + l->used;
    uint16_t avail_idx = 0, last_used = 0;
    long sent = 0, got = 0;
    uint64_t outstanding[NUM];
    int free_heads[NUM], nfree = NUM;
    for (int i = 0; i < NUM; i++)
        free_heads[i] = i;
    while (got < count) {
        int published = 0;
        while (nfree && sent < count) {
            int h = free_heads[--nfree];
            uint64_t seq = (uint64_t)sent++;
            uint32_t hdr[2] = {48, (uint32_t)(1 + seq % 3)}; /* fuse_in_header len, opcode */
            memcpy(guest + l->bufs + 128 * h, hdr, 8);
            memcpy(guest + l->bufs + 128 * h + 8, &seq, 8); /* unique */
            outstanding[h] = seq;
            uint16_t hh = (uint16_t)h;
            memcpy(avail + 4 + 2 * (avail_idx % NUM), &hh, 2);
            avail_idx++;
            published++;
        }
        if (published) {
            rc_ring_store_idx(avail, avail_idx);
            kick(l->g_kick);
        }
        uint16_t ui = rc_ring_load_idx(used);
        if (ui == last_used) {
            wait_fd(l->g_call, 100);
            continue;
        }
        while (last_used != ui) {
            struct rc_vring_used_elem e;
            memcpy(&e, used + 4 + 8 * (last_used % NUM), 8);
            uint64_t echo;
            memcpy(&echo, guest + l->bufs + 128 * e.id + 64, 8);
            if (e.id >= NUM || echo != outstanding[e.id] || e.len != 8)
                FAIL("q%d: bad completion id %u", l->q, e.id);
            free_heads[nfree++] = (int)e.id;
            last_used++;
            got++;
        }
    }
    __atomic_store_n(&l->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void *device(void *arg)
{
    struct lane *l = arg;
    struct rc_chain c;
    rc_chain_init(&c);
    while (!__atomic_load_n(&l->done, __ATOMIC_ACQUIRE)) {
        int n = rc_queue_avail(&l->dev);
        if (n < 0)
            FAIL("device: avail ahead");
        if (!n) {
            wait_fd(l->b_kick, 50);
            continue;
        }
        struct rc_vring_used_elem e[NUM];
        for (int i = 0; i < n; i++) {
            if (rc_queue_pop(&l->dev, &c))
                FAIL("device: bad chain");
            uint8_t hdr[16];
            uint64_t seq;
            rc_chain_gather(&c, hdr, 16);
            memcpy(&seq, hdr + 8, 8);
            for (uint32_t s = 0; s < c.nseg; s++)
                if (c.seg[s].write)
                    memcpy(c.seg[s].host, &seq, 8);
            e[i].id = c.head;
            e[i].len = 8;
        }
        rc_queue_push_used(&l->dev, e, (uint32_t)n);
        kick(l->b_call);
    }
    rc_chain_free(&c);
    return NULL;
}

/* Hold requests with opcode 1 and the replies to opcode 2. */
static struct rc_hold_table *hold_rules(void)
{
    struct rc_hold_table *t = rc_hold_table_new(2, 2);
    if (!t)
        FAIL("rules");
    t->r[0] = (struct rc_hold_rule){RC_HOLD_REQUEST, 1, 0, t->r[0].ops};
    t->r[1] = (struct rc_hold_rule){RC_HOLD_REPLY, 1, 0, t->r[0].ops + 1};
    t->r[0].ops[0] = 1;
    t->r[1].ops[0] = 2;
    return t;
}

static int closing;

/* While main closes a path: rule changes and verdicts from another thread, each waking the path. */
static void *waker(void *arg)
{
    struct lane *l = arg;
    for (long i = 0; !__atomic_load_n(&closing, __ATOMIC_ACQUIRE) || i < 64; i++) {
        rc_path_set_hold_rules(&l->path, NULL);
        rc_path_verdict(&l->path, (uint16_t)(i % NUM), RC_V_RELEASE, NULL, 0); /* held or not: either */
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 4)
        return 2;
    count = atol(argv[1]);
    int nq = atoi(argv[2]), policy = atoi(argv[3]), hold = argc > 4 ? atoi(argv[4]) : 0;
    if (nq < 1 || nq > MAXQ)
        return 2;
    guest = calloc(1, GSIZE);
    proxy = calloc(1, PSIZE);
    rc_mem_init(&mem);
    rc_mem_add(&mem, 0, GSIZE, 0, guest);
    rc_mem_add(&mem, PGPA, PSIZE, 0, proxy);
    struct rc_capture cap;
    rc_capture_init(&cap, policy ? 64 * 1024 : 8u << 20, policy);
    struct lane lanes[MAXQ];
    memset(lanes, 0, sizeof(lanes));
    for (int q = 0; q < nq; q++) {
        struct lane *l = &lanes[q];
        l->q = q;
        l->desc = 0x10000 + 0x10000ull * q;
        l->avail = l->desc + 16 * NUM;
        l->used = l->avail + 0x1000;
        l->s_used = PGPA + 0x10000ull * q;
        l->s_avail = l->s_used + 0x1000;
        l->bufs = 0x100000 + 0x10000ull * q;
        for (int h = 0; h < NUM; h++) { /* head h: [readable 48 B at bufs+128h, writable 8 B at +64] */
            struct rc_vring_desc d[2] = {{l->bufs + 128 * h, 48, RC_VRING_DESC_F_NEXT, 1},
                                         {l->bufs + 128 * h + 64, 8, RC_VRING_DESC_F_WRITE, 0}};
            uint64_t table = 0x300000 + 0x10000ull * q + 32 * h;
            memcpy(guest + table, d, sizeof(d));
            struct rc_vring_desc ind = {table, 32, RC_VRING_DESC_F_INDIRECT, 0};
            memcpy(guest + l->desc + 16 * h, &ind, 16);
        }
        l->g_kick = eventfd(0, EFD_NONBLOCK);
        l->g_call = eventfd(0, EFD_NONBLOCK);
        l->b_kick = eventfd(0, EFD_NONBLOCK);
        l->b_call = eventfd(0, EFD_NONBLOCK);
        if (rc_path_init(&l->path, &mem, (uint16_t)q, NUM, l->desc, l->avail, l->used, l->s_avail, l->s_used,
                         &cap, l->g_kick, l->g_call, l->b_kick, l->b_call, 0, 0, q == 1 ? 20 : 0))
            FAIL("path init");
        if (rc_queue_init(&l->dev, &mem, NUM, l->desc, l->s_avail, l->s_used))
            FAIL("queue init");
        if (hold)
            rc_path_set_hold_rules(&l->path, hold_rules());
        rc_path_start(&l->path);
    }
    pthread_t th[2 * MAXQ];
    for (int q = 0; q < nq; q++) {
        pthread_create(&th[2 * q], NULL, driver, &lanes[q]);
        pthread_create(&th[2 * q + 1], NULL, device, &lanes[q]);
    }
    /* consumer: pair requests and replies per (queue, head), per-queue order */
    uint64_t pending[MAXQ][NUM];
    int pend[MAXQ][NUM];
    memset(pend, 0, sizeof(pend));
    uint64_t next_req[MAXQ] = {0};
    long pairs = 0, swaps = 0, held = 0;
    while (pairs < count * nq) {
        uint64_t pos = cap.tail;
        const struct rc_cap_hdr *h;
        int any = 0;
        while ((h = rc_capture_peek(&cap, &pos))) {
            any = 1;
            uint64_t v;
            const uint8_t *data = (const uint8_t *)(h + 1) + h->nlayout * sizeof(struct rc_layout);
            if (h->data_len < (h->kind == RC_CAP_REQUEST ? 16u : 8u))
                FAIL("short capture");
            memcpy(&v, data + (h->kind == RC_CAP_REQUEST ? 8 : 0), 8);
            if (h->flags & RC_CAP_F_HELD) { /* decide at once, from this (the consumer's) thread */
                struct lane *l = &lanes[h->queue];
                int kind = h->kind == RC_CAP_REPLY && v % 2 ? RC_V_REWRITE : RC_V_RELEASE;
                if (rc_path_verdict(&l->path, h->head, kind, data, 8))
                    FAIL("verdict refused q%u head %u", h->queue, h->head);
                held++;
                if (h->kind == RC_CAP_REPLY) { /* the reply the guest gets is captured again */
                    pos += h->rec_len;
                    continue;
                }
            }
            if (h->kind == RC_CAP_REQUEST) {
                if (v != next_req[h->queue]++ || pend[h->queue][h->head])
                    FAIL("request capture out of order q%u", h->queue);
                pend[h->queue][h->head] = 1;
                pending[h->queue][h->head] = v;
            } else if (h->kind == RC_CAP_REPLY) {
                if (!pend[h->queue][h->head] || pending[h->queue][h->head] != v)
                    FAIL("reply capture does not pair q%u head %u", h->queue, h->head);
                pend[h->queue][h->head] = 0;
                pairs++;
            } else {
                FAIL("error capture");
            }
            pos += h->rec_len;
        }
        rc_capture_release(&cap, pos);
        if (++swaps % 64 == 0) { /* QEMU swaps fds during traffic: re-install dups of the same eventfds */
            struct lane *l = &lanes[swaps / 64 % nq];
            if (rc_path_set_call_fd(&l->path, l->g_call) || rc_path_set_kick_fd(&l->path, l->g_kick))
                FAIL("fd swap");
            if (hold) /* and the debugger replaces the rule table: sometimes none at all */
                rc_path_set_hold_rules(&l->path, swaps / 64 % 3 ? hold_rules() : NULL);
        }
        if (!any) {
            pthread_mutex_lock(&cap.lock);
            uint64_t dropped = cap.dropped;
            pthread_mutex_unlock(&cap.lock);
            if (!policy && dropped)
                break; /* drop mode under pressure: pairing cannot complete, report counts */
            wait_fd(cap.notify_fd, 100);
        }
    }
    for (int q = 0; q < nq; q++) {
        pthread_join(th[2 * q], NULL);
        pthread_join(th[2 * q + 1], NULL);
    }
    uint64_t req = 0, rep = 0;
    for (int q = 0; q < nq; q++) {
        pthread_t w;
        closing = 0;
        pthread_create(&w, NULL, waker, &lanes[q]);
        rc_path_close(&lanes[q].path);
        __atomic_store_n(&closing, 1, __ATOMIC_RELEASE);
        pthread_join(w, NULL);
        if (lanes[q].path.ctl_fd != -1 || lanes[q].path.kick_fd != -1 || lanes[q].path.backend_call_fd != -1)
            FAIL("fds left open after rc_path_close");
        req += lanes[q].path.ctr.requests;
        rep += lanes[q].path.ctr.replies;
        if (lanes[q].path.ctr.errors)
            FAIL("path errors");
        rc_path_destroy(&lanes[q].path);
        close(lanes[q].g_kick);
        close(lanes[q].g_call);
        close(lanes[q].b_kick);
        close(lanes[q].b_call);
    }
    printf("pairs=%ld requests=%llu replies=%llu dropped=%llu stalls=%llu swaps=%ld held=%ld\n", pairs,
           (unsigned long long)req, (unsigned long long)rep, (unsigned long long)cap.dropped,
           (unsigned long long)cap.stalls, swaps / 64, held);
    rc_capture_close(&cap);
    rc_capture_notify(&cap); /* a late producer: nothing to write to */
    if (cap.notify_fd != -1)
        FAIL("capture eventfd left open");
    rc_capture_destroy(&cap);
    free(guest);
    free(proxy);
    return 0;
}
