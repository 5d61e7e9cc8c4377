//! Unit tests of the loan book on the controller double: every gap between two writes,
//! refused writes, kernel rounding, the locks.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::double::{Double, MEM, READ_LIMITS, SW};
use super::*;
use crate::policy::{Amount, Ceiling, Match, Mode, Step};

const MIB: u64 = 1 << 20;
const KIB64: u64 = 64 << 10;

fn raise(hold: Duration) -> Raise {
    Raise {
        by: Amount::Percent(0.25),
        ceiling: Ceiling::MaxExtra(Amount::Percent(0.5)),
        hold,
        restore_below: 0.9,
        restore_after: Duration::from_millis(0),
    }
}

/// A raise of `cg` that must succeed.
fn lend(book: &LoanBook, d: &Double, cg: &CgroupPath, r: Raise, episode: u64) -> Lend {
    book.lend(d, cg, "p", &r, episode, 2, false).unwrap()
}

fn journaled(dir: &std::path::Path) -> Vec<LoanRecord> {
    Journal::open(dir).unwrap().load().unwrap()
}

/// A fresh book on the journal in `dir`, as a restarted agent builds it.
fn restart(d: &Double, dir: &std::path::Path) -> LoanBook {
    let j = Journal::open(dir).unwrap();
    let recs = j.recover().unwrap().loans;
    let book = LoanBook::new(Some(j));
    let cgs: Vec<CgroupPath> = recs.iter().map(|r| r.cgroup.clone()).collect();
    book.adopt(recs);
    for cg in cgs {
        book.reconcile(d, &cg);
    }
    book
}

#[test]
fn extensions_stop_at_ceiling_and_restore_returns_the_first_original() {
    let d = Double::new(4096);
    let cg = d.cgroup("app", 64 * MIB, Some(64 * MIB), 10 * MIB);
    let t = tempfile::tempdir().unwrap();
    let book = LoanBook::new(Some(Journal::open(t.path()).unwrap()));
    let r = raise(Duration::from_secs(60));
    assert_eq!(
        lend(&book, &d, &cg, r.clone(), 1),
        Lend::Raised {
            old: 64 * MIB,
            new: 80 * MIB
        }
    );
    assert_eq!((d.limit(&cg), d.memsw(&cg)), (80 * MIB, 80 * MIB));
    assert_eq!(
        lend(&book, &d, &cg, r.clone(), 2),
        Lend::Raised {
            old: 80 * MIB,
            new: 96 * MIB
        }
    );
    assert_eq!(
        lend(&book, &d, &cg, r.clone(), 3),
        Lend::AtCeiling {
            limit: 96 * MIB,
            ceiling: 96 * MIB
        }
    );
    let recs = journaled(t.path());
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].original.memory, 64 * MIB);
    assert_eq!(recs[0].lent.memory, 96 * MIB);
    assert_eq!(recs[0].change, None);
    assert_eq!(book.lent_bytes(), 32 * MIB);
    assert_eq!(
        book.restore(&d, &cg).unwrap(),
        Restore::Restored {
            old: 96 * MIB,
            new: 64 * MIB
        }
    );
    assert_eq!((d.limit(&cg), d.memsw(&cg)), (64 * MIB, 64 * MIB));
    assert!(journaled(t.path()).is_empty());
}

#[test]
fn audit_mode_computes_but_writes_nothing_and_keeps_a_loan_it_finds_changed() {
    let d = Double::new(4096);
    let cg = d.cgroup("app", 64 * MIB, None, 64 * MIB);
    let t = tempfile::tempdir().unwrap();
    let book = LoanBook::new(Some(Journal::open(t.path()).unwrap()));
    let r = raise(Duration::from_secs(60));
    assert_eq!(
        book.lend(&d, &cg, "p", &r, 1, 2, true).unwrap(),
        Lend::Would {
            old: 64 * MIB,
            new: 80 * MIB
        }
    );
    assert_eq!(d.limit(&cg), 64 * MIB);
    assert!(!book.has_loan(&cg));
    // A loan whose limit somebody changed: an audit-mode lend leaves the book and the
    // journal alone (an enforce lend would give the loan up).
    lend(&book, &d, &cg, r.clone(), 1);
    d.set_raw(&cg, MEM, 100 * MIB);
    let log = std::fs::read(t.path().join("loans.log")).unwrap();
    assert!(matches!(
        book.lend(&d, &cg, "p", &r, 2, 2, true).unwrap(),
        Lend::Would { .. }
    ));
    assert!(book.has_loan(&cg));
    assert_eq!(std::fs::read(t.path().join("loans.log")).unwrap(), log);
    assert!(book.take_given_up().is_empty());
}

