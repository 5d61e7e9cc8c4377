//! Loans of headroom (`raise_limit`) and everything that gives them back: the book of
//! outstanding loans and its state machine, the keeper's tick, the restores at start-up
//! and shutdown. One loan per cgroup: a new OOM while a loan is out raises further (up to
//! the policy's ceiling), and giving it back always restores the limit the cgroup had
//! before the *first* raise.
//!
//! ## The state machine
//! Every change of a cgroup's limits takes up to two writes on v1 (memsw first when
//! raising, memory first when lowering), and each is journaled ([`crate::journal`])
//! before its first write, with the original limits, the target and the step reached:
//!
//! ```text
//! (none) --lend: journal change{from,to,begun}--> writes --read back--> lent (no change)
//! lent   --restore: journal change{from,original,begun}--> memory written
//!        --journal change{...,memory_done}--> memsw written --journal remove--> (none)
//! ```
//!
//! A crash or a refused write can leave the kernel anywhere along that path. A value is
//! the agent's own when it is one of the values the record names (original, lent, the
//! change's from and to) as the kernel stores them (rounded down to the kernel's page
//! size, capped at its maximum): such a loan is finished or given back, never dropped
//! as "changed by someone else". Only a value none of those explain is someone else's;
//! then the loan is given up and the audit log says so (`loan_given_up`).
//!
//! ## Locks
//! The book's lock covers the map of loans and the journal append that mirrors each
//! change of it (one write(2)); nothing slow runs under it. Limit writes (a lowering
//! makes the kernel reclaim synchronously), fsync and compaction run without it. Writes
//! to one cgroup are serialised by a per-cgroup gate, so a lend waits at most for a
//! restore of the same cgroup, never for another's.
//!
//! ## Giving back
//! A loan is given back when usage has stayed below `restore_below` of the original
//! limit for `restore_after`, or at `hold` expiry, and in both cases only while usage is
//! below `restore_below` (default 90 %) of the original: lowering the limit onto a
//! workload that just fills it would evict it down to the wall again. Usage here is the
//! working set ([`working_set`]: usage less inactive file cache). At hold expiry a
//! workload that does not fit makes the keeper resume its episode at the step after
//! `raise_limit` in the policy that matches the cgroup now.
//!
//! [`keeper`] holds the agent-facing side: the keeper thread, recovery at start, the
//! restores at shutdown, and the one place the `restore` audit line is built.

pub mod fault;
pub mod keeper;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cgroup::{parse::is_unlimited, CgroupError, CgroupPath, Controller, Limits};
use crate::journal::{Change, ChangeStep, Damage, Journal, JournalError, LoanRecord};
use crate::policy::{Action, Policy, Raise};

#[derive(Debug, thiserror::Error)]
pub enum LoanError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
    #[error("cgroup is gone")]
    Gone,
}

/// What a raise did (or would do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lend {
    /// `new` is what the kernel holds now (read back).
    Raised {
        old: u64,
        new: u64,
    },
    Would {
        old: u64,
        new: u64,
    },
    /// Already at the policy's ceiling: nothing to lend.
    AtCeiling {
        limit: u64,
        ceiling: u64,
    },
    /// The limit is unlimited: there is nothing to raise.
    Unlimited,
}

/// What giving a loan back did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restore {
    /// Both limits are back at the original; the loan is over.
    Restored {
        old: u64,
        new: u64,
    },
    /// Usage is not below the margin under the original limit (or the kernel refused
    /// to lower memory with EBUSY): nothing changed, the loan stays.
    DoesNotFit,
    /// Memory is back at the original but the kernel refused memsw (EBUSY): the journal
    /// says so and the keeper finishes it.
    MemoryOnly {
        memory: u64,
    },
    /// Dry run: what a restore would write.
    Would {
        old: u64,
        new: u64,
    },
    /// The cgroup is gone: so is the loan.
    Gone,
    /// Someone else set a limit the agent never wrote: theirs stands, the loan is given up.
    GivenUp {
        current: u64,
    },
    NoLoan,
}

/// Something the keeper did or asks for on a tick.
#[derive(Debug, Clone, PartialEq)]
pub enum TickEvent {
    Restored {
        cgroup: CgroupPath,
        old: u64,
        new: u64,
        reason: &'static str,
    },
    /// The hold expired with usage not fitting the original limit: resume the episode
    /// at the step after raise_limit (`step` is the journaled one; check it against the
    /// current policy with [`resume_step`]).
    Resume {
        cgroup: CgroupPath,
        policy: String,
        episode: u64,
        step: usize,
    },
    /// A loan the agent gave up (see [`GivenUp`]).
    GivenUp(GivenUp),
}

/// A loan given up for good: the cgroup is gone, or its limit holds a value the agent
/// never wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct GivenUp {
    pub cgroup: CgroupPath,
    pub original: u64,
    pub lent: u64,
    /// The limit found (None: the cgroup is gone).
    pub current: Option<u64>,
    pub why: &'static str,
}

struct Loan {
    rec: LoanRecord,
    hold: Duration,
    hold_until: Instant,
    expired: bool,
    next_resume: Instant,
    below_since: Option<Instant>,
    /// Why a restore that got only half way was started (the keeper finishes it).
    pending_reason: Option<&'static str>,
}

