//! Command line and environment: parsed once, validated once, turned into
//! one typed [`ControllerConfig`]. A bad setting exits non-zero naming it.

use std::{net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use clap::{ArgAction, Args, Parser, Subcommand};
use portfleet_core::ShardPolicy;
use sqlx::postgres::PgConnectOptions;

use crate::{
    conn::ConnectionLimits,
    ingress::{IngressConfig, NaabuDefaults, NaabuM8Config},
    scans::ScanLimits,
    store::{CapsUpdate, DatabaseConfig, ScopeRules},
};

#[derive(Parser, Debug)]
#[command(
    name = "portfleet-controller",
    version,
    about = "The portfleet controller: stores targets, scans and results in Postgres and leases scan work to agents."
)]
pub struct Cli {
    /// Log format.
    #[arg(long, env = "PORTFLEET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    pub log_format: LogFormat,
    /// Export traces over OTLP/gRPC to this OpenTelemetry receiver (a
    /// Collector, Jaeger; port 4317), e.g. http://127.0.0.1:4317. Off
    /// unless given: then nothing is sent anywhere.
    #[arg(long = "otlp-endpoint", env = "PORTFLEET_OTLP_ENDPOINT", global = true,
          value_parser = portfleet_telemetry::otel::parse_endpoint)]
    pub otlp_endpoint: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start; boxing would only complicate clap's derive.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Apply migrations, then serve the gRPC API until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Apply the database migrations and exit.
    Migrate(DatabaseArgs),
    /// The certificate authority that signs agents' (and the server's)
    /// certificates.
    Ca {
        #[command(subcommand)]
        action: CaCommand,
    },
    /// Agent enrollment and revocation, directly in the database.
    Agents {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(subcommand)]
        action: AgentCommand,
    },
    /// Manage API tokens, directly in the database (no API call needed, so
    /// this is how the first admin token is made).
    Tokens {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(subcommand)]
        action: TokenCommand,
    },
    /// Config files (`--config FILE`, docs/operations.md).
    Config {
        #[command(subcommand)]
        action: ConfigCommand,
    },
}

#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print a config file with every setting of `serve` commented out at
    /// its default, with its help and environment variable.
    PrintDefault,
    /// Validate the settings `serve` would run with (the same flags, the
    /// environment and --config FILE) and print them with their sources,
    /// secrets hidden, without connecting to anything; exits 2 when they
    /// are invalid.
    Check(ServeArgs),
}

/// The controller's config file: the settings of `serve`; `--config` is
/// in [`DatabaseArgs`], so `serve`, `migrate`, `agents`, `tokens` and
/// `config check` read it.
pub const CONFIG_FILE: portfleet_telemetry::config_file::Spec = portfleet_telemetry::config_file::Spec {
    schema: &["serve"],
    config_arg: "config_file",
    note: "`migrate`, `agents` and `tokens` read the database settings and log-format from the same file.",
};

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a CA (ca.pem, ca.key) and a server certificate signed by it
    /// (server.pem, server.key) in --dir; keys are written 0600 and
    /// nothing is overwritten.
    Init {
        #[arg(long, default_value = "/etc/portfleet/tls")]
        dir: PathBuf,
        /// Names and addresses agents and clients reach the controller by.
        #[arg(long = "server-name", value_delimiter = ',', required = true)]
        server_names: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Print a one-time enrollment token for `portfleet-agent enroll`.
    EnrollToken {
        /// Labels the enrolled agent gets, k=v,... (the flag may repeat).
        #[arg(long)]
        labels: Vec<portfleet_core::labels::Labels>,
        /// The token expires after this long.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
    },
    /// Revoke an agent: its session closes within seconds and its
    /// certificate never connects again.
    Revoke { id: uuid::Uuid },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token and print it (the only time it is shown).
    Create {
        /// read (Get/List/Watch), scan (also CreateScan, CancelScan,
        /// targets) or admin (also agents, tokens, policy).
        #[arg(long, value_parser = ["read", "scan", "admin"])]
        scope: String,
        /// What the token is for, shown by `tokens list`.
        #[arg(long, default_value = "")]
        name: String,
        /// Expire after this long (e.g. 30d, 12h; at most 10 years);
        /// default never.
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<Duration>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id; calls with it fail within seconds.
    Revoke { id: uuid::Uuid },
}

pub use portfleet_telemetry::LogFormat;

/// The database flags. Global, so that `tokens create --database-url X`
/// works as well as `tokens --database-url X create`; clap cannot require
/// a global flag, so [`DatabaseArgs::config`] checks the URL is there.
#[derive(Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// A TOML file of settings: the long flag names of `serve` as keys
    /// (`config print-default` writes one); flags and environment
    /// variables override it. `migrate`, `agents` and `tokens` read its
    /// database settings and log format (docs/operations.md).
    #[arg(long = "config", env = "PORTFLEET_CONFIG", value_name = "FILE", global = true)]
    pub config_file: Option<PathBuf>,
    /// Postgres URL, e.g. postgres://postgres@127.0.0.1:5432/portfleet
    /// (required).
    #[arg(long, env = "DATABASE_URL", value_parser = parse_database_url, hide_env_values = true, global = true)]
    pub database_url: Option<PgConnectOptions>,
    /// Most connections in the pool.
    #[arg(long, env = "PORTFLEET_DB_POOL_SIZE", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000), global = true)]
    pub db_pool_size: u32,
    /// How long a call waits for a database connection before failing with
    /// UNAVAILABLE (e.g. 3s, 500ms).
    #[arg(long, env = "PORTFLEET_DB_ACQUIRE_TIMEOUT", default_value = "3s", value_parser = parse_duration,
          global = true)]
    pub db_acquire_timeout: Duration,
}

