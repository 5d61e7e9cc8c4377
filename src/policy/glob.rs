//! Globs over slash-separated names: `*` matches within one path segment (no `/`), `?`
//! one character, and a segment that is exactly `**` matches any number of segments
//! (zero included). Used for cgroup paths; container names and images are one segment.
//!
//! Matching takes time proportional to the pattern's segments times the path's (a
//! table over both, filled once), however many `**` there are: a delegated user
//! controls the depth of the paths matched, on the agent's event loop. A pattern may
//! still hold at most [`MAX_DOUBLE_STARS`] of them; more is refused at load.

use std::fmt;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// The most `**` segments one pattern may have: two already say "anywhere below, then
/// anywhere below that"; more is a mistake, not a policy.
pub const MAX_DOUBLE_STARS: usize = 8;

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
        let double = segments.iter().filter(|s| s.as_str() == "**").count();
        if double > MAX_DOUBLE_STARS {
            return Err(format!(
                "invalid glob {text:?}: {double} `**` segments, at most {MAX_DOUBLE_STARS}"
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

/// Whether `pat` matches all of `parts`. `row[j]` holds whether `pat[i..]` matches
/// `parts[j..]`, filled from the last pattern segment back to the first: each cell is
/// computed once, from the row below it and its right neighbour.
fn match_segments(pat: &[String], parts: &[&str]) -> bool {
    let n = parts.len();
    // The empty pattern matches only the end of the path.
    let mut below: Vec<bool> = (0..=n).map(|j| j == n).collect();
    let mut row = vec![false; n + 1];
    for p in pat.iter().rev() {
        for j in (0..=n).rev() {
            row[j] = if p == "**" {
                // Zero segments, or one more and still `**`.
                below[j] || (j < n && row[j + 1])
            } else {
                j < n && below[j + 1] && match_segment(p.as_bytes(), parts[j].as_bytes())
            };
        }
        std::mem::swap(&mut below, &mut row);
    }
    below[0]
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
    fn many_double_stars_against_a_deep_path_take_no_time() {
        // Twelve `**` (more than a pattern may hold: built here without Glob::new) and
        // a path 31 levels deep that does not end in the last segment: the old
        // backtracking matcher tried every way to split 31 levels among 12 `**`.
        let mut segments = vec!["**".to_string(); 12];
        segments.push("nope".to_string());
        let deep: String = (0..31).map(|i| format!("/d{i}")).collect();
        let path = deep.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            let r = (match_segments(&segments, &parts), {
                let mut m = segments.clone();
                *m.last_mut().unwrap() = "d30".to_string();
                match_segments(&m, &parts)
            });
            let _ = tx.send(r);
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(1))
            .expect("matching took more than a second");
        assert_eq!(r, (false, true));
        // The same with as many as a pattern may hold, through the public API.
        let g = Glob::new(&format!("{}/nope", "/**".repeat(MAX_DOUBLE_STARS))).unwrap();
        assert!(!g.matches(&deep));
        let g = Glob::new(&format!("{}/d30", "/**".repeat(MAX_DOUBLE_STARS))).unwrap();
        assert!(g.matches(&deep));
    }

    #[test]
    fn more_double_stars_than_allowed_are_refused() {
        let text = format!("{}/x", "/**".repeat(MAX_DOUBLE_STARS + 1));
        let e = Glob::new(&text).unwrap_err();
        assert!(e.contains("9 `**` segments, at most 8"), "{e}");
        assert!(Glob::new(&format!("{}/x", "/**".repeat(MAX_DOUBLE_STARS))).is_ok());
    }

    #[test]
    fn segments_and_double_stars_mix() {
        assert!(m("/a/**/b/**/c", "/a/b/c"));
        assert!(m("/a/**/b/**/c", "/a/x/y/b/z/c"));
        assert!(!m("/a/**/b/**/c", "/a/x/y/z/c"));
        assert!(m("/**/x?/**", "/p/q/xy"));
        assert!(!m("/**/x?/**", "/p/q/x"));
        assert!(m("/a/*/c", "/a/b/c"));
        assert!(!m("/a/*/c", "/a/b/c/d"));
        assert!(!m("/a", "/"));
        assert!(m("**/**", "/"));
    }

    #[test]
    fn double_star_inside_segment_is_rejected() {
        assert!(Glob::new("/a**b")
            .unwrap_err()
            .contains("whole path segment"));
        assert!(Glob::new("").is_err());
    }
}
