//! nmap's service fingerprints (`nmap-service-probes`), read at run time and
//! matched with PCRE2.
//!
//! Why at run time: the file is under nmap's own licence, so portfleet never
//! ships or embeds it; an agent reads the copy that the host's nmap package
//! installed ([`NmapDb::DEFAULT_PATH`]) and identifies without it when there
//! is none. Why PCRE2: the patterns are Perl regexes over binary responses
//! (`i`/`s` flags, lookarounds, back-references) that only PCRE runs as nmap
//! does. Every pattern is compiled once, at load, so a bad
//! file or PCRE version shows at start and matching does no compiling.
//!
//! This module owns the database and the matching, not the I/O. The caller,
//! for each probe of [`NmapDb::probes_for`]: connects (over TLS when probing
//! behind TLS), sends [`Probe::payload`], reads until [`Probe::total_wait`]
//! has passed since the probe was sent or 4096 bytes have come (nmap's cap),
//! and calls [`NmapDb::match_response`] on everything read so far after each
//! read: a hard match ends the port; a soft match is kept and narrows the
//! rest (skip probes whose [`Probe::detects`] is false for it). The NULL
//! probe sends nothing; if the server closes it with no byte read within
//! [`Probe::tcpwrapped_wait`], nmap calls the port "tcpwrapped".

#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pcre2::bytes::{Captures, Regex, RegexBuilder};
use portfleet_core::Service;

/// A hard match: the rule names the product, as nmap's "matched" state.
pub const HARD_CONFIDENCE: u8 = 10;
/// A softmatch knows the protocol but not the product: below a hard match,
/// above a guess from the port number (3).
pub const SOFT_CONFIDENCE: u8 = 8;
/// nmap's wait for a probe without `totalwaitms` (`DEFAULT_SERVICEWAITMS`).
const DEFAULT_TOTAL_WAIT: Duration = Duration::from_millis(5000);
/// nmap's rarity for a probe without `rarity`.
const DEFAULT_RARITY: u8 = 5;

#[derive(Debug, thiserror::Error)]
pub enum NmapError {
    #[error("nmap service probes {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("nmap service probes, line {line}: {reason}")]
    Parse { line: usize, reason: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// What a response says, after the probe's matches and its fallbacks'.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A `match` line: the port is identified; stop probing it.
    Hard(Service),
    /// A `softmatch` line: the protocol is known; keep probing for the
    /// product with probes that can detect this service.
    Soft(Service),
    /// Nothing matched (or nothing beyond the softmatch already known).
    None,
}

/// The parsed `nmap-service-probes`: probes in file order, each with its
/// compiled match lines. Shared read-only (`Arc`) by every identification.
pub struct NmapDb {
    probes: Vec<Probe>,
    /// Index of the TCP probe with an empty payload, sent first to every port.
    null: Option<usize>,
    /// TCP port ranges of the `Exclude` directive: never probed.
    excluded: Vec<(u16, u16)>,
    /// Lines whose pattern PCRE2 refused: skipped, not fatal.
    uncompiled: Vec<usize>,
}

/// One `Probe` section: what to send and the patterns for what comes back.
pub struct Probe {
    pub name: String,
    pub protocol: Protocol,
    /// The bytes to send, nmap's escapes decoded; empty for the NULL probe.
    pub payload: Vec<u8>,
    /// 1 (always worth sending) to 9 (rarely answers): sent to a port that
    /// its `ports` do not list only when rarity <= the intensity.
    pub rarity: u8,
    /// How long to read after sending, all reads together.
    pub total_wait: Duration,
    /// Only on the NULL probe: a close with nothing read within this is
    /// "tcpwrapped"; later it is just a silent service. nmap's default,
    /// when the file has none, is 2 s.
    pub tcpwrapped_wait: Option<Duration>,
    /// Line of the `Probe` directive in the file.
    pub line: usize,
    ports: Vec<(u16, u16)>,
    sslports: Vec<(u16, u16)>,
    /// Probes whose matches a response to this one is tried against, in
    /// order: itself, its `fallback` probes, then (TCP) the NULL probe.
    chain: Vec<usize>,
    fallback: Option<(usize, Vec<String>)>,
    matches: Vec<Match>,
}

/// One `match` or `softmatch` line.
struct Match {
    line: usize,
    soft: bool,
    /// The service without nmap's `ssl/` prefix; `ssl` records the prefix.
    service: String,
    ssl: bool,
    /// The pattern as PCRE2 reads it, and its flags: compiled at load to
    /// check it, then again on its first use (most never pass their
    /// prefix check, so most never take memory).
    source: String,
    dotall: bool,
    regex: std::sync::OnceLock<Option<Regex>>,
    /// Bytes every match starts with ([`literal_prefix`]), compared
    /// (ASCII-caselessly with `i`) before PCRE2 is asked.
    prefix: Vec<u8>,
    caseless: bool,
    templates: Templates,
}

/// The version templates of a match line, raw (`$1`, `$P(2)`...).
#[derive(Default)]
struct Templates {
    product: Vec<u8>,
    version: Vec<u8>,
    info: Vec<u8>,
    hostname: Vec<u8>,
    os: Vec<u8>,
    device: Vec<u8>,
    /// After `cpe:/`, e.g. `a:openbsd:openssh:$2`.
    cpes: Vec<Vec<u8>>,
}

impl NmapDb {
    /// Where Debian's and most distributions' nmap package installs it.
    pub const DEFAULT_PATH: &str = "/usr/share/nmap/nmap-service-probes";

    /// Reads and parses the file at `path`, compiling every pattern.
    pub fn load(path: &Path) -> Result<NmapDb, NmapError> {
        let text = std::fs::read(path).map_err(|source| NmapError::Read { path: path.to_owned(), source })?;
        Self::parse(&text)
    }

    /// Parses the text of a probes file. Comments, blank lines and unknown
    /// directives are skipped (a newer nmap's file still loads); a known
    /// directive that is malformed is an error naming its line, as in nmap,
    /// because the rest of the file cannot be trusted. A pattern that this
    /// PCRE2 cannot compile is skipped and counted ([`Self::uncompiled`]).
    pub fn parse(text: &[u8]) -> Result<NmapDb, NmapError> {
        let mut db = NmapDb { probes: Vec::new(), null: None, excluded: Vec::new(), uncompiled: Vec::new() };
        for (index, raw) in text.split(|&b| b == b'\n').enumerate() {
            let line = index + 1;
            let raw = raw.trim_ascii();
            if raw.is_empty() || raw[0] == b'#' {
                continue;
            }
            db.parse_line(line, raw).map_err(|reason| NmapError::Parse { line, reason })?;
        }
        db.resolve_chains()?;
        if !db.uncompiled.is_empty() {
            tracing::warn!(lines = ?db.uncompiled, "skipped nmap patterns that pcre2 cannot compile");
        }
        Ok(db)
    }