impl DatabaseArgs {
    /// The pool's settings; the message names the missing flag.
    pub fn config(&self) -> Result<DatabaseConfig, String> {
        let options = self.database_url.clone().ok_or("--database-url or DATABASE_URL is required")?;
        // Postgres's NOTICEs ("relation ... already exists, skipping" from
        // every start's migration check) are not news: only warnings and
        // errors come back (sqlx would log each NOTICE at INFO).
        let options = options.options([("client_min_messages", "warning")]);
        Ok(DatabaseConfig { options, pool_size: self.db_pool_size, acquire_timeout: self.db_acquire_timeout })
    }
}

/// Boolean flags take the usual spellings from the environment as well
/// (`PORTFLEET_INSECURE=1`, `yes`, `on`, `true`; `0`, `no`, `off`, `false`),
/// not only clap's default `true`/`false`.
fn boolish() -> clap::builder::BoolishValueParser {
    clap::builder::BoolishValueParser::new()
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Address for the gRPC API and agent sessions.
    #[arg(long, env = "PORTFLEET_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Largest scan accepted, in probes (addresses x ports).
    #[arg(long, env = "PORTFLEET_MAX_SCAN_PROBES", default_value_t = 1 << 32,
          value_parser = clap::value_parser!(u64).range(1..=(1 << 62)))]
    pub max_scan_probes: u64,
    /// Most target entries in one scan, after expanding a target group.
    #[arg(long, env = "PORTFLEET_MAX_SCAN_TARGETS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_scan_targets: u32,
    /// Most hostnames one scan may name (after expanding a target group):
    /// each is a DNS lookup before the scan is stored.
    #[arg(long, env = "PORTFLEET_MAX_SCAN_HOSTNAMES", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub max_scan_hostnames: u32,
    /// How long resolving one scan's hostnames may take in all; a scan
    /// whose names are not resolved by then is refused.
    #[arg(long, env = "PORTFLEET_RESOLVE_DEADLINE", default_value = "30s", value_parser = parse_duration)]
    pub resolve_deadline: Duration,
    /// The shortest interval a schedule may have (a cron expression fires
    /// at most once a minute whatever this is).
    #[arg(long, env = "PORTFLEET_MIN_SCHEDULE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub min_schedule_interval: Duration,
    /// How long in-flight calls may take to finish after SIGTERM.
    #[arg(long, env = "PORTFLEET_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Most client connections open at once; more are closed as soon as
    /// they are accepted.
    #[arg(long, env = "PORTFLEET_MAX_CONNECTIONS", default_value_t = ConnectionLimits::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_connections: u32,
    /// Most connections open at once from one client address (IPv6: one
    /// /64). Raise it when many agents or clients share an address (NAT).
    #[arg(long, env = "PORTFLEET_MAX_CONNECTIONS_PER_IP",
          default_value_t = ConnectionLimits::DEFAULT_MAX_CONNECTIONS_PER_IP,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_connections_per_ip: u32,
    /// A new connection that has not opened a call within this long (TLS
    /// handshake included) is closed.
    #[arg(long, env = "PORTFLEET_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// A connection with no call open for this long is closed; a long call
    /// (agent session, WatchScan) keeps its connection however long it lasts.
    #[arg(long, env = "PORTFLEET_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Names this controller in leases (default: hostname and a random suffix).
    #[arg(long, env = "PORTFLEET_CONTROLLER_ID")]
    pub controller_id: Option<String>,
    /// How often agents send heartbeats.
    #[arg(long, env = "PORTFLEET_HEARTBEAT_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// A lease lapses this long after its agent's last heartbeat; the shard
    /// then resumes from its checkpoint on another agent.
    #[arg(long, env = "PORTFLEET_LEASE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// A shard may fail this many times before its scan fails.
    #[arg(long, env = "PORTFLEET_MAX_SHARD_FAILURES", default_value_t = 3)]
    pub max_shard_failures: i32,
    /// PEM certificate (chain) the controller serves TLS with.
    #[arg(long = "tls-cert", env = "PORTFLEET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long = "tls-key", env = "PORTFLEET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): agents must present a client certificate
    /// issued by one of them (mTLS) to open a session.
    #[arg(long = "tls-client-ca", env = "PORTFLEET_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// PEM key of --tls-client-ca: this controller then enrolls agents
    /// (`agents enroll-token`, `portfleet-agent enroll`).
    #[arg(long = "tls-client-ca-key", env = "PORTFLEET_TLS_CLIENT_CA_KEY", requires = "tls_client_ca")]
    pub tls_client_ca_key: Option<PathBuf>,
    /// Lifetime of the certificates enrolled agents get.
    #[arg(long = "agent-cert-ttl", env = "PORTFLEET_AGENT_CERT_TTL", default_value = "24h", value_parser = parse_ttl)]
    pub agent_cert_ttl: Duration,
    /// Serve plaintext gRPC, without TLS: only on a network nobody else
    /// reaches (tokens and results cross it in clear).
    #[arg(long, env = "PORTFLEET_INSECURE", conflicts_with = "tls_cert", action = ArgAction::SetTrue,
          value_parser = boolish())]
    pub insecure: bool,
    /// Add these CIDRs to the scope policy's allow-list (kept in the
    /// database). With no allow rule at all, nothing may be scanned.
    #[arg(long, env = "PORTFLEET_ALLOW", value_parser = parse_cidr_list, default_value = "")]
    pub allow: CidrList,
    /// Add these CIDRs to the scope policy's deny-list (deny wins).
    #[arg(long, env = "PORTFLEET_DENY", value_parser = parse_cidr_list, default_value = "")]
    pub deny: CidrList,
    /// Set the fleet-wide cap on probes per second one target address
    /// receives from all running scans together (kept in the database;
    /// 0 lifts it). Unset: the database's value stays.
    #[arg(long = "max-rate-per-host", env = "PORTFLEET_MAX_RATE_PER_HOST")]
    pub max_rate_per_host: Option<u32>,
    /// Set how long finished scans are kept (kept in the database; admins
    /// change it at run time with `portfleet retention set`): e.g. `90d`;
    /// `0` or `forever` keeps them. Unset: the database's value stays.
    /// The inventory keeps what pruned scans found.
    #[arg(long = "retain-scans", env = "PORTFLEET_RETAIN_SCANS", value_parser = parse_retention)]
    pub retain_scans: Option<Retention>,
    /// Do not fold results into the inventory on this controller (another
    /// controller on the database does it; with it on none, hosts and
    /// changes stay empty, scans send no scan.changes, and deleted scans'
    /// rows are removed a day after their deletion rather than at once).
    #[arg(long = "no-inventory", env = "PORTFLEET_NO_INVENTORY", action = ArgAction::SetTrue, value_parser = boolish())]
    pub no_inventory: bool,
    /// Likewise for one IPv4 /24 or IPv6 /64.
    #[arg(long = "max-rate-per-block", env = "PORTFLEET_MAX_RATE_PER_BLOCK")]
    pub max_rate_per_block: Option<u32>,
    /// Connections of a second pool that serves API clients (ScanService
    /// calls, WatchScan, the RabbitMQ ingress), opened on top of
    /// --db-pool-size's, which agent sessions and the scheduler keep to
    /// themselves: no API load can take their connections. Default: half
    /// of --db-pool-size, at least 2.
    #[arg(long, env = "PORTFLEET_DB_API_POOL_SIZE", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_api_pool_size: Option<u32>,
    /// Most WatchScan streams this controller serves at once; past it a
    /// watch is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "PORTFLEET_MAX_WATCHES", default_value_t = ApiConfig::DEFAULT_MAX_WATCHES,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_watches: u32,
    /// Most WatchScan streams one API token may hold open on this
    /// controller at once.
    #[arg(long, env = "PORTFLEET_MAX_WATCHES_PER_TOKEN", default_value_t = ApiConfig::DEFAULT_MAX_WATCHES_PER_TOKEN,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_watches_per_token: u32,
    /// Do not serve gRPC reflection (open by default: it reveals the
    /// schema, which is public, and lets grpcurl work without .proto files).
    #[arg(long = "no-reflection", env = "PORTFLEET_NO_REFLECTION", action = ArgAction::SetTrue,
          value_parser = boolish())]
    pub no_reflection: bool,
    /// Do not serve grpc.health.v1 (open by default, for load balancers
    /// and probes; it tells whether the database is reachable).
    #[arg(long = "no-health", env = "PORTFLEET_NO_HEALTH", action = ArgAction::SetTrue, value_parser = boolish())]
    pub no_health: bool,
    /// Serve Prometheus metrics (`/metrics`) and HTTP health checks
    /// (`/healthz`, `/readyz`; docs/operations.md) on this address, e.g.
    /// 0.0.0.0:9464. Off unless given.
    #[arg(long = "metrics-listen", env = "PORTFLEET_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub amqp: AmqpArgs,
}

