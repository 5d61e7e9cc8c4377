//! The kernel's own record of an OOM kill, read from `/dev/kmsg`: who the kernel's OOM
//! killer killed when oomwake handed it a stall (`kernel_oom_kill`).
//!
//! The descriptor is opened once at start (`O_RDONLY | O_NONBLOCK | O_CLOEXEC`), with
//! its read buffer, so that reading it at the wall needs nothing new: an agent sharing
//! the stuck cgroup cannot open a file there. It is optional: without it (no
//! `/dev/kmsg`, not readable) a hand-off still works and says the victim is unknown.
//!
//! Two kernel lines matter (Debian's 6.1 and 6.18 print them alike, `mm/oom_kill.c`):
//! - `oom-kill:constraint=CONSTRAINT_MEMCG,...,oom_memcg=/a/b,task_memcg=/a/b/c,task=COMM,pid=PID,uid=0`
//!   (with the OOM report, which the kernel rate-limits: at most 10 per 5 s), naming the
//!   memory cgroup that was out of memory;
//! - `Memory cgroup out of memory: Killed process PID (COMM) total-vm:...` (never
//!   rate-limited).
//!
//! A kill is attributed to a cgroup only when its summary line names that cgroup as
//! `oom_memcg`: other cgroups on the host may be OOM-killed at the same moment, and a
//! guess could name someone else's process.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

/// The kernel refuses a read into a buffer smaller than one extended record.
const RECORD_MAX: usize = 8192;
/// Kill lines kept between a hand-off's write and its read (others' kills included).
const KEEP: usize = 64;

/// One line of the kernel's OOM report that names a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// `oom-kill:...,oom_memcg=...,task_memcg=...,task=...,pid=...`
    Summary {
        oom_memcg: String,
        task_memcg: String,
        task: String,
        pid: i32,
    },
    /// `... Killed process PID (COMM) ...`
    Killed { pid: i32, comm: String },
}

/// A process the kernel's OOM killer killed, from its own record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Victim {
    pub pid: i32,
    pub comm: String,
    /// The memory cgroup the victim was in, as the kernel prints it.
    pub task_memcg: String,
}

/// The text of one `/dev/kmsg` record (`PRI,SEQ,TS,FLAGS;TEXT\n KEY=VALUE...`) and its
/// sequence number.
pub fn record(raw: &str) -> Option<(u64, &str)> {
    let (head, rest) = raw.split_once(';')?;
    let seq = head.split(',').nth(1)?.parse().ok()?;
    let text = rest.split('\n').next().unwrap_or("");
    Some((seq, text))
}

/// Parses one kernel line of an OOM kill (see the module docs); None for any other.
pub fn parse_line(text: &str) -> Option<Line> {
    if let Some(s) = text.strip_prefix("oom-kill:") {
        // The paths come before `task=`: a comm may hold anything, so it is cut from
        // the right (the last `,pid=`).
        let oom_at = s.find(",oom_memcg=")?;
        let s = &s[oom_at + ",oom_memcg=".len()..];
        let (oom_memcg, s) = s.split_once(",task_memcg=")?;
        let (task_memcg, s) = s.split_once(",task=")?;
        let (task, s) = s.rsplit_once(",pid=")?;
        let pid = s.split(',').next()?.trim().parse().ok()?;
        return Some(Line::Summary {
            oom_memcg: oom_memcg.to_string(),
            task_memcg: task_memcg.to_string(),
            task: task.to_string(),
            pid,
        });
    }
    let at = text.find("Killed process ")?;
    let s = &text[at + "Killed process ".len()..];
    let (pid, s) = s.split_once(" (")?;
    let pid = pid.parse().ok()?;
    // `COMM) total-vm:...`; a comm with `)` in it is cut at the last `) total-vm`.
    let comm = match s.rfind(") total-vm:") {
        Some(end) => &s[..end],
        None => &s[..s.rfind(')')?],
    };
    Some(Line::Killed {
        pid,
        comm: comm.to_string(),
    })
}

/// True when the kernel's printed memcg path `printed` (from the root of the v1
/// hierarchy) names the cgroup whose path, as `/proc/PID/cgroup` shows it, is `dir`
/// ([`crate::cgroup::Hierarchy::proc_path`]; not its directory under the mount: a
/// cgroup named like the mount's last components would match it).
pub fn names(dir: &Path, printed: &str) -> bool {
    let rel = printed.trim_start_matches('/');
    let ours = dir.strip_prefix("/").unwrap_or(dir);
    // The printed path is the whole path from the hierarchy's root; the agent's may be
    // shorter (in a cgroup namespace). The printed one must end with all of ours: a
    // shorter printed path ("/app" for ours "/pod/app") is another cgroup.
    !rel.is_empty() && ours.components().next().is_some() && Path::new(rel).ends_with(ours)
}

