/*
 * Standalone fuzz driver for dissectors/ring/ring_core.c, built with -fsanitize=address,undefined by
 * tests/test_ring_fuzz_asan.py.  From a seed it makes random memory maps (each region its own exact-size
 * malloc, so ASan's redzones catch any access outside a region) and random, often hostile, rings; then
 * pops every chain, gathers, pushes used entries, and runs the shadow path's forwarding steps and the
 * capture buffer, with random hold rules and verdicts (the matcher parses request headers out of the
 * random chains; verdicts write replies into them).  Invariants are checked on top of the sanitizers.
 *
 * usage: ring_fuzz SEED CASES   -> prints "cases=N chains=N good=N errors=N captures=N reasons=N holds=N"
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>

#include "ring_core.h"

static uint64_t rs;
static uint64_t rnd(void)
{
    /* xorshift64* */
    rs ^= rs >> 12;
    rs ^= rs << 25;
    rs ^= rs >> 27;
    return rs * 2685821657736338717ull;
}
static uint64_t below(uint64_t n) { return n ? rnd() % n : 0; }

#define FAIL(...) do { fprintf(stderr, "invariant: " __VA_ARGS__); fprintf(stderr, "\n"); abort(); } while (0)

struct world {
    struct rc_memmap m;
    int nreg;
    uint8_t *mem[4];
    uint64_t gpa[4], size[4];
};

static uint64_t pick_addr(struct world *w)
{
    uint64_t k = below(100);
    if (k < 75) { /* inside (or straddling the end of) a region */
        int r = (int)below((uint64_t)w->nreg);
        return w->gpa[r] + below(w->size[r] + 64);
    }
    if (k < 85)
        return UINT64_MAX - below(8192);
    if (k < 92)
        return w->gpa[0] ? w->gpa[0] - 1 - below(64) : below(1ull << 40);
    return rnd();
}

static uint32_t pick_len(void)
{
    static const uint32_t common[] = {0, 1, 2, 8, 16, 40, 64, 4096, 4095, 65536};
    uint64_t k = below(10);
    if (k < 8)
        return common[below(10)];
    return (uint32_t)rnd();
}

static void rand_desc(struct world *w, uint8_t *p, uint32_t num, int allow_indirect)
{
    struct rc_vring_desc d;
    d.addr = pick_addr(w);
    d.len = pick_len();
    d.flags = (uint16_t)(below(4) == 0 ? rnd() : below(8));
    if (!allow_indirect)
        d.flags &= (uint16_t)~RC_VRING_DESC_F_INDIRECT;
    d.next = (uint16_t)(below(20) == 0 ? rnd() : below(num + 1));
    if (allow_indirect && below(4) == 0) { /* build a plausible indirect table inside a region */
        int r = (int)below((uint64_t)w->nreg);
        uint32_t n = (uint32_t)(1 + below(6));
        if (w->size[r] >= 16ull * n + 16) {
            uint64_t off = below(w->size[r] - 16ull * n) & ~15ull;
            for (uint32_t i = 0; i < n; i++)
                rand_desc(w, w->mem[r] + off + 16 * i, n, below(10) == 0);
            d.addr = w->gpa[r] + off;
            d.len = below(10) ? 16 * n : (uint32_t)below(300);
            d.flags = RC_VRING_DESC_F_INDIRECT | (below(20) == 0 ? RC_VRING_DESC_F_NEXT : 0);
        }
    }
    memcpy(p, &d, sizeof(d));
}

static void check_chain(struct world *w, const struct rc_chain *c)
{
    uint64_t rl = 0, wl = 0;
    for (uint32_t i = 0; i < c->nseg; i++) {
        const struct rc_seg *s = &c->seg[i];
        int ok = 0;
        for (int r = 0; r < w->nreg; r++)
            if (s->host >= w->mem[r] && s->host + s->len <= w->mem[r] + w->size[r])
                ok = 1;
        if (!ok)
            FAIL("segment %u outside every region", i);
        if (s->write)
            wl += s->len;
        else
            rl += s->len;
    }
    if (c->err == RC_OK && (rl != c->readable_len || wl != c->writable_len))
        FAIL("segment lengths do not add up");
}

static struct rc_hold_table *random_rules(void)
{
    uint32_t n = (uint32_t)below(4), nops[4], total = 0;
    for (uint32_t i = 0; i < n; i++)
        total += nops[i] = (uint32_t)below(4);
    struct rc_hold_table *t = rc_hold_table_new(n, total);
    if (!t)
        FAIL("rc_hold_table_new");
    uint32_t *cursor = n ? t->r[0].ops : NULL;
    for (uint32_t i = 0; i < n; i++) {
        t->r[i].direction = (uint32_t)(1 + below(3));
        t->r[i].queues = below(2) ? 0 : rnd();
        t->r[i].ops = cursor;
        t->r[i].nops = nops[i];
        for (uint32_t k = 0; k < nops[i]; k++)
            cursor[k] = below(2) ? (uint32_t)below(60) : (uint32_t)rnd();
        cursor += nops[i];
    }
    return t;
}

