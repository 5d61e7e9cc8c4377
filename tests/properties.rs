//! Property tests of everything that reads bytes the agent does not control: the kernel's
//! control files, sizes and durations in policy files, policy files as a whole, and the
//! journal of lent limits as a crash leaves it. Only the public API is used, so the
//! modules can change inside without touching this file.
//!
//! Cases per property: `PROPTEST_CASES` if set (for a longer run, e.g.
//! `PROPTEST_CASES=20000 cargo test --release --test properties`), else a count small
//! enough for `cargo test` on two cores.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use oomwake::cgroup::parse;
use oomwake::cgroup::{CgroupPath, Limits};
use oomwake::journal::{Change, ChangeStep, Journal, LoanRecord};
use oomwake::policy::units::{self, Amount, Dur, Percent, Size};
use proptest::prelude::*;
use proptest::test_runner::Config;

/// `default` cases unless `PROPTEST_CASES` says otherwise.
fn cases(default: u32) -> Config {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Config {
        cases: n,
        // The failure files would land in tests/, beside this file: a shrunk failure is
        // printed in the test output, to be turned into a named regression test.
        failure_persistence: None,
        ..Config::default()
    }
}

/// Text that looks like what the parsers read (digits, keys, separators, odd bytes),
/// more likely to reach deep paths than uniform unicode.
fn kernelish_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("oom_kill_disable".to_string()),
            Just("under_oom".to_string()),
            Just("oom_kill".to_string()),
            Just("max".to_string()),
            Just("memory".to_string()),
            Just(" ".to_string()),
            Just("\t".to_string()),
            Just("\n".to_string()),
            Just(":".to_string()),
            Just(",".to_string()),
            Just("/".to_string()),
            Just("-".to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            "[0-9]{19,25}",
            any::<String>(),
        ],
        0..24,
    )
    .prop_map(|parts| parts.concat())
}

// ---------------------------------------------------------------------------------------
// Kernel control files (src/cgroup/parse.rs)
// ---------------------------------------------------------------------------------------

