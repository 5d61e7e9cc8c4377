//! systemd's notification protocol, the two messages the agent needs: `READY=1` once the
//! event loop is about to run (the unit is `Type=notify`, so the container engines
//! ordered after it start only then), and `WATCHDOG=1` from the event loop at half the
//! unit's `WatchdogSec=`, so that a wedged loop is killed and restarted by systemd.
//!
//! A datagram to the socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the
//! abstract namespace); outside systemd the variable is unset and every call is a no-op.
//! Sending never blocks and a failure is logged once, never fatal.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

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
        let Some(every) = self.ping_every else {
            return;
        };
        if self.next_ping.is_some_and(|t| now < t) {
            return;
        }
        self.send("WATCHDOG=1");
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
