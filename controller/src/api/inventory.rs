//! The network-memory RPCs (ListHosts, GetHost, ListChanges, DiffScans),
//! DeleteScan, webhooks and retention: request checks and conversions; the
//! work is in `crate::inventory`, `crate::diff` and the store.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use portfleet_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{ScanApi, convert, page, store_status};
use crate::{
    auth::Scope,
    diff,
    store::{
        ChangeFilter, ChangeKind, ChangeRecord, Deleted, DeliveryRecord, DeliveryState, HostFilter, HostRecord, Page,
        PortRow, WebhookRecord,
    },
};

/// Changes GetHost returns with the host.
const HOST_CHANGES: u32 = 100;
/// Event names a webhook may ask for.
pub const WEBHOOK_EVENTS: [&str; 6] =
    ["scan.created", "scan.completed", "scan.failed", "scan.cancelled", "scan.changes", "schedule.fired"];

/// An address or CIDR block; empty: none.
pub fn cidr(field: &str, value: &str) -> Result<Option<IpNet>, Status> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(None);
    }
    let net = match v.parse::<IpNet>() {
        Ok(n) => n.trunc(),
        Err(_) => v.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
            Status::invalid_argument(format!("{field}: {v:?} is not an address or CIDR block (e.g. 10.0.0.0/24)"))
        })?,
    };
    Ok(Some(portfleet_core::addrs::canonical_net(net)))
}

pub fn port(field: &str, value: Option<u32>) -> Result<Option<i32>, Status> {
    match value {
        None => Ok(None),
        Some(p @ 1..=65535) => Ok(Some(p as i32)),
        Some(p) => Err(Status::invalid_argument(format!("{field}: {p} is not a port (1-65535)"))),
    }
}

pub fn time(field: &str, t: Option<prost_types::Timestamp>) -> Result<Option<DateTime<Utc>>, Status> {
    t.map(|t| {
        DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
            .ok_or_else(|| Status::invalid_argument(format!("{field}: not a valid time")))
    })
    .transpose()
}

fn text(field: &str, value: &str) -> Result<Option<String>, Status> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(None);
    }
    portfleet_core::text::check(v, 253).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))?;
    Ok(Some(v.to_lowercase()))
}

fn ts(t: DateTime<Utc>) -> Option<prost_types::Timestamp> {
    Some(convert::timestamp(t))
}

fn change_kind_to_pb(k: ChangeKind) -> pb::ChangeKind {
    match k {
        ChangeKind::Opened => pb::ChangeKind::Opened,
        ChangeKind::Closed => pb::ChangeKind::Closed,
        ChangeKind::ServiceChanged => pb::ChangeKind::ServiceChanged,
    }
}

fn change_kind_from_pb(v: i32) -> Result<Option<ChangeKind>, Status> {
    Ok(match pb::ChangeKind::try_from(v) {
        Ok(pb::ChangeKind::Unspecified) => None,
        Ok(pb::ChangeKind::Opened) => Some(ChangeKind::Opened),
        Ok(pb::ChangeKind::Closed) => Some(ChangeKind::Closed),
        Ok(pb::ChangeKind::ServiceChanged) => Some(ChangeKind::ServiceChanged),
        Err(_) => return Err(Status::invalid_argument(format!("kind: unknown value {v}"))),
    })
}

impl From<ChangeRecord> for pb::Change {
    fn from(c: ChangeRecord) -> Self {
        pb::Change {
            id: c.id.to_string(),
            kind: change_kind_to_pb(c.kind) as i32,
            ip: c.ip.to_string(),
            port: c.port as u32,
            protocol: pb::Protocol::Tcp as i32,
            time: ts(c.at),
            scan_id: c.scan_id.to_string(),
            previous_scan_id: c.previous_scan_id.map(|id| id.to_string()).unwrap_or_default(),
            service_before: c.service_before.as_ref().map(|s| pb::Service::from(&s.0)),
            service_after: c.service_after.as_ref().map(|s| pb::Service::from(&s.0)),
            hostname: c.hostname.unwrap_or_default(),
        }
    }
}

fn host_to_pb(h: HostRecord) -> pb::Host {
    pb::Host {
        ip: h.ip.to_string(),
        hostnames: h.hostnames,
        target_groups: h.target_groups,
        open_port_count: h.open_ports.max(0) as u32,
        first_seen_time: ts(h.first_seen_at),
        last_seen_time: ts(h.last_seen_at),
        ports: Vec::new(),
        changes: Vec::new(),
    }
}

