//! Loading policy files: TOML with `deny_unknown_fields`, every value checked where it
//! is parsed so that errors carry `FILE:LINE:COL`, then per-action checks (a key that
//! does not belong to the step's action, a missing required key) pointed at the key.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

use super::glob::Glob;
use super::units::{Amount, Dur, Percent, Size};
use super::{
    Action, Ceiling, Early, Match, Mode, Policy, PolicySet, Raise, Step, V2Keys, VictimOrder,
    VictimSpec,
};
use crate::perm::{Checks, Owners, PermError};

pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

const DEFAULT_SETTLE: Duration = Duration::from_millis(500);
const DEFAULT_HOLD: Duration = Duration::from_secs(60);
const DEFAULT_RESTORE_BELOW: f64 = 0.9;
/// `restore_below` under this is accepted with a warning: reached only by a workload
/// that has shed nearly all its memory.
const MIN_QUIET_RESTORE_BELOW: f64 = 0.01;
const DEFAULT_RESTORE_AFTER: Duration = Duration::from_secs(5);
const DEFAULT_GRACE: Duration = Duration::from_secs(5);
const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_RECLAIM_TIMEOUT: Duration = Duration::from_secs(1);
/// A reclaim longer than this is not a step of a rescue.
const MAX_RECLAIM_TIMEOUT: Duration = Duration::from_secs(60);
/// kernel_oom_kill: how long the kernel's OOM killer may stay enabled for one hand-off.
/// The kernel kills within milliseconds of the write when the cgroup is at its limit.
const DEFAULT_HANDOFF_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_HANDOFF_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest `settle`, `grace` or exec `timeout` accepted: the cgroup stays stalled
/// while an episode waits, so a wait of hours is a mistake, not a policy.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Waits above this are accepted with a warning in `check`.
pub const LONG_WAIT: Duration = Duration::from_secs(120);

/// Why a policy (or the set) could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{file}:{line}:{col}: {msg}")]
    Invalid {
        file: String,
        line: usize,
        col: usize,
        msg: String,
    },
    /// Not `source`: the message already carries it, and a chain printer (anyhow's
    /// `{:#}`) would print it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Not trusted (StrictModes): owner or mode let someone else change what runs as root.
    #[error(transparent)]
    Insecure(#[from] PermError),
}

impl LoadError {
    /// An error at a byte offset of `text`: `FILE:LINE:COL: msg` (1-based; the column
    /// in characters), or `FILE:1:1` without a position.
    pub fn at(text: &str, file: &str, span: Option<Range<usize>>, msg: impl Into<String>) -> Self {
        let (line, col) = span.map(|s| position(text, s.start)).unwrap_or((1, 1));
        LoadError::Invalid {
            file: file.to_string(),
            line,
            col,
            msg: msg.into(),
        }
    }

    /// A TOML parse or deserialization error, at its position.
    pub fn toml(text: &str, file: &str, e: &toml::de::Error) -> Self {
        LoadError::at(text, file, e.span(), e.message().trim())
    }
}

/// Whether files must pass the StrictModes check of [`crate::perm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Files and directories must be root's (or the caller's) and not writable by others.
    Strict,
    /// `--insecure-policies`: for development only.
    Insecure,
}

const INSECURE_HINT: &str = ", or pass --insecure-policies for development";

impl Trust {
    /// What [`crate::perm`] judges under this trust.
    pub fn checks(self) -> Checks {
        match self {
            Trust::Strict => Checks::Strict(Owners::current(INSECURE_HINT)),
            Trust::Insecure => Checks::Insecure,
        }
    }
}

/// A [`PermError`] as a load error: one that is only about reading keeps `PATH: error`.
fn perm_error(e: PermError) -> LoadError {
    match e {
        PermError::Io { path, error } => LoadError::Io { path, error },
        e => LoadError::Insecure(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<Spanned<String>>,
    mode: Option<Mode>,
    priority: Option<i64>,
    #[serde(rename = "match")]
    matcher: Spanned<RawMatch>,
    #[serde(rename = "step", default)]
    steps: Vec<Spanned<RawStep>>,
    v2: Option<RawV2>,
    early: Option<Spanned<RawEarly>>,
    pinned: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEarly {
    at: Option<Spanned<Amount>>,
    #[serde(rename = "step", default)]
    steps: Vec<Spanned<RawStep>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawV2 {
    hold_at: Option<Spanned<Amount>>,
    trigger: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    // Globs are compiled in `load_inner`: a bad one is reported at its own position in
    // the list (an error while deserializing an element points at the whole array).
    cgroup: Option<Vec<Spanned<String>>>,
    container_name: Option<Vec<Spanned<String>>>,
    label: Option<BTreeMap<String, String>>,
    image: Option<Vec<Spanned<String>>>,
    require_oom_kill_disable: Option<bool>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
enum ActionKind {
    Reclaim,
    RaiseLimit,
    Signal,
    Kill,
    KillAll,
    Exec,
    DropCaches,
    KernelOomKill,
}

impl ActionKind {
    fn name(self) -> &'static str {
        match self {
            ActionKind::Reclaim => "reclaim",
            ActionKind::RaiseLimit => "raise_limit",
            ActionKind::Signal => "signal",
            ActionKind::Kill => "kill",
            ActionKind::KillAll => "kill_all",
            ActionKind::Exec => "exec",
            ActionKind::DropCaches => "drop_caches",
            ActionKind::KernelOomKill => "kernel_oom_kill",
        }
    }

    /// Keys a step of this action may carry besides `action` and `settle`.
    fn keys(self) -> &'static [&'static str] {
        match self {
            ActionKind::Reclaim => &["timeout"],
            ActionKind::KillAll => &[],
            ActionKind::RaiseLimit => &[
                "by",
                "max_limit",
                "max_extra",
                "hold",
                "restore_below",
                "restore_after",
            ],
            ActionKind::Signal => &["signal", "victim", "prefer", "avoid", "grace"],
            ActionKind::Kill => &["victim", "prefer", "avoid"],
            ActionKind::Exec => &["command", "timeout"],
            ActionKind::DropCaches => &["level"],
            ActionKind::KernelOomKill => &["timeout"],
        }
    }
}

/// A compiled regex; a bad one fails at its position in the file.
struct Re(Regex);

impl<'de> Deserialize<'de> for Re {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Regex::new(&s)
            .map(Re)
            .map_err(|e| de::Error::custom(format!("invalid regex {s:?}: {e}")))
    }
}

/// A signal name: "SIGTERM" or "TERM".
struct Sig(i32);

impl<'de> Deserialize<'de> for Sig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_signal(&s).map(Sig).map_err(de::Error::custom)
    }
}

pub fn parse_signal(s: &str) -> Result<i32, String> {
    let full = if s.starts_with("SIG") {
        s.to_string()
    } else {
        format!("SIG{s}")
    };
    full.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| format!("unknown signal {s:?} (use a name such as \"SIGTERM\")"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    action: Spanned<ActionKind>,
    settle: Option<Spanned<Dur>>,
    by: Option<Spanned<Amount>>,
    max_limit: Option<Spanned<Size>>,
    max_extra: Option<Spanned<Amount>>,
    hold: Option<Spanned<Dur>>,
    restore_below: Option<Spanned<Percent>>,
    restore_after: Option<Spanned<Dur>>,
    signal: Option<Spanned<Sig>>,
    victim: Option<Spanned<VictimOrder>>,
    prefer: Option<Spanned<Vec<Re>>>,
    avoid: Option<Spanned<Vec<Re>>>,
    grace: Option<Spanned<Dur>>,
    command: Option<Spanned<Vec<String>>>,
    timeout: Option<Spanned<Dur>>,
    level: Option<Spanned<i64>>,
}

impl RawStep {
    /// The span of each optional key that is present.
    fn present(&self) -> Vec<(&'static str, Range<usize>)> {
        let mut v = Vec::new();
        macro_rules! key {
            ($($f:ident),*) => {$(
                if let Some(x) = &self.$f {
                    v.push((stringify!($f), x.span()));
                }
            )*};
        }
        key!(
            by,
            max_limit,
            max_extra,
            hold,
            restore_below,
            restore_after,
            signal,
            victim,
            prefer,
            avoid,
            grace,
            command,
            timeout,
            level
        );
        v
    }
}

/// Line and column (1-based, in characters) of a byte offset.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

struct Ctx<'a> {
    text: &'a str,
    file: &'a str,
    /// `FILE:LINE:COL: warning: ...` for values that load but are likely mistakes.
    warnings: std::cell::RefCell<Vec<String>>,
    /// The program of each `exec` step and where its `command` is, for the owner and
    /// mode checks of [`load_files_with`].
    hooks: std::cell::RefCell<Vec<(Vec<String>, Range<usize>)>>,
}

