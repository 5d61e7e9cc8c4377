//! A memory hog for tests, benchmarks and `oomwake demo`: joins a cgroup, touches pages
//! one by one at a controlled rate and reports the longest gap between two touches (the
//! stall it saw). It is a workload simulator, not part of the agent's decision path.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

const PAGE: usize = 4096;

#[derive(Debug, Clone)]
pub struct HogArgs {
    /// Cgroup directory to join first (writes our PID to its cgroup.procs).
    pub join: Option<PathBuf>,
    pub touch_bytes: usize,
    /// Pause between page touches (0 = as fast as possible).
    pub interval: Duration,
    /// Grow at this many bytes per second (paced in steps of at most a millisecond;
    /// the pacing sleeps are not counted as stalls). None: as fast as `interval` lets.
    pub rate: Option<u64>,
    /// Sleep this long after touching everything, memory still held.
    pub hold: Duration,
    /// Free the memory after the hold, then sleep `after_free`.
    pub after_free: Option<Duration>,
    /// Appears in the command line so policies can prefer or avoid this process.
    pub tag: String,
    /// Before touching anonymous memory, write (and fsync) a file of this size:
    /// clean page cache charged to the cgroup, which reclaim can free.
    pub write_file: Option<(PathBuf, usize)>,
    /// After touching this many bytes, wait until the file exists, then go on: lets a
    /// benchmark make many hogs hit their limits at the same moment. The wait is not
    /// counted as a stall.
    pub barrier: Option<(PathBuf, usize)>,
}

#[derive(Debug, Serialize)]
pub struct HogReport {
    pub pid: u32,
    pub tag: String,
    pub touched_bytes: usize,
    pub longest_stall_us: u64,
    pub longest_stall_at_bytes: usize,
    pub elapsed_ms: u64,
}

