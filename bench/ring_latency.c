/*
 * Shadow-path latency without Python in the loop: a C driver thread and a C device thread ping-pong one
 * chain at a time over real eventfds, either directly (device on the guest's rings) or through the
 * native shadow path (ring_core.c, with capture and a consumer thread draining it).  Built and run by
 * bench/ring.py; prints the round-trip times' p50/p99 in microseconds.
 *
 * usage: ring_latency COUNT MODE(0 direct, 1 proxied) SPIN_US
 */
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "ring_core.h"

#define NUM 256
#define GSIZE (1u << 22)
#define PGPA (1ull << 40)
#define PSIZE (1u << 20)

static uint8_t *guest, *proxy;
static struct rc_memmap mem;
static struct rc_queue dev;
static int dev_kick, dev_call, stop_dev, stop_cons;
static struct rc_capture cap;

static void wait_fd(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    while (poll(&p, 1, 100) <= 0 && !__atomic_load_n(&stop_dev, __ATOMIC_ACQUIRE))
        ;
    uint64_t v;
    ssize_t r = read(fd, &v, 8);
    (void)r;
}

static void kick(int fd)
{
    uint64_t one = 1;
    ssize_t r = write(fd, &one, 8);
    (void)r;
}

static void *device(void *arg)
{
    (void)arg;
    struct rc_chain c;
    rc_chain_init(&c);
    while (!__atomic_load_n(&stop_dev, __ATOMIC_ACQUIRE)) {
        int n = rc_queue_avail(&dev);
        if (n <= 0) {
            wait_fd(dev_kick);
            continue;
        }
        struct rc_vring_used_elem e[NUM];
        for (int i = 0; i < n; i++) {
            rc_queue_pop(&dev, &c);
            e[i].id = c.head;
            e[i].len = 16;
        }
        rc_queue_push_used(&dev, e, (uint32_t)n);
        kick(dev_call);
    }
    rc_chain_free(&c);
    return NULL;
}

static void *consumer(void *arg)
{
    (void)arg;
    /* a batching consumer (every 2 ms), as the Python side drains: a consumer woken by every record
     * would compete with the path for the CPUs in a one-chain ping-pong */
    while (!__atomic_load_n(&stop_cons, __ATOMIC_ACQUIRE)) {
        usleep(2000);
        uint64_t pos = cap.tail;
        const struct rc_cap_hdr *h;
        while ((h = rc_capture_peek(&cap, &pos)))
            pos += h->rec_len;
        rc_capture_release(&cap, pos);
    }
    return NULL;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

int main(int argc, char **argv)
{
    if (argc < 4)
        return 2;
    long count = atol(argv[1]);
    int proxied = atoi(argv[2]);
    unsigned spin = (unsigned)atoi(argv[3]);
    guest = calloc(1, GSIZE);
    proxy = calloc(1, PSIZE);
    rc_mem_init(&mem);
    rc_mem_add(&mem, 0, GSIZE, 0, guest);
    rc_mem_add(&mem, PGPA, PSIZE, 0, proxy);
    uint64_t desc = 0x10000, avail = desc + 16 * NUM, used = avail + 0x1000, bufs = 0x100000;
    for (int h = 0; h < NUM; h++) { /* one indirect descriptor per request: 40 B header + 4 KiB + reply */
        struct rc_vring_desc d[3] = {{bufs + 8192ull * h, 40, RC_VRING_DESC_F_NEXT, 1},
                                     {bufs + 8192ull * h + 64, 4096, RC_VRING_DESC_F_NEXT, 2},
                                     {bufs + 8192ull * h + 4160, 16, RC_VRING_DESC_F_WRITE, 0}};
        uint64_t table = 0x80000 + 64ull * h;
        memcpy(guest + table, d, sizeof(d));
        struct rc_vring_desc ind = {table, 48, RC_VRING_DESC_F_INDIRECT, 0};
        memcpy(guest + desc + 16 * h, &ind, 16);
    }
    int g_kick = eventfd(0, EFD_NONBLOCK), g_call = eventfd(0, EFD_NONBLOCK);
    struct rc_path path;
    pthread_t cons;
    if (proxied) {
        int b_kick = eventfd(0, EFD_NONBLOCK), b_call = eventfd(0, EFD_NONBLOCK);
        rc_capture_init(&cap, 64u << 20, RC_POLICY_DROP);
        uint64_t s_used = PGPA, s_avail = PGPA + 0x4000;
        if (rc_path_init(&path, &mem, 1, NUM, desc, avail, used, s_avail, s_used, &cap, g_kick, g_call, b_kick,
                         b_call, 0, 0, spin))
            return 3;
        rc_queue_init(&dev, &mem, NUM, desc, s_avail, s_used);
        dev_kick = b_kick;
        dev_call = b_call;
        rc_path_start(&path);
        pthread_create(&cons, NULL, consumer, NULL);
    } else {
        rc_queue_init(&dev, &mem, NUM, desc, avail, used);
        dev_kick = g_kick;
        dev_call = g_call;
    }
    pthread_t devt;
    pthread_create(&devt, NULL, device, NULL);
    uint8_t *av = guest + avail, *us = guest + used;
    uint16_t aidx = 0, last_used = 0;
    double *rtt = malloc(sizeof(double) * (size_t)count);
    long warm = 1000;
    for (long i = 0; i < count + warm; i++) {
        uint16_t h = (uint16_t)(i % NUM);
        double t0 = now_us();
        memcpy(av + 4 + 2 * (aidx % NUM), &h, 2);
        aidx++;
        rc_ring_store_idx(av, aidx);
        kick(g_kick);
        while (rc_ring_load_idx(us) == last_used) {
            struct pollfd p = {.fd = g_call, .events = POLLIN};
            poll(&p, 1, 100);
            uint64_t v;
            ssize_t r = read(g_call, &v, 8);
            (void)r;
        }
        last_used = rc_ring_load_idx(us);
        if (i >= warm)
            rtt[i - warm] = now_us() - t0;
    }
    __atomic_store_n(&stop_dev, 1, __ATOMIC_RELEASE);
    kick(dev_kick);
    pthread_join(devt, NULL);
    if (proxied) {
        rc_path_stop(&path);
        __atomic_store_n(&stop_cons, 1, __ATOMIC_RELEASE);
        pthread_join(cons, NULL);
        if (path.ctr.requests != (uint64_t)(count + warm) || cap.dropped)
            return 4;
        rc_path_destroy(&path);
    }
    qsort(rtt, (size_t)count, sizeof(double), cmp);
    printf("p50=%.2f p99=%.2f\n", rtt[count / 2], rtt[count * 99 / 100]);
    return 0;
}
