//! What `portfleet scan` shows while it waits: results on stdout as they
//! land; on stderr, a progress line when stderr is a terminal and the
//! scan's waiting reason when it stays pending.
//!
//! The progress line is redrawn in place (`\r`, erase line) and erased
//! before anything else is printed, so a result or a message never shares
//! a line with it. Without a terminal there is no progress line at all,
//! only whole lines. The view is fed events and the time by the caller,
//! so it is tested without a controller or a clock.

use std::{
    collections::VecDeque,
    io::Write,
    time::{Duration, Instant, SystemTime},
};

use portfleet_core::Found;
use portfleet_proto::v1 as pb;

use crate::show;

/// How long a scan may be pending before its waiting reason is printed:
/// long enough that a scan an agent picks up at once says nothing.
pub const QUIET_PENDING: Duration = Duration::from_secs(3);

/// Rate samples older than this are dropped: the rate shown is the last
/// ten seconds', which follows changes (a slowed scan) within seconds.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Erase the terminal line and return to its start.
const ERASE: &str = "\r\x1b[2K";

pub struct View<O: Write, E: Write> {
    out: O,
    err: E,
    /// Draw the progress line (stderr is a terminal).
    tty: bool,
    json: bool,
    scan: pb::Scan,
    /// Since when it is pending, as far as this client has seen.
    pending_since: Instant,
    /// The waiting reason last printed.
    said: Option<String>,
    /// The progress line on the screen, if any.
    drawn: Option<String>,
    samples: VecDeque<(Instant, u64)>,
    /// stdout was closed (`| head`): stop printing results.
    closed: bool,
    lines: portfleet_core::found::TextLines,
}

impl<O: Write, E: Write> View<O, E> {
    pub fn new(out: O, err: E, tty: bool, json: bool, scan: pb::Scan, now: Instant) -> Self {
        Self {
            out,
            err,
            tty,
            json,
            scan,
            pending_since: now,
            said: None,
            drawn: None,
            samples: VecDeque::new(),
            closed: false,
            lines: Default::default(),
        }
    }

    pub fn scan(&self) -> &pb::Scan {
        &self.scan
    }

    /// Whether stdout was closed by its reader.
    pub fn closed(&self) -> bool {
        self.closed
    }

    pub fn on_scan(&mut self, s: pb::Scan, now: Instant) {
        if s.state != pb::ScanState::Pending as i32 {
            self.said = None;
        }
        self.scan = s;
        self.samples.push_back((now, self.scan.probes_done));
        while self.samples.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW) {
            self.samples.pop_front();
        }
        self.tick(now);
    }

    pub fn on_results(&mut self, results: &[pb::Result], now: Instant) {
        if results.is_empty() || self.closed {
            return;
        }
        self.erase();
        for r in results {
            let line = match found(r) {
                Some(f) if self.json => f.to_json(),
                Some(f) => match self.lines.line(&f) {
                    Some(line) => line,
                    None => continue,
                },
                None => continue,
            };
            if writeln!(self.out, "{line}").is_err() {
                self.closed = true;
                return;
            }
        }
        if self.out.flush().is_err() {
            self.closed = true;
            return;
        }
        self.tick(now);
    }

    /// Says why a scan still waits, once per reason; redraws the progress
    /// line.
    pub fn tick(&mut self, now: Instant) {
        let pending = self.scan.state == pb::ScanState::Pending as i32;
        if pending && now.duration_since(self.pending_since) >= QUIET_PENDING {
            let reason = match self.scan.waiting_reason.as_str() {
                "" => "the controller gives no reason".to_string(),
                r => show::clean(r),
            };
            if self.said.as_ref() != Some(&reason) {
                self.erase();
                let _ = writeln!(self.err, "scan {} is waiting: {reason}", self.scan.id);
                self.said = Some(reason);
            }
        }
        self.draw(now);
    }

    /// Takes the progress line off the screen.
    pub fn erase(&mut self) {
        if self.drawn.take().is_some() {
            let _ = write!(self.err, "{ERASE}");
            let _ = self.err.flush();
        }
    }

    /// Prints a whole line on stderr (after erasing the progress line).
    pub fn say(&mut self, line: &str) {
        self.erase();
        let _ = writeln!(self.err, "{line}");
    }

    fn draw(&mut self, now: Instant) {
        if !self.tty {
            return;
        }
        let line = progress_line(&self.scan, self.rate(), now.duration_since(self.pending_since));
        if self.drawn.as_ref() == Some(&line) {
            return;
        }
        let _ = write!(self.err, "{ERASE}{line}");
        let _ = self.err.flush();
        self.drawn = Some(line);
    }

    /// Probes per second over the samples in the window; `None` until two
    /// samples a second apart show it.
    fn rate(&self) -> Option<f64> {
        let (t0, d0) = self.samples.front()?;
        let (t1, d1) = self.samples.back()?;
        let dt = t1.duration_since(*t0).as_secs_f64();
        (dt >= 1.0).then(|| d1.saturating_sub(*d0) as f64 / dt)
    }
}