/// The RabbitMQ ingress (docs/amqp.md); off unless --amqp-url is given.
#[derive(Args, Debug, Clone)]
pub struct AmqpArgs {
    /// Consume scan requests from RabbitMQ, e.g. amqp://guest:guest@127.0.0.1:5672/%2f
    #[arg(long = "amqp-url", env = "AMQP_URL", hide_env_values = true)]
    pub url: Option<String>,
    #[arg(long = "amqp-exchange", env = "PORTFLEET_AMQP_EXCHANGE", default_value = "portfleet")]
    pub exchange: String,
    #[arg(long = "amqp-routing-key", env = "PORTFLEET_AMQP_ROUTING_KEY", default_value = "scan.request")]
    pub routing_key: String,
    #[arg(long = "amqp-queue", env = "PORTFLEET_AMQP_QUEUE", default_value = "portfleet.scan.requests")]
    pub queue: String,
    #[arg(long = "amqp-dead-letter-exchange", env = "PORTFLEET_AMQP_DLX", default_value = "portfleet.dlx")]
    pub dead_letter_exchange: String,
    #[arg(long = "amqp-events-exchange", env = "PORTFLEET_AMQP_EVENTS_EXCHANGE", default_value = "portfleet.events")]
    pub events_exchange: String,
    /// Unacked requests in hand at once, per queue (memory: up to
    /// prefetch x --amqp-max-message-size).
    #[arg(long = "amqp-prefetch", env = "PORTFLEET_AMQP_PREFETCH", default_value_t = crate::ingress::DEFAULT_PREFETCH,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// Largest request body, in bytes; larger ones are dead-lettered
    /// unparsed.
    #[arg(long = "amqp-max-message-size", env = "PORTFLEET_AMQP_MAX_MESSAGE_SIZE",
          default_value_t = crate::ingress::DEFAULT_MAX_MESSAGE_BYTES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(64..=(128 << 20)))]
    pub max_message_size: usize,
    /// Attempts before a request that keeps failing is dead-lettered.
    #[arg(long = "amqp-delivery-limit", env = "PORTFLEET_AMQP_DELIVERY_LIMIT", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub delivery_limit: u32,
    /// Also consume NaabuM8's queue and envelopes, and publish its
    /// completion message.
    #[arg(long, env = "PORTFLEET_NAABUM8", action = ArgAction::SetTrue, value_parser = boolish())]
    pub naabum8: bool,
    #[arg(long = "naabum8-exchange", env = "PORTFLEET_NAABUM8_EXCHANGE", default_value = "cptm8")]
    pub naabum8_exchange: String,
    #[arg(long = "naabum8-queue", env = "PORTFLEET_NAABUM8_QUEUE", default_value = "qnaabum8")]
    pub naabum8_queue: String,
    #[arg(long = "naabum8-binding", env = "PORTFLEET_NAABUM8_BINDING", default_value = "cptm8.naabum8.#")]
    pub naabum8_binding: String,
    #[arg(
        long = "naabum8-completion-key",
        env = "PORTFLEET_NAABUM8_COMPLETION_KEY",
        default_value = "cptm8.katanam8.get.scan"
    )]
    pub naabum8_completion_key: String,
    /// Ports of NaabuM8-requested scans (its messages carry none).
    #[arg(long = "naabum8-ports", env = "PORTFLEET_NAABUM8_PORTS", default_value = "top-100")]
    pub naabum8_ports: String,
    /// Rate of NaabuM8-requested scans, probes per second.
    #[arg(long = "naabum8-rate", env = "PORTFLEET_NAABUM8_RATE", default_value_t = 1000)]
    pub naabum8_rate: u32,
    /// NaabuM8's own database: its commands scan the hostnames of its
    /// `cptm8hostname` table, and each scan's services and endpoints are
    /// written to its tables before the completion message (docs/amqp.md).
    /// Without it, NaabuM8 commands scan portfleet's stored targets.
    #[arg(long = "naabum8-database-url", env = "PORTFLEET_NAABUM8_DATABASE_URL", value_parser = parse_database_url,
          hide_env_values = true)]
    pub naabum8_database_url: Option<PgConnectOptions>,
}

