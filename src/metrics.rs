//! Prometheus metrics, served in the text format on `--metrics ADDR:PORT` (loopback by
//! default). Counters are cheap atomics or short-held locks on the OOM path.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    stall: Mutex<Histogram>,
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

    pub fn unresolved(&self, policy: &str) {
        bump(&self.unresolved, policy.to_string());
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

/// Serves `GET /metrics` on `listener` in a thread of its own; `render` produces the body.
pub fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                let mut rd = BufReader::new(match s.try_clone() {
                    Ok(c) => c,
                    Err(_) => continue,
                });
                if rd.read_line(&mut line).is_err() {
                    continue;
                }
                // Drain the headers so the client sees a clean close.
                let mut h = String::new();
                while rd.read_line(&mut h).map(|n| n > 2).unwrap_or(false) {
                    h.clear();
                }
                let path = line.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = if line.starts_with("GET ") && (path == "/metrics" || path == "/") {
                    ("200 OK", render())
                } else {
                    ("404 Not Found", "not found\n".to_string())
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .map(|_| ())
        .unwrap_or_else(|e| log::error!("cannot start the metrics thread: {e}"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn render_has_every_family() {
        let m = Metrics::default();
        m.set_watched(3);
        m.oom_event("go-api");
        m.action("raise_limit", "done");
        m.unresolved("go-api");
        m.stall(Duration::from_micros(700));
        let t = m.render(16 << 20);
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
}
