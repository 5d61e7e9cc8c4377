#!/usr/bin/env bash
# The root-only integration suite again, inside a VM on a second kernel: Debian's own
# linux-image-amd64 (fetched with `apt-get download`, unpacked with `dpkg -x`, never
# installed), booted by qemu under software emulation (no KVM here) with a busybox
# initramfs that carries the test binary, oomwake, the hog and the shared libraries they
# need. The VM mounts the cgroup v1 memory hierarchy by hand and runs the suite as root
# (its own memory cgroup is the root there), then prints a result line on the serial
# console, which this script reads. Exit status: that of the suite; 1 on a timeout.
#
# With --v2 the VM mounts cgroup2 with +memory instead (no v1 memory: the controller
# lives on one hierarchy only), sets OOMWAKE_V2_ROOT and runs the v2 scenarios
# (integration/v2.rs), one at a time so the reaction times they print are not skewed.
#
#   integration/vm/run.sh [--v2] [--timeout SECONDS] [TEST-FILTER ...]
#
# Needs: qemu-system-x86 and busybox-static (Debian packages; .ci/run installs them),
# and apt lists (apt-get update) to fetch the kernel. Everything else comes from cargo.
set -euo pipefail
cd "$(dirname "$0")/../.."

timeout_s=900
v2=0
if [ "${1:-}" = "--v2" ]; then
    v2=1
    shift
fi
if [ "${1:-}" = "--timeout" ]; then
    timeout_s=$2
    shift 2
fi
filters=("$@")

work=target/vm
mkdir -p "$work"

# The kernel: the image linux-image-amd64 depends on, cached in target/vm.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
if [ -z "$kpkg" ]; then
    echo "vm: cannot resolve linux-image-amd64 (run apt-get update first)" >&2
    exit 1