/// `memory.oom_control` as the kernel prints it, with lines a newer kernel might add.
fn oom_control_text(
    disable: u64,
    under: u64,
    kill: Option<u64>,
    extra: &[(String, u64)],
    order: &[usize],
) -> String {
    let mut lines = vec![
        format!("oom_kill_disable {disable}"),
        format!("under_oom {under}"),
    ];
    if let Some(k) = kill {
        lines.push(format!("oom_kill {k}"));
    }
    lines.extend(extra.iter().map(|(k, v)| format!("{k} {v}")));
    // A permutation: the parser must not depend on the kernel's line order.
    let mut keyed: Vec<(usize, String)> = lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| (order.get(i).copied().unwrap_or(i), l))
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, l)| l + "\n").collect()
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn oom_control_reads_what_the_kernel_writes(
        disable in 0u64..2,
        under in 0u64..2,
        kill in proptest::option::of(any::<u64>()),
        extra in prop::collection::vec(("[a-z_]{1,12}", any::<u64>()), 0..3)
            .prop_filter("not a known key", |v| v.iter().all(|(k, _)| {
                !matches!(k.as_str(), "oom_kill_disable" | "under_oom" | "oom_kill")
            })),
        order in prop::collection::vec(any::<usize>(), 6),
    ) {
        let text = oom_control_text(disable, under, kill, &extra, &order);
        let c = parse::oom_control(&text);
        prop_assert_eq!(
            c,
            Some(parse::OomControl {
                oom_kill_disable: disable == 1,
                under_oom: under == 1,
                oom_kill: kill.unwrap_or(0),
                rises: None,
            }),
            "{:?}", text
        );
    }

    #[test]
    fn oom_control_truncated_is_none_or_a_prefix_of_the_truth(
        disable in 0u64..2,
        under in 0u64..2,
        kill in any::<u64>(),
        cut in any::<prop::sample::Index>(),
    ) {
        // A short read can only lose lines at the end: either both required lines
        // survived (and were read right) or the result is None, never a made-up state.
        let text = format!("oom_kill_disable {disable}\nunder_oom {under}\noom_kill {kill}\n");
        let cut = cut.index(text.len() + 1);
        if let Some(c) = parse::oom_control(&text[..cut]) {
            prop_assert_eq!(c.oom_kill_disable, disable == 1);
            prop_assert_eq!(c.under_oom, under == 1);
            // `oom_kill 1234` cut to `oom_kill 12` is a prefix of the number, never more.
            prop_assert!(kill.to_string().starts_with(&c.oom_kill.to_string()) || c.oom_kill == 0);
        }
    }

    #[test]
    fn parsers_never_panic_on_arbitrary_text(s in kernelish_text()) {
        let _ = parse::oom_control(&s);
        let _ = parse::bytes(&s);
        let _ = parse::flat_keyed(&s);
        let _ = parse::pids(&s);
        let _ = parse::proc_memory_cgroup(&s);
    }

    #[test]
    fn bytes_reads_any_u64_with_surrounding_whitespace(
        n in any::<u64>(),
        pre in "[ \t]{0,2}",
        post in "[ \t]{0,2}\n?",
    ) {
        prop_assert_eq!(parse::bytes(&format!("{pre}{n}{post}")), Some(n));
        prop_assert_eq!(parse::bytes(&format!("{pre}max{post}")), Some(u64::MAX));
    }

    #[test]
    fn bytes_rejects_negative_and_overflowing_numbers(n in 1u64.., extra in 0u64..10) {
        prop_assert_eq!(parse::bytes(&format!("-{n}")), None);
        // u64::MAX * 10 + extra does not fit in a u64: None, not a wrapped value.
        prop_assert_eq!(parse::bytes(&format!("{}{extra}", u64::MAX)), None);
    }

    #[test]
    fn is_unlimited_is_monotonic(a in any::<u64>(), b in any::<u64>()) {
        let (lo, hi) = (a.min(b), a.max(b));
        prop_assert!(!parse::is_unlimited(lo) || parse::is_unlimited(hi));
    }

    #[test]
    fn flat_keyed_reads_what_memory_stat_writes(
        m in prop::collection::btree_map("[a-z_]{1,24}", any::<u64>(), 0..40),
        sep in prop_oneof![Just(" "), Just("\t"), Just("  ")],
    ) {
        let text: String = m.iter().map(|(k, v)| format!("{k}{sep}{v}\n")).collect();
        prop_assert_eq!(parse::flat_keyed(&text), Some(m));
    }

    #[test]
    fn flat_keyed_rejects_a_bad_value_anywhere(
        m in prop::collection::btree_map("[a-z_]{1,24}", any::<u64>(), 1..20),
        at in any::<prop::sample::Index>(),
        bad in prop_oneof![Just("x"), Just("-1"), Just("1.5"), Just("18446744073709551616")],
    ) {
        let bad_at = at.index(m.len());
        let text: String = m
            .iter()
            .enumerate()
            .map(|(i, (k, v))| if i == bad_at { format!("{k} {bad}\n") } else { format!("{k} {v}\n") })
            .collect();
        prop_assert_eq!(parse::flat_keyed(&text), None);
    }

    #[test]
    fn pids_reads_what_cgroup_procs_writes(v in prop::collection::vec(1i32.., 0..100)) {
        let text: String = v.iter().map(|p| format!("{p}\n")).collect();
        prop_assert_eq!(parse::pids(&text), Some(v));
    }

    #[test]
    fn proc_cgroup_finds_the_memory_line_wherever_it_is(
        others in prop::collection::vec(
            (1u32..20, prop::sample::subsequence(
                vec!["cpu", "cpuacct", "blkio", "pids", "devices", "name=systemd", "net_cls"], 1..3,
            ), "(/[a-zA-Z0-9_.:@ -]{1,12}){0,4}"),
            0..6,
        ),
        memory in proptest::option::of((
            prop::sample::subsequence(vec!["cpu", "pids"], 0..2),
            "(/[a-zA-Z0-9_.:@ -]{1,12}){0,4}",
        )),
        unified in proptest::option::of("(/[a-zA-Z0-9_.:@ -]{1,12}){0,4}"),
        at in any::<prop::sample::Index>(),
    ) {
        // Paths may contain ':' (the kernel does not escape it): only the first two
        // colons separate fields.
        let mut lines: Vec<String> = others
            .iter()
            .map(|(id, c, p)| format!("{id}:{}:{}", c.join(","), if p.is_empty() { "/" } else { p }))
            .collect();
        let mut want = None;
        if let Some((co, p)) = &memory {
            let p = if p.is_empty() { "/".to_string() } else { p.clone() };
            let mut ctrls = co.clone();
            ctrls.insert(at.index(co.len() + 1), "memory");
            lines.insert(at.index(lines.len() + 1), format!("7:{}:{p}", ctrls.join(",")));
            want = Some(p);
        }
        if let Some(p) = &unified {
            let p = if p.is_empty() { "/".to_string() } else { p.clone() };
            lines.push(format!("0::{p}"));
            want = want.or(Some(p));
        }
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        prop_assert_eq!(parse::proc_memory_cgroup(&text), want, "{:?}", text);
    }
}