    /// The number of probes, TCP and UDP.
    pub fn len(&self) -> usize {
        self.probes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    /// How many match lines were skipped because PCRE2 refused the pattern.
    pub fn uncompiled(&self) -> usize {
        self.uncompiled.len()
    }

    /// True when the file's `Exclude` names this TCP port: nmap does not
    /// probe it (printers print whatever they are sent).
    pub fn excluded(&self, port: u16) -> bool {
        in_ranges(&self.excluded, port)
    }

    /// The TCP probe of that name ("NULL", "GetRequest"), to match a response
    /// that our own probes got as nmap would have (names repeat across TCP
    /// and UDP, so UDP's are not looked up).
    pub fn probe(&self, name: &str) -> Option<&Probe> {
        self.probes.iter().find(|p| p.protocol == Protocol::Tcp && p.name == name)
    }

    /// True when some probe's `sslports` lists the TCP port: nmap expects
    /// TLS there (443, 993, ...), so it is worth a handshake first.
    pub fn is_ssl_port(&self, port: u16) -> bool {
        self.probes.iter().any(|p| p.protocol == Protocol::Tcp && in_ranges(&p.sslports, port))
    }

    /// The probes to send, in nmap's order, for a TCP port: the NULL probe
    /// first; then probes whose `ports` (or, when `tls` is true, `sslports`)
    /// list the port, in file order; then the other probes with rarity <=
    /// `intensity` (nmap's `--version-intensity`, 0-9, default 7), in file
    /// order. Empty for a port of the `Exclude` directive.
    pub fn probes_for(&self, port: u16, tls: bool, intensity: u8) -> Vec<&Probe> {
        if self.excluded(port) {
            return Vec::new();
        }
        let tcp =
            || self.probes.iter().enumerate().filter(|(i, p)| p.protocol == Protocol::Tcp && Some(*i) != self.null);
        let listed = |p: &Probe| in_ranges(if tls { &p.sslports } else { &p.ports }, port);
        let null = self.null.map(|i| &self.probes[i]);
        let first = tcp().map(|(_, p)| p).filter(|p| listed(p));
        let rest = tcp().map(|(_, p)| p).filter(|p| !listed(p) && p.rarity <= intensity);
        null.into_iter().chain(first).chain(rest).collect()
    }

    /// Matches a response to `probe` against the probe's matches, then its
    /// `fallback` probes' and then (TCP) the NULL probe's, in file order. The
    /// first hard match wins, even after a softmatch; else the first
    /// softmatch. `soft` is the service a previous softmatch found: once
    /// set, only matches for that service count (nmap's semantics), and
    /// further softmatches add nothing.
    pub fn match_response(&self, probe: &Probe, response: &[u8], soft: Option<&str>) -> Outcome {
        let mut first_soft = None;
        for owner in probe.chain.iter().filter_map(|&i| self.probes.get(i)) {
            for m in &owner.matches {
                if soft.is_some_and(|s| s != m.service) || (m.soft && (soft.is_some() || first_soft.is_some())) {
                    continue;
                }
                // A PCRE2 error (a match or stack limit) is no match, as in nmap.
                if !m.may_match(response) {
                    continue;
                }
                let Some(regex) = m.regex() else { continue };
                if !regex.is_match(response).unwrap_or(false) {
                    continue;
                }
                let Ok(Some(caps)) = regex.captures(response) else { continue };
                let service = m.service(owner, &caps);
                if !m.soft {
                    return Outcome::Hard(service);
                }
                first_soft = Some(service);
            }
        }
        first_soft.map_or(Outcome::None, Outcome::Soft)
    }

    fn parse_line(&mut self, line: usize, raw: &[u8]) -> Result<(), String> {
        let (directive, rest) = split_word(raw);
        match directive {
            b"Exclude" => parse_exclude(rest, &mut self.excluded),
            b"Probe" => {
                let probe = parse_probe(line, rest)?;
                if probe.is_null() && self.null.is_none() {
                    self.null = Some(self.probes.len());
                }
                self.probes.push(probe);
                Ok(())
            }
            b"match" | b"softmatch" | b"ports" | b"sslports" | b"rarity" | b"fallback" | b"totalwaitms"
            | b"tcpwrappedms" => self.probe_line(line, directive, rest),
            _ => Ok(()),
        }
    }

    /// A directive that belongs to the `Probe` above it.
    fn probe_line(&mut self, line: usize, directive: &[u8], rest: &[u8]) -> Result<(), String> {
        let Some(probe) = self.probes.last_mut() else {
            return Err(format!("{} before the first Probe", String::from_utf8_lossy(directive)));
        };
        match directive {
            b"match" | b"softmatch" => match parse_match(line, directive == b"softmatch", rest)? {
                Some(m) => probe.matches.push(m),
                None => self.uncompiled.push(line),
            },
            b"ports" => probe.ports.extend(parse_ports(rest)?),
            b"sslports" => probe.sslports.extend(parse_ports(rest)?),
            b"rarity" => probe.rarity = parse_number(rest, 1, 9)? as u8,
            b"totalwaitms" => probe.total_wait = Duration::from_millis(parse_number(rest, 100, 300_000)?),
            b"tcpwrappedms" => probe.tcpwrapped_wait = Some(Duration::from_millis(parse_number(rest, 100, 300_000)?)),
            _ => {
                let names = rest.split(|&b| b == b',' || b.is_ascii_whitespace()).filter(|n| !n.is_empty());
                probe.fallback = Some((line, names.map(|n| String::from_utf8_lossy(n).into_owned()).collect()));
            }
        }
        Ok(())
    }

    /// Turns `fallback` names into indices. A name is looked up among the
    /// probe's own protocol first, then any: a TCP probe of the real file
    /// falls back to a UDP one (DNS over TCP to DNS's patterns).
    fn resolve_chains(&mut self) -> Result<(), NmapError> {
        for i in 0..self.probes.len() {
            let mut chain = vec![i];
            if let Some((line, names)) = self.probes[i].fallback.take() {
                for name in names {
                    let protocol = self.probes[i].protocol;
                    let same = self.probes.iter().position(|p| p.name == name && p.protocol == protocol);
                    let found = same.or_else(|| self.probes.iter().position(|p| p.name == name));
                    let reason = format!("fallback to unknown probe {name}");
                    let index = found.ok_or(NmapError::Parse { line, reason })?;
                    if !chain.contains(&index) {
                        chain.push(index);
                    }
                }
            }
            if let Some(null) = self.null.filter(|n| self.probes[i].protocol == Protocol::Tcp && !chain.contains(n)) {
                chain.push(null);
            }
            self.probes[i].chain = chain;
        }
        Ok(())
    }
}

impl Probe {
    /// True for the probe that sends nothing and waits for a banner.
    pub fn is_null(&self) -> bool {
        self.protocol == Protocol::Tcp && self.payload.is_empty()
    }

