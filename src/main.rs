//! `smelt`: the command-line interface of the smelt compiler and runtime.
//!
//! Subcommands: `compile` (model -> artifact), `run` (named tensors in and
//! out), `generate` (greedy decoding with the KV cache), `inspect` (what a
//! model or artifact is), `tune` (measure kernel variants, keep the winners
//! in a tuning database) and `make-test-model` (the project's random-weight
//! checkpoint writer). Every failure is reported as one line `error: ...` on
//! stderr with exit code 1; a panic (a bug) is reported the same way, as an
//! internal error, so users never see a backtrace.

mod commands;
mod probe;
mod source;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "smelt",
    version,
    about = "Ahead-of-time compiler for transformer language models",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Compile a model (Hugging Face checkpoint folder or .onnx file) into an artifact.
    Compile(commands::compile::Args),
    /// Run a model on named input tensors from a safetensors file.
    Run(commands::run::Args),
    /// Generate text greedily with the KV cache.
    Generate(commands::generate::Args),
    /// Describe a model or an artifact (architecture, parameters, ops, signature).
    Inspect(commands::inspect::Args),
    /// Write a Hugging Face checkpoint folder with seeded random weights.
    MakeTestModel(commands::make_model::Args),
    /// List every operator of an ONNX file the frontend does not support, in one report.
    Check(commands::check::Args),
    /// Run ONNX backend-test cases through the importer and the reference interpreter.
    Conformance(commands::conformance::Args),
    /// Time prefill and decode of a model (and probe the machine's limits with --machine).
    Bench(commands::bench::Args),
    /// Measure kernel variants on this machine and keep the winners in a tuning database.
    Tune(commands::tune::Args),
}

fn main() -> ExitCode {
    // A panic is a bug in smelt; say so in one line instead of a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_string());
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("error: internal error (a bug in smelt): {}{at}", one_line(&msg));
    }));

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let result = std::panic::catch_unwind(|| match cli.command {
        Command::Compile(a) => commands::compile::main(a),
        Command::Run(a) => commands::run::main(a),
        Command::Generate(a) => commands::generate::main(a),
        Command::Inspect(a) => commands::inspect::main(a),
        Command::MakeTestModel(a) => commands::make_model::main(a),
        Command::Check(a) => commands::check::main(a),
        Command::Conformance(a) => commands::conformance::main(a),
        Command::Bench(a) => commands::bench::main(a),
        Command::Tune(a) => commands::tune::main(a),
    });
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {}", one_line(&chain(&e)));
            ExitCode::FAILURE
        }
        // The hook has already printed the message.
        Err(_) => ExitCode::FAILURE,
    }
}

/// Help and version go to stdout with success; a usage error becomes one
/// `error:` line (clap's message without the usage block) and exit code 1.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        // `smelt` alone: the help is the most useful answer, but it is not success.
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::FAILURE;
        }
        _ => {}
    }
    let text = e.render().to_string();
    let msg: Vec<&str> =
        text.lines().take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information")).collect();
    let msg = msg.iter().map(|l| l.trim()).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
    let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
    eprintln!("error: {msg} (see `smelt --help`)");
    ExitCode::FAILURE
}

/// The error and its causes, `: `-separated, leaving out a cause whose text
/// the message before it already contains (errors that print their source).
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Joins a multi-line message into one line.
fn one_line(msg: &str) -> String {
    msg.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

/// A closed stdout (`smelt inspect --ir | head`) is not an error.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// Writes to stdout, returning an error (not panicking) when it is closed.
pub(crate) fn out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}