impl AmqpArgs {
    pub fn config(&self) -> Option<IngressConfig> {
        let url = self.url.clone()?;
        Some(IngressConfig {
            url,
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            queue: self.queue.clone(),
            dead_letter_exchange: self.dead_letter_exchange.clone(),
            events_exchange: self.events_exchange.clone(),
            prefetch: self.prefetch,
            max_message_bytes: self.max_message_size,
            delivery_limit: self.delivery_limit,
            naabum8: self.naabum8.then(|| NaabuM8Config {
                exchange: self.naabum8_exchange.clone(),
                queue: self.naabum8_queue.clone(),
                binding: self.naabum8_binding.clone(),
                completion_key: self.naabum8_completion_key.clone(),
                defaults: NaabuDefaults {
                    ports: self.naabum8_ports.clone(),
                    rate: self.naabum8_rate,
                    hostname_table: self.naabum8_database_url.is_some(),
                },
                database: self.naabum8_database_url.clone(),
            }),
            connection_name: "portfleet-controller".into(),
        })
    }
}

fn parse_database_url(s: &str) -> Result<PgConnectOptions, String> {
    if !(s.starts_with("postgres://") || s.starts_with("postgresql://")) {
        return Err("expected a postgres:// or postgresql:// URL".into());
    }
    // The error text of sqlx may echo the URL; only its kind is useful.
    PgConnectOptions::from_str(s).map_err(|_| "not a valid Postgres URL".to_string())
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 3s, 1m)"))
}