    /// Whether this probe's own matches can name `service`. After a
    /// softmatch nmap still sends the probes that list the port, but of the
    /// others only those that can name the softmatched service.
    pub fn detects(&self, service: &str) -> bool {
        self.matches.iter().any(|m| m.service == service)
    }
}

/// A pattern compiled as nmap's PCRE does, or None if PCRE2 refuses it.
fn compile(source: &str, caseless: bool, dotall: bool) -> Option<Regex> {
    // No JIT: the literal prefix check turns most patterns away before
    // PCRE2 runs, so the JIT's code (15 MiB for nmap 7.93's 11,917
    // patterns, 2.5x the load time) buys no speed here.
    RegexBuilder::new().jit_if_available(false).caseless(caseless).dotall(dotall).build(source).ok()
}

impl Match {
    fn regex(&self) -> Option<&Regex> {
        self.regex.get_or_init(|| compile(&self.source, self.caseless, self.dotall)).as_ref()
    }

    fn may_match(&self, response: &[u8]) -> bool {
        let Some(head) = response.get(..self.prefix.len()) else { return false };
        if self.caseless { head.eq_ignore_ascii_case(&self.prefix) } else { head == self.prefix }
    }

    fn service(&self, owner: &Probe, caps: &Captures<'_>) -> Service {
        let t = &self.templates;
        let field = |tmpl: &[u8]| fill(tmpl, caps, false).unwrap_or_default();
        Service {
            name: self.service.clone(),
            product: field(&t.product),
            version: field(&t.version),
            extra_info: field(&t.info),
            hostname: field(&t.hostname),
            os_type: field(&t.os),
            device_type: field(&t.device),
            cpes: t.cpes.iter().filter_map(|c| fill(c, caps, true)).map(|c| format!("cpe:/{c}")).collect(),
            tunnel: if self.ssl { "ssl".into() } else { String::new() },
            confidence: if self.soft { SOFT_CONFIDENCE } else { HARD_CONFIDENCE },
            method: if self.soft { "softmatch" } else { "probed" }.into(),
            rule: format!("nmap:{}:{}", owner.name, self.line),
            ..Service::default()
        }
        .bounded()
    }
}

/// `Probe TCP GetRequest q|GET / HTTP/1.0\r\n\r\n| [no-payload]`.
fn parse_probe(line: usize, rest: &[u8]) -> Result<Probe, String> {
    let (protocol, rest) = split_word(rest);
    let protocol = match protocol {
        b"TCP" => Protocol::Tcp,
        b"UDP" => Protocol::Udp,
        other => return Err(format!("unknown protocol {:?}", String::from_utf8_lossy(other))),
    };
    let (name, rest) = split_word(rest);
    if name.is_empty() {
        return Err("a Probe without a name".into());
    }
    let mut items = rest;
    let payload = match next_item(&mut items)? {
        Some(item) if item.kind == b"q" => unescape(item.body)?,
        _ => return Err("a Probe without its q|...| string".into()),
    };
    Ok(Probe {
        name: String::from_utf8_lossy(name).into_owned(),
        protocol,
        payload,
        rarity: DEFAULT_RARITY,
        total_wait: DEFAULT_TOTAL_WAIT,
        tcpwrapped_wait: None,
        line,
        ports: Vec::new(),
        sslports: Vec::new(),
        chain: Vec::new(),
        fallback: None,
        matches: Vec::new(),
    })
}

/// `match ssh m|^SSH-...|i p/OpenSSH/ v/$1/ cpe:/a:openbsd:openssh:$1/`.
/// `Ok(None)` when PCRE2 refuses the pattern.
fn parse_match(line: usize, soft: bool, rest: &[u8]) -> Result<Option<Match>, String> {
    let (service, mut items) = split_word(rest);
    let service = String::from_utf8_lossy(service).into_owned();
    let (service, ssl) = match service.strip_prefix("ssl/") {
        Some(inner) => (inner.to_owned(), true),
        None => (service, false),
    };
    let pattern = match next_item(&mut items)? {
        Some(item) if item.kind == b"m" => item,
        _ => return Err("a match without its m|...| pattern".into()),
    };
    let caseless = pattern.flags.contains(&b'i');
    let mut dotall = false;
    for &flag in pattern.flags {
        match flag {
            b'i' => {}
            b's' => dotall = true,
            _ => return Err(format!("unknown pattern flag {:?}", flag as char)),
        };
    }
    let source = pattern_text(pattern.body);
    if compile(&source, caseless, dotall).is_none() {
        return Ok(None);
    }
    let mut templates = Templates::default();
    while let Some(item) = next_item(&mut items)? {
        let body = item.body.to_vec();
        match item.kind {
            b"p" => templates.product = body,
            b"v" => templates.version = body,
            b"i" => templates.info = body,
            b"h" => templates.hostname = body,
            b"o" => templates.os = body,
            b"d" => templates.device = body,
            b"cpe:" => templates.cpes.push(body),
            _ => {} // A field a newer nmap added: ignored, like unknown directives.
        }
    }
    let prefix = literal_prefix(pattern.body);
    let regex = std::sync::OnceLock::new();
    Ok(Some(Match { line, soft, service, ssl, source, dotall, regex, prefix, caseless, templates }))
}

/// One `kind<d>body<d>flags` item of a line: `q|..|`, `m=..=is`, `p/../`,
/// `cpe:/../a`. The delimiter is any character; as in nmap, the body cannot
/// contain it, escaped or not.
struct Item<'a> {
    kind: &'a [u8],
    body: &'a [u8],
    flags: &'a [u8],
}

/// The next item of `rest`, which moves past it; `Ok(None)` at the end.
fn next_item<'a>(rest: &mut &'a [u8]) -> Result<Option<Item<'a>>, String> {
    let s = rest.trim_ascii_start();
    if s.is_empty() {
        return Ok(None);
    }
    let kind_len = s.iter().take_while(|&&b| b.is_ascii_alphabetic() || b == b':').count();
    let Some(&delim) = s.get(kind_len).filter(|b| !b.is_ascii_whitespace()) else {
        return Err(format!("{:?} has no delimiter", String::from_utf8_lossy(&s[..kind_len])));
    };
    let body = &s[kind_len + 1..];
    let Some(end) = body.iter().position(|&b| b == delim) else {
        return Err(format!("{:?} has no closing {:?}", String::from_utf8_lossy(&s[..kind_len]), delim as char));
    };
    let after = &body[end + 1..];
    let flags_len = after.iter().take_while(|b| b.is_ascii_alphabetic()).count();
    *rest = &after[flags_len..];
    Ok(Some(Item { kind: &s[..kind_len], body: &body[..end], flags: &after[..flags_len] }))
}

