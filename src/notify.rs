//! systemd's notification protocol, the two messages the agent needs: `READY=1` once the
//! event loop is about to run (the unit is `Type=notify`, so the container engines
//! ordered after it start only then), and `WATCHDOG=1` from the event loop at half the
//! unit's `WatchdogSec=`, so that a wedged loop is killed and restarted by systemd.
//! The loop pings only while the other threads a rescue needs show they are alive
//! ([`Liveness`]): the loan keeper turns, and no episode worker sits in one step of an
//! episode for longer than that step may take. A stuck keeper or worker means no ping,
//! and systemd restarts the agent.
//!
//! A datagram to the socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the
//! abstract namespace); outside systemd the variable is unset and every call is a no-op.
//! Sending never blocks and a failure is logged once, never fatal.

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// How long an episode worker may take beyond what its current step may wait (the
/// step's grace or timeout, and its settle: see [`Liveness::worker_beat`]) before it
/// counts as stuck: the reads and writes of a step, the victim scan, the audit lines.
pub const WORKER_STUCK: Duration = Duration::from_secs(300);

/// How long the loan keeper may go without a turn, at least (three of its intervals
/// when that is longer): a turn gives loans back, and a write that lowers a limit makes
/// the kernel reclaim first.
pub const KEEPER_STUCK: Duration = Duration::from_secs(120);

/// Heartbeats of the threads the watchdog ping vouches for: the loan keeper (a beat per
/// turn) and the episode workers (busy from a job's start to its end, a beat per step).
/// The event loop asks [`check`](Self::check) before each ping.
pub struct Liveness {
    start: Instant,
    /// Milliseconds after `start` of the keeper's last turn; `u64::MAX`: no keeper.
    keeper: AtomicU64,
    /// Milliseconds between the keeper's turns.
    keeper_every: AtomicU64,
    /// Busy workers and by when they must show progress (milliseconds after `start`).
    workers: Mutex<HashMap<ThreadId, u64>>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            start: Instant::now(),
            keeper: AtomicU64::new(u64::MAX),
            keeper_every: AtomicU64::new(0),
            workers: Mutex::new(HashMap::new()),
        }
    }
}

impl Liveness {
    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_millis() as u64
    }

    fn busy(&self) -> std::sync::MutexGuard<'_, HashMap<ThreadId, u64>> {
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The keeper starts: it turns every `every`.
    pub fn keeper_started(&self, every: Duration) {
        self.keeper_every
            .store(every.as_millis() as u64, Ordering::Relaxed);
        self.keeper_beat();
    }

    /// The keeper made a turn.
    pub fn keeper_beat(&self) {
        self.keeper
            .store(self.ms(Instant::now()), Ordering::Relaxed);
    }

    /// The calling worker took a job.
    pub fn worker_busy(&self) {
        self.worker_beat(Duration::ZERO);
    }

    /// The calling worker made progress in its job: it starts a step that may wait up
    /// to `within` (its grace or timeout, and its settle).
    pub fn worker_beat(&self, within: Duration) {
        let by = Instant::now() + within.saturating_add(WORKER_STUCK);
        let by = self.ms(by);
        self.busy().insert(std::thread::current().id(), by);
    }

    /// The calling worker is done with its job.
    pub fn worker_idle(&self) {
        self.busy().remove(&std::thread::current().id());
    }

    /// Whether the keeper and the workers are alive at `now`; if not, why.
    pub fn check(&self, now: Instant) -> Result<(), String> {
        let now_ms = self.ms(now);
        let keeper = self.keeper.load(Ordering::Relaxed);
        if keeper != u64::MAX {
            let every = Duration::from_millis(self.keeper_every.load(Ordering::Relaxed));
            let bound = KEEPER_STUCK.max(every.saturating_mul(3));
            let quiet = Duration::from_millis(now_ms.saturating_sub(keeper));
            if quiet > bound {
                return Err(format!("the loan keeper made no turn for {quiet:?}"));
            }
        }
        let busy = self.busy();
        let first = busy.values().min().copied();
        if let Some(by) = first {
            if now_ms > by {
                let late = Duration::from_millis(now_ms - by);
                return Err(format!(
                    "an episode worker is {late:?} past the longest its step may take ({} busy)",
                    busy.len()
                ));
            }
        }
        Ok(())
    }
}

/// Where notifications go, and how often the watchdog wants a ping.
pub struct Notifier {
    socket: Option<(UnixDatagram, Target)>,
    /// Half of `WATCHDOG_USEC`, when the watchdog is on for this process.
    ping_every: Option<Duration>,
    next_ping: Option<Instant>,
    warned: bool,
}

enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From the environment systemd sets: `NOTIFY_SOCKET`, `WATCHDOG_USEC` and
    /// `WATCHDOG_PID` (the watchdog is ours only if that pid is unset or is us).
    pub fn from_env() -> Notifier {
        let var = |k: &str| std::env::var_os(k).and_then(|v| v.into_string().ok());
        let socket = var("NOTIFY_SOCKET");
        let usec = var("WATCHDOG_USEC");
        let pid = var("WATCHDOG_PID");
        let ours = pid.is_none_or(|p| p.trim() == std::process::id().to_string());
        let ping_every = usec
            .filter(|_| ours)
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0)
            .map(|u| Duration::from_micros(u) / 2);
        Notifier::new(socket.as_deref(), ping_every)
    }

    /// `socket` as in `$NOTIFY_SOCKET`; `ping_every` None turns the watchdog off.
    pub fn new(socket: Option<&str>, ping_every: Option<Duration>) -> Notifier {
        let target = socket
            .filter(|s| !s.is_empty())
            .map(|s| match s.strip_prefix('@') {
                Some(name) => Target::Abstract(name.as_bytes().to_vec()),
                None => Target::Path(PathBuf::from(s)),
            });
        let socket = target.and_then(|t| match UnixDatagram::unbound() {
            Ok(s) => {
                let _ = s.set_nonblocking(true);
                Some((s, t))
            }
            Err(e) => {
                log::warn!("sd_notify: cannot create a socket: {e}");
                None
            }
        });
        let ping_every = ping_every.filter(|_| socket.is_some());
        Notifier {
            socket,
            ping_every,
            next_ping: None,
            warned: false,
        }
    }

    /// Tells systemd that start-up is done.
    pub fn ready(&mut self) {
        self.send("READY=1");
        self.watchdog(Instant::now());
    }

    /// Pings the watchdog if half its interval has passed since the last ping. Call it
    /// on every turn of the event loop; it costs a clock comparison when nothing is due.
    pub fn watchdog(&mut self, now: Instant) {
        self.watchdog_if(now, || Ok(()));
    }

    /// [`watchdog`](Self::watchdog), pinging only if `alive` says the threads the ping
    /// vouches for are alive (see [`Liveness`]); otherwise says why, and skips this ping
    /// (systemd restarts the agent when no ping comes within `WatchdogSec=`).
    pub fn watchdog_if(&mut self, now: Instant, alive: impl FnOnce() -> Result<(), String>) {
        let Some(every) = self.ping_every else {
            return;
        };
        if self.next_ping.is_some_and(|t| now < t) {
            return;
        }
        match alive() {
            Ok(()) => self.send("WATCHDOG=1"),
            Err(why) => log::error!("watchdog: not pinging systemd: {why}"),
        }
        self.next_ping = Some(now + every);
    }

    /// When the event loop must wake up at the latest for the next ping.
    pub fn next_due(&self) -> Option<Instant> {
        self.next_ping
    }

    fn send(&mut self, msg: &str) {
        let Some((sock, target)) = &self.socket else {
            return;
        };
        let res = match target {
            Target::Path(p) => sock.send_to(msg.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
            }
        };
        if let Err(e) = res {
            if !self.warned {
                log::warn!("sd_notify {msg}: {e}");
                self.warned = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv_all(s: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = s.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    #[test]
    fn ready_then_watchdog_at_its_interval() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_nonblocking(true).unwrap();
        let every = Duration::from_secs(10);
        let mut n = Notifier::new(path.to_str(), Some(every));
        n.ready();
        assert_eq!(recv_all(&server), ["READY=1", "WATCHDOG=1"]);
        let start = n.next_due().unwrap() - every;
        n.watchdog(start + every / 2);
        assert!(recv_all(&server).is_empty(), "pinged before it was due");
        n.watchdog(start + every);
        assert_eq!(recv_all(&server), ["WATCHDOG=1"]);
        assert_eq!(n.next_due(), Some(start + every * 2));
    }

    #[test]
    fn no_ping_while_the_keeper_or_a_worker_is_stuck() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_nonblocking(true).unwrap();
        let every = Duration::from_secs(10);
        let mut n = Notifier::new(path.to_str(), Some(every));
        let live = Liveness::default();
        live.keeper_started(Duration::from_millis(200));
        let t0 = Instant::now();
        assert_eq!(live.check(t0), Ok(()));
        n.watchdog_if(t0, || live.check(t0));
        assert_eq!(recv_all(&server), ["WATCHDOG=1"]);
        // The keeper made no turn for longer than it may: no ping, and the next one is
        // still due at the interval (the loop does not spin).
        let late = t0 + KEEPER_STUCK + Duration::from_secs(1);
        assert!(live.check(late).unwrap_err().contains("keeper"));
        n.watchdog_if(late, || live.check(late));
        assert!(recv_all(&server).is_empty(), "pinged for a stuck keeper");
        assert_eq!(n.next_due(), Some(late + every));
        // A worker stuck in one step of its episode: no ping either. How long a step
        // may take counts: a step with a long timeout is not stuck.
        let live = Liveness::default();
        let t1 = Instant::now();
        let hook = Duration::from_secs(3600);
        live.worker_beat(hook);
        assert_eq!(live.check(t1 + WORKER_STUCK + hook / 2), Ok(()));
        live.worker_busy();
        let t1 = Instant::now();
        assert_eq!(live.check(t1 + WORKER_STUCK / 2), Ok(()));
        let stuck = t1 + WORKER_STUCK + Duration::from_secs(1);
        assert!(live.check(stuck).unwrap_err().contains("worker"));
        // Done with its job: alive again, however long after.
        live.worker_idle();
        assert_eq!(live.check(stuck), Ok(()));
        n.watchdog_if(stuck + every, || live.check(stuck + every));
        assert_eq!(recv_all(&server), ["WATCHDOG=1"]);
    }

    #[test]
    fn abstract_socket() {
        let name = format!("oomwake-notify-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        server.set_nonblocking(true).unwrap();
        let mut n = Notifier::new(Some(&format!("@{name}")), None);
        n.ready();
        assert_eq!(recv_all(&server), ["READY=1"]);
        assert_eq!(n.next_due(), None, "no watchdog asked for");
    }

    #[test]
    fn without_a_socket_nothing_is_due() {
        let mut n = Notifier::new(None, Some(Duration::from_secs(1)));
        n.ready();
        n.watchdog(Instant::now());
        assert_eq!(n.next_due(), None);
        // A socket nobody listens on: logged, not fatal.
        let mut n = Notifier::new(Some("/nonexistent/notify"), Some(Duration::from_secs(1)));
        n.ready();
        n.watchdog(Instant::now() + Duration::from_secs(2));
    }
}
