//! Loans of headroom (`raise_limit`) and everything that gives them back: the book of
//! outstanding loans, the keeper's tick, the restores at start-up and shutdown. One loan
//! per cgroup: a new OOM while a loan is out raises further (up to the policy's
//! ceiling), and giving it back always restores the limit the cgroup had before the
//! *first* raise. Every raise is journaled ([`crate::journal`]) before the cgroup file is
//! written, and fsynced after.
//!
//! [`keeper`] holds the agent-facing side: the keeper thread, recovery at start and the
//! restores at shutdown, and the one place a `restore` audit line is built.

pub mod keeper;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cgroup::{parse::is_unlimited, CgroupError, CgroupPath, Controller, Limits};
use crate::journal::{Journal, JournalError, LoanRecord};
use crate::policy::Raise;

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
    Restored {
        old: u64,
        new: u64,
    },
    /// Usage is still above the original limit (v1 refuses with EBUSY); nothing changed.
    DoesNotFit,
    Gone,
    /// Somebody else changed the limit since the agent lent it: theirs stands.
    ChangedExternally {
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
    /// The hold expired with usage above the original limit: resume the episode at
    /// `step` (the step after raise_limit).
    Resume {
        cgroup: CgroupPath,
        policy: String,
        episode: u64,
        step: usize,
    },
    /// The loan is given up: the cgroup is gone or its limit was changed by someone else.
    GivenUp { cgroup: CgroupPath, why: String },
}