/// The victims in `lines` of an OOM of the memory cgroup `dir` (see [`names`]): a `Killed` line whose
/// pid a summary naming `dir` as `oom_memcg` announced. Also returns how many kills in
/// `lines` could not be attributed to any cgroup (their summary was rate-limited away).
pub fn victims(lines: &[Line], dir: &Path) -> (Vec<Victim>, usize) {
    let mut out = Vec::new();
    let mut unattributed = 0;
    for l in lines {
        let Line::Killed { pid, comm } = l else {
            continue;
        };
        let summary = lines.iter().find_map(|s| match s {
            Line::Summary {
                oom_memcg,
                task_memcg,
                pid: p,
                ..
            } if p == pid => Some((oom_memcg, task_memcg)),
            _ => None,
        });
        match summary {
            Some((oom, task)) if names(dir, oom) => out.push(Victim {
                pid: *pid,
                comm: comm.clone(),
                task_memcg: task.clone(),
            }),
            Some(_) => {}
            None => unattributed += 1,
        }
    }
    (out, unattributed)
}

struct Kmsg {
    file: File,
    buf: Box<[u8]>,
    /// Kill lines read since the oldest running hand-off's mark, with their sequence.
    lines: Vec<(u64, Line)>,
    /// Hand-offs between [`mark`] and their [`Mark`]'s drop.
    active: usize,
}

static KMSG: Mutex<Option<Kmsg>> = Mutex::new(None);

fn lock() -> std::sync::MutexGuard<'static, Option<Kmsg>> {
    KMSG.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opens `/dev/kmsg` (at start, before memory is locked). Never required: an error is
/// returned for the agent's log, and hand-offs then name no victim.
pub fn open_at_start(path: &Path) -> io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    file.seek(SeekFrom::End(0))?;
    let mut buf = vec![0u8; RECORD_MAX].into_boxed_slice();
    // Readable at all (dmesg_restrict without CAP_SYSLOG refuses the read, not the open)?
    match file.read(&mut buf) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
        Err(e) => return Err(e),
    }
    *lock() = Some(Kmsg {
        file,
        buf,
        lines: Vec::with_capacity(KEEP),
        active: 0,
    });
    Ok(())
}

