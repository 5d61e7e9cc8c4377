#!/bin/bash
# Runs inside the VM of packaging/systemd-vm.sh, started by sysvm-check.service on
# a Debian bookworm booted with systemd as PID 1. Does what the README's Install section
# says (apt install ./oomwake_*.deb, systemctl enable --now oomwake), checks the running
# unit, then removes and purges the package. Every check prints one line on the serial
# console, "SYSVM: PASS NAME: detail" or "SYSVM: FAIL NAME: detail"; the last line is
# "SYSVM-DONE pass=N fail=M"; then the VM powers off. The host script asserts on these.
set -u
export DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C
pass=0
fail=0
ok() {
    pass=$((pass + 1))
    echo "SYSVM: PASS $1: ${*:2}"
}
bad() {
    fail=$((fail + 1))
    echo "SYSVM: FAIL $1: ${*:2}"
}
info() { echo "SYSVM: info: $*"; }
prop() { systemctl show -P "$2" "$1"; }
agents() {
    local n=0 p
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/exe" 2>/dev/null)" = /usr/bin/oomwake ] && n=$((n + 1))
    done
    echo "$n"
}
t_start=$(date +%s)
elapsed() { echo "$(($(date +%s) - t_start)) s"; }

# The stall: a transient service with MemoryMax=64M whose perl grows to 80 MiB in 1 MiB
# steps once /run/vmstall.go exists. With nothing watching it, the kernel kills it at
# memory.max (Result=oom-kill); the vm-stall policy holds it at memory.high (90%) and
# lends 50% when it stalls there, so it finishes (Result=success).
stall() {
    local unit=$1 go=/run/$1.go i cg
    rm -f "$go"
    systemd-run --quiet --unit="$unit" --remain-after-exit -p MemoryMax=64M -p MemorySwapMax=0 \
        /bin/sh -c "while [ ! -e $go ]; do sleep 0.2; done; exec perl -e 'my @a; push @a, \"x\" x 1048576 for 1..80; print \"grew to 80 MiB\\n\"'"
    cg=/sys/fs/cgroup/system.slice/$unit.service
    if [ "$2" = held ]; then
        # Start growing once the agent holds the cgroup at memory.high.
        for i in $(seq 1 150); do
            [ "$(cat "$cg/memory.high" 2>/dev/null)" != max ] && break
            sleep 0.2
        done
        info "$unit memory.max $(cat "$cg/memory.max") memory.high $(cat "$cg/memory.high")" >&2
    fi
    touch "$go"
    for i in $(seq 1 240); do
        case "$(prop "$unit" SubState)" in exited | failed | dead) break ;; esac
        sleep 0.5
    done
    echo "$(prop "$unit" Result) $(prop "$unit" ExecMainStatus) $(prop "$unit" SubState)"
}

info "PID 1 $(cat /proc/1/comm), $(systemctl --version | head -1), kernel $(uname -r)"
if [ "$(cat /proc/1/comm)" = systemd ]; then ok systemd-pid1 "systemd is PID 1"; else bad systemd-pid1 "PID 1 is $(cat /proc/1/comm)"; fi
info "/sys/fs/cgroup is $(stat -fc %T /sys/fs/cgroup), controllers: $(cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null)"
info "boot: $(systemctl is-system-running --wait 2>&1); failed units: $(systemctl list-units --failed --plain --no-legend | awk '{ print $1 }' | tr '\n' ' ')"

cd /root
deb=$(ls ./oomwake_*.deb)
# As the README says: apt install ./oomwake_*.deb. No network: the dependencies are
# resolved from what the system has installed.
out=$(apt install -y "$deb" 2>&1)
rc=$?
echo "$out" | sed 's/^/  apt: /'
if [ $rc = 0 ] && [ "$(dpkg-query -W -f='${Status}' oomwake)" = "install ok installed" ]; then
    ok apt-install "apt install $deb (exit 0, $(dpkg-query -W -f='${Version}' oomwake))"
else
    bad apt-install "apt install $deb exit $rc, status $(dpkg-query -W -f='${Status}' oomwake 2>&1)"
fi

st="$(systemctl is-enabled oomwake 2>&1) $(systemctl is-active oomwake 2>&1) agents=$(agents)"
if [ "$st" = "disabled inactive agents=0" ]; then ok installed-not-started "after install: $st"; else bad installed-not-started "after install: $st"; fi

# As the README says: systemctl enable --now oomwake.
out=$(systemctl enable --now oomwake 2>&1)
rc=$?
echo "$out" | sed 's/^/  systemctl: /'
st="$(systemctl is-enabled oomwake 2>&1) $(systemctl is-active oomwake 2>&1)"
if [ $rc = 0 ] && [ "$st" = "enabled active" ]; then ok enable-now "systemctl enable --now oomwake: exit 0, $st"; else bad enable-now "exit $rc, $st"; fi
t_up=$(date +%s)