/// The longest lifetime a token or certificate may be given.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A lifetime: more than zero (a zero TTL would print something already
/// expired) and at most [`MAX_TTL`].
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let ttl = parse_duration(s)?;
    if ttl.is_zero() {
        return Err("a lifetime of zero would be expired at once; give e.g. 1h or 30d".into());
    }
    if ttl > MAX_TTL {
        return Err(format!("longer than the maximum of {}", humantime::format_duration(MAX_TTL)));
    }
    Ok(ttl)
}

/// Agent sessions and scheduling.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// Names this process in leases and agent rows.
    pub controller_id: String,
    pub heartbeat_interval: Duration,
    /// A lease lapses this long after its agent's last heartbeat.
    pub lease_ttl: Duration,
    pub hello_timeout: Duration,
    /// How long a departed agent's leases wait for it to come back.
    pub disconnect_grace: Duration,
    pub max_batch_results: u32,
    pub max_unacked_frames: u32,
    /// A shard may fail this many times before its scan fails.
    pub max_shard_failures: i32,
    /// How often the scheduler looks for work without being woken.
    pub tick: Duration,
    /// Agents must present a client certificate (set from the TLS
    /// settings: a client CA is configured).
    pub require_client_cert: bool,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            controller_id: default_controller_id(),
            heartbeat_interval: Duration::from_secs(2),
            lease_ttl: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            disconnect_grace: Duration::from_secs(5),
            max_batch_results: 5000,
            max_unacked_frames: 64,
            max_shard_failures: 3,
            tick: Duration::from_millis(250),
            require_client_cert: false,
        }
    }
}

