//! The agent's own configuration (`/etc/oomwake/oomwake.toml`, missing file = defaults),
//! merged with command-line flags (flags win).

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::policy::units::Dur;
use crate::policy::{LoadError, PolicySet, Trust};

pub const DEFAULT_CONFIG: &str = "/etc/oomwake/oomwake.toml";
pub const DEFAULT_POLICIES: &str = "/etc/oomwake/policies";
pub const DEFAULT_STATE: &str = "/var/lib/oomwake";
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";

#[derive(Debug, Clone)]
pub struct Config {
    pub policies: PathBuf,
    pub cgroup_root: PathBuf,
    pub proc_root: PathBuf,
    pub state_dir: PathBuf,
    pub audit_log: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    pub dry_run: bool,
    /// Re-read under_oom of every watched cgroup this often (OOMs no eventfd reports).
    pub sweep_interval: Duration,
    /// Walk the whole hierarchy this often, in case inotify missed something.
    pub rescan_interval: Duration,
    /// How often outstanding loans are checked for return.
    pub restore_check_interval: Duration,
    /// How often an episode re-checks for recovery while settling.
    pub settle_poll: Duration,
    /// Episode worker threads kept ready; more are started when all are busy (each
    /// episode may wait out a settle or a grace period), up to `max_workers`.
    pub workers: usize,
    pub max_workers: usize,
    /// Register OOM eventfds. Off = sweep only (a polling baseline for benchmarks).
    pub events: bool,
    pub mlock: bool,
    /// StrictModes for policies, config and state dir; only the command line
    /// (`--insecure-policies`) turns it off, never the config file.
    pub trust: Trust,
    /// Longest wait between two retries of a stall its policy could not resolve (the
    /// waits double from 1 s up to this).
    pub unresolved_retry_max: Duration,
    /// The Docker Engine API socket for container names, labels and images (`none`:
    /// off). The default is used when present, and quietly retried when not.
    pub docker_socket: Option<PathBuf>,
    /// True when the socket was named (config or flag): its absence is then worth a
    /// warning.
    pub docker_socket_explicit: bool,
    /// How long a stall waits for its container's metadata when a policy keyed on it
    /// (name, label, image) could apply; then it is handled audit-only.
    pub container_metadata_wait: Duration,
}

impl Default for Config {
    fn default() -> Config {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        Config {
            policies: DEFAULT_POLICIES.into(),
            cgroup_root: if v1.join("memory.oom_control").exists() {
                v1.to_path_buf()
            } else {
                "/sys/fs/cgroup".into()
            },
            proc_root: "/proc".into(),
            state_dir: DEFAULT_STATE.into(),
            audit_log: None,
            metrics: None,
            dry_run: false,
            sweep_interval: Duration::from_secs(1),
            rescan_interval: Duration::from_secs(30),
            restore_check_interval: Duration::from_millis(200),
            settle_poll: Duration::from_millis(1),
            workers: 16,
            max_workers: 256,
            events: true,
            mlock: true,
            trust: Trust::Strict,
            unresolved_retry_max: Duration::from_secs(300),
            docker_socket: Some(DEFAULT_DOCKER_SOCKET.into()),
            docker_socket_explicit: false,
            container_metadata_wait: Duration::from_secs(2),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    policies: Option<PathBuf>,
    cgroup_root: Option<PathBuf>,
    proc_root: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    audit_log: Option<PathBuf>,
    metrics: Option<Spanned<String>>,
    dry_run: Option<bool>,
    sweep_interval: Option<Spanned<Dur>>,
    rescan_interval: Option<Spanned<Dur>>,
    restore_check_interval: Option<Spanned<Dur>>,
    settle_poll: Option<Spanned<Dur>>,
    workers: Option<Spanned<usize>>,
    max_workers: Option<Spanned<usize>>,
    events: Option<bool>,
    mlock: Option<bool>,
    unresolved_retry_max: Option<Spanned<Dur>>,
    docker_socket: Option<String>,
    container_metadata_wait: Option<Spanned<Dur>>,
}

/// The shortest interval accepted for a timer or poll: zero would spin a CPU.
pub const MIN_INTERVAL: Duration = Duration::from_millis(1);
/// The most episode workers (threads) the config may ask for.
pub const MAX_WORKERS: usize = 4096;

/// Parses `host:port`; a bare port binds loopback.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| {
        format!("invalid metrics address {s:?}: expected ADDR:PORT, e.g. 127.0.0.1:9717")
    })
}

/// `docker_socket` / `--docker-socket`: a path, or `none` for no Docker at all.
pub fn docker_socket(s: &str) -> Option<PathBuf> {
    (s != "none").then(|| PathBuf::from(s))
}

/// What a SIGHUP produces: the new policies and the config now in effect (live settings
/// from the new file, restart-only ones as they were).
pub struct Reloaded {
    pub policies: PolicySet,
    pub config: Config,
}