/// Parses hog arguments: `--join DIR --touch SIZE --interval DUR --hold DUR
/// --free-after DUR --tag NAME --write-file PATH:SIZE --barrier PATH:SIZE --rate SIZE`
/// (`--rate` per second).
pub fn parse_args(args: &[String]) -> Result<HogArgs, String> {
    let mut a = HogArgs {
        join: None,
        touch_bytes: 16 << 20,
        interval: Duration::ZERO,
        rate: None,
        hold: Duration::ZERO,
        after_free: None,
        tag: "hog".into(),
        write_file: None,
        barrier: None,
    };
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let mut v = || it.next().cloned().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--join" => a.join = Some(PathBuf::from(v()?)),
            "--touch" => a.touch_bytes = crate::policy::units::parse_size(&v()?)? as usize,
            "--interval" => a.interval = crate::policy::units::parse_duration(&v()?)?,
            "--rate" => {
                // A size per second: "100M" is 100 MiB/s.
                let r = crate::policy::units::parse_size(&v()?)?;
                a.rate = Some(r).filter(|&r| r > 0);
            }
            "--hold" => a.hold = crate::policy::units::parse_duration(&v()?)?,
            "--free-after" => a.after_free = Some(crate::policy::units::parse_duration(&v()?)?),
            "--tag" => a.tag = v()?,
            "--barrier" => {
                let spec = v()?;
                let (path, size) = spec
                    .rsplit_once(':')
                    .ok_or(format!("--barrier wants PATH:SIZE, got {spec:?}"))?;
                let size = crate::policy::units::parse_size(size)? as usize;
                a.barrier = Some((PathBuf::from(path), size));
            }
            "--write-file" => {
                let spec = v()?;
                let (path, size) = spec
                    .rsplit_once(':')
                    .ok_or(format!("--write-file wants PATH:SIZE, got {spec:?}"))?;
                let size = crate::policy::units::parse_size(size)? as usize;
                a.write_file = Some((PathBuf::from(path), size));
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

/// Runs the hog; prints one JSON report line on stdout after touching everything.
pub fn run(a: &HogArgs) -> Result<HogReport, String> {
    if let Some(dir) = &a.join {
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .map_err(|e| format!("joining {}: {e}", procs.display()))?;
    }
    if let Some((path, size)) = &a.write_file {
        let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let chunk = vec![0x5au8; 1 << 20];
        let mut left = *size;
        while left > 0 {
            let n = left.min(chunk.len());
            f.write_all(&chunk[..n])
                .map_err(|e| format!("{}: {e}", path.display()))?;
            left -= n;
        }
        f.sync_all()
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let start = Instant::now();
    // Zeroed allocation of this size is a fresh anonymous mapping: every first write
    // to a page faults and charges the cgroup, which is what we want to observe.
    let mut buf = vec![0u8; a.touch_bytes];
    let mut longest = Duration::ZERO;
    let mut longest_at = 0;
    let mut prev = Instant::now();
    let mut off = 0;
    while off < buf.len() {
        if let Some((path, at)) = &a.barrier {
            if off == *at - (*at % PAGE) {
                while !path.exists() {
                    std::thread::sleep(Duration::from_micros(200));
                }
                longest = Duration::ZERO;
                prev = Instant::now();
            }
        }
        buf[off] = 1;
        std::hint::black_box(&buf[off]);
        let now = Instant::now();
        let gap = now - prev;
        if gap > longest {
            longest = gap;
            longest_at = off;
        }
        if !a.interval.is_zero() {
            std::thread::sleep(a.interval);
        }
        if let Some(rate) = a.rate {
            // Where the growth should be by now; sleep off a lead of a millisecond or more.
            let due = start + Duration::from_secs_f64((off + PAGE) as f64 / rate as f64);
            let ahead = due.saturating_duration_since(Instant::now());
            if ahead >= Duration::from_millis(1) {
                std::thread::sleep(ahead);
            }
        }
        prev = Instant::now();
        off += PAGE;
    }
    let report = HogReport {
        pid: std::process::id(),
        tag: a.tag.clone(),
        touched_bytes: buf.len(),
        longest_stall_us: longest.as_micros() as u64,
        longest_stall_at_bytes: longest_at,
        elapsed_ms: start.elapsed().as_millis() as u64,
    };
    let line = serde_json::to_string(&report).map_err(|e| e.to_string())?;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    std::thread::sleep(a.hold);
    if let Some(after) = a.after_free {
        drop(buf);
        std::thread::sleep(after);
    } else {
        std::hint::black_box(&buf);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_parse() {
        let v: Vec<String> = [
            "--touch",
            "8M",
            "--tag",
            "victim",
            "--hold",
            "1s",
            "--free-after",
            "2s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let a = parse_args(&v).unwrap();
        assert_eq!(a.touch_bytes, 8 << 20);
        assert_eq!(a.tag, "victim");
        assert_eq!(a.hold, Duration::from_secs(1));
        assert_eq!(a.after_free, Some(Duration::from_secs(2)));
        assert!(parse_args(&["--bogus".to_string()]).is_err());
        assert!(parse_args(&["--touch".to_string()]).is_err());
    }

    #[test]
    fn rate_paces_the_growth() {
        let a =
            parse_args(&["--touch".into(), "8M".into(), "--rate".into(), "64M".into()]).unwrap();
        assert_eq!(a.rate, Some(64 << 20));
        let r = run(&a).unwrap();
        // 8 MiB at 64 MiB/s: 125 ms at least, whatever the machine.
        assert!(r.elapsed_ms >= 120, "{}", r.elapsed_ms);
    }

    #[test]
    fn touches_and_reports_without_a_cgroup() {
        let a = parse_args(&["--touch".into(), "1M".into()]).unwrap();
        let r = run(&a).unwrap();
        assert_eq!(r.touched_bytes, 1 << 20);
        assert!(r.longest_stall_at_bytes < 1 << 20);
    }
}