impl Loan {
    fn from_record(rec: LoanRecord, now: Instant) -> Loan {
        let wall_now = unix_ms();
        let left = Duration::from_millis(rec.hold_until_unix_ms.saturating_sub(wall_now));
        let hold =
            Duration::from_millis(rec.hold_until_unix_ms.saturating_sub(rec.started_unix_ms));
        Loan {
            hold,
            hold_until: now + left,
            expired: false,
            next_resume: now + left,
            below_since: None,
            pending_reason: None,
            rec,
        }
    }
}

/// Wall-clock milliseconds since the epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The page size the kernel reports; limits are stored in whole pages of it.
pub fn kernel_page_size() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(p)) if p > 0 && (p as u64).is_power_of_two() => p as u64,
        _ => 4096,
    }
}

/// The step a resumed episode starts at in `policy` (as it is now), given the step
/// journaled when the loan was made: that step if it still follows a `raise_limit`,
/// else the step after the policy's first `raise_limit`, else its first step (a policy
/// that no longer lends still says what to do with the cgroup). None when that is past
/// the last step: nothing to resume, the loan is given back once usage fits.
pub fn resume_step(policy: &Policy, journaled: usize) -> Option<usize> {
    let is_raise = |i: usize| {
        policy
            .steps
            .get(i)
            .is_some_and(|s| matches!(s.action, Action::RaiseLimit(_)))
    };
    let step = if journaled > 0 && is_raise(journaled - 1) {
        journaled
    } else {
        (0..policy.steps.len())
            .find(|&i| is_raise(i))
            .map(|i| i + 1)
            .unwrap_or(0)
    };
    (step < policy.steps.len()).then_some(step)
}

