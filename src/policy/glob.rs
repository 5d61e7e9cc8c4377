//! Globs over slash-separated names: `*` matches within one path segment (no `/`), `?`
//! one character, and a segment that is exactly `**` matches any number of segments
//! (zero included). Used for cgroup paths; container names and images are one segment.

use std::fmt;

use serde::de::{self, Deserializer};
use serde::Deserialize;

#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    text: String,
    segments: Vec<String>,
}

impl Glob {
    pub fn new(text: &str) -> Result<Glob, String> {
        if text.is_empty() {
            return Err("empty glob".to_string());
        }
        let segments: Vec<String> = text
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(bad) = segments
            .iter()
            .find(|s| s.contains("**") && s.as_str() != "**")
        {
            return Err(format!(
                "invalid glob {text:?}: `**` must be a whole path segment (got {bad:?})"
            ));
        }
        Ok(Glob {
            text: text.to_string(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Matches a slash-separated path (leading and duplicate slashes ignored).
    pub fn matches(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match_segments(&self.segments, &parts)
    }

    /// Matches a single name (container name, image), where `/` is an ordinary
    /// character for `*`: images like `registry.local/api:*` contain slashes.
    pub fn matches_name(&self, name: &str) -> bool {
        match_segment(self.text.as_bytes(), name.as_bytes())
    }
}

/// Matches `name` against the glob text `pattern` as [`Glob::matches_name`] does; an
/// empty pattern matches only an empty name (a label set to "").
pub fn name_matches(pattern: &str, name: &str) -> bool {
    match_segment(pattern.as_bytes(), name.as_bytes())
}

fn match_segments(pat: &[String], parts: &[&str]) -> bool {
    match pat.split_first() {
        None => parts.is_empty(),
        Some((p, rest)) if p == "**" => {
            (0..=parts.len()).any(|skip| match_segments(rest, &parts[skip..]))
        }
        Some((p, rest)) => match parts.split_first() {
            Some((first, others)) => {
                match_segment(p.as_bytes(), first.as_bytes()) && match_segments(rest, others)
            }
            None => false,
        },
    }
}

/// Wildcard match of one segment: `*` any run, `?` any one byte.
fn match_segment(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.text)
    }
}

impl<'de> Deserialize<'de> for Glob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Glob::new(&s).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: &str) -> bool {
        Glob::new(p).unwrap().matches(s)
    }

    #[test]
    fn star_stays_in_one_segment() {
        assert!(m("/docker/*", "/docker/abc"));
        assert!(!m("/docker/*", "/docker/abc/def"));
        assert!(!m("/docker/*", "/docker"));
        assert!(m(
            "/system.slice/docker-*.scope",
            "/system.slice/docker-12ab.scope"
        ));
        assert!(!m(
            "/system.slice/docker-*.scope",
            "/system.slice/docker-12ab.service"
        ));
    }

    #[test]
    fn double_star_any_depth() {
        assert!(m("**", "/"));
        assert!(m("**", "/a/b/c"));
        assert!(m("/kubepods/**", "/kubepods"));
        assert!(m("/kubepods/**", "/kubepods/burstable/pod1/c1"));
        assert!(m("/kubepods/**/c1", "/kubepods/burstable/pod1/c1"));
        assert!(!m("/kubepods/**/c1", "/kubepods/burstable/pod1/c2"));
        assert!(!m("/kubepods/**", "/other"));
    }

    #[test]
    fn question_mark_and_exact() {
        assert!(m("/a?c", "/abc"));
        assert!(!m("/a?c", "/ac"));
        assert!(m("/exact", "exact/"));
    }

    #[test]
    fn names_may_contain_slashes() {
        let g = Glob::new("registry.local/api:*").unwrap();
        assert!(g.matches_name("registry.local/api:1.2"));
        assert!(!g.matches_name("registry.local/web:1.2"));
    }

    #[test]
    fn double_star_inside_segment_is_rejected() {
        assert!(Glob::new("/a**b")
            .unwrap_err()
            .contains("whole path segment"));
        assert!(Glob::new("").is_err());
    }
}
