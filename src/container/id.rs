//! Container identity from a cgroup path alone, no engine asked: which container (and
//! which Kubernetes pod) a memory cgroup belongs to, for every layout the container
//! engines use (see CONTEXT.md):
//!
//! | layout | example (last segments) |
//! | --- | --- |
//! | Docker, cgroupfs driver | `/docker/<id>`, or `<any parent>/<id>` with `--cgroup-parent` |
//! | Docker, systemd driver | `/system.slice/docker-<id>.scope` |
//! | containerd (CRI), systemd | `.../cri-containerd-<id>.scope` |
//! | CRI-O | `.../crio-<id>.scope` (systemd), `.../crio-<id>` (cgroupfs); `crio-conmon-<id>` is its monitor |
//! | Kubernetes, cgroupfs | `/kubepods/{burstable,besteffort}/pod<uid>/<id>`, guaranteed `/kubepods/pod<uid>/<id>` |
//! | Kubernetes, systemd | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/<scope>` |
//!
//! `<id>` is exactly 64 lowercase hex digits. Only the cgroup of the container itself
//! is a container (a cgroup below it is not): that is the one whose limit `docker run
//! -m` sets. A pod cgroup (where Kubernetes puts the pod's limit) carries the pod uid
//! and no container id. Anything else, look-alikes included, is no container: the
//! recognisers work on bytes, and a name that is not UTF-8 is never one.

use std::fmt;

/// Which engine's naming a container cgroup follows, as far as the path tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// `/docker/<id>` or `docker-<id>.scope`.
    Docker,
    /// `cri-containerd-<id>.scope`.
    Containerd,
    /// `crio-<id>[.scope]`.
    Crio,
    /// `crio-conmon-<id>[.scope]`: CRI-O's monitor process of container `<id>`, not the
    /// container itself (it never takes the container's metadata for matching).
    CrioConmon,
    /// A bare `<id>` below a parent that does not name the engine (`--cgroup-parent`,
    /// Kubernetes with the cgroupfs driver).
    Unknown,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::Crio => "crio",
            Runtime::CrioConmon => "crio-conmon",
            Runtime::Unknown => "unknown",
        }
    }
}

/// What the path says about a cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// 64 lowercase hex digits; `None` for a pod cgroup.
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
    /// The Kubernetes pod uid, with dashes (`kubepods-...-pod<a_b_c>.slice` gives `a-b-c`).
    pub pod_uid: Option<String>,
}

impl Identity {
    /// True if this is a container's own cgroup whose metadata (name, labels, image)
    /// describes it: not a pod, not CRI-O's monitor.
    pub fn is_container(&self) -> bool {
        self.container_id.is_some() && self.runtime != Some(Runtime::CrioConmon)
    }

    /// True when the Docker engine may be the one that made this container (its cgroup
    /// names Docker, or no engine at all); containerd's and CRI-O's containers it
    /// never describes.
    pub fn docker_may_know(&self) -> bool {
        self.is_container() && matches!(self.runtime, Some(Runtime::Docker | Runtime::Unknown))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.container_id, &self.pod_uid) {
            (Some(id), Some(pod)) => write!(f, "container {} in pod {pod}", short(id)),
            (Some(id), None) => write!(f, "container {}", short(id)),
            (None, Some(pod)) => write!(f, "pod {pod}"),
            (None, None) => write!(f, "no container"),
        }
    }
}