#[test]
fn a_dry_run_book_never_writes_cgroups_or_the_journal() {
    let d = Double::new(4096);
    let cg = d.cgroup("app", 64 * MIB, Some(64 * MIB), MIB);
    let t = tempfile::tempdir().unwrap();
    {
        let book = LoanBook::new(Some(Journal::open(t.path()).unwrap()));
        lend(&book, &d, &cg, raise(Duration::ZERO), 1);
    }
    let before = std::fs::read(t.path().join("loans.log")).unwrap();
    let j = Journal::read_only(t.path());
    let recs = j.recover().unwrap().loans;
    let book = LoanBook::new(Some(j));
    book.adopt(recs);
    assert!(book.reconcile(&d, &cg));
    // Hold expired, usage low: a real book would give it back now.
    assert!(book
        .tick(&d, Instant::now() + Duration::from_secs(1))
        .is_empty());
    assert_eq!(
        book.restore(&d, &cg).unwrap(),
        Restore::Would {
            old: 80 * MIB,
            new: 64 * MIB
        }
    );
    let all = book.restore_all(&d);
    assert!(matches!(all[0].1, Ok(Restore::Would { .. })));
    assert!(matches!(
        book.lend(&d, &cg, "p", &raise(Duration::ZERO), 2, 2, false)
            .unwrap(),
        Lend::Would { .. }
    ));
    book.rewrite_snapshot();
    assert_eq!(d.limit(&cg), 80 * MIB);
    assert_eq!(std::fs::read(t.path().join("loans.log")).unwrap(), before);
    assert!(!t.path().join("loans.json").exists());
}

#[test]
fn early_restore_needs_usage_below_threshold() {
    let d = Double::new(4096);
    let cg = d.cgroup("app", 64 * MIB, None, 64 * MIB);
    let book = LoanBook::new(None);
    lend(&book, &d, &cg, raise(Duration::from_secs(60)), 1);
    let now = Instant::now();
    assert!(book.tick(&d, now).is_empty());
    assert_eq!(d.limit(&cg), 80 * MIB);
    d.set_usage(&cg, 10 * MIB);
    assert_eq!(
        book.tick(&d, now),
        vec![TickEvent::Restored {
            cgroup: cg.clone(),
            old: 80 * MIB,
            new: 64 * MIB,
            reason: "usage_below"
        }]
    );
    assert_eq!(d.limit(&cg), 64 * MIB);
}

#[test]
fn restore_after_requires_an_unbroken_stretch() {
    let d = Double::new(4096);
    let cg = d.cgroup("app", 64 * MIB, None, 10 * MIB);
    let book = LoanBook::new(None);
    let mut r = raise(Duration::from_secs(60));
    r.restore_after = Duration::from_secs(5);
    lend(&book, &d, &cg, r, 1);
    let t0 = Instant::now();
    assert!(book.tick(&d, t0).is_empty());
    d.set_usage(&cg, 70 * MIB);
    assert!(book.tick(&d, t0 + Duration::from_secs(3)).is_empty());
    d.set_usage(&cg, 10 * MIB);
    assert!(book.tick(&d, t0 + Duration::from_secs(6)).is_empty());
    assert!(book.tick(&d, t0 + Duration::from_secs(10)).is_empty());
    assert_eq!(book.tick(&d, t0 + Duration::from_secs(11)).len(), 1);
}