impl Ctx<'_> {
    fn err(&self, span: Option<Range<usize>>, msg: impl Into<String>) -> LoadError {
        LoadError::at(self.text, self.file, span, msg)
    }

    fn warn(&self, span: Option<Range<usize>>, msg: impl std::fmt::Display) {
        let (line, col) = span.map(|s| position(self.text, s.start)).unwrap_or((1, 1));
        self.warnings
            .borrow_mut()
            .push(format!("{}:{line}:{col}: warning: {msg}", self.file));
    }

    /// A wait (`settle`, `grace`, `timeout`): at most [`MAX_WAIT`], a warning above
    /// [`LONG_WAIT`]; zero is an error where `zero_ok` is false.
    fn wait(
        &self,
        d: &Option<Spanned<Dur>>,
        key: &str,
        zero_ok: bool,
    ) -> Result<Option<Duration>, LoadError> {
        let Some(d) = d else { return Ok(None) };
        let v = d.get_ref().0;
        if v > MAX_WAIT {
            return Err(self.err(
                Some(d.span()),
                format!(
                    "`{key}` of {} is too long: the cgroup stays stalled meanwhile (at most {})",
                    fmt_dur(v),
                    fmt_dur(MAX_WAIT)
                ),
            ));
        }
        if v.is_zero() && !zero_ok {
            return Err(self.err(Some(d.span()), format!("`{key}` must be greater than zero")));
        }
        if v > LONG_WAIT {
            self.warn(
                Some(d.span()),
                format!(
                    "`{key}` of {}: the cgroup stays stalled that long before the next step",
                    fmt_dur(v)
                ),
            );
        }
        Ok(Some(v))
    }
}

/// Signals that stop or continue a process instead of ending it: a stopped task keeps
/// its memory, so the stall never ends.
const STOPPING: [i32; 5] = [
    libc::SIGSTOP,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGCONT,
];
/// Signals whose default action is to do nothing: they end a process only if it
/// handles them (which some workloads do, to shed memory).
const IGNORED_BY_DEFAULT: [i32; 3] = [libc::SIGCHLD, libc::SIGURG, libc::SIGWINCH];

/// Parses one policy from TOML text; `file` names it in errors. The name defaults to
/// the file stem.
pub fn load_str(text: &str, file: &str) -> Result<Policy, LoadError> {
    load_one(text, file).map(|(p, _)| p)
}

/// [`load_str`], with the warnings (`FILE:LINE:COL: warning: ...`) for values that are
/// accepted but likely mistakes.
pub fn load_one(text: &str, file: &str) -> Result<(Policy, Vec<String>), LoadError> {
    load_inner(text, file).map(|(p, w, _)| (p, w))
}

/// A policy, its warnings, and the program and `command` span of each `exec` step.
type Loaded = (Policy, Vec<String>, Vec<(Vec<String>, Range<usize>)>);

