//! Schedules on real controllers and Postgres: each due time fires exactly
//! once with two controllers on one database, across a controller restart
//! and after both were down (one run for the missed slots, not one per
//! slot); the overlap policies; pause and resume; `schedule.fired`
//! events; bad input named by field. No agent is connected, so runs stay
//! pending: a pending run is "still going" to the overlap policy. Nothing
//! is probed.

use std::{collections::BTreeMap, time::Duration};

use portfleet_proto::v1 as pb;
use portfleet_tests::{TestController, TestDb, eventually};
use tonic::Code;

/// Intervals this short only with the minimum lowered (the default is a
/// minute).
fn config(db: &TestDb) -> portfleet_controller::ControllerConfig {
    let mut c = portfleet_tests::controller_config(db.options());
    c.limits.min_schedule_interval = Duration::from_secs(1);
    c
}

fn every(secs: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds: secs, nanos: 0 })
}

fn template() -> pb::CreateScanRequest {
    pb::CreateScanRequest { targets: vec!["198.51.100.7".into()], ports: "80".into(), ..Default::default() }
}

async fn create(c: &TestController, s: pb::Schedule) -> Result<pb::Schedule, tonic::Status> {
    c.client().await.create_schedule(pb::CreateScheduleRequest { schedule: Some(s) }).await.map(|r| r.into_inner())
}

async fn get(c: &TestController, id: &str) -> pb::Schedule {
    c.client().await.get_schedule(pb::GetScheduleRequest { id: id.into() }).await.unwrap().into_inner()
}

/// Every scan a schedule fired, by its run's due time (unix seconds, from
/// the idempotency key), with its state.
async fn runs_by_scan(db: &TestDb, schedule: &str) -> BTreeMap<i64, Vec<(String, String)>> {
    let mut conn = db.connect().await;
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT request_id, id::text, state FROM scans WHERE labels ->> 'portfleet.schedule' = $1 ORDER BY id",
    )
    .bind(schedule)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let mut by_due: BTreeMap<i64, Vec<(String, String)>> = BTreeMap::new();
    for (key, id, state) in rows {
        let due: i64 = key.rsplit(':').next().unwrap().parse().unwrap();
        by_due.entry(due).or_default().push((id, state));
    }
    by_due
}

