//! `hangar completions <shell>` and `hangar man --out DIR`: shell completion scripts (clap_complete)
//! and man pages (clap_mangen) generated from the same command definition as `--help`, so they
//! cannot drift from it.

use anyhow::Context;
use clap::Args;
use clap_complete::Shell;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for. Install, e.g. for bash: `hangar completions bash >
    /// /etc/bash_completion.d/hangar`; zsh: into a directory of `$fpath` as `_hangar`.
    #[arg(value_enum)]
    pub shell: Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory to write the pages to (`hangar.1` and one `hangar-<command>.1` per command;
    /// created if missing), e.g. /usr/local/share/man/man1.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Prints the completion script of `command` for `args.shell` on stdout.
pub fn completions(args: CompletionsArgs, mut command: clap::Command) -> ExitCode {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "hangar", &mut script);
    crate::cli::say!("{}", String::from_utf8_lossy(&script).trim_end());
    ExitCode::SUCCESS
}

/// Writes the man page of `command` and of each of its subcommands (nested ones as
/// `hangar-admin-connect.1`) to `args.out`.
pub fn man(args: ManArgs, command: clap::Command) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut command = command;
    command.build();
    let written = write_pages(&args.out, &command, "hangar")?;
    crate::cli::say!("Wrote {written} man pages to {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

fn write_pages(dir: &Path, command: &clap::Command, name: &str) -> anyhow::Result<usize> {
    // The page's title is the full command name (`hangar-connect`), as git's pages are named.
    let page = command.clone().name(name.to_string());
    let mut text = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut text)
        .with_context(|| format!("rendering the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let mut written = 1;
    for sub in command.get_subcommands() {
        if sub.get_name() == "help" || sub.is_hide_set() {
            continue;
        }
        written += write_pages(dir, sub, &format!("{name}-{}", sub.get_name()))?;
    }
    Ok(written)
}