/// 7.5: at hold expiry the loan comes back only when usage is below `restore_below` of
/// the original; a workload just under the original limit resumes its episode instead
/// of being evicted down to the wall.
#[test]
fn hold_expiry_restores_only_below_the_margin_else_resumes() {
    let d = Double::new(4096);
    // 95 % of the original: the kernel would take the restore; the margin does not.
    let cg = d.cgroup("app", 64 * MIB, None, 61 * MIB);
    let book = LoanBook::new(None);
    lend(&book, &d, &cg, raise(Duration::ZERO), 7);
    let later = Instant::now() + Duration::from_millis(5);
    assert_eq!(
        book.tick(&d, later),
        vec![TickEvent::Resume {
            cgroup: cg.clone(),
            policy: "p".into(),
            episode: 7,
            step: 2
        }]
    );
    assert_eq!(d.limit(&cg), 80 * MIB);
    assert_eq!(book.restore(&d, &cg).unwrap(), Restore::DoesNotFit);
    // Resume is asked again only after a pause.
    assert!(book.tick(&d, later).is_empty());
    d.set_usage(&cg, 50 * MIB);
    assert!(matches!(
        &book.tick(&d, later)[..],
        [TickEvent::Restored {
            reason: "hold_expired",
            ..
        }]
    ));
    assert_eq!(d.limit(&cg), 64 * MIB);
}

/// 7.2: a limit nobody in the record explains is someone else's: the loan is given up,
/// and the event carries what the audit log needs.
#[test]
fn external_change_gives_the_loan_up_with_the_facts() {
    let d = Double::new(4096);
    let cg = d.cgroup("app", 64 * MIB, None, 10 * MIB);
    let book = LoanBook::new(None);
    lend(&book, &d, &cg, raise(Duration::from_secs(60)), 2);
    d.set_raw(&cg, MEM, 200 * MIB);
    assert_eq!(
        book.restore(&d, &cg).unwrap(),
        Restore::GivenUp { current: 200 * MIB }
    );
    assert_eq!(d.limit(&cg), 200 * MIB);
    assert_eq!(
        book.take_given_up(),
        vec![GivenUp {
            cgroup: cg.clone(),
            original: 64 * MIB,
            lent: 80 * MIB,
            current: Some(200 * MIB),
            why: "limit changed by someone else"
        }]
    );
}

#[test]
fn gone_cgroup_drops_the_loan() {
    let d = Double::new(4096);
    let cg = d.cgroup("app", 64 * MIB, None, 64 * MIB);
    let book = LoanBook::new(None);
    lend(&book, &d, &cg, raise(Duration::from_secs(60)), 1);
    d.remove(&cg);
    assert_eq!(book.restore(&d, &cg).unwrap(), Restore::Gone);
    assert!(!book.has_loan(&cg));
    assert_eq!(book.take_given_up()[0].why, "cgroup gone");
}

#[test]
fn adopted_records_keep_their_remaining_hold() {
    let d = Double::new(4096);
    let cg = d.cgroup("app", 64 * MIB, None, 70 * MIB);
    let book = LoanBook::new(None);
    lend(&book, &d, &cg, raise(Duration::from_secs(3600)), 1);
    let book2 = LoanBook::new(None);
    book2.adopt(book.records());
    assert!(book2.reconcile(&d, &cg));
    assert!(book2.tick(&d, Instant::now()).is_empty());
    assert_eq!(d.limit(&cg), 80 * MIB);
    assert_eq!(book2.original(&cg).unwrap().memory, 64 * MIB);
}

