//! gRPC adapters: thin translations between `portfleet.v1` messages and the
//! domain (scans) and store. No business logic lives here.

mod agent;
mod convert;
mod inventory;
mod page;
mod schedules;
mod status;
mod watch;

use std::{collections::HashMap, pin::Pin};

use futures::Stream;
use portfleet_core::TargetSpec;
use portfleet_proto::v1::{self as pb, scan_service_server::ScanService};
use portfleet_telemetry::{otel, otel::TraceParent, trace_span};
use tonic::{Request, Response, Status};
use tracing::Instrument;

pub use self::{
    agent::AgentApi,
    status::{store_status, to_status},
    watch::WatchHub,
};

use crate::{
    auth::{Authorizer, Scope},
    scans::{RequestTrace, ScanManager, ScanRequestInput},
    store::{AgentState, CapsUpdate, NewTarget, Page, ScopeRules, Store, TargetFilter},
};

/// Most targets one CreateTargets call may carry.
const MAX_TARGETS_PER_CALL: usize = 10_000;

#[derive(Clone, Debug)]
pub struct ScanApi {
    scans: ScanManager,
    store: Store,
    watches: WatchHub,
    auth: Authorizer,
    /// Scan spaces, for diffs.
    plans: crate::plans::ScanPlans,
    schedules: crate::schedules::ScheduleManager,
}

