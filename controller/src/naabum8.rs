//! NaabuM8's data contract: which hostnames a NaabuM8-triggered scan is
//! of, and the rows its downstream services read when it ends
//! (docs/amqp.md, "NaabuM8's tables").
//!
//! NaabuM8 ran naabu, then `nmap -sV` and httpx, and wrote per hostname:
//! a `cptm8service` row per open (address, port) with nmap's service name,
//! a `cptm8endpoint` row per URL httpx got an answer from, a
//! `cptm8hostnameinfo` row per open port with the products nmap named.
//! portfleet's identification gives all of it: this module turns a page of
//! results into those rows (pure, tested here); `store::naabum8` writes
//! them; the ingress's publisher calls both before it publishes the
//! completion message.

use std::collections::{HashMap, HashSet};

use portfleet_core::Service;
use uuid::Uuid;

use crate::store::{NaabuM8Db, ResultRecord, Store, StoreError};

/// The hostnames a NaabuM8 command asks for, read from NaabuM8's
/// `cptm8hostname` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostnameSelection {
    /// `get.scan`: every enabled hostname of an enabled domain.
    All,
    /// `get.scan/domain/<id>`: the enabled hostnames of one domain.
    Domain(Uuid),
    /// `post.scan`: these (id, name) pairs, each of which must exist.
    Named(Vec<(Uuid, String)>),
}

impl HostnameSelection {
    /// What the request's fingerprint holds for it: the selection, not
    /// the names it expands to, so a redelivery finds its scan however
    /// the table changed meanwhile.
    pub fn fingerprint(&self) -> serde_json::Value {
        match self {
            Self::All => serde_json::json!("all"),
            Self::Domain(id) => serde_json::json!({ "domain": id.to_string() }),
            Self::Named(pairs) => {
                let mut pairs: Vec<String> = pairs.iter().map(|(id, name)| format!("{id}/{name}")).collect();
                pairs.sort_unstable();
                serde_json::json!({ "named": pairs })
            }
        }
    }
}

/// NaabuM8's `cptm8service.service` is `varchar(30)`: a longer name would
/// fail the whole batch.
const SERVICE_COLUMN: usize = 30;
/// `cptm8endpoint.endpoint` is `varchar(255)`.
const ENDPOINT_COLUMN: usize = 255;

/// One `cptm8service` row: an open (address, port) of a hostname.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRow {
    pub ipaddress: String,
    /// nmap's service name, lower case, as its XML has it (`http` with
    /// tunnel `ssl` for HTTPS); empty when nothing was identified.
    pub service: String,
    pub port: i32,
    /// The service spoke TLS.
    pub tls: bool,
    pub hostnameid: Uuid,
}

/// One `cptm8endpoint` row: an HTTP(S) URL that answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRow {
    /// `scheme://name[:port]`, the scheme's default port left out.
    pub endpoint: String,
    pub hostnameid: Uuid,
}

/// One `cptm8hostnameinfo` row: an open port of a hostname and the
/// products found on it (`product version`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRow {
    pub hostnameid: Uuid,
    pub port: i32,
    pub software: Vec<String>,
}

/// The rows of one page of results.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rows {
    pub services: Vec<ServiceRow>,
    pub endpoints: Vec<EndpointRow>,
    pub infos: Vec<InfoRow>,
}

/// The service name NaabuM8 stored: nmap's XML name, lower case. nmap
/// names HTTPS `http` with `tunnel="ssl"`; portfleet says `https`.
fn service_name(s: &Service) -> String {
    let mut name = match (s.name.as_str(), s.tunnel.as_str()) {
        ("https", "ssl") => "http".to_string(),
        ("unknown", _) => String::new(),
        (name, _) => name.to_lowercase(),
    };
    portfleet_core::service::truncate(&mut name, SERVICE_COLUMN);
    name
}

/// The host of `scheme://host[:port]`, or None for an address.
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    if rest.starts_with('[') {
        return None;
    }
    Some(rest.split([':', '/']).next().unwrap_or(rest))
}

