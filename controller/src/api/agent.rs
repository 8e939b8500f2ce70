//! The `AgentService` adapter: opening a session (the certificate check,
//! then `sessions::accept`), enrollment and certificate renewal. Thin:
//! the work is in `sessions` and `enroll`; errors become statuses in
//! `status.rs`.

use std::sync::Arc;

use portfleet_core::text;
use portfleet_proto::v1::{self as pb, agent_service_server::AgentService};
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use super::status::{enroll_status, store_status};
use crate::sessions::{self, Fleet, SessionStream};

#[derive(Clone, Debug)]
pub struct AgentApi {
    fleet: Arc<Fleet>,
}

impl AgentApi {
    pub fn new(fleet: Arc<Fleet>) -> Self {
        Self { fleet }
    }

    /// The agent the caller's client certificate names, if it is not
    /// revoked. The TLS handshake already verified the chain.
    async fn certified_agent<T>(&self, request: &Request<T>) -> Result<Uuid, Status> {
        let certs = request.peer_certs().filter(|c| !c.is_empty()).ok_or_else(|| {
            Status::unauthenticated("agents must present a client certificate issued by the controller's CA")
        })?;
        let id = crate::enroll::agent_of(certs[0].as_ref())
            .ok_or_else(|| Status::unauthenticated("the client certificate names no agent id"))?;
        if self.fleet.store.is_agent_revoked(id).await.map_err(store_status)? {
            tracing::warn!(agent_id = %id, "a revoked agent tried to connect");
            return Err(Status::permission_denied(format!("agent {id} is revoked")));
        }
        Ok(id)
    }

    fn ca(&self, missing: &'static str) -> Result<&crate::enroll::AgentCa, Status> {
        self.fleet.agent_ca.as_deref().ok_or_else(|| Status::failed_precondition(missing))
    }
}

fn response(
    agent_id: Uuid,
    certificate_pem: String,
    ca: &crate::enroll::AgentCa,
    expires: chrono::DateTime<chrono::Utc>,
    labels: crate::store::Labels,
) -> Response<pb::EnrollResponse> {
    Response::new(pb::EnrollResponse {
        agent_id: agent_id.to_string(),
        certificate_pem,
        ca_pem: ca.pem().to_string(),
        expires_at: Some(prost_types::Timestamp { seconds: expires.timestamp(), nanos: 0 }),
        labels: labels.into_iter().collect(),
    })
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SessionStream = SessionStream;

    async fn session(&self, request: Request<Streaming<pb::AgentMessage>>) -> Result<Response<SessionStream>, Status> {
        // With mTLS the handshake verified the chain; an agent without a
        // certificate (an operator's client, a token) gets nothing here.
        let identity =
            if self.fleet.config.require_client_cert { Some(self.certified_agent(&request).await?) } else { None };
        let peer = request.remote_addr();
        Ok(Response::new(sessions::accept(&self.fleet, request.into_inner(), identity, peer)))
    }

    async fn renew(&self, request: Request<pb::RenewRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        let ca = self.ca("this controller does not sign certificates")?;
        let agent_id = self.certified_agent(&request).await?;
        let (certificate_pem, expires) = ca.sign(&request.get_ref().csr_pem, agent_id).map_err(enroll_status)?;
        tracing::info!(%agent_id, %expires, "agent certificate renewed");
        Ok(response(agent_id, certificate_pem, ca, expires, Default::default()))
    }

    async fn enroll(&self, request: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        let ca = self.ca("this controller does not enroll agents (serve --tls-client-ca-key)")?;
        let r = request.into_inner();
        if r.token.len() > 256 {
            return Err(Status::invalid_argument("token: too long"));
        }
        text::check(&r.name, 128).map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        let agent_id = Uuid::new_v4();
        // Sign first: a bad request must not burn the token.
        let (certificate_pem, expires) = ca.sign(&r.csr_pem, agent_id).map_err(enroll_status)?;
        let labels = crate::enroll::redeem(&self.fleet.store, &r.token, agent_id).await.map_err(|e| {
            tracing::warn!(name = %r.name, "enrollment refused: {e}");
            enroll_status(e)
        })?;
        tracing::info!(%agent_id, name = %r.name, %expires, "agent enrolled");
        Ok(response(agent_id, certificate_pem, ca, expires, labels))
    }
}
