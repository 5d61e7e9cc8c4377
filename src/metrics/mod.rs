//! Prometheus metrics: the families the agent exports, kept in a registry of the
//! `prometheus` crate and served in the text format (0.0.4) on `--metrics ADDR:PORT`
//! (loopback by default) by the bounded listener in [`http`].
//!
//! Every family is declared once, in the [`families!`] list below: its field, name,
//! help and labels. Adding a metric is adding a line there and calling it where the
//! thing happens (`shared.metrics.f.NAME...`). Counters and histograms are atomics
//! updated on the OOM path; gauges that mirror state owned elsewhere (loans, stuck
//! cgroups) are set when scraped ([`Metrics::render`]) or when that state changes.
//!
//! Why `prometheus` (tikv/rust-prometheus) and not `prometheus-client`: the latter
//! writes only OpenMetrics, whose counter families are named without `_total`; the
//! promtool of Debian 12 (2.42) lints the classic text format and flags every such
//! counter ("no help text") and rejects its `info` type.

pub mod http;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

pub use http::{serve, serve_with, ServeLimits};

/// Upper bounds of the stall histogram, in seconds: most stalls end within a
/// millisecond of the event; the long tail is minutes of a policy that cannot help.
const STALL_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

fn counter(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(Opts::new(name, help), labels)
}

fn gauge(name: &str, help: &str) -> prometheus::Result<IntGauge> {
    IntGauge::new(name, help)
}

fn gauges(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    IntGaugeVec::new(Opts::new(name, help), labels)
}