/// `<hostname>-<random>`: distinct for every process, readable in logs.
pub fn default_controller_id() -> String {
    let host = portfleet_core::host_name().unwrap_or_else(|| "controller".into());
    format!("{host}-{:08x}", rand::random::<u32>())
}

/// What API clients may hold of this controller, so they cannot starve the
/// agent protocol (docs/security.md).
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Connections of the client-facing pool, apart from the fleet's
    /// `DatabaseConfig::pool_size`.
    pub db_pool_size: u32,
    /// Most WatchScan streams at once on this controller.
    pub max_watches: u32,
    /// Most WatchScan streams at once per API token.
    pub max_watches_per_token: u32,
    /// Steps a watched scan's feed keeps for watchers that fall behind; one
    /// further behind reads its gap from the database.
    pub watch_backlog: usize,
}

impl ApiConfig {
    pub const DEFAULT_MAX_WATCHES: u32 = 1000;
    pub const DEFAULT_MAX_WATCHES_PER_TOKEN: u32 = 32;
    pub const DEFAULT_WATCH_BACKLOG: usize = 32;

    /// Half the fleet's pool, at least 2.
    pub fn default_pool_size(fleet_pool_size: u32) -> u32 {
        (fleet_pool_size / 2).max(2)
    }

    pub fn new(fleet_pool_size: u32) -> Self {
        Self {
            db_pool_size: Self::default_pool_size(fleet_pool_size),
            max_watches: Self::DEFAULT_MAX_WATCHES,
            max_watches_per_token: Self::DEFAULT_MAX_WATCHES_PER_TOKEN,
            watch_backlog: Self::DEFAULT_WATCH_BACKLOG,
        }
    }
}

/// How long finished scans are kept: `None` for ever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention(pub Option<Duration>);

/// The longest retention: Postgres cannot subtract much more from now().
pub const MAX_RETENTION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `90d`, `12h`; `0` or `forever` for no limit.
pub fn parse_retention(s: &str) -> Result<Retention, String> {
    match s.trim() {
        "0" | "forever" | "never" => Ok(Retention(None)),
        t => {
            let d = humantime::parse_duration(t).map_err(|e| format!("{t:?}: {e} (e.g. 90d, 12h, or forever)"))?;
            if d < Duration::from_secs(1) {
                return Err(format!("{t:?}: keep scans at least a second (or `forever`)"));
            }
            if d > MAX_RETENTION {
                return Err(format!("{t:?}: at most 100 years (or `forever`)"));
            }
            Ok(Retention(Some(d)))
        }
    }
}

