//! oomwake: a userspace OOM handler for memory cgroups whose kernel OOM killer is
//! disabled. Data flows one way: kernel event ([`watch`]) -> episode ([`episode`]) ->
//! policy steps ([`policy`]) -> actions ([`action`]) -> audit log ([`audit`]).

pub mod cgroup;
pub mod policy;
pub mod sys;
pub mod audit;
pub mod journal;
pub mod victim;
pub mod action;
pub mod agent;
pub mod config;
pub mod episode;
pub mod metrics;
pub mod watch;
pub mod hog;
pub mod explain;
pub mod demo;
