//! NaabuM8's own database (`--naabum8-database-url`): the hostnames its
//! scans are of, and the tables its downstream services read
//! (`cptm8service`, `cptm8endpoint`, `cptm8hostnameinfo`). The statements
//! are NaabuM8's (docs/amqp.md, "NaabuM8's tables"), batched: one per
//! table and page instead of one per row.

use std::collections::HashMap;

use sqlx::{PgPool, Postgres, Transaction, postgres::PgPoolOptions};
use uuid::Uuid;

use super::{DatabaseConfig, StoreError};
use crate::naabum8::{EndpointRow, HostnameSelection, InfoRow, ServiceRow};

/// A handle on NaabuM8's database; cheap to clone.
#[derive(Clone, Debug)]
pub struct NaabuM8Db {
    pool: PgPool,
}

/// One scan's writes, in one transaction: [`NaabuM8Db::begin_export`],
/// pages of [`Export::write`], then [`Export::commit`].
pub struct Export {
    tx: Transaction<'static, Postgres>,
}

impl NaabuM8Db {
    /// A lazy pool, like the controller's own: no connection until used.
    pub fn connect_lazy(config: &DatabaseConfig) -> Self {
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_size)
            .acquire_timeout(config.acquire_timeout)
            .test_before_acquire(true)
            .connect_lazy_with(config.options.clone());
        Self { pool }
    }

    /// The hostnames `selection` names, as NaabuM8 chose them: `All` is
    /// every enabled hostname of an enabled domain, `Domain` the enabled
    /// hostnames of that domain (its own flag is not looked at), `Named`
    /// those of the given ids whose names match (in any state). Returns
    /// the names found; a `Named` pair that is missing is left out, for
    /// the caller to refuse.
    pub async fn hostnames(&self, selection: &HostnameSelection, limit: u32) -> Result<Vec<String>, StoreError> {
        let limit = i64::from(limit);
        let rows: Vec<String> =
            match selection {
                HostnameSelection::All => {
                    sqlx::query_scalar(
                        "SELECT name FROM ONLY cptm8hostname
                     WHERE enabled = true AND domainid IN (SELECT id FROM cptm8domain WHERE enabled = true)
                     ORDER BY name LIMIT $1",
                    )
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
                }
                HostnameSelection::Domain(id) => sqlx::query_scalar(
                    "SELECT name FROM ONLY cptm8hostname WHERE domainid = $1 AND enabled = true ORDER BY name LIMIT $2",
                )
                .bind(id)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?,
                HostnameSelection::Named(pairs) => {
                    let ids: Vec<Uuid> = pairs.iter().map(|(id, _)| *id).collect();
                    let names: Vec<&str> = pairs.iter().map(|(_, name)| name.as_str()).collect();
                    sqlx::query_scalar(
                        "SELECT h.name FROM ONLY cptm8hostname h
                     JOIN UNNEST($1::uuid[], $2::text[]) AS p(id, name) ON h.id = p.id AND h.name = p.name
                     ORDER BY h.name LIMIT $3",
                    )
                    .bind(&ids)
                    .bind(&names)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
                }
            };
        Ok(rows)
    }

    /// The ids of the hostnames called `names` (NaabuM8 found each row
    /// again by name before writing).
    pub async fn hostname_ids(&self, names: &[String]) -> Result<HashMap<String, Uuid>, StoreError> {
        let rows: Vec<(String, Uuid)> = sqlx::query_as("SELECT name, id FROM ONLY cptm8hostname WHERE name = ANY($1)")
            .bind(names)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().collect())
    }

    /// Starts a scan's writes. When `complete` (the scan covered every
    /// probe it planned), what it did not see stops being live first, as
    /// NaabuM8 did after each scan: every service of each hostname in
    /// `with_open_ports`, and every HTTP endpoint of each hostname in
    /// `scanned` (only when the scan found an open port at all). An
    /// incomplete scan only adds what it saw: it cannot say what is gone.
    pub async fn begin_export(
        &self,
        complete: bool,
        scanned: &[Uuid],
        with_open_ports: &[Uuid],
    ) -> Result<Export, StoreError> {
        let mut tx = self.pool.begin().await?;
        if complete && !with_open_ports.is_empty() {
            sqlx::query("UPDATE cptm8service SET live = false WHERE hostnameid = ANY($1)")
                .bind(with_open_ports)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE cptm8endpoint SET live = false WHERE hostnameid = ANY($1) AND endpoint LIKE 'http%'")
                .bind(scanned)
                .execute(&mut *tx)
                .await?;
        }
        Ok(Export { tx })
    }
}