/// Everything the controller needs to run, whatever the source.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// The fleet's pool: agent sessions, scheduler, upkeep, notifications.
    pub database: DatabaseConfig,
    /// API clients' pool size and watch caps.
    pub api: ApiConfig,
    pub limits: ScanLimits,
    pub fleet: FleetConfig,
    /// The RabbitMQ ingress, when configured.
    pub ingress: Option<IngressConfig>,
    /// Scope rules added to the database's at start.
    pub policy: ScopeRules,
    /// Politeness caps set in the database at start.
    pub rate_caps: CapsUpdate,
    /// The retention set in the database at start, when given.
    pub retain_scans: Option<Retention>,
    /// Maintain the inventory (docs/inventory.md) on this controller.
    pub inventory: bool,
    /// Serve gRPC reflection and health (unauthenticated, like all of
    /// their kind).
    pub reflection: bool,
    pub health: bool,
    /// TLS for both gRPC services; `None` serves plaintext.
    pub tls: Option<TlsFiles>,
    pub shutdown_timeout: Duration,
    /// Connection counts and timeouts (`conn`).
    pub connections: ConnectionLimits,
    /// Where metrics and HTTP health are served, when they are.
    pub metrics_listen: Option<SocketAddr>,
}

impl ControllerConfig {
    /// Defaults for everything but the database.
    pub fn new(database: PgConnectOptions) -> Self {
        Self {
            database: DatabaseConfig { options: database, pool_size: 10, acquire_timeout: Duration::from_secs(3) },
            api: ApiConfig::new(10),
            limits: ScanLimits::default(),
            fleet: FleetConfig::default(),
            ingress: None,
            policy: ScopeRules::default(),
            rate_caps: CapsUpdate::default(),
            retain_scans: None,
            inventory: true,
            reflection: true,
            health: true,
            tls: None,
            shutdown_timeout: Duration::from_secs(10),
            connections: ConnectionLimits::default(),
            metrics_listen: None,
        }
    }
}

impl ControllerConfig {
    /// Cross-setting checks; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        let f = &self.fleet;
        if f.heartbeat_interval.is_zero() {
            return Err("--heartbeat-interval must be above zero".into());
        }
        // Upkeep extends leases once a second: a lease must outlive a
        // missed heartbeat and a pass, or agents hold their probes.
        if f.lease_ttl < (f.heartbeat_interval * 2).max(f.heartbeat_interval + Duration::from_millis(1500)) {
            return Err(format!(
                "--lease-ttl ({:?}) must be at least twice --heartbeat-interval ({:?}) and 1.5 s longer",
                f.lease_ttl, f.heartbeat_interval
            ));
        }
        if f.controller_id.is_empty() || f.controller_id.len() > 128 {
            return Err("--controller-id must be 1 to 128 bytes".into());
        }
        if let Some(i) = &self.ingress {
            if !(i.url.starts_with("amqp://") || i.url.starts_with("amqps://")) {
                return Err("--amqp-url: expected an amqp:// or amqps:// URL".into());
            }
            if let Some(n) = &i.naabum8 {
                portfleet_core::PortSet::parse(&n.defaults.ports).map_err(|e| format!("--naabum8-ports: {e}"))?;
            }
        }
        self.connections.validate()?;
        Ok(())
    }
}

/// The controller's TLS material, as PEM files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Agents must present a certificate issued by this CA.
    pub client_ca: Option<PathBuf>,
    /// Its key: the controller signs enrolling agents' certificates.
    pub client_ca_key: Option<PathBuf>,
    pub agent_cert_ttl: Duration,
}

pub use portfleet_core::policy::CidrList;

fn parse_cidr_list(s: &str) -> Result<CidrList, String> {
    s.parse()
}

impl TryFrom<&ServeArgs> for ControllerConfig {
    /// What is wrong, naming the flag.
    type Error = String;

