//! Man pages and shell completions, generated from the command line's clap definitions
//! (`oomwake __generate DIR`), so that what the package ships cannot drift from what
//! the binary accepts. The generated files are committed under `packaging/generated/`;
//! an integration test regenerates them and fails on any difference.

use std::io;
use std::path::Path;

use clap::Command;
use clap_complete::Shell;

/// Writes `DIR/man/oomwake.1`, one `oomwake-SUB.1` per visible subcommand, and
/// `DIR/completions/{oomwake.bash,_oomwake,oomwake.fish}`.
pub fn generate(cmd: Command, dir: &Path) -> io::Result<()> {
    let mut cmd = cmd;
    cmd.build();
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    write_man(&cmd, &man.join(format!("{}.1", cmd.get_name())))?;
    // clap's own `help` subcommand needs no page of its own.
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        // `oomwake run` documents itself as oomwake-run(1), as git does.
        let name = format!("{}-{}", cmd.get_name(), sub.get_name());
        let page = sub
            .clone()
            .name(name.clone())
            .version(cmd.get_version().unwrap_or_default().to_string());
        write_man(&page, &man.join(format!("{name}.1")))?;
    }
    let comp = dir.join("completions");
    std::fs::create_dir_all(&comp)?;
    let bin = cmd.get_name().to_string();
    for (shell, file) in [
        (Shell::Bash, format!("{bin}.bash")),
        (Shell::Zsh, format!("_{bin}")),
        (Shell::Fish, format!("{bin}.fish")),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd, bin.clone(), &mut out);
        std::fs::write(comp.join(file), out)?;
    }
    Ok(())
}

fn write_man(cmd: &Command, path: &Path) -> io::Result<()> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    std::fs::write(path, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    #[test]
    fn writes_pages_and_completions_and_skips_hidden_subcommands() {
        let t = tempfile::tempdir().unwrap();
        let cmd = Command::new("tool")
            .version("1.2.3")
            .about("does things")
            .subcommand(
                Command::new("go")
                    .about("goes")
                    .arg(Arg::new("fast").long("fast")),
            )
            .subcommand(Command::new("__secret").hide(true));
        generate(cmd, t.path()).unwrap();
        let page = std::fs::read_to_string(t.path().join("man/tool.1")).unwrap();
        assert!(page.contains(".TH tool 1"), "{page}");
        assert!(page.contains("tool\\-go"), "{page}");
        let sub = std::fs::read_to_string(t.path().join("man/tool-go.1")).unwrap();
        assert!(sub.contains("\\-\\-fast"), "{sub}");
        assert!(sub.contains("1.2.3"), "{sub}");
        assert!(!t.path().join("man/tool-__secret.1").exists());
        let bash = std::fs::read_to_string(t.path().join("completions/tool.bash")).unwrap();
        assert!(bash.contains("--fast"), "{bash}");
        assert!(t.path().join("completions/_tool").exists());
        assert!(t.path().join("completions/tool.fish").exists());
    }
}
