//! Containers: which container a memory cgroup is ([`id`], from the path alone) and,
//! where the Docker Engine API answers, its name, labels and image (what policies
//! match on with `container_name`, `label` and `image`, and what audit lines carry).

pub mod id;

pub use id::{identify, Identity, Runtime};
