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

/// naabu's single-dash long flags, which clap would read as bundles of
/// short ones (`-pts` as `-p ts`): rewritten to their long names before
/// parsing, up to a `--`.
const NAABU_FLAGS: [(&str, &str); 2] = [("-sV", "--service-version"), ("-pts", "--port-threshold")];

fn naabu_flags(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut literal = false;
    args.map(|a| {
        literal |= a == "--";
        let rewritten = (!literal).then(|| NAABU_FLAGS.iter().find(|(short, _)| a == *short)).flatten();
        rewritten.map_or(a, |(_, long)| (*long).into())
    })
    .collect()
}

/// How much lower the async threads' CPU priority is than the process's.
const ASYNC_NICENESS: i32 = 5;

fn main() {
    let cli = Cli::parse_from(naabu_flags(std::env::args_os()));
    // The standalone scanner is quiet; the daemon reports what it does.
    let default = if matches!(cli.command, Command::Run(_)) { "info" } else { "warn" };
    portfleet_telemetry::init(cli.log_format, default);
    // The async threads (sessions, identification, the connect engine)
    // run a little below the raw engine's send and receive threads, so on
    // a busy host identification yields to probing rather than slowing it.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| portfleet_agent::engine::yield_to_probing(ASYNC_NICENESS))
        .build();
    let runtime = match runtime {
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn naabu_s_single_dash_flags_are_read_as_naabu_means_them() {
        let args = ["portfleet-agent", "scan", "192.0.2.1", "-sV", "-pts", "5", "-p", "80"].map(Into::into);
        let cli = Cli::parse_from(naabu_flags(args.into_iter()));
        let Command::Scan(scan) = cli.command else { panic!("{cli:?}") };
        assert!(scan.service_version);
        assert_eq!(scan.port_threshold, 5);
        assert_eq!(scan.ports.as_deref(), Some("80"));
        let literal = ["a", "--", "-sV"].map(std::ffi::OsString::from);
        assert_eq!(naabu_flags(literal.clone().into_iter()), literal.to_vec());
    }
}