/// 6.5: a crash after the journal append of an extension and before its write: the
/// kernel holds the first loan's limit, the journal the extension's target. Replay
/// knows both as the agent's own and gives back the FIRST original.
#[test]
fn extension_interrupted_after_the_journal_gives_back_the_first_original() {
    let d = std::sync::Arc::new(Double::new(4096));
    let cg = d.cgroup("app", 64 * MIB, Some(64 * MIB), 10 * MIB);
    let t = tempfile::tempdir().unwrap();
    let book = std::sync::Arc::new(LoanBook::new(Some(Journal::open(t.path()).unwrap())));
    lend(&book, &d, &cg, raise(Duration::from_secs(60)), 1);
    // The extension stops at its first write (memsw): journaled, nothing written.
    let b = d.block(&cg, SW);
    let h = {
        let (book, d, cg) = (book.clone(), d.clone(), cg.clone());
        std::thread::spawn(move || {
            let _ = book.lend(&*d, &cg, "p", &raise(Duration::from_secs(60)), 2, 2, false);
        })
    };
    assert!(b.wait_entered());
    // What a crash now leaves behind: the journal as it is on disk.
    let crash = tempfile::tempdir().unwrap();
    for f in ["loans.json", "loans.log"] {
        if t.path().join(f).exists() {
            std::fs::copy(t.path().join(f), crash.path().join(f)).unwrap();
        }
    }
    let recs = journaled(crash.path());
    assert_eq!(recs[0].original.memory, 64 * MIB);
    assert_eq!(recs[0].change.unwrap().to.memory, 96 * MIB);
    assert_eq!(d.limit(&cg), 80 * MIB);
    let again = restart(&d, crash.path());
    assert!(again.has_loan(&cg), "re-adopted, not dropped as changed");
    assert_eq!(again.original(&cg).unwrap().memory, 64 * MIB);
    assert!(again.take_given_up().is_empty());
    assert!(matches!(
        again.restore(&*d, &cg).unwrap(),
        Restore::Restored { new, .. } if new == 64 * MIB
    ));
    assert_eq!((d.limit(&cg), d.memsw(&cg)), (64 * MIB, 64 * MIB));
    b.release();
    h.join().unwrap();
}

/// 7.1, on the way up: a crash after memsw was raised and before memory was: the
/// kernel holds a mix of the loan's from and to; it is the agent's own and comes back.
#[test]
fn raise_interrupted_between_memsw_and_memory_is_given_back_in_full() {
    let d = std::sync::Arc::new(Double::new(4096));
    let cg = d.cgroup("app", 64 * MIB, Some(64 * MIB), 10 * MIB);
    let t = tempfile::tempdir().unwrap();
    let book = std::sync::Arc::new(LoanBook::new(Some(Journal::open(t.path()).unwrap())));
    let b = d.block(&cg, MEM);
    let h = {
        let (book, d, cg) = (book.clone(), d.clone(), cg.clone());
        std::thread::spawn(move || {
            let _ = book.lend(&*d, &cg, "p", &raise(Duration::from_secs(60)), 1, 2, false);
        })
    };
    assert!(b.wait_entered());
    assert_eq!((d.limit(&cg), d.memsw(&cg)), (64 * MIB, 80 * MIB));
    let crash = tempfile::tempdir().unwrap();
    std::fs::copy(t.path().join("loans.log"), crash.path().join("loans.log")).unwrap();
    let again = restart(&d, crash.path());
    assert!(again.has_loan(&cg));
    assert!(again.take_given_up().is_empty());
    assert!(matches!(
        again.restore(&*d, &cg).unwrap(),
        Restore::Restored { .. }
    ));
    assert_eq!((d.limit(&cg), d.memsw(&cg)), (64 * MIB, 64 * MIB));
    b.release();
    h.join().unwrap();
}

/// 7.1: a raise whose memory write is refused after memsw went up leaves nothing
/// raised behind.
#[test]
fn raise_refused_after_memsw_undoes_memsw() {
    let d = Double::new(4096);
    let cg = d.cgroup("app", 64 * MIB, Some(64 * MIB), 10 * MIB);
    let book = LoanBook::new(None);
    d.fail(&cg, MEM, libc::EINVAL, 1);
    assert!(book
        .lend(&d, &cg, "p", &raise(Duration::from_secs(60)), 1, 2, false)
        .is_err());
    assert_eq!((d.limit(&cg), d.memsw(&cg)), (64 * MIB, 64 * MIB));
    assert!(!book.has_loan(&cg));
}

