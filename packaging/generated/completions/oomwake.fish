# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_oomwake_global_optspecs
    string join \n h/help V/version
end

function __fish_oomwake_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_oomwake_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_oomwake_using_subcommand
    set -l cmd (__fish_oomwake_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c oomwake -n "__fish_oomwake_needs_command" -s h -l help -d 'Print help'
complete -c oomwake -n "__fish_oomwake_needs_command" -s V -l version -d 'Print version'
complete -c oomwake -n "__fish_oomwake_needs_command" -f -a "run" -d 'Watch the hierarchy and resolve OOM stalls by policy (root)'
complete -c oomwake -n "__fish_oomwake_needs_command" -f -a "check" -d 'Validate policy files: exit 0 ok, 1 invalid, 2 usage'
complete -c oomwake -n "__fish_oomwake_needs_command" -f -a "explain" -d 'Which policy matches CGROUP (path below the root, or a Docker container\'s name or id) and what it would do now'
complete -c oomwake -n "__fish_oomwake_needs_command" -f -a "status" -d 'What the running agent watches and holds'
complete -c oomwake -n "__fish_oomwake_needs_command" -f -a "doctor" -d 'Report what puts the host at risk: oom_kill_disable without a limit, cgroups that can stall and that no policy covers, loans outstanding, [early] thresholds that cannot fire, policies that match nothing. Reads only. Exit 0 nothing found, 1 findings, 2 error'
complete -c oomwake -n "__fish_oomwake_needs_command" -f -a "demo" -d 'Self-contained show of a stall and its rescue (root, cgroup v1)'
complete -c oomwake -n "__fish_oomwake_needs_command" -f -a "__generate" -d 'Writes the man pages and shell completions into DIR (packaging)'
complete -c oomwake -n "__fish_oomwake_needs_command" -f -a "__hog" -d 'The memory hog used by the demo'
complete -c oomwake -n "__fish_oomwake_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c oomwake -n "__fish_oomwake_using_subcommand run" -l config -d 'Agent configuration (a missing file means defaults)' -r -F
complete -c oomwake -n "__fish_oomwake_using_subcommand run" -l policies -d 'Policy directory [default: /etc/oomwake/policies]' -r -F
complete -c oomwake -n "__fish_oomwake_using_subcommand run" -l cgroup-root -d 'Cgroup hierarchy or a subtree [default: /sys/fs/cgroup/memory, else /sys/fs/cgroup]' -r -F
complete -c oomwake -n "__fish_oomwake_using_subcommand run" -l audit-log -d 'JSON Lines audit log, reopened on SIGHUP [default: stderr]' -r -F
complete -c oomwake -n "__fish_oomwake_using_subcommand run" -l state-dir -d 'Journal of lent limits and status.json [default: /var/lib/oomwake]' -r -F
complete -c oomwake -n "__fish_oomwake_using_subcommand run" -l metrics -d 'Serve Prometheus metrics on ADDR:PORT (a bare port binds loopback)' -r
complete -c oomwake -n "__fish_oomwake_using_subcommand run" -l docker-socket -d 'Docker Engine API socket for container names, labels and images, or `none` [default: /var/run/docker.sock, used when present]' -r
complete -c oomwake -n "__fish_oomwake_using_subcommand run" -l dry-run -d 'Every policy in audit mode: log decisions, change nothing'
complete -c oomwake -n "__fish_oomwake_using_subcommand run" -l insecure-policies -d 'Development only: load policies, config and state even when they are not root\'s or are writable by group or others'
complete -c oomwake -n "__fish_oomwake_using_subcommand run" -s h -l help -d 'Print help'
complete -c oomwake -n "__fish_oomwake_using_subcommand check" -l policies -r -F
complete -c oomwake -n "__fish_oomwake_using_subcommand check" -l insecure-policies -d 'Development only: skip the owner and mode checks'
complete -c oomwake -n "__fish_oomwake_using_subcommand check" -s h -l help -d 'Print help'
complete -c oomwake -n "__fish_oomwake_using_subcommand explain" -l policies -r -F
complete -c oomwake -n "__fish_oomwake_using_subcommand explain" -l cgroup-root -r -F
complete -c oomwake -n "__fish_oomwake_using_subcommand explain" -l docker-socket -d 'Docker Engine API socket, or `none`' -r
complete -c oomwake -n "__fish_oomwake_using_subcommand explain" -l insecure-policies -d 'Development only: skip the owner and mode checks'
complete -c oomwake -n "__fish_oomwake_using_subcommand explain" -s h -l help -d 'Print help'
complete -c oomwake -n "__fish_oomwake_using_subcommand status" -l state-dir -r -F
complete -c oomwake -n "__fish_oomwake_using_subcommand status" -l json -d 'Print the raw status JSON'
complete -c oomwake -n "__fish_oomwake_using_subcommand status" -s h -l help -d 'Print help'
complete -c oomwake -n "__fish_oomwake_using_subcommand doctor" -l policies -r -F
complete -c oomwake -n "__fish_oomwake_using_subcommand doctor" -l cgroup-root -d 'Cgroup hierarchy or a subtree: only what is below it is reported [default: /sys/fs/cgroup/memory, else /sys/fs/cgroup]' -r -F
complete -c oomwake -n "__fish_oomwake_using_subcommand doctor" -l state-dir -d 'Where the agent journals its loans' -r -F
complete -c oomwake -n "__fish_oomwake_using_subcommand doctor" -l json -d 'Print the report as JSON'
complete -c oomwake -n "__fish_oomwake_using_subcommand doctor" -l insecure-policies -d 'Development only: skip the owner and mode checks'
complete -c oomwake -n "__fish_oomwake_using_subcommand doctor" -s h -l help -d 'Print help'
complete -c oomwake -n "__fish_oomwake_using_subcommand demo" -l cgroup-root -r -F
complete -c oomwake -n "__fish_oomwake_using_subcommand demo" -s h -l help -d 'Print help'
complete -c oomwake -n "__fish_oomwake_using_subcommand __generate" -s h -l help -d 'Print help'
complete -c oomwake -n "__fish_oomwake_using_subcommand __hog" -s h -l help -d 'Print help'
complete -c oomwake -n "__fish_oomwake_using_subcommand help; and not __fish_seen_subcommand_from run check explain status doctor demo __generate __hog help" -f -a "run" -d 'Watch the hierarchy and resolve OOM stalls by policy (root)'
complete -c oomwake -n "__fish_oomwake_using_subcommand help; and not __fish_seen_subcommand_from run check explain status doctor demo __generate __hog help" -f -a "check" -d 'Validate policy files: exit 0 ok, 1 invalid, 2 usage'
complete -c oomwake -n "__fish_oomwake_using_subcommand help; and not __fish_seen_subcommand_from run check explain status doctor demo __generate __hog help" -f -a "explain" -d 'Which policy matches CGROUP (path below the root, or a Docker container\'s name or id) and what it would do now'
complete -c oomwake -n "__fish_oomwake_using_subcommand help; and not __fish_seen_subcommand_from run check explain status doctor demo __generate __hog help" -f -a "status" -d 'What the running agent watches and holds'
complete -c oomwake -n "__fish_oomwake_using_subcommand help; and not __fish_seen_subcommand_from run check explain status doctor demo __generate __hog help" -f -a "doctor" -d 'Report what puts the host at risk: oom_kill_disable without a limit, cgroups that can stall and that no policy covers, loans outstanding, [early] thresholds that cannot fire, policies that match nothing. Reads only. Exit 0 nothing found, 1 findings, 2 error'
complete -c oomwake -n "__fish_oomwake_using_subcommand help; and not __fish_seen_subcommand_from run check explain status doctor demo __generate __hog help" -f -a "demo" -d 'Self-contained show of a stall and its rescue (root, cgroup v1)'
complete -c oomwake -n "__fish_oomwake_using_subcommand help; and not __fish_seen_subcommand_from run check explain status doctor demo __generate __hog help" -f -a "__generate" -d 'Writes the man pages and shell completions into DIR (packaging)'
complete -c oomwake -n "__fish_oomwake_using_subcommand help; and not __fish_seen_subcommand_from run check explain status doctor demo __generate __hog help" -f -a "__hog" -d 'The memory hog used by the demo'
complete -c oomwake -n "__fish_oomwake_using_subcommand help; and not __fish_seen_subcommand_from run check explain status doctor demo __generate __hog help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
