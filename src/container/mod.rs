//! Containers: which container a memory cgroup is ([`id`], from the path alone) and,
//! where the Docker Engine API answers ([`docker`] over [`http`]), its name, labels and
//! image, kept in [`cache`] by a background thread: what policies match on with
//! `container_name`, `label` and `image`, and what audit lines carry.

pub mod cache;
pub mod docker;
pub mod http;
pub mod id;

pub use cache::Containers;
pub use docker::Meta;
pub use id::{docker_id, identify, Identity, Runtime};
