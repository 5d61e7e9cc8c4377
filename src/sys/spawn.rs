//! Starting a hook without copying the agent: `clone(CLONE_VM | CLONE_VFORK)` on a stack
//! taken from the agent's locked heap, then `execve`.
//!
//! `fork` (what `std::process::Command` does once a `pre_exec` closure is set) marks
//! every private page of the agent copy-on-write, in the agent as well as in the child.
//! Until each page has been written once more, a write by the agent needs a fault and,
//! when the page is still shared or its reference count is raised for a moment, a fresh
//! page charged to the agent's memory cgroup. For an agent inside the cgroup it rescues
//! (issue 6.11) that cgroup is at its limit: a write from user mode parks the thread in
//! the OOM wait, and a write by the kernel on the agent's behalf (the restartable-sequence
//! area on the way back to user mode, a signal frame) cannot wait and kills the agent
//! with SIGSEGV. That was seen, about once in six test runs under load. A fork that
//! fails for want of memory (the usual outcome at the wall) has already write-protected
//! the pages it got through.
//!
//! Here the child shares the agent's memory until `execve` and the agent's thread waits
//! (the kernel's vfork wait) until then: no page is write-protected, nothing is copied.
//! The child runs on a stack the parent has touched, in memory that `mlockall` keeps
//! resident, so it does not fault before `execve` either; what `execve` needs comes from
//! the kernel, which fails it with ENOMEM instead of waiting when the cgroup is full.
//! `posix_spawn` does the same but on a stack it maps itself: in a full cgroup that
//! mapping is not populated, the child parks in the OOM wait at its first write, and the
//! episode's thread waits for it forever.
//!
//! The child, sharing the parent's memory, only makes system calls: it resets every
//! signal (caught or ignored) to its default, moves into a process group of its own,
//! writes 0 to its `oom_score_adj`, sets the soft open-file limit the agent started
//! with, sets up its three standard descriptors, unblocks signals and calls `execve`.
//! A file the kernel refuses with ENOEXEC (a script
//! without `#!`) is handed to `/bin/sh`, as `execvp` does and as the fork-based hooks did
//! (std's `Command` ends in `execvp`). A failure is written into a slot the parent reads
//! once the child has gone or exec'd.
//!
//! A program given as a judged directory and a name in it (`program_at`: the hook's
//! directory, whose owner and mode were judged on that descriptor, so nobody but root
//! can change what the name holds) is executed with `execveat(dir, name, 0)`, never
//! again through its path from `/`. The process is named
//! after the program (`comm`), as for `execve`; executing the file's own descriptor
//! (`AT_EMPTY_PATH`) named it after the descriptor, "3", on kernels before 6.x
//! (Debian 12's 6.1 among them). For a script (`#!`) the kernel hands the interpreter
//! `/dev/fd/D/NAME`, which it must be able to open after the exec: the child (whose
//! descriptor table is its own copy) clears close-on-exec on the directory's
//! descriptor first, or the exec fails with ENOENT. For a binary it stays close-on-exec.
//! The ENOEXEC fallback gives the shell `/dev/fd/D/NAME` the same way.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};

/// The child's stack: it only calls into libc's thin system-call wrappers.
const CHILD_STACK: usize = 32 * 1024;

/// The shell a file without `#!` is handed to (glibc's `_PATH_BSHELL`).
const SH: &std::ffi::CStr = c"/bin/sh";

/// What to start: an absolute program path, its arguments (the first one is `argv[0]`),
/// its whole environment, and the descriptors that become its stdin, stdout and stderr.
pub struct SpawnRequest<'a> {
    /// The program's path: what `execve` runs when `program_fd` is None, and what
    /// messages name.
    pub program: &'a OsStr,
    /// The program as judged: the directory its path names it in, opened and judged,
    /// and its name there (the file, or a link the caller judged with what it leads
    /// to). Executed as `execveat(dir, name, 0)`, never again through its path from `/`:
    /// the directory is one nobody but root may change. (Not `execveat(fd, "", AT_EMPTY_PATH)` on the file itself: before Linux
    /// 6.x the kernel then names the process after the descriptor, `comm` "3", in `ps`,
    /// `top` and the journal.)
    pub program_at: Option<(BorrowedFd<'a>, &'a OsStr)>,
    /// The program file, opened for reading (its first two bytes tell a `#!` script).
    pub program_fd: Option<BorrowedFd<'a>>,
    pub args: Vec<&'a OsStr>,
    pub env: Vec<(&'a OsStr, &'a OsStr)>,
    pub stdio: [BorrowedFd<'a>; 3],
    /// The child's own `/proc/self/oom_score_adj` (under the agent's proc root).
    pub oom_score_adj: &'a OsStr,
    /// The soft RLIMIT_NOFILE the child gets (clamped to the hard limit), or None to
    /// keep the agent's: the agent raises its own to the hard limit at start (one
    /// descriptor per watched cgroup), which a hook must not inherit (`select(2)` and
    /// programs that walk every descriptor up to the limit break or crawl).
    pub nofile_soft: Option<u64>,
}

