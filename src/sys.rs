//! The agent's only `unsafe`: thin wrappers over the Linux syscalls that neither std nor
//! nix expose in the shape we need (pidfds, process_mrelease, mlockall, statfs magic,
//! a unix socket connection with a deadline and its peer's uid, and [`spawn`]: starting
//! a hook without copying the agent's memory).
//!
//! Everything here returns `io::Result` and owns its file descriptors, so callers never
//! see a raw fd or errno.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

pub mod spawn;

/// x86_64 and aarch64 share the asm-generic numbers for these (added in 5.3 / 5.1 / 5.15).
const SYS_PIDFD_OPEN: libc::c_long = 434;
const SYS_PIDFD_SEND_SIGNAL: libc::c_long = 424;
const SYS_PROCESS_MRELEASE: libc::c_long = 448;

/// A process handle that cannot be confused with a later process reusing the PID.
#[derive(Debug)]
pub struct PidFd {
    fd: OwnedFd,
    pid: i32,
}

impl PidFd {
    /// Opens a pidfd for `pid`. `ESRCH` (gone already) comes back as `ErrorKind::NotFound`.
    pub fn open(pid: i32) -> io::Result<PidFd> {
        // SAFETY: pidfd_open takes a pid and flags by value and returns a new fd or -1;
        // no memory is shared with the kernel.
        let ret = unsafe { libc::syscall(SYS_PIDFD_OPEN, pid, 0) };
        if ret < 0 {
            return Err(map_esrch(io::Error::last_os_error()));
        }
        let raw = i32::try_from(ret).map_err(|_| io::Error::other("pidfd out of range"))?;
        // SAFETY: the kernel just returned `raw` as a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(PidFd { fd, pid })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `sig` through the pidfd: it reaches this process or nobody.
    pub fn send_signal(&self, sig: i32) -> io::Result<()> {
        // SAFETY: fd is a live pidfd owned by self; info is NULL (the kernel fills in a
        // default siginfo), flags 0.
        let ret = unsafe {
            libc::syscall(
                SYS_PIDFD_SEND_SIGNAL,
                self.fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if ret < 0 {
            return Err(map_esrch(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Frees the memory of a process that has SIGKILL pending, without waiting for it to
    /// be scheduled (5.15+). The kernel refuses processes without a pending SIGKILL.
    pub fn process_mrelease(&self) -> io::Result<()> {
        // SAFETY: fd is a live pidfd owned by self; flags must be 0.
        let ret = unsafe { libc::syscall(SYS_PROCESS_MRELEASE, self.fd.as_raw_fd(), 0) };
        if ret < 0 {
            return Err(map_esrch(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit (a pidfd polls readable on exit).
    /// Returns true if it exited.
    pub fn wait_exit(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        loop {
            // SAFETY: pfd is a valid, initialised pollfd on our stack and nfds is 1.
            let ret = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ret < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            return Ok(ret > 0);
        }
    }
}

fn map_esrch(err: io::Error) -> io::Error {
    if err.raw_os_error() == Some(libc::ESRCH) {
        io::Error::new(io::ErrorKind::NotFound, "no such process")
    } else {
        err
    }
}

/// Locks every page of the agent in memory, now and in the future, populated (no
/// `MCL_ONFAULT`): a page the agent touches for the first time during a rescue must not
/// fault and charge its memory cgroup, which may be the very cgroup that is stuck (a
/// sidecar sharing a pod's limit). Mappings created later are populated when created.
pub fn mlockall() -> io::Result<()> {
    // SAFETY: mlockall takes flags by value and touches no user memory.
    let ret = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes malloc serve every thread from one heap that never shrinks and never maps
/// large blocks on its own: call first thing in `main`, before any thread exists.
/// Together with [`reserve_heap`] and [`mlockall`], an allocation during a rescue reuses
/// locked, resident memory instead of faulting in new pages (a per-thread arena would
/// grow by fresh mappings, a large block would be a fresh mmap, a trim would give back
/// what the next episode needs again).
pub fn tune_malloc() {
    for (param, value) in [
        (libc::M_ARENA_MAX, 1),
        // Blocks up to 64 MiB come from the heap (the reserve), not from a new mmap.
        (libc::M_MMAP_THRESHOLD, 64 << 20),
        // Never give heap memory back: it is locked and will be needed again.
        (libc::M_TRIM_THRESHOLD, i32::MAX),
    ] {
        // SAFETY: mallopt takes two ints by value; glibc returns 0 for a parameter it
        // does not take, and nothing else changes.
        let _ = unsafe { libc::mallopt(param, value) };
    }
}

/// Grows the malloc heap by `bytes` and frees it again: with [`tune_malloc`] the memory
/// stays in the heap as free space, and [`mlockall`] then makes it resident.
pub fn reserve_heap(bytes: usize) {
    // Freed at once: the block stays in the heap as free space (no trim).
    let v = vec![0u8; bytes];
    std::hint::black_box(&v);
}

/// Stack size of every thread the agent starts (episode workers, keeper, shutdown,
/// holder, Docker client, audit and log writers, metrics): 64 KiB, 128 KiB in a debug
/// build. Under `mlockall` each stack is populated and locked in full when its thread
/// starts, so it is paid for whether used or not: the 16 workers alone would lock
/// 32 MiB at Rust's default of 2 MiB, and locked 4 MiB at the 256 KiB used before.
///
/// Measured as the deepest byte written (`/proc/PID/mem` of a running agent, 1000
/// watched cgroups, 4 stalls at once), release / debug build: an episode worker through
/// an exec hook, reclaim and a kill 12 / 22 KiB, through a raise and its journal line
/// 14 / 37 KiB; the keeper giving loans back 10 / 20 KiB; the Docker client 24 / 33 KiB
/// (a 16 KiB read buffer); the holder, the writers and the metrics threads under 8 KiB.
/// A panic that prints a symbolized backtrace (RUST_BACKTRACE=1) needs 16 to 32 KiB
/// more, a signal frame a few KiB (more with AVX-512 state). Nothing on these threads
/// recurses without bound: JSON from the Docker socket is skipped without recursion
/// (tested at 400 levels on this stack), policy files are parsed on the main thread,
/// whose stack grows on demand.
pub const THREAD_STACK: usize = if cfg!(debug_assertions) {
    128 * 1024
} else {
    64 * 1024
};

/// Grows the calling thread's stack by 256 KiB now (the main thread's stack grows on
/// demand; a deeper call during a rescue would fault in a new page).
#[inline(never)]
pub fn reserve_stack() {
    let buf = [0u8; 256 * 1024];
    std::hint::black_box(&buf);
}

/// Resident and locked memory of this process, in bytes (`VmRSS`, `VmLck` of
/// `/proc/self/status`).
pub fn memory_footprint(proc_root: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(proc_root.join("self/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmLck:")?))
}

/// A descriptor that becomes readable when one of `signals` arrives (read 8 bytes to
/// reset it). The handler only adds to an eventfd's counter: unlike a write to a socket
/// or a pipe, that needs no kernel memory, so the wakeup is not lost while the agent's
/// own cgroup is at its limit (a SIGTERM to an agent sharing a stuck cgroup was).
pub fn signal_eventfd(signals: &[i32]) -> io::Result<std::fs::File> {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map_err(io::Error::from)?;
    let file = std::sync::Arc::new(std::fs::File::from(OwnedFd::from(efd)));
    for &sig in signals {
        let f = file.clone();
        let handler = move || {
            use std::io::Write;
            let _ = (&*f).write(&1u64.to_ne_bytes());
        };
        // SAFETY: the handler only calls write(2) on an eventfd it owns through the Arc
        // (async-signal-safe; no allocation, no lock), and returns.
        unsafe { signal_hook::low_level::register(sig, handler) }?;
    }
    file.try_clone()
}

/// The `f_type` magic of the filesystem holding `path` (statfs(2)).
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: c is a valid NUL-terminated string and buf points to writable storage of
    // the right size for one statfs struct.
    let ret = unsafe { libc::statfs(c.as_ptr(), buf.as_mut_ptr()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs returned 0, so it initialised the whole struct.
    let st = unsafe { buf.assume_init() };
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

/// A stream connection to the unix socket at `path`, made within `timeout`. A plain
/// connect(2) waits for ever when the listener's backlog is full (an engine that stopped
/// accepting): the kernel bounds that wait by the socket's send timeout, set first here.
/// After `timeout`, `ErrorKind::WouldBlock` (EAGAIN).
pub fn connect_unix(path: &Path, timeout: Duration) -> io::Result<std::os::unix::net::UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or contains NUL",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    // SAFETY: socket takes its arguments by value and returns a new fd or -1.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned `raw` as a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let secs: libc::time_t = timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX);
    // Zero would mean no timeout at all: at least a microsecond.
    let micros = if secs == 0 {
        timeout.subsec_micros().max(1)
    } else {
        timeout.subsec_micros()
    };
    let tv = libc::timeval {
        tv_sec: secs,
        tv_usec: micros as libc::suseconds_t,
    };
    // SAFETY: fd is a live socket; tv is a timeval that outlives the call, and its size
    // is passed.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    loop {
        // SAFETY: fd is a live socket; addr is an initialised sockaddr_un that outlives
        // the call, and its size is passed.
        let ret = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if ret == 0 {
            return Ok(std::os::unix::net::UnixStream::from(fd));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The effective uid of the process at the other end of a connected unix socket, as the
/// kernel recorded it when that end called listen(2) or connect(2) (SO_PEERCRED).
pub fn peer_uid(stream: &std::os::unix::net::UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the fd is a live socket owned by `stream`; cred and len are writable and
    // outlive the call, and len holds cred's size.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// The PID of the calling process.
pub fn getpid() -> i32 {
    std::process::id() as i32
}

/// Whether processes orphaned below this one are handed to it: PID 1 of its PID
/// namespace (a container without `--init`), or a child subreaper.
pub fn gets_orphans() -> bool {
    if getpid() == 1 {
        return true;
    }
    let mut flag: libc::c_int = 0;
    // SAFETY: PR_GET_CHILD_SUBREAPER writes one int at the pointer given, on this stack.
    let ret = unsafe { libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut flag as *mut libc::c_int) };
    ret == 0 && flag != 0
}

/// The signal that interrupts a blocking call of one thread (see [`ThreadAlarm`]): a
/// real-time signal nothing else in the agent uses, with a handler that does nothing.
fn alarm_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

extern "C" fn ignore_alarm(_: libc::c_int) {}

/// Installs the no-op handler for [`alarm_signal`] once. No `SA_RESTART`: a call it
/// interrupts returns `EINTR` instead of resuming.
fn install_alarm_handler() -> io::Result<()> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    let res = INSTALLED.get_or_init(|| {
        // SAFETY: an all-zero sigaction is valid (empty mask, no flags); we then set a
        // handler that is an `extern "C" fn(c_int)` touching nothing, which is
        // async-signal-safe, and pass valid pointers to sigaction.
        let ret = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ignore_alarm as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(alarm_signal(), &sa, std::ptr::null_mut())
        };
        if ret < 0 {
            Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL))
        } else {
            Ok(())
        }
    });
    res.map_err(io::Error::from_raw_os_error)
}

/// A kernel timer that sends [`alarm_signal`] to the calling thread after a delay and
/// then every `repeat`, until dropped: a blocking syscall that checks for pending
/// signals (v1 `memory.force_empty` does, between reclaim passes) returns `EINTR`. The
/// repeat covers a first signal that lands just before the call starts. Create it, make
/// the call on the same thread, drop it.
pub struct ThreadAlarm {
    timer: libc::timer_t,
}

impl ThreadAlarm {
    pub fn arm(after: Duration, repeat: Duration) -> io::Result<ThreadAlarm> {
        install_alarm_handler()?;
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        // SAFETY: an all-zero sigevent is a valid starting value; the fields set below
        // ask for SIGEV_THREAD_ID delivery of our signal to this thread.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = alarm_signal();
        sev.sigev_notify_thread_id = tid;
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: sev and timer are valid for the duration of the call; the kernel
        // writes the new timer's id into `timer`.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let alarm = ThreadAlarm { timer };
        let ts = |d: Duration| libc::timespec {
            tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(d.subsec_nanos()),
        };
        // A zero it_value would disarm the timer: fire after at least 1 ns.
        let spec = libc::itimerspec {
            it_value: ts(after.max(Duration::from_nanos(1))),
            it_interval: ts(repeat.max(Duration::from_millis(1))),
        };
        // SAFETY: the timer was just created and is owned by `alarm`; spec is valid and
        // the old value is not asked for.
        if unsafe { libc::timer_settime(alarm.timer, 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(alarm)
    }
}

impl Drop for ThreadAlarm {
    fn drop(&mut self) {
        // SAFETY: the timer was created by `arm` and is deleted exactly once, here. A
        // signal already pending is harmless: its handler does nothing.
        unsafe { libc::timer_delete(self.timer) };
    }
}

pub const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfd_of_self_opens_and_exited_child_reports_exit() {
        let me = PidFd::open(getpid()).expect("pidfd_open self");
        assert_eq!(me.pid(), getpid());
        assert!(!me.wait_exit(Duration::from_millis(1)).unwrap());

        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pfd = PidFd::open(child.id() as i32).unwrap();
        pfd.send_signal(libc::SIGKILL).unwrap();
        assert!(pfd.wait_exit(Duration::from_secs(5)).unwrap());
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn pidfd_open_of_missing_pid_is_not_found() {
        // PIDs above pid_max (4194304 at most) never exist.
        let err = PidFd::open(i32::MAX).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn signal_eventfd_becomes_readable_on_the_signal() {
        use std::io::Read;
        let mut f = signal_eventfd(&[libc::SIGUSR2]).unwrap();
        let mut buf = [0u8; 8];
        assert!(f.read(&mut buf).is_err(), "readable before any signal");
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGUSR2).unwrap();
        assert_eq!(f.read(&mut buf).unwrap(), 8);
        assert_eq!(u64::from_ne_bytes(buf), 1);
    }

    #[test]
    fn thread_alarm_interrupts_a_blocking_call_of_this_thread() {
        // A read from an empty pipe blocks until the alarm interrupts it.
        let (r, _w) = nix::unistd::pipe().unwrap();
        let mut f = std::fs::File::from(r);
        let start = std::time::Instant::now();
        let res = {
            let _alarm =
                ThreadAlarm::arm(Duration::from_millis(50), Duration::from_millis(20)).unwrap();
            std::io::Read::read(&mut f, &mut [0u8; 1])
        };
        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::Interrupted);
        assert!(start.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn fs_magic_of_proc() {
        const PROC_SUPER_MAGIC: i64 = 0x9fa0;
        assert_eq!(fs_magic(Path::new("/proc")).unwrap(), PROC_SUPER_MAGIC);
    }
}