/// The first 12 digits, as `docker ps` shows an id.
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// True for exactly 64 lowercase hex digits (a full container id).
pub fn is_full_id(s: &[u8]) -> bool {
    s.len() == 64 && s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// The id of the container whose own cgroup `path` is, when Docker may describe it
/// (not containerd's or CRI-O's): the id to look its metadata up by.
pub fn docker_id(path: &[u8]) -> Option<String> {
    identify(path)
        .filter(Identity::docker_may_know)
        .and_then(|i| i.container_id)
}

/// The identity of the cgroup at `path` (raw bytes, `/`-separated, as in
/// /proc/PID/cgroup or [`crate::cgroup::CgroupPath::as_bytes`]). `None` when the path
/// names neither a container nor a pod.
pub fn identify(path: &[u8]) -> Option<Identity> {
    let segs: Vec<&[u8]> = path
        .split(|&c| c == b'/')
        .filter(|s| !s.is_empty())
        .collect();
    let (last, parents) = segs.split_last()?;
    let pod_of = |segs: &[&[u8]]| -> Option<String> {
        // The pod's own segment, somewhere below a `kubepods*` segment.
        let kube = segs.iter().position(|s| is_kubepods(s))?;
        segs[kube + 1..].iter().rev().find_map(|s| pod_uid(s))
    };
    if let Some((runtime, id)) = container_segment(last) {
        // A bare id needs a parent: `/<64 hex>` at the root is no engine's layout.
        if runtime == Runtime::Unknown && parents.is_empty() {
            return None;
        }
        let runtime = match (runtime, parents.last()) {
            (Runtime::Unknown, Some(&b"docker")) => Runtime::Docker,
            (r, _) => r,
        };
        return Some(Identity {
            container_id: Some(id),
            runtime: Some(runtime),
            pod_uid: pod_of(parents),
        });
    }
    // A pod's own cgroup.
    if parents.iter().any(|s| is_kubepods(s)) {
        if let Some(uid) = pod_uid(last) {
            return Some(Identity {
                container_id: None,
                runtime: None,
                pod_uid: Some(uid),
            });
        }
    }
    None
}

/// `<id>`, `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio[-conmon]-<id>[.scope]`.
fn container_segment(seg: &[u8]) -> Option<(Runtime, String)> {
    let text = std::str::from_utf8(seg).ok()?;
    if is_full_id(seg) {
        return Some((Runtime::Unknown, text.to_string()));
    }
    let (body, scope) = match text.strip_suffix(".scope") {
        Some(b) => (b, true),
        None => (text, false),
    };
    // Longest prefix first: `crio-conmon-` before `crio-`.
    const PREFIXES: [(&str, Runtime, bool); 4] = [
        ("docker-", Runtime::Docker, true),
        ("cri-containerd-", Runtime::Containerd, true),
        ("crio-conmon-", Runtime::CrioConmon, false),
        ("crio-", Runtime::Crio, false),
    ];
    for (prefix, runtime, needs_scope) in PREFIXES {
        if let Some(id) = body.strip_prefix(prefix) {
            if needs_scope && !scope {
                return None;
            }
            return is_full_id(id.as_bytes()).then(|| (runtime, id.to_string()));
        }
    }
    None
}

/// `kubepods`, `kubepods.slice`, `kubepods-burstable.slice`, `kubepods-besteffort` ...
fn is_kubepods(seg: &[u8]) -> bool {
    seg == b"kubepods"
        || seg == b"kubepods.slice"
        || (seg.starts_with(b"kubepods-") && !seg.windows(4).any(|w| w == b"-pod"))
}

/// The pod uid of a pod segment: `pod<uid>` (cgroupfs) or
/// `kubepods[-<qos>]-pod<uid with _ for ->.slice` (systemd).
fn pod_uid(seg: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(seg).ok()?;
    let raw = if let Some(rest) = text.strip_prefix("pod") {
        rest.to_string()
    } else {
        let body = text.strip_suffix(".slice")?;
        let rest = body
            .strip_prefix("kubepods-pod")
            .or_else(|| body.strip_prefix("kubepods-burstable-pod"))
            .or_else(|| body.strip_prefix("kubepods-besteffort-pod"))?;
        rest.replace('_', "-")
    };
    is_pod_uid(&raw).then_some(raw)
}

/// A UUID (8-4-4-4-12 lowercase hex), or the 32 hex digits kubelet gives static pods.
fn is_pod_uid(s: &str) -> bool {
    let hex = |p: &str| !p.is_empty() && p.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    if s.len() == 32 && hex(s) {
        return true;
    }
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts.iter().all(|p| hex(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081";
    const UID: &str = "0d4c8e6a-1b2c-4d5e-8f90-a1b2c3d4e5f6";

    fn id(p: &str) -> Option<Identity> {
        identify(p.as_bytes())
    }

    fn container(p: &str) -> (String, Runtime, Option<String>) {
        let i = id(p).unwrap_or_else(|| panic!("{p}: not recognised"));
        (
            i.container_id
                .unwrap_or_else(|| panic!("{p}: no container id")),
            i.runtime.unwrap_or_else(|| panic!("{p}: no runtime")),
            i.pod_uid,
        )
    }

    #[test]
    fn docker_cgroupfs_and_any_cgroup_parent() {
        assert_eq!(
            container(&format!("/docker/{ID}")),
            (ID.into(), Runtime::Docker, None)
        );
        // --cgroup-parent: any parent, at any depth.
        assert_eq!(
            container(&format!("/user.slice/oomwake-test/ct/{ID}")),
            (ID.into(), Runtime::Unknown, None)
        );
        assert_eq!(
            container(&format!("/mine/{ID}")),
            (ID.into(), Runtime::Unknown, None)
        );
        assert!(id(&format!("/docker/{ID}")).unwrap().is_container());
    }

    #[test]
    fn systemd_scopes_of_every_engine() {
        assert_eq!(
            container(&format!("/system.slice/docker-{ID}.scope")),
            (ID.into(), Runtime::Docker, None)
        );
        assert_eq!(
            container(&format!("/system.slice/cri-containerd-{ID}.scope")),
            (ID.into(), Runtime::Containerd, None)
        );
        assert_eq!(
            container(&format!("/machine.slice/crio-{ID}.scope")),
            (ID.into(), Runtime::Crio, None)
        );
        let conmon = id(&format!("/machine.slice/crio-conmon-{ID}.scope")).unwrap();
        assert_eq!(conmon.container_id.as_deref(), Some(ID));
        assert_eq!(conmon.runtime, Some(Runtime::CrioConmon));
        assert!(!conmon.is_container(), "conmon is not the container");
    }

    #[test]
    fn kubernetes_cgroupfs_every_qos_class() {
        for qos in ["/kubepods/burstable", "/kubepods/besteffort", "/kubepods"] {
            let pod = format!("{qos}/pod{UID}");
            assert_eq!(
                container(&format!("{pod}/{ID}")),
                (ID.into(), Runtime::Unknown, Some(UID.into())),
                "{qos}"
            );
            // CRI-O with the cgroupfs driver: no .scope.
            assert_eq!(
                container(&format!("{pod}/crio-{ID}")),
                (ID.into(), Runtime::Crio, Some(UID.into())),
                "{qos}"
            );
            let p = id(&pod).unwrap();
            assert_eq!(p.pod_uid.as_deref(), Some(UID));
            assert_eq!(p.container_id, None);
            assert!(!p.is_container());
        }
    }

    #[test]
    fn kubernetes_systemd_every_qos_class_and_engine() {
        let u = UID.replace('-', "_");
        for (qos, pod) in [
            (
                "/kubepods.slice/kubepods-burstable.slice",
                format!("kubepods-burstable-pod{u}.slice"),
            ),
            (
                "/kubepods.slice/kubepods-besteffort.slice",
                format!("kubepods-besteffort-pod{u}.slice"),
            ),
            ("/kubepods.slice", format!("kubepods-pod{u}.slice")),
        ] {
            for (scope, rt) in [
                ("docker", Runtime::Docker),
                ("cri-containerd", Runtime::Containerd),
                ("crio", Runtime::Crio),
            ] {
                assert_eq!(
                    container(&format!("{qos}/{pod}/{scope}-{ID}.scope")),
                    (ID.into(), rt, Some(UID.into())),
                    "{qos} {scope}"
                );
            }
            let p = id(&format!("{qos}/{pod}")).unwrap();
            assert_eq!(p.pod_uid.as_deref(), Some(UID), "{qos}");
            assert_eq!(p.container_id, None);
        }
    }

    #[test]
    fn static_pod_uids_are_32_hex() {
        let uid = "6d1d5c4e0b9a8f7e6d5c4b3a29180716";
        let i = id(&format!("/kubepods/burstable/pod{uid}/{ID}")).unwrap();
        assert_eq!(i.pod_uid.as_deref(), Some(uid));
    }

    #[test]
    fn look_alikes_are_not_containers() {
        let upper = ID.to_uppercase();
        let short63 = &ID[..63];
        let long65 = format!("{ID}0");
        let not_hex = format!("{}g", &ID[..63]);
        for p in [
            "/".to_string(),
            "/docker".to_string(),
            format!("/{ID}"),                     // a bare id needs a parent
            format!("/docker/{upper}"),           // ids are lowercase
            format!("/docker/{short63}"),         // too short
            format!("/docker/{long65}"),          // too long
            format!("/docker/{not_hex}"),         // not hex
            format!("/docker/{ID}/child"),        // below the container
            format!("/system.slice/docker-{ID}"), // no .scope
            format!("/system.slice/docker-{ID}.scope.bak"),
            format!("/system.slice/docker-{ID}.mount"),
            format!("/system.slice/var-lib-docker-containers-{ID}-mounts-shm.mount"),
            format!("/system.slice/podman-{ID}.scope"), // not an engine we know by name
            format!("/system.slice/docker-{short63}.scope"),
            format!("/system.slice/cri-containerd-{ID}"),
            format!("/system.slice/crio-{upper}.scope"),
            "/system.slice/docker.service".to_string(),
            "/system.slice/containerd.service".to_string(),
            format!("/mypods/pod{UID}"), // no kubepods above
            format!("/pod{UID}"),
            format!("/kubepods/burstable/pod{}", &UID[..35]), // truncated uid
            format!("/kubepods/burstable/pod{}", UID.to_uppercase()),
            "/kubepods/burstable/podfoo".to_string(),
            "/kubepods/burstable".to_string(),
            "/kubepods.slice/kubepods-burstable.slice".to_string(),
            format!("/kubepods.slice/kubepods-burstable-pod{UID}.scope"),
        ] {
            assert_eq!(id(&p), None, "{p} must not be recognised");
        }
    }

    #[test]
    fn non_utf8_segments_are_never_containers() {
        let mut p = b"/docker/".to_vec();
        p.extend_from_slice(&ID.as_bytes()[..63]);
        p.push(0xff);
        assert_eq!(identify(&p), None);
        let mut q = b"/system.slice/docker-".to_vec();
        q.extend_from_slice(ID.as_bytes());
        q.extend_from_slice(b".scope\xfe");
        assert_eq!(identify(&q), None);
        // A non-UTF-8 parent does not hide a valid container below it.
        let mut r = b"/weird\xff/".to_vec();
        r.extend_from_slice(ID.as_bytes());
        assert_eq!(
            identify(&r).and_then(|i| i.container_id).as_deref(),
            Some(ID)
        );
    }

    #[test]
    fn display_is_short() {
        let i = id(&format!("/kubepods/pod{UID}/{ID}")).unwrap();
        assert_eq!(
            i.to_string(),
            format!("container {} in pod {UID}", &ID[..12])
        );
        assert_eq!(short("abc"), "abc");
    }
}
