//! The agent's own configuration (`/etc/oomwake/oomwake.toml`, missing file = defaults),
//! merged with command-line flags (flags win).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::policy::units::Dur;

pub const DEFAULT_CONFIG: &str = "/etc/oomwake/oomwake.toml";
pub const DEFAULT_POLICIES: &str = "/etc/oomwake/policies";
pub const DEFAULT_STATE: &str = "/var/lib/oomwake";

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
    metrics: Option<String>,
    dry_run: Option<bool>,
    sweep_interval: Option<Dur>,
    rescan_interval: Option<Dur>,
    restore_check_interval: Option<Dur>,
    settle_poll: Option<Dur>,
    workers: Option<usize>,
    max_workers: Option<usize>,
    events: Option<bool>,
    mlock: Option<bool>,
}

/// Parses `host:port`; a bare port binds loopback.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| {
        format!("invalid metrics address {s:?}: expected ADDR:PORT, e.g. 127.0.0.1:9717")
    })
}

impl Config {
    /// Loads `path`; a missing file gives the defaults. Errors read `FILE:LINE:COL: msg`.
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Config::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, file: &str) -> Result<Config, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, col) = e
                .span()
                .map(|s| {
                    let before = &text[..s.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
                    (line, col)
                })
                .unwrap_or((1, 1));
            format!("{file}:{line}:{col}: {}", e.message().trim())
        })?;
        let d = Config::default();
        let metrics = match raw.metrics {
            Some(m) => Some(parse_addr(&m).map_err(|e| format!("{file}: {e}"))?),
            None => None,
        };
        let workers = raw.workers.unwrap_or(d.workers);
        if workers == 0 {
            return Err(format!("{file}: workers must be at least 1"));
        }
        Ok(Config {
            policies: raw.policies.unwrap_or(d.policies),
            cgroup_root: raw.cgroup_root.unwrap_or(d.cgroup_root),
            proc_root: raw.proc_root.unwrap_or(d.proc_root),
            state_dir: raw.state_dir.unwrap_or(d.state_dir),
            audit_log: raw.audit_log,
            metrics,
            dry_run: raw.dry_run.unwrap_or(false),
            sweep_interval: raw.sweep_interval.map(|x| x.0).unwrap_or(d.sweep_interval),
            rescan_interval: raw
                .rescan_interval
                .map(|x| x.0)
                .unwrap_or(d.rescan_interval),
            restore_check_interval: raw
                .restore_check_interval
                .map(|x| x.0)
                .unwrap_or(d.restore_check_interval),
            settle_poll: raw.settle_poll.map(|x| x.0).unwrap_or(d.settle_poll),
            workers,
            max_workers: raw.max_workers.unwrap_or(d.max_workers).max(workers),
            events: raw.events.unwrap_or(true),
            mlock: raw.mlock.unwrap_or(true),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_is_defaults() {
        let c = Config::load(Path::new("/nonexistent/oomwake.toml")).unwrap();
        assert_eq!(c.sweep_interval, Duration::from_secs(1));
        assert!(c.events);
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
}