/// 7.1: memory lowered, memsw refused with EBUSY: the restore says so, the journal
/// records the step reached, and the next tick finishes it instead of dropping the loan
/// as changed by someone else.
#[test]
fn half_done_restore_is_finished_not_dropped() {
    let d = Double::new(4096);
    let cg = d.cgroup("app", 64 * MIB, Some(64 * MIB), 10 * MIB);
    let t = tempfile::tempdir().unwrap();
    let book = LoanBook::new(Some(Journal::open(t.path()).unwrap()));
    lend(&book, &d, &cg, raise(Duration::from_secs(60)), 1);
    d.fail(&cg, SW, libc::EBUSY, 1);
    assert_eq!(
        book.restore(&d, &cg).unwrap(),
        Restore::MemoryOnly { memory: 64 * MIB }
    );
    assert_eq!((d.limit(&cg), d.memsw(&cg)), (64 * MIB, 80 * MIB));
    let rec = &journaled(t.path())[0];
    assert_eq!(rec.change.unwrap().step, ChangeStep::MemoryDone);
    assert_eq!(rec.lent.memory, 64 * MIB);
    // Usage is high again: a half-done restore is finished whatever the usage.
    d.set_usage(&cg, 63 * MIB);
    let ev = book.tick(&d, Instant::now());
    assert!(
        matches!(&ev[..], [TickEvent::Restored { old, new, .. }] if *old == 80 * MIB && *new == 64 * MIB),
        "{ev:?}"
    );
    assert_eq!((d.limit(&cg), d.memsw(&cg)), (64 * MIB, 64 * MIB));
    assert!(journaled(t.path()).is_empty());
}

/// 7.1: a crash between the memory and the memsw write of a restore: the next start
/// finishes it.
#[test]
fn restore_interrupted_between_memory_and_memsw_is_finished_after_a_restart() {
    let d = std::sync::Arc::new(Double::new(4096));
    let cg = d.cgroup("app", 64 * MIB, Some(64 * MIB), 10 * MIB);
    let t = tempfile::tempdir().unwrap();
    let book = std::sync::Arc::new(LoanBook::new(Some(Journal::open(t.path()).unwrap())));
    lend(&book, &d, &cg, raise(Duration::from_secs(60)), 1);
    let b = d.block(&cg, SW);
    let h = {
        let (book, d, cg) = (book.clone(), d.clone(), cg.clone());
        std::thread::spawn(move || {
            let _ = book.restore(&*d, &cg);
        })
    };
    assert!(b.wait_entered());
    let crash = tempfile::tempdir().unwrap();
    std::fs::copy(t.path().join("loans.log"), crash.path().join("loans.log")).unwrap();
    d.set_usage(&cg, 63 * MIB);
    let again = restart(&d, crash.path());
    assert!(again.restore_in_flight(&cg));
    assert!(matches!(
        &again.tick(&*d, Instant::now())[..],
        [TickEvent::Restored { .. }]
    ));
    assert_eq!((d.limit(&cg), d.memsw(&cg)), (64 * MIB, 64 * MIB));
    b.release();
    h.join().unwrap();
}

/// 7.3: a kernel with 64 KiB pages: the book uses the page size it is given, and
/// compares with what the kernel read back, so the loan comes back even when its
/// own idea of the page size is wrong.
#[test]
fn limits_follow_the_kernels_page_size_and_its_read_back() {
    for book_page in [KIB64, 4096] {
        let d = Double::new(KIB64);
        let cg = d.cgroup("app", 65 * MIB, Some(65 * MIB), MIB);
        let book = LoanBook::new(None).with_page_size(book_page);
        let mut r = raise(Duration::from_secs(60));
        r.by = Amount::Bytes(100_000);
        let Lend::Raised { new, .. } = lend(&book, &d, &cg, r, 1) else {
            panic!("no raise");
        };
        assert_eq!(new, 65 * MIB + KIB64, "page {book_page}");
        assert_eq!(d.limit(&cg), 65 * MIB + KIB64);
        assert_eq!(
            book.restore(&d, &cg).unwrap(),
            Restore::Restored {
                old: 65 * MIB + KIB64,
                new: 65 * MIB
            },
            "page {book_page}"
        );
        assert_eq!(d.limit(&cg), 65 * MIB);
    }
}

