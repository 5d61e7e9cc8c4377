//! oomwake: a userspace OOM handler for memory cgroups whose kernel OOM killer is
//! disabled. Data flows one way: kernel event ([`watch`]) -> episode ([`episode`]) ->
//! policy steps ([`policy`]) -> actions ([`action`]) -> audit log ([`audit`]).

pub mod action;
pub mod agent;
pub mod armed;
pub mod audit;
pub mod cgroup;
pub mod config;
pub mod container;
pub mod demo;
pub mod dispatcher;
pub mod docs;
pub mod doctor;
pub mod early;
pub mod episode;
pub mod explain;
pub mod hog;
pub mod hold;
pub mod holder;
pub mod identity;
pub mod journal;
pub mod kmsg;
pub mod loan;
pub mod metrics;
pub mod moves;
pub mod notify;
pub mod perm;
pub mod pinned;
pub mod policy;
pub mod shared;
pub mod sys;
pub mod term;
pub mod victim;
pub mod watch;
