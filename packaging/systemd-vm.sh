#!/usr/bin/env bash
# The README's Install section run for real, on a Debian system booted with systemd as
# PID 1 (the CI machine's PID 1 is not systemd): a VM on Debian's own kernel (the one
# integration/vm/run.sh fetches into target/vm/), under qemu's software emulation, whose
# root file system is a debootstrap'd Debian (minbase + systemd + procps), packed as the
# initramfs and booted with rdinit=/lib/systemd/systemd. In the guest
# packaging/systemd-vm/check.sh runs `apt install ./oomwake_*.deb` (offline) and
# `systemctl enable --now oomwake`, checks the running unit (READY=1, capabilities,
# oom_score_adj, watchdog, reload, a real stall rescued on systemd's cgroup v2, stop),
# then `apt remove` and `apt purge`, and prints one PASS/FAIL line per check on the
# serial console, which this script reads.
#
#   packaging/systemd-vm.sh [--timeout SECONDS]
#
# The root file system is built once and cached in target/systemd-vm/ (rebuilt when the
# package list, the suite or the mirror changes). The .deb is built from
# target/release/oomwake (cargo build --release) with packaging/deb/build-deb.py.
# Needs: root (debootstrap), debootstrap, qemu-system-x86, busybox-static (Debian
# packages; .ci/run installs them), current apt lists (the kernel) and the Debian mirror
# of /etc/apt/sources.list (the root file system, on a cache miss).
# Prints "systemd-vm: N checks passed" last; exits 1 on a failed check or a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."

timeout_s=900
if [ "${1:-}" = "--timeout" ]; then
    timeout_s=$2
    shift 2
fi
work=target/systemd-vm
mkdir -p "$work" target/vm
start=$(date +%s)
stamp() { echo "systemd-vm: $* ($(($(date +%s) - start)) s)"; }

# The kernel: the same image (and cache) as integration/vm/run.sh.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
if [ -z "$kpkg" ]; then
    echo "systemd-vm: cannot resolve linux-image-amd64 (run apt-get update first)" >&2
    exit 1