/// The rows `results` give, for the hostnames in `ids`. Each result
/// belongs to every name its address was resolved from; a name NaabuM8's
/// table does not have gets no rows. Keys are unique within the page (an
/// endpoint or a hostname's port reached through two addresses is one
/// row).
pub fn rows(results: &[ResultRecord], ids: &HashMap<String, Uuid>) -> Rows {
    let mut out = Rows::default();
    let mut endpoints = HashSet::new();
    let mut infos: HashMap<(Uuid, i32), usize> = HashMap::new();
    for r in results {
        let service = r.service.as_ref().map(|s| &s.0);
        let Some(names) = r.hostname.as_deref() else { continue };
        for name in names.split(',') {
            let Some(&hostnameid) = ids.get(name) else { continue };
            out.services.push(ServiceRow {
                ipaddress: r.ip.to_string(),
                service: service.map(service_name).unwrap_or_default(),
                port: r.port,
                tls: service.is_some_and(|s| s.tls.is_some()),
                hostnameid,
            });
            let info = *infos.entry((hostnameid, r.port)).or_insert_with(|| {
                out.infos.push(InfoRow { hostnameid, port: r.port, software: Vec::new() });
                out.infos.len() - 1
            });
            if let Some(s) = service.filter(|s| !s.product.is_empty()) {
                let software =
                    if s.version.is_empty() { s.product.clone() } else { format!("{} {}", s.product, s.version) };
                if !out.infos[info].software.contains(&software) {
                    out.infos[info].software.push(software);
                }
            }
            for http in service.map(|s| s.http.as_slice()).unwrap_or_default() {
                if url_host(&http.url) != Some(name) || http.url.len() > ENDPOINT_COLUMN {
                    continue;
                }
                if endpoints.insert(http.url.clone()) {
                    out.endpoints.push(EndpointRow { endpoint: http.url.clone(), hostnameid });
                }
            }
        }
    }
    out
}

/// Results read per page while exporting.
const PAGE: u32 = 5_000;

/// What an export wrote, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub services: usize,
    pub endpoints: usize,
    pub hostnames: usize,
}