impl Kmsg {
    /// Reads every record available now, keeping the kill lines.
    fn drain(&mut self) {
        loop {
            match self.file.read(&mut self.buf) {
                Ok(0) => return,
                Ok(n) => {
                    let raw = String::from_utf8_lossy(&self.buf[..n]);
                    let Some((seq, text)) = record(&raw) else {
                        continue;
                    };
                    if let Some(l) = parse_line(text) {
                        if self.lines.len() == KEEP {
                            self.lines.remove(0);
                        }
                        self.lines.push((seq, l));
                    }
                }
                // Records overwritten before they were read: go on with the next.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }
}

/// Where a hand-off's kernel lines start: taken before its write.
pub struct Mark {
    /// Lines from this sequence number on are the hand-off's candidates.
    from: u64,
}

/// Marks the kernel log before a hand-off's write; None without `/dev/kmsg`.
pub fn mark() -> Option<Mark> {
    let mut g = lock();
    let k = g.as_mut()?;
    let from = if k.active == 0 {
        // Nobody needs the lines before now: skip them unread.
        k.lines.clear();
        if k.file.seek(SeekFrom::End(0)).is_err() {
            k.drain();
        }
        0
    } else {
        k.drain();
        k.lines.last().map_or(0, |(s, _)| s + 1)
    };
    k.active += 1;
    Some(Mark { from })
}

impl Mark {
    /// The kill lines logged since the mark (others' kills included).
    pub fn lines(&self) -> Vec<Line> {
        let mut g = lock();
        let Some(k) = g.as_mut() else {
            return Vec::new();
        };
        k.drain();
        k.lines
            .iter()
            .filter(|(s, _)| *s >= self.from)
            .map(|(_, l)| l.clone())
            .collect()
    }
}

impl Drop for Mark {
    fn drop(&mut self) {
        if let Some(k) = lock().as_mut() {
            k.active = k.active.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // As /dev/kmsg gives them on this host (6.18) and Debian's 6.1 (same format).
    const SUMMARY: &str = "6,2345,2537033536,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/process_api/97b6/z-memsw2-8583,task_memcg=/process_api/97b6/z-memsw2-8583/app,task=z-pinned,pid=5490,uid=0\n";
    const KILLED: &str = "3,2346,2537033550,-;Memory cgroup out of memory: Killed process 5490 (z-pinned) total-vm:2572kB, anon-rss:128kB, file-rss:1244kB, shmem-rss:0kB, UID:0 pgtables:48kB oom_score_adj:0\n SUBSYSTEM=memory\n";

    #[test]
    fn kmsg_records_and_oom_lines_parse() {
        let (seq, text) = record(SUMMARY).unwrap();
        assert_eq!(seq, 2345);
        assert_eq!(
            parse_line(text),
            Some(Line::Summary {
                oom_memcg: "/process_api/97b6/z-memsw2-8583".into(),
                task_memcg: "/process_api/97b6/z-memsw2-8583/app".into(),
                task: "z-pinned".into(),
                pid: 5490,
            })
        );
        let (seq, text) = record(KILLED).unwrap();
        assert_eq!(seq, 2346);
        assert!(!text.contains('\n'));
        assert_eq!(
            parse_line(text),
            Some(Line::Killed {
                pid: 5490,
                comm: "z-pinned".into()
            })
        );
        // The global OOM killer's line has the same tail.
        assert_eq!(
            parse_line("Out of memory: Killed process 7 (a (b) c) total-vm:1kB, anon-rss:0kB"),
            Some(Line::Killed {
                pid: 7,
                comm: "a (b) c".into()
            })
        );
        assert_eq!(
            parse_line("oom_reaper: reaped process 5490 (z-pinned)"),
            None
        );
        assert_eq!(parse_line("Killed process x (y)"), None);
        assert_eq!(parse_line("oom-kill:constraint=CONSTRAINT_MEMCG"), None);
        assert_eq!(record("no separator"), None);
    }

    #[test]
    fn a_kill_is_attributed_only_through_a_summary_naming_the_cgroup() {
        let lines: Vec<Line> = [SUMMARY, KILLED]
            .iter()
            .map(|r| parse_line(record(r).unwrap().1).unwrap())
            .collect();
        let dir = Path::new("/process_api/97b6/z-memsw2-8583");
        let (v, unknown) = victims(&lines, dir);
        assert_eq!(unknown, 0);
        assert_eq!(
            v,
            vec![Victim {
                pid: 5490,
                comm: "z-pinned".into(),
                task_memcg: "/process_api/97b6/z-memsw2-8583/app".into()
            }]
        );
        // Another cgroup's OOM (a child, a sibling) is not ours.
        let (v, unknown) = victims(&lines, &dir.join("app"));
        assert!(v.is_empty() && unknown == 0);
        let (v, _) = victims(&lines, Path::new("/z-memsw2-8583x"));
        assert!(v.is_empty());
        // Nor is a cgroup whose path is longer than the printed one, with the same end
        // (ours /pod/z-memsw2-8583 against the kernel's /97b6/z-memsw2-8583, or a
        // deeper one), nor one named like the mount point's components.
        let (v, _) = victims(&lines, Path::new("/x/process_api/97b6/z-memsw2-8583"));
        assert!(v.is_empty());
        let (v, _) = victims(&lines, Path::new("/pod/z-memsw2-8583"));
        assert!(v.is_empty());
        // In a cgroup namespace the agent's path is the end of the printed one.
        let (v, _) = victims(&lines, Path::new("/97b6/z-memsw2-8583"));
        assert_eq!(v.len(), 1);
        // A kill whose summary was rate-limited away is counted, never guessed.
        let (v, unknown) = victims(&lines[1..], dir);
        assert!(v.is_empty());
        assert_eq!(unknown, 1);
        assert!(!names(dir, "/"));
        assert!(!names(Path::new("/"), "/pod"));
        // A shorter printed path is another cgroup: the kernel's own OOM in a
        // top-level "/app" is not one of "/pod/app" (the v1 hand-off would end early,
        // put oom_kill_disable back before the kernel killed in its cgroup, and name
        // the other cgroup's task as its victim).
        assert!(!names(Path::new("/pod/app"), "/app"));
        assert!(names(Path::new("/pod/app"), "/pod/app"));
    }
}
