//! DiffScans: two scans' open ports compared where both finished probing.
//! A port open in one scan and absent from the other is a change only if
//! the other scan's space holds it and a shard of it finished that
//! position; otherwise only one scan covered it.

use std::net::IpAddr;

use futures::TryStreamExt;
use uuid::Uuid;

use crate::{
    inventory::covered,
    plans::ScanPlans,
    store::{Covered, Store, StoreError},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffKind {
    Opened,
    Closed,
    OnlyA,
    OnlyB,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiffEntry {
    pub kind: DiffKind,
    pub ip: IpAddr,
    pub port: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub opened: u64,
    pub closed: u64,
    pub unchanged: u64,
    pub only_a: u64,
    pub only_b: u64,
    pub covered_by_a: u64,
    pub covered_by_b: u64,
    /// The page: entries after the requested key, at most the limit.
    pub entries: Vec<DiffEntry>,
    /// Where the next page starts, when there is one.
    pub next: Option<(IpAddr, u16)>,
}

/// One side's space and finished positions.
struct Side {
    space: std::sync::Arc<crate::plans::ScanPlan>,
    shards: Vec<Covered>,
}

impl Side {
    fn probed(&self, ip: IpAddr, port: u16) -> bool {
        self.space.space.position_of(ip, port).is_some_and(|pos| covered(&self.shards, pos))
    }

    fn finished(&self) -> u64 {
        self.shards.iter().map(|s| (s.checkpoint - s.start_index).max(0) as u64).sum()
    }
}

/// The diff of scans `a` and `b` (both must exist), with the page of
/// entries after `after`.
pub async fn diff(
    store: &Store,
    plans: &ScanPlans,
    a: Uuid,
    b: Uuid,
    after: Option<(IpAddr, u16)>,
    limit: usize,
) -> Result<Diff, StoreError> {
    let side = |id: Uuid| async move {
        let space = plans.get(id).await?.ok_or_else(|| StoreError::Corrupt(format!("scan {id} has no plan")))?;
        Ok::<_, StoreError>(Side { space, shards: store.coverage(id).await? })
    };
    let (sa, sb) = (side(a).await?, side(b).await?);
    let mut d = Diff { covered_by_a: sa.finished(), covered_by_b: sb.finished(), ..Diff::default() };
    let mut a_only_rows = 0u64;
    let mut rows = std::pin::pin!(store.one_sided(a, b));
    while let Some((ip, port, in_a)) = rows.try_next().await? {
        let Ok(port) = u16::try_from(port) else { continue };
        let kind = if in_a {
            a_only_rows += 1;
            if sb.probed(ip, port) { DiffKind::Closed } else { DiffKind::OnlyA }
        } else if sa.probed(ip, port) {
            DiffKind::Opened
        } else {
            DiffKind::OnlyB
        };
        match kind {
            DiffKind::Opened => d.opened += 1,
            DiffKind::Closed => d.closed += 1,
            DiffKind::OnlyA => d.only_a += 1,
            DiffKind::OnlyB => d.only_b += 1,
        }
        if after.is_none_or(|k| (ip, port) > k) {
            if d.entries.len() < limit {
                d.entries.push(DiffEntry { kind, ip, port });
            } else if d.next.is_none() {
                d.next = d.entries.last().map(|e| (e.ip, e.port));
            }
        }
    }
    let total_a = store.open_count(a).await?.max(0) as u64;
    d.unchanged = total_a.saturating_sub(a_only_rows);
    Ok(d)
}
