#!/usr/bin/env bash
# CI: build the .deb, install it with apt on this machine, check that every file is in
# place and that installing started and enabled nothing, verify the installed unit with
# systemd-analyze, then remove and purge it and check that nothing is left. Runs as root
# on the real machine, so it refuses to start if oomwake is already installed or its
# paths exist, and purges the package on any exit.
#
# Usage: packaging/deb/ci.sh BINARY   (a release build of oomwake)
# Prints "deb: N checks passed" last; exits non-zero at the first failed check.
set -euo pipefail
cd "$(dirname "$0")/../.."

binary=$1
checks=0
ok() {
    checks=$((checks + 1))
    echo "ok: $*"
}
fail() {
    echo "deb: FAILED: $*" >&2
    exit 1
}

paths=(/etc/oomwake /var/lib/oomwake /var/log/oomwake /etc/logrotate.d/oomwake
    /lib/systemd/system/oomwake.service /usr/bin/oomwake /etc/systemd/system/oomwake.service)
[ "$(id -u)" = 0 ] || fail "needs root (dpkg -i)"
if [[ "$(dpkg-query -W -f='${Status}' oomwake 2>/dev/null || true)" == *" installed" ]]; then
    fail "oomwake is already installed here: not touching an operator's install"
fi
for p in "${paths[@]}"; do
    [ ! -e "$p" ] || fail "$p exists before the test: not touching it"
done

installed=0
cleanup() {
    if [ "$installed" = 1 ]; then
        dpkg --purge oomwake >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

# The agent processes running the installed binary (other agents, e.g. the tests', run
# from target/ and are not counted).
installed_agents() {
    local n=0 p
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/exe" 2>/dev/null)" = /usr/bin/oomwake ] && n=$((n + 1))
    done
    echo "$n"
}

if [ -d /run/systemd/system ]; then
    systemd_running=1
    echo "systemd is running: the maintainer scripts will talk to it"
else
    systemd_running=0
    echo "systemd is not running as PID 1 here (PID 1 is $(cat /proc/1/comm)): the" \
        "maintainer scripts skip daemon-reload; the unit is checked with systemd-analyze only"
fi

deb=$(packaging/deb/build-deb.py --binary "$binary" --out target/debian)
echo "built $deb ($(stat -c %s "$deb") bytes)"
upstream=$(sed -n '0,/^version = "\(.*\)"/s//\1/p' Cargo.toml)
[ "$(dpkg-deb -f "$deb" Version)" = "$upstream-1" ] || fail "package version is not $upstream-1"
ok "package version $upstream-1"

# As the README says (apt install ./oomwake_*.deb): apt resolves Depends, dpkg installs.
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "./$deb"
installed=1
[ "$(dpkg-query -W -f='${Status}' oomwake)" = "install ok installed" ] || fail "dpkg status"
ok "apt-get install ./$deb"

for f in /usr/bin/oomwake /lib/systemd/system/oomwake.service /etc/oomwake/oomwake.toml \
    /etc/oomwake/policies/default.toml /etc/logrotate.d/oomwake \
    /usr/share/doc/oomwake/examples/policies/go-service.toml \
    /usr/share/doc/oomwake/examples/prometheus/alerts.yaml \
    /usr/share/doc/oomwake/examples/kubernetes/daemonset.yaml \
    /usr/share/doc/oomwake/copyright /usr/share/man/man1/oomwake.1.gz \
    /usr/share/man/man1/oomwake-run.1.gz /usr/share/bash-completion/completions/oomwake \
    /usr/share/zsh/vendor-completions/_oomwake /usr/share/fish/vendor_completions.d/oomwake.fish; do
    [ -f "$f" ] || fail "$f missing"
done
[ -d /var/lib/oomwake ] && [ -d /var/log/oomwake ] || fail "state or log directory missing"
[ "$(stat -c %a /var/lib/oomwake)" = 750 ] || fail "/var/lib/oomwake is not 0750"
ok "files and directories in place"

conffiles=$(dpkg-query -W -f='${Conffiles}' oomwake)
for c in /etc/oomwake/oomwake.toml /etc/oomwake/policies/default.toml /etc/logrotate.d/oomwake; do
    grep -q " $c " <<<"$conffiles " || fail "$c is not a conffile"
done
ok "conffiles registered"

[ "$(oomwake --version)" = "oomwake $upstream" ] || fail "oomwake --version: $(oomwake --version)"
ok "oomwake --version: $(oomwake --version)"

# Installing changes nothing: the only installed policy is audit-only, the unit is
# neither enabled nor started, no agent runs.
out=$(oomwake check --policies /etc/oomwake/policies)
echo "$out"
grep -q '^ok: default (.*, audit)' <<<"$out" || fail "installed policy is not audit-only"
[ "$(grep -c '^ok: ' <<<"$out")" = 1 ] || fail "more than the one audit policy installed"
oomwake check /usr/share/doc/oomwake/examples/policies/*.toml >/dev/null || fail "examples"
ok "installed policies: one, audit-only; examples valid"
[ -z "$(find /etc/systemd/system -name 'oomwake*' 2>/dev/null)" ] || fail "unit enabled"
[ "$(installed_agents)" = 0 ] || fail "an agent was started by the install"
if [ "$systemd_running" = 1 ]; then
    ! systemctl --quiet is-active oomwake.service || fail "unit started"
fi
ok "nothing enabled or started"

# The unit, as installed (binary and man pages in place).
systemd-analyze verify /lib/systemd/system/oomwake.service
ok "systemd-analyze verify oomwake.service"
man -w oomwake-run >/dev/null || fail "man oomwake-run"
ok "man page found: $(man -w oomwake)"
if command -v logrotate >/dev/null; then
    # Captured first: `cmd | grep -q` under pipefail fails when grep exits early and the
    # writer gets SIGPIPE (that race failed CI once).
    lr=$(logrotate --debug /etc/logrotate.d/oomwake 2>&1) || fail "logrotate --debug failed: $lr"
    grep -q 'rotating pattern: /var/log/oomwake/audit.jsonl' <<<"$lr" ||
        fail "logrotate does not read /etc/logrotate.d/oomwake: $lr"
    ok "logrotate parses /etc/logrotate.d/oomwake"
fi
bash -c '. /usr/share/bash-completion/completions/oomwake && complete -p oomwake' >/dev/null ||
    fail "bash completion does not load"
ok "bash completion loads"

dpkg -r oomwake
[ ! -e /usr/bin/oomwake ] && [ ! -e /lib/systemd/system/oomwake.service ] || fail "files left after dpkg -r"
[ -f /etc/oomwake/oomwake.toml ] || fail "dpkg -r removed a conffile"
[ "$(dpkg-query -W -f='${Status}' oomwake)" = "deinstall ok config-files" ] || fail "status after -r"
ok "dpkg -r: program gone, configuration kept"

dpkg --purge oomwake
installed=0
case "$(dpkg-query -W -f='${Status}' oomwake 2>/dev/null || true)" in
"" | *" not-installed") ;;
*) fail "still installed after purge: $(dpkg-query -W -f='${Status}' oomwake)" ;;
esac
for p in "${paths[@]}"; do
    [ ! -e "$p" ] && [ ! -L "$p" ] || fail "$p left after purge"
done
[ -z "$(find /etc/systemd /var/lib/systemd -name '*oomwake*' 2>/dev/null)" ] || fail "systemd state left"
ok "dpkg --purge: nothing left"

echo "deb: $checks checks passed"