fi
if ! ls "$work/kernel/boot/vmlinuz-"* >/dev/null 2>&1; then
    rm -rf "$work/kernel" "$work"/linux-image-*.deb
    (cd "$work" && apt-get download "$kpkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    deb=$(ls "$work"/linux-image-*.deb)
    dpkg -x "$deb" "$work/kernel"
    rm -f "$deb"
fi
vmlinuz=$(set -- "$work/kernel/boot/vmlinuz-"*; echo "$1")

# The binaries: the integration test executable, and the agent and hog at the absolute
# paths the test executable was built to find them (CARGO_BIN_EXE_*).
cargo build --quiet --bins
test_exe=$(cargo test --no-run --test integration --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "integration" and m.get("executable"):
        print(m["executable"])')
[ -x "$test_exe" ] || { echo "vm: no integration test executable" >&2; exit 1; }
agent=$(pwd)/target/debug/oomwake
hog=$(pwd)/target/debug/oomwake-hog

root=$work/initramfs
rm -rf "$root"
mkdir -p "$root"/{bin,proc,sys,dev,tmp,etc,root}
cp /bin/busybox "$root/bin/busybox"
for a in sh mount umount mkdir cat echo sleep true false poweroff ls rm kill ps grep dd insmod mkswap swapon swapoff; do
    ln -sf busybox "$root/bin/$a"
done
mkdir -p "$root/usr/bin"
for a in sleep true sh; do ln -sf /bin/busybox "$root/usr/bin/$a"; done
copy_with_libs() {
    local f=$1
    mkdir -p "$root$(dirname "$f")"
    cp "$f" "$root$f"
    ldd "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}
copy_with_libs "$test_exe"
copy_with_libs "$agent"
copy_with_libs "$hog"
# util-linux's prlimit and unshare: integration/hooks.rs starts the agent under them (the
# open-file limit a hook inherits; the agent as PID 1 of a PID namespace).
copy_with_libs "$(command -v prlimit)"
copy_with_libs "$(command -v unshare)"
# Files the tests find through CARGO_MANIFEST_DIR and CARGO_TARGET_TMPDIR.
mkdir -p "$root$(pwd)/target/tmp"
cp -r policies "$root$(pwd)/policies"
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "nobody:x:65534:65534:nobody:/:/bin/false" >>"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"

# Skipped in the VM: the Go test (no Go toolchain in the initramfs), the two tests that
# need reclaimable file cache (the reclaim of page cache, and the reclaim cut short by
# its timeout: the VM's only file systems are ramfs and tmpfs, whose pages reclaim cannot
# drop without swap, so reclaim ends at once), the packaging tests (they read packaging/ and run setpriv,
# neither of which is in the initramfs; they run on the host) and the policy_cli test
# that starts the agent under setpriv, the tests that compile
# their workload with gcc or javac (pinned::), run promtool (metrics_scrape::) or need a
# Docker engine (docker*): none of those tools is in the initramfs, and all of them run
# on the host, where .ci/run requires them.
# One test at a time in both modes: under emulation two tests at once on the VM's two
# vCPUs slowed each other past the bounds their waits allow (with two threads, each of
# four runs had a timing failure, each in another test).
if [ "$v2" = 1 ]; then
    args=(--test-threads=1 --nocapture)
    [ ${#filters[@]} -eq 0 ] && filters=(v2::)
    # A zram device, formatted as swap but not switched on: the one scenario that needs
    # reclaimable memory (a long memory.reclaim) swaps on for itself, the others run
    # without swap as the issue's measurements did. Its modules come with the kernel.
    kmods=$(set -- "$work/kernel/lib/modules/"*; echo "$1")
    cp "$kmods/kernel/mm/zsmalloc.ko" "$kmods/kernel/drivers/block/zram/zram.ko" "$root/"
    cgroups='mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo +memory >/sys/fs/cgroup/cgroup.subtree_control
export OOMWAKE_V2_ROOT=/sys/fs/cgroup
insmod /zsmalloc.ko && insmod /zram.ko num_devices=1 &&
    echo 512M >/sys/block/zram0/disksize && mkswap /dev/zram0 >/dev/null &&
    export OOMWAKE_V2_ZRAM=/dev/zram0'
else
    args=(--test-threads=1 --skip golang --skip reclaim_frees_page_cache --skip reclaim_is_cut_short_by_its_timeout --skip v2:: --skip packaging:: --skip run_warns_when_it_cannot_shield_itself --skip pinned:: --skip metrics_scrape:: --skip docker)
    cgroups='mount -t tmpfs cgroup /sys/fs/cgroup
mkdir -p /sys/fs/cgroup/memory
mount -t cgroup -o memory memory /sys/fs/cgroup/memory
export OOMWAKE_REQUIRE_ROOT_TESTS=1 OOMWAKE_VM=1'
fi
for f in "${filters[@]}"; do args+=("$f"); done
cat >"$root/init" <<EOF
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# /dev/shm: the tests that need files no reclaim can drop (core_inside::, early::) use it.
mkdir -p /dev/shm
mount -t tmpfs -o mode=1777 shm /dev/shm
# /tmp stays the initramfs's own (writable rootfs): a tmpfs mounted over it would hide
# the binaries when the checkout itself lives below /tmp.
chmod 1777 /tmp
$cgroups
echo "vm: kernel \$(cat /proc/sys/kernel/osrelease)"
cd /root
export RUST_BACKTRACE=1 HOME=/root PATH=/bin:/usr/bin
$test_exe ${args[*]} 2>&1
echo "OOMWAKE-VM-RESULT rc=\$?"
echo o >/proc/sysrq-trigger
sleep 30
EOF
chmod +x "$root/init"
(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null) | gzip -1 >"$work/initramfs.gz"

log=$work/console.log
echo "vm: booting $(basename "$vmlinuz") (software emulation, timeout ${timeout_s}s)"
set +e
timeout "$timeout_s" qemu-system-x86_64 -machine q35 -accel tcg,thread=multi -smp 2 -m 1536 \
    -kernel "$vmlinuz" -initrd "$work/initramfs.gz" \
    -append "console=ttyS0 quiet panic=-1 oops=panic" \
    -nographic -no-reboot -nic none </dev/null 2>&1 | tr -d '\r' | tee "$log" |
    sed -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' -e 's/\x1bc//g' | grep -v -E '^\s*$|Booting from ROM|^SeaBIOS'
set -e
rc=$(sed -n 's/.*OOMWAKE-VM-RESULT rc=\([0-9]*\).*/\1/p' "$log" | tail -1)
if [ -z "$rc" ]; then
    echo "vm: no result within ${timeout_s}s (console log: $log)" >&2
    exit 1
fi
echo "vm: suite exited $rc"
exit "$rc"
