//! Test-only fault injection, for the integration tests of crash recovery. The
//! environment variable `OOMWAKE_FAULT=POINT:ACTION[:N]` (read once, when the agent
//! starts) makes the agent act at the N-th time (default 1) it passes POINT:
//! `abort` (a crash: SIGABRT, nothing flushed or given back), `panic` (a Rust panic in
//! the thread passing the point: a bug) or `pause-MS` (sleep MS milliseconds). Points:
//! `after_journal_put` (a raise is journaled, its limits not yet written),
//! `after_restore_memory` (a restore lowered memory, memsw not yet),
//! `limit_first_before_write` (a raise of the agent's own cgroup), `episode_start` (an
//! OOM episode wrote its `oom` line, before its first step), `after_step` (an episode's
//! step returned, before the check of its effect), `handoff_enabled` (a v1
//! `kernel_oom_kill` wrote oom_kill_disable 0, not yet 1 again).
//!
//! Never set it in production: it exists so that tests can stop the agent between two
//! writes that must both happen.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
enum Act {
    Abort,
    Panic,
    Pause(Duration),
}

#[derive(Debug, Clone, PartialEq)]
struct Fault {
    point: String,
    act: Act,
    nth: u32,
}

static FAULT: OnceLock<Option<Fault>> = OnceLock::new();
static HITS: AtomicU32 = AtomicU32::new(0);

fn parse(s: &str) -> Option<Fault> {
    let mut it = s.split(':');
    let point = it.next()?.to_string();
    let act = match it.next()? {
        "abort" => Act::Abort,
        "panic" => Act::Panic,
        p => Act::Pause(Duration::from_millis(
            p.strip_prefix("pause-")?.parse().ok()?,
        )),
    };
    let nth = match it.next() {
        Some(n) => n.parse().ok()?,
        None => 1,
    };
    Some(Fault { point, act, nth })
}

/// Reads `OOMWAKE_FAULT` once; call at start. Without it, [`point`] does nothing.
pub fn init() {
    FAULT.get_or_init(|| {
        let v = std::env::var("OOMWAKE_FAULT").ok()?;
        let f = parse(&v);
        match &f {
            Some(f) => log::warn!("TEST-ONLY fault injection armed: {f:?}"),
            None => {
                log::error!("OOMWAKE_FAULT={v:?} is not POINT:abort|panic|pause-MS[:N]; ignored")
            }
        }
        f
    });
}

/// A place where a test may stop the agent.
pub fn point(name: &str) {
    let Some(Some(f)) = FAULT.get() else {
        return;
    };
    if f.point != name || HITS.fetch_add(1, Ordering::SeqCst) + 1 != f.nth {
        return;
    }
    match f.act {
        Act::Abort => {
            // Straight to stderr: the log goes through a queue that an abort never drains.
            eprintln!("TEST-ONLY fault injection: aborting at {name}");
            std::process::abort()
        }
        Act::Panic => panic!("TEST-ONLY fault injection: panic at {name}"),
        Act::Pause(d) => {
            log::warn!("TEST-ONLY fault injection: pausing {d:?} at {name}");
            std::thread::sleep(d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses() {
        assert_eq!(
            parse("after_journal_put:abort:2"),
            Some(Fault {
                point: "after_journal_put".into(),
                act: Act::Abort,
                nth: 2
            })
        );
        assert_eq!(
            parse("x:pause-50").map(|f| f.act),
            Some(Act::Pause(Duration::from_millis(50)))
        );
        assert_eq!(
            parse("episode_start:panic").map(|f| f.act),
            Some(Act::Panic)
        );
        assert_eq!(parse("x"), None);
        assert_eq!(parse("x:explode"), None);
    }
}
