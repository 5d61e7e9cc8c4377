//! Fuzz target: a policy file, from bytes to a parsed policy or an error positioned
//! inside the file (FILE:LINE:COL). Never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oomwake::policy::{load_str, LoadError};

fuzz_target!(|data: &[u8]| {
    // Files that are not UTF-8 are refused before the TOML parser (load_files reads
    // them as text); what the parser sees is text.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match load_str(text, "fuzz.toml") {
        Ok(_) => {}
        Err(LoadError::Invalid {
            file,
            line,
            col,
            msg,
        }) => {
            assert_eq!(file, "fuzz.toml");
            let lines: Vec<&str> = text.split('\n').collect();
            assert!(line >= 1 && line <= lines.len(), "line {line}: {msg}");
            let len = lines[line - 1].chars().count();
            assert!(col >= 1 && col <= len + 1, "{line}:{col} of {len}: {msg}");
            assert!(!msg.is_empty());
        }
        Err(e) => panic!("not a positioned error: {e}"),
    }
});
