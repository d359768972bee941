//! The `reprise` command: parse the CLI, load the config, run the server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "reprise",
    version,
    about = "A PostgreSQL-wire proxy that makes several PostgreSQL servers act as one highly available, read-scalable database"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve clients with the groups of a config file (foreground).
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start a whole group on this machine from nothing (local PostgreSQL copies).
    Demo {
        /// How many copies.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// PG-wire port of the proxy.
        #[arg(long, default_value_t = 6432)]
        port: u16,
        /// HTTP port for /status and /metrics.
        #[arg(long, default_value_t = 8432)]
        http_port: u16,
        /// Where the copies live (default: a new temporary directory, removed at exit).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Validate a config file and print the group layout.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REPRISE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => reprise::config::Config::load(&config)
            .map(|c| print!("{}", reprise::demo::layout(&c)))
            .map_err(anyhow::Error::from),
        Command::Serve { config } => match reprise::config::Config::load(&config) {
            Ok(c) => match reprise::runtime(c.worker_threads) {
                Ok(rt) => rt.block_on(reprise::run(c, shutdown_signal())),
                Err(e) => Err(anyhow::anyhow!("cannot start the runtime: {e}")),
            },
            Err(e) => Err(e.into()),
        },
        Command::Demo {
            nodes,
            port,
            http_port,
            dir,
        } => reprise::runtime(0)
            .expect("tokio runtime")
            .block_on(reprise::demo::run(
                reprise::demo::DemoOptions {
                    nodes,
                    port,
                    http_port,
                    dir,
                },
                shutdown_signal(),
            )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reprise: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