/// The soft RLIMIT_NOFILE the agent started with, before it raised its own (see
/// [`remember_nofile_soft`]); `u64::MAX` while none was remembered.
static START_NOFILE_SOFT: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(u64::MAX);

/// Remembers the soft RLIMIT_NOFILE the agent started with, before it raises it: what
/// hooks get ([`SpawnRequest::nofile_soft`]). The first call wins.
pub fn remember_nofile_soft(soft: u64) {
    let _ = START_NOFILE_SOFT.compare_exchange(
        u64::MAX,
        soft,
        std::sync::atomic::Ordering::SeqCst,
        std::sync::atomic::Ordering::SeqCst,
    );
}

/// The soft RLIMIT_NOFILE the agent started with, if it was remembered.
pub fn start_nofile_soft() -> Option<u64> {
    match START_NOFILE_SOFT.load(std::sync::atomic::Ordering::SeqCst) {
        u64::MAX => None,
        v => Some(v),
    }
}

/// A process started by [`spawn`]: the leader of its own process group, not yet reaped.
/// Dropping it unreaped kills and reaps it.
#[derive(Debug)]
pub struct Spawned {
    pid: i32,
    reaped: bool,
}

/// Hooks started and not reaped yet: their [`Spawned`] reaps them (and reads their
/// exit status), never [`reap_orphans`].
static HOOKS: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

/// Held shared from before a hook's clone until its PID is in [`HOOKS`], and taken
/// exclusively (without waiting) by [`reap_orphans`]: a hook that ends at once is never
/// taken for an orphan.
static SPAWNING: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn hooks() -> std::sync::MutexGuard<'static, Vec<i32>> {
    HOOKS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reaps the agent's children that have ended and are not hooks a [`Spawned`] still
/// owns: the processes a hook left behind, which the kernel hands to the agent when it
/// is PID 1 of a PID namespace (a container started without `--init`) or a child
/// subreaper. Without it they stay zombies for good. Never waits; returns the PIDs
/// reaped. It looks with `waitid(WNOWAIT)`, which shows one ended child at a time: when
/// that one is a hook whose episode has not read its status yet, the rest wait for the
/// next call. The agent's only other children would be `std::process::Command` ones,
/// which it does not start while it runs (`oomwake demo` is not the agent).
pub fn reap_orphans() -> Vec<i32> {
    reap_where(libc::P_ALL, 0)
}

fn reap_where(idtype: libc::idtype_t, id: libc::id_t) -> Vec<i32> {
    let mut reaped = Vec::new();
    // A spawn between its clone and its registration: next time.
    let Ok(_gate) = SPAWNING.try_write() else {
        return reaped;
    };
    loop {
        // SAFETY: an all-zero siginfo_t is valid; waitid writes into it only.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` lives on this stack; WNOWAIT leaves the child as it is.
        let ret = unsafe {
            libc::waitid(
                idtype,
                id,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if ret < 0 {
            // ECHILD (no child at all), or EINTR: nothing more now.
            break;
        }
        // SAFETY: waitid filled in a SIGCHLD siginfo (si_pid 0: no child has ended).
        let pid = unsafe { info.si_pid() };
        if pid <= 0 || hooks().contains(&pid) {
            break;
        }
        let mut status = 0;
        // SAFETY: reaps exactly this ended child; status is on this stack.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != pid {
            break;
        }
        reaped.push(pid);
    }
    reaped
}

/// Everything the child reads, prepared before the clone: the child must not allocate.
struct ChildArgs {
    program: *const libc::c_char,
    /// The program's directory descriptor (above 2), or -1: run `program` by path.
    program_dir: libc::c_int,
    /// The program's name in `program_dir`.
    program_name: *const libc::c_char,
    /// The program starts with `#!`: the directory's descriptor must survive the exec
    /// (the interpreter opens `/dev/fd/D/NAME`).
    script: bool,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// `/bin/sh`, the program, then `argv[1..]`: the ENOEXEC fallback (as `execvp`).
    sh_argv: *const *const libc::c_char,
    stdio: [libc::c_int; 3],
    oom_score_adj: *const libc::c_char,
    /// The RLIMIT_NOFILE to set in the child (soft, hard), or None.
    nofile: Option<libc::rlimit64>,
    /// errno of the step that failed in the child, 0 while none did.
    error: AtomicI32,
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{:?} contains a NUL byte", s),
        )
    })
}