fn split_word(s: &[u8]) -> (&[u8], &[u8]) {
    let s = s.trim_ascii_start();
    let end = s.iter().position(|b| b.is_ascii_whitespace()).unwrap_or(s.len());
    (&s[..end], s[end..].trim_ascii_start())
}

fn parse_number(s: &[u8], min: u64, max: u64) -> Result<u64, String> {
    let text = String::from_utf8_lossy(s.trim_ascii());
    match text.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a number in {min}..={max}")),
    }
}

/// `21,23,80-90`: ranges, inclusive.
fn parse_ports(s: &[u8]) -> Result<Vec<(u16, u16)>, String> {
    let text = String::from_utf8_lossy(s);
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (lo, hi) = item.split_once('-').unwrap_or((item, item));
        match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
            (Ok(lo), Ok(hi)) if lo <= hi => out.push((lo, hi)),
            _ => return Err(format!("bad port or range {item:?}")),
        }
    }
    Ok(out)
}

/// `Exclude 53,T:9100-9107,U:30000-40000`, as nmap's `-p`: a `T:`, `U:` or
/// `S:` prefix holds for the items after it; a bare item is every protocol.
/// Only TCP's are kept: the agent identifies TCP services.
fn parse_exclude(s: &[u8], excluded: &mut Vec<(u16, u16)>) -> Result<(), String> {
    let text = String::from_utf8_lossy(s);
    let mut tcp = true;
    for mut item in text.split(',').map(str::trim) {
        if let Some((proto, rest)) = item.split_once(':') {
            tcp = match proto {
                "T" => true,
                "U" | "S" => false,
                _ => return Err(format!("bad protocol in Exclude item {item:?}")),
            };
            item = rest;
        }
        let ranges = parse_ports(item.as_bytes())?;
        if tcp {
            excluded.extend(ranges);
        }
    }
    Ok(())
}

fn in_ranges(ranges: &[(u16, u16)], port: u16) -> bool {
    ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&port))
}

/// nmap's C-style escapes in `q|...|` and `$SUBST` strings: `\0 \a \b \f
/// \n \r \t \v \\ \xHH`; any other escaped character is itself.
fn unescape(s: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.iter().copied();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        const ESCAPES: [(u8, u8); 8] =
            [(b'0', 0), (b'a', 7), (b'b', 8), (b'f', 12), (b'n', b'\n'), (b'r', b'\r'), (b't', b'\t'), (b'v', 11)];
        let decoded = match bytes.next() {
            Some(b'x') => match [bytes.next(), bytes.next()] {
                [Some(hi), Some(lo)] => hex_byte(&[hi, lo]).ok_or("\\x needs two hex digits")?,
                _ => return Err("\\x needs two hex digits".into()),
            },
            Some(e) => ESCAPES.iter().find(|(k, _)| *k == e).map_or(e, |&(_, v)| v),
            None => return Err("a string ends in a lone backslash".into()),
        };
        out.push(decoded);
    }
    Ok(out)
}

/// Two hex digits, exactly.
fn hex_byte(digits: &[u8]) -> Option<u8> {
    let [hi, lo] = digits else { return None };
    Some(((*hi as char).to_digit(16)? * 16 + (*lo as char).to_digit(16)?) as u8)
}

/// PCRE2's API takes the pattern as `&str`; nmap's are bytes. Valid UTF-8
/// (the real file) is passed as is: PCRE2 runs without UTF mode, so it
/// still matches byte for byte. Any other byte becomes `\x{HH}`, joining a
/// backslash before it (`\<byte>` quotes it) so the meaning is kept.
fn pattern_text(raw: &[u8]) -> String {
    if let Ok(text) = std::str::from_utf8(raw) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(raw.len() * 2);
    let mut escaped = false;
    for &b in raw {
        if b.is_ascii() {
            out.push(b as char);
            escaped = !escaped && b == b'\\';
        } else {
            out.push_str(&format!("{}x{{{b:02x}}}", if escaped { "" } else { "\\" }));
            escaped = false;
        }
    }
    out
}

/// The bytes every match of `pattern` starts with, when it says so plainly:
/// `^`, then literal characters, and no `|` outside parentheses (or `\Q`).
/// 96% of nmap's patterns have one, and a response that does not start with
/// it is refused without calling PCRE2 (~200 ns a call even when the first
/// byte fails: a ten times faster miss). Empty when unsure.
fn literal_prefix(pattern: &[u8]) -> Vec<u8> {
    let Some(body) = pattern.strip_prefix(b"^") else { return Vec::new() };
    if alternates_at_top(body) || body.windows(2).any(|w| w == b"\\Q") {
        return Vec::new();
    }
    let (mut out, mut i) = (Vec::new(), 0);
    while let Some(&c) = body.get(i) {
        let next = body.get(i + 1).copied();
        let (byte, len) = match (c, next) {
            (b'\\', Some(b'x')) => match body.get(i + 2..i + 4).and_then(hex_byte) {
                Some(byte) => (byte, 4),
                None => break,
            },
            (b'\\', Some(b'r')) => (b'\r', 2),
            (b'\\', Some(b'n')) => (b'\n', 2),
            (b'\\', Some(b't')) => (b'\t', 2),
            (b'\\', Some(b'0')) if !body.get(i + 2).is_some_and(|d| (b'0'..=b'7').contains(d)) => (0, 2),
            (b'\\', Some(e)) if !e.is_ascii_alphanumeric() => (e, 2),
            (b'\\' | b'^' | b'$' | b'.' | b'|' | b'?' | b'*' | b'+' | b'(' | b')' | b'[' | b']' | b'{' | b'}', _) => {
                break;
            }
            _ => (c, 1),
        };
        out.push(byte);
        i += len;
    }
    if matches!(body.get(i), Some(b'?' | b'*' | b'{')) {
        out.pop(); // The quantifier may drop the last character.
    }
    out
}