# Type=notify: systemd moves the unit to active only once READY=1 came.
s="Type=$(prop oomwake Type) NotifyAccess=$(prop oomwake NotifyAccess) ActiveState=$(prop oomwake ActiveState) SubState=$(prop oomwake SubState)"
if [ "$s" = "Type=notify NotifyAccess=main ActiveState=active SubState=running" ]; then ok ready "READY=1 received: $s"; else bad ready "$s"; fi
pid=$(prop oomwake MainPID)
if [ "$(readlink /proc/"$pid"/exe)" = /usr/bin/oomwake ]; then ok main-pid "MainPID $pid is /usr/bin/oomwake"; else bad main-pid "MainPID $pid is $(readlink /proc/"$pid"/exe)"; fi

# The unit's privileges, as the kernel sees them: uid 0 with CAP_KILL (5) and
# CAP_IPC_LOCK (14) only: 1<<5 | 1<<14 = 0x4020.
caps=$(awk '/^(Uid|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):/ { printf "%s%s ", $1, $2 }' /proc/"$pid"/status)
want="Uid:0 CapInh:0000000000000000 CapPrm:0000000000004020 CapEff:0000000000004020 CapBnd:0000000000004020 CapAmb:0000000000000000 NoNewPrivs:1 "
if [ "$caps" = "$want" ]; then ok capabilities "$caps(CAP_KILL, CAP_IPC_LOCK)"; else bad capabilities "$caps; want $want"; fi
adj=$(cat /proc/"$pid"/oom_score_adj)
if [ "$adj" = -1000 ]; then ok oom-score-adj "oom_score_adj $adj"; else bad oom-score-adj "oom_score_adj $adj"; fi
locked=$(awk '/^VmLck:/ { print $2 }' /proc/"$pid"/status)
if [ "${locked:-0}" -gt 0 ]; then ok mlockall "VmLck ${locked} kB (mlockall under the unit's sandbox)"; else bad mlockall "VmLck ${locked:-?} kB"; fi

out=$(oomwake status 2>&1)
rc=$?
echo "$out" | sed 's/^/  status: /'
if [ $rc = 0 ] && grep -q "^oomwake running (pid $pid)" <<<"$out"; then ok status "oomwake status: running (pid $pid)"; else bad status "oomwake status exit $rc"; fi

# Reload (SIGHUP through ExecReload=/bin/kill) with a policy that acts on the stall.
cat >/etc/oomwake/policies/vm-stall.toml <<'EOF'
name = "vm-stall"
mode = "enforce"
priority = 10
[match]
cgroup = ["/system.slice/vmstall.service"]
[v2]
hold_at = "90%"
[[step]]
action = "raise_limit"
by = "50%"
max_extra = "50%"
hold = "2m"
EOF
out=$(oomwake check --policies /etc/oomwake/policies 2>&1)
echo "$out" | sed 's/^/  check: /'
out=$(systemctl reload oomwake 2>&1)
rc=$?
[ -z "$out" ] || echo "$out" | sed 's/^/  reload: /'
sleep 3
s="$(systemctl is-active oomwake) MainPID=$(prop oomwake MainPID) NRestarts=$(prop oomwake NRestarts)"
if [ $rc = 0 ] && [ "$s" = "active MainPID=$pid NRestarts=0" ]; then ok reload "systemctl reload oomwake: exit 0, $s"; else
    bad reload "exit $rc, $s"
    journalctl -u oomwake --no-pager -o cat | tail -5 | sed 's/^/  journal: /'
fi
for i in $(seq 1 20); do
    oomwake status 2>/dev/null | grep -q '^policies:.*vm-stall' && break
    sleep 0.5
done
p=$(oomwake status 2>&1 | grep '^policies:')
if grep -q vm-stall <<<"$p"; then ok reload-policies "after reload, $p"; else bad reload-policies "after reload, $p"; fi

# A real stall, under the unit's sandbox and capabilities, on systemd's cgroup v2.
r=$(stall vmstall held)
info "vmstall: Result ExecMainStatus SubState = $r"
journalctl -u vmstall --no-pager -o cat 2>/dev/null | sed 's/^/  vmstall: /' | tail -5
grep -a vmstall /var/log/oomwake/audit.jsonl | cut -c1-300 | sed 's/^/  audit: /'
if [ "${r%% *}" = success ] && grep -a vmstall /var/log/oomwake/audit.jsonl | grep -q '"raise_limit"'; then
    ok stall-rescued "MemoryMax=64M service grew to 80 MiB: held at memory.high, raise_limit, Result=success"
else
    bad stall-rescued "Result ExecMainStatus SubState = $r"