struct Loan {
    rec: LoanRecord,
    hold: Duration,
    hold_until: Instant,
    expired: bool,
    next_resume: Instant,
    below_since: Option<Instant>,
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

/// All outstanding loans, behind one lock, mirrored in the journal.
pub struct LoanBook {
    loans: Mutex<BTreeMap<CgroupPath, Loan>>,
    journal: Option<Journal>,
    /// The journal has appends not yet fsynced (see [`LoanBook::sync`]).
    unsynced: AtomicBool,
    /// Bumped on every change of a loan (journaled), so readers can tell change cheaply.
    generation: std::sync::atomic::AtomicU64,
}

impl LoanBook {
    /// A book persisted in `journal` (None: memory only, for tests).
    pub fn new(journal: Option<Journal>) -> LoanBook {
        LoanBook {
            loans: Mutex::new(BTreeMap::new()),
            journal,
            unsynced: AtomicBool::new(false),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<CgroupPath, Loan>> {
        self.loans.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new or changed loan (visible at once, durable after `sync`).
    fn journal_put(&self, rec: &LoanRecord) -> Result<(), JournalError> {
        self.generation.fetch_add(1, Ordering::Relaxed);
        match &self.journal {
            Some(j) => {
                j.put(rec)?;
                self.unsynced.store(true, Ordering::SeqCst);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Records the end of a loan and flushes (off the OOM path). Runs with the loans
    /// locked, so it never compacts.
    fn journal_remove(&self, cg: &CgroupPath) -> Result<(), JournalError> {
        self.generation.fetch_add(1, Ordering::Relaxed);
        if let Some(j) = &self.journal {
            j.remove(cg)?;
            self.unsynced.store(true, Ordering::SeqCst);
        }
        self.flush();
        Ok(())
    }

    /// fsyncs the journal's pending appends.
    fn flush(&self) {
        if let Some(j) = &self.journal {
            if self.unsynced.swap(false, Ordering::SeqCst) {
                if let Err(e) = j.sync() {
                    self.unsynced.store(true, Ordering::SeqCst);
                    log::warn!("{e}; will retry");
                }
            }
        }
    }

    /// Flushes what a raise appended to the journal without fsync, and compacts a long
    /// log. Called after the rescue (after each step, and by the keeper), never between
    /// the OOM and the limit write.
    pub fn sync(&self) {
        self.flush();
        if self
            .journal
            .as_ref()
            .is_some_and(|j| j.log_len() > COMPACT_AT)
        {
            self.compact();
        }
    }

    /// Rewrites the journal as one snapshot of the current loans.
    pub fn compact(&self) {
        if let Some(j) = &self.journal {
            let loans = self.lock();
            let recs: Vec<LoanRecord> = loans.values().map(|l| l.rec.clone()).collect();
            if let Err(e) = j.save(&recs) {
                log::warn!("compacting the journal: {e}");
            }
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
        self.lock()
            .values()
            .map(|l| l.rec.lent.memory.saturating_sub(l.rec.original.memory))
            .sum()
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
        let mut loans = self.lock();
        let cur = ctl.limits(cg)?.ok_or(LoanError::Gone)?;
        if let Some(l) = loans.get(cg) {
            if l.rec.lent.memory != cur.memory {
                log::warn!(
                    "{cg}: limit changed from the lent {} to {} by someone else; forgetting the old loan",
                    l.rec.lent.memory,
                    cur.memory
                );
                loans.remove(cg);
                self.journal_remove(cg)?;
            }
        }
        let existing = loans.get(cg);
        let original = existing.map(|l| l.rec.original).unwrap_or(cur);
        if is_unlimited(cur.memory) {
            return Ok(Lend::Unlimited);
        }
        let ceiling = raise.ceiling_for(original.memory);
        let new = cur
            .memory
            .saturating_add(raise.by.of(cur.memory))
            .min(ceiling);
        // Limits are in pages; keep the value page-aligned so the kernel stores what we
        // journal.
        let new = new & !4095;
        if new <= cur.memory {
            return Ok(Lend::AtCeiling {
                limit: cur.memory,
                ceiling,
            });
        }
        if audit_only {
            return Ok(Lend::Would {
                old: cur.memory,
                new,
            });
        }
        let memsw = cur.memsw.map(|s| {
            if is_unlimited(s) {
                s
            } else {
                s.saturating_add(new - cur.memory)
            }
        });
        let lent = Limits { memory: new, memsw };
        let now = Instant::now();
        let wall = unix_ms();
        let previous = loans.remove(cg);
        let loan = match previous {
            Some(mut l) => {
                l.rec.lent = lent;
                l.below_since = None;
                l
            }
            None => Loan {
                rec: LoanRecord {
                    cgroup: cg.clone(),
                    policy: policy.to_string(),
                    episode,
                    original,
                    lent,
                    started_unix_ms: wall,
                    hold_until_unix_ms: wall + raise.hold.as_millis() as u64,
                    restore_below_bytes: (original.memory as f64 * raise.restore_below) as u64,
                    restore_after_ms: raise.restore_after.as_millis() as u64,
                    resume_step,
                },
                hold: raise.hold,
                hold_until: now + raise.hold,
                expired: false,
                next_resume: now + raise.hold,
                below_since: None,
            },
        };
        let rec = loan.rec.clone();
        loans.insert(cg.clone(), loan);
        // Journal first: if we crash right after the cgroup write, the next start knows.
        // The fsync waits until the workload has its headroom (LoanBook::sync).
        if let Err(e) = self.journal_put(&rec) {
            undo(&mut loans, cg, &rec, cur);
            return Err(e.into());
        }
        if let Err(e) = ctl.set_limits(cg, cur, lent) {
            undo(&mut loans, cg, &rec, cur);
            let _ = match loans.get(cg) {
                Some(l) => self.journal_put(&l.rec.clone()),
                None => self.journal_remove(cg),
            };
            return Err(e.into());
        }
        Ok(Lend::Raised {
            old: cur.memory,
            new,
        })
    }

    /// Gives the loan of `cg` back: the limits before the first raise.
    pub fn restore(&self, ctl: &dyn Controller, cg: &CgroupPath) -> Result<Restore, LoanError> {
        let mut loans = self.lock();
        self.restore_locked(ctl, cg, &mut loans)
    }

    fn restore_locked(
        &self,
        ctl: &dyn Controller,
        cg: &CgroupPath,
        loans: &mut BTreeMap<CgroupPath, Loan>,
    ) -> Result<Restore, LoanError> {
        let Some(loan) = loans.get(cg) else {
            return Ok(Restore::NoLoan);
        };
        let original = loan.rec.original;
        let lent = loan.rec.lent;
        let Some(cur) = ctl.limits(cg)? else {
            loans.remove(cg);
            self.journal_remove(cg)?;
            return Ok(Restore::Gone);
        };
        if cur.memory != lent.memory {
            loans.remove(cg);
            self.journal_remove(cg)?;
            return Ok(Restore::ChangedExternally {
                current: cur.memory,
            });
        }
        match ctl.set_limits(cg, cur, original) {
            Ok(()) => {}
            Err(e) if e.is_busy() => return Ok(Restore::DoesNotFit),
            Err(e) if e.is_gone() => {
                loans.remove(cg);
                self.journal_remove(cg)?;
                return Ok(Restore::Gone);
            }
            Err(e) => return Err(e.into()),
        }
        loans.remove(cg);
        self.journal_remove(cg)?;
        Ok(Restore::Restored {
            old: cur.memory,
            new: original.memory,
        })
    }

    /// Re-adopts loans found in the journal at start-up.
    pub fn adopt(&self, recs: Vec<LoanRecord>) {
        let now = Instant::now();
        let mut loans = self.lock();
        for rec in recs {
            loans.insert(rec.cgroup.clone(), Loan::from_record(rec, now));
        }
    }

    /// One pass of the keeper: give loans back early when usage has stayed below
    /// `restore_below` for `restore_after`, at hold expiry at the latest; ask for the
    /// episode to resume when the hold expired and the workload does not fit.
    pub fn tick(&self, ctl: &dyn Controller, now: Instant) -> Vec<TickEvent> {
        self.sync();
        let mut events = Vec::new();
        let mut loans = self.lock();
        let keys: Vec<CgroupPath> = loans.keys().cloned().collect();
        for cg in keys {
            let Some(loan) = loans.get_mut(&cg) else {
                continue;
            };
            let reason = if loan.expired || now >= loan.hold_until {
                loan.expired = true;
                "hold_expired"
            } else {
                match ctl.usage(&cg) {
                    Ok(Some(u)) if u < loan.rec.restore_below_bytes => {
                        let since = *loan.below_since.get_or_insert(now);
                        if now.duration_since(since)
                            < Duration::from_millis(loan.rec.restore_after_ms)
                        {
                            continue;
                        }
                        "usage_below"
                    }
                    Ok(Some(_)) => {
                        loan.below_since = None;
                        continue;
                    }
                    // Gone or unreadable: let restore tell which.
                    _ => "usage_below",
                }
            };
            match self.restore_locked(ctl, &cg, &mut loans) {
                Ok(Restore::Restored { old, new }) => events.push(TickEvent::Restored {
                    cgroup: cg,
                    old,
                    new,
                    reason,
                }),
                Ok(Restore::DoesNotFit) => {
                    if let Some(loan) = loans.get_mut(&cg) {
                        if reason == "hold_expired" && now >= loan.next_resume {
                            loan.next_resume = now + loan.hold.max(Duration::from_secs(1));
                            events.push(TickEvent::Resume {
                                cgroup: cg,
                                policy: loan.rec.policy.clone(),
                                episode: loan.rec.episode,
                                step: loan.rec.resume_step,
                            });
                        }
                    }
                }
                Ok(Restore::Gone) => events.push(TickEvent::GivenUp {
                    cgroup: cg,
                    why: "cgroup gone".into(),
                }),
                Ok(Restore::ChangedExternally { current }) => events.push(TickEvent::GivenUp {
                    cgroup: cg,
                    why: format!("limit changed to {current} by someone else"),
                }),
                Ok(Restore::NoLoan) => {}
                Err(e) => {
                    log::warn!("{cg}: restoring lent limit failed: {e}");
                }
            }
        }
        events
    }

    /// Tries to give every loan back (shutdown, startup); returns what happened per cgroup.
    pub fn restore_all(
        &self,
        ctl: &dyn Controller,
    ) -> Vec<(CgroupPath, Result<Restore, LoanError>)> {
        let mut loans = self.lock();
        let keys: Vec<CgroupPath> = loans.keys().cloned().collect();
        keys.into_iter()
            .map(|cg| {
                let r = self.restore_locked(ctl, &cg, &mut loans);
                (cg, r)
            })
            .collect()
    }

    /// Original limits of an outstanding loan.
    pub fn original(&self, cg: &CgroupPath) -> Option<Limits> {
        self.lock().get(cg).map(|l| l.rec.original)
    }
}

/// Compact the log once it passes this size (a few hundred operations).
const COMPACT_AT: u64 = 64 * 1024;

fn undo(loans: &mut BTreeMap<CgroupPath, Loan>, cg: &CgroupPath, rec: &LoanRecord, cur: Limits) {
    // A first raise that failed leaves no loan; an extension goes back to what was lent.
    if rec.original == cur {
        loans.remove(cg);
    } else if let Some(l) = loans.get_mut(cg) {
        l.rec.lent = cur;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{v1::V1, Hierarchy, Kind};
    use crate::policy::{Amount, Ceiling};

    struct Fake {
        _t: tempfile::TempDir,
        ctl: V1,
        cg: CgroupPath,
        dir: std::path::PathBuf,
    }

    fn fake(limit: u64, usage: u64) -> Fake {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("app");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string()).unwrap();
        std::fs::write(dir.join("memory.memsw.limit_in_bytes"), limit.to_string()).unwrap();
        std::fs::write(dir.join("memory.usage_in_bytes"), usage.to_string()).unwrap();
        let ctl = V1::new(Hierarchy::fake(t.path(), Kind::V1));
        Fake {
            _t: t,
            ctl,
            cg: CgroupPath::new("/app"),
            dir,
        }
    }

    impl Fake {
        fn limit(&self) -> u64 {
            std::fs::read_to_string(self.dir.join("memory.limit_in_bytes"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        }
        fn memsw(&self) -> u64 {
            std::fs::read_to_string(self.dir.join("memory.memsw.limit_in_bytes"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        }
        fn set_usage(&self, u: u64) {
            std::fs::write(self.dir.join("memory.usage_in_bytes"), u.to_string()).unwrap();
        }
    }

    fn raise(hold: Duration) -> Raise {
        Raise {
            by: Amount::Percent(0.25),
            ceiling: Ceiling::MaxExtra(Amount::Percent(0.5)),
            hold,
            restore_below: 0.9,
            restore_after: Duration::from_millis(0),
        }
    }

    const MIB: u64 = 1 << 20;

    /// A raise of `f`'s cgroup for episode `episode` that must succeed.
    fn lend(book: &LoanBook, f: &Fake, r: Raise, episode: u64) -> Lend {
        book.lend(&f.ctl, &f.cg, "p", &r, episode, 2, false)
            .unwrap()
    }

    #[test]
    fn extensions_stop_at_ceiling_and_restore_returns_the_first_original() {
        let f = fake(64 * MIB, 64 * MIB);
        let t = tempfile::tempdir().unwrap();
        let book = LoanBook::new(Some(Journal::open(t.path()).unwrap()));
        let r = raise(Duration::from_secs(60));
        let l1 = lend(&book, &f, r.clone(), 1);
        assert_eq!(
            l1,
            Lend::Raised {
                old: 64 * MIB,
                new: 80 * MIB
            }
        );
        assert_eq!(f.limit(), 80 * MIB);
        assert_eq!(f.memsw(), 80 * MIB);
        let l2 = lend(&book, &f, r.clone(), 2);
        assert_eq!(
            l2,
            Lend::Raised {
                old: 80 * MIB,
                new: 96 * MIB
            }
        );
        let l3 = lend(&book, &f, r.clone(), 3);
        assert_eq!(
            l3,
            Lend::AtCeiling {
                limit: 96 * MIB,
                ceiling: 96 * MIB
            }
        );
        // Journal holds the original of the first raise.
        let recs = Journal::open(t.path()).unwrap().load().unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].original.memory, 64 * MIB);
        assert_eq!(recs[0].lent.memory, 96 * MIB);
        assert_eq!(book.lent_bytes(), 32 * MIB);
        let r = book.restore(&f.ctl, &f.cg).unwrap();
        assert_eq!(
            r,
            Restore::Restored {
                old: 96 * MIB,
                new: 64 * MIB
            }
        );
        assert_eq!(f.limit(), 64 * MIB);
        assert_eq!(f.memsw(), 64 * MIB);
        assert!(Journal::open(t.path()).unwrap().load().unwrap().is_empty());
    }

    #[test]
    fn audit_mode_computes_but_writes_nothing() {
        let f = fake(64 * MIB, 64 * MIB);
        let book = LoanBook::new(None);
        let l = book
            .lend(
                &f.ctl,
                &f.cg,
                "p",
                &raise(Duration::from_secs(1)),
                1,
                2,
                true,
            )
            .unwrap();
        assert_eq!(
            l,
            Lend::Would {
                old: 64 * MIB,
                new: 80 * MIB
            }
        );
        assert_eq!(f.limit(), 64 * MIB);
        assert!(!book.has_loan(&f.cg));
    }

    #[test]
    fn early_restore_needs_usage_below_threshold() {
        let f = fake(64 * MIB, 64 * MIB);
        let book = LoanBook::new(None);
        lend(&book, &f, raise(Duration::from_secs(60)), 1);
        let now = Instant::now();
        assert!(book.tick(&f.ctl, now).is_empty());
        assert_eq!(f.limit(), 80 * MIB);
        f.set_usage(10 * MIB);
        let ev = book.tick(&f.ctl, now);
        assert_eq!(
            ev,
            vec![TickEvent::Restored {
                cgroup: f.cg.clone(),
                old: 80 * MIB,
                new: 64 * MIB,
                reason: "usage_below"
            }]
        );
        assert_eq!(f.limit(), 64 * MIB);
    }

    #[test]
    fn restore_after_requires_an_unbroken_stretch() {
        let f = fake(64 * MIB, 10 * MIB);
        let book = LoanBook::new(None);
        let mut r = raise(Duration::from_secs(60));
        r.restore_after = Duration::from_secs(5);
        lend(&book, &f, r, 1);
        let t0 = Instant::now();
        assert!(book.tick(&f.ctl, t0).is_empty());
        f.set_usage(70 * MIB);
        assert!(book.tick(&f.ctl, t0 + Duration::from_secs(3)).is_empty());
        f.set_usage(10 * MIB);
        assert!(book.tick(&f.ctl, t0 + Duration::from_secs(6)).is_empty());
        assert!(book.tick(&f.ctl, t0 + Duration::from_secs(10)).is_empty());
        assert_eq!(book.tick(&f.ctl, t0 + Duration::from_secs(11)).len(), 1);
    }

    #[test]
    fn hold_expiry_restores_and_external_change_is_respected() {
        let f = fake(64 * MIB, 70 * MIB);
        let book = LoanBook::new(None);
        lend(&book, &f, raise(Duration::from_millis(0)), 1);
        let ev = book.tick(&f.ctl, Instant::now() + Duration::from_millis(1));
        assert!(
            matches!(
                &ev[..],
                [TickEvent::Restored {
                    reason: "hold_expired",
                    ..
                }]
            ),
            "{ev:?}"
        );

        lend(&book, &f, raise(Duration::from_secs(60)), 2);
        std::fs::write(f.dir.join("memory.limit_in_bytes"), (200 * MIB).to_string()).unwrap();
        assert_eq!(
            book.restore(&f.ctl, &f.cg).unwrap(),
            Restore::ChangedExternally { current: 200 * MIB }
        );
        assert_eq!(f.limit(), 200 * MIB);
    }

    #[test]
    fn gone_cgroup_drops_the_loan() {
        let f = fake(64 * MIB, 64 * MIB);
        let book = LoanBook::new(None);
        lend(&book, &f, raise(Duration::from_secs(60)), 1);
        std::fs::remove_dir_all(&f.dir).unwrap();
        assert_eq!(book.restore(&f.ctl, &f.cg).unwrap(), Restore::Gone);
        assert!(!book.has_loan(&f.cg));
    }

    #[test]
    fn adopted_records_keep_their_remaining_hold() {
        let f = fake(64 * MIB, 70 * MIB);
        let book = LoanBook::new(None);
        lend(&book, &f, raise(Duration::from_secs(3600)), 1);
        let recs = book.records();
        let book2 = LoanBook::new(None);
        book2.adopt(recs);
        // Not expired, usage high: nothing happens.
        assert!(book2.tick(&f.ctl, Instant::now()).is_empty());
        assert_eq!(f.limit(), 80 * MIB);
        assert_eq!(book2.original(&f.cg).unwrap().memory, 64 * MIB);
    }
}
