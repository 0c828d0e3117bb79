use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;
use statekeeper::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::State(args) => {
            init_logging(false);
            statekeeper::cli::run_state(*args).await
        }
        Command::Crd => match statekeeper::api::crds_yaml() {
            Ok(yaml) => {
                let mut stdout = std::io::stdout().lock();
                match stdout
                    .write_all(yaml.as_bytes())
                    .and_then(|()| stdout.flush())
                {
                    // A reader that went away (`| head`) is not an error.
                    Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                        eprintln!("error: cannot write the CRDs: {e}");
                        ExitCode::FAILURE
                    }
                    _ => ExitCode::SUCCESS,
                }
            }
            Err(e) => {
                eprintln!("error: cannot render CRDs: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Operator(args) => {
            init_logging(true);
            match statekeeper::controller::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "operator failed");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// JSON logs for the operator; quiet, human logs for the CLI (its results go to stdout).
fn init_logging(json: bool) {
    let default = if json { "info" } else { "warn" };
    let filter =
        EnvFilter::try_from_env("STATEKEEPER_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Colours only for a person at a terminal, never into files or pipes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
