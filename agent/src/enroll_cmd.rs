//! `portfleet-agent enroll`: makes this agent's key here (it never leaves
//! the host), trades a one-time token and a certificate request for a
//! certificate over server-authenticated TLS, and stores key, certificate,
//! CA and the agent id the controller assigned in the state directory
//! (0600), where `run` finds them.

use std::path::{Path, PathBuf};

use clap::Args;
use portfleet_core::labels::Labels;
use portfleet_proto::v1::{self as pb, agent_service_client::AgentServiceClient};
use rcgen::{CertificateParams, DnType, KeyPair};
use tonic::transport::Endpoint;

use crate::{
    run_cmd,
    session::{self, state_path, write_labels},
};

#[derive(Args, Debug, Clone)]
pub struct EnrollArgs {
    /// The config file of `run` (--config FILE, docs/operations.md): its
    /// controller, ca, name and state-dir apply here too.
    #[arg(long = "config", env = "PORTFLEET_AGENT_CONFIG", value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// The controller, https://HOST:PORT.
    #[arg(long, env = "PORTFLEET_CONTROLLER")]
    pub controller: String,
    /// The one-time token from `portfleet-controller agents enroll-token`.
    #[arg(long, env = "PORTFLEET_ENROLL_TOKEN", hide_env_values = true)]
    pub token: String,
    /// PEM CA that signed the controller's certificate.
    #[arg(long, env = "PORTFLEET_AGENT_CA")]
    pub ca: PathBuf,
    /// This agent's name (default: the host name).
    #[arg(long, env = "PORTFLEET_AGENT_NAME")]
    pub name: Option<String>,
    /// Where the agent keeps its id, key and certificate.
    #[arg(long = "state-dir", env = "PORTFLEET_AGENT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), String> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // An existing file keeps its mode on open: set it again.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(contents).map_err(|e| format!("{}: {e}", path.display()))
}

async fn enroll(args: EnrollArgs) -> Result<String, String> {
    if !args.controller.starts_with("https://") {
        return Err(format!("--controller {:?}: enrollment needs https://", args.controller));
    }
    let name = args.name.unwrap_or_else(run_cmd::host_name);
    let dir = args.state_dir.unwrap_or_else(run_cmd::default_state_dir);
    // Not under a running agent's feet (it renews these files itself), and
    // before the one-time token is spent.
    let _lock = session::lock(&dir, &name).map_err(|e| e.to_string())?;
    let ca = std::fs::read(&args.ca).map_err(|e| format!("--ca {}: {e}", args.ca.display()))?;
    let key = KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params.distinguished_name.push(DnType::CommonName, name.as_str());
    let csr = params.serialize_request(&key).and_then(|c| c.pem()).map_err(|e| format!("certificate request: {e}"))?;
    let channel = Endpoint::from_shared(args.controller.clone())
        .map_err(|e| format!("--controller: {e}"))?
        .tls_config(portfleet_proto::auth::client_tls(&ca, None))
        .map_err(|e| format!("TLS: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("cannot reach {}: {e}", args.controller))?;
    let r = AgentServiceClient::new(channel)
        .enroll(pb::EnrollRequest { token: args.token, csr_pem: csr, name: name.clone() })
        .await
        .map_err(|s| format!("enrollment refused ({:?}): {}", s.code(), s.message()))?
        .into_inner();
    let id = uuid::Uuid::try_parse(&r.agent_id).map_err(|_| "the controller sent a bad agent id".to_string())?;
    // The labels this agent will announce: only ones a scan's
    // agent_selector can match (the same rules as `run --labels`).
    let labels = Labels::try_from(r.labels).map_err(|e| format!("the enrollment token's labels: {e}"))?;
    write_private(&state_path(&dir, &name, "key"), key.serialize_pem().as_bytes())?;
    write_private(&state_path(&dir, &name, "crt"), r.certificate_pem.as_bytes())?;
    write_private(&state_path(&dir, &name, "ca.pem"), &ca)?;
    write_private(&state_path(&dir, &name, "labels"), write_labels(&labels).as_bytes())?;
    // The certificate's identity becomes the agent's.
    write_private(&state_path(&dir, &name, "id"), format!("{id}\n").as_bytes())?;
    Ok(format!("enrolled agent {id} ({name}); certificate in {}", state_path(&dir, &name, "crt").display()))
}

pub async fn run(args: EnrollArgs) -> i32 {
    match enroll(args).await {
        Ok(msg) => {
            eprintln!("{msg}");
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