    fn try_from(a: &ServeArgs) -> Result<Self, String> {
        Ok(Self {
            database: a.database.config()?,
            api: ApiConfig {
                db_pool_size: a
                    .db_api_pool_size
                    .unwrap_or_else(|| ApiConfig::default_pool_size(a.database.db_pool_size)),
                max_watches: a.max_watches,
                max_watches_per_token: a.max_watches_per_token,
                watch_backlog: ApiConfig::DEFAULT_WATCH_BACKLOG,
            },
            limits: ScanLimits {
                max_probes: a.max_scan_probes,
                max_targets: a.max_scan_targets,
                max_hostnames: a.max_scan_hostnames,
                resolve_deadline: a.resolve_deadline,
                min_schedule_interval: a.min_schedule_interval,
                shards: ShardPolicy::default(),
                ..ScanLimits::default()
            },
            fleet: FleetConfig {
                controller_id: a.controller_id.clone().unwrap_or_else(default_controller_id),
                heartbeat_interval: a.heartbeat_interval,
                lease_ttl: a.lease_ttl,
                // Long enough for a heartbeat and an upkeep pass: an agent
                // holds its probes when it outlasts them (docs/protocol.md).
                disconnect_grace: a
                    .lease_ttl
                    .min((a.heartbeat_interval * 2 + Duration::from_secs(1)).max(Duration::from_secs(5))),
                max_shard_failures: a.max_shard_failures,
                ..FleetConfig::default()
            },
            ingress: {
                if a.amqp.naabum8_database_url.is_some() && !(a.amqp.naabum8 && a.amqp.url.is_some()) {
                    return Err("--naabum8-database-url needs --naabum8 and --amqp-url".into());
                }
                a.amqp.config()
            },
            policy: ScopeRules { allow: a.allow.0.clone(), deny: a.deny.0.clone() },
            rate_caps: CapsUpdate { per_host: a.max_rate_per_host, per_block: a.max_rate_per_block },
            retain_scans: a.retain_scans,
            inventory: !a.no_inventory,
            reflection: !a.no_reflection,
            health: !a.no_health,
            tls: a.tls_cert.clone().zip(a.tls_key.clone()).map(|(cert, key)| TlsFiles {
                cert,
                key,
                client_ca: a.tls_client_ca.clone(),
                client_ca_key: a.tls_client_ca_key.clone(),
                agent_cert_ttl: a.agent_cert_ttl,
            }),
            shutdown_timeout: a.shutdown_timeout,
            connections: ConnectionLimits {
                max_connections: a.max_connections,
                max_connections_per_ip: a.max_connections_per_ip,
                handshake_timeout: a.handshake_timeout,
                idle_timeout: a.idle_timeout,
            },
            metrics_listen: a.metrics_listen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "postgres://postgres@127.0.0.1:5432/portfleet";

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("portfleet-controller").chain(args.iter().copied()))
    }

    #[test]
    fn database_flags_go_before_or_after_the_subcommand() {
        for args in [
            &["tokens", "--database-url", URL, "create", "--scope", "read"][..],
            &["tokens", "create", "--scope", "read", "--database-url", URL, "--db-pool-size", "3"],
            &["agents", "revoke", "--database-url", URL, "00000000-0000-0000-0000-000000000001"],
            &["tokens", "list", "--log-format", "json", "--database-url", URL],
        ] {
            let cli = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let (Command::Tokens { database, .. } | Command::Agents { database, .. }) = cli.command else {
                panic!("{args:?}")
            };
            assert!(database.config().is_ok(), "{args:?}");
        }
        let Command::Tokens { database, .. } = parse(&["tokens", "list", "--db-pool-size", "3"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!(database.db_pool_size, 3);
    }

    #[test]
    fn the_command_line_and_its_default_config_file_are_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let text = portfleet_telemetry::config_file::default_file(Cli::command(), CONFIG_FILE);
        for key in ["database-url", "listen", "max-scan-probes", "insecure", "amqp-url", "log-format"] {
            assert!(text.contains(&format!("\n# {key} = ")), "{key} missing from:\n{text}");
        }
        assert!(!text.contains("\n# config = "), "{text}");
    }

    #[test]
    fn boolean_flags_take_the_usual_spellings() {
        let serve = |extra: &[&str]| {
            let mut args = vec!["serve", "--database-url", URL];
            args.extend_from_slice(extra);
            match parse(&args).map(|c| c.command) {
                Ok(Command::Serve(a)) => Ok(a),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e),
            }
        };
        assert!(serve(&["--insecure"]).unwrap().insecure);
        assert!(!serve(&[]).unwrap().insecure);
        assert!(serve(&["--no-health", "--no-reflection"]).is_ok_and(|a| a.no_health && a.no_reflection));
    }
}