fi
if ! ls target/vm/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
    rm -rf target/vm/kernel target/vm/linux-image-*.deb
    (cd target/vm && apt-get download "$kpkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    dpkg -x "$(ls target/vm/linux-image-*.deb)" target/vm/kernel
    rm -f target/vm/linux-image-*.deb
fi
vmlinuz=$(set -- target/vm/kernel/boot/vmlinuz-*; echo "$1")

# The root file system: the host's suite from the host's Debian mirror. procps: the
# unit's ExecReload runs /bin/kill (Priority: important, so on every Debian install
# but minbase; the package depends on it).
. /etc/os-release
suite=${VERSION_CODENAME:-bookworm}
mirror=$(apt-cache policy 2>/dev/null | awk -v s="$suite" '$3 ~ "^" s "/main" && $2 ~ /^https?:\/\// { print $2; exit }')
mirror=${mirror:-http://deb.debian.org/debian}
include=systemd,systemd-sysv,procps
key="$suite $mirror minbase $include v1"
if [ "$(cat "$work/rootfs.key" 2>/dev/null)" = "$key" ] && [ -f "$work/rootfs.cpio" ]; then
    stamp "root file system cached ($key)"
else
    stamp "debootstrap $suite from $mirror ($include)"
    rm -rf "$work/rootfs" "$work/rootfs.cpio" "$work/rootfs.key"
    # Two tries: a download that fails half-way (a mirror push) fails the whole run.
    for try in 1 2; do
        rm -rf "$work/rootfs"
        if debootstrap --variant=minbase --include="$include" "$suite" "$work/rootfs" "$mirror" \
            >"$work/debootstrap.log" 2>&1; then
            break
        fi
        tail -5 "$work/debootstrap.log" >&2
        if [ "$try" = 2 ]; then
            echo "systemd-vm: debootstrap failed twice (log: $work/debootstrap.log)" >&2
            exit 1
        fi
        echo "systemd-vm: debootstrap failed, once more" >&2
    done
    # Smaller initramfs: the downloaded packages, documentation and translations.
    rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/usr/share/{doc,man,info,locale}/*
    # No login prompt on the serial console (the check's output goes there).
    ln -sf /dev/null "$work/rootfs/etc/systemd/system/serial-getty@ttyS0.service"
    ln -sf /dev/null "$work/rootfs/etc/systemd/system/getty@tty1.service"
    (cd "$work/rootfs" && find . | busybox cpio -o -H newc 2>/dev/null) >"$work/rootfs.cpio"
    rm -rf "$work/rootfs"
    echo "$key" >"$work/rootfs.key"
    stamp "root file system built: $(($(stat -c %s "$work/rootfs.cpio") >> 20)) MiB"
fi

# The package, as the README builds it.
cargo build --quiet --release --locked --bin oomwake
rm -rf "$work/deb"
deb=$(packaging/deb/build-deb.py --binary target/release/oomwake --out "$work/deb")
stamp "built $(basename "$deb")"

# What the guest gets on top: the .deb in /root, the check and the unit that runs it.
ov=$work/overlay
rm -rf "$ov"
mkdir -p "$ov/root" "$ov/usr/local/sbin" "$ov/etc/systemd/system/multi-user.target.wants"
cp "$deb" "$ov/root/"
install -m 0755 packaging/systemd-vm/check.sh "$ov/usr/local/sbin/sysvm-check"
cat >"$ov/etc/systemd/system/sysvm-check.service" <<'EOF'
[Unit]
Description=oomwake install check (packaging/systemd-vm.sh)
After=basic.target

[Service]
Type=simple
ExecStart=/usr/local/sbin/sysvm-check
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0

[Install]
WantedBy=multi-user.target
EOF
ln -s ../sysvm-check.service "$ov/etc/systemd/system/multi-user.target.wants/sysvm-check.service"
# Concatenated newc archives: the kernel unpacks both, the second over the first.
{
    cat "$work/rootfs.cpio"
    (cd "$ov" && find . | busybox cpio -o -H newc 2>/dev/null)
} >"$work/initrd.cpio"

log=$work/console.log
stamp "booting $(basename "$vmlinuz") with systemd as PID 1 (software emulation, timeout ${timeout_s}s)"
set +e
timeout "$timeout_s" qemu-system-x86_64 -machine q35 -accel tcg,thread=multi -smp 2 -m 2048 \
    -kernel "$vmlinuz" -initrd "$work/initrd.cpio" \
    -append "console=ttyS0 rdinit=/lib/systemd/systemd SYSTEMD_IN_INITRD=0 systemd.show_status=error quiet panic=-1" \
    -nographic -no-reboot -nic none </dev/null 2>&1 | tr -d '\r' |
    sed -u -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' -e 's/\x1bc//g' | tee "$log" |
    grep -v -E '^\s*$|Booting from ROM|^SeaBIOS'
set -e
rm -f "$work/initrd.cpio"
stamp "VM done"
done_line=$(grep -a '^SYSVM-DONE' "$log" | tail -1 || true)
passed=$(grep -a -c '^SYSVM: PASS ' "$log" || true)
failed=$(grep -a -c '^SYSVM: FAIL ' "$log" || true)
if [ -z "$done_line" ]; then
    echo "systemd-vm: the check did not finish within ${timeout_s}s (console log: $log)" >&2
    exit 1
fi
# The guest's own count must match the lines read (none lost on the console).
if [ "$failed" != 0 ] || [[ "$done_line" != "SYSVM-DONE pass=$passed fail=0 "* ]]; then
    echo "systemd-vm: $failed checks failed, guest says: $done_line (console log: $log)" >&2
    grep -a '^SYSVM: FAIL ' "$log" >&2 || true
    exit 1
fi
echo "systemd-vm: $passed checks passed"