/// Writes the rows of scan `scan_id` to NaabuM8's tables, in one
/// transaction there: a scan that ended `complete` also makes what it did
/// not see stop being live (see [`NaabuM8Db::begin_export`]). Idempotent:
/// writing a scan again leaves the same rows.
pub async fn export(store: &Store, db: &NaabuM8Db, scan_id: Uuid, complete: bool) -> Result<Written, StoreError> {
    let mut scanned: Vec<String> = store
        .scan_hosts_many(&[scan_id])
        .await?
        .into_iter()
        .flat_map(|h| h.hostname.split(',').map(str::to_string).collect::<Vec<_>>())
        .collect();
    scanned.sort_unstable();
    scanned.dedup();
    let ids = db.hostname_ids(&scanned).await?;
    let open: HashSet<String> = store
        .result_hostnames(scan_id)
        .await?
        .iter()
        .flat_map(|h| h.split(',').map(str::to_string).collect::<Vec<_>>())
        .collect();
    let scanned_ids: Vec<Uuid> = ids.values().copied().collect();
    let open_ids: Vec<Uuid> = ids.iter().filter(|(name, _)| open.contains(*name)).map(|(_, id)| *id).collect();
    let mut tx = db.begin_export(complete, &scanned_ids, &open_ids).await?;
    let mut written = Written { hostnames: open_ids.len(), ..Written::default() };
    let mut after = None;
    loop {
        let page = store
            .list_results(scan_id, &crate::store::ResultFilter::default(), crate::store::Page { after, limit: PAGE })
            .await?;
        let rows = rows(&page.items, &ids);
        tx.write(&rows.services, &rows.endpoints, &rows.infos).await?;
        written.services += rows.services.len();
        written.endpoints += rows.endpoints.len();
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    tx.commit().await?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use portfleet_core::service::{Http, Tls};
    use sqlx::types::Json;

    use super::*;
    use crate::store::PortState;

    fn result(ip: &str, port: i32, names: Option<&str>, service: Option<Service>) -> ResultRecord {
        ResultRecord {
            ip: ip.parse().unwrap(),
            port,
            protocol: "tcp".into(),
            state: PortState::Open,
            hostname: names.map(str::to_string),
            first_seen_at: chrono::Utc::now(),
            last_seen_at: chrono::Utc::now(),
            service: service.map(Json),
            host_answers_everything: false,
        }
    }

    fn http(url: &str) -> Http {
        Http { url: url.into(), status: 200, ..Http::default() }
    }

    #[test]
    fn results_become_naabum8_s_rows() {
        let (app, www) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let ids = HashMap::from([("app.test".to_string(), app), ("www.test".to_string(), www)]);
        let https = Service {
            name: "https".into(),
            tunnel: "ssl".into(),
            product: "nginx".into(),
            version: "1.22.1".into(),
            tls: Some(Tls::default()),
            http: vec![http("https://app.test"), http("https://www.test"), http("https://other.test")],
            ..Service::default()
        };
        let ssh =
            Service { name: "ssh".into(), product: "OpenSSH".into(), version: "9.2p1".into(), ..Service::default() };
        let results = [
            // One address, two names: a row for each.
            result("192.0.2.1", 443, Some("app.test,www.test"), Some(https.clone())),
            // The same name's port on a second address: one endpoint, one
            // info row, two service rows.
            result("192.0.2.2", 443, Some("app.test"), Some(https)),
            result("192.0.2.1", 22, Some("app.test,www.test"), Some(ssh)),
            result("192.0.2.1", 9999, Some("app.test"), Some(Service { name: "unknown".into(), ..Service::default() })),
            // Not identified; and an address no name of the table has.
            result("192.0.2.1", 8080, Some("app.test"), None),
            result("192.0.2.9", 80, Some("elsewhere.test"), None),
            result("192.0.2.10", 80, None, None),
        ];
        let rows = rows(&results, &ids);
        let services: Vec<(&str, i32, &str, bool, Uuid)> = rows
            .services
            .iter()
            .map(|s| (s.ipaddress.as_str(), s.port, s.service.as_str(), s.tls, s.hostnameid))
            .collect();
        assert_eq!(
            services,
            [
                ("192.0.2.1", 443, "http", true, app),
                ("192.0.2.1", 443, "http", true, www),
                ("192.0.2.2", 443, "http", true, app),
                ("192.0.2.1", 22, "ssh", false, app),
                ("192.0.2.1", 22, "ssh", false, www),
                ("192.0.2.1", 9999, "", false, app),
                ("192.0.2.1", 8080, "", false, app),
            ]
        );
        let endpoints: Vec<(&str, Uuid)> = rows.endpoints.iter().map(|e| (e.endpoint.as_str(), e.hostnameid)).collect();
        assert_eq!(endpoints, [("https://app.test", app), ("https://www.test", www)]);
        let infos: Vec<(Uuid, i32, Vec<&str>)> = rows
            .infos
            .iter()
            .map(|i| (i.hostnameid, i.port, i.software.iter().map(String::as_str).collect()))
            .collect();
        assert_eq!(
            infos,
            [
                (app, 443, vec!["nginx 1.22.1"]),
                (www, 443, vec!["nginx 1.22.1"]),
                (app, 22, vec!["OpenSSH 9.2p1"]),
                (www, 22, vec!["OpenSSH 9.2p1"]),
                (app, 9999, vec![]),
                (app, 8080, vec![]),
            ]
        );
    }

    #[test]
    fn long_names_fit_naabum8_s_columns() {
        let s = Service { name: "X".repeat(100), ..Service::default() };
        assert_eq!(service_name(&s), "x".repeat(30));
        assert_eq!(url_host("http://[2001:db8::1]:8080"), None);
        assert_eq!(url_host("https://app.test:8443"), Some("app.test"));
        assert_eq!(url_host("http://app.test"), Some("app.test"));
    }

    #[test]
    fn a_selection_is_fingerprinted_not_its_names() {
        let a = HostnameSelection::Named(vec![(Uuid::from_u128(2), "b".into()), (Uuid::from_u128(1), "a".into())]);
        let b = HostnameSelection::Named(vec![(Uuid::from_u128(1), "a".into()), (Uuid::from_u128(2), "b".into())]);
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(HostnameSelection::All.fingerprint(), HostnameSelection::Domain(Uuid::nil()).fingerprint());
    }
}
