//! Prometheus metrics, served in the text format on `--metrics ADDR:PORT` (loopback by
//! default). Counters are cheap atomics or short-held locks on the OOM path.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
pub struct Metrics {
    watched: AtomicU64,
    oom_events: Mutex<BTreeMap<String, u64>>,
    actions: Mutex<BTreeMap<(String, String), u64>>,
    unresolved: Mutex<BTreeMap<String, u64>>,
    stuck: Mutex<BTreeMap<String, u64>>,
    stall: Mutex<Histogram>,
    early: Mutex<BTreeMap<String, u64>>,
    avoided: Mutex<BTreeMap<String, u64>>,
}

fn bump<K: Ord>(m: &Mutex<BTreeMap<K, u64>>, k: K) {
    *m.lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(k)
        .or_insert(0) += 1;
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn set_watched(&self, n: usize) {
        self.watched.store(n as u64, Ordering::Relaxed);
    }

    pub fn oom_event(&self, policy: &str) {
        bump(&self.oom_events, policy.to_string());
    }

    pub fn action(&self, action: &str, outcome: &str) {
        bump(&self.actions, (action.to_string(), outcome.to_string()));
    }

    /// An early episode started (usage crossed the `[early]` threshold).
    pub fn early(&self, policy: &str) {
        bump(&self.early, policy.to_string());
    }

    /// An early episode kept the workload away from its wall.
    pub fn stall_avoided(&self, policy: &str) {
        bump(&self.avoided, policy.to_string());
    }

    pub fn unresolved(&self, policy: &str) {
        bump(&self.unresolved, policy.to_string());
    }

    /// Cgroups stuck with their stall unresolved, by policy. A policy seen once stays
    /// at 0 rather than vanishing, so that alerts see the stall end.
    pub fn set_stuck(&self, by_policy: &BTreeMap<String, usize>) {
        let mut m = self.stuck.lock().unwrap_or_else(|p| p.into_inner());
        for v in m.values_mut() {
            *v = 0;
        }
        for (p, n) in by_policy {
            m.insert(p.clone(), *n as u64);
        }
    }

    pub fn stall(&self, d: Duration) {
        let s = d.as_secs_f64();
        let mut h = self.stall.lock().unwrap_or_else(|p| p.into_inner());
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    /// The exposition text; `raised_bytes` comes from the loan book.
    pub fn render(&self, raised_bytes: u64) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let watched = self.watched.load(Ordering::Relaxed);
        header(
            &mut o,
            "oomwake_watched_cgroups",
            "gauge",
            "Cgroups with an OOM notification registered.",
        );
        let _ = writeln!(o, "oomwake_watched_cgroups {watched}");
        header(
            &mut o,
            "oomwake_oom_events_total",
            "counter",
            "OOM episodes started, by policy.",
        );
        by_policy(&mut o, "oomwake_oom_events_total", &self.oom_events);
        header(
            &mut o,
            "oomwake_actions_total",
            "counter",
            "Policy steps run, by action and outcome.",
        );
        for ((a, out), n) in self
            .actions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let (a, out) = (escape(a), escape(out));
            let _ = writeln!(
                o,
                "oomwake_actions_total{{action=\"{a}\",outcome=\"{out}\"}} {n}"
            );
        }
        header(
            &mut o,
            "oomwake_stall_seconds",
            "histogram",
            "Time from OOM event to recovery.",
        );
        {
            let h = self.stall.lock().unwrap_or_else(|p| p.into_inner());
            for (b, c) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(o, "oomwake_stall_seconds_bucket{{le=\"{b}\"}} {c}");
            }
            let _ = writeln!(o, "oomwake_stall_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(o, "oomwake_stall_seconds_sum {}", h.sum);
            let _ = writeln!(o, "oomwake_stall_seconds_count {}", h.count);
        }
        header(
            &mut o,
            "oomwake_raised_bytes",
            "gauge",
            "Headroom currently lent by raise_limit.",
        );
        let _ = writeln!(o, "oomwake_raised_bytes {raised_bytes}");
        header(
            &mut o,
            "oomwake_unresolved_total",
            "counter",
            "Episodes that ended unresolved, by policy.",
        );
        by_policy(&mut o, "oomwake_unresolved_total", &self.unresolved);
        header(
            &mut o,
            "oomwake_stuck_cgroups",
            "gauge",
            "Cgroups stuck in a stall their policy could not resolve, by policy.",
        );
        by_policy(&mut o, "oomwake_stuck_cgroups", &self.stuck);
        header(
            &mut o,
            "oomwake_early_total",
            "counter",
            "Early episodes started (usage crossed the [early] threshold), by policy.",
        );
        by_policy(&mut o, "oomwake_early_total", &self.early);
        header(
            &mut o,
            "oomwake_stalls_avoided_total",
            "counter",
            "Early episodes that kept the workload away from its limit, by policy.",
        );
        by_policy(&mut o, "oomwake_stalls_avoided_total", &self.avoided);
        o
    }
}

fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    use std::fmt::Write;
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn by_policy(o: &mut String, name: &str, counts: &Mutex<BTreeMap<String, u64>>) {
    use std::fmt::Write;
    for (p, n) in counts.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(o, "{name}{{policy=\"{}\"}} {n}", escape(p));
    }
}

// The listener. Any local user can connect to it, and the agent runs as root with its
// memory locked: what one connection may cost is bounded (the request head, the time it
// may take, the connections served at once), whatever the client sends or withholds.

/// What the metrics listener allows one client.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Request line and headers together; a longer head is answered 431 and closed.
    pub max_head: usize,
    /// From accept to the end of the response: a client that trickles its request (or
    /// reads the response slowly) is cut off then, whatever each single read takes.
    pub deadline: Duration,
    /// Connections served at once (threads started once, when serving starts); one
    /// more is answered 503 and closed at once.
    pub max_connections: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            // A Prometheus scrape's head is a few hundred bytes.
            max_head: 8 * 1024,
            deadline: Duration::from_secs(5),
            max_connections: 4,
        }
    }
}

/// Stack of a connection thread: it parses a head from a fixed buffer and writes a
/// string; with mlockall every byte of it is resident.
const CONN_STACK: usize = 128 * 1024;

/// Serves `GET /metrics` on `listener` in a thread of its own; `render` produces the body.
pub fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    serve_with(listener, render, ServeLimits::default())
}

/// [`serve`] with explicit limits.
pub fn serve_with(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    limits: ServeLimits,
) {
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || accept_loop(listener, render, limits))
        .map(|_| ())
        .unwrap_or_else(|e| log::error!("cannot start the metrics thread: {e}"));
}

fn accept_loop(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    limits: ServeLimits,
) {
    // A fixed pool, started once: no thread (and no stack, locked and charged to the
    // agent's cgroup under mlockall) is created per connection. `busy` counts the
    // connections handed over and not yet done, so the channel never holds more than
    // the pool can take and a send never waits.
    let busy = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = crossbeam_channel::bounded::<TcpStream>(limits.max_connections);
    let mut workers = 0;
    for i in 0..limits.max_connections {
        let (rx, render, busy) = (rx.clone(), render.clone(), busy.clone());
        let started = std::thread::Builder::new()
            .name(format!("metrics-{i}"))
            .stack_size(CONN_STACK)
            .spawn(move || {
                for s in rx {
                    handle(s, &*render, limits);
                    busy.fetch_sub(1, Ordering::AcqRel);
                }
            });
        match started {
            Ok(_) => workers += 1,
            Err(e) => log::warn!("metrics: cannot start a connection thread: {e}"),
        }
    }
    if workers == 0 {
        log::error!("metrics: no connection thread could be started; not serving");
        return;
    }
    for stream in listener.incoming() {
        let s = match stream {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like repeat at once: do not spin on them.
                log::debug!("metrics: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if busy.fetch_add(1, Ordering::AcqRel) >= workers {
            busy.fetch_sub(1, Ordering::AcqRel);
            refuse(s);
        } else if let Err(e) = tx.try_send(s) {
            // Cannot happen while `busy` is kept; answered all the same.
            busy.fetch_sub(1, Ordering::AcqRel);
            refuse(e.into_inner());
        }
    }
}

/// Answers a connection beyond the cap.
fn refuse(mut s: TcpStream) {
    // A small answer fits the socket buffer: this write does not wait.
    let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = respond(&mut s, "503 Service Unavailable", "busy\n", None);
}

/// Why a request head could not be read.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    TooLarge,
    TimedOut,
    /// The client closed or the connection failed before the head ended.
    Closed,
}

/// Reads a request head (up to the empty line) into at most `max` bytes. `read` gets
/// the time left before the deadline and returns like [`Read::read`].
fn read_head(
    max: usize,
    deadline: Instant,
    mut read: impl FnMut(&mut [u8], Duration) -> std::io::Result<usize>,
) -> Result<Vec<u8>, HeadError> {
    let mut buf = vec![0u8; max];
    let mut len = 0;
    loop {
        if let Some(end) = head_end(&buf[..len]) {
            buf.truncate(end);
            return Ok(buf);
        }
        if len == max {
            return Err(HeadError::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadError::TimedOut);
        }
        match read(&mut buf[len..], left) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Err(HeadError::Closed),
        }
    }
}