fi

# The watchdog: alive after more than WatchdogSec, never restarted. systemd kills a
# service WatchdogSec after its start or its last WATCHDOG=1, so this means pings came
# (the wedged loop below shows the watchdog is armed).
wd=$(prop oomwake WatchdogUSec)
while [ $(($(date +%s) - t_up)) -le 40 ]; do sleep 1; done
s="$(systemctl is-active oomwake) MainPID=$(prop oomwake MainPID) NRestarts=$(prop oomwake NRestarts)"
if [ "$wd" = 30s ] && [ "$s" = "active MainPID=$pid NRestarts=0" ]; then
    ok watchdog "WatchdogSec=$wd, $(($(date +%s) - t_up)) s after start: $s"
else
    bad watchdog "WatchdogSec=$wd, $(($(date +%s) - t_up)) s after start: $s"
fi

# A wedged event loop (SIGSTOP): systemd's watchdog must kill and restart it.
kill -STOP "$pid"
t0=$(date +%s)
for i in $(seq 1 150); do
    [ "$(prop oomwake NRestarts)" -ge 1 ] && [ "$(systemctl is-active oomwake)" = active ] && break
    sleep 1
done
npid=$(prop oomwake MainPID)
s="$(systemctl is-active oomwake) NRestarts=$(prop oomwake NRestarts) MainPID $pid -> $npid"
if journalctl -u oomwake --no-pager -o cat | grep -q 'Watchdog timeout' && [ "$(prop oomwake NRestarts)" = 1 ] &&
    [ "$npid" != "$pid" ] && [ "$(systemctl is-active oomwake)" = active ]; then
    ok watchdog-restart "stopped loop killed by the watchdog and restarted after $(($(date +%s) - t0)) s: $s"
else
    bad watchdog-restart "$s"
fi
journalctl -u oomwake --no-pager -o cat | grep -i -E 'watchdog|main process exited|scheduled restart' | sed 's/^/  journal: /'

out=$(systemctl stop oomwake 2>&1)
rc=$?
s="$(systemctl is-active oomwake) agents=$(agents) Result=$(prop oomwake Result)"
if [ $rc = 0 ] && [ "$s" = "inactive agents=0 Result=success" ]; then ok stop "systemctl stop oomwake: $s"; else bad stop "exit $rc, $s $out"; fi

# The same stall with no agent: the kernel kills it (the stall above was real).
r=$(stall vmstall2 free)
if [ "${r%% *}" = oom-kill ]; then ok stall-control "without the agent the same service is OOM-killed: $r"; else bad stall-control "Result ExecMainStatus SubState = $r"; fi

# apt remove stops a running agent and keeps the configuration.
rm -f /etc/oomwake/policies/vm-stall.toml
systemctl start oomwake
a=$(agents)
out=$(apt remove -y oomwake 2>&1)
rc=$?
echo "$out" | sed 's/^/  apt: /' | tail -3
s="$(dpkg-query -W -f='${Status}' oomwake) agents=$a->$(agents)"
if [ $rc = 0 ] && [ "$s" = "deinstall ok config-files agents=1->0" ] && [ ! -e /usr/bin/oomwake ] &&
    [ ! -e /lib/systemd/system/oomwake.service ] && [ -f /etc/oomwake/oomwake.toml ]; then
    ok apt-remove "apt remove: agent stopped, program gone, /etc/oomwake kept ($s)"
else
    bad apt-remove "exit $rc, $s"
fi

out=$(apt purge -y oomwake 2>&1)
rc=$?
echo "$out" | sed 's/^/  apt: /' | tail -3
systemctl daemon-reload
left=$(find /etc/oomwake /var/lib/oomwake /var/log/oomwake /etc/logrotate.d/oomwake /usr/bin/oomwake \
    /usr/share/doc/oomwake 2>/dev/null; find /etc/systemd /lib/systemd /var/lib/systemd -name '*oomwake*' 2>/dev/null)
units=$(systemctl list-unit-files --no-legend 'oomwake*')
st=$(dpkg-query -W -f='${Status}' oomwake 2>/dev/null || true)
if [ $rc = 0 ] && [ -z "$left" ] && [ -z "$units" ] && { [ -z "$st" ] || [ "$st" = "unknown ok not-installed" ]; }; then
    ok apt-purge "apt purge: nothing left (files, systemd links and state, dpkg status)"
else
    bad apt-purge "exit $rc, status '$st', left: $left $units"
fi

echo "SYSVM-DONE pass=$pass fail=$fail in $(elapsed)"
# (without D-Bus in the guest systemctl says "Failed to connect to bus" and uses systemd directly)
systemctl poweroff --no-block 2>/dev/null || echo o >/proc/sysrq-trigger