/// Re-reads config and policies on SIGHUP; an error keeps everything as it was.
pub type Reload = Box<dyn FnMut() -> Result<Reloaded, String> + Send>;

impl Config {
    /// Loads `path`; a missing file gives the defaults. Errors read `FILE:LINE:COL: msg`.
    /// The file is opened once and judged on that descriptor like a policy file (see
    /// [`crate::perm`]): owner and mode of it and of every directory and link on the
    /// way (unless `trust` is insecure), a regular file of at most
    /// [`crate::perm::MAX_FILE`] bytes. A missing file is judged by the nearest
    /// directory that exists.
    pub fn load(path: &Path, trust: Trust) -> Result<Config, String> {
        const WHAT: &str = "the config file";
        let checks = trust.checks();
        let read = crate::perm::open_file(path, WHAT, checks)
            .and_then(|f| crate::perm::read_text(f, path, WHAT));
        let text = match read {
            Ok(t) => t,
            Err(e) if e.is_not_found() => {
                if let crate::perm::Checks::Strict(owners) = checks {
                    crate::perm::check_existing_part(path, WHAT, owners)
                        .map_err(|e| e.to_string())?;
                }
                return Ok(Config::default());
            }
            Err(crate::perm::PermError::Io { path, error }) => {
                return Err(format!("{}: {error}", path.display()))
            }
            Err(e) => return Err(e.to_string()),
        };
        Config::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, file: &str) -> Result<Config, String> {
        let at = |span: Range<usize>, msg: String| {
            LoadError::at(text, file, Some(span), msg).to_string()
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| LoadError::toml(text, file, &e).to_string())?;
        let d = Config::default();
        let metrics = match raw.metrics {
            Some(m) => Some(parse_addr(m.get_ref()).map_err(|e| at(m.span(), e))?),
            None => None,
        };
        let interval = |v: Option<Spanned<Dur>>, key: &str, default: Duration| match v {
            Some(v) if v.get_ref().0 < MIN_INTERVAL => Err(at(
                v.span(),
                format!("`{key}` must be at least 1ms: a shorter interval spins a CPU"),
            )),
            Some(v) => Ok(v.get_ref().0),
            None => Ok(default),
        };
        let count = |v: Option<Spanned<usize>>, key: &str, default: usize| match v {
            Some(v) if !(1..=MAX_WORKERS).contains(v.get_ref()) => Err(at(
                v.span(),
                format!("`{key}` must be from 1 to {MAX_WORKERS}"),
            )),
            Some(v) => Ok(*v.get_ref()),
            None => Ok(default),
        };
        let workers = count(raw.workers, "workers", d.workers)?;
        let (docker_socket, docker_socket_explicit) = match raw.docker_socket.as_deref() {
            Some(s) => (docker_socket(s), true),
            None => (d.docker_socket, false),
        };
        Ok(Config {
            policies: raw.policies.unwrap_or(d.policies),
            cgroup_root: raw.cgroup_root.unwrap_or(d.cgroup_root),
            proc_root: raw.proc_root.unwrap_or(d.proc_root),
            state_dir: raw.state_dir.unwrap_or(d.state_dir),
            audit_log: raw.audit_log,
            metrics,
            dry_run: raw.dry_run.unwrap_or(false),
            sweep_interval: interval(raw.sweep_interval, "sweep_interval", d.sweep_interval)?,
            rescan_interval: interval(raw.rescan_interval, "rescan_interval", d.rescan_interval)?,
            restore_check_interval: interval(
                raw.restore_check_interval,
                "restore_check_interval",
                d.restore_check_interval,
            )?,
            settle_poll: interval(raw.settle_poll, "settle_poll", d.settle_poll)?,
            workers,
            max_workers: count(raw.max_workers, "max_workers", d.max_workers)?.max(workers),
            events: raw.events.unwrap_or(true),
            mlock: raw.mlock.unwrap_or(true),
            trust: d.trust,
            unresolved_retry_max: interval(
                raw.unresolved_retry_max,
                "unresolved_retry_max",
                d.unresolved_retry_max,
            )?,
            docker_socket,
            docker_socket_explicit,
            container_metadata_wait: interval(
                raw.container_metadata_wait,
                "container_metadata_wait",
                d.container_metadata_wait,
            )?,
        })
    }

    /// Takes what can change while running from `new` (the policies dir, dry_run, the
    /// sweep and rescan intervals) and keeps the rest. Returns the restart-only settings
    /// that `new` changes, as `name (running value kept)`, for a warning.
    pub fn apply_reload(&mut self, new: &Config) -> Vec<String> {
        self.policies = new.policies.clone();
        self.dry_run = new.dry_run;
        self.sweep_interval = new.sweep_interval;
        self.rescan_interval = new.rescan_interval;
        let mut kept = Vec::new();
        macro_rules! restart_only {
            ($($f:ident),*) => {$(
                if self.$f != new.$f {
                    kept.push(format!("{} (keeping {:?})", stringify!($f), self.$f));
                }
            )*};
        }
        restart_only!(
            cgroup_root,
            proc_root,
            state_dir,
            audit_log,
            metrics,
            restore_check_interval,
            settle_poll,
            workers,
            max_workers,
            events,
            mlock,
            trust,
            unresolved_retry_max,
            docker_socket,
            container_metadata_wait
        );
        kept
    }