/// The end of a request head: after the blank line ("\r\n\r\n", or "\n\n" from a
/// lenient client).
fn head_end(b: &[u8]) -> Option<usize> {
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = b.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn handle(mut s: TcpStream, render: &(dyn Fn() -> String + Send + Sync), limits: ServeLimits) {
    let deadline = Instant::now() + limits.deadline;
    let head = read_head(limits.max_head, deadline, |buf, left| {
        s.set_read_timeout(Some(left))?;
        s.read(buf)
    });
    let (status, body) = match head {
        Ok(head) => {
            let line = head.split(|&b| b == b'\n').next().unwrap_or(&[]);
            let line = String::from_utf8_lossy(line);
            let mut it = line.split_whitespace();
            let (method, path) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            if method == "GET" && (path == "/metrics" || path == "/") {
                ("200 OK", render())
            } else {
                ("404 Not Found", "not found\n".to_string())
            }
        }
        Err(HeadError::TooLarge) => (
            "431 Request Header Fields Too Large",
            "request head too large\n".to_string(),
        ),
        Err(HeadError::TimedOut) => ("408 Request Timeout", "timed out\n".to_string()),
        Err(HeadError::Closed) => return,
    };
    let _ = respond(&mut s, status, &body, Some(deadline));
    // Unread request bytes make close() send a reset, which may discard the response
    // before the client reads it; a polite client has sent nothing more.
    let _ = s.shutdown(std::net::Shutdown::Write);
}

/// Writes a whole response, giving up at `deadline` (a client that reads slowly).
fn respond(
    s: &mut TcpStream,
    status: &str,
    body: &str,
    deadline: Option<Instant>,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    for part in [head.as_bytes(), body.as_bytes()] {
        let mut rest = part;
        while !rest.is_empty() {
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                s.set_write_timeout(Some(left))?;
            }
            match s.write(rest) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn stuck_gauge_goes_to_zero_when_the_stall_ends() {
        let m = Metrics::default();
        let mut stuck = BTreeMap::new();
        stuck.insert("go-service".to_string(), 2);
        m.set_stuck(&stuck);
        let text = m.render(0);
        assert!(
            text.contains("# TYPE oomwake_stuck_cgroups gauge"),
            "{text}"
        );
        assert!(
            text.contains("oomwake_stuck_cgroups{policy=\"go-service\"} 2"),
            "{text}"
        );
        m.set_stuck(&BTreeMap::new());
        assert!(m
            .render(0)
            .contains("oomwake_stuck_cgroups{policy=\"go-service\"} 0"));
    }

    fn server(limits: ServeLimits) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        serve_with(
            l,
            Arc::new(|| "oomwake_watched_cgroups 0\n".to_string()),
            limits,
        );
        addr
    }

    /// A normal scrape, bounded in time; the whole response.
    fn scrape(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp
    }

    #[test]
    fn render_has_every_family() {
        let m = Metrics::default();
        m.set_watched(3);
        m.oom_event("go-api");
        m.action("raise_limit", "done");
        m.unresolved("go-api");
        m.stall(Duration::from_micros(700));
        m.early("go-api");
        m.early("go-api");
        m.stall_avoided("go-api");
        let t = m.render(16 << 20);
        assert!(t.contains("oomwake_early_total{policy=\"go-api\"} 2\n"));
        assert!(t.contains("oomwake_stalls_avoided_total{policy=\"go-api\"} 1\n"));
        assert!(t.contains("oomwake_watched_cgroups 3\n"));
        assert!(t.contains("oomwake_oom_events_total{policy=\"go-api\"} 1\n"));
        assert!(t.contains("oomwake_actions_total{action=\"raise_limit\",outcome=\"done\"} 1\n"));
        assert!(t.contains("oomwake_stall_seconds_bucket{le=\"0.0005\"} 0\n"));
        assert!(t.contains("oomwake_stall_seconds_bucket{le=\"0.001\"} 1\n"));
        assert!(t.contains("oomwake_stall_seconds_count 1\n"));
        assert!(t.contains("oomwake_raised_bytes 16777216\n"));
        assert!(t.contains("oomwake_unresolved_total{policy=\"go-api\"} 1\n"));
    }

    #[test]
    fn serves_over_http() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        serve(l, Arc::new(|| "oomwake_watched_cgroups 0\n".to_string()));
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        assert!(resp.ends_with("oomwake_watched_cgroups 0\n"));
    }

    #[test]
    fn a_request_head_is_read_into_at_most_max_bytes() {
        // An endless request without a newline: the reader stops at the bound.
        let mut fed = 0usize;
        let far = Instant::now() + Duration::from_secs(60);
        let r = read_head(8192, far, |buf, _| {
            buf.fill(b'a');
            fed += buf.len();
            Ok(buf.len())
        });
        assert_eq!(r, Err(HeadError::TooLarge));
        assert!(fed <= 8192, "read {fed} bytes");
        // Headers without an end count too, not only the request line.
        let mut src: &[u8] = b"GET / HTTP/1.1\r\n";
        let mut hdrs = std::io::Read::chain(&mut src, std::io::repeat(b'h'));
        assert_eq!(
            read_head(4096, far, |buf, _| hdrs.read(buf)),
            Err(HeadError::TooLarge)
        );
        // A normal head ends at its blank line.
        let mut req: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nextra";
        let head = read_head(4096, far, |buf, _| req.read(buf)).unwrap();
        assert_eq!(head, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    #[test]
    fn a_trickled_head_ends_at_the_deadline_not_at_a_read_timeout() {
        // One byte per read, each well within any per-read timeout: only the overall
        // deadline ends it.
        let deadline = Instant::now() + Duration::from_millis(300);
        let mut reads = 0;
        let r = read_head(1 << 20, deadline, |buf, left| {
            assert!(left <= Duration::from_millis(300));
            reads += 1;
            std::thread::sleep(Duration::from_millis(10));
            buf[0] = b'x';
            Ok(1)
        });
        assert_eq!(r, Err(HeadError::TimedOut));
        assert!(Instant::now() >= deadline);
        assert!(reads < 1000, "{reads} reads");
    }

    #[test]
    fn a_flood_without_newline_is_cut_off_and_scrapes_go_on() {
        let addr = server(ServeLimits::default());
        let mut s = TcpStream::connect(addr).unwrap();
        // Bounded: the old listener read it all (the test then fails on the assert).
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let chunk = vec![b'a'; 1 << 20];
        let mut sent = 0usize;
        let mut cut = false;
        for _ in 0..64 {
            match s.write_all(&chunk) {
                Ok(()) => sent += chunk.len(),
                Err(_) => {
                    cut = true;
                    break;
                }
            }
        }
        assert!(cut, "the listener took {sent} bytes of a request line");
        // Socket buffers hold some megabytes; the agent itself read at most max_head.
        assert!(sent < 32 << 20, "{sent}");
        let resp = scrape(addr);
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        assert!(resp.ends_with("oomwake_watched_cgroups 0\n"), "{resp}");
    }

    #[test]
    fn a_trickling_client_is_cut_off_and_does_not_hold_up_a_scrape() {
        let addr = server(ServeLimits {
            deadline: Duration::from_secs(3),
            ..ServeLimits::default()
        });
        let mut t = TcpStream::connect(addr).unwrap();
        t.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").unwrap();
        let trickler = std::thread::spawn(move || {
            // A byte every 50 ms, far below any per-read timeout, until cut off (or
            // 20 s, when the test fails).
            t.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let start = Instant::now();
            let mut resp = Vec::new();
            while start.elapsed() < Duration::from_secs(20) {
                let mut b = [0u8; 256];
                match t.read(&mut b) {
                    Ok(0) => return (true, String::from_utf8_lossy(&resp).into_owned()),
                    Ok(n) => resp.extend_from_slice(&b[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => return (true, String::from_utf8_lossy(&resp).into_owned()),
                }
                if t.write_all(b"x").is_err() {
                    return (true, String::from_utf8_lossy(&resp).into_owned());
                }
            }
            (false, String::new())
        });
        // Served while the trickler is connected (the old listener served one client at
        // a time: this scrape waited as long as the trickler went on).
        let resp = scrape(addr);
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        assert!(
            !trickler.is_finished(),
            "the scrape waited for the trickler"
        );
        let (cut, resp) = trickler.join().unwrap();
        assert!(cut, "a trickling client was never cut off");
        assert!(
            resp.is_empty() || resp.starts_with("HTTP/1.1 408"),
            "{resp}"
        );
    }

    #[test]
    fn connections_above_the_cap_are_refused_at_once() {
        let addr = server(ServeLimits {
            max_connections: 2,
            deadline: Duration::from_secs(5),
            ..ServeLimits::default()
        });
        // Two idle clients take both slots until the deadline.
        let idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let resp = scrape(addr);
        assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
        // When they are cut off, the slots are free again.
        for mut s in idle {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut r = String::new();
            let _ = s.read_to_string(&mut r);
            assert!(r.is_empty() || r.starts_with("HTTP/1.1 408"), "{r}");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let resp = scrape(addr);
            if resp.starts_with("HTTP/1.1 200 OK") {
                break;
            }
            // The slot is given back just after the 408 is written.
            assert!(Instant::now() < deadline, "{resp}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
