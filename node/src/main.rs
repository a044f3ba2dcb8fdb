//! `llnode`: the one binary every device runs. It generates, imports and
//! runs models on this device, runs the node (`llnode start`) that joins the
//! mesh, plans and serves its share of the model, and asks the mesh for
//! answers (`llnode prompt`); `docs/architecture.md` draws the actors.

mod actor;
mod alloc;
mod bar;
mod cli;
mod control;
mod cpus;
mod demo;
mod mesh_cmd;
mod pace;
mod plan_cmd;
mod profile;
mod prompt;
mod protocol;
mod register;
mod run;
mod start;
mod store;
mod traffic;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    alloc::init();
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return bad_arguments(e),
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a node's log file (tests, phones) stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command.execute() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Help and the version as clap prints them; a mistake in the arguments as
/// one line, its tip and the command's usage included, and exit code 2.
fn bad_arguments(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    eprintln!("error: {}", clap_line(&e.render().to_string()));
    ExitCode::from(2)
}

/// Clap's message for a mistake, on one line: "the following required
/// arguments were not provided: `<PROMPT>`; usage: `llnode run …`".
fn clap_line(text: &str) -> String {
    let (mut head, mut items, mut notes) = (String::new(), Vec::new(), Vec::new());
    for line in text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("For more information")) {
        if let Some(message) = line.strip_prefix("error: ") {
            head = message.trim().to_string();
        } else if let Some(usage) = line.strip_prefix("Usage: ") {
            notes.push(format!("usage: {}", usage.trim()));
        } else if line.trim_start().starts_with("tip: ") {
            notes.push(line.trim().to_string());
        } else {
            items.push(line.trim());
        }
    }
    if !items.is_empty() {
        head = format!("{head} {}", items.join(", "));
    }
    std::iter::once(head).chain(notes).collect::<Vec<_>>().join("; ")
}

/// Writes to stdout; a reader that went away (`llnode … | head`) is not an error.
pub fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
}

/// `println!` through [`out`].
#[macro_export]
macro_rules! outln {
    () => { $crate::out("\n") };
    ($($arg:tt)*) => { $crate::out(&format!("{}\n", format_args!($($arg)*))) };
}

/// The error and its causes on one line, without repeating a cause its parent already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

/// The runtime for commands that talk to the network or the local node.
///
/// Its workers move messages: measuring, file work and a step's compute run
/// on blocking threads, but for a decode step of a device's only session,
/// which holds one worker while the other serves the network. So it has
/// [`WORKERS`] of them, even on one core, and not one per core (tokio's
/// default), unless `TOKIO_WORKER_THREADS` says otherwise:
/// each worker keeps its own allocator heap, and on 16 cores the bench
/// model's nodes held 2–13 MiB more than their weights allow
/// (`just bench-mesh-infer`, peak RSS against 1.1× weights + 64 MiB).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(WORKERS);
    }
    Ok(builder.enable_all().build()?)
}

/// The runtime's workers.
const WORKERS: usize = 2;

#[cfg(test)]
mod tests {
    use super::clap_line;

    #[test]
    fn a_mistake_in_the_arguments_is_one_line_with_its_tip_and_usage() {
        let missing = "error: the following required arguments were not provided:\n  --model <MODEL>\n  <PROMPT>\n\n\
                       Usage: llnode run --model <MODEL> <PROMPT>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            clap_line(missing),
            "the following required arguments were not provided: --model <MODEL>, <PROMPT>; \
             usage: llnode run --model <MODEL> <PROMPT>"
        );
        let misspelt = "error: unexpected argument '--max-token' found\n\n  tip: a similar argument exists: '--max-tokens'\n\n\
                        Usage: llnode run --max-tokens <MAX_TOKENS> <PROMPT>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            clap_line(misspelt),
            "unexpected argument '--max-token' found; tip: a similar argument exists: '--max-tokens'; \
             usage: llnode run --max-tokens <MAX_TOKENS> <PROMPT>"
        );
    }
}