/// Whether `body` has a `|` outside parentheses and classes. Errs towards
/// yes (a POSIX `[:alpha:]` ends a class early), which only costs speed.
fn alternates_at_top(body: &[u8]) -> bool {
    let (mut depth, mut class, mut i) = (0usize, false, 0);
    while let Some(&c) = body.get(i) {
        match c {
            b'\\' => i += 1,
            b']' if class => class = false,
            _ if class => {}
            b'[' => {
                class = true;
                i += usize::from(body.get(i + 1) == Some(&b'^'));
                i += usize::from(body.get(i + 1) == Some(&b']'));
            }
            b'(' => depth += 1,
            b')' => depth = depth.saturating_sub(1),
            b'|' if depth == 0 => return true,
            _ => {}
        }
        i += 1;
    }
    false
}

/// Fills a version template from the captures: `$1`..`$9`, `$P(n)`
/// (printable bytes only), `$SUBST(n,"from","to")`, `$I(n,">")` or `"<"`
/// (a big- or little-endian unsigned integer of up to 8 bytes, in decimal).
/// As in nmap, a variable that cannot be filled (a group that did not take
/// part, bad arguments) empties the whole field (`None`); trailing spaces and
/// commas are cut. In a CPE each value is made URL-safe and lower case.
fn fill(tmpl: &[u8], caps: &Captures<'_>, cpe: bool) -> Option<String> {
    let mut out = Vec::new();
    let mut rest = tmpl;
    while let Some(at) = rest.iter().position(|&b| b == b'$') {
        out.extend_from_slice(&rest[..at]);
        rest = &rest[at..];
        match variable(rest, caps)? {
            Var::Value(value, used) => {
                if cpe {
                    out.extend(value.iter().flat_map(|&b| cpe_escape(b)));
                } else {
                    out.extend(value);
                }
                rest = &rest[used..];
            }
            Var::Literal => {
                out.push(b'$');
                rest = &rest[1..];
            }
        }
    }
    out.extend_from_slice(rest);
    let keep = out.iter().rposition(|&b| !(b.is_ascii_whitespace() || b == b',')).map_or(0, |i| i + 1);
    out.truncate(keep);
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// What a `$` in a template starts.
enum Var {
    /// No variable: a literal `$`.
    Literal,
    /// The variable's value and the length of its text.
    Value(Vec<u8>, usize),
}

/// The variable at the start of `text` (which begins with `$`); `None` when
/// it cannot be filled.
fn variable(text: &[u8], caps: &Captures<'_>) -> Option<Var> {
    let group = |n: u64| Some(caps.get(usize::try_from(n).ok().filter(|&n| (1..=9).contains(&n))?)?.as_bytes());
    if let Some(&d) = text.get(1).filter(|d| d.is_ascii_digit()) {
        return Some(Var::Value(group(u64::from(d - b'0'))?.to_vec(), 2));
    }
    let name_len = text[1..].iter().take_while(|b| b.is_ascii_uppercase()).count();
    let (name, after) = text[1..].split_at(name_len);
    if !matches!(name, b"P" | b"SUBST" | b"I") || after.first() != Some(&b'(') {
        return Some(Var::Literal);
    }
    let (args, args_len) = parse_args(&after[1..])?;
    let used = 1 + name_len + 1 + args_len;
    let value = match (name, args.as_slice()) {
        (b"P", [Arg::Int(n)]) => group(*n)?.iter().copied().filter(|b| (0x20..0x7f).contains(b)).collect(),
        (b"SUBST", [Arg::Int(n), Arg::Str(from), Arg::Str(to)]) if !from.is_empty() => {
            let (mut value, mut rest) = (Vec::new(), group(*n)?);
            while !rest.is_empty() {
                if rest.starts_with(from) {
                    value.extend_from_slice(to);
                    rest = &rest[from.len()..];
                } else {
                    value.push(rest[0]);
                    rest = &rest[1..];
                }
            }
            value
        }
        (b"I", [Arg::Int(n), Arg::Str(order)]) => {
            let bytes = group(*n).filter(|b| b.len() <= 8)?;
            let fold = |acc: u64, &b: &u8| (acc << 8) | u64::from(b);
            let value = match order.as_slice() {
                b">" => bytes.iter().fold(0, fold),
                b"<" => bytes.iter().rev().fold(0, fold),
                _ => return None,
            };
            value.to_string().into_bytes()
        }
        _ => return None,
    };
    Some(Var::Value(value, used))
}

enum Arg {
    Int(u64),
    Str(Vec<u8>),
}

/// The arguments after `(` up to and including `)`, and their length.
fn parse_args(text: &[u8]) -> Option<(Vec<Arg>, usize)> {
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        i += text[i..].iter().take_while(|b| b.is_ascii_whitespace()).count();
        match text.get(i)? {
            b')' if args.is_empty() => return Some((args, i + 1)),
            b'"' => {
                let mut end = i + 1;
                while *text.get(end)? != b'"' {
                    end += if text[end] == b'\\' { 2 } else { 1 };
                }
                args.push(Arg::Str(unescape(&text[i + 1..end]).ok()?));
                i = end + 1;
            }
            _ => {
                let len = text[i..].iter().take_while(|b| b.is_ascii_digit()).count();
                args.push(Arg::Int(std::str::from_utf8(&text[i..i + len]).ok()?.parse().ok()?));
                i += len;
            }
        }
        i += text[i..].iter().take_while(|b| b.is_ascii_whitespace()).count();
        match text.get(i)? {
            b',' => i += 1,
            b')' => return Some((args, i + 1)),
            _ => return None,
        }
    }
}

/// nmap's `transform_cpe`: the characters CPE 2.2 reserves as `%XX`,
/// spaces as `_`, everything else lower case.
fn cpe_escape(b: u8) -> Vec<u8> {
    match b {
        b' ' => vec![b'_'],
        _ if b":/?#[]@!$&'()*+,;=%<>\"".contains(&b) => format!("%{b:02X}").into_bytes(),
        _ => vec![b.to_ascii_lowercase()],
    }
}

/// nmap's port table (`nmap-services`, beside `nmap-service-probes`):
/// the TCP service name of each port it lists, for a port nothing
/// identified (nmap's `method="table"`).
#[derive(Debug, Default)]
pub struct PortTable {
    tcp: std::collections::HashMap<u16, String>,
}

impl PortTable {
    /// The table next to the probes file `probes`, if there is one.
    pub fn beside(probes: &Path) -> Option<PortTable> {
        let text = std::fs::read(probes.with_file_name("nmap-services")).ok()?;
        Some(Self::parse(&text))
    }

