//! Command line and environment: parsed once, validated once, turned into
//! one typed [`ControllerConfig`]. A bad setting exits non-zero naming it.

use std::{net::SocketAddr, str::FromStr, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use portfleet_core::ShardPolicy;
use sqlx::postgres::PgConnectOptions;

use crate::{scans::ScanLimits, store::DatabaseConfig};

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
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Apply migrations, then serve the gRPC API until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Apply the database migrations and exit.
    Migrate(DatabaseArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// Postgres URL, e.g. postgres://postgres@127.0.0.1:5432/portfleet
    #[arg(long, env = "DATABASE_URL", value_parser = parse_database_url, hide_env_values = true)]
    pub database_url: PgConnectOptions,
    /// Most connections in the pool.
    #[arg(long, env = "PORTFLEET_DB_POOL_SIZE", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_pool_size: u32,
    /// How long a call waits for a database connection before failing with
    /// UNAVAILABLE (e.g. 3s, 500ms).
    #[arg(long, env = "PORTFLEET_DB_ACQUIRE_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub db_acquire_timeout: Duration,
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
    /// How long in-flight calls may take to finish after SIGTERM.
    #[arg(long, env = "PORTFLEET_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
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
        }
    }
}

/// `<hostname>-<random>`: distinct for every process, readable in logs.
pub fn default_controller_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "controller".into());
    format!("{host}-{:08x}", rand::random::<u32>())
}

/// Everything the controller needs to run, whatever the source.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub database: DatabaseConfig,
    pub limits: ScanLimits,
    pub fleet: FleetConfig,
    pub shutdown_timeout: Duration,
}

impl ControllerConfig {
    /// Defaults for everything but the database.
    pub fn new(database: PgConnectOptions) -> Self {
        Self {
            database: DatabaseConfig { options: database, pool_size: 10, acquire_timeout: Duration::from_secs(3) },
            limits: ScanLimits::default(),
            fleet: FleetConfig::default(),
            shutdown_timeout: Duration::from_secs(10),
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
        if f.lease_ttl < f.heartbeat_interval * 2 {
            return Err(format!(
                "--lease-ttl ({:?}) must be at least twice --heartbeat-interval ({:?})",
                f.lease_ttl, f.heartbeat_interval
            ));
        }
        if f.controller_id.is_empty() || f.controller_id.len() > 128 {
            return Err("--controller-id must be 1 to 128 bytes".into());
        }
        Ok(())
    }
}

impl From<&DatabaseArgs> for DatabaseConfig {
    fn from(a: &DatabaseArgs) -> Self {
        Self { options: a.database_url.clone(), pool_size: a.db_pool_size, acquire_timeout: a.db_acquire_timeout }
    }
}

impl From<&ServeArgs> for ControllerConfig {
    fn from(a: &ServeArgs) -> Self {
        Self {
            database: DatabaseConfig::from(&a.database),
            limits: ScanLimits {
                max_probes: a.max_scan_probes,
                max_targets: a.max_scan_targets,
                shards: ShardPolicy::default(),
                ..ScanLimits::default()
            },
            fleet: FleetConfig {
                controller_id: a.controller_id.clone().unwrap_or_else(default_controller_id),
                heartbeat_interval: a.heartbeat_interval,
                lease_ttl: a.lease_ttl,
                disconnect_grace: a.lease_ttl.min(Duration::from_secs(5)),
                max_shard_failures: a.max_shard_failures,
                ..FleetConfig::default()
            },
            shutdown_timeout: a.shutdown_timeout,
        }
    }
}
