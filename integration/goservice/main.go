// A Go service in miniature, for the integration test of the incident that started
// oomwake: it joins a cgroup (not when CGROUP_DIR is "-": in a container it is already
// in one), then grows a live heap in 1 MiB pieces while the garbage
// collector runs (GOGC set by the test), printing a tick line every 50 ms from another
// goroutine. At a memory limit with the OOM killer disabled, a fault of the GC or of the
// allocator sleeps in the kernel and the whole program stops: no more ticks.
package main

import (
	"fmt"
	"os"
	"strconv"
	"time"
)

var live [][]byte

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: goservice CGROUP_DIR MIB")
		os.Exit(2)
	}
	if os.Args[1] != "-" {
		procs := os.Args[1] + "/cgroup.procs"
		if err := os.WriteFile(procs, []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "join:", err)
			os.Exit(1)
		}
	}
	mib, _ := strconv.Atoi(os.Args[2])
	go func() {
		for i := 0; ; i++ {
			fmt.Printf("tick %d\n", i)
			time.Sleep(50 * time.Millisecond)
		}
	}()
	for i := 0; i < mib; i++ {
		b := make([]byte, 1<<20)
		for j := 0; j < len(b); j += 4096 {
			b[j] = byte(j)
		}
		live = append(live, b)
		// Garbage too, so that the collector has work to do.
		_ = make([]byte, 256<<10)
		time.Sleep(2 * time.Millisecond)
	}
	fmt.Printf("done %d\n", len(live))
	time.Sleep(60 * time.Second)
}
