//! Integration tests. `cli` runs anywhere; `stalls`, `loans` and `episodes` need root
//! and the cgroup v1 memory hierarchy, and drive real processes into real OOM stalls;
//! `v2` needs a cgroup v2 memory hierarchy (the VM: `integration/vm/run.sh --v2`).

// Test helpers panic on setup failures by design: a broken fixture is a failed test.
#![allow(clippy::unwrap_used)]

mod actions_procs;
mod actions_reclaim;
mod audit_reopen;
mod cli;
mod common;
mod core_inside;
mod core_paths;
mod core_stderr;
mod demo;
mod docker;
mod docker_meta;
mod docker_names;
mod docker_pod;
mod docker_unknown;
mod doctor;
mod early;
mod episodes;
mod episodes_lifecycle;
mod episodes_subtree;
mod episodes_unresolved;
mod golang;
mod hooks;
mod kernel_oom;
mod kill_kit;
mod loans;
mod loans_failure;
mod metrics_scrape;
mod packaging;
mod pinned;
mod policy_cli;
mod policy_reload;
mod stalls;
mod v2;
