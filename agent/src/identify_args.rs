//! The identification flags `run` and `scan` share.

use std::{path::PathBuf, time::Duration};

use clap::Args;

use crate::identify::{Identifier, IdentifyError, Options};

#[derive(Args, Debug, Clone)]
pub struct IdentifyArgs {
    /// Identifications in flight at once (each holds one connection).
    #[arg(long = "identify-concurrency", env = "PORTFLEET_IDENTIFY_CONCURRENCY", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub identify_concurrency: u32,
    /// Identifications in flight per target address.
    #[arg(long = "identify-per-host", env = "PORTFLEET_IDENTIFY_PER_HOST", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub identify_per_host: u32,
    /// Connect (and TLS handshake) timeout of an identification connection.
    #[arg(long = "identify-connect-timeout", env = "PORTFLEET_IDENTIFY_CONNECT_TIMEOUT", default_value = "3s",
          value_parser = duration)]
    pub identify_connect_timeout: Duration,
    /// Longest wait for a response to one identification probe.
    #[arg(long = "identify-read-timeout", env = "PORTFLEET_IDENTIFY_READ_TIMEOUT", default_value = "3s",
          value_parser = duration)]
    pub identify_read_timeout: Duration,
    /// All of one port's identification, whatever the server does.
    #[arg(long = "identify-deadline", env = "PORTFLEET_IDENTIFY_DEADLINE", default_value = "20s",
          value_parser = duration)]
    pub identify_deadline: Duration,
    /// nmap's service probe database, read at start ("none": the built-in
    /// rules only). Default: /usr/share/nmap/nmap-service-probes when nmap
    /// is installed.
    #[arg(long = "nmap-service-probes", env = "PORTFLEET_NMAP_SERVICE_PROBES", value_name = "PATH")]
    pub nmap_service_probes: Option<PathBuf>,
    /// nmap's --version-intensity: probes of rarity up to this are tried (0-9).
    #[arg(long = "version-intensity", env = "PORTFLEET_VERSION_INTENSITY", default_value_t = 7,
          value_parser = clap::value_parser!(u8).range(0..=9))]
    pub identify_intensity: u8,
}

fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 3s, 500ms)"))?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

impl IdentifyArgs {
    pub fn options(&self) -> Options {
        let nmap_probes = match &self.nmap_service_probes {
            Some(p) if p.as_os_str() == "none" => None,
            Some(p) => Some(p.clone()),
            None => Identifier::default_nmap_probes(),
        };
        Options {
            concurrency: self.identify_concurrency as usize,
            per_host: self.identify_per_host as usize,
            connect_timeout: self.identify_connect_timeout,
            read_timeout: self.identify_read_timeout,
            banner_wait: self.identify_read_timeout.min(Duration::from_millis(1500)),
            port_deadline: self.identify_deadline,
            intensity: self.identify_intensity,
            nmap_probes,
            ..Options::default()
        }
    }

    /// The identification stage these flags describe.
    pub fn identifier(&self) -> Result<Identifier, IdentifyError> {
        Identifier::new(self.options())
    }
}