/// 6.6: an absurd computed limit is clamped to the kernel's maximum, and the restore
/// target is compared with what the kernel stored: the cgroup gets its limit back.
#[test]
fn an_absurd_raise_is_clamped_and_still_given_back() {
    let d = Double::new(4096);
    let cg = d.cgroup("app", 64 * MIB, Some(64 * MIB), MIB);
    let book = LoanBook::new(None);
    let r = Raise {
        by: Amount::Percent(1e28),
        ceiling: Ceiling::MaxExtra(Amount::Percent(1e28)),
        hold: Duration::from_secs(60),
        restore_below: 0.9,
        restore_after: Duration::ZERO,
    };
    let kmax = i64::MAX as u64 / 4096 * 4096;
    assert_eq!(
        lend(&book, &d, &cg, r, 1),
        Lend::Raised {
            old: 64 * MIB,
            new: kmax
        }
    );
    assert!(matches!(
        book.restore(&d, &cg).unwrap(),
        Restore::Restored { new, .. } if new == 64 * MIB
    ));
    assert_eq!((d.limit(&cg), d.memsw(&cg)), (64 * MIB, 64 * MIB));
}

/// Runs `f` on another thread; its result if it finishes within `bound`.
fn within<T: Send + 'static>(bound: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(bound).ok()
}

/// From another thread, lends (episode 2) to `other`, waiting at most 10 s: `None` if
/// the lend is held up that long.
fn lend_elsewhere_within_10s(
    book: &std::sync::Arc<LoanBook>,
    d: &std::sync::Arc<Double>,
    other: &CgroupPath,
) -> Option<Result<Lend, String>> {
    let (book, d, other) = (book.clone(), d.clone(), other.clone());
    within(Duration::from_secs(10), move || {
        book.lend(
            &*d,
            &other,
            "p",
            &raise(Duration::from_secs(60)),
            2,
            2,
            false,
        )
        .map_err(|e| e.to_string())
    })
}

/// 7.4: a restore whose write blocks (the kernel reclaiming synchronously) does not
/// hold up a lend on another cgroup.
#[test]
fn a_slow_restore_does_not_delay_a_lend_elsewhere() {
    let d = std::sync::Arc::new(Double::new(4096));
    let slow = d.cgroup("slow", 64 * MIB, None, MIB);
    let other = d.cgroup("other", 64 * MIB, None, 64 * MIB);
    let book = std::sync::Arc::new(LoanBook::new(None));
    lend(&book, &d, &slow, raise(Duration::from_secs(60)), 1);
    let b = d.block(&slow, MEM);
    let h = {
        let (book, d, slow) = (book.clone(), d.clone(), slow.clone());
        std::thread::spawn(move || book.restore(&*d, &slow))
    };
    assert!(b.wait_entered());
    let lent = lend_elsewhere_within_10s(&book, &d, &other);
    b.release();
    assert!(
        matches!(lent, Some(Ok(Lend::Raised { .. }))),
        "the lend waited for the restore: {lent:?}"
    );
    assert!(matches!(h.join().unwrap(), Ok(Restore::Restored { .. })));
}

