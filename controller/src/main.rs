//! `portfleet-controller`: parses config, sets up logging and signals, and
//! calls the library.

use std::process::ExitCode;

use clap::CommandFactory;
use portfleet_controller::{
    ControllerConfig,
    auth::{self, Scope},
    config::{
        AgentCommand, CONFIG_FILE, CaCommand, Cli, Command, ConfigCommand, DatabaseArgs, ServeArgs, TokenCommand,
    },
    enroll,
    store::{DatabaseConfig, Store},
    telemetry,
};
use portfleet_core::labels::Labels;
use portfleet_telemetry::config_file::{self, Loaded, Settings};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    // Flags over environment over `--config FILE`; a bad setting exits 2.
    let Loaded { cli, settings } =
        config_file::parse::<Cli, _>(CONFIG_FILE, std::env::args_os()).unwrap_or_else(|e| e.exit());
    if let Command::Config { action } = &cli.command {
        return config_command(action, &settings);
    }
    // One TLS stack across the tree: rustls with ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Inside the runtime: the trace exporter's channel lives on it.
    let traces = {
        let _in_runtime = runtime.enter();
        telemetry::init(cli.log_format, cli.otlp_endpoint.as_deref())
    };
    let traces = traces.unwrap_or_else(|e| usage_error(&e.to_string()));
    let code = match runtime.block_on(async_main(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    };
    // The last spans go out while the runtime still runs.
    traces.shutdown();
    code
}

async fn async_main(cli: Cli) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(handle_signals(shutdown.clone()));
    match cli.command {
        Command::Migrate(db) => {
            let store = Store::connect_lazy(&database(&db));
            store.migrate(&shutdown).await?;
            tracing::info!("migrations applied");
            store.close().await;
            Ok(())
        }
        Command::Tokens { database, action } => tokens(&database, action, &shutdown).await,
        Command::Ca { action: CaCommand::Init { dir, server_names } } => {
            for p in enroll::init_ca(&dir, &server_names)? {
                eprintln!("wrote {}", p.display());
            }
            eprintln!(
                "serve with --tls-cert {d}/server.pem --tls-key {d}/server.key --tls-client-ca {d}/ca.pem \
                 --tls-client-ca-key {d}/ca.key; agents trust {d}/ca.pem",
                d = dir.display()
            );
            Ok(())
        }
        Command::Agents { database, action } => agents(&database, action, &shutdown).await,
        // Handled in main, before logging and the runtime.
        Command::Config { .. } => Ok(()),
        Command::Serve(args) => {
            let config = serve_config(&args).unwrap_or_else(|e| usage_error(&e));
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .map_err(|e| anyhow::anyhow!("--listen {}: {e}", args.listen))?;
            portfleet_controller::run(config, listener, shutdown).await?;
            Ok(())
        }
    }
}

/// The settings `serve` runs with, validated once; the message names the
/// flag.
fn serve_config(args: &ServeArgs) -> Result<ControllerConfig, String> {
    let config = ControllerConfig::try_from(args)?;
    config.validate()?;
    if args.tls_cert.is_none() && !args.insecure {
        return Err("no TLS: give --tls-cert and --tls-key (docs/security.md), or --insecure to serve plaintext \
                    on a network nobody else reaches"
            .into());
    }
    Ok(config)
}

/// `config print-default` and `config check`: nothing is served or
/// connected to.
fn config_command(action: &ConfigCommand, settings: &Settings) -> ExitCode {
    match action {
        ConfigCommand::PrintDefault => print!("{}", config_file::default_file(Cli::command(), CONFIG_FILE)),
        ConfigCommand::Check(args) => {
            if let Err(e) = serve_config(args) {
                usage_error(&e);
            }
            let files = [
                ("--tls-cert", &args.tls_cert),
                ("--tls-key", &args.tls_key),
                ("--tls-client-ca", &args.tls_client_ca),
                ("--tls-client-ca-key", &args.tls_client_ca_key),
            ];
            for (flag, path) in files {
                if let Some(p) = path
                    && let Err(e) = std::fs::File::open(p)
                {
                    usage_error(&format!("{flag} {}: {e}", p.display()));
                }
            }
            print!("{}", settings.effective());
            eprintln!("the settings are valid");
        }
    }
    ExitCode::SUCCESS
}

/// `agents enroll-token|revoke`, straight against the database.
async fn agents(db: &DatabaseArgs, action: AgentCommand, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let store = Store::connect_lazy(&database(db));
    store.migrate(shutdown).await?;
    let result = match action {
        AgentCommand::EnrollToken { labels, ttl } => {
            let labels = labels.iter().try_fold(Labels::default(), |all, l| all.merged(l))?;
            let token = enroll::create_enroll_token(&store, labels.as_map(), ttl).await?;
            eprintln!("one-time enrollment token, valid for {}:", humantime::format_duration(ttl));
            println!("{token}");
            Ok(())
        }
        AgentCommand::Revoke { id } => {
            store.revoke_agent(id).await?;
            eprintln!("revoked agent {id}: its session closes within seconds; it cannot connect again");
            Ok(())
        }
    };
    store.close().await;
    result
}

/// `tokens create|list|revoke`, straight against the database.
async fn tokens(db: &DatabaseArgs, action: TokenCommand, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let store = Store::connect_lazy(&database(db));
    store.migrate(shutdown).await?;
    let result = match action {
        TokenCommand::Create { scope, name, ttl } => {
            let scope = Scope::parse(&scope).ok_or_else(|| anyhow::anyhow!("--scope: read, scan or admin"))?;
            let t = auth::create_token(&store, &name, scope, ttl).await?;
            eprintln!(
                "created token {} (scope {}{}); it is shown only now:",
                t.record.id,
                scope.as_str(),
                t.record.expires_at.map(|e| format!(", expires {e}")).unwrap_or_default()
            );
            println!("{}", t.token);
            Ok(())
        }
        TokenCommand::List => {
            let mut page = portfleet_controller::store::Page { after: None, limit: 1000 };
            println!("{:<36}  {:<5}  {:<20}  {:<7}  NAME", "ID", "SCOPE", "CREATED", "STATE");
            loop {
                let p = store.list_tokens(page.clone()).await?;
                for t in &p.items {
                    let state = if t.revoked_at.is_some() {
                        "revoked"
                    } else if t.expires_at.is_some_and(|e| e <= chrono::Utc::now()) {
                        "expired"
                    } else {
                        "active"
                    };
                    println!(
                        "{}  {:<5}  {}  {state:<7}  {}",
                        t.id,
                        t.scope,
                        t.created_at.format("%Y-%m-%dT%H:%M:%SZ"),
                        t.name
                    );
                }
                match p.next {
                    Some(next) => page.after = Some(next),
                    None => break Ok(()),
                }
            }
        }
        TokenCommand::Revoke { id } => {
            if store.revoke_token(id).await? {
                eprintln!("revoked token {id}");
                Ok(())
            } else {
                Err(anyhow::anyhow!("no token {id}"))
            }
        }
    };
    store.close().await;
    result
}

/// The database settings, or a usage error naming the missing flag.
fn database(db: &DatabaseArgs) -> DatabaseConfig {
    db.config().unwrap_or_else(|e| usage_error(&e))
}

/// Bad configuration: the message, and exit 2 like clap's own errors.
fn usage_error(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2)
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
