//! `portfleet-controller`: parses config, sets up logging and signals, and
//! calls the library.

use std::process::ExitCode;

use clap::Parser;
use portfleet_controller::{
    ControllerConfig,
    config::{Cli, Command},
    store::{DatabaseConfig, Store},
    telemetry,
};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    // One TLS stack across the tree: rustls with ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(async_main(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn async_main(cli: Cli) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(handle_signals(shutdown.clone()));
    match cli.command {
        Command::Migrate(db) => {
            let store = Store::connect_lazy(&DatabaseConfig::from(&db));
            store.migrate(&shutdown).await?;
            tracing::info!("migrations applied");
            store.close().await;
            Ok(())
        }
        Command::Serve(args) => {
            let config = ControllerConfig::from(&args);
            if let Err(e) = config.validate() {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .map_err(|e| anyhow::anyhow!("--listen {}: {e}", args.listen))?;
            portfleet_controller::run(config, listener, shutdown).await?;
            Ok(())
        }
    }
}

/// The first SIGINT/SIGTERM starts a graceful shutdown; a second one exits
/// at once.
async fn handle_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("shutting down (signal again to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal, exiting now");
    std::process::exit(130);
}
