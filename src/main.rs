//! The `storage-agent` command: `serve`, `config check`, and `ctl` (a client of the daemon).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use storage_agent::config::{self, ConfigError, LogFormat};

#[derive(Parser)]
#[command(
    name = "storage-agent",
    version,
    about = "Backend.AI storage proxy + storage agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        /// Config file (else $STORAGE_AGENT_CONFIG, ./storage-agent.toml,
        /// /etc/backend.ai/storage-agent.toml, else the embedded default).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print the OpenAPI document of the manager or client API (as served on the internal
    /// listener at /openapi/<api>.json).
    Openapi {
        #[arg(value_parser = ["manager", "client"], default_value = "manager")]
        api: String,
    },
    /// Talk to a running daemon: volumes, quota scopes, vfolders, uploads and downloads,
    /// sessions.
    Ctl(storage_agent::ctl::CtlArgs),
    /// (Run by the daemon itself.) Remounts a session's mount read-only or writable inside its
    /// container: entering a mount namespace needs a single-threaded process.
    #[command(hide = true)]
    RemountInContainer {
        pid: i32,
        target: String,
        options: String,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file and print every problem with its key, value and what is allowed.
    Check {
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
}

fn load(path: Option<PathBuf>) -> Result<config::Config, ConfigError> {
    let source = config::locate(path.as_deref())?;
    config::load_checked(&source, storage_agent::volume::scopes::check)
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr; stdout carries only the machine-readable "listening" and "ready" lines.
    // Colours only on a terminal: a file or the journal gets plain text.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::RemountInContainer {
            pid,
            target,
            options,
        } => match storage_agent::session::remount::in_container(pid, &target, &options) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Openapi { api } => {
            println!("{}", storage_agent::api::internal::openapi_json(&api));
            ExitCode::SUCCESS
        }
        Command::Ctl(args) => {
            if rustls::crypto::aws_lc_rs::default_provider()
                .install_default()
                .is_err()
            {
                eprintln!("warning: a rustls crypto provider was already installed");
            }
            storage_agent::ctl::run(args)
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => match load(config) {
            Ok(c) => {
                for w in &c.warnings {
                    eprintln!("warning: {w}");
                }
                for key in &c.ignored {
                    eprintln!("note: {key} is accepted for Backend.AI compatibility and ignored");
                }
                println!("config {} is valid", c.source);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config } => {
            let config = match load(config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("refusing to start: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(config.daemon.log_format, &config.daemon.log_level);
            // One crypto provider for every rustls user in the process (TLS listeners, gRPC,
            // Redis TLS); installed before anything can pick one implicitly.
            if rustls::crypto::aws_lc_rs::default_provider()
                .install_default()
                .is_err()
            {
                tracing::warn!("a rustls crypto provider was already installed");
            }
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .max_blocking_threads(config.daemon.blocking_threads)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(storage_agent::app::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("storage-agent failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