/// 6.18: with thousands of stale loans the keeper's pass does not hold the book's lock
/// for its slow work: a lend elsewhere goes through while the pass is stuck on one.
#[test]
fn a_keeper_pass_over_stale_loans_does_not_hold_up_a_lend() {
    let d = std::sync::Arc::new(Double::new(4096));
    let other = d.cgroup("other", 64 * MIB, None, 64 * MIB);
    let stuck = d.cgroup("a-stuck", 64 * MIB, None, MIB);
    let t = tempfile::tempdir().unwrap();
    let book = std::sync::Arc::new(LoanBook::new(Some(Journal::open(t.path()).unwrap())));
    lend(&book, &d, &stuck, raise(Duration::ZERO), 1);
    let proto = book.records()[0].clone();
    book.adopt(
        (0..3000)
            .map(|i| {
                let mut r = proto.clone();
                r.cgroup = CgroupPath::new(&format!("/gone-{i}"));
                r
            })
            .collect(),
    );
    let b = d.block(&stuck, READ_LIMITS);
    let pass = {
        let (book, d) = (book.clone(), d.clone());
        std::thread::spawn(move || book.tick(&*d, Instant::now() + Duration::from_secs(1)))
    };
    assert!(b.wait_entered());
    let lent = lend_elsewhere_within_10s(&book, &d, &other);
    b.release();
    assert!(
        matches!(lent, Some(Ok(Lend::Raised { .. }))),
        "the lend waited for the keeper: {lent:?}"
    );
    let ev = pass.join().unwrap();
    let given_up = ev
        .iter()
        .filter(|e| matches!(e, TickEvent::GivenUp(g) if g.why == "cgroup gone"))
        .count();
    assert_eq!(given_up, 3000);
    assert!(book.has_loan(&other) && !book.has_loan(&stuck));
}

fn policy_with(steps: Vec<Action>) -> Policy {
    Policy {
        name: "p".into(),
        mode: Mode::Enforce,
        priority: 0,
        matcher: Match::default(),
        steps: steps
            .into_iter()
            .map(|action| Step {
                action,
                settle: Duration::ZERO,
            })
            .collect(),
        source: String::new(),
        v2: Default::default(),
        early: None,
        pinned: true,
    }
}

/// 7.16: the journaled step is checked against the policy as it is now.
#[test]
fn resume_step_follows_the_current_policy() {
    let r = || Action::RaiseLimit(raise(Duration::ZERO));
    let same = policy_with(vec![r(), Action::KillAll]);
    assert_eq!(resume_step(&same, 1), Some(1));
    // A reclaim step was added before the raise: the step after it moved to 2.
    let shifted = policy_with(vec![
        Action::Reclaim {
            timeout: Duration::from_secs(1),
        },
        r(),
        Action::KillAll,
    ]);
    assert_eq!(resume_step(&shifted, 1), Some(2));
    // Nothing after the raise any more.
    assert_eq!(resume_step(&policy_with(vec![r()]), 1), None);
    // No raise at all: the policy's own steps, from the first.
    assert_eq!(resume_step(&policy_with(vec![Action::KillAll]), 1), Some(0));
    // A journaled step past the end.
    assert_eq!(resume_step(&same, 9), Some(1));
}

/// The margin is measured on the working set: inactive file cache (reclaimed first and
/// cheaply) does not keep a loan out.
#[test]
fn inactive_file_cache_does_not_count_against_the_margin() {
    let d = Double::new(4096);
    let cg = d.cgroup("app", 64 * MIB, None, 61 * MIB);
    let book = LoanBook::new(None);
    lend(&book, &d, &cg, raise(Duration::ZERO), 1);
    std::fs::write(
        d.root.join("app/memory.stat"),
        format!("cache {}\ntotal_inactive_file {}\n", 30 * MIB, 20 * MIB),
    )
    .unwrap();
    assert_eq!(working_set(&d, &cg).unwrap(), Some(41 * MIB));
    assert!(matches!(
        book.restore(&d, &cg).unwrap(),
        Restore::Restored { new, .. } if new == 64 * MIB
    ));
}

