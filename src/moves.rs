//! The limits the agent moved, for the event loop: every memory limit the loan book
//! writes (a loan moves the wall, a restore moves it back) is reported here, and the loop,
//! woken by an eventfd, registers the early thresholds of those cgroups anew
//! ([`crate::early`]). A leaf below [`crate::shared`], which holds the one instance.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Mutex;

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::cgroup::CgroupPath;

/// Cgroups whose memory limit the agent moved since the loop last looked, and an
/// eventfd that wakes the loop when one is added (no allocation on the waking side
/// beyond the set's entry; the write of an eventfd needs no kernel memory).
pub struct Moves {
    set: Mutex<BTreeSet<CgroupPath>>,
    efd: EventFd,
}

impl Moves {
    pub fn new() -> std::io::Result<Moves> {
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(std::io::Error::from)?;
        Ok(Moves {
            set: Mutex::new(BTreeSet::new()),
            efd,
        })
    }

    /// The limit of `cg` moved: its threshold must follow.
    pub fn moved(&self, cg: &CgroupPath) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cg.clone());
        // EAGAIN only when the counter is about to overflow: the loop is woken anyway.
        let _ = self.efd.write(1);
    }

    /// For the loop: the cgroups moved since the last call (and the wakeup consumed).
    pub fn take(&self) -> Vec<CgroupPath> {
        let _ = self.efd.read();
        std::mem::take(&mut *self.set.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .collect()
    }
}

impl AsFd for Moves {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_wake_and_drain() {
        let m = Moves::new().unwrap();
        assert!(m.take().is_empty());
        m.moved(&CgroupPath::new("/a"));
        m.moved(&CgroupPath::new("/a"));
        m.moved(&CgroupPath::new("/b"));
        let mut pfd = [nix::poll::PollFd::new(
            m.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        assert_eq!(
            nix::poll::poll(&mut pfd, nix::poll::PollTimeout::ZERO).unwrap(),
            1
        );
        assert_eq!(m.take(), vec![CgroupPath::new("/a"), CgroupPath::new("/b")]);
        let mut pfd = [nix::poll::PollFd::new(
            m.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        assert_eq!(
            nix::poll::poll(&mut pfd, nix::poll::PollTimeout::ZERO).unwrap(),
            0
        );
    }
}