fn load_inner(text: &str, file: &str) -> Result<Loaded, LoadError> {
    let ctx = Ctx {
        text,
        file,
        warnings: Default::default(),
        hooks: Default::default(),
    };
    let raw: RawPolicy = toml::from_str(text).map_err(|e| LoadError::toml(text, file, &e))?;
    let name = match &raw.name {
        Some(n) if n.get_ref().trim().is_empty() => {
            return Err(ctx.err(Some(n.span()), "policy name must not be empty"))
        }
        // It goes into every hook's environment (OOMWAKE_POLICY), which execve takes as
        // NUL-terminated strings.
        Some(n) if n.get_ref().contains('\0') => {
            return Err(ctx.err(Some(n.span()), "policy name must not contain a NUL byte"))
        }
        Some(n) => n.get_ref().clone(),
        None => Path::new(file)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(file)
            .to_string(),
    };
    let m = raw.matcher.get_ref();
    let globs = |g: &Option<Vec<Spanned<String>>>| -> Result<Vec<Glob>, LoadError> {
        g.iter()
            .flatten()
            .map(|g| Glob::new(g.get_ref()).map_err(|e| ctx.err(Some(g.span()), e)))
            .collect()
    };
    let matcher = Match {
        cgroup: globs(&m.cgroup)?,
        container_name: globs(&m.container_name)?,
        label: m.label.clone().unwrap_or_default(),
        image: globs(&m.image)?,
        require_oom_kill_disable: m.require_oom_kill_disable.unwrap_or(true),
    };
    if matcher.cgroup.is_empty() && !matcher.needs_container() {
        return Err(ctx.err(
            Some(raw.matcher.span()),
            "[match] needs at least one of cgroup, container_name, label, image",
        ));
    }
    if raw.steps.is_empty() {
        return Err(ctx.err(None, "a policy needs at least one [[step]]"));
    }
    let steps = raw
        .steps
        .iter()
        .map(|s| build_step(&ctx, s.get_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    let v2 = match &raw.v2 {
        None => V2Keys::default(),
        Some(r) => build_v2(&ctx, r)?,
    };
    let early = match &raw.early {
        None => None,
        Some(e) => Some(build_early(&ctx, e)?),
    };
    let policy = Policy {
        early,
        name,
        mode: raw.mode.unwrap_or(Mode::Enforce),
        priority: raw.priority.unwrap_or(0),
        matcher,
        steps,
        source: file.to_string(),
        v2,
        pinned: raw.pinned.unwrap_or(true),
    };
    Ok((policy, ctx.warnings.into_inner(), ctx.hooks.into_inner()))
}

/// `[early]`: `at` must lie strictly between nothing and the wall (100% would fire
/// only at the OOM, which the normal steps handle), and there must be a step to run.
fn build_early(ctx: &Ctx, e: &Spanned<RawEarly>) -> Result<Early, LoadError> {
    let r = e.get_ref();
    let Some(at) = &r.at else {
        return Err(ctx.err(
            Some(e.span()),
            "[early] needs `at`: the usage that starts the early steps, e.g. \"75%\" of the limit or a size",
        ));
    };
    match *at.get_ref() {
        Amount::Percent(p) if p <= 0.0 || p >= 1.0 => return Err(ctx.err(
            Some(at.span()),
            "[early] `at` must be above 0% and below 100% of the limit (at 100% the OOM steps run)",
        )),
        Amount::Bytes(0) => {
            return Err(ctx.err(Some(at.span()), "[early] `at` must be greater than zero"))
        }
        Amount::Percent(p) if p < 0.5 => ctx.warn(
            Some(at.span()),
            format!(
                "[early] `at` of {}%: the early steps run while the workload is far from its limit",
                (p * 100.0).round()
            ),
        ),
        _ => {}
    }
    if r.steps.is_empty() {
        return Err(ctx.err(Some(e.span()), "[early] needs at least one [[early.step]]"));
    }
    let steps = r
        .steps
        .iter()
        .map(|s| build_step(ctx, s.get_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    // Before the wall no charge fails, so the kernel would kill nothing during the
    // hand-off, or, should the workload reach the wall meanwhile, at a moment no step
    // chose.
    if let Some(raw) = r
        .steps
        .iter()
        .find(|s| *s.get_ref().action.get_ref() == ActionKind::KernelOomKill)
    {
        return Err(ctx.err(
            Some(raw.get_ref().action.span()),
            "`kernel_oom_kill` cannot be an [[early.step]]: the kernel's OOM killer acts only at the wall; put it in [[step]]",
        ));
    }
    // An early loan given back with usage still above the threshold leaves the
    // workload past a threshold that fires only on the next upward crossing: the next
    // approach to the wall would be met by the OOM steps, not the early ones.
    if let Amount::Percent(p) = *at.get_ref() {
        for (raw, step) in r.steps.iter().zip(&steps) {
            if let Action::RaiseLimit(l) = &step.action {
                if l.restore_below >= p {
                    let raw = raw.get_ref();
                    let span = raw
                        .restore_below
                        .as_ref()
                        .map(|r| r.span())
                        .unwrap_or_else(|| raw.action.span());
                    ctx.warn(
                        Some(span),
                        format!(
                            "an early loan with `restore_below` ({}%) not below `at` ({}%) can be given back with usage past the threshold, which then fires only after usage dips below it",
                            (l.restore_below * 100.0).round(),
                            (p * 100.0).round()
                        ),
                    );
                }
            }
        }
    }
    Ok(Early {
        at: *at.get_ref(),
        steps,
    })
}

fn build_v2(ctx: &Ctx, r: &RawV2) -> Result<V2Keys, LoadError> {
    let hold_at = match &r.hold_at {
        Some(h) => match *h.get_ref() {
            Amount::Percent(p) if p <= 0.0 || p > 1.0 => {
                return Err(ctx.err(Some(h.span()), "hold_at must be above 0% and at most 100%"))
            }
            Amount::Bytes(0) => return Err(ctx.err(Some(h.span()), "hold_at must not be 0")),
            a => Some(a),
        },
        None => None,
    };
    let trigger = match &r.trigger {
        Some(t) => Some(
            crate::cgroup::v2::PsiTrigger::parse(t.get_ref())
                .map_err(|e| ctx.err(Some(t.span()), e))?,
        ),
        None => None,
    };
    Ok(V2Keys { hold_at, trigger })
}

fn build_step(ctx: &Ctx, s: &RawStep) -> Result<Step, LoadError> {
    let kind = *s.action.get_ref();
    let allowed = kind.keys();
    for (key, span) in s.present() {
        if !allowed.contains(&key) {
            let why = match (kind, key) {
                (ActionKind::KernelOomKill, "victim" | "prefer" | "avoid") => {
                    ": the kernel chooses the victim itself (the largest by its oom_badness score; steer it with the processes' oom_score_adj)"
                }
                (ActionKind::KernelOomKill, "signal" | "grace") => {
                    ": the kernel's OOM killer sends SIGKILL"
                }
                _ => "",
            };
            return Err(ctx.err(
                Some(span),
                format!(
                    "key `{key}` does not apply to action `{}`{why}",
                    kind.name()
                ),
            ));
        }
    }
    let required = |present: bool, key: &str| {
        if present {
            Ok(())
        } else {
            Err(ctx.err(
                Some(s.action.span()),
                format!("action `{}` needs `{key}`", kind.name()),
            ))
        }
    };
    let victim = || VictimSpec {
        order: s
            .victim
            .as_ref()
            .map(|v| *v.get_ref())
            .unwrap_or(VictimOrder::LargestRss),
        prefer: regexes(&s.prefer),
        avoid: regexes(&s.avoid),
    };
    let action = match kind {
        ActionKind::Reclaim => {
            let timeout = dur(&s.timeout).unwrap_or(DEFAULT_RECLAIM_TIMEOUT);
            if timeout.is_zero() || timeout > MAX_RECLAIM_TIMEOUT {
                let span = s.timeout.as_ref().map(|t| t.span());
                return Err(ctx.err(
                    span,
                    format!(
                        "reclaim `timeout` must be more than 0 and at most {MAX_RECLAIM_TIMEOUT:?}"
                    ),
                ));
            }
            Action::Reclaim { timeout }
        }
        ActionKind::KillAll => Action::KillAll,
        ActionKind::RaiseLimit => {
            required(s.by.is_some(), "by")?;
            let ceiling = match (&s.max_limit, &s.max_extra) {
                (Some(l), None) if l.get_ref().0 == 0 => return Err(ctx.err(
                    Some(l.span()),
                    "`max_limit` of 0 can never be raised to: give the highest limit to lend up to",
                )),
                (None, Some(e)) if e.get_ref().of(1 << 30) == 0 => {
                    return Err(ctx.err(
                        Some(e.span()),
                        "`max_extra` of 0 leaves nothing to lend: give e.g. \"25%\"",
                    ))
                }
                (Some(l), None) => Ceiling::MaxLimit(l.get_ref().0),
                (None, Some(e)) => Ceiling::MaxExtra(*e.get_ref()),
                (Some(_), Some(e)) => {
                    return Err(ctx.err(
                        Some(e.span()),
                        "give either `max_limit` or `max_extra`, not both",
                    ))
                }
                (None, None) => {
                    return Err(ctx.err(
                        Some(s.action.span()),
                        "action `raise_limit` needs a ceiling: `max_limit` or `max_extra`",
                    ))
                }
            };
            let by =
                s.by.as_ref()
                    .map(|b| *b.get_ref())
                    .unwrap_or(Amount::Bytes(0));
            if by.of(1 << 30) == 0 {
                let span = s.by.as_ref().map(|b| b.span());
                return Err(ctx.err(span, "`by` must be greater than zero"));
            }
            let restore_below = s
                .restore_below
                .as_ref()
                .map(|p| p.get_ref().0)
                .unwrap_or(DEFAULT_RESTORE_BELOW);
            let restore_span = s.restore_below.as_ref().map(|p| p.span());
            if restore_below > 1.0 {
                return Err(ctx.err(
                    restore_span,
                    "`restore_below` is a share of the original limit: at most 100%",
                ));
            }
            // The loan comes back once usage is below this share of the original: usage
            // is never below 0 bytes, so 0% would keep the loan for good (not at hold
            // expiry, not at shutdown).
            if restore_below <= 0.0 {
                return Err(ctx.err(
                    restore_span,
                    "`restore_below` of 0% can never be reached (usage is never below 0 bytes): the loan would never be given back; give e.g. \"90%\"",
                ));
            }
            if restore_below < MIN_QUIET_RESTORE_BELOW {
                ctx.warn(
                    restore_span,
                    format!(
                        "`restore_below` of {}%: the loan is given back only once the workload has almost no memory left",
                        restore_below * 100.0
                    ),
                );
            }
            let hold = dur(&s.hold).unwrap_or(DEFAULT_HOLD);
            if hold.is_zero() {
                return Err(ctx.err(
                    s.hold.as_ref().map(|h| h.span()),
                    "`hold` must be greater than zero: the headroom would be taken back at once",
                ));
            }
            let restore_after = dur(&s.restore_after).unwrap_or(DEFAULT_RESTORE_AFTER);
            if restore_after >= hold {
                let span = s
                    .restore_after
                    .as_ref()
                    .or(s.hold.as_ref())
                    .map(|d| d.span());
                ctx.warn(
                    span,
                    format!(
                        "`restore_after` ({}) is not shorter than `hold` ({}): the loan is never given back early",
                        fmt_dur(restore_after),
                        fmt_dur(hold)
                    ),
                );
            }
            Action::RaiseLimit(Raise {
                by,
                ceiling,
                hold,
                restore_below,
                restore_after,
            })
        }
        ActionKind::Signal => {
            let signal = s
                .signal
                .as_ref()
                .map(|x| x.get_ref().0)
                .unwrap_or(libc::SIGTERM);
            let span = s.signal.as_ref().map(|x| x.span());
            if STOPPING.contains(&signal) {
                return Err(ctx.err(
                    span,
                    "a stopping or continuing signal does not end the victim, and a stopped task keeps its memory: use SIGTERM, SIGINT or SIGKILL",
                ));
            }
            if IGNORED_BY_DEFAULT.contains(&signal) {
                ctx.warn(
                    span,
                    "this signal is ignored by default: it ends nothing unless the workload handles it",
                );
            }
            let grace = ctx.wait(&s.grace, "grace", true)?;
            if grace.is_some_and(|g| g.is_zero()) {
                ctx.warn(
                    s.grace.as_ref().map(|g| g.span()),
                    "`grace` of 0: the next step starts without giving the victim time to exit",
                );
            }
            Action::Signal {
                signal,
                victim: victim(),
                grace: grace.unwrap_or(DEFAULT_GRACE),
            }
        }
        ActionKind::Kill => Action::Kill { victim: victim() },
        ActionKind::Exec => {
            required(s.command.is_some(), "command")?;
            let command = s
                .command
                .as_ref()
                .map(|c| c.get_ref().clone())
                .unwrap_or_default();
            if command.first().is_none_or(|c| c.is_empty()) {
                let span = s.command.as_ref().map(|c| c.span());
                return Err(ctx.err(
                    span,
                    "`command` needs a program: [\"/path/to/prog\", \"arg\", ...]",
                ));
            }
            if !command[0].starts_with('/') {
                let span = s.command.as_ref().map(|c| c.span());
                return Err(ctx.err(
                    span,
                    format!(
                        "`command` must start with an absolute path, not {:?}: the agent runs it as root and does not search PATH",
                        command[0]
                    ),
                ));
            }
            if let Some(arg) = command.iter().find(|a| a.contains('\0')) {
                let span = s.command.as_ref().map(|c| c.span());
                return Err(ctx.err(
                    span,
                    format!("`command` must not contain a NUL byte ({arg:?}): execve could never run it"),
                ));
            }
            if let Some(c) = &s.command {
                ctx.hooks.borrow_mut().push((command.clone(), c.span()));
            }
            Action::Exec {
                command,
                timeout: ctx
                    .wait(&s.timeout, "timeout", false)?
                    .unwrap_or(DEFAULT_EXEC_TIMEOUT),
                trust: Trust::Strict,
            }
        }
        ActionKind::DropCaches => {
            let level = s.level.as_ref().map(|l| *l.get_ref()).unwrap_or(1);
            let level = u8::try_from(level)
                .ok()
                .filter(|l| (1..=3).contains(l))
                .ok_or_else(|| {
                    ctx.err(
                        s.level.as_ref().map(|l| l.span()),
                        "`level` must be 1, 2 or 3",
                    )
                })?;
            Action::DropCaches { level }
        }
        ActionKind::KernelOomKill => {
            let timeout = ctx
                .wait(&s.timeout, "timeout", false)?
                .unwrap_or(DEFAULT_HANDOFF_TIMEOUT);
            if timeout > MAX_HANDOFF_TIMEOUT {
                let span = s.timeout.as_ref().map(|t| t.span());
                return Err(ctx.err(
                    span,
                    format!(
                        "kernel_oom_kill `timeout` of {} is too long: the kernel's OOM killer stays enabled meanwhile (at most {})",
                        fmt_dur(timeout),
                        fmt_dur(MAX_HANDOFF_TIMEOUT)
                    ),
                ));
            }
            Action::KernelOomKill { timeout }
        }
    };
    Ok(Step {
        action,
        settle: ctx
            .wait(&s.settle, "settle", true)?
            .unwrap_or(DEFAULT_SETTLE),
    })
}

/// A duration as a policy file writes it ("8000h", "90s", "250ms").
fn fmt_dur(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms > 0 && ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        _ if ms > 0 && ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        _ if ms % 1000 == 0 => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

fn dur(d: &Option<Spanned<Dur>>) -> Option<Duration> {
    d.as_ref().map(|d| d.get_ref().0)
}

fn regexes(r: &Option<Spanned<Vec<Re>>>) -> Vec<Regex> {
    r.as_ref()
        .map(|v| v.get_ref().iter().map(|r| r.0.clone()).collect())
        .unwrap_or_default()
}

/// Loads the given files as one set; names must be unique across it. All errors are
/// returned, not only the first. Files must pass the StrictModes check.
pub fn load_files(files: &[PathBuf]) -> Result<PolicySet, Vec<LoadError>> {
    load_files_with(files, Trust::Strict)
}

/// Opens and reads a policy file through [`crate::perm`]: each directory on the way and
/// the file itself judged on the descriptor it is then read from; only a regular file,
/// of at most [`crate::perm::MAX_FILE`] bytes.
fn read_policy(open: Result<std::fs::File, PermError>, path: &Path) -> Result<String, LoadError> {
    let file = open.map_err(perm_error)?;
    crate::perm::read_text(file, path, "a policy file").map_err(perm_error)
}

/// [`load_files`] with an explicit [`Trust`].
pub fn load_files_with(files: &[PathBuf], trust: Trust) -> Result<PolicySet, Vec<LoadError>> {
    let checks = trust.checks();
    let texts = files
        .iter()
        .map(|path| {
            let open = crate::perm::open_file(path, "a policy file", checks);
            (path.clone(), read_policy(open, path))
        })
        .collect();
    load_texts(texts, trust)
}

/// Loads the policies read from their files, in the order given.
fn load_texts(
    texts: Vec<(PathBuf, Result<String, LoadError>)>,
    trust: Trust,
) -> Result<PolicySet, Vec<LoadError>> {
    let mut policies = Vec::new();
    let mut warnings = Vec::new();
    let mut errors = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    for (path, text) in texts {
        // A dangling link, a loop, a directory named *.toml or a permission problem is
        // an error like an invalid file: skipping it could leave a weaker policy in force.
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let file = path.display().to_string();
        match load_inner(&text, &file) {
            Ok((mut p, w, hooks)) => {
                warnings.extend(w);
                match check_hooks(&text, &file, &hooks, trust) {
                    Ok(w) => warnings.extend(w),
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                }
                set_exec_trust(&mut p, trust);
                if let Some(first) = seen.get(&p.name) {
                    errors.push(LoadError::at(
                        &text,
                        &file,
                        name_span(&text),
                        format!("policy name {:?} is already used by {first}", p.name),
                    ));
                } else {
                    seen.insert(p.name.clone(), file);
                    policies.push(p);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(PolicySet::new(policies, false).with_warnings(warnings))
    } else {
        Err(errors)
    }
}

/// The owner and mode checks of each `exec` step's program (it runs as root), at the
/// position of its `command`: the program and every directory above it. One that does
/// not exist (yet) is a warning: the step fails until it does, and it is judged again
/// before each run.
fn check_hooks(
    text: &str,
    file: &str,
    hooks: &[(Vec<String>, Range<usize>)],
    trust: Trust,
) -> Result<Vec<String>, LoadError> {
    let mut warnings = Vec::new();
    if trust == Trust::Insecure {
        return Ok(warnings);
    }
    for (command, span) in hooks {
        let program = &command[0];
        // An argument that names a file the hook may read or run as root (`/bin/sh
        // /home/u/hook.sh`): judged like the program, a warning only (an argument may
        // as well be a file the hook writes, or a path to a workload's own data).
        for arg in &command[1..] {
            let path = Path::new(arg);
            if !path.is_absolute() || !path.is_file() {
                continue;
            }
            let what = "an argument of an exec hook";
            if let Err(e) = crate::perm::open_program(path, what, trust.checks(), false) {
                let (line, col) = position(text, span.start);
                warnings.push(format!(
                    "{file}:{line}:{col}: warning: {e}: the hook runs as root and may read or run it"
                ));
            }
        }
        // Opened to read (a script's interpreter, and its own for a chain, runs as root
        // too); a hook this user cannot read is only judged (O_PATH), and its
        // interpreters are judged before each run, when the agent reads it as root.
        let (program, checks) = (Path::new(program), trust.checks());
        let judged = match crate::perm::open_program(program, "an exec hook", checks, true) {
            Ok(f) => crate::perm::check_interpreters(&f, program, checks),
            Err(_) => crate::perm::open_program(program, "an exec hook", checks, false).map(|_| ()),
        };
        match judged {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {
                let (line, col) = position(text, span.start);
                warnings.push(format!(
                    "{file}:{line}:{col}: warning: {e}: the step fails until it exists"
                ));
            }
            Err(e) => return Err(LoadError::at(text, file, Some(span.clone()), e.to_string())),
        }
    }
    Ok(warnings)
}

/// Exec steps run their program under the trust the policy was loaded with.
fn set_exec_trust(p: &mut Policy, trust: Trust) {
    let early = p.early.iter_mut().flat_map(|e| e.steps.iter_mut());
    for step in p.steps.iter_mut().chain(early) {
        if let Action::Exec { trust: t, .. } = &mut step.action {
            *t = trust;
        }
    }
}

fn name_span(text: &str) -> Option<Range<usize>> {
    #[derive(Deserialize)]
    struct NameOnly {
        name: Option<Spanned<String>>,
    }
    toml::from_str::<NameOnly>(text)
        .ok()?
        .name
        .map(|n| n.span())
}

/// Loads every `*.toml` in `dir` (sorted by file name), StrictModes applied. See
/// [`load_dir_with`].
pub fn load_dir(dir: &Path) -> Result<PolicySet, Vec<LoadError>> {
    load_dir_with(dir, Trust::Strict)
}

/// Loads every entry named `*.toml` in `dir` (but not hidden ones, `.*`), sorted by file
/// name. Each must be a readable policy file: an entry that cannot be read (dangling
/// symlink, loop, permission denied, a directory, a FIFO, a device) is an error, never
/// skipped. Only a directory that does not exist or has no `*.toml` entry at all gives
/// the embedded default. The directory is opened once and judged on its descriptor, and
/// each file is opened from that descriptor (see [`crate::perm`]).
pub fn load_dir_with(dir: &Path, trust: Trust) -> Result<PolicySet, Vec<LoadError>> {
    let checked = match crate::perm::open_dir(dir, "the policies directory", trust.checks()) {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(PolicySet::embedded_default()),
        Err(e) => return Err(vec![perm_error(e)]),
    };
    let mut names: Vec<std::ffi::OsString> = checked
        .names()
        .map_err(|e| vec![perm_error(e)])?
        .into_iter()
        // Hidden entries are never policies: an editor's lock link (`.#p.toml`, which
        // dangles by design) must not make a reload fail.
        .filter(|n| !n.as_encoded_bytes().starts_with(b"."))
        .filter(|n| Path::new(n).extension().is_some_and(|x| x == "toml"))
        .collect();
    names.sort();
    if names.is_empty() {
        return Ok(PolicySet::embedded_default());
    }
    let texts = names
        .iter()
        .map(|n| {
            let path = dir.join(n);
            let open = checked.open_file(n, "a policy file");
            let text = read_policy(open, &path);
            (path, text)
        })
        .collect();
    load_texts(texts, trust)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reclaim_timeout_defaults_and_bounds() {
        let p = load_str(&format!("{HEAD}[[step]]\naction='reclaim'\n"), "p.toml").unwrap();
        assert!(
            matches!(p.steps[0].action, Action::Reclaim { timeout } if timeout == DEFAULT_RECLAIM_TIMEOUT)
        );
        let p = load_str(
            &format!("{HEAD}[[step]]\naction='reclaim'\ntimeout='50ms'\n"),
            "p.toml",
        )
        .unwrap();
        assert!(
            matches!(p.steps[0].action, Action::Reclaim { timeout } if timeout == Duration::from_millis(50))
        );
        for bad in ["0s", "2m"] {
            let e = err(&format!(
                "{HEAD}[[step]]\naction='reclaim'\ntimeout='{bad}'\n"
            ));
            assert!(e.contains("reclaim `timeout` must be"), "{e}");
            assert!(e.starts_with("p.toml:"), "{e}");
        }
    }

    fn err(text: &str) -> String {
        load_str(text, "p.toml").unwrap_err().to_string()
    }

    const HEAD: &str = "[match]\ncgroup = [\"/docker/*\"]\n";

    #[test]
    fn full_policy_parses() {
        let text = r#"
name = "go-api"
mode = "audit"
priority = 10
[match]
cgroup = ["/docker/*", "/system.slice/docker-*.scope"]
[[step]]
action = "reclaim"
settle = "200ms"
[[step]]
action = "raise_limit"
by = "25%"
max_limit = "1GiB"
hold = "2m"
restore_below = "90%"
[[step]]
action = "signal"
signal = "SIGTERM"
victim = "largest_rss"
prefer = ["^worker"]
avoid = ["^nginx: master"]
grace = "10s"
[[step]]
action = "kill"
victim = "newest"
[[step]]
action = "kill_all"
[[step]]
action = "exec"
command = ["/usr/local/bin/page-oncall", "--severity", "high"]
timeout = "5s"
[[step]]
action = "drop_caches"
level = 1
"#;
        let p = load_str(text, "go-api.toml").unwrap();
        assert_eq!(p.name, "go-api");
        assert_eq!(p.mode, Mode::Audit);
        assert_eq!(p.priority, 10);
        assert_eq!(p.steps.len(), 7);
        assert_eq!(p.steps[0].settle, Duration::from_millis(200));
        assert_eq!(p.steps[1].settle, DEFAULT_SETTLE);
        match &p.steps[1].action {
            Action::RaiseLimit(r) => {
                assert_eq!(r.by, Amount::Percent(0.25));
                assert_eq!(r.ceiling_for(64 << 20), 1 << 30);
                assert_eq!(r.hold, Duration::from_secs(120));
                assert_eq!(r.restore_after, DEFAULT_RESTORE_AFTER);
            }
            other => panic!("{other:?}"),
        }
        match &p.steps[2].action {
            Action::Signal {
                signal,
                victim,
                grace,
            } => {
                assert_eq!(*signal, libc::SIGTERM);
                assert!(victim.prefer[0].is_match("worker-1"));
                assert!(victim.avoid[0].is_match("nginx: master process"));
                assert_eq!(*grace, Duration::from_secs(10));
            }
            other => panic!("{other:?}"),
        }
        match &p.steps[3].action {
            Action::Kill { victim } => assert_eq!(victim.order, VictimOrder::Newest),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v2_keys_parse_and_are_checked_at_their_position() {
        let steps = "[[step]]\naction = \"kill\"\n";
        let ok = format!("{HEAD}{steps}[v2]\nhold_at = \"90%\"\ntrigger = \"some 100ms 1s\"\n");
        let p = load_str(&ok, "p.toml").unwrap();
        assert_eq!(p.v2.hold_at, Some(Amount::Percent(0.9)));
        assert_eq!(
            p.v2.trigger.map(|t| t.kernel_line()).as_deref(),
            Some("some 100000 1000000")
        );
        let p = load_str(
            &format!("{HEAD}{steps}[v2]\nhold_at = \"60MiB\"\n"),
            "p.toml",
        )
        .unwrap();
        assert_eq!(p.v2.hold_at, Some(Amount::Bytes(60 << 20)));
        assert!(load_str(&format!("{HEAD}{steps}"), "p.toml")
            .unwrap()
            .v2
            .trigger
            .is_none());
        let e = err(&format!("{HEAD}{steps}[v2]\nhold_at = \"150%\"\n"));
        assert!(
            e.starts_with("p.toml:6:11:") && e.contains("at most 100%"),
            "{e}"
        );
        let e = err(&format!("{HEAD}{steps}[v2]\ntrigger = \"some 1s 100ms\"\n"));
        assert!(e.starts_with("p.toml:6:11:") && e.contains("500ms"), "{e}");
        let e = err(&format!("{HEAD}{steps}[v2]\nhold = \"90%\"\n"));
        assert!(e.starts_with("p.toml:6:1:"), "{e}");
    }

    #[test]
    fn name_defaults_to_file_stem() {
        let p = load_str(
            &format!("{HEAD}[[step]]\naction='reclaim'\n"),
            "/etc/x/cache.toml",
        )
        .unwrap();
        assert_eq!(p.name, "cache");
    }

    #[test]
    fn unknown_top_level_key_has_position() {
        let e = err(&format!("nmae = 'x'\n{HEAD}[[step]]\naction='reclaim'\n"));
        assert!(e.starts_with("p.toml:1:1: "), "{e}");
        assert!(e.contains("unknown field `nmae`"), "{e}");
    }

    #[test]
    fn unknown_action_has_position() {
        let e = err(&format!("{HEAD}[[step]]\naction = \"explode\"\n"));
        assert!(e.starts_with("p.toml:4:10: "), "{e}");
        assert!(e.contains("explode"), "{e}");
    }

    #[test]
    fn bad_regex_size_duration_signal_have_positions() {
        let e = err(&format!(
            "{HEAD}[[step]]\naction = \"kill\"\nprefer = [\"(unclosed\"]\n"
        ));
        assert!(e.starts_with("p.toml:5:"), "{e}");
        assert!(e.contains("invalid regex"), "{e}");
        let e = err(&format!(
            "{HEAD}[[step]]\naction = \"raise_limit\"\nby = \"10%\"\nmax_limit = \"12XB\"\n"
        ));
        assert!(e.starts_with("p.toml:6:13: "), "{e}");
        assert!(e.contains("unknown unit"), "{e}");
        let e = err(&format!(
            "{HEAD}[[step]]\naction = \"reclaim\"\nsettle = \"5 days\"\n"
        ));
        assert!(e.starts_with("p.toml:5:"), "{e}");
        let e = err(&format!(
            "{HEAD}[[step]]\naction = \"signal\"\nsignal = \"SIGNOPE\"\n"
        ));
        assert!(e.starts_with("p.toml:5:"), "{e}");
        assert!(e.contains("unknown signal"), "{e}");
    }

    #[test]
    fn key_of_another_action_is_rejected_at_the_key() {
        let e = err(&format!(
            "{HEAD}[[step]]\naction = \"reclaim\"\ngrace = \"1s\"\n"
        ));
        assert!(e.starts_with("p.toml:5:9: "), "{e}");
        assert!(
            e.contains("`grace` does not apply to action `reclaim`"),
            "{e}"
        );
    }

    #[test]
    fn required_keys() {
        let e = err(&format!(
            "{HEAD}[[step]]\naction = \"raise_limit\"\nmax_extra = \"25%\"\n"
        ));
        assert!(e.contains("needs `by`"), "{e}");
        let e = err(&format!(
            "{HEAD}[[step]]\naction = \"raise_limit\"\nby = \"25%\"\n"
        ));
        assert!(e.contains("needs a ceiling"), "{e}");
        let e = err(&format!("{HEAD}[[step]]\naction = \"exec\"\n"));
        assert!(e.contains("needs `command`"), "{e}");
        let e = err(&format!(
            "{HEAD}[[step]]\naction = \"drop_caches\"\nlevel = 4\n"
        ));
        assert!(e.contains("1, 2 or 3"), "{e}");
    }

    #[test]
    fn match_and_steps_required() {
        let e = err("[match]\n[[step]]\naction='reclaim'\n");
        assert!(e.contains("at least one of cgroup"), "{e}");
        assert!(err(HEAD).contains("at least one [[step]]"));
        assert!(err("[[step]]\naction='reclaim'\n").contains("match"));
    }

    #[test]
    fn toml_syntax_error_has_position() {
        let e = err("name = \n");
        assert!(e.starts_with("p.toml:1:"), "{e}");
    }

    #[test]
    fn dir_loading_sorted_unique_and_default_when_empty() {
        let t = tempfile::tempdir().unwrap();
        assert!(load_dir(t.path()).unwrap().is_embedded_default());
        assert!(load_dir(&t.path().join("missing"))
            .unwrap()
            .is_embedded_default());
        let body = format!("{HEAD}[[step]]\naction='reclaim'\n");
        std::fs::write(t.path().join("b.toml"), format!("name='same'\n{body}")).unwrap();
        std::fs::write(t.path().join("a.toml"), &body).unwrap();
        std::fs::write(t.path().join("notes.txt"), "ignored").unwrap();
        let set = load_dir(t.path()).unwrap();
        let names: Vec<_> = set.policies().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "same"]);
        std::fs::write(t.path().join("c.toml"), format!("name='same'\n{body}")).unwrap();
        let errs = load_dir(t.path()).unwrap_err();
        assert_eq!(errs.len(), 1);
        let e = errs[0].to_string();
        assert!(
            e.contains("c.toml:1:6: ") && e.contains("already used"),
            "{e}"
        );
    }

    #[test]
    fn a_nul_byte_in_an_exec_command_or_the_policy_name_is_refused_at_load() {
        // execve takes NUL-terminated strings: such a hook (or any hook of a policy
        // whose name goes into OOMWAKE_POLICY with a NUL) could never start, and the
        // policy used to load and fail at every episode instead.
        let e = step_err("action = \"exec\"\ncommand = [\"/bin/echo\", \"a\\u0000b\"]\n");
        assert!(e.starts_with("p.toml:5:11: ") && e.contains("NUL"), "{e}");
        let e = step_err("action = \"exec\"\ncommand = [\"/bin/true\\u0000\"]\n");
        assert!(e.starts_with("p.toml:5:11: ") && e.contains("NUL"), "{e}");
        let e = err(&format!(
            "name = \"a\\u0000b\"\n{HEAD}[[step]]\naction = \"exec\"\ncommand = [\"/bin/true\"]\n"
        ));
        assert!(e.starts_with("p.toml:1:8: ") && e.contains("NUL"), "{e}");
    }

    #[test]
    fn kernel_oom_kill_parses_with_its_timeout_and_refuses_victim_keys() {
        let p = load_str(
            &format!("{HEAD}[[step]]\naction = \"kernel_oom_kill\"\n[[step]]\naction = \"kernel_oom_kill\"\ntimeout = \"500ms\"\n"),
            "p.toml",
        )
        .unwrap();
        match (&p.steps[0].action, &p.steps[1].action) {
            (Action::KernelOomKill { timeout: a }, Action::KernelOomKill { timeout: b }) => {
                assert_eq!(*a, DEFAULT_HANDOFF_TIMEOUT);
                assert_eq!(*b, Duration::from_millis(500));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.steps[0].action.name(), "kernel_oom_kill");
        let e = step_err("action = \"kernel_oom_kill\"\nvictim = \"largest_rss\"\n");
        assert!(e.starts_with("p.toml:5:10: "), "{e}");
        assert!(
            e.contains("key `victim` does not apply to action `kernel_oom_kill`: the kernel chooses the victim itself"),
            "{e}"
        );
        let e = step_err("action = \"kernel_oom_kill\"\nsignal = \"SIGTERM\"\n");
        assert!(e.contains("sends SIGKILL"), "{e}");
        let e = step_err("action = \"kernel_oom_kill\"\ntimeout = \"0s\"\n");
        assert!(
            e.starts_with("p.toml:5:11: ") && e.contains("greater than zero"),
            "{e}"
        );
        let e = step_err("action = \"kernel_oom_kill\"\ntimeout = \"90s\"\n");
        assert!(
            e.starts_with("p.toml:5:11: ") && e.contains("at most 1m"),
            "{e}"
        );
        let e = err(&format!("{HEAD}[early]\nat = \"75%\"\n[[early.step]]\naction = \"kernel_oom_kill\"\n[[step]]\naction = \"kill\"\n"));
        assert!(
            e.starts_with("p.toml:6:10: ") && e.contains("only at the wall"),
            "{e}"
        );
        let e = step_err("action = \"kernel_oom_kil\"\n");
        assert!(
            e.starts_with("p.toml:4:10: ") && e.contains("kernel_oom_kill"),
            "{e}"
        );
    }

    fn step_err(step: &str) -> String {
        err(&format!("{HEAD}[[step]]\n{step}"))
    }

    fn step_warnings(step: &str) -> Vec<String> {
        load_one(&format!("{HEAD}[[step]]\n{step}"), "p.toml")
            .unwrap_or_else(|e| panic!("{step}: {e}"))
            .1
    }

    #[test]
    fn absurd_sizes_and_percentages_have_positions() {
        let e = step_err("action = \"raise_limit\"\nby = \"1e30%\"\nmax_extra = \"25%\"\n");
        assert!(e.starts_with("p.toml:5:6: "), "{e}");
        assert!(e.contains("at most 1000%"), "{e}");
        let e = step_err("action = \"raise_limit\"\nby = \"10%\"\nmax_extra = \"nan%\"\n");
        assert!(e.starts_with("p.toml:6:13: "), "{e}");
        let e = step_err("action = \"raise_limit\"\nby = \"-5%\"\nmax_extra = \"25%\"\n");
        assert!(e.starts_with("p.toml:5:6: "), "{e}");
        let e =
            step_err("action = \"raise_limit\"\nby = \"10%\"\nmax_limit = 18446744073709551615\n");
        assert!(e.starts_with("p.toml:6:"), "{e}");
        let e = step_err("action = \"raise_limit\"\nby = \"10%\"\nmax_limit = \"9000000T\"\n");
        assert!(e.starts_with("p.toml:6:13: "), "{e}");
        assert!(e.contains("largest limit the kernel can hold"), "{e}");
        let e = step_err("action = \"raise_limit\"\nby = \"inf\"\nmax_extra = \"25%\"\n");
        assert!(e.starts_with("p.toml:5:6: "), "{e}");
    }

    #[test]
    fn values_that_make_no_sense_are_errors_at_their_position() {
        let cases = [
            (
                "action = \"raise_limit\"\nby = \"10%\"\nmax_extra = \"25%\"\nhold = \"0s\"\n",
                "p.toml:7:8: ",
                "`hold` must be greater than zero",
            ),
            (
                "action = \"raise_limit\"\nby = \"10%\"\nmax_limit = 0\n",
                "p.toml:6:13: ",
                "`max_limit` of 0",
            ),
            (
                "action = \"raise_limit\"\nby = \"10%\"\nmax_extra = \"0%\"\n",
                "p.toml:6:13: ",
                "`max_extra` of 0",
            ),
            (
                "action = \"reclaim\"\nsettle = \"8000h\"\n",
                "p.toml:5:10: ",
                "`settle` of 8000h is too long",
            ),
            (
                "action = \"signal\"\ngrace = \"2h\"\n",
                "p.toml:5:9: ",
                "`grace` of 2h is too long",
            ),
            (
                "action = \"exec\"\ncommand = [\"page-oncall\"]\n",
                "p.toml:5:11: ",
                "absolute path",
            ),
            (
                "action = \"exec\"\ncommand = [\"/bin/true\"]\ntimeout = \"0s\"\n",
                "p.toml:6:11: ",
                "`timeout` must be greater than zero",
            ),
        ];
        for (step, pos, msg) in cases {
            let e = step_err(step);
            assert!(e.starts_with(pos) && e.contains(msg), "{step}: {e}");
        }
        for sig in [
            "SIGSTOP", "STOP", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGCONT",
        ] {
            let e = step_err(&format!("action = \"signal\"\nsignal = \"{sig}\"\n"));
            assert!(
                e.starts_with("p.toml:5:10: ") && e.contains("stopping or continuing"),
                "{sig}: {e}"
            );
        }
    }

    #[test]
    fn likely_mistakes_are_warnings_with_positions() {
        let w = step_warnings("action = \"signal\"\nsignal = \"SIGWINCH\"\ngrace = \"0s\"\n");
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with("p.toml:5:10: warning: ") && w[0].contains("ignored by default"));
        assert!(w[1].starts_with("p.toml:6:9: warning: ") && w[1].contains("`grace` of 0"));
        let w = step_warnings("action = \"reclaim\"\nsettle = \"5m\"\n");
        assert!(
            w[0].starts_with("p.toml:5:10: warning: `settle` of 5m"),
            "{w:?}"
        );
        let w = step_warnings(
            "action = \"raise_limit\"\nby = \"10%\"\nmax_extra = \"25%\"\nhold = \"2s\"\n",
        );
        assert!(
            w[0].starts_with("p.toml:7:8: warning: `restore_after`"),
            "{w:?}"
        );
        assert!(step_warnings("action = \"signal\"\n").is_empty());
        // Warnings travel with the set, for `check` and the agent's log.
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("w.toml");
        std::fs::write(
            &f,
            format!("{HEAD}[[step]]\naction = \"reclaim\"\nsettle = \"5m\"\n"),
        )
        .unwrap();
        let set = load_files(&[f]).unwrap();
        assert_eq!(set.warnings().len(), 1);
        assert_eq!(set.all_audit().warnings().len(), 1);
    }

    #[test]
    fn an_unreadable_toml_is_an_error_not_a_reason_for_the_default() {
        let t = tempfile::tempdir().unwrap();
        // Only a dangling link: the directory is not empty, so no embedded default.
        std::os::unix::fs::symlink(t.path().join("gone.toml"), t.path().join("audit.toml"))
            .unwrap();
        let errs = load_dir(t.path()).unwrap_err();
        let e = errs[0].to_string();
        assert!(
            e.starts_with(&format!("{}: ", t.path().join("audit.toml").display())),
            "{e}"
        );
        // A loop beside a good file: still refused.
        std::fs::remove_file(t.path().join("audit.toml")).unwrap();
        std::fs::write(
            t.path().join("audit.toml"),
            format!("mode = \"audit\"\n{HEAD}[[step]]\naction = \"kill\"\n"),
        )
        .unwrap();
        std::os::unix::fs::symlink(t.path().join("loop.toml"), t.path().join("loop.toml")).unwrap();
        let errs = load_dir(t.path()).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].to_string().contains("loop.toml: "), "{}", errs[0]);
        std::fs::remove_file(t.path().join("loop.toml")).unwrap();
        // Hidden entries are not policies (an editor's dangling lock link).
        std::os::unix::fs::symlink("user@host.123", t.path().join(".#audit.toml")).unwrap();
        assert!(load_dir(t.path()).is_ok());
        // A directory named *.toml is not a policy either.
        std::fs::create_dir(t.path().join("dir.toml")).unwrap();
        assert!(load_dir(t.path()).is_err());
        std::fs::remove_dir(t.path().join("dir.toml")).unwrap();
        let set = load_dir(t.path()).unwrap();
        assert!(!set.is_embedded_default());
        assert_eq!(set.policies()[0].mode, Mode::Audit);
    }

    #[test]
    fn strict_mode_refuses_a_world_writable_policies_dir() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("policies");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("a.toml"),
            format!("{HEAD}[[step]]\naction='reclaim'\n"),
        )
        .unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let errs = load_dir(&dir).unwrap_err();
        let e = errs[0].to_string();
        assert!(e.contains("writable by group or others"), "{e}");
        assert!(e.contains(&format!("chmod go-w {}", dir.display())), "{e}");
        assert!(e.contains("--insecure-policies"), "{e}");
        assert_eq!(
            load_dir_with(&dir, Trust::Insecure)
                .unwrap()
                .policies()
                .len(),
            1
        );
    }

    #[test]
    fn position_counts_characters() {
        assert_eq!(position("ab\ncé d", 7), (2, 4));
        assert_eq!(position("", 0), (1, 1));
    }

    #[test]
    fn pinned_detection_is_on_by_default_and_a_policy_can_opt_out() {
        let kill = "[[step]]\naction = \"kill\"\n";
        assert!(load_str(&format!("{HEAD}{kill}"), "p.toml").unwrap().pinned);
        let p = load_str(&format!("pinned = false\n{HEAD}{kill}"), "p.toml").unwrap();
        assert!(!p.pinned);
        let p = load_str(&format!("pinned = true\n{HEAD}{kill}"), "p.toml").unwrap();
        assert!(p.pinned);
        // Not a boolean: the position of the value.
        let e = err(&format!("name = \"x\"\npinned = \"no\"\n{HEAD}{kill}"));
        assert!(e.starts_with("p.toml:2:10: "), "{e}");
        assert!(e.contains("bool"), "{e}");
        // It belongs at the top level: inside [match] it is an unknown key.
        let e = err(&format!("{HEAD}pinned = false\n{kill}"));
        assert!(e.starts_with("p.toml:3:1: ") && e.contains("pinned"), "{e}");
    }

    const EARLY: &str = "[early]\nat = \"75%\"\n[[early.step]]\naction = \"raise_limit\"\nby = \"50%\"\nmax_extra = \"100%\"\n[[step]]\naction = \"kill\"\n";

    #[test]
    fn early_keys_load_with_the_same_actions_as_steps() {
        let p = load_str(&format!("{HEAD}{EARLY}"), "p.toml").unwrap();
        let e = p.early.expect("[early] loaded");
        assert_eq!(e.at, Amount::Percent(0.75));
        assert_eq!(e.steps.len(), 1);
        assert!(
            matches!(e.steps[0].action, Action::RaiseLimit(ref r) if r.by == Amount::Percent(0.5))
        );
        assert_eq!(e.steps[0].settle, DEFAULT_SETTLE);
        assert_eq!(p.steps.len(), 1, "[[early.step]] is not a [[step]]");
        let p = load_str(
            &format!("{HEAD}[early]\nat = \"48MiB\"\n[[early.step]]\naction = \"exec\"\ncommand = [\"/bin/true\"]\n[[step]]\naction = \"kill\"\n"),
            "p.toml",
        )
        .unwrap();
        assert_eq!(p.early.unwrap().at, Amount::Bytes(48 << 20));
        let p = load_str(&format!("{HEAD}[[step]]\naction = \"kill\"\n"), "p.toml").unwrap();
        assert!(p.early.is_none());
    }

    #[test]
    fn early_errors_name_file_line_and_column() {
        // Line 4 column 6: the value of `at`.
        for (bad, msg) in [
            ("0%", "above 0%"),
            ("100%", "below 100%"),
            ("150%", "below 100%"),
            ("0", "greater than zero"),
        ] {
            let e = err(&EARLY
                .replacen("75%", bad, 1)
                .replace("[early]", &format!("{HEAD}[early]")));
            assert!(e.starts_with("p.toml:4:6: "), "{bad}: {e}");
            assert!(e.contains(msg), "{bad}: {e}");
        }
        let e = err(&format!(
            "{HEAD}[early]\n[[early.step]]\naction = \"kill\"\n[[step]]\naction = \"kill\"\n"
        ));
        assert!(
            e.starts_with("p.toml:3:1: ") && e.contains("needs `at`"),
            "{e}"
        );
        let e = err(&format!(
            "{HEAD}[early]\nat = \"75%\"\n[[step]]\naction = \"kill\"\n"
        ));
        assert!(
            e.starts_with("p.toml:3:1: ") && e.contains("[[early.step]]"),
            "{e}"
        );
        // A key that does not belong to the early step's action points at the key.
        let e = err(&format!("{HEAD}[early]\nat = \"75%\"\n[[early.step]]\naction = \"kill\"\nby = \"5%\"\n[[step]]\naction = \"kill\"\n"));
        assert!(
            e.starts_with("p.toml:7:6: ") && e.contains("does not apply"),
            "{e}"
        );
        // Unknown keys in [early] and in its steps.
        let e = err(&format!("{HEAD}[early]\nat = \"75%\"\nwhen = 1\n[[early.step]]\naction = \"kill\"\n[[step]]\naction = \"kill\"\n"));
        assert!(
            e.starts_with("p.toml:5:1: ") && e.contains("unknown field `when`"),
            "{e}"
        );
        let e = err(&format!("{HEAD}[early]\nat = \"75%\"\n[[early.step]]\naction = \"explode\"\n[[step]]\naction = \"kill\"\n"));
        assert!(e.starts_with("p.toml:6:10: "), "{e}");
    }

    #[test]
    fn early_at_far_below_the_limit_is_a_warning() {
        let quiet = EARLY.replace("max_extra", "restore_below = \"20%\"\nmax_extra");
        let (_, w) = load_one(&format!("{HEAD}{}", quiet.replace("75%", "30%")), "p.toml").unwrap();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("p.toml:4:6: warning: "), "{w:?}");
        let (_, w) = load_one(&format!("{HEAD}{quiet}"), "p.toml").unwrap();
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn early_loan_given_back_above_the_threshold_is_a_warning() {
        // restore_below defaults to 90%, above `at`: pointed at the step's action.
        let (_, w) = load_one(&format!("{HEAD}{EARLY}"), "p.toml").unwrap();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("p.toml:6:10: warning: an early loan"),
            "{w:?}"
        );
        let at_key = EARLY.replace("max_extra", "restore_below = \"80%\"\nmax_extra");
        let (_, w) = load_one(&format!("{HEAD}{at_key}"), "p.toml").unwrap();
        assert!(w[0].starts_with("p.toml:8:17: warning: "), "{w:?}");
    }

    #[test]
    fn restore_below_that_can_never_be_reached_is_refused_at_its_position() {
        // Usage is never below 0 bytes: such a loan was kept for good.
        for v in ["0%", "0.0%", "-0%"] {
            let e = step_err(&format!(
                "action = \"raise_limit\"\nby = \"10%\"\nmax_extra = \"25%\"\nrestore_below = \"{v}\"\n"
            ));
            assert!(
                e.starts_with("p.toml:7:17: ") && e.contains("can never be reached"),
                "{v}: {e}"
            );
        }
        // In an [early] step too.
        let early = EARLY.replace("max_extra", "restore_below = \"0%\"\nmax_extra");
        let e = err(&format!("{HEAD}{early}"));
        assert!(e.starts_with("p.toml:8:17: "), "{e}");
        // Reachable, if only by a workload that shed almost everything: a warning.
        let w = step_warnings(
            "action = \"raise_limit\"\nby = \"10%\"\nmax_extra = \"25%\"\nrestore_below = \"0.5%\"\n",
        );
        assert!(
            w.iter()
                .any(|w| w.starts_with("p.toml:7:17: warning: `restore_below` of 0.5%")),
            "{w:?}"
        );
    }

    #[test]
    fn a_glob_with_too_many_double_stars_is_refused_at_its_position() {
        let e = err(&format!(
            "[match]\ncgroup = [\"/a\", \"{}/x\"]\n[[step]]\naction = \"kill\"\n",
            "/**".repeat(9)
        ));
        assert!(
            e.starts_with("p.toml:2:17: ") && e.contains("at most 8"),
            "{e}"
        );
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn chmod(p: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn named(name: &str) -> String {
        format!("name = \"{name}\"\n{HEAD}[[step]]\naction = \"reclaim\"\n")
    }

    /// Runs `f` on a thread of its own: None if it has not returned within `limit` (the
    /// thread is left behind).
    fn within<T: Send + 'static>(
        limit: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit).ok()
    }

    fn dir_errors(dir: &Path, trust: Trust) -> Option<Result<usize, Vec<String>>> {
        let dir = dir.to_path_buf();
        within(Duration::from_secs(5), move || {
            load_dir_with(&dir, trust)
                .map(|s| s.policies().len())
                .map_err(|e| e.iter().map(|e| e.to_string()).collect())
        })
    }

    /// A root-owned tree: `etc/` (0755) with `good.toml` (0644), and `shared/`, a
    /// root-owned sticky directory anyone may write to, like /tmp.
    fn shared_tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let etc = t.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        chmod(&etc, 0o755);
        std::fs::write(etc.join("good.toml"), named("good")).unwrap();
        chmod(&etc.join("good.toml"), 0o644);
        let shared = t.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        chmod(&shared, 0o1777);
        (t, etc, shared)
    }

    #[test]
    fn a_policy_link_another_user_owns_is_refused_and_its_flipped_target_never_read() {
        if !is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let (t, etc, shared) = shared_tree();
        let user = t.path().join("user");
        std::fs::create_dir(&user).unwrap();
        std::fs::write(user.join("evil.toml"), named("planted")).unwrap();
        std::os::unix::fs::chown(&user, Some(65534), Some(65534)).unwrap();
        std::os::unix::fs::chown(user.join("evil.toml"), Some(65534), Some(65534)).unwrap();
        // User 65534's link in the sticky directory, to root's trusted file: its target
        // passed the old check (which judged the target only), and the user can turn it
        // elsewhere at any moment.
        let link = shared.join("p.toml");
        std::os::unix::fs::symlink(etc.join("good.toml"), &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
        let errs = load_files(std::slice::from_ref(&link)).unwrap_err();
        let e = errs[0].to_string();
        assert!(
            e.starts_with(&format!(
                "{}: a symbolic link owned by uid 65534",
                link.display()
            )),
            "{e}"
        );
        // The user flips it between their file and root's while the policy is loaded
        // over and over: the user's policy is never loaded.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flipper = {
            let (stop, shared, link) = (stop.clone(), shared.clone(), link.clone());
            let targets = [etc.join("good.toml"), user.join("evil.toml")];
            std::thread::spawn(move || {
                let tmp = shared.join(".flip");
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = std::fs::remove_file(&tmp);
                    std::os::unix::fs::symlink(&targets[i % 2], &tmp).unwrap();
                    std::os::unix::fs::lchown(&tmp, Some(65534), Some(65534)).unwrap();
                    std::fs::rename(&tmp, &link).unwrap();
                    i += 1;
                }
            })
        };
        let mut planted = 0;
        for _ in 0..300 {
            if let Ok(set) = load_files(std::slice::from_ref(&link)) {
                planted += usize::from(set.policies()[0].name == "planted");
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flipper.join().unwrap();
        assert_eq!(planted, 0, "the user's policy was loaded");
        // With --insecure-policies links are followed whoever owns them.
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(etc.join("good.toml"), &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
        let set = load_files_with(std::slice::from_ref(&link), Trust::Insecure).unwrap();
        assert_eq!(set.policies()[0].name, "good");
    }

    #[test]
    fn a_link_on_the_way_is_followed_only_if_root_owns_it() {
        if !is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let (_t, _etc, shared) = shared_tree();
        // Root's link in the sticky directory: only root can replace it (a ConfigMap's
        // `..data` links, a merged /usr's /bin are such links).
        let d = shared.join("d");
        std::os::unix::fs::symlink("../etc", &d).unwrap();
        let file = d.join("good.toml");
        let set = load_files(std::slice::from_ref(&file)).unwrap();
        assert_eq!(set.policies()[0].name, "good");
        assert_eq!(load_dir(&d).unwrap().policies().len(), 1);
        // Another user's link as a directory on the way: refused, file and directory.
        std::os::unix::fs::lchown(&d, Some(65534), None).unwrap();
        let e = load_files(std::slice::from_ref(&file)).unwrap_err()[0].to_string();
        assert!(
            e.starts_with(&format!(
                "{}: a symbolic link owned by uid 65534",
                d.display()
            )),
            "{e}"
        );
        assert!(
            e.contains(&format!("reached through {}", file.display())),
            "{e}"
        );
        let e = load_dir(&d).unwrap_err()[0].to_string();
        assert!(e.contains("a symbolic link owned by uid 65534"), "{e}");
        assert!(load_files_with(std::slice::from_ref(&file), Trust::Insecure).is_ok());
    }

    #[test]
    fn a_fifo_named_toml_is_refused_without_blocking() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("a.toml"), named("a")).unwrap();
        nix::unistd::mkfifo(
            &t.path().join("b.toml"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        for trust in [Trust::Strict, Trust::Insecure] {
            let errs = dir_errors(t.path(), trust)
                .expect("loading the policies blocked on a FIFO")
                .unwrap_err();
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert!(
                errs[0].starts_with(&format!(
                    "{}: a FIFO, not a regular file",
                    t.path().join("b.toml").display()
                )),
                "{errs:?}"
            );
        }
    }

    #[test]
    fn a_link_to_dev_zero_is_refused_without_reading_it() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("a.toml"), named("a")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", t.path().join("z.toml")).unwrap();
        for trust in [Trust::Strict, Trust::Insecure] {
            let errs = dir_errors(t.path(), trust)
                .expect("loading the policies kept reading /dev/zero")
                .unwrap_err();
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert!(
                errs[0].starts_with("/dev/zero: a character device, not a regular file")
                    && errs[0].contains(&format!(
                        "reached through {}",
                        t.path().join("z.toml").display()
                    )),
                "{errs:?}"
            );
        }
    }

    #[test]
    fn a_policy_file_over_the_size_bound_is_refused_with_its_name() {
        let t = tempfile::tempdir().unwrap();
        let big = t.path().join("big.toml");
        let head = named("big");
        let pad = crate::perm::MAX_FILE as usize - head.len() - 1;
        // Exactly the bound: loads.
        std::fs::write(&big, format!("{head}#{}", "x".repeat(pad))).unwrap();
        assert_eq!(
            std::fs::metadata(&big).unwrap().len(),
            crate::perm::MAX_FILE
        );
        load_files(std::slice::from_ref(&big)).unwrap();
        // One byte more: refused, naming the file.
        std::fs::write(&big, format!("{head}#{}", "x".repeat(pad + 1))).unwrap();
        let e = load_files(std::slice::from_ref(&big)).unwrap_err()[0].to_string();
        assert!(
            e.starts_with(&format!("{}: larger than 1048576 bytes", big.display())),
            "{e}"
        );
        let errs = dir_errors(t.path(), Trust::Strict).unwrap().unwrap_err();
        assert!(errs[0].contains("larger than 1048576 bytes"), "{errs:?}");
    }

    #[test]
    fn a_script_handed_to_a_trusted_program_is_judged_too_with_a_warning() {
        if !is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let home = t.path().join("home");
        std::fs::create_dir(&home).unwrap();
        chmod(&home, 0o755);
        let script = home.join("hook.sh");
        std::fs::write(&script, "true\n").unwrap();
        chmod(&script, 0o644);
        let p = t.path().join("p.toml");
        let cmd = format!(
            "command = [\"/bin/sh\", \"{}\", \"/nope\"]\n",
            script.display()
        );
        std::fs::write(&p, format!("{HEAD}[[step]]\naction = \"exec\"\n{cmd}")).unwrap();
        let load = || {
            load_files_with(std::slice::from_ref(&p), Trust::Strict)
                .map(|s| s.warnings().to_vec())
                .unwrap()
        };
        assert_eq!(load(), Vec::<String>::new());
        std::os::unix::fs::chown(&home, Some(65534), None).unwrap();
        let w = load();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(&format!(
                "{}:5:11: warning: {}: owned by uid 65534",
                p.display(),
                home.display()
            )) && w[0].contains("as an argument of an exec hook"),
            "{w:?}"
        );
    }

    #[test]
    fn a_hook_program_another_user_owns_or_may_write_is_refused_at_its_command() {
        if !is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let bin = t.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        chmod(&bin, 0o755);
        let hook = bin.join("hook");
        std::fs::write(&hook, "#!/bin/sh\ntrue\n").unwrap();
        chmod(&hook, 0o755);
        let p = t.path().join("p.toml");
        let cmd = format!("command = [\"{}\", \"x\"]\n", hook.display());
        std::fs::write(&p, format!("{HEAD}[[step]]\naction = \"exec\"\n{cmd}")).unwrap();
        let load = |trust| {
            load_files_with(std::slice::from_ref(&p), trust)
                .map(|s| s.warnings().to_vec())
                .map_err(|e| e[0].to_string())
        };
        assert_eq!(load(Trust::Strict), Ok(vec![]));
        let at = format!("{}:5:11: ", p.display());
        std::os::unix::fs::chown(&hook, Some(65534), None).unwrap();
        let e = load(Trust::Strict).unwrap_err();
        assert!(
            e.starts_with(&format!("{at}{}: owned by uid 65534", hook.display())),
            "{e}"
        );
        assert!(e.contains("as an exec hook"), "{e}");
        assert!(load(Trust::Insecure).is_ok());
        std::os::unix::fs::chown(&hook, Some(0), None).unwrap();
        chmod(&hook, 0o757);
        let e = load(Trust::Strict).unwrap_err();
        assert!(
            e.starts_with(&at) && e.contains("writable by group or others"),
            "{e}"
        );
        chmod(&hook, 0o755);
        chmod(&bin, 0o777);
        let e = load(Trust::Strict).unwrap_err();
        assert!(
            e.starts_with(&format!("{at}{}: writable", bin.display())),
            "{e}"
        );
        chmod(&bin, 0o755);
        // The interpreter a script names runs as root as well.
        let interp = bin.join("interp");
        std::fs::copy("/bin/sh", &interp).unwrap();
        std::os::unix::fs::chown(&interp, Some(65534), None).unwrap();
        std::fs::write(&hook, format!("#!{} -e\ntrue\n", interp.display())).unwrap();
        let e = load(Trust::Strict).unwrap_err();
        assert!(
            e.starts_with(&format!("{at}{}: owned by uid 65534", interp.display()))
                && e.contains("as the interpreter of an exec hook"),
            "{e}"
        );
        std::fs::write(&hook, "#!/bin/sh\ntrue\n").unwrap();
        // In [early] too.
        std::os::unix::fs::chown(&hook, Some(65534), None).unwrap();
        std::fs::write(
            &p,
            format!("{HEAD}[early]\nat = \"75%\"\n[[early.step]]\naction = \"exec\"\n{cmd}[[step]]\naction = \"kill\"\n"),
        )
        .unwrap();
        let e = load(Trust::Strict).unwrap_err();
        assert!(
            e.starts_with(&format!("{}:7:11: ", p.display())) && e.contains("uid 65534"),
            "{e}"
        );
        // A program that is not there yet: a warning at the command.
        std::fs::write(
            &p,
            format!(
                "{HEAD}[[step]]\naction = \"exec\"\ncommand = [\"{}\"]\n",
                bin.join("nope").display()
            ),
        )
        .unwrap();
        let w = load(Trust::Strict).unwrap();
        assert!(
            w.len() == 1 && w[0].starts_with(&format!("{at}warning: ")),
            "{w:?}"
        );
    }
}
