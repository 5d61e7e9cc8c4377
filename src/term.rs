//! Human output of what others named: cgroup paths (a delegated user names them), container
//! names, images and label values (whoever runs containers names them), error texts that
//! quote them. Printed raw, an ESC sequence in a container name drives the operator's
//! terminal (clears it, retitles it, rewrites what was printed above). Everything human
//! that `status`, `explain` and `doctor` print goes through here: control characters (C0,
//! DEL, C1) and the bidirectional overrides are shown as escapes, invalid UTF-8 as `\xNN`.
//! JSON output needs none of this: serde escapes control characters.

use std::borrow::Cow;
use std::fmt;

/// Characters shown as escapes: controls (C0 including newline and tab, DEL, C1) and the
/// bidirectional embeddings, overrides and isolates (they reorder what follows on screen).
fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn push_escaped(out: &mut String, c: char) {
    use std::fmt::Write;
    let n = u32::from(c);
    let _ = if n < 0x80 {
        write!(out, "\\x{n:02x}")
    } else {
        write!(out, "\\u{{{n:x}}}")
    };
}

fn escape_with(s: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !s.chars().any(|c| needs_escape(c) && !keep(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) && !keep(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// One name or value on a line: every control character escaped, newline and tab too
/// (a name with a newline would forge a line of its own).
pub fn escape(s: &str) -> Cow<'_, str> {
    escape_with(s, |_| false)
}

/// A whole text of this program's own lines: like [`escape`] but its newlines stay.
/// The last guard before the terminal; names inside should already be [`escape`]d.
pub fn escape_text(s: &str) -> Cow<'_, str> {
    escape_with(s, |c| c == '\n')
}

/// Bytes that may not be UTF-8 (a raw path): invalid bytes as `\xNN`, then [`escape`].
pub fn escape_bytes(b: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        out.push_str(&escape(chunk.valid()));
        for x in chunk.invalid() {
            let _ = write!(out, "\\x{x:02x}");
        }
    }
    out
}

/// `{}` of a value through [`escape`]: `format!("{}", Esc(&name))`.
pub struct Esc<'a, T: fmt::Display + ?Sized>(pub &'a T);

impl<T: fmt::Display + ?Sized> fmt::Display for Esc<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.to_string();
        f.write_str(&escape(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_unchanged_and_not_copied() {
        let s = "/docker/api-1 é 名前 \\x41";
        assert!(matches!(escape(s), Cow::Borrowed(_)));
        assert_eq!(escape(s), s);
        assert!(matches!(escape_text("a\nb\n"), Cow::Borrowed(_)));
    }

    #[test]
    fn c0_del_and_c1_are_escaped() {
        // The name that cleared the terminal: ESC c, then CSI 2 J.
        assert_eq!(escape("a\u{1b}cb\u{1b}[2J"), "a\\x1bcb\\x1b[2J");
        assert_eq!(escape("\0\t\r\n\u{7f}"), "\\x00\\x09\\x0d\\x0a\\x7f");
        // C1: CSI as one character (U+009B), and NEL.
        assert_eq!(escape("x\u{9b}2J\u{85}"), "x\\u{9b}2J\\u{85}");
        assert_eq!(escape("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        for s in ["\u{1b}", "\u{7f}", "\u{80}", "\u{9f}", "\u{7}"] {
            assert!(!escape(s).chars().any(|c| c.is_control()), "{s:?}");
        }
    }

    #[test]
    fn text_keeps_its_own_newlines_only() {
        assert_eq!(
            escape_text("a\u{1b}]0;x\u{7}\nb\r\n"),
            "a\\x1b]0;x\\x07\nb\\x0d\n"
        );
    }

    #[test]
    fn invalid_utf8_is_shown_as_bytes() {
        assert_eq!(escape_bytes(b"/a\xff\xfe/\x1b[2J"), "/a\\xff\\xfe/\\x1b[2J");
        assert_eq!(escape_bytes("é".as_bytes()), "é");
        // A C1 control in UTF-8 (C2 9B) is a character: escaped as one.
        assert_eq!(escape_bytes(b"\xc2\x9b"), "\\u{9b}");
    }

    #[test]
    fn esc_formats_any_display() {
        assert_eq!(format!("[{}]", Esc("a\u{1b}b")), "[a\\x1bb]");
        assert_eq!(format!("{}", Esc(&42)), "42");
    }
}
