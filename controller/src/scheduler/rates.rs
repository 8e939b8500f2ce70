//! Probe rates: each scan's rate scaled to the fleet-wide politeness caps
//! (`crate::politeness`), split over its leases, and sent to local agents.
//! Computed from the database alone, so every controller gets the same
//! answer and together they keep the caps.

use std::collections::HashMap;

use uuid::Uuid;

use crate::{
    politeness::{self, RateCaps, ScanLoad},
    sessions::{Fleet, wire::ToAgent},
    store::StoreError,
};

/// What capped rates depend on: the caps and each leased scan's id, rate
/// and retries, by id.
type RatesKey = (RateCaps, Vec<(Uuid, u32, u32)>);

/// The last capped rates, reused while the running scans and caps stay
/// the same (a rate pass runs every second and on every lease change).
#[derive(Default)]
pub(super) struct RatesMemo {
    last: Option<(RatesKey, Vec<u32>)>,
}

/// Each leased scan's rate after the politeness caps, and how many leases
/// share it, fleet-wide.
pub(super) type ScanRates = HashMap<Uuid, (u32, i64)>;

/// Computes [`ScanRates`] from the database.
pub(super) async fn scan_rates(fleet: &Fleet, memo: &mut RatesMemo) -> Result<ScanRates, StoreError> {
    let (leased, caps) = fleet.store.leased_scans().await?;
    if caps.is_off() {
        metrics::gauge!("portfleet_scans_slowed_by_caps").set(0.0);
        return Ok(leased.iter().map(|s| (s.id, (s.rate, s.leases))).collect());
    }
    let ids: Vec<Uuid> = leased.iter().map(|s| s.id).collect();
    let plans = fleet.plans.get_many(&ids).await?;
    // Rows come ordered by scan id: the key of the last answer.
    let key: Vec<(Uuid, u32, u32)> =
        leased.iter().map(|s| (s.id, s.rate, plans.get(&s.id).map_or(0, |p| p.retries))).collect();
    let key = (caps, key);
    let capped = match &memo.last {
        Some((k, capped)) if *k == key => capped.clone(),
        _ => {
            // A scan whose plan cannot be read runs at 1 probe/s.
            let weighed: Vec<(usize, u32, u32, _)> = key
                .1
                .iter()
                .enumerate()
                .filter_map(|(i, &(id, rate, retries))| Some((i, rate, retries, plans.get(&id)?.clone())))
                .collect();
            let n = key.1.len();
            // Milliseconds for hundreds of scans: off the async threads.
            let capped = tokio::task::spawn_blocking(move || {
                let loads: Vec<ScanLoad<'_>> = weighed
                    .iter()
                    .map(|(_, rate, retries, plan)| ScanLoad {
                        rate: *rate,
                        retries: *retries,
                        addrs: plan.addresses(),
                    })
                    .collect();
                let mut capped = vec![1u32; n];
                for ((i, ..), r) in weighed.iter().zip(politeness::capped_rates(caps, &loads)) {
                    capped[*i] = r;
                }
                capped
            })
            .await
            .map_err(|e| StoreError::Corrupt(format!("rate computation failed: {e}")))?;
            let slowed = key.1.iter().zip(&capped).filter(|((_, asked, _), got)| *got < asked).count();
            metrics::gauge!("portfleet_scans_slowed_by_caps").set(slowed as f64);
            memo.last = Some((key, capped.clone()));
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
        let update = ToAgent::Rate { shard_id: lease.shard_id, lease_epoch: lease.info.lease_epoch, rate };
        match lease.tx.try_send(update) {
            Ok(()) => fleet.registry.set_lease_rate(lease.agent_id, lease.shard_id, rate),
            // A closed session sends nothing more.
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                if rate < lease.info.rate {
                    tracing::warn!(agent_id = %lease.agent_id, shard_id = %lease.shard_id,
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