    /// How policy files are trusted (`--insecure-policies` turns StrictModes off).
    pub fn insecure(&self) -> bool {
        self.trust == Trust::Insecure
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_is_defaults() {
        let c = Config::load(Path::new("/nonexistent/oomwake.toml"), Trust::Strict).unwrap();
        assert_eq!(c.sweep_interval, Duration::from_secs(1));
        assert!(c.events);
    }

    #[test]
    fn docker_socket_default_path_and_none() {
        let d = Config::parse("", "c.toml").unwrap();
        assert_eq!(
            d.docker_socket.as_deref(),
            Some(Path::new(DEFAULT_DOCKER_SOCKET))
        );
        assert!(!d.docker_socket_explicit);
        let c = Config::parse("docker_socket = \"/run/other.sock\"\n", "c.toml").unwrap();
        assert_eq!(
            c.docker_socket.as_deref(),
            Some(Path::new("/run/other.sock"))
        );
        assert!(c.docker_socket_explicit);
        let n = Config::parse("docker_socket = \"none\"\n", "c.toml").unwrap();
        assert_eq!(n.docker_socket, None);
    }

    #[test]
    fn container_metadata_wait_default_value_and_position() {
        let d = Config::parse("", "c.toml").unwrap();
        assert_eq!(d.container_metadata_wait, Duration::from_secs(2));
        let c = Config::parse("container_metadata_wait = \"500ms\"\n", "c.toml").unwrap();
        assert_eq!(c.container_metadata_wait, Duration::from_millis(500));
        let e = Config::parse("\ncontainer_metadata_wait = \"0ms\"\n", "c.toml").unwrap_err();
        assert!(e.starts_with("c.toml:2:27: "), "{e}");
    }

    #[test]
    fn values_and_errors() {
        let c = Config::parse(
            "sweep_interval = \"250ms\"\nworkers = 2\nmetrics = \"9717\"\n",
            "c.toml",
        )
        .unwrap();
        assert_eq!(c.sweep_interval, Duration::from_millis(250));
        assert_eq!(c.workers, 2);
        assert_eq!(c.metrics.unwrap().to_string(), "127.0.0.1:9717");
        let e = Config::parse("\nsweep = \"1s\"\n", "c.toml").unwrap_err();
        assert!(e.starts_with("c.toml:2:1: "), "{e}");
        let e = Config::parse("sweep_interval = \"1 fortnight\"\n", "c.toml").unwrap_err();
        assert!(e.starts_with("c.toml:1:18: "), "{e}");
        assert!(Config::parse("workers = 0\n", "c.toml").is_err());
    }

    #[test]
    fn intervals_that_spin_and_absurd_worker_counts_are_refused_at_their_position() {
        for key in [
            "sweep_interval",
            "rescan_interval",
            "restore_check_interval",
            "settle_poll",
        ] {
            let e =
                Config::parse(&format!("events = true\n{key} = \"0ms\"\n"), "c.toml").unwrap_err();
            let col = key.len() + 4;
            assert!(e.starts_with(&format!("c.toml:2:{col}: ")), "{e}");
            assert!(e.contains("at least 1ms"), "{e}");
        }
        let e = Config::parse("workers = 0\n", "c.toml").unwrap_err();
        assert!(e.starts_with("c.toml:1:11: "), "{e}");
        let e = Config::parse("max_workers = 100000\n", "c.toml").unwrap_err();
        assert!(e.starts_with("c.toml:1:15: "), "{e}");
        let e = Config::parse("metrics = \"nope\"\n", "c.toml").unwrap_err();
        assert!(e.starts_with("c.toml:1:11: "), "{e}");
    }

    #[test]
    fn reload_takes_live_settings_and_names_the_restart_only_ones() {
        let mut running = Config::parse("", "c.toml").unwrap();
        let new = Config::parse(
            "policies = \"/p2\"\ndry_run = true\nsweep_interval = \"250ms\"\nstate_dir = \"/elsewhere\"\nworkers = 3\n",
            "c.toml",
        )
        .unwrap();
        let kept = running.apply_reload(&new);
        assert_eq!(running.policies, Path::new("/p2"));
        assert!(running.dry_run);
        assert_eq!(running.sweep_interval, Duration::from_millis(250));
        assert_eq!(running.state_dir, Path::new(DEFAULT_STATE));
        assert_eq!(running.workers, Config::default().workers);
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(
            kept[0].starts_with("state_dir (keeping \"/var/lib/oomwake\")"),
            "{kept:?}"
        );
        assert!(kept[1].starts_with("workers (keeping 16)"), "{kept:?}");
        assert!(running.apply_reload(&running.clone()).is_empty());
    }
}