/// Starts `req` (see the module documentation) and returns once the child has called
/// `execve` successfully, or with the error of the step that failed (the child is then
/// reaped already).
pub fn spawn(req: &SpawnRequest<'_>) -> io::Result<Spawned> {
    let program = cstring(req.program)?;
    let args = req
        .args
        .iter()
        .map(|a| cstring(a))
        .collect::<io::Result<Vec<_>>>()?;
    let env = req
        .env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            cstring(OsStr::from_bytes(&kv))
        })
        .collect::<io::Result<Vec<_>>>()?;
    let adj = cstring(req.oom_score_adj)?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    // Above 0, 1 and 2, which the child replaces: a copy the child execs from, closed
    // here when the spawn is over.
    let program_dir = match req.program_at {
        Some((dir, _)) => Some(dir.try_clone_to_owned().and_then(|fd| {
            // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new one or -1.
            let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
            if high < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fcntl has just returned this descriptor; nothing else owns it.
            Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(high) })
        })?),
        None => None,
    };
    let program_name = match req.program_at {
        Some((_, name)) => cstring(name)?,
        None => CString::default(),
    };
    let script = req.program_fd.is_some_and(|fd| {
        let mut head = [0u8; 2];
        // SAFETY: pread writes at most 2 bytes into `head`, on this stack.
        let n = unsafe { libc::pread(fd.as_raw_fd(), head.as_mut_ptr().cast(), 2, 0) };
        n == 2 && head == *b"#!"
    });
    // What the shell of the ENOEXEC fallback reads: the file in the judged directory.
    let fd_path = match &program_dir {
        Some(fd) => {
            let mut p = format!("/dev/fd/{}/", fd.as_raw_fd()).into_bytes();
            p.extend_from_slice(program_name.as_bytes());
            CString::new(p)?
        }
        None => program.clone(),
    };
    let mut sh_argv: Vec<*const libc::c_char> = vec![SH.as_ptr(), fd_path.as_ptr()];
    sh_argv.extend(args.iter().skip(1).map(|a| a.as_ptr()));
    sh_argv.push(std::ptr::null());
    let child = ChildArgs {
        program: program.as_ptr(),
        program_dir: program_dir.as_ref().map_or(-1, |fd| fd.as_raw_fd()),
        program_name: program_name.as_ptr(),
        script,
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        sh_argv: sh_argv.as_ptr(),
        stdio: req.stdio.map(|fd| fd.as_raw_fd()),
        oom_score_adj: adj.as_ptr(),
        nofile: req.nofile_soft.and_then(nofile_for_child),
        error: AtomicI32::new(0),
    };

    // Written page by page here, so that the child never takes the first fault on it.
    let mut stack = vec![0u8; CHILD_STACK];
    for page in stack.chunks_mut(4096) {
        page[0] = 1;
    }
    std::hint::black_box(&mut stack);
    // The stack grows down from its end, 16-byte aligned as the ABI wants.
    let top = {
        let end = stack.as_mut_ptr().wrapping_add(CHILD_STACK) as usize;
        (end & !15) as *mut libc::c_void
    };

    // No signal handler may run in the child while it shares our memory: block every
    // signal on this thread across the clone (the child starts with this mask and clears
    // it just before execve, after resetting the handlers).
    // SAFETY: all-zero sigset_t values are valid; sigfillset and pthread_sigmask only
    // write into the sets we pass, which live on this stack.
    let old = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    };
    // Until the child's PID is registered, the orphan reaper keeps off.
    let gate = SPAWNING.read().unwrap_or_else(|p| p.into_inner());
    // SAFETY: `child_main` only makes async-signal-safe calls on the pointers in
    // `child`, all of which (and the CStrings and arrays they point into) outlive the
    // call: with CLONE_VFORK this thread does not return from clone before the child
    // has exec'd or exited, so `child`, `stack` and the strings are still alive while
    // it runs. `top` is the aligned end of `stack`, which nothing else uses.
    let pid = unsafe {
        libc::clone(
            child_main,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &child as *const ChildArgs as *mut libc::c_void,
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: restores the mask saved above; `old` is a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    if pid < 0 {
        return Err(clone_error);
    }
    hooks().push(pid);
    drop(gate);
    let mut spawned = Spawned { pid, reaped: false };
    match child.error.load(Ordering::SeqCst) {
        0 => Ok(spawned),
        errno => {
            // The child has exited already (127): reap it.
            let _ = spawned.wait();
            Err(io::Error::from_raw_os_error(errno))
        }
    }
}

/// The RLIMIT_NOFILE a child started with soft limit `soft` gets: `soft` (at most the
/// agent's hard limit) and the agent's hard limit. None when it is what the agent has.
fn nofile_for_child(soft: u64) -> Option<libc::rlimit64> {
    // SAFETY: an all-zero rlimit64 is valid; prlimit64 writes only into `cur`.
    let mut cur: libc::rlimit64 = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this process; a NULL new limit only reads.
    let ret = unsafe { libc::prlimit64(0, libc::RLIMIT_NOFILE, std::ptr::null(), &mut cur) };
    if ret != 0 {
        return None;
    }
    let soft = soft.min(cur.rlim_max);
    (soft != cur.rlim_cur).then_some(libc::rlimit64 {
        rlim_cur: soft,
        rlim_max: cur.rlim_max,
    })
}

/// The child's whole life before `execve`. It shares the parent's memory, and also the
/// parent thread's thread-local storage: without CLONE_SETTLS its thread pointer is the
/// parent thread's, so `errno` (and anything else thread-local a libc function touches)
/// is the parent thread's. That is sound only because the parent thread is suspended
/// until the child has exec'd or exited (CLONE_VFORK) and reads nothing the child may
/// have written but the `error` slot (it reads errno only when clone itself failed, when
/// no child ran). So the child makes only system calls, through wrappers that touch
/// their arguments, the stack and errno: raw `syscall(2)` where glibc's wrapper is a
/// cancellation point (open, write, close: those update the cancellation state in the
/// parent thread's `struct pthread`, as glibc's own posix_spawn avoids by using raw
/// system calls; rt_sigaction and prlimit64 are raw too), and glibc's plain wrappers for
/// the rest (setpgid, fcntl with F_DUPFD_CLOEXEC/F_SETFD, dup2, sigprocmask, execve),
/// none of which is a cancellation point.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` the parent passed to clone, alive until we exec
    // or exit (CLONE_VFORK).
    let a = unsafe { &*(arg as *const ChildArgs) };
    /// Hands errno to the parent and ends the child.
    fn fail(a: &ChildArgs) -> ! {
        // SAFETY: reading errno (the suspended parent thread's, see above) has no effect.
        let errno = unsafe { *libc::__errno_location() };
        a.error
            .store(if errno == 0 { libc::EIO } else { errno }, Ordering::SeqCst);
        // SAFETY: _exit ends this process at once, without running atexit handlers or
        // flushing stdio buffers that belong to the parent.
        unsafe { libc::_exit(127) }
    }
    // SAFETY: every call below is a system call (raw, or through a glibc wrapper that is
    // not a cancellation point: see the function's doc), called with pointers to values
    // on this stack or prepared by the parent, which stay valid while it is suspended.
    unsafe {
        // Handlers installed by the agent would run here on the agent's memory, and a
        // hook starts with every signal at its default: caught ones (the agent's), and
        // ignored ones too, which exec would keep: SIGPIPE (ignored by the Rust runtime,
        // and by systemd for services), and whatever the agent's own parent ignored
        // (`nohup`, a shell's background job; a test harness here ignored signal 32).
        // Raw rt_sigaction: glibc's wrapper refuses 32 and 33 (its own). An all-zero
        // kernel sigaction is SIG_DFL with no flags and an empty mask on every
        // architecture's layout (at most four words).
        let dfl = [0u64; 4];
        for sig in 1..libc::SIGRTMAX() + 1 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                dfl.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8usize,
            );
        }
        // A group of its own, so that a timeout kills what the hook started too.
        if libc::setpgid(0, 0) != 0 {
            fail(a);
        }
        // Not the agent's -1000: the hook and whatever it forks can be OOM-killed.
        let fd = libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            a.oom_score_adj,
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            fail(a);
        }
        if libc::syscall(libc::SYS_write, fd, b"0".as_ptr(), 1usize) != 1 {
            fail(a);
        }
        libc::syscall(libc::SYS_close, fd);
        // The open-file limit the agent started with, not the one it raised for itself.
        // Limits live in the signal struct, which a clone without CLONE_THREAD does not
        // share: this changes the child's alone (tested). Lowering a soft limit needs no
        // privilege; should it fail, the hook runs with the agent's.
        if let Some(lim) = &a.nofile {
            libc::syscall(
                libc::SYS_prlimit64,
                0,
                libc::RLIMIT_NOFILE,
                lim as *const libc::rlimit64,
                std::ptr::null_mut::<libc::rlimit64>(),
            );
        }
        // First copy every source above 2, then put the copies in place: a source that
        // is itself 0, 1 or 2 is not overwritten before it is used.
        let mut high = [-1; 3];
        for (slot, &fd) in high.iter_mut().zip(a.stdio.iter()) {
            *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3);
            if *slot < 0 {
                fail(a);
            }
        }
        for (target, &fd) in (0..).zip(high.iter()) {
            // dup2 leaves close-on-exec off on the new descriptor.
            if libc::dup2(fd, target) < 0 {
                fail(a);
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        if a.program_dir >= 0 {
            if a.script && libc::fcntl(a.program_dir, libc::F_SETFD, 0) < 0 {
                fail(a);
            }
            libc::syscall(
                libc::SYS_execveat,
                a.program_dir,
                a.program_name,
                a.argv,
                a.envp,
                0,
            );
            if *libc::__errno_location() == libc::ENOEXEC {
                // The shell opens /dev/fd/D/NAME: kept open across its exec.
                libc::fcntl(a.program_dir, libc::F_SETFD, 0);
            }
        } else {
            libc::execve(a.program, a.argv, a.envp);
        }
        if *libc::__errno_location() == libc::ENOEXEC {
            // Not a format the kernel runs: a script without `#!`, for the shell, as
            // execvp does. Should the shell fail too, the hook's own ENOEXEC is reported.
            libc::execve(SH.as_ptr(), a.sh_argv, a.envp);
            *libc::__errno_location() = libc::ENOEXEC;
        }
        fail(a)
    }
}