async fn started_runs(db: &TestDb, schedule: &str) -> usize {
    runs_by_scan(db, schedule).await.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_fire_each_due_time_once_across_restarts_and_downtime() {
    let db = TestDb::create().await;
    let a = TestController::start(config(&db)).await;
    let b = TestController::start(config(&db)).await;
    // cancel: each run ends the previous one, so every due time starts a
    // scan (with skip, pending runs would skip the rest).
    let s = create(
        &a,
        pb::Schedule {
            name: "every two seconds".into(),
            interval: every(2),
            overlap: pb::OverlapPolicy::Cancel as i32,
            template: Some(template()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(s.next_run_time.is_some());
    eventually("three runs", Duration::from_secs(20), || async { (started_runs(&db, &s.id).await >= 3).then_some(()) })
        .await;
    // One controller restarts; the other goes on firing meanwhile.
    a.stop().await.unwrap();
    let before = started_runs(&db, &s.id).await;
    eventually("runs while one controller is down", Duration::from_secs(20), || async {
        (started_runs(&db, &s.id).await >= before + 2).then_some(())
    })
    .await;
    let a = TestController::start(config(&db)).await;
    let before = started_runs(&db, &s.id).await;
    eventually("runs after the restart", Duration::from_secs(20), || async {
        (started_runs(&db, &s.id).await >= before + 3).then_some(())
    })
    .await;
    // Both down across several due times: one run for all of them.
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    let down = runs_by_scan(&db, &s.id).await;
    let last_before = *down.keys().last().unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let a = TestController::start(config(&db)).await;
    eventually("the missed run", Duration::from_secs(20), || async {
        (started_runs(&db, &s.id).await > down.len()).then_some(())
    })
    .await;
    let after = runs_by_scan(&db, &s.id).await;
    let first_after = *after.keys().find(|due| **due > last_before).unwrap();
    let second_after = after.keys().find(|due| **due > first_after).copied();
    // The first run after the downtime is for the oldest missed due time;
    // the next is a future slot, not the other missed ones.
    assert_eq!(first_after, last_before + 2, "the missed run is the next due time after the last run");
    if let Some(next) = second_after {
        assert!(next >= last_before + 8, "missed slots were fired one by one: {:?}", after.keys().collect::<Vec<_>>());
    }
    a.stop().await.unwrap();
    // Exactly once: one scan per due time, due times two seconds apart.
    let all = runs_by_scan(&db, &s.id).await;
    for (due, scans) in &all {
        assert_eq!(scans.len(), 1, "due time {due} fired {} scans", scans.len());
    }
    let dues: Vec<i64> = all.keys().copied().collect();
    assert!(dues.windows(2).all(|w| (w[1] - w[0]) % 2 == 0), "due times off the interval's phase: {dues:?}");
    // Each started run is in the schedule's runs and sent schedule.fired.
    let mut conn = db.connect().await;
    let (runs, fired): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM schedule_runs WHERE schedule_id = $1::uuid AND outcome = 'started'),
                (SELECT count(*) FROM scan_events e JOIN scans s ON s.id = e.scan_id
                 WHERE e.event = 'schedule_fired' AND s.schedule_id = $1::uuid)",
    )
    .bind(&s.id)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(runs as usize, all.len());
    assert_eq!(fired as usize, all.len());
    // The runs are cancelled one by the next, the last still pending.
    let states: Vec<&str> = all.values().map(|v| v[0].1.as_str()).collect();
    assert!(states[..states.len() - 1].iter().all(|s| *s == "cancelled"), "{states:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_policies_skip_queue_and_cancel() {
    let db = TestDb::create().await;
    let c = TestController::start(config(&db)).await;
    let make = |overlap: pb::OverlapPolicy| pb::Schedule {
        interval: every(1),
        overlap: overlap as i32,
        template: Some(template()),
        ..Default::default()
    };
    let skip = create(&c, make(pb::OverlapPolicy::Skip)).await.unwrap();
    let queue = create(&c, make(pb::OverlapPolicy::Queue)).await.unwrap();
    let cancel = create(&c, make(pb::OverlapPolicy::Cancel)).await.unwrap();
    // Until the skip schedule has skipped twice and the cancel one run
    // three times (the queue one by then has had as many due times).
    eventually("several due times", Duration::from_secs(20), || async {
        let skipped =
            get(&c, &skip.id).await.runs.iter().filter(|r| r.outcome == pb::RunOutcome::Skipped as i32).count();
        (skipped >= 2 && runs_by_scan(&db, &cancel.id).await.len() >= 3).then_some(())
    })
    .await;

    // skip: one run started and pending; the later due times skipped.
    let s = get(&c, &skip.id).await;
    let started: Vec<&pb::ScheduleRun> =
        s.runs.iter().filter(|r| r.outcome == pb::RunOutcome::Started as i32).collect();
    let skipped = s.runs.iter().filter(|r| r.outcome == pb::RunOutcome::Skipped as i32).count();
    assert_eq!(started.len(), 1, "{:?}", s.runs);
    assert!(skipped >= 2, "{:?}", s.runs);
    assert_eq!(started[0].scan_state, pb::ScanState::Pending as i32);

    // queue: one run, the next waiting for it (however many due times
    // pass); it starts once the first ends.
    let q = runs_by_scan(&db, &queue.id).await;
    assert_eq!(q.len(), 1, "{q:?}");
    let first = q.values().next().unwrap()[0].0.clone();
    c.client().await.cancel_scan(pb::CancelScanRequest { id: first }).await.unwrap();
    eventually("the queued run", Duration::from_secs(10), || async {
        (runs_by_scan(&db, &queue.id).await.len() == 2).then_some(())
    })
    .await;
    let q = runs_by_scan(&db, &queue.id).await;
    let dues: Vec<i64> = q.keys().copied().collect();
    // The queued run is the due time after the first, not the latest one.
    assert_eq!(dues[1], dues[0] + 1, "{dues:?}");

    // cancel: every run ends the one before it.
    let k = runs_by_scan(&db, &cancel.id).await;
    assert!(k.len() >= 3, "{k:?}");
    let states: Vec<&str> = k.values().map(|v| v[0].1.as_str()).collect();
    let pending = states.iter().filter(|s| **s == "pending").count();
    assert!(pending <= 1 && states.iter().all(|s| *s == "pending" || *s == "cancelled"), "{states:?}");
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_update_and_delete() {
    let db = TestDb::create().await;
    let c = TestController::start(config(&db)).await;
    let s = create(
        &c,
        pb::Schedule {
            name: "nightly".into(),
            cron: "0 3 * * *".into(),
            time_zone: "Europe/Paris".into(),
            jitter: every(60),
            template: Some(pb::CreateScanRequest { priority: Some(8), ..template() }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let next = s.next_run_time.unwrap();
    // 03:00 in Paris is 01:00 or 02:00 UTC.
    let hour = (next.seconds % 86_400) / 3600;
    assert!(hour == 1 || hour == 2, "next run {next:?}");
    assert_eq!(s.template.as_ref().unwrap().priority, Some(8));
    let mut api = c.client().await;
    let paused = api.pause_schedule(pb::PauseScheduleRequest { id: s.id.clone() }).await.unwrap().into_inner();
    assert!(paused.paused && paused.next_run_time.is_none());
    let resumed = api.resume_schedule(pb::ResumeScheduleRequest { id: s.id.clone() }).await.unwrap().into_inner();
    assert!(!resumed.paused && resumed.next_run_time.is_some());
    // A paused interval schedule never fires.
    let fast = create(&c, pb::Schedule { interval: every(1), template: Some(template()), ..Default::default() })
        .await
        .unwrap();
    api.pause_schedule(pb::PauseScheduleRequest { id: fast.id.clone() }).await.unwrap();
    let fired_before = started_runs(&db, &fast.id).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(started_runs(&db, &fast.id).await, fired_before, "a paused schedule fired");
    // Update: a new cadence recomputes the next run.
    let updated = api
        .update_schedule(pb::UpdateScheduleRequest {
            schedule: Some(pb::Schedule { id: s.id.clone(), interval: every(3600), ..Default::default() }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(updated.cron.is_empty());
    assert_eq!(updated.interval.unwrap().seconds, 3600);
    assert_eq!(updated.name, "nightly");
    let list = api.list_schedules(pb::ListSchedulesRequest::default()).await.unwrap().into_inner();
    assert_eq!(list.schedules.len(), 2);
    api.delete_schedule(pb::DeleteScheduleRequest { id: s.id.clone() }).await.unwrap();
    let gone = api.get_schedule(pb::GetScheduleRequest { id: s.id.clone() }).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    // A read token lists but cannot change.
    let reader = c.client_with(&c.new_token(portfleet_controller::auth::Scope::Read).await).await;
    let mut reader = reader;
    assert!(reader.list_schedules(pb::ListSchedulesRequest::default()).await.is_ok());
    let denied = reader.delete_schedule(pb::DeleteScheduleRequest { id: fast.id.clone() }).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_schedules_are_refused_naming_the_field() {
    let db = TestDb::create().await;
    let mut cfg = portfleet_tests::controller_config(db.options());
    cfg.policy.deny = portfleet_core::policy::parse_cidrs("203.0.113.0/24").unwrap();
    let c = TestController::start(cfg).await;
    let base = || pb::Schedule { interval: every(3600), template: Some(template()), ..Default::default() };
    let cases: Vec<(pb::Schedule, Code, &str)> = vec![
        (pb::Schedule { interval: None, cron: "61 * * * *".into(), ..base() }, Code::InvalidArgument, "schedule.cron"),
        (pb::Schedule { interval: None, cron: "* * *".into(), ..base() }, Code::InvalidArgument, "schedule.cron"),
        (
            pb::Schedule { interval: None, cron: "0 3 * * *".into(), time_zone: "Mars/Base".into(), ..base() },
            Code::InvalidArgument,
            "schedule.time_zone",
        ),
        (pb::Schedule { interval: every(30), ..base() }, Code::InvalidArgument, "schedule.interval"),
        (pb::Schedule { interval: None, ..base() }, Code::InvalidArgument, "schedule.cron"),
        (pb::Schedule { jitter: every(7200), ..base() }, Code::InvalidArgument, "schedule.jitter"),
        (pb::Schedule { template: None, ..base() }, Code::InvalidArgument, "schedule.template"),
        (
            pb::Schedule { template: Some(pb::CreateScanRequest { priority: Some(11), ..template() }), ..base() },
            Code::InvalidArgument,
            "schedule.template.priority",
        ),
        (
            pb::Schedule { template: Some(pb::CreateScanRequest { request_id: "k".into(), ..template() }), ..base() },
            Code::InvalidArgument,
            "schedule.template.request_id",
        ),
        (
            pb::Schedule {
                template: Some(pb::CreateScanRequest { targets: vec!["203.0.113.9".into()], ..template() }),
                ..base()
            },
            Code::PermissionDenied,
            "203.0.113",
        ),
    ];
    // The first interval case is the test minimum (a minute by default).
    for (s, code, field) in cases {
        let err = create(&c, s.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{s:?}: {err:?}");
        assert!(err.message().contains(field), "{field} not named: {}", err.message());
    }
    let err = create(&c, pb::Schedule { interval: every(59), ..base() }).await.unwrap_err();
    assert_eq!(err.message(), "schedule.interval: 59s is shorter than the minimum of 60s");
    let list = c.client().await.list_schedules(pb::ListSchedulesRequest::default()).await.unwrap().into_inner();
    assert!(list.schedules.is_empty(), "a refused schedule was stored");
    c.stop().await.unwrap();
}
