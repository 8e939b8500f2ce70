//! Probe rates: each scan's rate scaled to the fleet-wide politeness caps
//! (`crate::politeness`), split over its leases, and sent to local agents.
//! Computed from the database alone, so every controller gets the same
//! answer and together they keep the caps.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use portfleet_core::AddressSet;
use portfleet_proto::v1::{self as pb, controller_message::Frame as Out};
use uuid::Uuid;

use super::frame;
use crate::{
    politeness::{self, RateCaps, ScanLoad},
    sessions::Fleet,
    store::{ScanParams, StoreError},
};

/// What capped rates depend on: the caps and each leased scan's id, rate
/// and retries, by id.
type RatesKey = (RateCaps, Vec<(Uuid, u32, u32)>);

/// Entries kept before the least needed are dropped.
const CACHE_SIZE: usize = 1024;

/// Immutable scan parameters and address sets, cached: every Assign of a
/// scan carries them, and every rate pass weighs its addresses. Also the
/// last capped rates, reused while the running scans and caps stay the
/// same.
#[derive(Default)]
pub(super) struct ParamsCache {
    map: HashMap<Uuid, (Arc<ScanParams>, Option<Arc<AddressSet>>)>,
    last: Option<(RatesKey, Vec<u32>)>,
}

impl ParamsCache {
    pub(super) async fn get(&mut self, fleet: &Fleet, id: Uuid) -> Result<Option<Arc<ScanParams>>, StoreError> {
        if let Some((p, _)) = self.map.get(&id) {
            return Ok(Some(p.clone()));
        }
        let Some(p) = fleet.store.scan_params(id).await? else { return Ok(None) };
        if self.map.len() >= CACHE_SIZE {
            self.map.clear();
        }
        Ok(Some(self.insert(p)))
    }

    /// Caches every scan of `ids` (one query for the missing ones), making
    /// room by dropping scans not among them.
    async fn load(&mut self, fleet: &Fleet, ids: &[Uuid]) -> Result<(), StoreError> {
        let missing: Vec<Uuid> = ids.iter().filter(|id| !self.map.contains_key(id)).copied().collect();
        if missing.is_empty() {
            return Ok(());
        }
        if self.map.len() + missing.len() > CACHE_SIZE {
            let keep: HashSet<&Uuid> = ids.iter().collect();
            self.map.retain(|id, _| keep.contains(id));
        }
        for p in fleet.store.scan_params_many(&missing).await? {
            self.insert(p);
        }
        Ok(())
    }

    fn insert(&mut self, p: ScanParams) -> Arc<ScanParams> {
        let addrs = match AddressSet::parse_ranges(&p.address_ranges) {
            Ok(a) => Some(Arc::new(a)),
            Err(e) => {
                tracing::error!(scan_id = %p.id, error = %e, "scan address ranges do not parse");
                None
            }
        };
        let p = Arc::new(p);
        self.map.insert(p.id, (p.clone(), addrs));
        p
    }

    pub(super) fn forget(&mut self, id: Uuid) {
        self.map.remove(&id);
    }
}

/// Each leased scan's rate after the politeness caps, and how many leases
/// share it, fleet-wide.
pub(super) type ScanRates = HashMap<Uuid, (u32, i64)>;

/// Computes [`ScanRates`] from the database.
pub(super) async fn scan_rates(fleet: &Fleet, cache: &mut ParamsCache) -> Result<ScanRates, StoreError> {
    let (leased, caps) = fleet.store.leased_scans().await?;
    if caps.is_off() {
        return Ok(leased.iter().map(|s| (s.id, (s.rate, s.leases))).collect());
    }
    let ids: Vec<Uuid> = leased.iter().map(|s| s.id).collect();
    cache.load(fleet, &ids).await?;
    // Rows come ordered by scan id: the key of the last answer.
    let key: Vec<(Uuid, u32, u32)> = leased
        .iter()
        .map(|s| (s.id, s.rate, cache.map.get(&s.id).map_or(0, |(p, _)| p.retries.max(0) as u32)))
        .collect();
    let key = (caps, key);
    let capped = match &cache.last {
        Some((k, capped)) if *k == key => capped.clone(),
        _ => {
            // A scan whose addresses cannot be weighed runs at 1 probe/s.
            let weighed: Vec<(usize, u32, u32, Arc<AddressSet>)> = key
                .1
                .iter()
                .enumerate()
                .filter_map(|(i, &(id, rate, retries))| Some((i, rate, retries, cache.map.get(&id)?.1.clone()?)))
                .collect();
            let n = key.1.len();
            // Milliseconds for hundreds of scans: off the async threads.
            let capped = tokio::task::spawn_blocking(move || {
                let loads: Vec<ScanLoad<'_>> = weighed
                    .iter()
                    .map(|(_, rate, retries, addrs)| ScanLoad { rate: *rate, retries: *retries, addrs })
                    .collect();
                let mut capped = vec![1u32; n];
                for ((i, ..), r) in weighed.iter().zip(politeness::capped_rates(caps, &loads)) {
                    capped[*i] = r;
                }
                capped
            })
            .await
            .map_err(|e| StoreError::Corrupt(format!("rate computation failed: {e}")))?;
            cache.last = Some((key, capped.clone()));
            capped
        }
    };
    Ok(leased.iter().zip(capped).map(|(s, r)| (s.id, (r, s.leases))).collect())
}

/// A lease's rate: its share of the scan's rate, within the agent's own
/// limit spread over its shards.
pub(super) fn lease_rate(scan_rate: u32, leases_of_scan: i64, agent_max_rate: u32, agent_max_shards: u32) -> u32 {
    let share = (i64::from(scan_rate.max(1)) / leases_of_scan.max(1)).max(1) as u32;
    if agent_max_rate == 0 { share } else { share.min((agent_max_rate / agent_max_shards.max(1)).max(1)) }
}

/// Sends every local lease whose share changed its new rate. Returns false
/// when a slow-down could not be sent (the agent's queue is full): new work
/// must then wait, or it would add to a block before the old work made room.
pub(super) fn apply_rates(fleet: &Fleet, rates: &ScanRates) -> bool {
    let mut slowed_all = true;
    for lease in fleet.registry.leases() {
        let Some(&(scan_rate, leases)) = rates.get(&lease.info.scan_id) else { continue };
        let rate = lease_rate(scan_rate, leases, lease.max_rate, lease.max_shards);
        if rate == lease.info.rate {
            continue;
        }
        let update =
            pb::RateUpdate { shard_id: lease.shard_id as u64, lease_epoch: lease.info.lease_epoch as u64, rate };
        match lease.tx.try_send(Ok(frame(Out::Rate(update)))) {
            Ok(()) => fleet.registry.set_lease_rate(lease.agent_id, lease.shard_id, rate),
            // A closed session sends nothing more.
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                if rate < lease.info.rate {
                    tracing::warn!(agent_id = %lease.agent_id, shard_id = lease.shard_id,
                        "cannot slow a lease down (the agent's queue is full); holding new work back");
                    slowed_all = false;
                }
            }
        }
    }
    slowed_all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_split_and_capped() {
        assert_eq!(lease_rate(1000, 1, 0, 2), 1000);
        assert_eq!(lease_rate(1000, 3, 0, 2), 333);
        assert_eq!(lease_rate(1000, 1, 600, 2), 300);
        assert_eq!(lease_rate(1, 5, 0, 1), 1);
    }
}
