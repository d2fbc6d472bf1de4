/*
 * What one thread hand-off costs on this machine: two threads ping-pong over eventfds (the mechanism
 * QEMU, the back-end and the proxy's shadow path use to wake each other).  The proxy adds two such
 * hand-offs to every request, so this is the price of the design, measured without any of it.
 * Built and run by bench/wakeup_cost.py.
 *
 * usage: wakeup_cost COUNT GAP_US CPU_A CPU_B       (CPU -1 = let the scheduler place the thread)
 * prints: write_p50=.. wake_p50=.. wake_p90=.. rtt_p50=.. rtt_p90=.. same_cpu=..  (microseconds; same_cpu
 * is the fraction of wake-ups that ran on the waker's CPU)
 */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

static int ping, pong;
static volatile uint64_t woke_at;
static volatile int woke_cpu;

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void pin(pthread_t t, int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    pthread_setaffinity_np(t, sizeof(s), &s);
}

static void wait_read(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    uint64_t v;
    while (poll(&p, 1, -1) < 1)
        ;
    if (read(fd, &v, sizeof(v)) != sizeof(v))
        exit(2);
}

static void *echo(void *arg)
{
    (void)arg;
    uint64_t one = 1;
    for (;;) {
        wait_read(ping);
        woke_at = now_ns();
        woke_cpu = sched_getcpu();
        if (write(pong, &one, sizeof(one)) != sizeof(one))
            exit(2);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s COUNT GAP_US CPU_A CPU_B\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[1]), gap = atoi(argv[2]), cpu_a = atoi(argv[3]), cpu_b = atoi(argv[4]);
    if (n < 10)
        n = 10;
    ping = eventfd(0, EFD_CLOEXEC);
    pong = eventfd(0, EFD_CLOEXEC);
    pthread_t t;
    if (ping < 0 || pong < 0 || pthread_create(&t, NULL, echo, NULL))
        return 1;
    pin(pthread_self(), cpu_a);
    pin(t, cpu_b);
    uint64_t *w = malloc(sizeof(uint64_t) * (size_t)n), *l = malloc(sizeof(uint64_t) * (size_t)n),
             *r = malloc(sizeof(uint64_t) * (size_t)n);
    int same = 0, warm = n / 10;
    uint64_t one = 1;
    for (int i = -warm; i < n; i++) {
        if (gap)
            usleep((useconds_t)gap);
        int cpu = sched_getcpu();
        uint64_t t0 = now_ns();
        if (write(ping, &one, sizeof(one)) != sizeof(one))
            return 1;
        uint64_t t1 = now_ns();
        wait_read(pong);
        uint64_t t2 = now_ns();
        if (i < 0)
            continue;
        w[i] = t1 - t0;
        l[i] = woke_at - t0;
        r[i] = t2 - t0;
        same += woke_cpu == cpu;
    }
    qsort(w, (size_t)n, sizeof(uint64_t), cmp_u64);
    qsort(l, (size_t)n, sizeof(uint64_t), cmp_u64);
    qsort(r, (size_t)n, sizeof(uint64_t), cmp_u64);
    printf("write_p50=%.2f wake_p50=%.2f wake_p90=%.2f rtt_p50=%.2f rtt_p90=%.2f same_cpu=%.2f\n", w[n / 2] / 1e3,
           l[n / 2] / 1e3, l[n * 9 / 10] / 1e3, r[n / 2] / 1e3, r[n * 9 / 10] / 1e3, (double)same / n);
    return 0;
}
