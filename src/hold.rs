//! The v2 hold (`[v2] hold_at`): while oomwake watches a cgroup whose policy has it, the
//! cgroup's `memory.high` is set there, so that the kernel throttles the workload (the
//! window oomwake acts in) instead of killing it at `memory.max`.
//!
//! Like a loan, a hold is journaled before the write (`<state>/holds.json`, replaced by
//! atomic rename after fsync) and undone: the previous `memory.high` comes back when the
//! cgroup is unwatched, its policy goes away or the agent stops. A restarted agent
//! re-adopts the holds of the cgroups it still watches (keeping the value from before the
//! first hold) and gives back the rest.
//!
//! A loan on a held cgroup raises `memory.high` above the hold and gives it back to the
//! hold: a release while such a loan is out is deferred (the record stays) until the
//! loan is back. A release that finds `memory.high` at any other value leaves it alone:
//! someone else set it.
//!
//! This module is the record of holds and the writes, below [`crate::shared`]; the
//! thread that makes them for the event loop and audits them is [`crate::holder`].

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::cgroup::{parse::is_unlimited, CgroupError, CgroupPath, Controller, Identity, Limits};
use crate::policy::Amount;

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cgroup is gone")]
    Gone,
}

/// One held cgroup: what `memory.high` was before, and the value oomwake holds it at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRecord {
    pub cgroup: CgroupPath,
    pub policy: String,
    pub previous: u64,
    /// What the kernel stored (read back after the write).
    pub held: u64,
    /// The value written, when the kernel stored another one (`held`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asked: Option<u64>,
    /// The cgroup held (see [`Identity`]): a cgroup made again at the same path is not
    /// released to, or held with, the record of the one before. `None` in records
    /// written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
}

/// True when the cgroup now at `rec`'s path is not the one held (unknown is not).
fn replaced(ctl: &dyn Controller, rec: &HoldRecord) -> bool {
    match (&rec.identity, ctl.hierarchy().identity(&rec.cgroup)) {
        (Some(then), Ok(Some(now))) => now != *then,
        _ => false,
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct File {
    version: u32,
    holds: Vec<HoldRecord>,
}

/// What setting a hold did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    Set {
        old: u64,
        new: u64,
    },
    /// Found in place (a restarted agent, or the same value again).
    Adopted {
        held: u64,
    },
    /// Audit mode: what it would set.
    Would {
        old: u64,
        new: u64,
    },
    /// `hold_at` is a percentage and `memory.max` is unlimited, or the hierarchy has
    /// no `memory.high` (v1): nothing to hold at.
    NotApplicable,
}

/// What giving a hold back did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    Restored {
        old: u64,
        new: u64,
    },
    /// `memory.high` is not the held value: someone else's (or a loan's) stands.
    Changed {
        current: u64,
    },
    /// A loan lent above the hold is still out: it gives `memory.high` back to the
    /// hold, and the hold is released after that (the record stays).
    Deferred,
    Gone,
    NotHeld,
}

