//! `portfleet-agent`: parses the command line and runs a subcommand.

use clap::{Parser, Subcommand};
use portfleet_agent::{enroll_cmd, run_cmd, scan_cmd};
use portfleet_telemetry::LogFormat;

#[derive(Parser, Debug)]
#[command(name = "portfleet-agent", version, about = "The portfleet scanning agent.")]
struct Cli {
    /// Log format: plain lines for people, JSON lines for log pipelines.
    #[arg(long, env = "PORTFLEET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Scan targets from this host, with no controller (like naabu or masscan).
    Scan(scan_cmd::ScanArgs),
    /// Run as a daemon that takes scan work from a controller.
    Run(run_cmd::RunArgs),
    /// Get this agent's certificate from a controller with a one-time token.
    Enroll(enroll_cmd::EnrollArgs),
}

fn main() {
    let cli = Cli::parse();
    // The standalone scanner is quiet; the daemon reports what it does.
    let default = if matches!(cli.command, Command::Run(_)) { "info" } else { "warn" };
    portfleet_telemetry::init(cli.log_format, default);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(scan_cmd::EXIT_FAILURE);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Scan(args) => scan_cmd::run(args).await,
            Command::Run(args) => run_cmd::run(args).await,
            Command::Enroll(args) => enroll_cmd::run(args).await,
        }
    });
    // The engine's threads hold nothing that needs a graceful drop here.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    std::process::exit(code);
}