fn histogram(
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> prometheus::Result<HistogramVec> {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
}

/// Declares the families: one line each (field: type = constructor), registered in
/// that order under the `oomwake_` prefix.
macro_rules! families {
    ($( $(#[$doc:meta])* $field:ident: $ty:ty = $make:expr; )*) => {
        /// Every metric family the agent exports (see the module doc).
        pub struct Families {
            $( $(#[$doc])* pub $field: $ty, )*
        }

        impl Families {
            fn register(reg: &Registry) -> prometheus::Result<Families> {
                $(
                    let $field: $ty = $make?;
                    reg.register(Box::new($field.clone()))?;
                )*
                Ok(Families { $($field,)* })
            }
        }
    };
}

families! {
    watched_cgroups: IntGauge =
        gauge("watched_cgroups", "Cgroups with an OOM notification registered.");
    oom_events: IntCounterVec =
        counter("oom_events_total", "OOM episodes started, by policy.", &["policy"]);
    actions: IntCounterVec = counter(
        "actions_total",
        "Policy steps run, by action and outcome.",
        &["action", "outcome"],
    );
    /// Seconds from the OOM event to recovery, of the stalls a policy resolved.
    stall_seconds: HistogramVec = histogram(
        "stall_seconds",
        "Time from OOM event to recovery, by policy.",
        &["policy"],
        &STALL_BUCKETS,
    );
    unresolved: IntCounterVec = counter(
        "unresolved_total",
        "Episodes that ended unresolved, by policy.",
        &["policy"],
    );
    stuck_cgroups: IntGaugeVec = gauges(
        "stuck_cgroups",
        "Cgroups stuck in a stall their policy could not resolve, by policy.",
        &["policy"],
    );
    /// Processes sent SIGKILL by a step (kill, kill_all, signal with SIGKILL).
    kills: IntCounterVec = counter(
        "kills_total",
        "Processes killed (SIGKILL) by a policy step, by policy.",
        &["policy"],
    );
    raised_bytes: IntGauge =
        gauge("raised_bytes", "Headroom currently lent by raise_limit, all loans.");
    loans: IntGaugeVec = gauges(
        "loans_outstanding",
        "Loans of headroom (raise_limit) not yet given back, by policy.",
        &["policy"],
    );
    lent_bytes: IntGaugeVec = gauges(
        "lent_bytes",
        "Headroom currently lent by raise_limit, by policy.",
        &["policy"],
    );
    early: IntCounterVec = counter(
        "early_total",
        "Early episodes started (usage crossed the [early] threshold), by policy.",
        &["policy"],
    );
    stalls_avoided: IntCounterVec = counter(
        "stalls_avoided_total",
        "Early episodes that kept the workload away from its limit, by policy.",
        &["policy"],
    );
    build_info: IntGaugeVec = gauges(
        "build_info",
        "Always 1; the labels say which build of oomwake runs.",
        &["version"],
    );
}

/// A loan as the metrics see it (from the loan book, when scraped).
#[derive(Debug, Clone, Copy)]
pub struct Lent<'a> {
    pub policy: &'a str,
    pub bytes: u64,
}

/// The registry and its families. `f` is public: a new metric is a line in
/// [`families!`] and a call on `f` where the thing happens.
pub struct Metrics {
    registry: Registry,
    pub f: Families,
    /// Label values a per-policy gauge has had: set to 0, not removed, when they go,
    /// so that alerts see the end.
    seen: Mutex<BTreeMap<&'static str, BTreeSet<String>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("oomwake".into()), None)
            // Names, labels and buckets are constants: the unit tests register them.
            .expect("the oomwake prefix is a valid metric name");
        let f = Families::register(&registry).expect("metric families are valid and distinct");
        f.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Metrics {
            registry,
            f,
            seen: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn set_watched(&self, n: usize) {
        self.f.watched_cgroups.set(to_i64(n as u64));
    }

    pub fn oom_event(&self, policy: &str) {
        self.f.oom_events.with_label_values(&[policy]).inc();
    }

    /// A step ended with `outcome`, having SIGKILLed `killed` processes.
    pub fn action(&self, policy: &str, action: &str, outcome: &str, killed: u64) {
        self.f.actions.with_label_values(&[action, outcome]).inc();
        if killed > 0 {
            self.f.kills.with_label_values(&[policy]).inc_by(killed);
        }
    }

    /// An early episode started (usage crossed the `[early]` threshold).
    pub fn early(&self, policy: &str) {
        self.f.early.with_label_values(&[policy]).inc();
    }

    /// An early episode kept the workload away from its wall.
    pub fn stall_avoided(&self, policy: &str) {
        self.f.stalls_avoided.with_label_values(&[policy]).inc();
    }

    pub fn unresolved(&self, policy: &str) {
        self.f.unresolved.with_label_values(&[policy]).inc();
    }

    pub fn stall(&self, policy: &str, d: Duration) {
        self.f
            .stall_seconds
            .with_label_values(&[policy])
            .observe(d.as_secs_f64());
    }

    /// Cgroups stuck with their stall unresolved, by policy. A policy seen once stays
    /// at 0 rather than vanishing, so that alerts see the stall end.
    pub fn set_stuck(&self, by_policy: &BTreeMap<String, usize>) {
        let values = by_policy
            .iter()
            .map(|(p, n)| (p.clone(), to_i64(*n as u64)))
            .collect();
        self.set_by_policy("stuck_cgroups", &self.f.stuck_cgroups, values);
    }

    /// The loans outstanding now (count and bytes, by policy, and the total).
    pub fn set_loans(&self, loans: &[Lent]) {
        let mut count = BTreeMap::new();
        let mut bytes = BTreeMap::new();
        for l in loans {
            *count.entry(l.policy.to_string()).or_insert(0i64) += 1;
            let b = bytes.entry(l.policy.to_string()).or_insert(0i64);
            *b = b.saturating_add(to_i64(l.bytes));
        }
        self.f.raised_bytes.set(bytes.values().sum());
        self.set_by_policy("loans", &self.f.loans, count);
        self.set_by_policy("lent_bytes", &self.f.lent_bytes, bytes);
    }

    fn set_by_policy(&self, key: &'static str, g: &IntGaugeVec, values: BTreeMap<String, i64>) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let seen = seen.entry(key).or_default();
        for p in seen.iter() {
            if !values.contains_key(p) {
                g.with_label_values(&[p.as_str()]).set(0);
            }
        }
        for (p, n) in values {
            g.with_label_values(&[p.as_str()]).set(n);
            seen.insert(p);
        }
    }

    /// The exposition text (format 0.0.4), with the loans as they are now.
    pub fn render(&self, loans: &[Lent]) -> String {
        self.set_loans(loans);
        let mut out = String::new();
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            log::warn!("metrics: encoding failed: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuck_gauge_goes_to_zero_when_the_stall_ends() {
        let m = Metrics::default();
        let mut stuck = BTreeMap::new();
        stuck.insert("go-service".to_string(), 2);
        m.set_stuck(&stuck);
        let text = m.render(&[]);
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
            .render(&[])
            .contains("oomwake_stuck_cgroups{policy=\"go-service\"} 0"));
    }

    #[test]
    fn render_has_every_family() {
        let m = Metrics::default();
        m.set_watched(3);
        m.oom_event("go-api");
        m.action("go-api", "raise_limit", "done", 0);
        m.action("go-api", "kill_all", "done", 3);
        m.unresolved("go-api");
        m.stall("go-api", Duration::from_micros(700));
        m.early("go-api");
        m.early("go-api");
        m.stall_avoided("go-api");
        let t = m.render(&[
            Lent {
                policy: "go-api",
                bytes: 16 << 20,
            },
            Lent {
                policy: "jvm",
                bytes: 1 << 20,
            },
        ]);
        for line in [
            "oomwake_watched_cgroups 3\n",
            "oomwake_oom_events_total{policy=\"go-api\"} 1\n",
            "oomwake_actions_total{action=\"raise_limit\",outcome=\"done\"} 1\n",
            "oomwake_kills_total{policy=\"go-api\"} 3\n",
            "oomwake_stall_seconds_bucket{policy=\"go-api\",le=\"0.0005\"} 0\n",
            "oomwake_stall_seconds_bucket{policy=\"go-api\",le=\"0.001\"} 1\n",
            "oomwake_stall_seconds_count{policy=\"go-api\"} 1\n",
            "oomwake_raised_bytes 17825792\n",
            "oomwake_loans_outstanding{policy=\"go-api\"} 1\n",
            "oomwake_lent_bytes{policy=\"jvm\"} 1048576\n",
            "oomwake_unresolved_total{policy=\"go-api\"} 1\n",
            "oomwake_early_total{policy=\"go-api\"} 2\n",
            "oomwake_stalls_avoided_total{policy=\"go-api\"} 1\n",
            "# TYPE oomwake_stall_seconds histogram\n",
            "# TYPE oomwake_kills_total counter\n",
        ] {
            assert!(t.contains(line), "no {line:?} in\n{t}");
        }
        let build = format!(
            "oomwake_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        assert!(t.contains(&build), "{t}");
        // A loan given back leaves its policy at 0.
        let t = m.render(&[]);
        assert!(
            t.contains("oomwake_loans_outstanding{policy=\"jvm\"} 0\n"),
            "{t}"
        );
        assert!(t.contains("oomwake_raised_bytes 0\n"), "{t}");
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::default();
        m.oom_event("a\"b\\c\nd");
        let t = m.render(&[]);
        assert!(
            t.contains("oomwake_oom_events_total{policy=\"a\\\"b\\\\c\\nd\"} 1\n"),
            "{t}"
        );
    }
}
