//! The holder thread of the v2 hold (`[v2] hold_at`): it writes `memory.high` for the
//! event loop through [`crate::hold::Holds`] and writes the `hold` and `unhold` audit
//! lines. It sits above [`crate::shared`] (which holds the `Holds`), and that depends on
//! [`crate::hold`] and not on this module.

use std::io;
use std::sync::Arc;

use crate::audit::Record;
use crate::cgroup::CgroupPath;
use crate::hold::{Held, Released};
use crate::policy::Policy;
use crate::shared::Shared;

/// A request to the holder thread.
enum Request {
    Hold(CgroupPath, Arc<Policy>),
    Release(CgroupPath, String),
}

/// The thread that writes `memory.high` for the event loop. A write below usage makes
/// the kernel reclaim down to it before the write returns, which can take long: the loop
/// only queues the request (in order: a hold and its release are made in the order
/// asked) and goes on. The `hold` and `unhold` audit lines are written from here.
pub struct Holder {
    tx: Option<crossbeam_channel::Sender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Holder {
    pub fn start(shared: Arc<Shared>) -> io::Result<Holder> {
        let (tx, rx) = crossbeam_channel::unbounded::<Request>();
        let thread = std::thread::Builder::new()
            .name("holder".into())
            .stack_size(crate::sys::THREAD_STACK)
            .spawn(move || {
                for req in rx {
                    match req {
                        Request::Hold(cg, policy) => apply(&shared, &cg, &policy),
                        Request::Release(cg, reason) => release(&shared, &cg, &reason),
                    }
                }
            })?;
        Ok(Holder {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn send(&self, req: Request) {
        if let Some(tx) = &self.tx {
            if tx.send(req).is_err() {
                log::error!("the holder thread is gone: memory.high request dropped");
            }
        }
    }

    /// Queues the hold of `policy` (`[v2] hold_at`) on `cg`; nothing if it has none.
    pub fn hold(&self, cg: &CgroupPath, policy: Arc<Policy>) {
        if policy.v2.hold_at.is_some() {
            self.send(Request::Hold(cg.clone(), policy));
        }
    }

    /// Queues giving the hold of `cg` back (nothing if it is not held).
    pub fn release(&self, cg: &CgroupPath, reason: &str) {
        self.send(Request::Release(cg.clone(), reason.to_string()));
    }

    /// Makes what is queued, then ends the thread.
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Sets the hold of `policy` on `cg` (audited `hold`).
pub fn apply(shared: &Shared, cg: &CgroupPath, policy: &Policy) {
    let Some(at) = policy.v2.hold_at else {
        return;
    };
    let ctl = shared.env.ctl.as_ref();
    let audit = policy.mode == crate::policy::Mode::Audit;
    let rec = Record::new("hold", cg).with("policy", policy.name.clone());
    match shared.holds.hold(ctl, cg, &policy.name, at, audit) {
        Ok(Held::Set { old, new }) => shared
            .audit
            .log(rec.with("old_high", old).with("new_high", new)),
        Ok(Held::Would { old, new }) => shared.audit.log(
            rec.with("old_high", old)
                .with("new_high", new)
                .with("outcome", "would"),
        ),
        Ok(Held::Adopted { held }) => {
            log::info!("{cg}: re-adopted the hold of memory.high at {held}");
            shared
                .audit
                .log(rec.with("new_high", held).with("adopted", true));
        }
        Ok(Held::NotApplicable) => {
            log::debug!("{cg}: hold_at does not apply (no memory.high, or no memory.max)")
        }
        Err(e) => log::error!("{cg}: cannot hold memory.high: {e}"),
    }
}

/// Gives the hold of `cg` back (audited `unhold`); nothing if `cg` is not held.
pub fn release(shared: &Shared, cg: &CgroupPath, reason: &str) {
    let ctl = shared.env.ctl.as_ref();
    let loan_high = shared.env.loans.original(cg).and_then(|l| l.high);
    match shared.holds.release(ctl, cg, loan_high) {
        Ok(Released::Restored { old, new }) => shared.audit.log(
            Record::new("unhold", cg)
                .with("old_high", old)
                .with("new_high", new)
                .with("reason", reason),
        ),
        Ok(Released::Changed { current }) => {
            log::warn!("{cg}: memory.high is {current}, not the value oomwake held; leaving it")
        }
        Ok(Released::Deferred) => {
            log::info!("{cg}: memory.high goes back once the outstanding loan is returned")
        }
        Ok(Released::Gone) | Ok(Released::NotHeld) => {}
        Err(e) => log::error!("{cg}: giving memory.high back: {e}"),
    }
}
