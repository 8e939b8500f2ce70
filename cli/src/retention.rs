//! What the controller keeps: `delete` removes finished scans now,
//! `retention` shows or sets how long finished scans are kept (an admin
//! token). Deleting a scan keeps what the inventory learnt from it.

use std::{io::Write, time::Duration};

use clap::Subcommand;
use portfleet_proto::{auth::ApiClient, v1 as pb};

use crate::{args, show, status};

#[derive(Subcommand, Debug)]
pub enum RetentionCommand {
    /// Keep finished scans this long after they ended.
    Set {
        /// A duration (90d, 2w, 720h); 0 or forever keeps them for ever.
        #[arg(value_parser = args::retention, value_name = "DURATION")]
        keep: Duration,
    },
}

/// `delete`: deletes each scan in turn; stops at the first refusal, naming
/// it (those before it are deleted, and said so).
pub async fn delete_scans(c: &mut ApiClient, ids: Vec<String>) -> Result<i32, String> {
    let mut out = std::io::stdout().lock();
    for id in ids {
        c.delete_scan(pb::DeleteScanRequest { id: id.clone() })
            .await
            .map_err(|e| format!("scan {}: {}", portfleet_core::text::echo(&id), status(e)))?;
        let _ = writeln!(out, "deleted {id}");
    }
    Ok(0)
}

/// `retention`: shows the period, or sets it and shows the result.
pub async fn retention(c: &mut ApiClient, command: Option<RetentionCommand>) -> Result<i32, String> {
    let r = match command {
        None => c.get_retention(pb::GetRetentionRequest {}).await,
        Some(RetentionCommand::Set { keep }) => {
            let retain_scans =
                prost_types::Duration::try_from(keep).map_err(|e| format!("retention set {keep:?}: {e}"))?;
            c.update_retention(pb::UpdateRetentionRequest { retain_scans: Some(retain_scans) }).await
        }
    }
    .map_err(status)?
    .into_inner();
    let _ = show::fields(&mut std::io::stdout().lock(), &[("retain scans", period(r.retain_scans.as_ref()))]);
    Ok(0)
}

/// "90 days", "36h", or "for ever" for none (unset, zero or negative).
fn period(d: Option<&prost_types::Duration>) -> String {
    let keep = d.and_then(|d| Duration::try_from(*d).ok()).unwrap_or_default();
    if keep.is_zero() {
        return "for ever (finished scans are never deleted)".into();
    }
    const DAY: u64 = 86_400;
    match keep.as_secs() {
        s if s % DAY == 0 => show::count(s / DAY, "day"),
        // humantime counts months of 30.44 days: whole days read better.
        _ => show::duration(keep),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Command};

    #[test]
    fn retention_shows_days_or_for_ever() {
        let d = |seconds: i64| prost_types::Duration { seconds, nanos: 0 };
        assert_eq!(period(Some(&d(90 * 86_400))), "90 days");
        assert_eq!(period(Some(&d(86_400))), "1 day");
        assert_eq!(period(Some(&d(36 * 3600))), "1day 12h");
        assert!(period(None).starts_with("for ever"));
        assert!(period(Some(&d(0))).starts_with("for ever"));
        assert!(period(Some(&d(-5))).starts_with("for ever"));
    }

    #[test]
    fn retention_set_takes_a_duration_or_forever() {
        let keep = |v: &str| match Cli::try_parse_from(["portfleet", "retention", "set", v]).map(|c| c.command) {
            Ok(Command::Retention { command: Some(RetentionCommand::Set { keep }) }) => Ok(keep),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(keep("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(keep("forever"), Ok(Duration::ZERO));
        assert_eq!(keep("0"), Ok(Duration::ZERO));
        assert!(keep("later").unwrap_err().contains("DURATION"));
        let Command::Retention { command: None } = Cli::try_parse_from(["portfleet", "retention"]).unwrap().command
        else {
            panic!("retention shows")
        };
    }
}