impl Spawned {
    /// The child's PID, which is also its process group's id.
    pub fn id(&self) -> i32 {
        self.pid
    }

    fn waitpid(&mut self, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
        if self.reaped {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "already reaped",
            ));
        }
        let mut status = 0;
        loop {
            // SAFETY: status is a valid int on this stack; pid is our own child.
            let ret = unsafe { libc::waitpid(self.pid, &mut status, flags) };
            if ret < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if ret == 0 {
                return Ok(None);
            }
            self.reaped = true;
            hooks().retain(|&p| p != self.pid);
            return Ok(Some(ExitStatus::from_raw(status)));
        }
    }

    /// The exit status if the child has ended, without waiting.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.waitpid(libc::WNOHANG)
    }

    /// Waits for the child to end and reaps it.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        self.waitpid(0)?
            .ok_or_else(|| io::Error::other("waitpid returned no child"))
    }

    /// SIGKILL to the child itself. Unreaped, its PID cannot have been reused.
    pub fn kill(&self) -> io::Result<()> {
        if self.reaped {
            return Ok(());
        }
        // SAFETY: kill takes a pid and a signal by value.
        if unsafe { libc::kill(self.pid, libc::SIGKILL) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.kill();
            let _ = self.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsFd;

    use super::*;

    fn devnull() -> std::fs::File {
        std::fs::File::open("/dev/null").unwrap()
    }

    #[test]
    fn runs_the_program_with_its_args_env_and_descriptors() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let null = devnull();
        let adj = std::path::Path::new("/proc/self/oom_score_adj");
        let req = SpawnRequest {
            program: OsStr::new("/bin/sh"),
            program_at: None,
            program_fd: None,
            args: vec![
                OsStr::new("sh"),
                OsStr::new("-c"),
                OsStr::new("echo \"$0 $1 $X\"; cat /proc/self/oom_score_adj >&2; exit 3"),
                OsStr::new("zero"),
                OsStr::new("one"),
            ],
            env: vec![(OsStr::new("X"), OsStr::new("ex"))],
            stdio: [null.as_fd(), w.as_fd(), w.as_fd()],
            oom_score_adj: adj.as_os_str(),
            nofile_soft: None,
        };
        let mut child = spawn(&req).unwrap();
        drop(req);
        drop(w);
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        assert_eq!(out, "zero one ex\n0\n");
        assert_eq!(child.wait().unwrap().code(), Some(3));
    }

    /// The child gets the soft open-file limit it is given (the agent's at start), and
    /// the agent keeps its own: limits are not shared by a clone without CLONE_THREAD.
    #[test]
    fn the_child_gets_the_given_open_file_limit_and_default_signals_and_the_parent_keeps_its_own() {
        use nix::sys::resource::{getrlimit, Resource};
        let before = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let want = before.0.min(before.1).min(777);
        assert!(want > 3, "soft limit {before:?} too low for the test");
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let null = devnull();
        let adj = std::path::Path::new("/proc/self/oom_score_adj");
        let req = SpawnRequest {
            program: OsStr::new("/bin/sh"),
            program_at: None,
            program_fd: None,
            args: vec![
                OsStr::new("sh"),
                OsStr::new("-c"),
                OsStr::new(
                    "echo $(ulimit -Sn) $(ulimit -Hn); exec grep -E '^Sig(Blk|Ign)' /proc/self/status",
                ),
            ],
            env: vec![],
            stdio: [null.as_fd(), w.as_fd(), w.as_fd()],
            oom_score_adj: adj.as_os_str(),
            nofile_soft: Some(want),
        };
        let mut child = spawn(&req).unwrap();
        drop(req);
        drop(w);
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(0));
        // Nothing blocked or ignored either, though this process ignores SIGPIPE (the
        // Rust runtime does).
        assert_eq!(
            out,
            format!(
                "{want} {}\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n",
                before.1
            )
        );
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), before);
    }

    fn zombie(pid: i32) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
    }

    fn until_zombie(pid: i32) {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !zombie(pid) {
            assert!(std::time::Instant::now() < end, "{pid} never ended");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// The orphan reaper takes an ended child that is not a hook, and leaves an ended
    /// hook to its `Spawned`, whose exit status stays readable. (Each child leads a
    /// process group of its own, which the reaper is told to look in: other tests'
    /// children are not touched.)
    #[test]
    fn the_reaper_leaves_an_ended_hook_to_its_owner_and_reaps_other_children() {
        let null = devnull();
        let adj = std::path::Path::new("/proc/self/oom_score_adj");
        let req = SpawnRequest {
            program: OsStr::new("/bin/sh"),
            program_at: None,
            program_fd: None,
            args: vec![OsStr::new("sh"), OsStr::new("-c"), OsStr::new("exit 7")],
            env: vec![],
            stdio: [null.as_fd(), null.as_fd(), null.as_fd()],
            oom_score_adj: adj.as_os_str(),
            nofile_soft: None,
        };
        let mut hook = spawn(&req).unwrap();
        until_zombie(hook.id());
        assert!(reap_where(libc::P_PGID, hook.id() as libc::id_t).is_empty());
        assert_eq!(hook.wait().unwrap().code(), Some(7));
        assert!(
            !hooks().contains(&hook.id()),
            "still registered once reaped"
        );

        use std::os::unix::process::CommandExt;
        // Reaped below by the reaper, not by a wait of its own.
        #[allow(clippy::zombie_processes)]
        let other = std::process::Command::new("/bin/true")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = other.id() as i32;
        until_zombie(pid);
        assert_eq!(reap_where(libc::P_PGID, pid as libc::id_t), vec![pid]);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn a_program_that_cannot_be_executed_is_an_error_and_leaves_no_child() {
        let null = devnull();
        let adj = std::path::Path::new("/proc/self/oom_score_adj");
        let req = SpawnRequest {
            program: OsStr::new("/nonexistent/hook"),
            program_at: None,
            program_fd: None,
            args: vec![OsStr::new("hook")],
            env: vec![],
            stdio: [null.as_fd(), null.as_fd(), null.as_fd()],
            oom_score_adj: adj.as_os_str(),
            nofile_soft: None,
        };
        let err = spawn(&req).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        // Reaped already: this thread (the test's own) has no child left, not even a
        // zombie.
        let children = std::fs::read_to_string("/proc/thread-self/children").unwrap();
        assert_eq!(children.trim(), "", "a child was left behind");
    }

    #[test]
    fn a_script_without_a_shebang_runs_under_sh_as_execvp_ran_it() {
        // The fork-based hooks ended in std's execvp, which hands a file the kernel
        // refuses with ENOEXEC to /bin/sh (argv: /bin/sh, the file, the rest): a hook
        // written without `#!` ran, and must still run.
        let t = tempfile::tempdir().unwrap();
        let script = t.path().join("hook");
        std::fs::write(&script, "echo \"$0 $1 $#\"; exit 4\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let null = devnull();
        let adj = std::path::Path::new("/proc/self/oom_score_adj");
        let req = SpawnRequest {
            program: script.as_os_str(),
            program_at: None,
            program_fd: None,
            args: vec![OsStr::new("hook"), OsStr::new("one")],
            env: vec![],
            stdio: [null.as_fd(), w.as_fd(), null.as_fd()],
            oom_score_adj: adj.as_os_str(),
            nofile_soft: None,
        };
        let mut child = spawn(&req).expect("a script without #! did not start");
        drop(req);
        drop(w);
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        assert_eq!(out, format!("{} one 1\n", script.display()));
        assert_eq!(child.wait().unwrap().code(), Some(4));
    }

    #[test]
    fn an_oom_score_adj_that_cannot_be_written_stops_the_spawn() {
        let null = devnull();
        let req = SpawnRequest {
            program: OsStr::new("/bin/true"),
            program_at: None,
            program_fd: None,
            args: vec![OsStr::new("true")],
            env: vec![],
            stdio: [null.as_fd(), null.as_fd(), null.as_fd()],
            oom_score_adj: OsStr::new("/nonexistent/oom_score_adj"),
            nofile_soft: None,
        };
        assert_eq!(spawn(&req).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn the_child_leads_its_own_group_and_is_killed_and_reaped_on_drop() {
        let null = devnull();
        let adj = std::path::Path::new("/proc/self/oom_score_adj");
        let req = SpawnRequest {
            program: OsStr::new("/bin/sleep"),
            program_at: None,
            program_fd: None,
            args: vec![OsStr::new("sleep"), OsStr::new("30")],
            env: vec![],
            stdio: [null.as_fd(), null.as_fd(), null.as_fd()],
            oom_score_adj: adj.as_os_str(),
            nofile_soft: None,
        };
        let child = spawn(&req).unwrap();
        let pid = child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        assert_eq!(fields[2], pid.to_string(), "pgrp: {stat}");
        drop(child);
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "the child outlived its handle"
        );
    }

    /// A program given as a judged directory and a name runs from that directory, not
    /// from what the path names now, and is named after itself (`comm`), not after a
    /// descriptor (as `execveat(fd, "", AT_EMPTY_PATH)` named it before Linux 6.x).
    #[test]
    fn a_program_given_as_its_directory_runs_from_it_under_its_own_name() {
        let t = tempfile::tempdir().unwrap();
        let write_hook = |dir: &std::path::Path, word: &str| {
            std::fs::create_dir_all(dir).unwrap();
            let hook = dir.join("hook");
            std::fs::write(
                &hook,
                format!("#!/bin/sh\necho {word} \"$1\" \"$(cat /proc/$$/comm)\"\n"),
            )
            .unwrap();
            std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            hook
        };
        let hook = write_hook(&t.path().join("bin"), "first");
        let dir = std::fs::File::open(t.path().join("bin")).unwrap();
        let file = std::fs::File::open(&hook).unwrap();
        // The path now names another directory with another hook.
        std::fs::rename(t.path().join("bin"), t.path().join("old")).unwrap();
        write_hook(&t.path().join("bin"), "second");
        let null = devnull();
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let adj = std::path::Path::new("/proc/self/oom_score_adj");
        let req = SpawnRequest {
            program: hook.as_os_str(),
            program_at: Some((dir.as_fd(), OsStr::new("hook"))),
            program_fd: Some(file.as_fd()),
            args: vec![OsStr::new("hook"), OsStr::new("one")],
            env: vec![],
            stdio: [null.as_fd(), w.as_fd(), null.as_fd()],
            oom_score_adj: adj.as_os_str(),
            nofile_soft: None,
        };
        let mut child = spawn(&req).expect("the judged hook did not start");
        drop(req);
        drop(w);
        assert!(child.wait().unwrap().success());
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        assert_eq!(out, "first one hook\n");
    }
}
