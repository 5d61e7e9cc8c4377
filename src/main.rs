//! The `oomwake` command line: run, check, explain, status, demo.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use oomwake::agent;
use oomwake::cgroup::CgroupPath;
use oomwake::config::{self, Config};
use oomwake::perm::{self, Owners};
use oomwake::policy::{self, PolicySet, Trust};
use oomwake::shared::Status;

#[derive(Parser)]
#[command(
    name = "oomwake",
    version,
    about = "Userspace OOM handler for memory cgroups with the kernel OOM killer disabled"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Watch the hierarchy and resolve OOM stalls by policy (root).
    Run {
        /// Agent configuration (a missing file means defaults).
        #[arg(long, default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Policy directory [default: /etc/oomwake/policies].
        #[arg(long)]
        policies: Option<PathBuf>,
        /// Cgroup hierarchy or a subtree [default: /sys/fs/cgroup/memory, else /sys/fs/cgroup].
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// Every policy in audit mode: log decisions, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// JSON Lines audit log, reopened on SIGHUP [default: stderr].
        #[arg(long)]
        audit_log: Option<PathBuf>,
        /// Journal of lent limits and status.json [default: /var/lib/oomwake].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Serve Prometheus metrics on ADDR:PORT (a bare port binds loopback).
        #[arg(long)]
        metrics: Option<String>,
        /// Development only: load policies, config and state even when they are not
        /// root's or are writable by group or others.
        #[arg(long)]
        insecure_policies: bool,
        /// Docker Engine API socket for container names, labels and images, or `none`
        /// [default: /var/run/docker.sock, used when present].
        #[arg(long, value_name = "PATH|none")]
        docker_socket: Option<String>,
    },
    /// Validate policy files: exit 0 ok, 1 invalid, 2 usage.
    Check {
        #[arg(long, conflicts_with = "files")]
        policies: Option<PathBuf>,
        files: Vec<PathBuf>,
        /// Development only: skip the owner and mode checks.
        #[arg(long)]
        insecure_policies: bool,
    },
    /// Which policy matches CGROUP (path below the root, or a Docker container's name
    /// or id) and what it would do now.
    Explain {
        #[arg(long, default_value = config::DEFAULT_POLICIES)]
        policies: PathBuf,
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// Development only: skip the owner and mode checks.
        #[arg(long)]
        insecure_policies: bool,
        /// Docker Engine API socket, or `none`.
        #[arg(long, value_name = "PATH|none", default_value = config::DEFAULT_DOCKER_SOCKET)]
        docker_socket: String,
        #[arg(value_name = "CGROUP|CONTAINER")]
        cgroup: String,
    },
    /// What the running agent watches and holds.
    Status {
        #[arg(long, default_value = config::DEFAULT_STATE)]
        state_dir: PathBuf,
        /// Print the raw status JSON.
        #[arg(long)]
        json: bool,
    },
    /// Report what puts the host at risk: oom_kill_disable without a limit, cgroups that
    /// can stall and that no policy covers, loans outstanding, [early] thresholds that
    /// cannot fire, policies that match nothing. Reads only. Exit 0 nothing found,
    /// 1 findings, 2 error.
    Doctor {
        #[arg(long, default_value = config::DEFAULT_POLICIES)]
        policies: PathBuf,
        /// Cgroup hierarchy or a subtree: only what is below it is reported
        /// [default: /sys/fs/cgroup/memory, else /sys/fs/cgroup].
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// Where the agent journals its loans.
        #[arg(long, default_value = config::DEFAULT_STATE)]
        state_dir: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Development only: skip the owner and mode checks.
        #[arg(long)]
        insecure_policies: bool,
    },
    /// Self-contained show of a stall and its rescue (root, cgroup v1).
    Demo {
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
    },
    /// Writes the man pages and shell completions into DIR (packaging).
    #[command(name = "__generate", hide = true)]
    Generate { dir: PathBuf },
    /// The memory hog used by the demo.
    #[command(name = "__hog", hide = true)]
    Hog {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// `oomwake doctor`: exit 0 nothing found, 1 findings, 2 the scan could not be done.
fn doctor(
    policies: &std::path::Path,
    cgroup_root: Option<PathBuf>,
    state_dir: &std::path::Path,
    json: bool,
    insecure_policies: bool,
) -> ExitCode {
    let set = match policy::load_dir_with(policies, trust(insecure_policies)) {
        Ok(s) => s,
        Err(errs) => {
            for e in errs {
                eprintln!("{e}");
            }
            return ExitCode::from(2);
        }
    };
    let root = cgroup_root.unwrap_or_else(|| Config::default().cgroup_root);
    // Container metadata for the policies that match on it, when the engine is there.
    let sock = std::path::Path::new(config::DEFAULT_DOCKER_SOCKET);
    let sock = sock.exists().then_some(sock);
    let report =
        match oomwake::doctor::run(&set, &root, std::path::Path::new("/proc"), state_dir, sock) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("oomwake doctor: {e}");
                return ExitCode::from(2);
            }
        };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("oomwake doctor: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", oomwake::term::escape_text(&report.text()));
    }
    if report.findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// What `explain` is about: a cgroup path (with `/`), or a container the engine knows by
