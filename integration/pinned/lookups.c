/* A workload that makes progress at its memory limit without moving a page: it looks
 * up names that do not exist (each lookup leaves a negative dentry, kernel memory
 * charged to the cgroup) as fast as it can. At the wall every new dentry's charge
 * fails, reclaim frees old dentries, the charge succeeds: memory.failcnt rises by
 * thousands a second, usage sits at the limit, the page counters (pgpgin/pgpgout)
 * stay still, and the lookups go on.
 *
 * Usage: lookups CGROUP_DIR DIR SECONDS
 * Joins the cgroup, prints "start", looks up DIR/x-<n> for SECONDS, prints "done <n>".
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: lookups CGROUP_DIR DIR SECONDS\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    char path[4096];
    snprintf(path, sizeof path, "%s/cgroup.procs", argv[1]);
    FILE *f = fopen(path, "w");
    if (!f || fprintf(f, "0\n") < 0 || fclose(f) != 0) {
        perror(path);
        return 2;
    }
    printf("start\n");
    time_t end = time(NULL) + atol(argv[3]);
    struct stat st;
    long n = 0;
    while (time(NULL) < end) {
        for (int k = 0; k < 1000; k++, n++) {
            snprintf(path, sizeof path, "%s/x-%ld", argv[2], n);
            stat(path, &st);
        }
    }
    printf("done %ld\n", n);
    return 0;
}
