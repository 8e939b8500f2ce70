//! `portfleet-agent`: parses the command line and runs a subcommand.

use clap::{CommandFactory, Parser, Subcommand};
use portfleet_agent::{enroll_cmd, run_cmd, scan_cmd};
use portfleet_telemetry::{
    LogFormat,
    config_file::{self, Loaded, Spec},
};

#[derive(Parser, Debug)]
#[command(name = "portfleet-agent", version, about = "The portfleet scanning agent.")]
struct Cli {
    /// Log format: plain lines for people, JSON lines for log pipelines.
    #[arg(long, env = "PORTFLEET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    log_format: LogFormat,
    /// Export traces over OTLP/gRPC to this OpenTelemetry receiver (a
    /// Collector, Jaeger; port 4317), e.g. http://127.0.0.1:4317. Off
    /// unless given: then nothing is sent anywhere.
    #[arg(long = "otlp-endpoint", env = "PORTFLEET_AGENT_OTLP_ENDPOINT", global = true,
          value_parser = portfleet_telemetry::otel::parse_endpoint)]
    otlp_endpoint: Option<String>,
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
    /// Config files (`--config FILE`, docs/operations.md).
    Config {
        #[command(subcommand)]
        action: ConfigCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print a config file with every setting of `run` commented out at its
    /// default, with its help and environment variable.
    PrintDefault,
    /// Validate the settings `run` would use (the same flags, the
    /// environment and --config FILE) and print them with their sources,
    /// without connecting; exits 2 when they are invalid.
    Check(Box<run_cmd::RunArgs>),
}

/// The agent's config file: the settings of `run`, which `run`, `enroll`
/// and `config check` read (their `--config`).
const CONFIG_FILE: Spec = Spec {
    schema: &["run"],
    config_arg: "config_file",
    note: "`enroll` reads controller, ca, name and state-dir from the same file.",
};

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
    // Flags over environment over `--config FILE`; a bad setting exits 2.
    let args = naabu_flags(std::env::args_os());
    let Loaded { cli, settings } = config_file::parse::<Cli, _>(CONFIG_FILE, args).unwrap_or_else(|e| e.exit());
    if let Command::Config { action } = &cli.command {
        match action {
            ConfigCommand::PrintDefault => print!("{}", config_file::default_file(Cli::command(), CONFIG_FILE)),
            ConfigCommand::Check(args) => {
                if let Err(e) = run_cmd::check(args) {
                    eprintln!("error: {e}");
                    std::process::exit(2);
                }
                print!("{}", settings.effective());
                eprintln!("the settings are valid");
            }
        }
        return;
    }
    // The standalone scanner is quiet; the daemon reports what it does.
    let default = if matches!(cli.command, Command::Run(_)) { "info" } else { "warn" };
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
    // Inside the runtime: the trace exporter's channel lives on it.
    let traces =
        portfleet_telemetry::Traces { otlp_endpoint: cli.otlp_endpoint.as_deref(), service_name: "portfleet-agent" };
    let traces = {
        let _in_runtime = runtime.enter();
        portfleet_telemetry::init(cli.log_format, default, &traces)
    };
    let traces = traces.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    });
    let code = runtime.block_on(async {
        match cli.command {
            Command::Scan(args) => scan_cmd::run(args).await,
            Command::Run(args) => run_cmd::run(args).await,
            Command::Enroll(args) => enroll_cmd::run(args).await,
            // Handled above, before logging and the runtime.
            Command::Config { .. } => 0,
        }
    });
    // The last spans go out while the runtime still runs.
    traces.shutdown();
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