/// that name or id (its cgroup read from its first process), and the container's
/// metadata when there is one.
fn explain_target(
    arg: &str,
    root: &std::path::Path,
    engine: Option<&oomwake::container::docker::Engine>,
) -> Result<(CgroupPath, Option<oomwake::container::Meta>), String> {
    let proc_root = std::path::Path::new("/proc");
    if !arg.contains('/') {
        if let Some(e) = engine {
            match e.inspect_with_pid(arg) {
                Ok(Some((meta, Some(pid)))) => {
                    let text = std::fs::read(proc_root.join(format!("{pid}/cgroup")))
                        .map_err(|err| format!("container {arg}: /proc/{pid}/cgroup: {err}"))?;
                    let h = oomwake::cgroup::Hierarchy::detect(root, proc_root)
                        .map_err(|err| err.to_string())?;
                    let cg = oomwake::cgroup::parse::proc_memory_cgroup_bytes(&text)
                        .and_then(|p| h.from_proc_path(p))
                        .ok_or_else(|| {
                            format!(
                                "container {arg}: its memory cgroup is not below {}",
                                root.display()
                            )
                        })?;
                    return Ok((cg, Some(meta)));
                }
                Ok(Some((_, None))) => {
                    return Err(format!("container {arg} is not running: it has no cgroup"))
                }
                Ok(None) => {}
                Err(err) if err.is_untrusted() => {
                    log::error!("docker: {err}; taking {arg:?} as a cgroup path")
                }
                Err(err) => log::warn!("docker: {err}; taking {arg:?} as a cgroup path"),
            }
        }
    }
    // A path from the command line must not leave the root (`..`).
    let cg = CgroupPath::parse(arg).map_err(|e| e.to_string())?;
    let id = oomwake::container::identify(cg.as_bytes())
        .filter(|i| i.is_container())
        .and_then(|i| i.container_id);
    let meta = match (id, engine) {
        (Some(id), Some(e)) => e.inspect(&id).unwrap_or_else(|err| {
            if err.is_untrusted() {
                log::error!("docker: {err}; the container's name, labels and image are unknown");
            } else {
                log::warn!("docker: {err}");
            }
            None
        }),
        _ => None,
    };
    Ok((cg, meta))
}

fn main() -> ExitCode {
    // Before any thread exists: one malloc heap that the agent can reserve and lock.
    oomwake::sys::tune_malloc();
    // Log records go through the audit module's stderr queue (never blocking), so they
    // are written out before the process exits.
    oomwake::audit::init_logger();
    let code = cli_main();
    oomwake::audit::flush_stderr(oomwake::audit::DRAIN_TIMEOUT);
    code
}

