//! The scope policy's rules (migrations/0004).

use ipnet::IpNet;

use super::{ScopeAction, Store, StoreError};
use crate::politeness::RateCaps;

/// Politeness caps to set; `None` leaves one as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapsUpdate {
    pub per_host: Option<u32>,
    pub per_block: Option<u32>,
}

const SET_CAPS: &str = "INSERT INTO rate_caps (id, per_host, per_block) VALUES (true, coalesce($1, 0), coalesce($2, 0))
     ON CONFLICT (id) DO UPDATE SET per_host = coalesce($1, rate_caps.per_host),
         per_block = coalesce($2, rate_caps.per_block), updated_at = now()";

fn cap_arg(v: Option<u32>) -> Option<i32> {
    v.map(|v| v.min(i32::MAX as u32) as i32)
}

/// The operator's allow and deny rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScopeRules {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

#[derive(sqlx::FromRow)]
struct RuleRow {
    #[sqlx(try_from = "String")]
    action: ScopeAction,
    cidr: String,
}

/// A scan that may still be probed, and what it covers.
#[derive(Debug, sqlx::FromRow)]
pub struct ActiveScanRanges {
    pub id: uuid::Uuid,
    pub address_ranges: Vec<String>,
}

const BUMP_VERSION: &str = "UPDATE policy_state SET version = version + 1";

impl Store {
    pub async fn scope_rules(&self) -> Result<ScopeRules, StoreError> {
        Ok(self.versioned_scope_rules().await?.1)
    }

    /// The rules and their version. The version is read first: rules newer
    /// than their version can only make a later store fail and retry,
    /// never pass with stale rules.
    pub async fn versioned_scope_rules(&self) -> Result<(i64, ScopeRules), StoreError> {
        let version: i64 = sqlx::query_scalar("SELECT version FROM policy_state").fetch_one(&self.pool).await?;
        let rows = sqlx::query_as::<_, RuleRow>("SELECT action, cidr::text FROM scope_rules ORDER BY action, cidr")
            .fetch_all(&self.pool)
            .await?;
        let mut rules = ScopeRules::default();
        for RuleRow { action, cidr } in rows {
            let net: IpNet = cidr
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("scope_rules.cidr {cidr:?} is not a CIDR block")))?;
            match action {
                ScopeAction::Allow => rules.allow.push(net),
                ScopeAction::Deny => rules.deny.push(net),
            }
        }
        Ok((version, rules))
    }

    /// Adds rules (existing ones stay); one statement.
    pub async fn add_scope_rules(&self, action: ScopeAction, nets: &[IpNet]) -> Result<(), StoreError> {
        if nets.is_empty() {
            return Ok(());
        }
        let cidrs: Vec<String> = nets.iter().map(ToString::to_string).collect();
        let mut tx = self.pool.begin().await?;
        let added = sqlx::query(
            "INSERT INTO scope_rules (action, cidr) SELECT $1, c::cidr FROM UNNEST($2::text[]) AS c
             ON CONFLICT DO NOTHING",
        )
        .bind(action.as_str())
        .bind(&cidrs)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // Only a real change makes other controllers check scans again.
        if added > 0 {
            sqlx::query(BUMP_VERSION).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The fleet-wide politeness caps.
    pub async fn rate_caps(&self) -> Result<RateCaps, StoreError> {
        let row: Option<(i32, i32)> =
            sqlx::query_as("SELECT per_host, per_block FROM rate_caps").fetch_optional(&self.pool).await?;
        let (h, b) = row.unwrap_or_default();
        Ok(RateCaps { per_host: h.max(0) as u32, per_block: b.max(0) as u32 })
    }

    pub async fn set_rate_caps(&self, caps: CapsUpdate) -> Result<(), StoreError> {
        if caps == CapsUpdate::default() {
            return Ok(());
        }
        sqlx::query(SET_CAPS).bind(cap_arg(caps.per_host)).bind(cap_arg(caps.per_block)).execute(&self.pool).await?;
        Ok(())
    }

    /// Adds and removes rules and sets caps in one transaction: all of it
    /// or none.
    pub async fn update_scope_rules(
        &self,
        add: &ScopeRules,
        remove: &ScopeRules,
        caps: CapsUpdate,
    ) -> Result<(), StoreError> {
        let text = |v: &[IpNet]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        let mut tx = self.pool.begin().await?;
        let mut changed = 0;
        for (action, nets) in [(ScopeAction::Allow, &add.allow), (ScopeAction::Deny, &add.deny)] {
            changed += sqlx::query(
                "INSERT INTO scope_rules (action, cidr) SELECT $1, c::cidr FROM UNNEST($2::text[]) AS c
                 ON CONFLICT DO NOTHING",
            )
            .bind(action.as_str())
            .bind(text(nets))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        for (action, nets) in [(ScopeAction::Allow, &remove.allow), (ScopeAction::Deny, &remove.deny)] {
            changed += sqlx::query("DELETE FROM scope_rules WHERE action = $1 AND cidr = ANY($2::text[]::cidr[])")
                .bind(action.as_str())
                .bind(text(nets))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        // Scans being stored hold the version FOR SHARE: this waits for
        // them (its sweep then sees them), or they see the new version.
        if changed > 0 {
            sqlx::query(BUMP_VERSION).execute(&mut *tx).await?;
        }
        if caps != CapsUpdate::default() {
            sqlx::query(SET_CAPS).bind(cap_arg(caps.per_host)).bind(cap_arg(caps.per_block)).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A page of unfinished scans and their address ranges, by id.
    pub async fn active_scan_ranges(
        &self,
        after: Option<uuid::Uuid>,
        limit: i64,
    ) -> Result<Vec<ActiveScanRanges>, StoreError> {
        let rows = sqlx::query_as::<_, ActiveScanRanges>(
            "SELECT id, address_ranges FROM scans
             WHERE state IN ('pending', 'running') AND id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after.unwrap_or(uuid::Uuid::nil()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}