/* Verdicts on held heads (and on random ones), with random data sizes: errors are fine, memory
 * errors are not.  Verdicts on a stopped path are applied at once. */
static void random_verdicts(struct rc_path *p, uint64_t *holds)
{
    static uint8_t data[512];
    uint32_t held[64];
    uint32_t n = rc_path_held(p, held, 64);
    *holds += n;
    for (uint32_t i = 0; i < n + 1 && i < 64; i++) {
        uint16_t head = i < n ? (uint16_t)(held[i] & 0xffff) : (uint16_t)rnd();
        for (size_t k = 0; k < sizeof(data); k++)
            data[k] = (uint8_t)rnd();
        int e = rc_path_verdict(p, head, (int)(1 + below(4)), data, (uint32_t)below(sizeof(data) + 1));
        if (e && e != RC_E_NOT_HELD && e != RC_E_WRONG_DIRECTION && e != RC_E_NO_ROOM && e != RC_E_NEEDS_REPLY)
            FAIL("verdict: unexpected %d", e);
    }
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s SEED CASES\n", argv[0]);
        return 2;
    }
    rs = strtoull(argv[1], NULL, 0) * 0x9E3779B97F4A7C15ull + 1;
    long cases = strtol(argv[2], NULL, 0);
    uint64_t chains = 0, good = 0, errors = 0, captures = 0, reasons = 0, holds = 0;
    uint8_t *gather = malloc(1 << 20);
    struct rc_chain c;
    rc_chain_init(&c);
    for (long n = 0; n < cases; n++) {
        struct world w;
        memset(&w, 0, sizeof(w));
        rc_mem_init(&w.m);
        w.nreg = (int)(1 + below(4));
        uint64_t at = below(4) == 0 ? UINT64_MAX - (1ull << 20) : below(1ull << 32) & ~4095ull;
        for (int r = 0; r < w.nreg; r++) {
            w.size[r] = 4096 + below(4) * 4096 + (below(3) == 0 ? below(4096) : 0);
            w.gpa[r] = at;
            w.mem[r] = malloc(w.size[r]);
            for (uint64_t i = 0; i < w.size[r]; i++)
                w.mem[r][i] = (uint8_t)rnd();
            int slot = rc_mem_add(&w.m, w.gpa[r], w.size[r], w.gpa[r] + 0x7f0000000000ull, w.mem[r]);
            if (slot < 0) { /* overflow at the top of the address space: keep what fits */
                free(w.mem[r]);
                w.nreg = r;
                break;
            }
            at += w.size[r] + (below(2) ? 0 : below(1 << 20)); /* often adjacent: segments split */
            if (at < w.gpa[r])
                at = below(1ull << 30);
        }
        if (w.nreg == 0) {
            w.nreg = 1;
            w.size[0] = 8192;
            w.gpa[0] = 0;
            w.mem[0] = calloc(1, 8192);
            rc_mem_add(&w.m, 0, 8192, 0, w.mem[0]);
        }
        uint32_t num = 1u << below(7);
        /* rings in region 0 when they fit, else random (init must refuse cleanly) */
        uint64_t desc = w.gpa[0], avail = desc + 16ull * num, used = (avail + 6 + 2ull * num + 3) & ~3ull;
        uint64_t need = used + 6 + 8ull * num - w.gpa[0];
        if (need > w.size[0] || below(20) == 0) {
            desc = pick_addr(&w) & ~15ull;
            avail = pick_addr(&w) & ~1ull;
            used = pick_addr(&w) & ~3ull;
        }
        struct rc_queue q;
        int err = rc_queue_init(&q, &w.m, num, desc, avail, used);
        if (err) {
            errors++;
        } else {
            for (uint32_t i = 0; i < num; i++)
                rand_desc(&w, q.desc + 16 * i, num, 1);
            for (uint32_t i = 0; i < num; i++) {
                uint16_t h = (uint16_t)(below(30) == 0 ? rnd() : below(num));
                memcpy(q.avail + 4 + 2 * i, &h, 2);
            }
            rc_ring_store_idx(q.avail, (uint16_t)(below(10) == 0 ? rnd() : below(num + 1)));
            q.event_idx = (int)below(2);
            rc_queue_want_kick(&q); /* EVENT_IDX: avail_event, inside the ring's checked bounds */
            int avail_n = rc_queue_avail(&q);
            if (avail_n < 0) {
                errors++;
                reasons |= 1ull << -avail_n;
            }
            struct rc_vring_used_elem ue[256];
            uint32_t nue = 0;
            for (int i = 0; i < avail_n; i++) {
                int e = rc_queue_pop(&q, &c);
                check_chain(&w, &c);
                chains++;
                if (e) {
                    errors++;
                    reasons |= 1ull << e;
                    continue;
                }
                good++;
                rc_chain_gather(&c, gather, 1 << 20);
                for (uint32_t s = 0; s < c.nseg; s++)
                    if (c.seg[s].write)
                        memset(c.seg[s].host, 0xAB, c.seg[s].len > 4096 ? 4096 : c.seg[s].len);
                ue[nue].id = c.head;
                ue[nue].len = (uint32_t)below(c.writable_len + 2);
                nue++;
            }
            if (below(2)) {
                if (nue && rc_queue_push_used(&q, ue, nue))
                    FAIL("push_used refused heads it popped");
            } else { /* the daemon's publication: entries, used->idx, then the call decision */
                uint16_t flags = (uint16_t)rnd();
                memcpy(q.avail, &flags, 2);
                int call = -1;
                if (rc_queue_publish(&q, ue, nue, &call))
                    FAIL("publish refused heads it popped");
                if (call != 0 && call != 1)
                    FAIL("publish decided no call");
                /* the flags publish saw: random rings may overlap, and the used entries just written may
                 * have overwritten the ones set above (seed 7 has two such cases in 1M) */
                memcpy(&flags, q.avail, 2);
                if (nue && !q.event_idx && call != !(flags & RC_VRING_AVAIL_F_NO_INTERRUPT))
                    FAIL("publish ignored VRING_AVAIL_F_NO_INTERRUPT");
                if (nue && rc_ring_load_idx(q.used) != q.used_idx)
                    FAIL("publish left used->idx behind");
            }
            struct rc_vring_used_elem bad = {num + (uint32_t)below(100), 0};
            if (rc_queue_push_used(&q, &bad, 1) != RC_E_HEAD_RANGE)
                FAIL("push_used accepted a head >= num");
        }
        /* the shadow path, stepped: guest rings + shadow rings in the same (random) places */
        if (!err && below(2)) {
            struct rc_capture cap;
            rc_capture_init(&cap, 4096 + below(8) * 4096, (int)below(2));
            int fds[4];
            for (int i = 0; i < 4; i++)
                fds[i] = eventfd(0, EFD_NONBLOCK);
            struct rc_path p;
            uint64_t s_avail = avail, s_used = used; /* may alias: hostile, must still be memory-safe */
            if (w.size[0] >= need + 4096 + 8ull * num + 16 && below(2)) {
                s_used = (w.gpa[0] + need + 64) & ~63ull;
                s_avail = s_used + 8ull * num + 16;
            }
            int pe = rc_path_init(&p, &w.m, (uint16_t)below(4), num, desc, avail, used, s_avail, s_used, &cap,
                                  fds[0], fds[1], fds[2], fds[3], (uint16_t)rnd(), (uint32_t)below(3) * 100, 0);
            if (!pe) {
                if (below(3)) /* hold rules: the matcher reads fuse_in_header out of random chains */
                    rc_path_set_hold_rules(&p, random_rules());
                for (int round = 0; round < 3; round++) {
                    rc_ring_store_idx(p.g_avail, (uint16_t)(p.next_avail + below(num + 2)));
                    rc_path_forward_avail(&p, 0);
                    random_verdicts(&p, &holds);
                    for (uint32_t i = 0; i < num; i++) {
                        struct rc_vring_used_elem e = {(uint32_t)(below(10) ? below(num) : rnd()), (uint32_t)rnd()};
                        memcpy(p.s_used + 4 + 8 * i, &e, 8);
                    }
                    rc_ring_store_idx(p.s_used, (uint16_t)(p.next_used + below(num + 2)));
                    rc_path_forward_used(&p, 0);
                    random_verdicts(&p, &holds);
                    if (below(8) == 0)
                        rc_path_set_hold_rules(&p, below(2) ? random_rules() : NULL);
                    uint64_t pos = cap.tail;
                    const struct rc_cap_hdr *h;
                    while ((h = rc_capture_peek(&cap, &pos))) {
                        if (h->rec_len < sizeof(*h) || h->rec_len > cap.cap / 2 || h->data_len > h->rec_len)
                            FAIL("capture record malformed");
                        captures++;
                        pos += h->rec_len;
                    }
                    rc_capture_release(&cap, pos);
                }
                errors += p.ctr.errors;
                rc_path_stop(&p); /* the safety rule: nothing may stay held */
                uint32_t left[1];
                if (rc_path_held(&p, left, 1))
                    FAIL("held after stop");
                holds += p.ctr.holds;
            }
            rc_path_destroy(&p);
            for (int i = 0; i < 4; i++)
                close(fds[i]);
            rc_capture_destroy(&cap);
        }
        for (int r = 0; r < w.nreg; r++)
            free(w.mem[r]);
    }
    rc_chain_free(&c);
    free(gather);
    int nreasons = 0;
    for (int i = 0; i < 64; i++)
        nreasons += (int)((reasons >> i) & 1);
    printf("cases=%ld chains=%llu good=%llu errors=%llu captures=%llu reasons=%d holds=%llu\n", cases,
           (unsigned long long)chains, (unsigned long long)good, (unsigned long long)errors, (unsigned long long)captures,
           nreasons, (unsigned long long)holds);
    return 0;
}
