/* A page toucher for the Docker tests, built with `gcc -static` into a FROM scratch
 * image: it maps MIB MiB (argv[1], default 96) and writes one byte per page, 1 MiB at a
 * time, printing "touched N" after each MiB and "done N" at the end; then it sleeps until
 * it is stopped. At a container's memory limit with the OOM killer disabled, a page fault
 * sleeps in the kernel (mem_cgroup_oom_synchronize) and the lines stop. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long mib = argc > 1 ? strtol(argv[1], NULL, 10) : 96;
    long page = sysconf(_SC_PAGESIZE);
    if (mib <= 0 || page <= 0) {
        fprintf(stderr, "usage: toucher [MIB]\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    char *p = mmap(NULL, (size_t)mib << 20, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    for (long m = 0; m < mib; m++) {
        for (long off = 0; off < (1L << 20); off += page)
            p[(m << 20) + off] = (char)m;
        printf("touched %ld\n", m + 1);
    }
    printf("done %ld\n", mib);
    for (;;)
        pause();
}