/// The holds of a running agent, mirrored in `<state>/holds.json`.
pub struct Holds {
    path: Option<PathBuf>,
    map: Mutex<BTreeMap<CgroupPath, HoldRecord>>,
    /// Taken for a whole hold or release, so that they follow one another; the map's
    /// own lock is never held across a write of `memory.high` (a value below usage makes
    /// the kernel reclaim before the write returns) or the journal's fsync, so the event
    /// loop, which reads the map for its status, never waits for either.
    writer: Mutex<()>,
    /// The kernel's page size: it stores memory.high in whole pages.
    page: u64,
    /// Bumped on every change (for the status the agent publishes).
    generation: AtomicU64,
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> HoldError + '_ {
    move |source| HoldError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Holds {
    /// Opens (and loads) the holds journal in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Holds, HoldError> {
        let path = state_dir.join("holds.json");
        let map = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: File =
                    serde_json::from_slice(&bytes).map_err(|source| HoldError::Parse {
                        path: path.clone(),
                        source,
                    })?;
                f.holds.into_iter().map(|h| (h.cgroup.clone(), h)).collect()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io_err(&path)(e)),
        };
        Ok(Holds {
            path: Some(path),
            map: Mutex::new(map),
            writer: Mutex::new(()),
            page: crate::loan::kernel_page_size(),
            generation: AtomicU64::new(0),
        })
    }

    /// Holds kept in memory only (tests).
    pub fn in_memory() -> Holds {
        Holds {
            path: None,
            map: Mutex::new(BTreeMap::new()),
            writer: Mutex::new(()),
            page: crate::loan::kernel_page_size(),
            generation: AtomicU64::new(0),
        }
    }

    /// The same holds for a kernel with another page size (tests of 64 KiB kernels).
    pub fn with_page_size(mut self, page: u64) -> Holds {
        self.page = page.max(1);
        self
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<CgroupPath, HoldRecord>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn writing(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes `cg`'s record (under the map's lock, briefly), then journals a copy of
    /// the map with that lock released. Callers hold the writer lock.
    fn change(&self, cg: &CgroupPath, rec: Option<HoldRecord>) -> Result<(), HoldError> {
        let snapshot = {
            let mut map = self.lock();
            put(&mut map, cg, rec);
            map.clone()
        };
        self.save(&snapshot)
    }

    /// Changes when the holds change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Writes the journal: temporary file, fsync, rename, fsync of the directory.
    fn save(&self, map: &BTreeMap<CgroupPath, HoldRecord>) -> Result<(), HoldError> {
        self.generation.fetch_add(1, Ordering::Relaxed);
        let Some(path) = &self.path else {
            return Ok(());
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let body = serde_json::to_vec_pretty(&File {
            version: 1,
            holds: map.values().cloned().collect(),
        })
        .map_err(|source| HoldError::Parse {
            path: path.clone(),
            source,
        })?;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&body).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The cgroups held now.
    pub fn cgroups(&self) -> Vec<CgroupPath> {
        self.lock().keys().cloned().collect()
    }

    pub fn records(&self) -> Vec<HoldRecord> {
        self.lock().values().cloned().collect()
    }

    /// Sets `memory.high` of `cg` to `at` (of `memory.max`, or a size), journaled first.
    pub fn hold(
        &self,
        ctl: &dyn Controller,
        cg: &CgroupPath,
        policy: &str,
        at: Amount,
        audit: bool,
    ) -> Result<Held, HoldError> {
        let _writing = self.writing();
        let cur = ctl.limits(cg)?.ok_or(HoldError::Gone)?;
        let Some(cur_high) = cur.high else {
            return Ok(Held::NotApplicable);
        };
        if is_unlimited(cur.memory) && matches!(at, Amount::Percent(_)) {
            return Ok(Held::NotApplicable);
        }
        // The kernel stores whole pages of its own size.
        let target = at.of(cur.memory) / self.page * self.page;
        // The record of a cgroup removed and made again at this path is not this one's:
        // its `previous` is another cgroup's value.
        let known = self.lock().get(cg).cloned().filter(|r| !replaced(ctl, r));
        if let Some(rec) = &known {
            if cur_high == rec.held && (rec.held == target || rec.asked == Some(target)) {
                return Ok(Held::Adopted { held: rec.held });
            }
        }
        if audit {
            return Ok(Held::Would {
                old: cur_high,
                new: target,
            });
        }
        let rec = HoldRecord {
            cgroup: cg.clone(),
            policy: policy.to_string(),
            // Whatever happened since, what comes back is the value before the first hold.
            previous: known.as_ref().map(|r| r.previous).unwrap_or(cur_high),
            held: target,
            asked: None,
            identity: ctl.hierarchy().identity(cg).ok().flatten(),
        };
        if let Err(e) = self.change(cg, Some(rec.clone())) {
            let _ = self.change(cg, known);
            return Err(e);
        }
        if cur_high == target {
            return Ok(Held::Set {
                old: cur_high,
                new: target,
            });
        }
        let to = Limits {
            high: Some(target),
            ..cur
        };
        if let Err(e) = ctl.set_limits(cg, cur, to) {
            let _ = self.change(cg, known);
            return Err(e.into());
        }
        // What the kernel stored is what a release and a restarted agent compare with:
        // a value it rounded otherwise would read as someone else's and never come back.
        let stored = match ctl.limits(cg) {
            Ok(Some(l)) => l.high,
            Ok(None) => return Err(HoldError::Gone),
            Err(e) => {
                log::warn!("{cg}: reading memory.high back after the hold: {e}");
                None
            }
        };
        if let Some(h) = stored.filter(|&h| h != target) {
            log::info!("{cg}: the kernel stored memory.high {h}, not {target}: holding at {h}");
            self.change(
                cg,
                Some(HoldRecord {
                    held: h,
                    asked: Some(target),
                    ..rec
                }),
            )?;
        }
        Ok(Held::Set {
            old: cur_high,
            new: stored.unwrap_or(target),
        })
    }

    /// Gives `memory.high` of `cg` back (the value before the first hold).
    /// `loan_high` is the `memory.high` an outstanding loan on `cg` will give back.
    pub fn release(
        &self,
        ctl: &dyn Controller,
        cg: &CgroupPath,
        loan_high: Option<u64>,
    ) -> Result<Released, HoldError> {
        let _writing = self.writing();
        let Some(rec) = self.lock().get(cg).cloned() else {
            return Ok(Released::NotHeld);
        };
        if replaced(ctl, &rec) {
            // The cgroup held is gone; the one at its path now is not ours to write.
            self.change(cg, None)?;
            return Ok(Released::Gone);
        }
        let out = match ctl.limits(cg) {
            Ok(None) => Released::Gone,
            Err(e) if e.is_gone() => Released::Gone,
            Err(e) => return Err(e.into()),
            Ok(Some(cur)) => match cur.high {
                Some(h) if h == rec.held => {
                    let to = Limits {
                        high: Some(rec.previous),
                        ..cur
                    };
                    match ctl.set_limits(cg, cur, to) {
                        Ok(()) => Released::Restored {
                            old: h,
                            new: rec.previous,
                        },
                        Err(e) if e.is_gone() => Released::Gone,
                        Err(e) => return Err(e.into()),
                    }
                }
                _ if loan_high == Some(rec.held) => return Ok(Released::Deferred),
                other => Released::Changed {
                    current: other.unwrap_or(u64::MAX),
                },
            },
        };
        self.change(cg, None)?;
        Ok(out)
    }
}

/// Puts `rec` as `cg`'s record, or removes it (`None`).
fn put(map: &mut BTreeMap<CgroupPath, HoldRecord>, cg: &CgroupPath, rec: Option<HoldRecord>) {
    match rec {
        Some(k) => map.insert(cg.clone(), k),
        None => map.remove(cg),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{v1::V1, v2::V2, Hierarchy, Kind, OomControl};

    const MIB: u64 = 1 << 20;

    fn fake() -> (tempfile::TempDir, V2, CgroupPath) {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("app");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("memory.max"), (64 * MIB).to_string()).unwrap();
        std::fs::write(d.join("memory.high"), "max\n").unwrap();
        std::fs::write(d.join("memory.current"), (10 * MIB).to_string()).unwrap();
        let v = V2::new(Hierarchy::fake(t.path(), Kind::V2));
        (t, v, CgroupPath::new("/app"))
    }

    fn high(t: &tempfile::TempDir) -> String {
        std::fs::read_to_string(t.path().join("app/memory.high"))
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn hold_is_journaled_set_adopted_after_restart_and_given_back() {
        let (t, v, cg) = fake();
        let state = tempfile::tempdir().unwrap();
        let holds = Holds::open(state.path()).unwrap();
        let at = Amount::Percent(0.75);
        assert_eq!(
            holds.hold(&v, &cg, "p", at, false).unwrap(),
            Held::Set {
                old: u64::MAX,
                new: 48 * MIB
            }
        );
        assert_eq!(high(&t), (48 * MIB).to_string());
        // A restart: the journal names the hold and the value to give back.
        drop(holds);
        let holds = Holds::open(state.path()).unwrap();
        assert_eq!(holds.cgroups(), vec![cg.clone()]);
        assert_eq!(holds.records()[0].previous, u64::MAX);
        assert_eq!(
            holds.hold(&v, &cg, "p", at, false).unwrap(),
            Held::Adopted { held: 48 * MIB }
        );
        assert_eq!(
            holds.release(&v, &cg, None).unwrap(),
            Released::Restored {
                old: 48 * MIB,
                new: u64::MAX
            }
        );
        assert_eq!(high(&t), "max");
        assert!(Holds::open(state.path()).unwrap().cgroups().is_empty());
        assert_eq!(holds.release(&v, &cg, None).unwrap(), Released::NotHeld);
    }

    #[test]
    fn a_changed_hold_keeps_the_first_previous_value() {
        let (t, v, cg) = fake();
        let holds = Holds::in_memory();
        holds
            .hold(&v, &cg, "p", Amount::Percent(0.75), false)
            .unwrap();
        // A reload with another hold_at: the value before the first hold still comes back.
        let r = holds
            .hold(&v, &cg, "p", Amount::Bytes(40 * MIB), false)
            .unwrap();
        assert_eq!(
            r,
            Held::Set {
                old: 48 * MIB,
                new: 40 * MIB
            }
        );
        assert_eq!(high(&t), (40 * MIB).to_string());
        assert_eq!(holds.records()[0].previous, u64::MAX);
        holds.release(&v, &cg, None).unwrap();
        assert_eq!(high(&t), "max");
    }

    #[test]
    fn someone_elses_value_stands_and_audit_writes_nothing() {
        let (t, v, cg) = fake();
        let holds = Holds::in_memory();
        assert_eq!(
            holds
                .hold(&v, &cg, "p", Amount::Percent(0.5), true)
                .unwrap(),
            Held::Would {
                old: u64::MAX,
                new: 32 * MIB
            }
        );
        assert_eq!(high(&t), "max");
        assert!(holds.cgroups().is_empty());
        holds
            .hold(&v, &cg, "p", Amount::Percent(0.5), false)
            .unwrap();
        std::fs::write(t.path().join("app/memory.high"), (50 * MIB).to_string()).unwrap();
        assert_eq!(
            holds.release(&v, &cg, None).unwrap(),
            Released::Changed { current: 50 * MIB }
        );
        assert_eq!(high(&t), (50 * MIB).to_string());
        assert!(holds.cgroups().is_empty());
    }

    #[test]
    fn nothing_to_hold_on_v1_or_an_unlimited_max() {
        let (t, v, cg) = fake();
        let holds = Holds::in_memory();
        std::fs::write(t.path().join("app/memory.max"), "max\n").unwrap();
        assert_eq!(
            holds
                .hold(&v, &cg, "p", Amount::Percent(0.9), false)
                .unwrap(),
            Held::NotApplicable
        );
        let d = t.path().join("app");
        std::fs::write(d.join("memory.limit_in_bytes"), (64 * MIB).to_string()).unwrap();
        let v1 = V1::new(Hierarchy::fake(t.path(), Kind::V1));
        assert_eq!(
            holds
                .hold(&v1, &cg, "p", Amount::Percent(0.9), false)
                .unwrap(),
            Held::NotApplicable
        );
        assert!(matches!(
            holds.hold(
                &v,
                &CgroupPath::new("/gone"),
                "p",
                Amount::Percent(0.9),
                false
            ),
            Err(HoldError::Gone)
        ));
    }

    /// v2 on a TempDir whose "kernel" stores memory.high in whole pages of `page` bytes
    /// (64 KiB on arm64 and ppc64le kernels), and remembers what was written.
    struct Paged {
        v: V2,
        page: u64,
        written: Mutex<Vec<u64>>,
    }

    impl Controller for Paged {
        fn hierarchy(&self) -> &crate::cgroup::Hierarchy {
            self.v.hierarchy()
        }
        fn oom_state(&self, cg: &CgroupPath) -> crate::cgroup::Result<Option<OomControl>> {
            self.v.oom_state(cg)
        }
        fn limits(&self, cg: &CgroupPath) -> crate::cgroup::Result<Option<Limits>> {
            self.v.limits(cg)
        }
        fn usage(&self, cg: &CgroupPath) -> crate::cgroup::Result<Option<u64>> {
            self.v.usage(cg)
        }
        fn set_limits(
            &self,
            cg: &CgroupPath,
            from: Limits,
            to: Limits,
        ) -> crate::cgroup::Result<()> {
            if let Some(h) = to.high.filter(|&h| Some(h) != from.high) {
                self.written.lock().unwrap().push(h);
            }
            let high = to.high.map(|h| {
                if is_unlimited(h) {
                    h
                } else {
                    h / self.page * self.page
                }
            });
            self.v.set_limits(cg, from, Limits { high, ..to })
        }
        fn reclaim(
            &self,
            cg: &CgroupPath,
            t: std::time::Duration,
        ) -> crate::cgroup::Result<Option<crate::cgroup::Reclaimed>> {
            self.v.reclaim(cg, t)
        }
        fn procs(&self, cg: &CgroupPath) -> crate::cgroup::Result<Option<Vec<i32>>> {
            self.v.procs(cg)
        }
        fn stat(&self, cg: &CgroupPath) -> crate::cgroup::Result<Option<BTreeMap<String, u64>>> {
            self.v.stat(cg)
        }
        fn register_stall(
            &self,
            cg: &CgroupPath,
            psi: Option<&crate::cgroup::v2::PsiTrigger>,
        ) -> crate::cgroup::Result<crate::cgroup::StallWatch> {
            self.v.register_stall(cg, psi)
        }
        fn oom_probe(
            &self,
            cg: &CgroupPath,
        ) -> crate::cgroup::Result<Option<crate::cgroup::OomProbe>> {
            self.v.oom_probe(cg)
        }
    }

    fn paged(page: u64) -> (tempfile::TempDir, Paged, CgroupPath) {
        let (t, v, cg) = fake();
        let p = Paged {
            v,
            page,
            written: Mutex::new(Vec::new()),
        };
        (t, p, cg)
    }

    /// 90% of 64 MiB is 60397977 bytes: 60395520 in 4 KiB pages, 60358656 in 64 KiB ones.
    const HELD_64K: u64 = 60_358_656;

    #[test]
    fn a_hold_is_written_in_the_kernels_pages() {
        let (t, k, cg) = paged(64 << 10);
        let holds = Holds::in_memory().with_page_size(64 << 10);
        let at = Amount::Percent(0.9);
        assert_eq!(
            holds.hold(&k, &cg, "p", at, false).unwrap(),
            Held::Set {
                old: u64::MAX,
                new: HELD_64K
            }
        );
        assert_eq!(
            *k.written.lock().unwrap(),
            vec![HELD_64K],
            "whole 64 KiB pages"
        );
        assert_eq!(high(&t), HELD_64K.to_string());
        assert_eq!(
            holds.hold(&k, &cg, "p", at, false).unwrap(),
            Held::Adopted { held: HELD_64K }
        );
        assert_eq!(
            k.written.lock().unwrap().len(),
            1,
            "adopted, not written again"
        );
    }

    #[test]
    fn a_hold_keeps_what_the_kernel_stored_and_gives_it_back() {
        // The agent's idea of the page size is wrong (4 KiB against 64 KiB): what the
        // kernel read back is what counts.
        let (t, k, cg) = paged(64 << 10);
        let state = tempfile::tempdir().unwrap();
        let holds = Holds::open(state.path()).unwrap().with_page_size(4096);
        let at = Amount::Percent(0.9);
        assert_eq!(
            holds.hold(&k, &cg, "p", at, false).unwrap(),
            Held::Set {
                old: u64::MAX,
                new: HELD_64K
            }
        );
        assert_eq!(high(&t), HELD_64K.to_string());
        // A restarted agent re-adopts it instead of writing it again and again.
        drop(holds);
        let holds = Holds::open(state.path()).unwrap().with_page_size(4096);
        assert_eq!(holds.records()[0].held, HELD_64K);
        assert_eq!(
            holds.hold(&k, &cg, "p", at, false).unwrap(),
            Held::Adopted { held: HELD_64K }
        );
        assert_eq!(k.written.lock().unwrap().len(), 1);
        // And the release finds its own value, so memory.high comes back.
        assert_eq!(
            holds.release(&k, &cg, None).unwrap(),
            Released::Restored {
                old: HELD_64K,
                new: u64::MAX
            }
        );
        assert_eq!(high(&t), "max");
    }

    #[test]
    fn release_waits_for_a_loan_lent_above_the_hold() {
        let (t, v, cg) = fake();
        let holds = Holds::in_memory();
        holds
            .hold(&v, &cg, "p", Amount::Percent(0.75), false)
            .unwrap();
        // A loan raised memory.high above the hold; it will give back 48 MiB.
        std::fs::write(t.path().join("app/memory.high"), (64 * MIB).to_string()).unwrap();
        assert_eq!(
            holds.release(&v, &cg, Some(48 * MIB)).unwrap(),
            Released::Deferred
        );
        assert_eq!(holds.cgroups(), vec![cg.clone()], "the record stays");
        // The loan is back: now the hold goes.
        std::fs::write(t.path().join("app/memory.high"), (48 * MIB).to_string()).unwrap();
        assert_eq!(
            holds.release(&v, &cg, None).unwrap(),
            Released::Restored {
                old: 48 * MIB,
                new: u64::MAX
            }
        );
        assert_eq!(high(&t), "max");
    }

    /// Issue 16.14: a hold belongs to the cgroup held, not to its path. A cgroup made
    /// again at the path (while the agent was down), whose `memory.high` happens to be
    /// the held value, is neither released to the old cgroup's previous value nor held
    /// with it.
    #[test]
    fn a_cgroup_made_again_at_a_held_path_is_not_released_or_adopted() {
        let (t, v, cg) = fake();
        let state = tempfile::tempdir().unwrap();
        let holds = Holds::open(state.path()).unwrap();
        let at = Amount::Percent(0.75);
        holds.hold(&v, &cg, "p", at, false).unwrap();
        assert!(holds.records()[0].identity.is_some());
        drop(holds);
        // Removed and made again (the old directory kept aside, so that its inode
        // cannot be reused), with the held value as its own memory.high.
        std::fs::rename(t.path().join("app"), t.path().join("app.old")).unwrap();
        let d = t.path().join("app");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("memory.max"), (64 * MIB).to_string()).unwrap();
        std::fs::write(d.join("memory.high"), (48 * MIB).to_string()).unwrap();
        std::fs::write(d.join("memory.current"), (10 * MIB).to_string()).unwrap();

        let holds = Holds::open(state.path()).unwrap();
        assert_eq!(holds.release(&v, &cg, None).unwrap(), Released::Gone);
        assert_eq!(
            high(&t),
            (48 * MIB).to_string(),
            "the new cgroup was written"
        );
        assert!(holds.cgroups().is_empty(), "the old record is dropped");

        // Held anew: what comes back is the new cgroup's own value, not the old one's.
        let holds = Holds::open(state.path()).unwrap();
        std::fs::write(d.join("memory.high"), (40 * MIB).to_string()).unwrap();
        holds.hold(&v, &cg, "p", at, false).unwrap();
        assert_eq!(holds.records()[0].previous, 40 * MIB);
    }
}