/// A result as printed, or `None` for an address the controller should
/// never send (skipped rather than ending the watch).
pub fn found(r: &pb::Result) -> Option<Found> {
    let ip = r.ip.parse().ok()?;
    let port = u16::try_from(r.port).ok()?;
    let at = show::system_time(r.observed_at.as_ref().or(r.first_observed_at.as_ref()));
    let host = (!r.hostname.is_empty()).then(|| show::clean(&r.hostname));
    let service = r.service.clone().map(portfleet_core::Service::from);
    Some(Found::tcp(ip, port, at, host).with_service(service, r.host_answers_everything))
}

/// "running  1200/65536 (1.8%)  980/s  3 open  eta 1m 5s": short enough
/// not to wrap on an 80-column terminal (a wrapped line could not be
/// erased in place).
pub fn progress_line(s: &pb::Scan, rate: Option<f64>, watched: Duration) -> String {
    let mut line = format!("{}  {}", show::state_name(s.state), show::progress(s));
    if s.state == pb::ScanState::Pending as i32 {
        return line + &format!("  {} waited", show::duration(watched));
    }
    if let Some(rate) = rate {
        line += &format!("  {rate:.0}/s");
    }
    line += &format!("  {} open", s.open_ports);
    let left = s.probes_planned.saturating_sub(s.probes_done);
    let eta = match rate {
        Some(r) if r >= 1.0 => Some(Duration::from_secs_f64(left as f64 / r)),
        // No rate seen yet: the controller's estimate (its clock, so
        // only a fallback).
        _ => show::system_time(s.eta.as_ref()).map(|t| t.duration_since(SystemTime::now()).unwrap_or_default()),
    };
    if let Some(eta) = eta {
        line += &format!("  eta {}", show::duration(eta));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(state: pb::ScanState, done: u64, reason: &str) -> pb::Scan {
        pb::Scan {
            id: "s1".into(),
            state: state as i32,
            probes_planned: 1000,
            probes_done: done,
            waiting_reason: reason.into(),
            ..Default::default()
        }
    }

    fn result(ip: &str, port: u32) -> pb::Result {
        pb::Result { ip: ip.into(), port, ..Default::default() }
    }

    /// stdout and stderr on one terminal: what the user sees, in order.
    #[derive(Clone, Default)]
    struct Term(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);

    impl Write for Term {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(b);
            Ok(b.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn on_a_terminal_results_never_share_the_progress_line() {
        let t0 = Instant::now();
        let term = Term::default();
        let mut v = View::new(term.clone(), term.clone(), true, false, scan(pb::ScanState::Running, 0, ""), t0);
        v.on_scan(scan(pb::ScanState::Running, 100, ""), t0 + Duration::from_secs(1));
        v.on_scan(scan(pb::ScanState::Running, 600, ""), t0 + Duration::from_secs(2));
        v.on_results(&[result("192.0.2.1", 80), result("192.0.2.2", 22)], t0 + Duration::from_secs(2));
        v.say("scan s1 completed");
        drop(v);
        let seen = String::from_utf8(term.0.borrow().clone()).unwrap();
        let progress = "running  600/1000 (60.0%)  500/s  0 open  eta 0s";
        assert_eq!(
            seen,
            format!(
                "{ERASE}running  100/1000 (10.0%)  0 open{ERASE}{progress}{ERASE}192.0.2.1:80\n192.0.2.2:22\n\
                 {ERASE}{progress}{ERASE}scan s1 completed\n"
            )
        );
    }

    #[test]
    fn without_a_terminal_there_are_only_whole_lines() {
        let t0 = Instant::now();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut v = View::new(&mut out, &mut err, false, true, scan(pb::ScanState::Pending, 0, ""), t0);
        v.tick(t0 + Duration::from_secs(1));
        v.on_scan(scan(pb::ScanState::Pending, 0, "no agent is connected"), t0 + Duration::from_secs(2));
        // Quiet for the first seconds, then said once per reason.
        v.tick(t0 + Duration::from_secs(3));
        v.tick(t0 + Duration::from_secs(4));
        v.on_scan(scan(pb::ScanState::Pending, 0, "no agent has the labels"), t0 + Duration::from_secs(5));
        v.on_scan(scan(pb::ScanState::Running, 10, ""), t0 + Duration::from_secs(6));
        v.on_results(&[result("2001:db8::1", 443)], t0 + Duration::from_secs(6));
        drop(v);
        assert_eq!(
            String::from_utf8(err).unwrap(),
            "scan s1 is waiting: no agent is connected\nscan s1 is waiting: no agent has the labels\n"
        );
        assert_eq!(String::from_utf8(out).unwrap(), "{\"ip\":\"2001:db8::1\",\"port\":443,\"protocol\":\"tcp\"}\n");
    }
}