/// A cgroup name as the kernel may hand it over: any bytes but `/` and NUL, biased to
/// the bytes the text form escapes.
fn name_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            3 => prop::sample::select(b"\\x5cfe80aZ.-_ :".to_vec()),
            1 => 0x80u8..=0xff,
            1 => 1u8..=0xff,
        ],
        1..12,
    )
    .prop_filter("a name", |n| {
        !n.contains(&b'/') && !n.contains(&0) && n != b".." && n != b"."
    })
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn cgroup_path_text_form_reads_back_to_the_same_bytes(
        names in prop::collection::vec(name_bytes(), 0..5),
    ) {
        let raw: Vec<u8> = names.iter().flat_map(|n| [b"/".as_slice(), n].concat()).collect();
        let p = CgroupPath::from_bytes(&raw);
        prop_assert!(p.is_ok(), "{p:?}");
        let p = p.unwrap_or_else(|_| CgroupPath::root());
        let want: &[u8] = if raw.is_empty() { b"/" } else { &raw };
        prop_assert_eq!(p.as_bytes(), want);
        prop_assert_eq!(CgroupPath::parse(p.as_str()).ok(), Some(p.clone()));
        let json = serde_json::to_string(&p).map_err(fail)?;
        prop_assert_eq!(serde_json::from_str::<CgroupPath>(&json).ok(), Some(p.clone()));
        // The tree relations hold on the bytes.
        if let Some(parent) = p.parent() {
            prop_assert!(p.is_within(&parent));
            prop_assert!(!parent.is_within(&p));
        }
        if let Some(last) = names.last() {
            let parent = p.parent().unwrap_or_else(CgroupPath::root);
            use std::os::unix::ffi::OsStrExt;
            prop_assert_eq!(parent.join(std::ffi::OsStr::from_bytes(last)), p);
        }
    }

    #[test]
    fn cgroup_path_never_leaves_the_root(
        names in prop::collection::vec(
            prop_oneof![name_bytes(), Just(b"..".to_vec()), Just(b".".to_vec())],
            0..6,
        ),
    ) {
        let raw: Vec<u8> = names.iter().flat_map(|n| [b"/".as_slice(), n].concat()).collect();
        let has_parent = names.iter().any(|n| n == b"..");
        let text = String::from_utf8_lossy(&raw).into_owned();
        prop_assert_eq!(CgroupPath::from_bytes(&raw).is_err(), has_parent);
        if let Ok(p) = CgroupPath::parse(&text) {
            prop_assert!(!p.as_bytes().split(|&b| b == b'/').any(|s| s == b".."));
        }
        let json = serde_json::to_string(&text).map_err(fail)?;
        if let Ok(p) = serde_json::from_str::<CgroupPath>(&json) {
            prop_assert!(!p.as_bytes().split(|&b| b == b'/').any(|s| s == b".."));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Sizes, durations, percentages (src/policy/units.rs)
// ---------------------------------------------------------------------------------------

const SIZE_UNITS: [(&str, u64); 11] = [
    ("", 1),
    ("B", 1),
    ("K", 1 << 10),
    ("k", 1 << 10),
    ("KiB", 1 << 10),
    ("M", 1 << 20),
    ("MiB", 1 << 20),
    ("G", 1 << 30),
    ("GiB", 1 << 30),
    ("T", 1 << 40),
    ("TiB", 1 << 40),
];

/// Sizes up to 64 TiB: exact in an f64 and far below any sane upper bound a loader
/// may set, so the round trip must be exact.
const EXACT_SIZE_MAX: u64 = 1 << 46;

const DURATION_UNITS: [(&str, u64); 4] = [("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000)];

/// A value in a TOML document, read through the types' own Deserialize (what a policy
/// file goes through).
fn from_toml<T: serde::de::DeserializeOwned>(value: &str) -> Result<T, String> {
    #[derive(serde::Deserialize)]
    struct Doc<T> {
        v: T,
    }
    toml::from_str::<Doc<T>>(&format!("v = {value}\n"))
        .map(|d| d.v)
        .map_err(|e| e.to_string())
}

/// Arbitrary text near the size / duration grammar.
fn unitish_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            "[0-9]{1,30}",
            Just(".".to_string()),
            Just("e".to_string()),
            Just("-".to_string()),
            Just("+".to_string()),
            Just(" ".to_string()),
            Just("%".to_string()),
            prop::sample::select(vec![
                "B", "K", "KiB", "M", "MiB", "G", "GiB", "T", "TiB", "ms", "s", "m", "h", "inf",
                "NaN", "E", "d",
            ])
            .prop_map(str::to_string),
            any::<String>(),
        ],
        0..8,
    )
    .prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn size_round_trips_in_every_unit(
        unit in prop::sample::select(SIZE_UNITS.to_vec()),
        n in any::<u64>(),
        space in prop_oneof![Just(""), Just(" ")],
        pad in prop_oneof![Just(""), Just(" "), Just("\t")],
    ) {
        let (u, mult) = unit;
        let n = n % (EXACT_SIZE_MAX / mult + 1);
        let sp = if u.is_empty() { "" } else { space };
        let text = format!("{pad}{n}{sp}{u}{pad}");
        prop_assert_eq!(units::parse_size(&text), Ok(n * mult), "{:?}", text);
        prop_assert_eq!(from_toml::<Size>(&format!("{text:?}")), Ok(Size(n * mult)));
    }

    #[test]
    fn size_as_a_toml_integer_is_bytes(n in 0i64..(EXACT_SIZE_MAX as i64)) {
        prop_assert_eq!(from_toml::<Size>(&n.to_string()), Ok(Size(n as u64)));
        prop_assert!(from_toml::<Size>(&(-n - 1).to_string()).is_err());
    }

    #[test]
    fn size_decimals_round_to_the_nearest_byte(
        unit in prop::sample::select(SIZE_UNITS[2..].to_vec()),
        whole in 0u64..1024,
        thousandths in 0u64..1000,
    ) {
        let (u, mult) = unit;
        let text = format!("{whole}.{thousandths:03}{u}");
        let exact = (whole * 1000 + thousandths) as f64 * mult as f64 / 1000.0;
        let got = units::parse_size(&text);
        prop_assert!(got.is_ok(), "{text:?}: {got:?}");
        let got = got.unwrap_or_default() as f64;
        // Within a byte of the exact value (decimal fractions are not exact in binary).
        prop_assert!((got - exact).abs() <= 1.0, "{text:?}: {got} vs {exact}");
    }

    #[test]
    fn size_is_monotonic_within_a_unit(
        unit in prop::sample::select(SIZE_UNITS.to_vec()),
        a in any::<u64>(),
        b in any::<u64>(),
    ) {
        // Over the whole range, including where f64 rounds: a larger number never
        // parses to a smaller size.
        let (u, _) = unit;
        let (lo, hi) = (a.min(b), a.max(b));
        if let (Ok(x), Ok(y)) = (
            units::parse_size(&format!("{lo}{u}")),
            units::parse_size(&format!("{hi}{u}")),
        ) {
            prop_assert!(x <= y, "{lo}{u} -> {x} > {hi}{u} -> {y}");
        }
    }

    #[test]
    fn size_units_agree_with_each_other(n in 0u64..(1 << 20)) {
        // 1K = 1024 B, 1M = 1024 K, ...: the same amount in two units is one size.
        for w in SIZE_UNITS.windows(2) {
            let ((u1, m1), (u2, m2)) = (w[0], w[1]);
            if m2 > m1 {
                prop_assert_eq!(
                    units::parse_size(&format!("{}{u1}", n * (m2 / m1))),
                    units::parse_size(&format!("{n}{u2}"))
                );
            }
        }
    }

    #[test]
    fn size_and_duration_never_panic(s in unitish_text()) {
        let _ = units::parse_size(&s);
        let _ = units::parse_duration(&s);
        let _ = from_toml::<Size>(&format!("{s:?}"));
        let _ = from_toml::<Dur>(&format!("{s:?}"));
        let _ = from_toml::<Percent>(&format!("{s:?}"));
        let _ = from_toml::<Amount>(&format!("{s:?}"));
    }

    #[test]
    fn size_of_anything_is_ok_or_a_message_naming_the_input(s in unitish_text()) {
        if let Err(e) = units::parse_size(&s) {
            prop_assert!(e.contains(&format!("{s:?}")), "{e}");
        }
    }

    #[test]
    fn duration_round_trips_in_every_unit(
        unit in prop::sample::select(DURATION_UNITS.to_vec()),
        n in any::<u64>(),
        space in prop_oneof![Just(""), Just(" ")],
    ) {
        // Up to a day in every unit (a year is the parser's ceiling; a loader may set a
        // lower one for some keys, not for the unit grammar).
        let (u, ms) = unit;
        let n = n % (86_400_000 / ms + 1);
        let text = format!("{n}{space}{u}");
        let want = Duration::from_millis(n * ms);
        prop_assert_eq!(units::parse_duration(&text), Ok(want), "{:?}", text);
        prop_assert_eq!(from_toml::<Dur>(&format!("{text:?}")), Ok(Dur(want)));
    }

    #[test]
    fn duration_is_monotonic_within_a_unit(
        unit in prop::sample::select(DURATION_UNITS.to_vec()),
        a in any::<u64>(),
        b in any::<u64>(),
    ) {
        let (u, _) = unit;
        let (lo, hi) = (a.min(b), a.max(b));
        let (x, y) = (
            units::parse_duration(&format!("{lo}{u}")),
            units::parse_duration(&format!("{hi}{u}")),
        );
        if let (Ok(x), Ok(y)) = (&x, &y) {
            prop_assert!(x <= y, "{lo}{u} -> {x:?} > {hi}{u} -> {y:?}");
        }
        // Out of range is out of range for everything above it too.
        prop_assert!(x.is_ok() || y.is_err(), "{lo}{u} rejected but {hi}{u} accepted");
    }

    #[test]
    fn duration_without_a_unit_is_refused(n in any::<u32>()) {
        prop_assert!(units::parse_duration(&n.to_string()).is_err());
        // Not even as a TOML integer: "hold = 30" could be seconds or milliseconds.
        prop_assert!(from_toml::<Dur>(&n.to_string()).is_err());
    }

    #[test]
    fn percent_round_trips(p in 0u32..=100, frac in 0u32..100) {
        let text = format!("{p}.{frac:02}%");
        let want = (p as f64 + frac as f64 / 100.0) / 100.0;
        match from_toml::<Amount>(&format!("{text:?}")) {
            Ok(Amount::Percent(f)) => prop_assert!((f - want).abs() < 1e-12, "{text}: {f}"),
            other => prop_assert!(false, "{text}: {other:?}"),
        }
        match from_toml::<Percent>(&format!("{text:?}")) {
            Ok(Percent(f)) => prop_assert!((f - want).abs() < 1e-12, "{text}: {f}"),
            other => prop_assert!(false, "{text}: {other:?}"),
        }
    }

    #[test]
    fn amount_of_a_percentage_is_monotonic_in_the_base(
        p in 0u32..=100,
        a in 0u64..(1 << 50),
        b in 0u64..(1 << 50),
    ) {
        let amount = Amount::Percent(p as f64 / 100.0);
        let (lo, hi) = (a.min(b), a.max(b));
        prop_assert!(amount.of(lo) <= amount.of(hi));
        // At most 100% of the base, never more.
        prop_assert!(amount.of(hi) <= hi);
    }
}

// ---------------------------------------------------------------------------------------
// Policy files (src/policy/load.rs)
// ---------------------------------------------------------------------------------------

/// Pieces of policy files: keys, values and the TOML punctuation between them.
fn policyish_text() -> impl Strategy<Value = String> {
    let shipped: Vec<&'static str> = vec![
        include_str!("../policies/default.toml"),
        include_str!("../policies/go-service.toml"),
        include_str!("../policies/cache.toml"),
        include_str!("../policies/batch-worker.toml"),
    ];
    let piece = prop_oneof![
        prop::sample::select(vec![
            "name = ",
            "mode = ",
            "priority = ",
            "[match]\n",
            "[[step]]\n",
            "action = ",
            "cgroup = ",
            "container_name = ",
            "image = ",
            "[match.label]\n",
            "by = ",
            "max_limit = ",
            "max_extra = ",
            "hold = ",
            "restore_below = ",
            "restore_after = ",
            "settle = ",
            "signal = ",
            "victim = ",
            "prefer = ",
            "avoid = ",
            "grace = ",
            "command = ",
            "timeout = ",
            "level = ",
            "require_oom_kill_disable = ",
            "\"raise_limit\"",
            "\"kill\"",
            "\"kill_all\"",
            "\"signal\"",
            "\"exec\"",
            "\"reclaim\"",
            "\"drop_caches\"",
            "\"kernel_oom_kill\"",
            "\"25%\"",
            "\"1e30%\"",
            "\"64MiB\"",
            "\"0s\"",
            "\"SIGTERM\"",
            "\"largest_rss\"",
            "[\"/docker/*\"]",
            "[\"(\"]",
            "[\"/bin/true\"]",
            "true",
            "0",
            "-1",
            "9223372036854775807",
            "\n",
            " ",
            "\"",
            "'",
            "[",
            "]",
            "{",
            "}",
            "=",
            ",",
            "#",
            "é",
            "\u{1F600}",
            "\r\n",
            "\t",
        ])
        .prop_map(str::to_string),
        any::<String>(),
    ];
    prop_oneof![
        // Mutations of the shipped policies: cut, and spliced with pieces.
        (
            prop::sample::select(shipped),
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>(),
            prop::collection::vec(piece.clone(), 0..4),
        )
            .prop_map(|(base, a, b, ins)| {
                let chars: Vec<char> = base.chars().collect();
                let (i, j) = (a.index(chars.len() + 1), b.index(chars.len() + 1));
                let (i, j) = (i.min(j), i.max(j));
                let head: String = chars[..i].iter().collect();
                let tail: String = chars[j..].iter().collect();
                format!("{head}{}{tail}", ins.concat())
            }),
        prop::collection::vec(piece, 0..40).prop_map(|p| p.concat()),
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn policy_loader_gives_a_policy_or_an_error_inside_the_file(text in policyish_text()) {
        match oomwake::policy::load_str(&text, "fuzz.toml") {
            Ok(_) => {}
            Err(oomwake::policy::LoadError::Invalid { file, line, col, msg }) => {
                prop_assert_eq!(file, "fuzz.toml");
                let lines = text.split('\n').count();
                prop_assert!(line >= 1 && line <= lines, "line {line} of {lines}: {msg}");
                let len = text.split('\n').nth(line - 1).map(|l| l.chars().count()).unwrap_or(0);
                prop_assert!(col >= 1 && col <= len + 1, "col {col} of {len}: {msg}");
                prop_assert!(!msg.is_empty());
            }
            Err(e) => prop_assert!(false, "not a positioned error: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The journal of lent limits (src/journal.rs)
// ---------------------------------------------------------------------------------------

/// Cgroup names: a few, so that operations collide on the same cgroup, with bytes that
/// JSON must escape, a name that is not ASCII, one that is not UTF-8 and one that looks
/// like the escape of a byte that is not UTF-8.
const NAMES: [&[u8]; 8] = [
    b"/docker/a",
    b"/docker/b",
    b"/kubepods/pod-1/c\"q",
    b"/system.slice/x y.service",
    b"/",
    "/ü/\\n".as_bytes(),
    b"/bad\xff\xfe/x",
    b"/lit\\xff",
];

/// The names before the first one that is not ASCII.
const ASCII_NAMES: usize = 5;

fn cgroup(c: usize) -> CgroupPath {
    CgroupPath::from_bytes(NAMES[c]).expect("a valid test name")
}

/// The one place a LoanRecord is built (for when it gains fields). The original limit is
/// a function of the cgroup: a loan extended again keeps its first original, so a model
/// that replaces the whole record and a journal that keeps the first original agree.
fn loan(c: usize, seed: u64) -> LoanRecord {
    let base = 64u64 << 20 << (c % 4);
    // v1 with and without swap accounting, and v2 (memory.high).
    let memsw = (c % 3 == 0).then_some(base * 2);
    let high = (c % 3 == 1).then_some(base / 4 * 3);
    let extra = (seed % 1024) * 4096;
    let original = Limits {
        memory: base,
        memsw,
        high,
    };
    let lent = Limits {
        memory: base + extra,
        memsw: memsw.map(|m| m + extra),
        high: high.map(|h| h + extra),
    };
    let change = match seed % 3 {
        0 => None,
        1 => Some(Change {
            from: lent,
            to: original,
            step: ChangeStep::MemoryDone,
        }),
        _ => Some(Change {
            from: original,
            to: lent,
            step: ChangeStep::Begun,
        }),
    };
    LoanRecord {
        cgroup: cgroup(c),
        policy: format!("policy-{}", seed % 3),
        episode: seed,
        original,
        lent,
        change,
        started_unix_ms: seed.wrapping_mul(7),
        hold_until_unix_ms: seed.wrapping_mul(7).wrapping_add(60_000),
        restore_below_bytes: base / 10 * 9,
        restore_after_ms: 5_000,
        resume_step: (seed % 4) as usize,
        identity: (seed % 2 == 0).then(|| oomwake::cgroup::Identity {
            ino: seed,
            boot: format!("boot-{}", seed % 5),
        }),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Put(usize, u64),
    Remove(usize),
    /// A compaction: the snapshot replaced with the model's state, the logs emptied.
    Save,
    /// A compaction interrupted after its first half (the log moved aside, no snapshot
    /// written yet): the agent crashed, or the next compaction comes first.
    Rotate,
    /// A restart of the agent: what it reads at start must be the model's state.
    Restart,
}

/// Operations on the first `names` of [`NAMES`].
fn ops_on(names: usize, max: usize) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            6 => (0..names, any::<u64>()).prop_map(|(c, s)| Op::Put(c, s)),
            3 => (0..names).prop_map(Op::Remove),
            1 => Just(Op::Save),
            1 => Just(Op::Rotate),
            1 => Just(Op::Restart),
        ],
        0..max,
    )
}

fn ops(max: usize) -> impl Strategy<Value = Vec<Op>> {
    ops_on(NAMES.len(), max)
}

type Model = BTreeMap<CgroupPath, LoanRecord>;

fn sorted(mut v: Vec<LoanRecord>) -> Vec<LoanRecord> {
    v.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
    v
}

fn state(m: &Model) -> Vec<LoanRecord> {
    m.values().cloned().collect()
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// What the agent reads at start ([`Journal::recover`]): the loans, and a damage report
/// that must be empty for a journal only the agent (and crashes) wrote.
fn start(dir: &Path) -> Result<Vec<LoanRecord>, TestCaseError> {
    let j = Journal::open(dir).map_err(fail)?;
    let r = j.recover().map_err(fail)?;
    prop_assert!(r.damage.is_empty(), "damage: {:?}", r.damage);
    Ok(sorted(r.loans))
}

/// Runs `ops` against a journal in `dir` and the model. Returns the model's states since
/// the last save (index 0: right after it), one per appended op.
fn run(dir: &Path, ops: &[Op]) -> Result<Vec<Vec<LoanRecord>>, TestCaseError> {
    let mut j = Journal::open(dir).map_err(fail)?;
    let mut model = Model::new();
    let mut since_save = vec![state(&model)];
    for op in ops {
        match *op {
            Op::Put(c, s) => {
                let l = loan(c, s);
                j.put(&l).map_err(fail)?;
                model.insert(l.cgroup.clone(), l);
                since_save.push(state(&model));
            }
            Op::Remove(c) => {
                j.remove(&cgroup(c)).map_err(fail)?;
                model.remove(&cgroup(c));
                since_save.push(state(&model));
            }
            Op::Save => {
                j.save(&state(&model)).map_err(fail)?;
                since_save = vec![state(&model)];
            }
            Op::Rotate => j.rotate().map_err(fail)?,
            Op::Restart => {
                drop(j);
                prop_assert_eq!(start(dir)?, state(&model), "at a restart");
                j = Journal::open(dir).map_err(fail)?;
            }
        }
    }
    Ok(since_save)
}

/// What the agent does at start (open, recover, then go on appending) with one append;
/// returns what the start after that reads.
fn append_after_start(dir: &Path, l: &LoanRecord) -> Result<Vec<LoanRecord>, TestCaseError> {
    {
        let j = Journal::open(dir).map_err(fail)?;
        let r = j.recover().map_err(fail)?;
        prop_assert!(r.damage.is_empty(), "damage: {:?}", r.damage);
        j.put(l).map_err(fail)?;
    }
    start(dir)
}

/// Tears the log, starts (what the start reads must be a prefix of the history), appends
/// one loan, and starts again: what the first start read, with the append over it.
fn torn_then_appended(ops: &[Op], cut: Cut, after: (usize, u64)) -> Result<(), TestCaseError> {
    let t = tempdir()?;
    let (cut, since_save) = tear(t.path(), ops, cut)?;
    let torn = start(t.path())?;
    prop_assert!(since_save.contains(&torn), "torn at {cut}: {torn:?}");
    let l = loan(after.0, after.1);
    let got = append_after_start(t.path(), &l)?;
    let mut want: Model = torn.into_iter().map(|l| (l.cgroup.clone(), l)).collect();
    want.insert(l.cgroup.clone(), l);
    prop_assert_eq!(got, state(&want), "torn at {}", cut);
    Ok(())
}

/// A state dir in memory where there is one: the properties are about content, and an
/// fsync per compaction on a disk would make each case cost milliseconds.
fn tempdir() -> Result<tempfile::TempDir, TestCaseError> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(t) = tempfile::tempdir_in(shm) {
            return Ok(t);
        }
    }
    tempfile::tempdir().map_err(fail)
}

/// The open log (`loans.log`: the file that takes appends).
fn log_file(dir: &Path) -> std::path::PathBuf {
    dir.join("loans.log")
}

/// Where a torn log is cut.
enum Cut {
    Anywhere(prop::sample::Index),
    /// Before a byte >= 0x80: inside a multi-byte character, or just before one.
    AtNonAscii(prop::sample::Index),
    /// Before a newline: the last line complete but for its newline.
    BeforeNewline(prop::sample::Index),
}

/// A crash in the middle of an append leaves any prefix of the log. Cuts it so and
/// returns where, and the states the journal may now load: those after some prefix of
/// the operations appended since the last save (nothing invented, nothing reordered).
fn tear(dir: &Path, ops: &[Op], cut: Cut) -> Result<(usize, Vec<Vec<LoanRecord>>), TestCaseError> {
    let since_save = run(dir, ops)?;
    let log = log_file(dir);
    let bytes = std::fs::read(&log).map_err(fail)?;
    let cut = match cut {
        Cut::Anywhere(i) => i.index(bytes.len() + 1),
        Cut::AtNonAscii(i) | Cut::BeforeNewline(i) => {
            let at: Vec<usize> = match cut {
                Cut::BeforeNewline(_) => (0..bytes.len()).filter(|&k| bytes[k] == b'\n').collect(),
                _ => (0..bytes.len()).filter(|&k| bytes[k] >= 0x80).collect(),
            };
            at.get(i.index(at.len().max(1)))
                .copied()
                .unwrap_or(bytes.len())
        }
    };
    std::fs::write(&log, &bytes[..cut]).map_err(fail)?;
    Ok((cut, since_save))
}

proptest! {
    // Every case does file I/O (and fsyncs per save): fewer cases keep it fast.
    #![proptest_config(cases(64))]

    #[test]
    fn journal_after_any_history_holds_the_models_state(ops in ops(40)) {
        let t = tempdir()?;
        let since_save = run(t.path(), &ops)?;
        let want = since_save.last().cloned().unwrap_or_default();
        prop_assert_eq!(start(t.path())?, want.clone(), "recover");
        let loaded = Journal::open(t.path()).map_err(fail)?.load().map_err(fail)?;
        prop_assert_eq!(sorted(loaded), want, "load");
    }

    #[test]
    fn journal_torn_at_any_byte_starts_with_a_prefix_of_its_history(
        ops in ops(30),
        cut in any::<prop::sample::Index>(),
    ) {
        let t = tempdir()?;
        let (cut, since_save) = tear(t.path(), &ops, Cut::Anywhere(cut))?;
        let got = start(t.path())?;
        prop_assert!(since_save.contains(&got), "torn at {cut}: {got:?}");
    }

    #[test]
    fn journal_torn_inside_a_multibyte_name_starts_with_a_prefix(
        mut ops in ops(30),
        c in ASCII_NAMES..NAMES.len(),
        seed in any::<u64>(),
        cut in any::<prop::sample::Index>(),
    ) {
        ops.push(Op::Put(c, seed));
        let t = tempdir()?;
        let (cut, since_save) = tear(t.path(), &ops, Cut::AtNonAscii(cut))?;
        let got = start(t.path())?;
        prop_assert!(since_save.contains(&got), "torn at {cut}: {got:?}");
    }

    #[test]
    fn journal_load_torn_inside_a_multibyte_name_gives_a_prefix(
        mut ops in ops_on(ASCII_NAMES + 1, 30),
        seed in any::<u64>(),
        cut in any::<prop::sample::Index>(),
    ) {
        // Journal::load documents that a torn last line is ignored; a cut inside "ü"
        // used to fail the whole load with "stream did not contain valid UTF-8".
        ops.push(Op::Put(ASCII_NAMES, seed));
        let t = tempdir()?;
        let (cut, since_save) = tear(t.path(), &ops, Cut::AtNonAscii(cut))?;
        let got = Journal::open(t.path()).map_err(fail)?.load().map(sorted);
        prop_assert!(got.is_ok(), "torn at {cut}: {got:?}");
        prop_assert!(since_save.contains(&got.unwrap_or_default()), "torn at {cut}");
    }

    #[test]
    fn journal_torn_then_appended_keeps_what_the_start_read_and_the_append(
        ops in ops(20),
        cut in any::<prop::sample::Index>(),
        after in (0..NAMES.len(), any::<u64>()),
    ) {
        // Issue 6.8: the agent restarted after a torn append must not glue its next entry
        // onto the torn line (the journal would then be refused at the start after).
        torn_then_appended(&ops, Cut::Anywhere(cut), after)?;
    }

    #[test]
    fn journal_torn_before_a_newline_then_appended_keeps_what_the_start_read(
        ops in ops(20),
        cut in any::<prop::sample::Index>(),
        after in (0..NAMES.len(), any::<u64>()),
    ) {
        // A last line whole but for its newline is read at start (the agent adopts that
        // loan); the next append must not cut it off, or a second stop before the
        // start-up compaction loses the loan (found by this property; fixed in the
        // journal by terminating such a line). Rare for a cut anywhere, so aimed at.
        torn_then_appended(&ops, Cut::BeforeNewline(cut), after)?;
    }

    #[test]
    fn journal_with_arbitrary_bytes_as_its_files_starts_and_heals(
        files in prop::collection::vec(
            (
                prop::sample::select(vec!["loans.json", "loans.log.1", "loans.log"]),
                prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..512),
                    // Valid lines around a damaged one.
                    (0..NAMES.len(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..40))
                        .prop_map(|(c, s, junk)| {
                            let line = format!(
                                "{{\"op\":\"put\",\"loan\":{}}}\n",
                                serde_json::to_string(&loan(c, s)).unwrap_or_default()
                            );
                            [line.as_bytes(), &junk, b"\n", line.as_bytes()].concat()
                        }),
                ],
            ),
            1..4,
        ),
        after in (0..NAMES.len(), any::<u64>()),
    ) {
        // Damage is reported and moved aside, never a panic, never a refusal to start
        // (every stall on the host would wait for the agent); once healed, the journal
        // takes appends and the next start finds no damage.
        let t = tempdir()?;
        run(t.path(), &[Op::Put(0, 1), Op::Save, Op::Put(1, 2)])?;
        for (name, bytes) in &files {
            std::fs::write(t.path().join(name), bytes).map_err(fail)?;
        }
        let _ = Journal::open(t.path()).map_err(fail)?.load();
        let j = Journal::open(t.path()).map_err(fail)?;
        let r = j.recover().map_err(fail)?;
        // What the agent does next: a compaction writes back what could be read.
        j.save(&r.loans).map_err(fail)?;
        j.put(&loan(after.0, after.1)).map_err(fail)?;
        drop(j);
        let got = start(t.path())?;
        let l = loan(after.0, after.1);
        prop_assert!(got.contains(&l), "{got:?}");
    }
}
