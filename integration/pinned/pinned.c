/* A workload pinned at its memory limit that the kernel never reports as an OOM: it
 * fills the cgroup with pipe buffers (kernel memory charged to the cgroup, which the
 * kernel refuses with ENOMEM at the limit instead of entering the OOM wait), then keeps
 * retrying one more write every RETRY_MS (default 20 ms). memory.failcnt rises, usage sits at the limit,
 * there is no page cache to reclaim and under_oom stays 0: stuck, and silent.
 *
 * Usage: pinned CGROUP_DIR [RETRY_MS]
 * Prints "filled <pipes>" once at the wall, and "progress <ms stuck> <failed writes>"
 * and exits when a write succeeds again (someone made room).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_PIPES 4096
#define CHUNK (64 * 1024)

static int fds[MAX_PIPES][2];
static char chunk[CHUNK];

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* One more pipe holding CHUNK bytes; 0 on success, else the errno. */
static int fill_one(int i) {
    if (pipe2(fds[i], O_NONBLOCK | O_CLOEXEC) != 0)
        return errno;
    ssize_t n = write(fds[i][1], chunk, CHUNK);
    if (n == CHUNK)
        return 0;
    int e = n < 0 ? errno : ENOMEM;
    close(fds[i][0]);
    close(fds[i][1]);
    return e;
}

int main(int argc, char **argv) {
    if (argc != 2 && argc != 3) {
        fprintf(stderr, "usage: pinned CGROUP_DIR [RETRY_MS]\n");
        return 2;
    }
    long retry_ms = argc == 3 ? atol(argv[2]) : 20;
    memset(chunk, 'x', sizeof chunk);
    /* stdout's buffer is allocated now, not at the wall. */
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("start %d\n", getpid());
    char path[4096];
    snprintf(path, sizeof path, "%s/cgroup.procs", argv[1]);
    FILE *f = fopen(path, "w");
    if (!f || fprintf(f, "%d\n", getpid()) < 0 || fclose(f) != 0) {
        perror(path);
        return 2;
    }
    int n = 0;
    for (; n < MAX_PIPES; n++) {
        int e = fill_one(n);
        if (e == ENOMEM)
            break;
        if (e != 0) {
            fprintf(stderr, "pipe %d: %s\n", n, strerror(e));
            return 2;
        }
    }
    if (n == MAX_PIPES) {
        fprintf(stderr, "never reached the limit\n");
        return 2;
    }
    printf("filled %d\n", n);
    double since = now_ms();
    long failed = 1;
    struct timespec pause = {retry_ms / 1000, (retry_ms % 1000) * 1000 * 1000};
    for (;;) {
        nanosleep(&pause, NULL);
        int e = fill_one(n);
        if (e == 0) {
            printf("progress %.0f %ld\n", now_ms() - since, failed);
            return 0;
        }
        if (e != ENOMEM) {
            fprintf(stderr, "retry: %s\n", strerror(e));
            return 2;
        }
        failed++;
    }
}
