/*
 * What a guest's WRITE costs a back-end in the kernel, and what gathering its data first adds: a 496 KiB
 * pwrite into a fresh file on a tmpfs (the share), from memory another CPU has just written (the guest's
 * vCPU filled its page cache there), either straight from that memory (zero-copy: what the C virtiofsd
 * and the bundled daemon's C ring engine do) or copied into a private buffer first (the gather the ring
 * engine did before).  The back-end's mapping of that memory is either populated already or touched for
 * the first time by this write (as for a page the guest has never used for I/O before).  Thread CPU per
 * write, median of ROUNDS rounds of 128 writes.  Not built by setup:
 *
 *   gcc -O2 -pthread -o /tmp/write_cold bench/write_cold.c && /tmp/write_cold /dev/shm/write_cold.bin [ROUNDS]
 *
 * (the file must be on a tmpfs for the figures to be the share's; it is removed after)
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (124 * 4096) /* the biggest WRITE a Linux guest sends over a 128-entry virtqueue */
#define N 128

static char *guest;     /* the guest's view of its memory (QEMU's mapping) */
static volatile int turn;

static double thread_cpu(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void pin(int cpu)
{
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    pthread_setaffinity_np(pthread_self(), sizeof s, &s);
}

/* The vCPU: fills chunk i when told, on CPU 1. */
static void *vcpu(void *unused)
{
    (void)unused;
    pin(1);
    for (int i = 0; i < N; i++) {
        while (__atomic_load_n(&turn, __ATOMIC_ACQUIRE) != 2 * i + 1)
            ;
        memset(guest + (size_t)i * CHUNK, i + 1, CHUNK);
        __atomic_store_n(&turn, 2 * i + 2, __ATOMIC_RELEASE);
    }
    return NULL;
}

/* One round: µs of thread CPU per write. */
static double round_of(int gather, int populated, const char *path)
{
    size_t total = (size_t)N * CHUNK;
    int mfd = memfd_create("guest", 0);
    if (mfd < 0 || ftruncate(mfd, (off_t)total) < 0)
        exit(1);
    guest = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    memset(guest, 0, total); /* the guest has used all of it before */
    char *daemon = mmap(NULL, total, PROT_READ, MAP_SHARED | (populated ? MAP_POPULATE : 0), mfd, 0);
    char *buf = malloc(CHUNK);
    memset(buf, 0, CHUNK);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (guest == MAP_FAILED || daemon == MAP_FAILED || fd < 0)
        exit(1);
    pthread_t t;
    turn = 0;
    pthread_create(&t, NULL, vcpu, NULL);
    double cpu = 0;
    for (int i = 0; i < N; i++) {
        __atomic_store_n(&turn, 2 * i + 1, __ATOMIC_RELEASE);
        while (__atomic_load_n(&turn, __ATOMIC_ACQUIRE) != 2 * i + 2)
            ;
        const char *src = daemon + (size_t)i * CHUNK;
        double t0 = thread_cpu();
        if (gather) {
            memcpy(buf, src, CHUNK);
            src = buf;
        }
        if (pwrite(fd, src, CHUNK, (off_t)i * CHUNK) != CHUNK)
            exit(1);
        cpu += thread_cpu() - t0;
    }
    pthread_join(t, NULL);
    close(fd);
    unlink(path);
    free(buf);
    munmap(daemon, total);
    munmap(guest, total);
    close(mfd);
    return cpu / N * 1e6;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE_ON_A_TMPFS [ROUNDS]\n", argv[0]);
        return 2;
    }
    int rounds = argc > 2 ? atoi(argv[2]) : 10;
    if (rounds < 1 || rounds > 1000)
        rounds = 10;
    pin(0);
    static const char *names[] = {"zero-copy, mapped", "gathered, mapped", "zero-copy, first touch",
                                  "gathered, first touch"};
    double us[4][1000];
    for (int r = 0; r < rounds; r++) /* the four kinds alternate */
        for (int k = 0; k < 4; k++)
            us[k][r] = round_of(k & 1, !(k & 2), argv[1]);
    printf("µs of CPU per 496 KiB pwrite into a fresh tmpfs file, median [min .. max] of %d rounds:\n", rounds);
    for (int k = 0; k < 4; k++) {
        qsort(us[k], (size_t)rounds, sizeof us[k][0], cmp);
        printf("  %-24s %6.1f [%.1f .. %.1f]\n", names[k], us[k][rounds / 2], us[k][0], us[k][rounds - 1]);
    }
    return 0;
}
