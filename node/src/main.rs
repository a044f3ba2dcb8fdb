//! `llnode`: the one binary every device runs. It generates, imports and
//! runs models on this device, runs the node (`llnode start`) that joins the
//! mesh, plans and serves its share of the model, and asks the mesh for
//! answers (`llnode prompt`); `docs/architecture.md` draws the actors.

mod actor;
mod alloc;
mod bar;
mod cli;
mod control;
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
    let cli = cli::Cli::parse();
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
/// Its workers only move messages: a step's compute, measuring and file
/// work run on blocking threads. So it has [`WORKERS`] of them, not one per
/// core (tokio's default), unless `TOKIO_WORKER_THREADS` says otherwise:
/// each worker keeps its own allocator heap, and on 16 cores the bench
/// model's nodes held 2–13 MiB more than their weights allow
/// (`just bench-mesh-infer`, peak RSS against 1.1× weights + 64 MiB).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        builder.worker_threads(cores.min(WORKERS));
    }
    Ok(builder.enable_all().build()?)
}

/// The runtime's workers, at most.
const WORKERS: usize = 2;