fn port_to_pb(p: PortRow) -> pb::HostPort {
    pb::HostPort {
        port: p.port as u32,
        protocol: pb::Protocol::Tcp as i32,
        state: convert::port_state_to_pb(p.state) as i32,
        first_open_time: ts(p.first_open_at),
        last_open_time: ts(p.last_open_at),
        last_probe_time: ts(p.last_probed_at),
        last_scan_id: p.last_scan_id.to_string(),
        change_time: ts(p.changed_at),
        service: p.service.as_ref().map(|s| pb::Service::from(&s.0)),
    }
}

fn webhook_to_pb(w: WebhookRecord, with_secret: bool) -> pb::Webhook {
    pb::Webhook {
        id: w.id.to_string(),
        url: w.url,
        events: w.events,
        create_time: ts(w.created_at),
        secret: if with_secret { w.secret } else { String::new() },
    }
}

fn delivery_to_pb(d: DeliveryRecord) -> pb::WebhookDelivery {
    let state = match d.state {
        DeliveryState::Pending => pb::DeliveryState::Pending,
        DeliveryState::Delivered => pb::DeliveryState::Delivered,
        DeliveryState::Failed => pb::DeliveryState::Failed,
    };
    pb::WebhookDelivery {
        id: d.id.to_string(),
        webhook_id: d.webhook_id.to_string(),
        event: d.event,
        scan_id: d.scan_id.to_string(),
        state: state as i32,
        attempts: d.attempts.max(0) as u32,
        last_status: d.last_status.max(0) as u32,
        last_error: d.last_error.unwrap_or_default(),
        create_time: ts(d.created_at),
        last_attempt_time: d.last_attempt_at.and_then(ts),
        next_attempt_time: if d.state == DeliveryState::Pending { ts(d.next_attempt_at) } else { None },
    }
}

fn diff_kind_to_pb(k: diff::DiffKind) -> pb::DiffKind {
    match k {
        diff::DiffKind::Opened => pb::DiffKind::Opened,
        diff::DiffKind::Closed => pb::DiffKind::Closed,
        diff::DiffKind::OnlyA => pb::DiffKind::OnlyA,
        diff::DiffKind::OnlyB => pb::DiffKind::OnlyB,
    }
}

impl ScanApi {
    pub(super) async fn do_delete_scan(
        &self,
        request: Request<pb::DeleteScanRequest>,
    ) -> Result<Response<pb::DeleteScanResponse>, Status> {
        self.auth.authorize(request.metadata(), Scope::Scan, "DeleteScan").await?;
        let id = convert::parse_id("id", &request.get_ref().id)?;
        match self.store.delete_scan(id).await.map_err(store_status)? {
            Deleted::Deleted => {
                tracing::info!(scan_id = %id, "scan deleted");
                Ok(Response::new(pb::DeleteScanResponse {}))
            }
            Deleted::NotFound => Err(Status::not_found(format!("scan {id} not found"))),
            Deleted::Active(state) => Err(Status::failed_precondition(format!(
                "scan {id} is {}: cancel it before deleting it",
                state.as_str()
            ))),
        }
    }

    pub(super) async fn do_list_hosts(
        &self,
        request: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        self.auth.authorize(request.metadata(), Scope::Read, "ListHosts").await?;
        let r = request.into_inner();
        let filter = HostFilter {
            cidr: cidr("cidr", &r.cidr)?,
            hostname: text("hostname", &r.hostname)?,
            target_group: r.target_group.map(|g| g.trim().to_string()),
            open_port: port("open_port", r.open_port)?,
            seen_since: time("seen_since", r.seen_since)?,
        };
        let page = Page { after: page::decode("hosts", &r.page_token)?, limit: page::size(r.page_size, 100, 1000) };
        let paged = self.store.list_hosts(&filter, page).await.map_err(store_status)?;
        Ok(Response::new(pb::ListHostsResponse {
            hosts: paged.items.into_iter().map(host_to_pb).collect(),
            next_page_token: page::encode("hosts", paged.next),
        }))
    }