/// Issue 6.11: the agent inside the stuck cgroup. A raise of its own cgroup (or an
/// ancestor) writes the limit before journaling, since the append needs a page charged
/// to that cgroup; it is journaled right after, with the headroom made.
#[test]
fn a_raise_of_the_agents_own_cgroup_writes_the_limit_before_the_journal() {
    let d = std::sync::Arc::new(Double::new(4096));
    let cg = d.cgroup("pod", 64 * MIB, Some(64 * MIB), 10 * MIB);
    let t = tempfile::tempdir().unwrap();
    let book = std::sync::Arc::new(LoanBook::new(Some(Journal::open(t.path()).unwrap())));
    let own = CgroupPath::new(&format!("{}/agent", cg.as_str()));
    book.set_own_cgroup(Some(own));
    assert!(book.inside(&cg));
    assert!(!book.inside(&CgroupPath::new("/other")));
    // Held at the raise's first write (memsw): nothing journaled yet.
    let b = d.block(&cg, SW);
    let h = {
        let (book, d, cg) = (book.clone(), d.clone(), cg.clone());
        std::thread::spawn(move || {
            book.lend(&*d, &cg, "p", &raise(Duration::from_secs(60)), 1, 2, false)
        })
    };
    assert!(b.wait_entered());
    assert!(
        journaled(t.path()).is_empty(),
        "journaled before the limit write"
    );
    b.release();
    let lent = h.join().unwrap().unwrap();
    assert_eq!(
        lent,
        Lend::Raised {
            old: 64 * MIB,
            new: 80 * MIB
        }
    );
    // Journaled after, as a finished loan: a restart gives the original back.
    let recs = journaled(t.path());
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].original.memory, 64 * MIB);
    assert_eq!(recs[0].lent.memory, 80 * MIB);
    assert!(recs[0].change.is_none());
    let again = restart(&d, t.path());
    assert!(matches!(
        again.restore(&*d, &cg).unwrap(),
        Restore::Restored { new, .. } if new == 64 * MIB
    ));
}

/// The same raise of a cgroup the agent is not in journals first (the crash-safe order).
#[test]
fn a_raise_of_another_cgroup_still_journals_first() {
    let d = std::sync::Arc::new(Double::new(4096));
    let cg = d.cgroup("app", 64 * MIB, Some(64 * MIB), 10 * MIB);
    let t = tempfile::tempdir().unwrap();
    let book = std::sync::Arc::new(LoanBook::new(Some(Journal::open(t.path()).unwrap())));
    book.set_own_cgroup(Some(CgroupPath::new("/system.slice/oomwake.service")));
    let b = d.block(&cg, SW);
    let h = {
        let (book, d, cg) = (book.clone(), d.clone(), cg.clone());
        std::thread::spawn(move || {
            book.lend(&*d, &cg, "p", &raise(Duration::from_secs(60)), 1, 2, false)
        })
    };
    assert!(b.wait_entered());
    let recs = journaled(t.path());
    assert_eq!(recs.len(), 1, "not journaled before the write");
    assert_eq!(recs[0].change.unwrap().to.memory, 80 * MIB);
    b.release();
    h.join().unwrap().unwrap();
}

/// A cgroup removed and made again at the loan's path (a container restarted) with its
/// old limit, which OOMs before the keeper's next turn: the raise is a new loan to the
/// new cgroup, not an extension of the old cgroup's loan that the next restore gives up
/// as "cgroup replaced", leaving the new cgroup's raised limit in place for good.
#[test]
fn a_raise_on_a_cgroup_made_again_is_a_new_loan_that_is_given_back() {
    let d = Double::new(4096);
    let cg = d.cgroup("app", 64 * MIB, None, 64 * MIB);
    let book = LoanBook::new(None);
    let r = raise(Duration::from_secs(60));
    lend(&book, &d, &cg, r.clone(), 1);
    assert_eq!(d.limit(&cg), 80 * MIB);
    // Moved aside rather than removed, so that its inode cannot be reused at once.
    std::fs::rename(d.root.join("app"), d.root.join("app-old")).unwrap();
    let again = d.cgroup("app", 64 * MIB, None, 64 * MIB);
    assert_eq!(again, cg);
    assert_eq!(
        lend(&book, &d, &cg, r, 2),
        Lend::Raised {
            old: 64 * MIB,
            new: 80 * MIB
        }
    );
    let given_up = book.take_given_up();
    assert_eq!(given_up.len(), 1, "{given_up:?}");
    assert_eq!(given_up[0].why, REPLACED);
    d.set_usage(&cg, 10 * MIB);
    assert_eq!(
        book.restore(&d, &cg).unwrap(),
        Restore::Restored {
            old: 80 * MIB,
            new: 64 * MIB
        }
    );
    assert_eq!(d.limit(&cg), 64 * MIB);
}