/// What a loan's margin is measured on: usage less the inactive file cache, which the
/// kernel reclaims first and cheaply (the "working set" of cAdvisor and the kubelet).
/// Cold cache must not keep a loan out, nor get a workload killed at hold expiry; a
/// workload whose own pages fill the old limit must. `Ok(None)`: the cgroup is gone.
pub fn working_set(ctl: &dyn Controller, cg: &CgroupPath) -> Result<Option<u64>, CgroupError> {
    let Some(usage) = ctl.usage(cg)? else {
        return Ok(None);
    };
    let inactive = match ctl.stat(cg) {
        Ok(Some(st)) => st
            .get("total_inactive_file")
            .or_else(|| st.get("inactive_file"))
            .copied()
            .unwrap_or(0),
        _ => 0,
    };
    Ok(Some(usage.saturating_sub(inactive)))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// All outstanding loans, mirrored in the journal.
pub struct LoanBook {
    loans: Mutex<BTreeMap<CgroupPath, Loan>>,
    /// One gate per cgroup being changed: serialises the writes to one cgroup.
    gates: Mutex<HashMap<CgroupPath, Arc<Mutex<()>>>>,
    journal: Option<Journal>,
    /// Dry run: nothing is written, to cgroups or to the journal.
    read_only: bool,
    /// The journal has appends not yet fsynced (see [`LoanBook::fsync_appends`]).
    unsynced: AtomicBool,
    /// Bumped on every change of a loan (journaled), so readers can tell change cheaply.
    generation: AtomicU64,
    compacting: Mutex<()>,
    page: u64,
    given_up: Mutex<Vec<GivenUp>>,
    damage: Mutex<Vec<Damage>>,
    /// Told of every memory limit the book wrote (a loan moves the wall, a restore
    /// moves it back): early thresholds follow it.
    moved: std::sync::OnceLock<LimitMoved>,
    /// The agent's own memory cgroup (None: unknown, or tests): a raise of it or of an
    /// ancestor writes the limit before journaling ([`LoanBook::lend`]).
    own: Mutex<Option<CgroupPath>>,
}

/// What [`LoanBook::on_limit_moved`] calls.
pub type LimitMoved = Box<dyn Fn(&CgroupPath) + Send + Sync>;

/// Why a loan is given up when its cgroup was removed and made again at its path.
pub const REPLACED: &str = "cgroup replaced";

/// Compact the log once it passes this size (a few hundred operations).
const COMPACT_AT: u64 = 64 * 1024;

impl LoanBook {
    /// A book persisted in `journal` (None: memory only, for tests). A read-only
    /// journal (dry run) makes a book that never writes anything.
    pub fn new(journal: Option<Journal>) -> LoanBook {
        // Read now, not first in an episode (see `cgroup::boot_id`).
        if let Err(e) = crate::cgroup::boot_id() {
            log::warn!("cannot read the boot id: {e}; loans record no cgroup identity");
        }
        LoanBook {
            read_only: journal.as_ref().is_some_and(|j| j.is_read_only()),
            loans: Mutex::new(BTreeMap::new()),
            gates: Mutex::new(HashMap::new()),
            journal,
            unsynced: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            compacting: Mutex::new(()),
            page: kernel_page_size(),
            given_up: Mutex::new(Vec::new()),
            damage: Mutex::new(Vec::new()),
            moved: std::sync::OnceLock::new(),
            own: Mutex::new(None),
        }
    }

    /// Tells the book which memory cgroup the agent itself runs in (at start).
    pub fn set_own_cgroup(&self, own: Option<CgroupPath>) {
        *lock(&self.own) = own;
    }

    /// The agent's own memory cgroup, if known.
    pub fn own_cgroup(&self) -> Option<CgroupPath> {
        lock(&self.own).clone()
    }

    /// True when the agent's own cgroup is `cg` or below it: a stall of `cg` is then
    /// the agent's too, and anything that needs a new page charged there (a journal
    /// append) fails with ENOMEM until the limit moves.
    pub fn inside(&self, cg: &CgroupPath) -> bool {
        let own = lock(&self.own).clone();
        let mut c = own;
        while let Some(x) = c {
            if &x == cg {
                return true;
            }
            c = x.parent();
        }
        false
    }

    /// Sets what is told of every memory limit the book writes (once).
    pub fn on_limit_moved(&self, f: LimitMoved) {
        let _ = self.moved.set(f);
    }

    fn limit_moved(&self, cg: &CgroupPath) {
        if let Some(f) = self.moved.get() {
            f(cg);
        }
    }

    /// The same book for a kernel with another page size (tests of 64 KiB kernels).
    pub fn with_page_size(mut self, page: u64) -> LoanBook {
        self.page = page.max(1);
        self
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<CgroupPath, Loan>> {
        lock(&self.loans)
    }

    /// The gate of `cg`, created on first use and dropped when the cgroup has no loan.
    fn gate(&self, cg: &CgroupPath) -> Gate<'_> {
        let g = lock(&self.gates)
            .entry(cg.clone())
            .or_insert_with(|| Arc::new(Mutex::new(())))
            .clone();
        Gate {
            book: self,
            cg: cg.clone(),
            gate: g,
        }
    }

    /// Runs `f` holding `cg`'s gate, so that no loan write (a raise, a restore) of `cg`
    /// happens meanwhile: for a change of the cgroup's limits made outside the book that
    /// the book must not mistake for someone else's (the v2 hand-off to the kernel's OOM
    /// killer lifts `memory.high` and puts it back).
    pub fn with_gate<R>(&self, cg: &CgroupPath, f: impl FnOnce() -> R) -> R {
        let gate = self.gate(cg);
        let _held = lock(&gate.gate);
        f()
    }

    /// The state directory of the journal (None: no journal, or a dry run).
    pub fn state_dir(&self) -> Option<std::path::PathBuf> {
        if self.read_only {
            return None;
        }
        self.journal
            .as_ref()
            .and_then(|j| j.path().parent().map(std::path::Path::to_path_buf))
    }

    /// What the kernel stores when `v` is written: whole pages, at most its maximum.
    fn stored(&self, v: u64) -> u64 {
        v.min(i64::MAX as u64) / self.page * self.page
    }

    /// The highest limit the kernel stores (v1: PAGE_COUNTER_MAX pages, "unlimited").
    fn kernel_max(&self) -> u64 {
        self.stored(u64::MAX)
    }

    /// True when every limit in `cur` is one the agent wrote or found for this loan.
    fn holds_ours(&self, rec: &LoanRecord, cur: Limits) -> bool {
        let mut known = vec![rec.original, rec.lent];
        if let Some(c) = rec.change {
            known.push(c.from);
            known.push(c.to);
        }
        let memory = known.iter().any(|l| self.stored(l.memory) == cur.memory);
        let memsw = match cur.memsw {
            None => true,
            Some(sw) => known
                .iter()
                .any(|l| l.memsw.map(|v| self.stored(v)) == Some(sw)),
        };
        memory && memsw
    }

    /// Puts `rec` in the book and the journal, under the lock (one append). A new loan
    /// starts its hold now; an existing one keeps its timers.
    fn store(&self, rec: &LoanRecord, hold: Duration) -> Result<(), JournalError> {
        let mut loans = self.lock();
        let cg = rec.cgroup.clone();
        let prev = self.put_in_book(&mut loans, rec, hold);
        if let Some(j) = &self.journal {
            if let Err(e) = j.put(rec) {
                match prev {
                    Some(p) => {
                        if let Some(l) = loans.get_mut(&cg) {
                            l.rec = p;
                        }
                    }
                    None => {
                        loans.remove(&cg);
                    }
                }
                return Err(e);
            }
            self.unsynced.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Records what the kernel now holds after a write: the book always follows (it
    /// must not keep a change in flight that is over), the journal as far as it can
    /// (its older record names the same values as the agent's own).
    fn note(&self, rec: &LoanRecord) {
        let cg = rec.cgroup.clone();
        if let Err(e) = self.store(rec, Duration::ZERO) {
            log::warn!("{cg}: {e}");
            if let Some(l) = self.lock().get_mut(&cg) {
                l.rec = rec.clone();
            }
        }
    }

    /// Ends the loan of `cg` in the book and the journal.
    fn end(&self, cg: &CgroupPath) {
        let mut loans = self.lock();
        if loans.remove(cg).is_none() {
            return;
        }
        self.generation.fetch_add(1, Ordering::Relaxed);
        if let Some(j) = &self.journal {
            match j.remove(cg) {
                // The journal still names the loan: the next start finds the original
                // limit in place and ends it then.
                Err(e) => log::warn!("{cg}: {e}"),
                Ok(()) => self.unsynced.store(true, Ordering::SeqCst),
            }
        }
    }

    /// Gives a loan up for good and queues the fact for the audit log.
    /// Gives the loan up (and says so) when the cgroup at its path is not the one lent
    /// to, or holds a limit the agent never wrote: true when it did.
    fn given_up_as_not_ours(&self, ctl: &dyn Controller, rec: &LoanRecord, cur: Limits) -> bool {
        let why = if self.replaced(ctl, rec) {
            REPLACED
        } else if !self.holds_ours(rec, cur) {
            "limit changed by someone else"
        } else {
            return false;
        };
        self.give_up(rec, Some(cur.memory), why);
        true
    }

    /// True when the cgroup at the loan's path is not the one lent to (removed and made
    /// again, or from another boot). Unknown (an old journal, a failed read) is not
    /// "replaced": the limit checks of [`LoanBook::holds_ours`] still apply.
    fn replaced(&self, ctl: &dyn Controller, rec: &LoanRecord) -> bool {
        let Some(lent_to) = &rec.identity else {
            return false;
        };
        match ctl.hierarchy().identity(&rec.cgroup) {
            Ok(Some(now)) => now != *lent_to,
            Ok(None) | Err(_) => false,
        }
    }

    fn give_up(&self, rec: &LoanRecord, current: Option<u64>, why: &'static str) {
        log::warn!(
            "{}: giving the loan up ({why}): original {}, lent {}, found {:?}",
            rec.cgroup,
            rec.original.memory,
            rec.lent.memory,
            current
        );
        self.end(&rec.cgroup);
        lock(&self.given_up).push(GivenUp {
            cgroup: rec.cgroup.clone(),
            original: rec.original.memory,
            lent: rec.lent.memory,
            current,
            why,
        });
    }

    /// Loans given up since the last call (for the audit log).
    pub fn take_given_up(&self) -> Vec<GivenUp> {
        std::mem::take(&mut *lock(&self.given_up))
    }

    /// fsyncs the journal's appends that are not yet durable (no loan lock held; appends
    /// go on meanwhile). On failure they stay pending and the next call tries again.
    fn fsync_appends(&self) {
        if let Some(j) = &self.journal {
            if self.unsynced.swap(false, Ordering::SeqCst) {
                if let Err(e) = j.sync() {
                    self.unsynced.store(true, Ordering::SeqCst);
                    log::warn!("{e}; will retry");
                }
            }
        }
    }

    /// Makes the journal durable and keeps it short: fsyncs what a raise appended
    /// without fsync (`fsync_appends`), then, once the log has passed `COMPACT_AT`
    /// (64 KiB), rewrites the snapshot ([`LoanBook::rewrite_snapshot`]). Called after
    /// the rescue (after each step, and by the keeper), never between the OOM and the
    /// limit write.
    pub fn fsync_and_compact_if_long(&self) {
        self.fsync_appends();
        if self
            .journal
            .as_ref()
            .is_some_and(|j| j.log_len() > COMPACT_AT)
        {
            self.rewrite_snapshot();
        }
    }

    /// Compacts the journal: rewrites the snapshot (`loans.json`) as the current loans
    /// and drops the log it replaces (temporary file, fsync, rename, fsync of the
    /// directory). Only the log's rotation (a rename) runs under the loan lock; the
    /// snapshot's writes and fsyncs do not. Nothing in a dry run; a no-op while another
    /// rewrite runs.
    pub fn rewrite_snapshot(&self) {
        let Some(j) = &self.journal else {
            return;
        };
        if self.read_only {
            return;
        }
        let Ok(_one) = self.compacting.try_lock() else {
            return;
        };
        let recs: Vec<LoanRecord> = {
            let loans = self.lock();
            if let Err(e) = j.rotate() {
                log::warn!("compacting the journal: {e}");
                return;
            }
            loans.values().map(|l| l.rec.clone()).collect()
        };
        if let Err(e) = j.finish_compaction(&recs) {
            log::warn!("compacting the journal: {e}");
        }
    }

    /// Changes whenever a loan is made, extended or ended.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The outstanding loans as records (for status and metrics).
    pub fn records(&self) -> Vec<LoanRecord> {
        self.lock().values().map(|l| l.rec.clone()).collect()
    }

    pub fn has_loan(&self, cg: &CgroupPath) -> bool {
        self.lock().contains_key(cg)
    }

    /// Bytes currently lent across all cgroups.
    pub fn lent_bytes(&self) -> u64 {
        self.lent().iter().map(|(_, b)| b).sum()
    }

    /// Each outstanding loan's policy and the bytes it lends now (for the metrics).
    pub fn lent(&self) -> Vec<(String, u64)> {
        self.lock()
            .values()
            .map(|l| {
                let bytes = l.rec.lent.memory.saturating_sub(l.rec.original.memory);
                (l.rec.policy.clone(), bytes)
            })
            .collect()
    }

    /// Original limits of an outstanding loan.
    pub fn original(&self, cg: &CgroupPath) -> Option<Limits> {
        self.lock().get(cg).map(|l| l.rec.original)
    }

    /// Records damage found in the journal at start (for status).
    pub fn set_journal_damage(&self, d: Vec<Damage>) {
        *lock(&self.damage) = d;
    }

    /// Damage found in the journal at start: shown by `oomwake status`.
    pub fn journal_damage(&self) -> Vec<Damage> {
        lock(&self.damage).clone()
    }

    /// Raises the limit of `cg` by `raise.by`, up to its ceiling, recording the loan.
    #[allow(clippy::too_many_arguments)]
    pub fn lend(
        &self,
        ctl: &dyn Controller,
        cg: &CgroupPath,
        policy: &str,
        raise: &Raise,
        episode: u64,
        resume_step: usize,
        audit_only: bool,
    ) -> Result<Lend, LoanError> {
        let _gate = self.gate(cg);
        let _held = lock(&_gate.gate);
        let dry = audit_only || self.read_only;
        let cur = ctl.limits(cg)?.ok_or(LoanError::Gone)?;
        let existing = self.lock().get(cg).map(|l| (l.rec.clone(), l.hold));
        let existing = match existing {
            // The cgroup lent to was removed and made again here (a container restarted)
            // before the keeper's turn: its loan is not this cgroup's to extend (its
            // restore would find the cgroup replaced and leave this raise in place).
            Some((rec, _)) if self.replaced(ctl, &rec) => {
                if !dry {
                    self.give_up(&rec, Some(cur.memory), REPLACED);
                }
                None
            }
            Some((rec, _)) if !self.holds_ours(&rec, cur) => {
                if !dry {
                    self.give_up(&rec, Some(cur.memory), "limit changed by someone else");
                }
                None
            }
            other => other,
        };
        if is_unlimited(cur.memory) {
            return Ok(Lend::Unlimited);
        }
        let original = existing.as_ref().map(|(r, _)| r.original).unwrap_or(cur);
        let kmax = self.kernel_max();
        let ceiling = self.stored(raise.ceiling_for(original.memory));
        let new = self.stored(
            cur.memory
                .saturating_add(raise.by.of(cur.memory))
                .min(ceiling),
        );
        if new <= cur.memory {
            return Ok(Lend::AtCeiling {
                limit: cur.memory,
                ceiling,
            });
        }
        if dry {
            return Ok(Lend::Would {
                old: cur.memory,
                new,
            });
        }
        let memsw = cur.memsw.map(|s| {
            if is_unlimited(s) {
                s
            } else {
                s.saturating_add(new - cur.memory).min(kmax)
            }
        });
        // v2: memory.high moves up with memory.max by the same amount (a throttle limit
        // left where it was would keep the workload held below its new headroom).
        let high = cur.high.map(|h| {
            if is_unlimited(h) {
                h
            } else {
                self.stored(h.saturating_add(new - cur.memory).min(kmax))
            }
        });
        let to = Limits {
            memory: new,
            memsw,
            high,
        };
        let (mut rec, hold) = match existing.clone() {
            Some((r, hold)) => (r, hold),
            None => {
                let wall = unix_ms();
                let rec = LoanRecord {
                    cgroup: cg.clone(),
                    policy: policy.to_string(),
                    episode,
                    original,
                    lent: cur,
                    change: None,
                    started_unix_ms: wall,
                    hold_until_unix_ms: wall.saturating_add(raise.hold.as_millis() as u64),
                    restore_below_bytes: (original.memory as f64 * raise.restore_below) as u64,
                    restore_after_ms: raise.restore_after.as_millis() as u64,
                    resume_step,
                    identity: ctl.hierarchy().identity(cg).ok().flatten(),
                };
                (rec, raise.hold)
            }
        };
        if self.inside(cg) {
            return self.lend_limit_first(ctl, cg, rec, existing, cur, to, hold);
        }
        rec.change = Some(Change {
            from: cur,
            to,
            step: ChangeStep::Begun,
        });
        // Journal first: if we crash after the cgroup write, the next start knows. The
        // fsync waits until the workload has its headroom
        // (LoanBook::fsync_and_compact_if_long).
        self.store(&rec, hold)?;
        if let Some(l) = self.lock().get_mut(cg) {
            l.below_since = None;
        }
        fault::point("after_journal_put");
        let res = ctl.set_limits(cg, cur, to);
        let after = ctl.limits(cg).ok().flatten();
        match res {
            Ok(()) => {
                self.limit_moved(cg);
                rec.lent = after.unwrap_or(Limits {
                    memory: self.stored(to.memory),
                    memsw: to.memsw.map(|v| self.stored(v)),
                    high: to.high.map(|v| self.stored(v)),
                });
                rec.change = None;
                self.note(&rec);
                Ok(Lend::Raised {
                    old: cur.memory,
                    new: rec.lent.memory,
                })
            }
            Err(e) => {
                self.settle_failed_raise(ctl, rec, existing.map(|(r, _)| r), cur, after);
                Err(e.into())
            }
        }
    }

    /// A raise of the agent's own cgroup (or an ancestor), stuck at its wall: the
    /// journal append would need a new page charged there and fail (ENOMEM) until the
    /// limit moves, so the limit is written first and the loan journaled right after,
    /// with the headroom it made. The cost: a crash between the two writes leaves the
    /// limit raised and unrecorded (never given back by the next start), which errs
    /// toward memory for the workload rather than a stall nobody can end.
    #[allow(clippy::too_many_arguments)]
    fn lend_limit_first(
        &self,
        ctl: &dyn Controller,
        cg: &CgroupPath,
        mut rec: LoanRecord,
        existing: Option<(LoanRecord, Duration)>,
        cur: Limits,
        to: Limits,
        hold: Duration,
    ) -> Result<Lend, LoanError> {
        fault::point("limit_first_before_write");
        let res = ctl.set_limits(cg, cur, to);
        let after = ctl.limits(cg).ok().flatten();
        if let Err(e) = res {
            // Nothing was journaled for this change: settle against the book as it was.
            self.settle_failed_raise(ctl, rec, existing.map(|(r, _)| r), cur, after);
            return Err(e.into());
        }
        rec.lent = after.unwrap_or(Limits {
            memory: self.stored(to.memory),
            memsw: to.memsw.map(|v| self.stored(v)),
            high: to.high.map(|v| self.stored(v)),
        });
        rec.change = None;
        self.limit_moved(cg);
        // The headroom is there now; the kernel may still be handing it to the workload
        // that waited, so a failed append is tried again a few times before the loan
        // is kept in the book only (the keeper gives it back all the same, and its next
        // change journals it whole).
        let mut tries = 0;
        loop {
            match self.store(&rec, hold) {
                Ok(()) => break,
                Err(e) if tries < 20 => {
                    tries += 1;
                    log::debug!("{cg}: journaling a loan made limit-first: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    log::warn!(
                        "{cg}: the loan is not journaled ({e}): a crash now would leave the limit raised"
                    );
                    self.keep_unjournaled(&rec, hold);
                    break;
                }
            }
        }
        if let Some(l) = self.lock().get_mut(cg) {
            l.below_since = None;
        }
        Ok(Lend::Raised {
            old: cur.memory,
            new: rec.lent.memory,
        })
    }

    /// Puts `rec` in the book without the journal (its append failed).
    fn keep_unjournaled(&self, rec: &LoanRecord, hold: Duration) {
        let mut loans = self.lock();
        self.put_in_book(&mut loans, rec, hold);
    }

    /// The book's half of [`LoanBook::store`]: a new loan starts its hold now, an
    /// existing one keeps its timers. Returns the record it replaced.
    fn put_in_book(
        &self,
        loans: &mut BTreeMap<CgroupPath, Loan>,
        rec: &LoanRecord,
        hold: Duration,
    ) -> Option<LoanRecord> {
        let now = Instant::now();
        self.generation.fetch_add(1, Ordering::Relaxed);
        match loans.get_mut(&rec.cgroup) {
            Some(l) => Some(std::mem::replace(&mut l.rec, rec.clone())),
            None => {
                loans.insert(
                    rec.cgroup.clone(),
                    Loan {
                        rec: rec.clone(),
                        hold,
                        hold_until: now + hold,
                        expired: false,
                        next_resume: now + hold,
                        below_since: None,
                        pending_reason: None,
                    },
                );
                None
            }
        }
    }

    /// A raise whose write failed may have written memsw and not memory: undo what
    /// reached the kernel, or keep the loan (journaled) for the keeper to give back.
    fn settle_failed_raise(
        &self,
        ctl: &dyn Controller,
        mut rec: LoanRecord,
        previous: Option<LoanRecord>,
        from: Limits,
        after: Option<Limits>,
    ) {
        let cg = rec.cgroup.clone();
        let mut now = after;
        if let Some(a) = after.filter(|a| *a != from) {
            if let Err(e) = ctl.set_limits(&cg, a, from) {
                log::warn!("{cg}: undoing a half-done raise: {e}");
            }
            now = ctl.limits(&cg).ok().flatten();
        }
        match (now, previous) {
            (None, _) => {
                self.give_up(&rec, None, "cgroup gone");
            }
            (Some(n), Some(mut p)) if n == from => {
                p.change = None;
                p.lent = n;
                self.note(&p);
            }
            (Some(n), None) if n == from => self.end(&cg),
            (Some(n), _) => {
                rec.lent = n;
                rec.change = None;
                self.note(&rec);
            }
        }
    }

    /// Gives the loan of `cg` back: the limits before the first raise, memory first,
    /// then memsw, each step journaled. Only when usage is below the loan's margin
    /// (`restore_below` of the original), unless memory is already back.
    pub fn restore(&self, ctl: &dyn Controller, cg: &CgroupPath) -> Result<Restore, LoanError> {
        self.restore_for(ctl, cg, None)
    }

    fn restore_for(
        &self,
        ctl: &dyn Controller,
        cg: &CgroupPath,
        reason: Option<&'static str>,
    ) -> Result<Restore, LoanError> {
        let _gate = self.gate(cg);
        let _held = lock(&_gate.gate);
        let Some(rec) = self.lock().get(cg).map(|l| l.rec.clone()) else {
            return Ok(Restore::NoLoan);
        };
        let Some(cur) = ctl.limits(cg)? else {
            if !self.read_only {
                self.give_up(&rec, None, "cgroup gone");
            }
            return Ok(Restore::Gone);
        };
        let target = rec.original;
        if self.read_only {
            return Ok(Restore::Would {
                old: cur.memory,
                new: target.memory,
            });
        }
        if self.given_up_as_not_ours(ctl, &rec, cur) {
            return Ok(Restore::GivenUp {
                current: cur.memory,
            });
        }
        // A restore that got half way started from the limits it names.
        let from = match rec.change {
            Some(c) if c.to == target => c.from,
            _ => cur,
        };
        let memory_back = cur.memory == self.stored(target.memory);
        if !memory_back {
            match working_set(ctl, cg)? {
                None => {
                    self.give_up(&rec, None, "cgroup gone");
                    return Ok(Restore::Gone);
                }
                Some(u) if u >= rec.restore_below_bytes => return Ok(Restore::DoesNotFit),
                Some(_) => {}
            }
        }
        let mut work = rec.clone();
        let hold = Duration::ZERO;
        let mut mid = cur;
        if !memory_back {
            work.change = Some(Change {
                from,
                to: target,
                step: ChangeStep::Begun,
            });
            self.store(&work, hold)?;
            // v2's memory.high goes back with memory.max.
            let step1 = Limits {
                memory: target.memory,
                memsw: cur.memsw,
                high: target.high,
            };
            match ctl.set_limits(cg, cur, step1) {
                Ok(()) => self.limit_moved(cg),
                Err(e) if e.is_gone() => {
                    self.give_up(&rec, None, "cgroup gone");
                    return Ok(Restore::Gone);
                }
                Err(e) => {
                    work.change = None;
                    self.note(&work);
                    return if e.is_busy() {
                        Ok(Restore::DoesNotFit)
                    } else {
                        Err(e.into())
                    };
                }
            }
            fault::point("after_restore_memory");
            let Some(m) = ctl.limits(cg)? else {
                self.give_up(&rec, None, "cgroup gone");
                return Ok(Restore::Gone);
            };
            mid = m;
        }
        let memsw_back = match (mid.memsw, target.memsw) {
            (Some(now), Some(t)) => now == self.stored(t),
            _ => true,
        };
        if !memsw_back {
            work.lent = mid;
            work.change = Some(Change {
                from,
                to: target,
                step: ChangeStep::MemoryDone,
            });
            self.note(&work);
            match ctl.set_limits(cg, mid, target) {
                Ok(()) => {}
                Err(e) if e.is_gone() => {
                    self.give_up(&rec, None, "cgroup gone");
                    return Ok(Restore::Gone);
                }
                Err(e) => {
                    if let Some(l) = self.lock().get_mut(cg) {
                        l.pending_reason = l.pending_reason.or(reason);
                    }
                    return if e.is_busy() {
                        Ok(Restore::MemoryOnly { memory: mid.memory })
                    } else {
                        Err(e.into())
                    };
                }
            }
        }
        let done = ctl.limits(cg)?.map(|l| l.memory).unwrap_or(target.memory);
        self.end(cg);
        Ok(Restore::Restored {
            old: from.memory,
            new: done,
        })
    }

    /// Re-adopts loans found in the journal at start-up (in memory; nothing written).
    pub fn adopt(&self, recs: Vec<LoanRecord>) {
        let now = Instant::now();
        let mut loans = self.lock();
        for rec in recs {
            loans.insert(rec.cgroup.clone(), Loan::from_record(rec, now));
        }
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// At start: checks an adopted loan against what the kernel holds. A raise that was
    /// interrupted (journaled, then a crash before or between its writes) becomes a loan
    /// of what the kernel holds, with the first original; a cgroup that is gone or holds
    /// a value the agent never wrote ends the loan. Returns true when the loan stays.
    pub fn reconcile(&self, ctl: &dyn Controller, cg: &CgroupPath) -> bool {
        let _gate = self.gate(cg);
        let _held = lock(&_gate.gate);
        let Some(rec) = self.lock().get(cg).map(|l| l.rec.clone()) else {
            return false;
        };
        if self.read_only {
            return true;
        }
        let cur = match ctl.limits(cg) {
            Ok(Some(c)) => c,
            Ok(None) => {
                self.give_up(&rec, None, "cgroup gone");
                return false;
            }
            Err(e) => {
                log::warn!("{cg}: {e}");
                return true;
            }
        };
        if self.given_up_as_not_ours(ctl, &rec, cur) {
            return false;
        }
        if cur == rec.original
            || (cur.memory == self.stored(rec.original.memory)
                && rec.original.memsw.map(|v| self.stored(v)) == cur.memsw)
        {
            log::info!(
                "{cg}: the journaled loan never reached the kernel or was already given back"
            );
            self.end(cg);
            return false;
        }
        // A change journaled as begun may have reached the kernel in part or not at all:
        // the loan is now what the kernel holds (a half-done restore goes on from there).
        let begun = rec.change.is_some_and(|c| c.step == ChangeStep::Begun);
        if begun || (rec.change.is_none() && rec.lent != cur) {
            let mut r = rec;
            r.change = None;
            r.lent = cur;
            self.note(&r);
        }
        true
    }

    /// True when the loan of `cg` is in the middle of a restore (memory back, memsw
    /// not yet): it is finished at once, whatever the usage.
    pub fn restore_in_flight(&self, cg: &CgroupPath) -> bool {
        self.lock().get(cg).is_some_and(|l| {
            l.rec
                .change
                .is_some_and(|c| c.step == ChangeStep::MemoryDone)
        })
    }

    /// True when the hold of `cg`'s loan is over.
    pub fn hold_expired(&self, cg: &CgroupPath, now: Instant) -> bool {
        self.lock()
            .get(cg)
            .is_some_and(|l| l.expired || now >= l.hold_until)
    }

    /// One pass of the keeper: give loans back early when usage has stayed below
    /// `restore_below` for `restore_after`, at hold expiry at the latest (when usage
    /// fits); ask for the episode to resume when the hold expired and the workload does
    /// not fit; finish restores that got half way. The book's lock is taken only to
    /// read and update the book, never across a read or write of a cgroup.
    pub fn tick(&self, ctl: &dyn Controller, now: Instant) -> Vec<TickEvent> {
        if self.read_only {
            return Vec::new();
        }
        self.fsync_and_compact_if_long();
        enum Due {
            Finish(&'static str),
            Expired,
            Early(u64, Duration),
        }
        let due: Vec<(CgroupPath, Due)> = {
            let mut loans = self.lock();
            loans
                .iter_mut()
                .filter_map(|(cg, l)| {
                    let d = match l.rec.change {
                        Some(c) if c.step == ChangeStep::MemoryDone => {
                            Due::Finish(l.pending_reason.unwrap_or("hold_expired"))
                        }
                        // A change in flight (a raise under way): not ours to touch now.
                        Some(_) => return None,
                        None if l.expired || now >= l.hold_until => {
                            l.expired = true;
                            Due::Expired
                        }
                        None => Due::Early(
                            l.rec.restore_below_bytes,
                            Duration::from_millis(l.rec.restore_after_ms),
                        ),
                    };
                    Some((cg.clone(), d))
                })
                .collect()
        };
        let mut events = Vec::new();
        for (cg, d) in due {
            let reason = match d {
                Due::Finish(r) => r,
                Due::Expired => "hold_expired",
                Due::Early(below, after) => {
                    let usage = match working_set(ctl, &cg) {
                        Ok(Some(u)) => Some(u),
                        // Gone or unreadable: let restore tell which.
                        _ => None,
                    };
                    let mut loans = self.lock();
                    let Some(l) = loans.get_mut(&cg) else {
                        continue;
                    };
                    match usage {
                        Some(u) if u < below => {
                            let since = *l.below_since.get_or_insert(now);
                            if now.duration_since(since) < after {
                                continue;
                            }
                        }
                        Some(_) => {
                            l.below_since = None;
                            continue;
                        }
                        None => {}
                    }
                    "usage_below"
                }
            };
            match self.restore_for(ctl, &cg, Some(reason)) {
                Ok(Restore::Restored { old, new }) => events.push(TickEvent::Restored {
                    cgroup: cg,
                    old,
                    new,
                    reason,
                }),
                Ok(Restore::DoesNotFit) | Ok(Restore::MemoryOnly { .. })
                    if reason == "hold_expired" =>
                {
                    let mut loans = self.lock();
                    if let Some(l) = loans.get_mut(&cg) {
                        if now >= l.next_resume {
                            l.next_resume = now + l.hold.max(Duration::from_secs(1));
                            events.push(TickEvent::Resume {
                                cgroup: cg,
                                policy: l.rec.policy.clone(),
                                episode: l.rec.episode,
                                step: l.rec.resume_step,
                            });
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => log::warn!("{cg}: giving the lent limit back failed: {e}"),
            }
        }
        events.extend(self.take_given_up().into_iter().map(TickEvent::GivenUp));
        events
    }

    /// Tries to give every loan back (shutdown); returns what happened per cgroup.
    pub fn restore_all(
        &self,
        ctl: &dyn Controller,
    ) -> Vec<(CgroupPath, Result<Restore, LoanError>)> {
        let keys: Vec<CgroupPath> = self.lock().keys().cloned().collect();
        keys.into_iter()
            .map(|cg| {
                let r = self.restore_for(ctl, &cg, Some("shutdown"));
                (cg, r)
            })
            .collect()
    }
}

/// A held reference to a cgroup's gate; drops the gate from the map when the cgroup
/// has no loan and nobody else holds it.
struct Gate<'a> {
    book: &'a LoanBook,
    cg: CgroupPath,
    gate: Arc<Mutex<()>>,
}

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        let mut gates = lock(&self.book.gates);
        // Ours and the map's: nobody else waits on it.
        if Arc::strong_count(&self.gate) == 2 && !self.book.has_loan(&self.cg) {
            gates.remove(&self.cg);
        }
    }
}

#[cfg(test)]
mod double;
#[cfg(test)]
mod tests;