    pub(super) async fn do_get_host(&self, request: Request<pb::GetHostRequest>) -> Result<Response<pb::Host>, Status> {
        self.auth.authorize(request.metadata(), Scope::Read, "GetHost").await?;
        let raw = request.get_ref().ip.trim();
        let ip: IpAddr =
            raw.parse().map_err(|_| Status::invalid_argument(format!("ip: {raw:?} is not an IP address")))?;
        let ip = portfleet_core::addrs::canonical_ip(ip);
        let (host, ports) = self
            .store
            .get_host(ip)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("no scan has found {ip} with an open port")))?;
        let filter = ChangeFilter { cidr: Some(IpNet::from(ip)), ..ChangeFilter::default() };
        let changes =
            self.store.list_changes(&filter, Page { after: None, limit: HOST_CHANGES }).await.map_err(store_status)?;
        let mut out = host_to_pb(host);
        out.ports = ports.into_iter().map(port_to_pb).collect();
        out.changes = changes.items.into_iter().map(Into::into).collect();
        Ok(Response::new(out))
    }

    pub(super) async fn do_list_changes(
        &self,
        request: Request<pb::ListChangesRequest>,
    ) -> Result<Response<pb::ListChangesResponse>, Status> {
        self.auth.authorize(request.metadata(), Scope::Read, "ListChanges").await?;
        let r = request.into_inner();
        let id = |field: &str, v: &str| -> Result<Option<uuid::Uuid>, Status> {
            if v.trim().is_empty() { Ok(None) } else { convert::parse_id(field, v).map(Some) }
        };
        let filter = ChangeFilter {
            since: time("since", r.since)?,
            after_scan: id("after_scan_id", &r.after_scan_id)?,
            scan: id("scan_id", &r.scan_id)?,
            cidr: cidr("cidr", &r.cidr)?,
            port: port("port", r.port)?,
            target_group: r.target_group.map(|g| g.trim().to_string()),
            kind: change_kind_from_pb(r.kind)?,
        };
        for scan in [filter.after_scan, filter.scan].into_iter().flatten() {
            // NOT_FOUND for an unknown scan rather than an empty list.
            self.scans.get(scan).await.map_err(super::to_status)?;
        }
        let page = Page { after: page::decode("changes", &r.page_token)?, limit: page::size(r.page_size, 100, 1000) };
        let paged = self.store.list_changes(&filter, page).await.map_err(store_status)?;
        Ok(Response::new(pb::ListChangesResponse {
            changes: paged.items.into_iter().map(Into::into).collect(),
            next_page_token: page::encode("changes", paged.next),
        }))
    }

    pub(super) async fn do_diff_scans(
        &self,
        request: Request<pb::DiffScansRequest>,
    ) -> Result<Response<pb::DiffScansResponse>, Status> {
        self.auth.authorize(request.metadata(), Scope::Read, "DiffScans").await?;
        let r = request.into_inner();
        let a = convert::parse_id("a", &r.a)?;
        let b = convert::parse_id("b", &r.b)?;
        if a == b {
            return Err(Status::invalid_argument("b: the same scan as a; give two different scans"));
        }
        self.scans.get(a).await.map_err(super::to_status)?;
        self.scans.get(b).await.map_err(super::to_status)?;
        // A token belongs to one pair of scans.
        let list = format!("diff:{a}:{b}");
        let after: Option<(IpAddr, u16)> = page::decode(&list, &r.page_token)?;
        let limit = page::size(r.page_size, 1000, 10_000) as usize;
        let d = diff::diff(&self.store, &self.plans, a, b, after, limit).await.map_err(store_status)?;
        Ok(Response::new(pb::DiffScansResponse {
            opened: d.opened,
            closed: d.closed,
            unchanged: d.unchanged,
            only_a: d.only_a,
            only_b: d.only_b,
            covered_by_a: d.covered_by_a,
            covered_by_b: d.covered_by_b,
            entries: d
                .entries
                .iter()
                .map(|e| pb::DiffEntry {
                    kind: diff_kind_to_pb(e.kind) as i32,
                    ip: e.ip.to_string(),
                    port: u32::from(e.port),
                    protocol: pb::Protocol::Tcp as i32,
                })
                .collect(),
            next_page_token: page::encode(&list, d.next),
        }))
    }

    pub(super) async fn do_create_webhook(
        &self,
        request: Request<pb::CreateWebhookRequest>,
    ) -> Result<Response<pb::Webhook>, Status> {
        self.auth.authorize(request.metadata(), Scope::Admin, "CreateWebhook").await?;
        let r = request.into_inner();
        let url = r.url.trim();
        if url.len() > 2048 {
            return Err(Status::invalid_argument("url: longer than 2048 characters"));
        }
        crate::webhooks::check_url(url).map_err(|e| Status::invalid_argument(format!("url: {url:?} {e}")))?;
        let mut events: Vec<String> = r.events.iter().map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
        if let Some(bad) = events.iter().find(|e| !WEBHOOK_EVENTS.contains(&e.as_str())) {
            return Err(Status::invalid_argument(format!(
                "events: unknown event {bad:?}; known: {}",
                WEBHOOK_EVENTS.join(", ")
            )));
        }
        events.sort();
        events.dedup();
        let secret: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
        let hook = self.store.create_webhook(url, &events, &secret).await.map_err(store_status)?;
        tracing::info!(webhook = %hook.id, url = %hook.url, "webhook added");
        Ok(Response::new(webhook_to_pb(hook, true)))
    }

    pub(super) async fn do_list_webhooks(
        &self,
        request: Request<pb::ListWebhooksRequest>,
    ) -> Result<Response<pb::ListWebhooksResponse>, Status> {
        self.auth.authorize(request.metadata(), Scope::Admin, "ListWebhooks").await?;
        let r = request.into_inner();
        let page = Page { after: page::decode("webhooks", &r.page_token)?, limit: page::size(r.page_size, 100, 1000) };
        let paged = self.store.list_webhooks(page).await.map_err(store_status)?;
        Ok(Response::new(pb::ListWebhooksResponse {
            webhooks: paged.items.into_iter().map(|w| webhook_to_pb(w, false)).collect(),
            next_page_token: page::encode("webhooks", paged.next),
        }))
    }

    pub(super) async fn do_delete_webhook(
        &self,
        request: Request<pb::DeleteWebhookRequest>,
    ) -> Result<Response<pb::DeleteWebhookResponse>, Status> {
        self.auth.authorize(request.metadata(), Scope::Admin, "DeleteWebhook").await?;
        let id = convert::parse_id("id", &request.get_ref().id)?;
        if !self.store.delete_webhook(id).await.map_err(store_status)? {
            return Err(Status::not_found(format!("webhook {id} not found")));
        }
        Ok(Response::new(pb::DeleteWebhookResponse {}))
    }

    pub(super) async fn do_list_webhook_deliveries(
        &self,
        request: Request<pb::ListWebhookDeliveriesRequest>,
    ) -> Result<Response<pb::ListWebhookDeliveriesResponse>, Status> {
        self.auth.authorize(request.metadata(), Scope::Admin, "ListWebhookDeliveries").await?;
        let r = request.into_inner();
        let id = convert::parse_id("webhook_id", &r.webhook_id)?;
        if !self.store.webhook_exists(id).await.map_err(store_status)? {
            return Err(Status::not_found(format!("webhook {id} not found")));
        }
        let page =
            Page { after: page::decode("deliveries", &r.page_token)?, limit: page::size(r.page_size, 100, 1000) };
        let paged = self.store.list_deliveries(id, page).await.map_err(store_status)?;
        Ok(Response::new(pb::ListWebhookDeliveriesResponse {
            deliveries: paged.items.into_iter().map(delivery_to_pb).collect(),
            next_page_token: page::encode("deliveries", paged.next),
        }))
    }

    pub(super) async fn do_get_retention(
        &self,
        request: Request<pb::GetRetentionRequest>,
    ) -> Result<Response<pb::Retention>, Status> {
        self.auth.authorize(request.metadata(), Scope::Admin, "GetRetention").await?;
        self.retention().await
    }

    pub(super) async fn do_update_retention(
        &self,
        request: Request<pb::UpdateRetentionRequest>,
    ) -> Result<Response<pb::Retention>, Status> {
        self.auth.authorize(request.metadata(), Scope::Admin, "UpdateRetention").await?;
        let keep = match request.into_inner().retain_scans {
            None => None,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(Status::invalid_argument("retain_scans: must not be negative"));
            }
            Some(d) if d.seconds == 0 && d.nanos == 0 => None,
            Some(d) if d.seconds < 1 => {
                return Err(Status::invalid_argument("retain_scans: keep scans at least 1 s (or 0 for ever)"));
            }
            // Postgres cannot subtract much more from now().
            Some(d) if d.seconds > crate::config::MAX_RETENTION.as_secs() as i64 => {
                return Err(Status::invalid_argument("retain_scans: at most 100 years (or 0 for ever)"));
            }
            Some(d) => Some(std::time::Duration::new(d.seconds as u64, d.nanos as u32)),
        };
        self.store.set_retention(keep).await.map_err(store_status)?;
        tracing::info!(retain_scans = ?keep, "retention updated");
        self.retention().await
    }

    async fn retention(&self) -> Result<Response<pb::Retention>, Status> {
        let keep = self.store.retention().await.map_err(store_status)?;
        Ok(Response::new(pb::Retention {
            retain_scans: keep.map(|d| prost_types::Duration { seconds: d.as_secs() as i64, nanos: 0 }),
        }))
    }
}