impl Export {
    /// Upserts one page of rows with NaabuM8's conflict rules: a service
    /// keeps its first `tls`, an endpoint its first hostname; software
    /// lists gain what is new. Each slice holds no key twice.
    pub async fn write(
        &mut self,
        services: &[ServiceRow],
        endpoints: &[EndpointRow],
        infos: &[InfoRow],
    ) -> Result<(), StoreError> {
        if !services.is_empty() {
            let ips: Vec<&str> = services.iter().map(|s| s.ipaddress.as_str()).collect();
            let names: Vec<&str> = services.iter().map(|s| s.service.as_str()).collect();
            let ports: Vec<i32> = services.iter().map(|s| s.port).collect();
            let tls: Vec<bool> = services.iter().map(|s| s.tls).collect();
            let hosts: Vec<Uuid> = services.iter().map(|s| s.hostnameid).collect();
            sqlx::query(
                "INSERT INTO cptm8service (ipaddress, protocol, service, port, tls, live, hostnameid)
                 SELECT u.ip, 'tcp', u.service, u.port, u.tls, true, u.host
                 FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::bool[], $5::uuid[])
                    AS u(ip, service, port, tls, host)
                 ON CONFLICT (ipaddress, protocol, port, hostnameid)
                 DO UPDATE SET live = EXCLUDED.live, service = EXCLUDED.service",
            )
            .bind(&ips)
            .bind(&names)
            .bind(&ports)
            .bind(&tls)
            .bind(&hosts)
            .execute(&mut *self.tx)
            .await?;
        }
        if !endpoints.is_empty() {
            let urls: Vec<&str> = endpoints.iter().map(|e| e.endpoint.as_str()).collect();
            let hosts: Vec<Uuid> = endpoints.iter().map(|e| e.hostnameid).collect();
            sqlx::query(
                "INSERT INTO cptm8endpoint (endpoint, live, hostnameid)
                 SELECT u.url, true, u.host FROM UNNEST($1::text[], $2::uuid[]) AS u(url, host)
                 ON CONFLICT (endpoint) DO UPDATE SET live = EXCLUDED.live",
            )
            .bind(&urls)
            .bind(&hosts)
            .execute(&mut *self.tx)
            .await?;
        }
        if !infos.is_empty() {
            let hosts: Vec<Uuid> = infos.iter().map(|i| i.hostnameid).collect();
            let ports: Vec<i32> = infos.iter().map(|i| i.port).collect();
            // One text per row (an array of arrays must be rectangular):
            // the software joined by newlines, which no product name holds.
            let software: Vec<String> = infos.iter().map(|i| i.software.join("\n")).collect();
            sqlx::query(
                "INSERT INTO cptm8hostnameinfo (hostnameid, port, protocol, software)
                 SELECT u.host, u.port, 'tcp', CASE WHEN u.sw = '' THEN NULL ELSE string_to_array(u.sw, E'\\n') END
                 FROM UNNEST($1::uuid[], $2::int4[], $3::text[]) AS u(host, port, sw)
                 ON CONFLICT (hostnameid, port, protocol) DO UPDATE SET software = (
                    SELECT array_agg(s ORDER BY first) FROM (
                        SELECT s, min(n) AS first
                        FROM unnest(coalesce(cptm8hostnameinfo.software, '{}') || coalesce(EXCLUDED.software, '{}'))
                            WITH ORDINALITY AS a(s, n)
                        GROUP BY s
                    ) d
                 )",
            )
            .bind(&hosts)
            .bind(&ports)
            .bind(&software)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }

    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}