    /// Reads `name port/proto frequency ...` lines; anything else is
    /// skipped. Where a port is listed twice the first line wins.
    pub fn parse(text: &[u8]) -> PortTable {
        let mut tcp = std::collections::HashMap::new();
        for line in text.split(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(line);
            let mut words = line.split_whitespace();
            let (Some(name), Some(port)) = (words.next(), words.next()) else { continue };
            if name.starts_with('#') || name == "unknown" {
                continue;
            }
            let Some(port) = port.strip_suffix("/tcp").and_then(|p| p.parse::<u16>().ok()) else { continue };
            tcp.entry(port).or_insert_with(|| name.to_string());
        }
        PortTable { tcp }
    }

    pub fn name(&self, port: u16) -> Option<&str> {
        self.tcp.get(&port).map(String::as_str)
    }
}

impl fmt::Debug for NmapDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NmapDb")
            .field("probes", &self.probes.len())
            .field("matches", &self.probes.iter().map(|p| p.matches.len()).sum::<usize>())
            .field("uncompiled", &self.uncompiled)
            .field("excluded", &self.excluded)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Probe")
            .field("name", &self.name)
            .field("protocol", &self.protocol)
            .field("line", &self.line)
            .field("rarity", &self.rarity)
            .field("ports", &self.ports)
            .field("sslports", &self.sslports)
            .field("matches", &self.matches.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use proptest::prelude::*;

    use super::*;

    /// A hand-written probes file (not nmap's): every directive and form.
    const PROBES: &str = r#"# comment
Exclude T:9100-9102,U:53,T:9200
Probe TCP NULL q||
totalwaitms 6000
tcpwrappedms 3000
match ssh m|^SSH-([\d.]+)-OpenSSH_([\w._-]+)[ -]([^\r\n]*)\r?\n| p/OpenSSH/ v/$2 $3/ i/protocol $1/ o/Linux/ cpe:/a:openbsd:openssh:$2/ cpe:/o:linux:linux_kernel/a
softmatch ftp m|^220 ([-.\w]+) [-.\w ]*ftp|i h/$1/
match ftp m=^220 Tiny FTP (\d[\d.]*)\r\n= p|Tiny FTP| v/$1/ d/storage-misc/
unknowndirective whatever
Probe TCP GetRequest q|GET / HTTP/1.0\r\n\r\n|
rarity 1
ports 80,8000-8010
sslports 443
match http m|^HTTP/1\.[01] \d\d\d .*\r\nServer: nginx/([\d.]+)\r\n|s p/nginx/ v/$1/ cpe:/a:igor_sysoev:nginx:$1/
match ssl/http m|^HTTP/1\.1 400 .*plain HTTP request was sent to HTTPS port|s p/nginx/
Probe TCP Options q|OPTIONS / HTTP/1.0\r\n\r\n|
rarity 4
ports 80
fallback GetRequest
softmatch http m|^HTTP/1\.[01] \d\d\d |
Probe TCP Binary q|\0\x01\xfF\a\b\f\v\t\r\n\\\q|
rarity 8
sslports 80
match lookahead m|^bar(?=[^\n]*\bfoo\b)|i p/look/
match backref m|^(\w)\1x| p/twice $1/
match binary m|^\x00\x01(.{4})|s p/bin/ v/$I(1,">")/ i/$I(1,"<")/
match forms m|^T(.{4})(.*)$|s p/$P(1)/ v/$SUBST(2,"_",".")/ o/ Linux ,/ h/$9/ cpe:/a:acme:box:$SUBST(2,"_"," ")/
Probe UDP DNSStatusRequest q|\0\0\x10\0|
rarity 1
ports 53
match dns m|^\0\0\x90| p/dns/
"#;

    fn db() -> NmapDb {
        NmapDb::parse(PROBES.as_bytes()).expect("the test file parses")
    }

    fn line_of(needle: &str) -> usize {
        PROBES.lines().position(|l| l.contains(needle)).expect("needle in the test file") + 1
    }

    fn names(probes: &[&Probe]) -> Vec<String> {
        probes.iter().map(|p| p.name.clone()).collect()
    }

    fn hard(outcome: Outcome) -> Service {
        match outcome {
            Outcome::Hard(s) => s,
            other => panic!("expected a hard match, got {other:?}"),
        }
    }

    #[test]
    fn every_directive_is_parsed() {
        let db = db();
        assert_eq!((db.len(), db.uncompiled()), (5, 0));
        let null = db.probe("NULL").unwrap();
        assert!(null.is_null() && null.payload.is_empty());
        assert_eq!((null.total_wait, null.tcpwrapped_wait), (Duration::from_secs(6), Some(Duration::from_secs(3))));
        let get = db.probe("GetRequest").unwrap();
        assert_eq!((get.rarity, get.total_wait, get.line), (1, DEFAULT_TOTAL_WAIT, line_of("Probe TCP GetRequest")));
        assert_eq!((get.ports.as_slice(), get.sslports.as_slice()), (&[(80, 80), (8000, 8010)][..], &[(443, 443)][..]));
        assert_eq!(db.probe("Binary").unwrap().payload, b"\0\x01\xff\x07\x08\x0c\x0b\t\r\n\\q");
        assert!(db.probe("DNSStatusRequest").is_none(), "UDP probes are not looked up by name");
        assert!([9100, 9101, 9102, 9200].iter().all(|&p| db.excluded(p)));
        assert!(!db.excluded(9103) && !db.excluded(53), "U:53 is UDP's");
        assert!(db.is_ssl_port(443) && db.is_ssl_port(80) && !db.is_ssl_port(22));
        let index = |name: &str| db.probes.iter().position(|p| p.name == name).unwrap();
        assert_eq!(db.probe("Options").unwrap().chain, vec![index("Options"), index("GetRequest"), index("NULL")]);
        assert_eq!(db.probes[index("DNSStatusRequest")].chain, vec![index("DNSStatusRequest")], "no NULL for UDP");
        assert!(db.probe("Options").unwrap().detects("http") && !db.probe("GetRequest").unwrap().detects("ftp"));
        assert!(format!("{db:?}").contains("probes: 5"));
        fn shared<T: Send + Sync>(_: &T) {}
        shared(&db);
    }

    #[test]
    fn probes_come_in_nmaps_order() {
        let db = db();
        assert_eq!(names(&db.probes_for(80, false, 7)), ["NULL", "GetRequest", "Options"]);
        assert_eq!(names(&db.probes_for(80, false, 9)), ["NULL", "GetRequest", "Options", "Binary"]);
        assert_eq!(names(&db.probes_for(80, true, 7)), ["NULL", "Binary", "GetRequest", "Options"], "sslports first");
        assert_eq!(names(&db.probes_for(443, true, 0)), ["NULL", "GetRequest"], "listed ports ignore rarity");
        assert_eq!(names(&db.probes_for(22, false, 3)), ["NULL", "GetRequest"]);
        assert!(db.probes_for(9101, false, 9).is_empty(), "Exclude");
    }

    #[test]
    fn a_hard_match_fills_every_field() {
        let db = db();
        let s = hard(db.match_response(db.probe("NULL").unwrap(), b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", None));
        assert_eq!(
            (s.name.as_str(), s.product.as_str(), s.version.as_str()),
            ("ssh", "OpenSSH", "9.2p1 Debian-2+deb12u3")
        );
        assert_eq!((s.extra_info.as_str(), s.os_type.as_str()), ("protocol 2.0", "Linux"));
        assert_eq!(s.cpes, ["cpe:/a:openbsd:openssh:9.2p1", "cpe:/o:linux:linux_kernel"]);
        assert_eq!((s.confidence, s.method.as_str()), (HARD_CONFIDENCE, "probed"));
        assert_eq!(s.rule, format!("nmap:NULL:{}", line_of("match ssh")));
        assert!(s.tunnel.is_empty() && !s.verified);
    }

    #[test]
    fn every_template_form_is_filled() {
        let db = db();
        let binary = db.probe("Binary").unwrap();
        let s = hard(db.match_response(binary, b"\x00\x01\x00\x00\x01\x02tail", None));
        assert_eq!((s.product.as_str(), s.version.as_str(), s.extra_info.as_str()), ("bin", "258", "33619968"));
        let s = hard(db.match_response(binary, b"TAB\x01Cv1_2 Beta:X\n", None));
        assert_eq!((s.product.as_str(), s.version.as_str()), ("ABC", "v1.2 Beta:X"), "$P and $SUBST");
        assert_eq!(s.os_type, " Linux", "trailing spaces and commas are cut");
        assert_eq!(s.hostname, "", "a group that does not exist empties the field");
        assert_eq!(s.cpes, ["cpe:/a:acme:box:v1_2_beta%3Ax"], "CPE values are escaped and lower case");
        let tiny = hard(db.match_response(db.probe("NULL").unwrap(), b"220 Tiny FTP 1.2\r\n", None));
        assert_eq!((tiny.product.as_str(), tiny.version.as_str()), ("Tiny FTP", "1.2"), "m=..= and p|..|");
        assert_eq!(tiny.device_type, "storage-misc");
    }

    #[test]
    fn softmatches_narrow_what_counts() {
        let db = db();
        let null = db.probe("NULL").unwrap();
        let Outcome::Soft(s) = db.match_response(null, b"220 files.example.org FTP server ready\r\n", None) else {
            panic!("expected a softmatch");
        };
        assert_eq!((s.name.as_str(), s.hostname.as_str(), s.confidence), ("ftp", "files.example.org", SOFT_CONFIDENCE));
        assert_eq!((s.method.as_str(), s.rule), ("softmatch", format!("nmap:NULL:{}", line_of("softmatch ftp"))));
        // A hard match after a softmatch of the same response still wins.
        assert_eq!(hard(db.match_response(null, b"220 Tiny FTP 1.2\r\n", None)).product, "Tiny FTP");
        // Once soft-matched as ftp, an SSH banner is no news; ftp's hard match is.
        let ssh = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n";
        assert_eq!(db.match_response(null, ssh, Some("ftp")), Outcome::None);
        assert_eq!(hard(db.match_response(null, b"220 Tiny FTP 1.2\r\n", Some("ftp"))).name, "ftp");
        assert_eq!(db.match_response(null, b"220 files.example.org FTP\r\n", Some("ftp")), Outcome::None);
    }

    #[test]
    fn fallbacks_then_null_are_tried_in_order_and_ssl_prefixes_tunnel() {
        let db = db();
        let options = db.probe("Options").unwrap();
        let nginx = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n\r\n";
        let s = hard(db.match_response(options, nginx, None));
        assert_eq!((s.product.as_str(), s.version.as_str()), ("nginx", "1.22.1"));
        assert_eq!(s.rule, format!("nmap:GetRequest:{}", line_of("Server: nginx")), "the fallback's line");
        assert_eq!(hard(db.match_response(options, b"SSH-2.0-OpenSSH_9.2 x\n", None)).name, "ssh", "then NULL's");
        let Outcome::Soft(s) = db.match_response(options, b"HTTP/1.0 200 OK\r\nServer: other\r\n\r\n", None) else {
            panic!("expected Options' softmatch");
        };
        assert_eq!(s.rule, format!("nmap:Options:{}", line_of("softmatch http")));
        let tls = b"HTTP/1.1 400 Bad Request\r\n\r\nThe plain HTTP request was sent to HTTPS port";
        let s = hard(db.match_response(options, tls, None));
        assert_eq!((s.name.as_str(), s.tunnel.as_str()), ("http", "ssl"), "ssl/http is http in TLS");
        let udp = &db.probes[db.probes.iter().position(|p| p.protocol == Protocol::Udp).unwrap()];
        assert_eq!(db.match_response(udp, b"SSH-2.0-OpenSSH_9.2 x\n", None), Outcome::None, "UDP has no NULL");
        assert_eq!(hard(db.match_response(udp, b"\0\0\x90\0", None)).product, "dns");
    }

    #[test]
    fn pcre_features_and_binary_bytes_match() {
        let db = db();
        let binary = db.probe("Binary").unwrap();
        assert_eq!(hard(db.match_response(binary, b"BAR foo\n", None)).product, "look", "lookahead, caseless");
        assert_eq!(db.match_response(binary, b"bar food\n", None), Outcome::None);
        assert_eq!(hard(db.match_response(binary, b"aax", None)).product, "twice a", "back-reference");
        assert_eq!(db.match_response(binary, b"abx", None), Outcome::None);
        // A pattern with raw non-UTF-8 bytes, bare and after a backslash.
        let text = b"Probe TCP NULL q||\nmatch latin m|^caf\xe9 \\\xe9!\xff| p/latin/\n";
        let latin = NmapDb::parse(text).unwrap();
        let null = latin.probe("NULL").unwrap();
        assert_eq!(hard(latin.match_response(null, b"caf\xe9 \xe9!\xff", None)).product, "latin");
        assert_eq!(latin.match_response(null, b"cafe \xe9!\xff", None), Outcome::None);
    }

    #[test]
    fn malformed_lines_are_errors_naming_the_line() {
        let cases: [(&str, usize); 9] = [
            ("ports 80\n", 1),
            ("Probe TCP A q|a|\n\nports 80-x\n", 3),
            ("Probe TCP A q|a|\nrarity 12\n", 2),
            ("Probe TCP A q|abc\n", 1),
            ("Probe TCP A q|\\x4|\n", 1),
            ("Probe SCTP A q|a|\n", 1),
            ("Probe TCP A q|a|\nfallback Nope\n", 2),
            ("Probe TCP A q|a|\nmatch x m|a|z\n", 2),
            ("Exclude T:80,X:1\n", 1),
        ];
        for (text, line) in cases {
            match NmapDb::parse(text.as_bytes()) {
                Err(NmapError::Parse { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        let db = NmapDb::parse(b"Probe TCP A q|a|\nmatch x m/(unclosed/\nmatch y m/ok/\n").unwrap();
        assert_eq!((db.uncompiled(), db.probes[0].matches.len()), (1, 1), "a bad pattern is skipped and counted");
        let missing = NmapDb::load(Path::new("/nonexistent/nmap-service-probes")).unwrap_err();
        assert!(matches!(missing, NmapError::Read { .. }) && missing.to_string().contains("/nonexistent"));
    }

    #[test]
    fn literal_prefixes_are_only_what_every_match_starts_with() {
        let cases: [(&[u8], &[u8]); 12] = [
            (b"^SSH-([\\d.]+)", b"SSH-"),
            (b"^HTTP/1\\.[01]", b"HTTP/1."),
            (b"^\\x00\\x01\\0\\r\\n\\d", b"\0\x01\0\r\n"),
            (b"^\\0\\01", b"\0"),
            (b"^ab*", b"a"),
            (b"^ab?c", b"a"),
            (b"^ab{0,2}", b"a"),
            (b"^ab+", b"ab"),
            (b"^ab(c|d)[|]", b"ab"),
            (b"^ab|cd", b""),
            (b"ab", b""),
            (b"^a\\Q|", b""),
        ];
        for (pattern, prefix) in cases {
            assert_eq!(literal_prefix(pattern), prefix, "{:?}", String::from_utf8_lossy(pattern));
        }
    }

    proptest! {
        #[test]
        fn parsing_and_matching_never_panic(
            lines in prop::collection::vec("(Probe TCP A q|match x m|ports |fallback |Exclude )[ -~]{0,30}", 0..6),
            template in "[ -.0-~]{0,40}",
            response in prop::collection::vec(any::<u8>(), 0..48),
        ) {
            let _ = NmapDb::parse(lines.join("\n").as_bytes());
            let text = format!("Probe TCP NULL q||\nmatch x m|^(.)(.)?(.*)|s p/{template}/ cpe:/{template}/\n");
            let db = NmapDb::parse(text.as_bytes()).unwrap();
            let _ = db.match_response(db.probe("NULL").unwrap(), &response, None);
        }
    }

    #[test]
    fn the_port_table_names_tcp_ports() {
        let table = PortTable::parse(
            b"# comment\nssh\t22/tcp\t0.18\t# Secure Shell\nssh\t22/udp\t0.003\nunknown\t9/tcp\t0.1\n\
              http\t80/tcp\t0.48\nwww\t80/tcp\t0.1\nbad line\n",
        );
        assert_eq!(table.name(22), Some("ssh"));
        assert_eq!(table.name(80), Some("http"));
        assert_eq!(table.name(9), None);
        assert_eq!(table.name(23), None);
    }

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap_or("0");
        line.trim().trim_end_matches("kB").trim().parse().unwrap_or(0)
    }

    /// nmap's own file, where installed (never copied here: nmap's licence).
    #[test]
    fn the_installed_nmap_file_loads_and_identifies() {
        let path = Path::new(NmapDb::DEFAULT_PATH);
        if !path.exists() {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "CI needs nmap installed: {}", path.display());
            eprintln!("skipped: {} is not installed (apt-get install nmap)", path.display());
            return;
        }
        let (rss, start) = (rss_kib(), Instant::now());
        let db = NmapDb::load(path).unwrap();
        eprintln!("loaded {db:?} in {:?}, RSS +{} MiB", start.elapsed(), rss_kib().saturating_sub(rss) / 1024);
        assert!(db.len() > 100);
        assert_eq!(db.uncompiled(), 0, "{db:?}");
        let null = db.probe("NULL").unwrap();
        assert_eq!(names(&db.probes_for(22, false, 7))[0], "NULL");
        assert!(db.is_ssl_port(443) && db.excluded(9100));

        let ssh = hard(db.match_response(null, b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", None));
        assert_eq!((ssh.name.as_str(), ssh.product.as_str()), ("ssh", "OpenSSH"));
        assert!(ssh.version.starts_with("9.2p1") && ssh.cpes.contains(&"cpe:/a:openbsd:openssh:9.2p1".to_string()));
        let ftp = hard(db.match_response(null, b"220 (vsFTPd 3.0.3)\r\n", None));
        assert_eq!((ftp.name.as_str(), ftp.product.as_str(), ftp.version.as_str()), ("ftp", "vsftpd", "3.0.3"));

        let get = db.probe("GetRequest").unwrap();
        let nginx = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n\
                      Content-Type: text/html\r\nContent-Length: 615\r\n\r\n<!DOCTYPE html>\n<html><head>\
                      <title>Welcome to nginx!</title></head></html>\n";
        let http = hard(db.match_response(get, nginx, None));
        assert_eq!((http.name.as_str(), http.product.as_str(), http.version.as_str()), ("http", "nginx", "1.22.1"));
        let redis = b"-ERR wrong number of arguments for 'get' command\r\n";
        assert_eq!(hard(db.match_response(get, redis, None)).name, "redis");
        let info = b"$3716\r\n# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\nredis_mode:standalone\r\n";
        let redis = hard(db.match_response(db.probe("redis-server").unwrap(), info, None));
        assert_eq!((redis.name.as_str(), redis.version.as_str()), ("redis", "7.0.15"));

        // The cost of one response against every NULL match: the worst
        // case of a banner nothing knows.
        let unknown = b"hello from nowhere in particular\r\n".repeat(8);
        let start = Instant::now();
        let rounds = 20;
        for _ in 0..rounds {
            assert_eq!(db.match_response(null, &unknown, None), Outcome::None);
        }
        let matches = null.matches.len();
        eprintln!("{matches} NULL matches against {} bytes: {:?} each", unknown.len(), start.elapsed() / rounds);
    }
}