impl ScanApi {
    /// `store` and `scans` work on the API clients' pool; `watches` serves
    /// WatchScan.
    pub fn new(scans: ScanManager, store: Store, watches: WatchHub) -> Self {
        let auth = Authorizer::new(store.clone(), std::time::Duration::from_secs(5));
        let plans = crate::plans::ScanPlans::new(store.clone());
        let schedules = crate::schedules::ScheduleManager::new(store.clone(), scans.clone());
        Self { scans, store, watches, auth, plans, schedules }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchScanResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ScanService for ScanApi {
    async fn create_targets(
        &self,
        request: Request<pb::CreateTargetsRequest>,
    ) -> Result<Response<pb::CreateTargetsResponse>, Status> {
        self.auth.authorize(request.metadata(), Scope::Scan, "CreateTargets").await?;
        let targets = request.into_inner().targets;
        if targets.is_empty() {
            return Err(Status::invalid_argument("targets: give at least one target"));
        }
        if targets.len() > MAX_TARGETS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "targets: {} targets exceed the maximum of {MAX_TARGETS_PER_CALL} per call",
                targets.len()
            )));
        }
        // One row per (group, value); the last occurrence wins, as it would
        // with one call per target.
        let mut unique: HashMap<(String, String), usize> = HashMap::new();
        let mut rows: Vec<NewTarget> = Vec::with_capacity(targets.len());
        for (i, t) in targets.into_iter().enumerate() {
            let spec = TargetSpec::parse(&t.value)
                .map_err(|e| Status::invalid_argument(format!("targets[{i}].value: {e}")))?;
            let group = t.group.trim().to_string();
            portfleet_core::text::check(&group, 128)
                .map_err(|e| Status::invalid_argument(format!("targets[{i}].group: {e}")))?;
            let row = NewTarget {
                value: spec.to_string(),
                kind: spec.kind().as_str(),
                group,
                enabled: t.enabled.unwrap_or(true),
            };
            match unique.entry((row.group.clone(), row.value.clone())) {
                std::collections::hash_map::Entry::Occupied(e) => rows[*e.get()] = row,
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(rows.len());
                    rows.push(row);
                }
            }
        }
        let stored = self.store.upsert_targets(&rows).await.map_err(store_status)?;
        Ok(Response::new(pb::CreateTargetsResponse { targets: stored.into_iter().map(Into::into).collect() }))
    }

    async fn list_targets(
        &self,
        request: Request<pb::ListTargetsRequest>,
    ) -> Result<Response<pb::ListTargetsResponse>, Status> {
        self.auth.authorize(request.metadata(), Scope::Read, "ListTargets").await?;
        let r = request.into_inner();
        let page = Page { after: page::decode("targets", &r.page_token)?, limit: page::size(r.page_size, 100, 1000) };
        let group = r.group.map(|g| g.trim().to_string());
        if let Some(g) = &group {
            portfleet_core::text::check(g, 128).map_err(|e| Status::invalid_argument(format!("group: {e}")))?;
        }
        let filter = TargetFilter { group, enabled_only: r.enabled_only };
        let paged = self.store.list_targets(&filter, page).await.map_err(store_status)?;
        Ok(Response::new(pb::ListTargetsResponse {
            targets: paged.items.into_iter().map(Into::into).collect(),
            next_page_token: page::encode("targets", paged.next),
        }))
    }

    async fn delete_target(
        &self,
        request: Request<pb::DeleteTargetRequest>,
    ) -> Result<Response<pb::DeleteTargetResponse>, Status> {
        self.auth.authorize(request.metadata(), Scope::Scan, "DeleteTarget").await?;
        let id = convert::parse_id("id", &request.get_ref().id)?;
        if !self.store.delete_target(id).await.map_err(store_status)? {
            return Err(Status::not_found(format!("target {id} not found")));
        }
        Ok(Response::new(pb::DeleteTargetResponse {}))
    }

    async fn create_scan(&self, request: Request<pb::CreateScanRequest>) -> Result<Response<pb::Scan>, Status> {
        // The caller's trace context (W3C `traceparent`/`tracestate`
        // metadata): the call's span continues it.
        let header = |name: &str| request.metadata().get(name).and_then(|v| v.to_str().ok());
        let (traceparent, tracestate) = (header("traceparent"), header("tracestate"));
        let span = trace_span!(
            "portfleet.v1.ScanService/CreateScan",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = "portfleet.v1.ScanService",
            rpc.method = "CreateScan",
            otel.status_code = tracing::field::Empty,
            rpc.grpc.status_code = tracing::field::Empty
        );
        otel::continue_remote(&span, traceparent, tracestate);
        let trace = RequestTrace { span: span.clone(), parent: traceparent.and_then(TraceParent::parse) };
        let created: Result<Response<pb::Scan>, Status> = async {
            self.auth.authorize(request.metadata(), Scope::Scan, "CreateScan").await?;
            let request = request.into_inner();
            if request.validate_only {
                let preview =
                    self.scans.preview(ScanRequestInput::try_from(request.clone())?).await.map_err(to_status)?;
                return Ok(Response::new(convert::preview_to_pb(request, preview)));
            }
            let input = ScanRequestInput { trace, ..ScanRequestInput::try_from(request)? };
            let (scan, _) = self.scans.create(input).await.map_err(to_status)?;
            Ok(Response::new(scan.into()))
        }
        .instrument(span.clone())
        .await;
        if let Err(status) = &created {
            span.record("otel.status_code", "error");
            span.record("rpc.grpc.status_code", status.code() as i32);
        }
        created
    }

    async fn get_scan(&self, request: Request<pb::GetScanRequest>) -> Result<Response<pb::Scan>, Status> {
        self.auth.authorize(request.metadata(), Scope::Read, "GetScan").await?;
        let id = convert::parse_id("id", &request.get_ref().id)?;
        let scan = self.scans.get(id).await.map_err(to_status)?;
        Ok(Response::new(scan.into()))
    }

    async fn list_scans(
        &self,
        request: Request<pb::ListScansRequest>,
    ) -> Result<Response<pb::ListScansResponse>, Status> {
        self.auth.authorize(request.metadata(), Scope::Read, "ListScans").await?;
        let r = request.into_inner();
        let state = convert::scan_state_from_pb(r.state)?;
        let page = Page { after: page::decode("scans", &r.page_token)?, limit: page::size(r.page_size, 50, 1000) };
        let paged = self.scans.list(state, page).await.map_err(to_status)?;
        Ok(Response::new(pb::ListScansResponse {
            scans: paged.items.into_iter().map(Into::into).collect(),
            next_page_token: page::encode("scans", paged.next),
        }))
    }

    async fn cancel_scan(&self, request: Request<pb::CancelScanRequest>) -> Result<Response<pb::Scan>, Status> {
        self.auth.authorize(request.metadata(), Scope::Scan, "CancelScan").await?;
        let id = convert::parse_id("id", &request.get_ref().id)?;
        let scan = self.scans.cancel(id).await.map_err(to_status)?;
        Ok(Response::new(scan.into()))
    }

    async fn list_results(
        &self,
        request: Request<pb::ListResultsRequest>,
    ) -> Result<Response<pb::ListResultsResponse>, Status> {
        self.auth.authorize(request.metadata(), Scope::Read, "ListResults").await?;
        let r = request.into_inner();
        let scan_id = convert::parse_id("scan_id", &r.scan_id)?;
        let page: Page<crate::store::ResultKey> = Page { after: None, limit: page::size(r.page_size, 1000, 10_000) };
        // NOT_FOUND for an unknown scan rather than an empty list.
        self.scans.get(scan_id).await.map_err(to_status)?;
        let filter = crate::store::ResultFilter {
            cidr: inventory::cidr("cidr", &r.cidr)?,
            port: inventory::port("port", r.port)?,
            hostname: Some(r.hostname.trim().to_lowercase()).filter(|h| !h.is_empty()),
            state: convert::port_state_from_pb(r.state)?,
            observed_since: inventory::time("observed_since", r.observed_since)?,
        };
        // A token is bound to its scan and filters.
        let list = results_list(scan_id, &r);
        let page = Page { after: page::decode(&list, &r.page_token)?, limit: page.limit };
        let paged = self.store.list_results(scan_id, &filter, page).await.map_err(store_status)?;
        Ok(Response::new(pb::ListResultsResponse {
            results: paged.items.into_iter().map(Into::into).collect(),
            next_page_token: page::encode(&list, paged.next),
        }))
    }

    type WatchScanStream = WatchStream;

    async fn watch_scan(&self, request: Request<pb::WatchScanRequest>) -> Result<Response<WatchStream>, Status> {
        let caller = self.auth.authorize(request.metadata(), Scope::Read, "WatchScan").await?;
        let id = convert::parse_id("id", &request.get_ref().id)?;
        // The slot first: a refused watch costs no query.
        let slot = self.watches.admit(&caller)?;
        let scan = self.scans.get(id).await.map_err(to_status)?;
        Ok(Response::new(Box::pin(self.watches.watch(slot, scan))))
    }

    async fn drain_agent(&self, request: Request<pb::DrainAgentRequest>) -> Result<Response<pb::Agent>, Status> {
        self.auth.authorize(request.metadata(), Scope::Admin, "DrainAgent").await?;
        let id = convert::parse_id("id", &request.get_ref().id)?;
        let agent = self.store.drain_agent(id).await.map_err(store_status)?;
        let agent = agent.ok_or_else(|| Status::not_found(format!("agent {id} not found")))?;
        if agent.state == AgentState::Gone {
            return Err(Status::failed_precondition(format!("agent {id} is not connected")));
        }
        Ok(Response::new(agent.into()))
    }

    async fn undrain_agent(&self, request: Request<pb::UndrainAgentRequest>) -> Result<Response<pb::Agent>, Status> {
        self.auth.authorize(request.metadata(), Scope::Admin, "UndrainAgent").await?;
        let id = convert::parse_id("id", &request.get_ref().id)?;
        let agent = self.store.undrain_agent(id).await.map_err(store_status)?;
        let agent = agent.ok_or_else(|| Status::not_found(format!("agent {id} not found")))?;
        if agent.state == AgentState::Gone {
            return Err(Status::failed_precondition(format!("agent {id} is not connected")));
        }
        Ok(Response::new(agent.into()))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.auth.authorize(request.metadata(), Scope::Admin, "ListAgents").await?;
        let r = request.into_inner();
        let state = convert::agent_state_from_pb(r.state)?;
        let page = Page { after: page::decode("agents", &r.page_token)?, limit: page::size(r.page_size, 100, 1000) };
        let paged = self.store.list_agents(state, page).await.map_err(store_status)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: paged.items.into_iter().map(Into::into).collect(),
            next_page_token: page::encode("agents", paged.next),
        }))
    }

    async fn get_scope_policy(
        &self,
        request: Request<pb::GetScopePolicyRequest>,
    ) -> Result<Response<pb::ScopePolicy>, Status> {
        self.auth.authorize(request.metadata(), Scope::Admin, "GetScopePolicy").await?;
        Ok(Response::new(self.scope_policy().await?))
    }

    async fn update_scope_policy(
        &self,
        request: Request<pb::UpdateScopePolicyRequest>,
    ) -> Result<Response<pb::UpdateScopePolicyResponse>, Status> {
        self.auth.authorize(request.metadata(), Scope::Admin, "UpdateScopePolicy").await?;
        let r = request.into_inner();
        let nets = |field: &str, items: &[String]| {
            if items.len() > 10_000 {
                return Err(Status::invalid_argument(format!("{field}: more than 10000 entries")));
            }
            portfleet_core::policy::parse_cidrs(&items.join(","))
                .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
        };
        let add = ScopeRules { allow: nets("add_allow", &r.add_allow)?, deny: nets("add_deny", &r.add_deny)? };
        let remove =
            ScopeRules { allow: nets("remove_allow", &r.remove_allow)?, deny: nets("remove_deny", &r.remove_deny)? };
        let caps = CapsUpdate { per_host: r.max_rate_per_host, per_block: r.max_rate_per_block };
        let failed = self.scans.update_policy(&add, &remove, caps).await.map_err(to_status)?;
        // Values, not Debug: an unset cap is left out, not `None`.
        let list = |nets: &[ipnet::IpNet]| crate::config::CidrList(nets.to_vec()).to_string();
        tracing::info!(
            allow_added = list(&add.allow),
            deny_added = list(&add.deny),
            allow_removed = list(&remove.allow),
            deny_removed = list(&remove.deny),
            max_rate_per_host = caps.per_host,
            max_rate_per_block = caps.per_block,
            failed = failed.len(),
            "scope policy updated"
        );
        Ok(Response::new(pb::UpdateScopePolicyResponse {
            policy: Some(self.scope_policy().await?),
            failed_scan_ids: failed.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn delete_scan(
        &self,
        request: Request<pb::DeleteScanRequest>,
    ) -> Result<Response<pb::DeleteScanResponse>, Status> {
        self.do_delete_scan(request).await
    }

    async fn list_hosts(
        &self,
        request: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        self.do_list_hosts(request).await
    }

    async fn get_host(&self, request: Request<pb::GetHostRequest>) -> Result<Response<pb::Host>, Status> {
        self.do_get_host(request).await
    }

    async fn list_changes(
        &self,
        request: Request<pb::ListChangesRequest>,
    ) -> Result<Response<pb::ListChangesResponse>, Status> {
        self.do_list_changes(request).await
    }

    async fn diff_scans(
        &self,
        request: Request<pb::DiffScansRequest>,
    ) -> Result<Response<pb::DiffScansResponse>, Status> {
        self.do_diff_scans(request).await
    }

    async fn create_webhook(
        &self,
        request: Request<pb::CreateWebhookRequest>,
    ) -> Result<Response<pb::Webhook>, Status> {
        self.do_create_webhook(request).await
    }

    async fn list_webhooks(
        &self,
        request: Request<pb::ListWebhooksRequest>,
    ) -> Result<Response<pb::ListWebhooksResponse>, Status> {
        self.do_list_webhooks(request).await
    }

    async fn delete_webhook(
        &self,
        request: Request<pb::DeleteWebhookRequest>,
    ) -> Result<Response<pb::DeleteWebhookResponse>, Status> {
        self.do_delete_webhook(request).await
    }

    async fn list_webhook_deliveries(
        &self,
        request: Request<pb::ListWebhookDeliveriesRequest>,
    ) -> Result<Response<pb::ListWebhookDeliveriesResponse>, Status> {
        self.do_list_webhook_deliveries(request).await
    }

    async fn create_schedule(
        &self,
        request: Request<pb::CreateScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        self.do_create_schedule(request).await
    }

    async fn list_schedules(
        &self,
        request: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        self.do_list_schedules(request).await
    }

    async fn get_schedule(&self, request: Request<pb::GetScheduleRequest>) -> Result<Response<pb::Schedule>, Status> {
        self.do_get_schedule(request).await
    }

    async fn update_schedule(
        &self,
        request: Request<pb::UpdateScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        self.do_update_schedule(request).await
    }

    async fn delete_schedule(
        &self,
        request: Request<pb::DeleteScheduleRequest>,
    ) -> Result<Response<pb::DeleteScheduleResponse>, Status> {
        self.do_delete_schedule(request).await
    }

    async fn pause_schedule(
        &self,
        request: Request<pb::PauseScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        self.do_set_paused(request.metadata(), &request.get_ref().id, true).await
    }

    async fn resume_schedule(
        &self,
        request: Request<pb::ResumeScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        self.do_set_paused(request.metadata(), &request.get_ref().id, false).await
    }

    async fn get_retention(
        &self,
        request: Request<pb::GetRetentionRequest>,
    ) -> Result<Response<pb::Retention>, Status> {
        self.do_get_retention(request).await
    }

    async fn update_retention(
        &self,
        request: Request<pb::UpdateRetentionRequest>,
    ) -> Result<Response<pb::Retention>, Status> {
        self.do_update_retention(request).await
    }
}

/// The list a ListResults token belongs to: its scan and filters, so a
/// token from another query is refused rather than silently misread.
fn results_list(scan_id: uuid::Uuid, r: &pb::ListResultsRequest) -> String {
    use sha2::Digest;
    let since = r.observed_since.as_ref().map(|t| (t.seconds, t.nanos));
    let key = format!("{scan_id}|{}|{:?}|{}|{}|{since:?}", r.cidr.trim(), r.port, r.hostname.trim(), r.state);
    let digest = sha2::Sha256::digest(key.as_bytes());
    let short: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("results:{short}")
}

impl ScanApi {
    async fn scope_policy(&self) -> Result<pb::ScopePolicy, Status> {
        let rules = self.store.scope_rules().await.map_err(store_status)?;
        let caps = self.store.rate_caps().await.map_err(store_status)?;
        let text = |v: &[ipnet::IpNet]| v.iter().map(ToString::to_string).collect();
        let (fixed, host) = split_builtin(self.scans.policy().builtin());
        Ok(pb::ScopePolicy {
            allow: text(&rules.allow),
            deny: text(&rules.deny),
            builtin_deny: text(&[fixed, host.clone()].concat()),
            host_addresses: text(&host),
            max_rate_per_host: caps.per_host,
            max_rate_per_block: caps.per_block,
        })
    }
}

/// Splits the built-in deny-list into the fixed entries and this host's
/// own addresses, listing each address once: an interface address that a
/// fixed entry already covers (127.0.0.1, a link-local address) or that
/// several interfaces share is not repeated.
fn split_builtin(builtin: &[ipnet::IpNet]) -> (Vec<ipnet::IpNet>, Vec<ipnet::IpNet>) {
    let fixed = portfleet_core::policy::default_deny();
    let mut host: Vec<ipnet::IpNet> = Vec::new();
    for net in builtin {
        if !fixed.iter().any(|f| f.contains(net)) && !host.contains(net) {
            host.push(*net);
        }
    }
    (fixed, host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_list_splits_into_fixed_and_host_without_repeats() {
        let nets = |v: &[&str]| v.iter().map(|s| s.parse::<ipnet::IpNet>().unwrap()).collect::<Vec<_>>();
        let builtin = [
            portfleet_core::policy::default_deny(),
            nets(&["127.0.0.1/32", "192.0.2.10/32", "::1/128", "192.0.2.10/32", "fe80::1/128", "2001:db8::5/128"]),
        ]
        .concat();
        let (fixed, host) = split_builtin(&builtin);
        assert_eq!(fixed, portfleet_core::policy::default_deny());
        assert_eq!(host, nets(&["192.0.2.10/32", "2001:db8::5/128"]));
    }
}
