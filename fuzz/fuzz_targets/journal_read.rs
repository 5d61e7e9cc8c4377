//! Fuzz target: the journal reader. The input is written as the state dir's files
//! (`loans.json`, `loans.log`, `loans.log.1`, split at the separator `\n\0\0\n`; a part
//! that is absent leaves its file absent), then read as the agent reads it. Never a
//! panic; `recover` never refuses content (only the directory itself can fail it); and
//! what it recovered, written back, loads again as the same loans.

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use oomwake::journal::Journal;

const SEP: &[u8] = b"\n\0\0\n";
const FILES: [&str; 3] = ["loans.json", "loans.log", "loans.log.1"];

fn dir() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = DIR.get_or_init(|| {
        // In memory where there is one: a compaction fsyncs, on a disk that costs ms.
        let t = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("a temporary directory");
        let p = t.path().join("state");
        (t, p)
    });
    p
}

fn parts(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(SEP.len()).position(|w| w == SEP) {
        out.push(&rest[..i]);
        rest = &rest[i + SEP.len()..];
    }
    out.push(rest);
    out
}

fuzz_target!(|data: &[u8]| {
    let dir = dir();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("the state dir");
    for (name, part) in FILES.iter().zip(parts(data)) {
        std::fs::write(dir.join(name), part).expect("a journal file");
    }
    let j = Journal::open(dir).expect("open");
    let _ = j.load();
    let r = j.recover().expect("recover refuses no content");
    j.save(&r.loans).expect("save");
    let mut again = j.load().expect("what recover read loads again");
    let mut want = r.loans;
    again.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
    want.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
    assert_eq!(again, want);
});