fn cli_main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            config,
            policies,
            cgroup_root,
            dry_run,
            audit_log,
            state_dir,
            metrics,
            insecure_policies,
            docker_socket,
        } => {
            let trust = trust(insecure_policies);
            let build = move || -> Result<Config, String> {
                // Judged on the descriptor it is read from (a missing one by where it
                // would be).
                let mut cfg = Config::load(&config, trust)?;
                if let Some(p) = &policies {
                    cfg.policies = p.clone();
                }
                if let Some(r) = &cgroup_root {
                    cfg.cgroup_root = r.clone();
                }
                if let Some(a) = &audit_log {
                    cfg.audit_log = Some(a.clone());
                }
                if let Some(s) = &state_dir {
                    cfg.state_dir = s.clone();
                }
                if let Some(m) = &metrics {
                    cfg.metrics = Some(config::parse_addr(m)?);
                }
                if let Some(d) = &docker_socket {
                    cfg.docker_socket = config::docker_socket(d);
                    cfg.docker_socket_explicit = true;
                }
                cfg.dry_run |= dry_run;
                cfg.trust = trust;
                Ok(cfg)
            };
            let cfg = match build() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    eprintln!("oomwake: invalid config, not starting");
                    return ExitCode::from(1);
                }
            };
            if trust == Trust::Strict {
                // The journal in the state dir says which limits to restore as root.
                if let Err(e) = perm::check_existing_part(&cfg.state_dir, "the state dir", owners())
                {
                    eprintln!("{e}");
                    eprintln!("oomwake: untrusted state dir, not starting");
                    return ExitCode::from(1);
                }
            }
            if trust == Trust::Strict {
                // Root appends to the audit log: a file another user owns or can swap
                // (or a link planted in a shared directory) would be theirs to aim.
                if let Some(a) = &cfg.audit_log {
                    if let Err(e) = perm::check_existing_part(a, "the audit log", owners()) {
                        eprintln!("{e}");
                        eprintln!("oomwake: untrusted audit log, not starting");
                        return ExitCode::from(1);
                    }
                }
            }
            // With the audit log on stderr (the default), log records share the stream
            // as JSON lines.
            oomwake::audit::set_json_logs(cfg.audit_log.is_none());
            let set = match agent::load_policies(&cfg) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    eprintln!("oomwake: invalid policies, not starting");
                    return ExitCode::from(1);
                }
            };
            if trust == Trust::Insecure {
                log::warn!(
                    "--insecure-policies: policy files, config and state dir are trusted whatever their owner and mode"
                );
            }
            log_loaded(&cfg, &set);
            // SIGHUP: re-read the config and the policies; what cannot change without a
            // restart is kept, with a warning; any error keeps everything as it was.
            let mut running = cfg.clone();
            let reload: config::Reload = Box::new(move || {
                let new = build()?;
                let set = agent::load_policies(&new)?;
                let kept = running.apply_reload(&new);
                if !kept.is_empty() {
                    log::warn!(
                        "reload: these settings take effect only after a restart: {}",
                        kept.join(", ")
                    );
                }
                log_loaded(&running, &set);
                Ok(config::Reloaded {
                    policies: set,
                    config: running.clone(),
                })
            });
            match agent::run(cfg, set, reload) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    oomwake::audit::fatal(&error_chain(&e));
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Check {
            policies,
            files,
            insecure_policies,
        } => {
            let trust = trust(insecure_policies);
            let res = if files.is_empty() {
                let dir = policies.unwrap_or_else(|| config::DEFAULT_POLICIES.into());
                policy::load_dir_with(&dir, trust)
            } else {
                policy::load_files_with(&files, trust)
            };
            match res {
                Ok(set) => {
                    if set.is_embedded_default() {
                        println!("no policy files found: the embedded default applies");
                    }
                    for w in set.warnings() {
                        eprintln!("{w}");
                    }
                    for p in set.policies() {
                        let steps: Vec<&str> = p.steps.iter().map(|s| s.action.name()).collect();
                        println!(
                            "ok: {} ({}, priority {}, {}): {}",
                            p.name,
                            p.source,
                            p.priority,
                            p.mode.as_str(),
                            steps.join(" -> ")
                        );
                        if let Some(e) = &p.early {
                            let steps: Vec<&str> =
                                e.steps.iter().map(|s| s.action.name()).collect();
                            println!("    early at {}: {}", e.at, steps.join(" -> "));
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(errs) => {
                    for e in errs {
                        eprintln!("{e}");
                    }
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Explain {
            policies,
            cgroup_root,
            insecure_policies,
            docker_socket,
            cgroup,
        } => {
            let root = cgroup_root.unwrap_or_else(|| Config::default().cgroup_root);
            let engine = config::docker_socket(&docker_socket).map(|s| {
                oomwake::container::docker::Engine::new(
                    &s,
                    oomwake::container::cache::REQUEST_TIMEOUT,
                )
                .insecure(insecure_policies)
            });
            let (cgroup, container) = match explain_target(&cgroup, &root, engine.as_ref()) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("oomwake explain: {}", oomwake::term::escape(&e));
                    return ExitCode::from(2);
                }
            };
            let set = match policy::load_dir_with(&policies, trust(insecure_policies)) {
                Ok(s) => s,
                Err(errs) => {
                    for e in errs {
                        eprintln!("{e}");
                    }
                    return ExitCode::from(1);
                }
            };
            let out = oomwake::explain::explain(
                &set,
                &root,
                std::path::Path::new("/proc"),
                &cgroup,
                container.as_ref(),
            );
            print!("{}", oomwake::term::escape_text(&out.text));
            if out.missing {
                eprintln!(
                    "oomwake explain: {}: no such cgroup under {}",
                    oomwake::term::Esc(&cgroup),
                    root.display()
                );
                return ExitCode::from(1);
            }
            // Not found is said above; any other error reading it is not "found" either.
            if let Some(e) = &out.error {
                eprintln!(
                    "oomwake explain: {}: cannot read it: {}",
                    oomwake::term::Esc(&cgroup),
                    oomwake::term::escape(e)
                );
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Cmd::Status { state_dir, json } => status(&state_dir, json),
        Cmd::Doctor {
            policies,
            cgroup_root,
            state_dir,
            json,
            insecure_policies,
        } => doctor(&policies, cgroup_root, &state_dir, json, insecure_policies),
        Cmd::Demo { cgroup_root } => {
            let root = cgroup_root.unwrap_or_else(|| Config::default().cgroup_root);
            match oomwake::demo::run(&root) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("oomwake demo: {}", error_chain(&e));
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Generate { dir } => match oomwake::docs::generate(Cli::command(), &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{}: {e}", dir.display());
                ExitCode::from(1)
            }
        },
        Cmd::Hog { args } => {
            match oomwake::hog::parse_args(&args).and_then(|a| oomwake::hog::run(&a)) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hog: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// An error and its causes on one line. The crate's errors carry their cause in their
/// own message (so that a log line with `{e}` is complete), which anyhow's `{:#}` would
/// print a second time: a cause already at the end of the line is not repeated.
fn error_chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if !line.ends_with(&text) {
            line = format!("{line}: {text}");
        }
    }
    line
}

fn trust(insecure: bool) -> Trust {
    if insecure {
        Trust::Insecure
    } else {
        Trust::Strict
    }
}

fn owners() -> Owners {
    Owners::current(", or pass --insecure-policies for development")
}

/// At start and on reload: where the policies came from, and their warnings.
fn log_loaded(cfg: &Config, set: &PolicySet) {
    if set.is_embedded_default() {
        let why = if cfg.policies.exists() {
            "has no *.toml file"
        } else {
            "does not exist"
        };
        log::warn!(
            "{} {why}: the embedded default policy applies (enforce on every cgroup with oom_kill_disable: reclaim, raise_limit, SIGTERM, kill)",
            cfg.policies.display()
        );
    }
    for w in set.warnings() {
        log::warn!("{w}");
    }
}

/// True if `pid` is a live oomwake process: not a zombie or dead task (its status file
/// is written by an agent that may have died without saying so), and not some other
/// program that got the pid since.
fn agent_alive(pid: i32) -> bool {
    if pid <= 0 || pid as u32 == std::process::id() {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (COMM) STATE ...": COMM may hold spaces and parentheses; it ends at the last ')'.
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let comm = stat.get(open + 1..close).unwrap_or("");
    let state = stat
        .get(close + 1..)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("");
    comm == "oomwake" && !matches!(state, "Z" | "X" | "x" | "")
}

fn status(state_dir: &std::path::Path, json: bool) -> ExitCode {
    let path = state_dir.join("status.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "{}: {e} (is the agent running with --state-dir {}?)",
                path.display(),
                state_dir.display()
            );
            return ExitCode::from(1);
        }
    };
    if json {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    let st: Status = match serde_json::from_str(&text) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    use oomwake::term::Esc;
    use std::fmt::Write as _;
    // Names come from others (delegated cgroups, container names): escaped, and the
    // whole text once more before the terminal.
    let mut o = String::new();
    macro_rules! p {
        ($($t:tt)*) => {{
            let _ = writeln!(o, $($t)*);
        }};
    }
    let alive = st.running && agent_alive(st.pid);
    if alive {
        p!("oomwake running (pid {}), status of {}", st.pid, st.updated);
    } else {
        p!(
            "oomwake not running (last status {}, pid {})",
            st.updated,
            st.pid
        );
    }
    p!(
        "hierarchy: {}{}",
        st.cgroup_root.display(),
        if st.dry_run { " (dry run)" } else { "" }
    );
    p!("policies: {}", Esc(&st.policies.join(", ")));
    p!("watched cgroups: {}", st.watched.len());
    for w in &st.watched {
        let container = match (&w.container_id, &w.container_name) {
            (Some(id), Some(name)) => format!(
                "  container {} ({}, {})",
                Esc(name),
                Esc(oomwake::container::id::short(id)),
                Esc(w.image.as_deref().unwrap_or("?"))
            ),
            (Some(id), None) => {
                format!("  container {}", Esc(oomwake::container::id::short(id)))
            }
            _ => String::new(),
        };
        p!("  {}  [{}]{container}", Esc(&w.cgroup), Esc(&w.policy));
    }
    if let Some(k) = &st.kill_kit {
        p!(
            "kill kit (the agent shares {}): {} task{} and {} cgroup{} kept ready{}",
            Esc(&k.cgroup),
            k.pids.len(),
            if k.pids.len() == 1 { "" } else { "s" },
            k.cgroups,
            if k.cgroups == 1 { "" } else { "s" },
            match &k.incomplete {
                Some(why) => format!(", incomplete: {}", Esc(why)),
                None => String::new(),
            }
        );
    }
    if !st.episodes_running.is_empty() {
        p!("episodes running:");
        for c in &st.episodes_running {
            p!("  {}", Esc(c));
        }
    }
    if !st.stuck.is_empty() {
        p!("stuck, unresolved: {}", st.stuck.len());
        for s in &st.stuck {
            p!(
                "  {}  [{}] since {}, episode {}, {} tr{}: {}",
                Esc(&s.cgroup),
                Esc(&s.policy),
                Esc(&s.since),
                s.episode,
                s.tries,
                if s.tries == 1 { "y" } else { "ies" },
                Esc(&s.reason)
            );
        }
    }
    p!("lent limits: {}", st.loans.len());
    for l in &st.loans {
        p!(
            "  {}  {} -> {} bytes (policy {}, episode {})",
            Esc(&l.cgroup),
            l.original.memory,
            l.lent.memory,
            Esc(&l.policy),
            l.episode
        );
    }
    if !st.holds.is_empty() {
        p!("held memory.high (v2): {}", st.holds.len());
        for h in &st.holds {
            let before = if oomwake::cgroup::parse::is_unlimited(h.previous) {
                "max".to_string()
            } else {
                h.previous.to_string()
            };
            p!(
                "  {}  {} bytes, {before} before (policy {})",
                Esc(&h.cgroup),
                h.held,
                Esc(&h.policy)
            );
        }
    }
    for d in &st.journal_damage {
        let moved = d.moved_to.as_ref().map(|p| p.display().to_string());
        p!(
            "JOURNAL DAMAGED at start: {} ({}); moved to {}",
            Esc(&d.file.display()),
            Esc(&d.error),
            moved.as_deref().unwrap_or("nowhere (dry run)")
        );
    }
    print!("{}", oomwake::term::escape_text(&o));
    if !alive {
        ExitCode::from(3)
    } else if !st.journal_damage.is_empty() {
        ExitCode::from(4)
    } else {
        ExitCode::SUCCESS
    }
}
