//! portfleet's own service rules: the probes the agent sends to an open
//! port, the patterns that name a service from what comes back, and the
//! port-number guesses for ports nothing named.
//!
//! The rules live in `agent/rules/services.rules` (its header documents the
//! format), are compiled into the binary and parsed once, on first use. A
//! file that does not parse is a bug, caught by this module's tests.

use std::collections::{HashMap, HashSet};
use std::ops::RangeInclusive;
use std::sync::LazyLock;

use portfleet_core::Service;
use regex::bytes::{Captures, Regex, RegexBuilder};

/// The `on` source for what a server said first, with nothing sent.
pub const BANNER: &str = "banner";
/// The `on` source for the answer to the driver's own HTTP request
/// ([`super::http::request`]), plain or inside TLS.
pub const HTTP: &str = "http";

const SOURCE: &str = include_str!("../../rules/services.rules");

/// Most bytes a compiled pattern may take (the regex crate's size limit).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

static BUILTIN: LazyLock<Rules> =
    LazyLock::new(|| Rules::parse(SOURCE).unwrap_or_else(|e| panic!("agent/rules/services.rules: {e}")));

/// A parsed rule set.
#[derive(Debug)]
pub struct Rules {
    probes: Vec<Probe>,
    matches: Vec<Match>,
    guesses: Vec<(RangeInclusive<u16>, String)>,
}

/// Bytes to send to a port that did not speak first.
#[derive(Debug)]
pub struct Probe {
    /// The name rules refer to in `on`, and the driver passes to
    /// [`Rules::identify`] with the response.
    pub name: String,
    pub payload: Vec<u8>,
    /// The ports the probe suits (tried first there).
    pub ports: Vec<RangeInclusive<u16>>,
}

impl Probe {
    /// Whether `port` is one the probe suits.
    pub fn suits(&self, port: u16) -> bool {
        self.ports.iter().any(|range| range.contains(&port))
    }
}

/// A line of the rules file that is not right.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

#[derive(Debug)]
struct Match {
    name: String,
    /// Probe names, [`BANNER`], [`HTTP`] or `*`.
    on: Vec<String>,
    service: String,
    pattern: Regex,
    product: Option<String>,
    version: Option<String>,
    info: Option<String>,
    hostname: Option<String>,
    os: Option<String>,
    device: Option<String>,
    cpes: Vec<String>,
}

impl Match {
    fn reads(&self, source: &str) -> bool {
        self.on.iter().any(|on| on == source || on == "*")
    }

    fn apply(&self, response: &[u8]) -> Option<Service> {
        let captures = self.pattern.captures(response)?;
        let fill = |template: &Option<String>| template.as_deref().map(|t| expand(t, &captures)).unwrap_or_default();
        let cpes = self
            .cpes
            .iter()
            .map(|t| expand(t, &captures).trim_end_matches(':').to_string())
            .filter(|cpe| !cpe.is_empty())
            .collect();
        let service = Service {
            name: self.service.clone(),
            product: fill(&self.product),
            version: fill(&self.version),
            extra_info: fill(&self.info),
            hostname: fill(&self.hostname),
            os_type: fill(&self.os),
            device_type: fill(&self.device),
            cpes,
            confidence: 10,
            method: "probed".into(),
            rule: format!("builtin:{}", self.name),
            ..Service::default()
        };
        Some(service.bounded())
    }
}

impl Rules {
    /// The rules compiled into the agent.
    pub fn builtin() -> &'static Rules {
        &BUILTIN
    }

    /// The probes to send to `port` after the banner, HTTP and TLS attempts:
    /// those that suit `port` first, then the rest, each in file order.
    /// Send each on a fresh connection.
    pub fn probes_for(&self, port: u16) -> Vec<&Probe> {
        let (suited, rest): (Vec<&Probe>, Vec<&Probe>) = self.probes.iter().partition(|p| p.suits(port));
        suited.into_iter().chain(rest).collect()
    }

    /// The probes that suit `port` and have a rule naming `service`: asked
    /// to learn the version of a service something else already named
    /// (RabbitMQ answers an HTTP request with only its protocol header).
    pub fn refining_probes(&self, port: u16, service: &str) -> Vec<&Probe> {
        self.probes
            .iter()
            .filter(|p| p.suits(port))
            .filter(|p| self.matches.iter().any(|m| m.service == service && m.on.contains(&p.name)))
            .collect()
    }

    /// The probe called `name`.
    pub fn probe(&self, name: &str) -> Option<&Probe> {
        self.probes.iter().find(|p| p.name == name)
    }

    /// The service `response` identifies: the first rule `on` the source
    /// (`probe`, [`HTTP`], or None for the banner) or `*` that matches,
    /// then, for a probe's response, the first `banner` rule that matches.
    /// Confidence 10, method "probed", rule `builtin:<rule name>`; the
    /// banner, TLS, HTTP and tunnel fields are left to the driver.
    pub fn identify(&self, probe: Option<&str>, response: &[u8]) -> Option<Service> {
        let source = probe.unwrap_or(BANNER);
        let first = || self.matches.iter().filter(|m| m.reads(source)).find_map(|m| m.apply(response));
        let banner = || {
            if source == BANNER {
                return None;
            }
            self.matches.iter().filter(|m| m.on.iter().any(|on| on == BANNER)).find_map(|m| m.apply(response))
        };
        first().or_else(banner)
    }

    /// The service `port` usually has, from the port table.
    pub fn guess(&self, port: u16) -> Option<&str> {
        self.guesses.iter().find(|(ports, _)| ports.contains(&port)).map(|(_, name)| name.as_str())
    }

    /// Parses a rules file (the format is documented at the top of
    /// `agent/rules/services.rules`).
    pub fn parse(source: &str) -> Result<Rules, ParseError> {
        let mut parser = Parser::default();
        for (index, raw) in source.lines().enumerate() {
            parser.line(index + 1, raw)?;
        }
        parser.finish()
    }
}

/// Replaces `$1`..`$9` in `template` by the capture groups (lossy UTF-8),
/// then drops control characters, collapses blanks and trims blanks, `;`
/// and `,` from the ends.
fn expand(template: &str, captures: &Captures<'_>) -> String {
    let mut raw = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        let group = match (c, chars.peek().and_then(|d| d.to_digit(10))) {
            ('$', Some(group @ 1..=9)) => group as usize,
            _ => {
                raw.push(c);
                continue;
            }
        };
        chars.next();
        if let Some(m) = captures.get(group) {
            raw.push_str(&String::from_utf8_lossy(m.as_bytes()));
        }
    }
    let words: Vec<&str> = raw.split(|c: char| c.is_whitespace() || c.is_control()).filter(|w| !w.is_empty()).collect();
    words.join(" ").trim_matches(|c: char| c == ';' || c == ',' || c == ' ').to_string()
}

/// Which kind of record the attribute lines belong to.
#[derive(Debug)]
enum Record {
    None,
    Probe { line: usize, name: String, payload: Vec<u8>, ports: Option<Vec<RangeInclusive<u16>>> },
    Define { line: usize, name: String, pattern: Option<String> },
    Match { line: usize, name: String, attrs: HashMap<&'static str, String>, cpes: Vec<String> },
}

#[derive(Default)]
struct Parser {
    current: Option<Record>,
    defines: HashMap<String, String>,
    rules: RulesBuilder,
}

#[derive(Default)]
struct RulesBuilder {
    probes: Vec<Probe>,
    matches: Vec<(usize, Match)>,
    guesses: Vec<(RangeInclusive<u16>, String)>,
}

const MATCH_KEYS: [&str; 9] = ["on", "service", "pattern", "product", "version", "info", "hostname", "os", "device"];

fn err(line: usize, message: impl Into<String>) -> ParseError {
    ParseError { line, message: message.into() }
}

impl Parser {
    fn line(&mut self, line: usize, raw: &str) -> Result<(), ParseError> {
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            return Ok(());
        }
        let (key, value) = match trimmed.split_once(char::is_whitespace) {
            Some((key, value)) => (key, value.trim()),
            None => (trimmed, ""),
        };
        if raw.starts_with(char::is_whitespace) {
            return self.attribute(line, key, value);
        }
        self.close()?;
        match key {
            "probe" => {
                let name = record_name(line, value)?;
                self.current = Some(Record::Probe { line, name, payload: Vec::new(), ports: None });
            }
            "define" => {
                let name = record_name(line, value)?;
                self.current = Some(Record::Define { line, name, pattern: None });
            }
            "match" => {
                let name = record_name(line, value)?;
                self.current = Some(Record::Match { line, name, attrs: HashMap::new(), cpes: Vec::new() });
            }
            "guess" => {
                let mut words = value.split_whitespace();
                let (Some(ports), Some(name), None) = (words.next(), words.next(), words.next()) else {
                    return Err(err(line, "expected `guess PORTS NAME`"));
                };
                let ports = port_list(line, ports)?;
                let name = service_name(line, name)?;
                self.rules.guesses.extend(ports.into_iter().map(|range| (range, name.clone())));
                self.current = Some(Record::None);
            }
            other => return Err(err(line, format!("unknown record `{other}` (probe, define, match, guess)"))),
        }
        Ok(())
    }

    fn attribute(&mut self, line: usize, key: &str, value: &str) -> Result<(), ParseError> {
        if value.is_empty() {
            return Err(err(line, format!("`{key}` has no value")));
        }
        match &mut self.current {
            None | Some(Record::None) => Err(err(line, "an indented line outside a probe, define or match")),
            Some(Record::Probe { payload, ports, .. }) => match key {
                "send" => {
                    payload.extend(unescape(line, value)?);
                    Ok(())
                }
                "ports" if ports.is_none() => {
                    *ports = Some(port_list(line, value)?);
                    Ok(())
                }
                _ => Err(err(line, format!("unexpected `{key}` in a probe (send, ports once)"))),
            },
            Some(Record::Define { pattern, .. }) => match key {
                "pattern" if pattern.is_none() => {
                    *pattern = Some(expand_defines(line, value, &self.defines)?);
                    Ok(())
                }
                _ => Err(err(line, format!("unexpected `{key}` in a define (pattern once)"))),
            },
            Some(Record::Match { attrs, cpes, .. }) => {
                if key == "cpe" {
                    cpes.push(value.to_string());
                    return Ok(());
                }
                let Some(known) = MATCH_KEYS.iter().find(|k| **k == key) else {
                    return Err(err(line, format!("unknown key `{key}` in a match")));
                };
                if attrs.insert(*known, value.to_string()).is_some() {
                    return Err(err(line, format!("`{key}` given twice")));
                }
                Ok(())
            }
        }
    }

    /// Ends the current record, checking it is complete.
    fn close(&mut self) -> Result<(), ParseError> {
        match self.current.take() {
            None | Some(Record::None) => Ok(()),
            Some(Record::Probe { line, name, payload, ports }) => {
                if payload.is_empty() {
                    return Err(err(line, format!("probe {name} sends nothing")));
                }
                if [BANNER, HTTP, "*"].contains(&name.as_str()) {
                    return Err(err(line, format!("`{name}` is a reserved source name")));
                }
                if self.rules.probes.iter().any(|p| p.name == name) {
                    return Err(err(line, format!("probe {name} defined twice")));
                }
                self.rules.probes.push(Probe { name, payload, ports: ports.unwrap_or_default() });
                Ok(())
            }
            Some(Record::Define { line, name, pattern }) => {
                let pattern = pattern.ok_or_else(|| err(line, format!("define {name} has no pattern")))?;
                if self.defines.insert(name.clone(), pattern).is_some() {
                    return Err(err(line, format!("define {name} given twice")));
                }
                Ok(())
            }
            Some(Record::Match { line, name, mut attrs, cpes }) => {
                let mut required =
                    |key: &str| attrs.remove(key).ok_or_else(|| err(line, format!("match {name} has no `{key}`")));
                let on: Vec<String> = required("on")?.split_whitespace().map(str::to_string).collect();
                let service = service_name(line, &required("service")?)?;
                let pattern = expand_defines(line, &required("pattern")?, &self.defines)?;
                let pattern = RegexBuilder::new(&pattern)
                    .unicode(false)
                    .dot_matches_new_line(true)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| err(line, format!("match {name}: {e}")))?;
                let groups = pattern.captures_len() - 1;
                for template in attrs.values().chain(&cpes) {
                    if let Some(group) = highest_group(template).filter(|g| *g > groups) {
                        return Err(err(line, format!("match {name} uses ${group}, the pattern has {groups} groups")));
                    }
                }
                if self.rules.matches.iter().any(|(_, m)| m.name == name) {
                    return Err(err(line, format!("match {name} defined twice")));
                }
                let rule = Match {
                    name,
                    on,
                    service,
                    pattern,
                    product: attrs.remove("product"),
                    version: attrs.remove("version"),
                    info: attrs.remove("info"),
                    hostname: attrs.remove("hostname"),
                    os: attrs.remove("os"),
                    device: attrs.remove("device"),
                    cpes,
                };
                self.rules.matches.push((line, rule));
                Ok(())
            }
        }
    }

    fn finish(mut self) -> Result<Rules, ParseError> {
        self.close()?;
        let probes: HashSet<&str> = self.rules.probes.iter().map(|p| p.name.as_str()).collect();
        for (line, rule) in &self.rules.matches {
            if rule.on.is_empty() {
                return Err(err(*line, format!("match {} reads nothing", rule.name)));
            }
            if let Some(unknown) =
                rule.on.iter().find(|on| ![BANNER, HTTP, "*"].contains(&on.as_str()) && !probes.contains(on.as_str()))
            {
                return Err(err(*line, format!("match {} is on `{unknown}`, which is no probe", rule.name)));
            }
        }
        Ok(Rules {
            probes: self.rules.probes,
            matches: self.rules.matches.into_iter().map(|(_, m)| m).collect(),
            guesses: self.rules.guesses,
        })
    }
}

fn record_name(line: usize, value: &str) -> Result<String, ParseError> {
    let valid =
        !value.is_empty() && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if !valid {
        return Err(err(line, format!("`{value}` is no name (lowercase letters, digits, - _ .)")));
    }
    Ok(value.to_string())
}

fn service_name(line: usize, value: &str) -> Result<String, ParseError> {
    let valid = !value.is_empty() && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !valid {
        return Err(err(line, format!("`{value}` is no service name")));
    }
    Ok(value.to_string())
}

/// `443, 8443, 9000-9010`.
fn port_list(line: usize, value: &str) -> Result<Vec<RangeInclusive<u16>>, ParseError> {
    let port = |s: &str| s.trim().parse::<u16>().map_err(|_| err(line, format!("`{s}` is no port")));
    value
        .split(',')
        .map(|item| match item.split_once('-') {
            Some((low, high)) => {
                let (low, high) = (port(low)?, port(high)?);
                if low > high {
                    return Err(err(line, format!("`{item}` is an empty range")));
                }
                Ok(low..=high)
            }
            None => port(item).map(|p| p..=p),
        })
        .collect()
}

/// A payload: `\r \n \t \0 \\ \xHH` escapes, every other byte as is.
fn unescape(line: usize, value: &str) -> Result<Vec<u8>, ParseError> {
    let mut out = Vec::with_capacity(value.len());
    let mut bytes = value.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let byte = match bytes.next() {
            Some(b'r') => b'\r',
            Some(b'n') => b'\n',
            Some(b't') => b'\t',
            Some(b'0') => 0,
            Some(b'\\') => b'\\',
            Some(b'x') => {
                let hex = [bytes.next(), bytes.next()];
                let [Some(high), Some(low)] = hex else { return Err(err(line, "`\\x` needs two hex digits")) };
                let digits = [high, low];
                let text = std::str::from_utf8(&digits).map_err(|_| err(line, "`\\x` needs two hex digits"))?;
                u8::from_str_radix(text, 16).map_err(|_| err(line, format!("`\\x{text}` is not hex")))?
            }
            other => {
                return Err(err(line, format!("unknown escape `\\{}`", other.map(char::from).unwrap_or(' '))));
            }
        };
        out.push(byte);
    }
    Ok(out)
}

/// Replaces `%{NAME}` in a pattern by the define's pattern.
fn expand_defines(line: usize, pattern: &str, defines: &HashMap<String, String>) -> Result<String, ParseError> {
    let mut out = String::with_capacity(pattern.len());
    let mut rest = pattern;
    while let Some(start) = rest.find("%{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| err(line, "`%{` without `}`"))?;
        let name = &after[..end];
        let fragment = defines.get(name).ok_or_else(|| err(line, format!("no define `{name}` before this line")))?;
        out.push_str(fragment);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The highest `$N` a template uses.
fn highest_group(template: &str) -> Option<usize> {
    let bytes = template.as_bytes();
    bytes.windows(2).filter(|w| w[0] == b'$' && (b'1'..=b'9').contains(&w[1])).map(|w| usize::from(w[1] - b'0')).max()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identify(probe: Option<&str>, response: &[u8]) -> Service {
        Rules::builtin()
            .identify(probe, response)
            .unwrap_or_else(|| panic!("nothing matched {}", portfleet_core::service::escape_banner(response)))
    }

    /// (service, product, version) of what `response` identifies.
    fn named(probe: Option<&str>, response: &[u8]) -> (String, String, String) {
        let s = identify(probe, response);
        (s.name, s.product, s.version)
    }

    fn triple(name: &str, product: &str, version: &str) -> (String, String, String) {
        (name.into(), product.into(), version.into())
    }

    #[test]
    fn the_builtin_file_parses() {
        let rules = Rules::parse(SOURCE).unwrap_or_else(|e| panic!("services.rules {e}"));
        assert!(
            rules.probes.len() >= 12 && rules.matches.len() >= 60,
            "{} {}",
            rules.probes.len(),
            rules.matches.len()
        );
        // Every probe is sent somewhere and read by some rule.
        for probe in &rules.probes {
            assert!(!probe.ports.is_empty(), "{} suits no port", probe.name);
            assert!(rules.matches.iter().any(|m| m.on.contains(&probe.name)), "no rule reads {}", probe.name);
        }
    }

    #[test]
    fn probes_that_suit_the_port_come_first_then_the_rest_in_file_order() {
        let rules = Rules::builtin();
        let names = |port| rules.probes_for(port).iter().map(|p| p.name.as_str()).collect::<Vec<_>>();
        let all = names(1);
        assert_eq!(all.len(), rules.probes.len());
        assert_eq!(all[..3], ["tls-hello", "redis", "memcached"]);
        let pg = names(5432);
        assert_eq!(pg[..3], ["postgresql-ssl", "postgresql-startup", "tls-hello"]);
        assert_eq!(pg.len(), all.len());
        assert_eq!(names(6379)[0], "redis");
        assert_eq!(rules.probe("mqtt").unwrap().payload, b"\x10\x15\x00\x04MQTT\x04\x02\x00\x3c\x00\x09portfleet");
        assert!(rules.probe("nope").is_none());
    }

    #[test]
    fn probes_that_can_tell_a_version_are_found_by_port_and_service() {
        let rules = Rules::builtin();
        let names = |port, service| -> Vec<String> {
            rules.refining_probes(port, service).iter().map(|p| p.name.clone()).collect()
        };
        assert_eq!(names(5672, "amqp"), ["amqp"]);
        assert_eq!(names(6379, "redis"), ["redis"]);
        assert!(names(5672, "http").is_empty());
        assert!(names(9999, "amqp").is_empty());
    }

    #[test]
    fn port_guesses() {
        let rules = Rules::builtin();
        assert_eq!(rules.guess(22), Some("ssh"));
        assert_eq!(rules.guess(443), Some("https"));
        assert_eq!(rules.guess(5905), Some("vnc"));
        assert_eq!(rules.guess(27018), Some("mongodb"));
        assert_eq!(rules.guess(3268), Some("globalcatLDAP"));
        assert_eq!(rules.guess(1), None);
    }

    #[test]
    fn the_tls_hello_is_a_well_formed_client_hello() {
        let hello = &Rules::builtin().probe("tls-hello").unwrap().payload;
        assert_eq!(hello.len(), 188);
        assert_eq!(usize::from(hello[3]) << 8 | usize::from(hello[4]), hello.len() - 5);
        assert_eq!(usize::from(hello[7]) << 8 | usize::from(hello[8]), hello.len() - 9);
        let extensions_at = 5 + 4 + 2 + 32 + 1 + 2 + 36 + 2;
        assert_eq!(
            usize::from(hello[extensions_at]) << 8 | usize::from(hello[extensions_at + 1]),
            hello.len() - extensions_at - 2
        );
    }

    #[test]
    fn other_probes_have_their_declared_lengths() {
        let rules = Rules::builtin();
        let payload = |name| &rules.probe(name).unwrap().payload;
        let smb = payload("smb");
        assert_eq!(smb.len(), 4 + 0x6c);
        // The SMB2 header is 64 bytes: NEGOTIATE's StructureSize 36 follows it.
        assert_eq!((&smb[4..8], &smb[4 + 64..4 + 66]), (&b"\xfeSMB"[..], &b"\x24\x00"[..]));
        assert_eq!(&smb[4 + 32..4 + 36], b"\xff\xfe\x00\x00", "process id");
        assert_eq!(&smb[smb.len() - 8..], b"\x02\x02\x10\x02\x00\x03\x02\x03", "dialects");
        assert_eq!(payload("mongodb").len(), 0x3a);
        assert_eq!(payload("dns").len(), 2 + 0x1e);
        assert_eq!(payload("postgresql-startup").len(), 0x2b);
        assert_eq!(payload("rdp").len(), 0x13);
        assert_eq!(payload("ldap").len(), 2 + 0x0c);
    }

    // Banners captured from real servers on 127.0.0.1.

    #[test]
    fn ssh() {
        // openssh-server 1:9.2p1-2+deb12u10 (Debian 12)
        let s = identify(None, b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10\r\n");
        assert_eq!((s.name.as_str(), s.product.as_str(), s.version.as_str()), ("ssh", "OpenSSH", "9.2p1"));
        assert_eq!(s.extra_info, "Debian 2+deb12u10; protocol 2.0");
        assert_eq!(s.os_type, "Linux");
        assert_eq!(s.cpes, ["cpe:/a:openbsd:openssh:9.2p1", "cpe:/o:linux:linux_kernel"]);
        assert_eq!((s.confidence, s.method.as_str(), s.rule.as_str()), (10, "probed", "builtin:openssh-debian"));
        let s = identify(None, b"SSH-2.0-OpenSSH_8.9\r\n");
        assert_eq!((s.version.as_str(), s.extra_info.as_str()), ("8.9", "protocol 2.0"));
        assert_eq!(named(None, b"SSH-2.0-dropbear_2022.83\r\n"), triple("ssh", "Dropbear sshd", "2022.83"));
        assert_eq!(named(None, b"SSH-1.99-Cisco-1.25\r\n"), triple("ssh", "Cisco-1.25", ""));
    }

    #[test]
    fn ftp() {
        // vsftpd 3.0.3 (Debian 12), anonymous on and off.
        assert_eq!(named(None, b"220 (vsFTPd 3.0.3)\r\n"), triple("ftp", "vsftpd", "3.0.3"));
        let oops = identify(None, b"500 OOPS: vsftpd: both local and anonymous access disabled!\r\n");
        assert_eq!(
            (oops.product.as_str(), oops.extra_info.as_str()),
            ("vsftpd", "vsftpd: both local and anonymous access disabled!")
        );
        // The rest from the servers' documented greetings.
        let s = identify(None, b"220 ProFTPD Server (Debian) [::ffff:192.0.2.7]\r\n");
        assert_eq!((s.product.as_str(), s.extra_info.as_str()), ("ProFTPD", "Debian"));
        assert_eq!(
            named(None, b"220 ProFTPD 1.3.5e Server (ProFTPD Default Installation) [192.0.2.7]\r\n"),
            triple("ftp", "ProFTPD", "1.3.5e")
        );
        assert_eq!(
            named(None, b"220---------- Welcome to Pure-FTPd [privsep] [TLS] ----------\r\n220-You are user number 1 of 50 allowed.\r\n"),
            triple("ftp", "Pure-FTPd", "")
        );
        assert_eq!(
            named(None, b"220-FileZilla Server 1.8.1\r\n220 Please visit https://filezilla-project.org/\r\n"),
            triple("ftp", "FileZilla ftpd", "1.8.1")
        );
        assert_eq!(named(None, b"220 Microsoft FTP Service\r\n"), triple("ftp", "Microsoft ftpd", ""));
        assert_eq!(named(None, b"220 storage FTP server ready.\r\n"), triple("ftp", "", ""));
        assert_eq!(identify(None, b"220 Welcome\r\n").rule, "builtin:ftp-220");
    }

    #[test]
    fn smtp() {
        let s = identify(None, b"220 mail.example.org ESMTP Postfix (Debian/GNU)\r\n");
        assert_eq!(
            (s.name.as_str(), s.product.as_str(), s.hostname.as_str(), s.extra_info.as_str()),
            ("smtp", "Postfix smtpd", "mail.example.org", "Debian/GNU")
        );
        let s = identify(None, b"220 mx.example.net ESMTP Exim 4.96 Tue, 02 Dec 2025 10:11:12 +0000\r\n");
        assert_eq!(
            (s.product.as_str(), s.version.as_str(), s.hostname.as_str()),
            ("Exim smtpd", "4.96", "mx.example.net")
        );
        assert_eq!(s.cpes, ["cpe:/a:exim:exim:4.96"]);
        let s = identify(None, b"220 relay.example.com ESMTP ready\r\n");
        assert_eq!(
            (s.name.as_str(), s.hostname.as_str(), s.rule.as_str()),
            ("smtp", "relay.example.com", "builtin:smtp")
        );
        assert_eq!(
            named(None, b"220-smtp.example.com ESMTP Sendmail 8.17.1.9/8.17.1.9; Tue, 2 Dec 2025\r\n"),
            triple("smtp", "Sendmail", "8.17.1.9")
        );
    }

    #[test]
    fn imap_and_pop3() {
        let dovecot = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN] Dovecot (Debian) ready.\r\n";
        let s = identify(None, dovecot);
        assert_eq!((s.name.as_str(), s.product.as_str(), s.extra_info.as_str()), ("imap", "Dovecot imapd", "Debian"));
        assert_eq!(
            named(None, b"* OK [CAPABILITY IMAP4rev1 UIDPLUS] Courier-IMAP ready.\r\n"),
            triple("imap", "Courier imapd", "")
        );
        assert_eq!(named(None, b"* OK IMAP4rev1 Service Ready\r\n"), triple("imap", "", ""));
        let s = identify(None, b"+OK Dovecot (Ubuntu) ready.\r\n");
        assert_eq!((s.name.as_str(), s.product.as_str(), s.extra_info.as_str()), ("pop3", "Dovecot pop3d", "Ubuntu"));
        assert_eq!(named(None, b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n"), triple("pop3", "", ""));
    }

    #[test]
    fn redis() {
        // redis-server 7.0.15 (Debian 12): the redis probe's answer, in full.
        let info =
            b"+PONG\r\n$580\r\n# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\nredis_git_dirty:0\r\n\
redis_build_id:ae4d7c971a948f0\r\nredis_mode:standalone\r\nos:Linux 6.18.44-fc-v1045 x86_64\r\narch_bits:64\r\n\
monotonic_clock:POSIX clock_gettime\r\nmultiplexing_api:epoll\r\natomicvar_api:c11-builtin\r\ngcc_version:12.2.0\r\n\
process_id:21874\r\nprocess_supervised:no\r\nrun_id:d1c5ad1a4ffc6721d59f92a02a52a65bb028bcb4\r\ntcp_port:16379\r\n";
        let s = identify(Some("redis"), info);
        assert_eq!(
            (s.name.as_str(), s.product.as_str(), s.version.as_str(), s.os_type.as_str()),
            ("redis", "Redis key-value store", "7.0.15", "Linux")
        );
        assert_eq!(s.cpes, ["cpe:/a:redis:redis:7.0.15"]);
        // Only the first segment read.
        assert_eq!(named(Some("redis"), b"+PONG\r\n"), triple("redis", "Redis key-value store", ""));
        // With requirepass set.
        let s = identify(Some("redis"), b"-NOAUTH Authentication required.\r\n-NOAUTH Authentication required.\r\n");
        assert_eq!((s.name.as_str(), s.extra_info.as_str()), ("redis", "authentication required"));
        let protected =
            b"-DENIED Redis is running in protected mode because protected mode is enabled and no password is set\r\n";
        assert_eq!(identify(Some("redis"), protected).extra_info, "protected mode");
        // Valkey reports both versions; its own wins.
        let valkey =
            b"+PONG\r\n$100\r\n# Server\r\nredis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:8.0.1\r\n";
        assert_eq!(named(Some("redis"), valkey), triple("redis", "Valkey", "8.0.1"));
        // Redis 7.0.15 answering memcached's probe.
        assert_eq!(
            named(Some("memcached"), b"-ERR unknown command 'version', with args beginning with: \r\n").0,
            "redis"
        );
    }

    #[test]
    fn memcached() {
        // memcached 1.6.18 (Debian 12).
        let s = identify(Some("memcached"), b"VERSION 1.6.18\r\n");
        assert_eq!((s.name.as_str(), s.product.as_str(), s.version.as_str()), ("memcached", "memcached", "1.6.18"));
        assert_eq!(s.cpes, ["cpe:/a:memcached:memcached:1.6.18"]);
        // memcached answering the redis probe says nothing identifying.
        assert_eq!(Rules::builtin().identify(Some("redis"), b"ERROR\r\nERROR\r\n"), None);
    }

    #[test]
    fn postgresql() {
        // PostgreSQL 15 (Debian 12) on 127.0.0.1:5432.
        let s = identify(Some("postgresql-ssl"), b"S");
        assert_eq!((s.name.as_str(), s.extra_info.as_str()), ("postgresql", "TLS offered"));
        assert_eq!(identify(Some("postgresql-ssl"), b"N").extra_info, "no TLS");
        assert_eq!(
            Rules::builtin().identify(Some("postgresql-ssl"), b"SSH-2.0-x\r\n").map(|s| s.name),
            Some("ssh".into())
        );
        assert_eq!(Rules::builtin().identify(Some("postgresql-ssl"), b"Sx"), None);
        let startup = b"R\x00\x00\x00\x08\x00\x00\x00\x00E\x00\x00\x00eSFATAL\x00VFATAL\x00C28000\x00Mrole \"portfleet\" does not exist\x00Fmiscinit.c\x00L768\x00RInitializeSessionUserId\x00\x00";
        assert_eq!(identify(Some("postgresql-startup"), startup).rule, "builtin:postgresql-error");
        let hba =
            b"E\x00\x00\x00\x8bSFATAL\x00VFATAL\x00C28000\x00Mno pg_hba.conf entry for host \"192.0.2.7\"\x00\x00";
        assert_eq!(identify(Some("postgresql-startup"), hba).name, "postgresql");
        // SCRAM: AuthenticationSASL (10) with its mechanisms.
        let sasl = b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00";
        assert_eq!(identify(Some("postgresql-startup"), sasl).rule, "builtin:postgresql-auth");
    }

    #[test]
    fn rabbitmq_and_amqp() {
        // RabbitMQ 3.10.8 on 127.0.0.1:5672: Connection.Start.
        let start = b"\x01\x00\x00\x00\x00\x01\xf0\x00\n\x00\n\x00\t\x00\x00\x01\xcb\x0ccapabilitiesF\x00\x00\x00\xc7\
\x12publisher_confirmst\x01\x1aexchange_exchange_bindingst\x01\nbasic.nackt\x01\x16consumer_cancel_notifyt\x01\
\x12connection.blockedt\x01\x13consumer_prioritiest\x01\x1cauthentication_failure_closet\x01\x10per_consumer_qost\x01\
\x0fdirect_reply_tot\x01\x0ccluster_nameS\x00\x00\x00\trabbit@vm\tcopyrightS\x00\x00\x007Copyright (c) 2007-2022 VMware, Inc. or its affiliates.\
\x0binformationS\x00\x00\x009Licensed under the MPL 2.0. Website: https://rabbitmq.com\x08platformS\x00\x00\x00\x11Erlang/OTP 25.2.3\
\x07productS\x00\x00\x00\x08RabbitMQ\x07versionS\x00\x00\x00\x063.10.8\x00\x00\x00\x0ePLAIN AMQPLAIN\x00\x00\x00\x05en_US\xce";
        let s = identify(Some("amqp"), start);
        assert_eq!(
            (s.name.as_str(), s.product.as_str(), s.version.as_str(), s.extra_info.as_str()),
            ("amqp", "RabbitMQ", "3.10.8", "AMQP 0-9-1")
        );
        // Another broker's Connection.Start.
        let other = b"\x01\x00\x00\x00\x00\x00\x40\x00\x0a\x00\x0a\x00\x09\x00\x00\x00\x30\x07productS\x00\x00\x00\x06Broker\x07versionS\x00\x00\x00\x031.2\xce";
        assert_eq!(named(Some("amqp"), other), triple("amqp", "Broker", "1.2"));
        // RabbitMQ answering anything else (an HTTP request, another protocol header).
        assert_eq!(identify(Some(HTTP), b"AMQP\x00\x00\x09\x01").extra_info, "AMQP 0-9-1");
        assert_eq!(identify(Some("redis"), b"AMQP\x00\x00\x09\x01").name, "amqp");
        assert_eq!(identify(Some("amqp"), b"AMQP\x03\x01\x00\x00").extra_info, "AMQP 1.0");
    }

    #[test]
    fn mqtt() {
        // mosquitto 2.0.11: anonymous allowed, then refused.
        let s = identify(Some("mqtt"), b" \x02\x00\x00");
        assert_eq!((s.name.as_str(), s.extra_info.as_str()), ("mqtt", "anonymous connection accepted"));
        assert_eq!(identify(Some("mqtt"), b" \x02\x00\x05").extra_info, "not authorized");
        assert_eq!(identify(Some("mqtt"), b" \x02\x01\x02").rule, "builtin:mqtt");
    }

    #[test]
    fn http_servers() {
        // nginx-light 1.22.1 (Debian 12), to the agent's request and to the TLS hello.
        let ok = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 07:57:35 GMT\r\nContent-Type: text/html\r\n\
Content-Length: 615\r\n\r\n<!DOCTYPE html>\n<html>\n<head>\n<title>Welcome to nginx!</title>\n";
        let s = identify(Some(HTTP), ok);
        assert_eq!((s.name.as_str(), s.product.as_str(), s.version.as_str()), ("http", "nginx", "1.22.1"));
        assert_eq!(s.cpes, ["cpe:/a:nginx:nginx:1.22.1"]);
        let bad = b"HTTP/1.1 400 Bad Request\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 07:57:41 GMT\r\n\
Content-Type: text/html\r\nContent-Length: 157\r\nConnection: close\r\n\r\n<html>\r\n<head><title>400 Bad Request</title></head>";
        assert_eq!(named(Some("tls-hello"), bad), triple("http", "nginx", "1.22.1"));
        // A version-less Server header leaves no dangling CPE colon.
        assert_eq!(identify(Some(HTTP), b"HTTP/1.1 200 OK\r\nserver: nginx\r\n\r\n").cpes, ["cpe:/a:nginx:nginx"]);
        let s = identify(Some(HTTP), b"HTTP/1.1 200 OK\r\nDate: x\r\nServer: Apache/2.4.62 (Debian)\r\n\r\n");
        assert_eq!(
            (s.product.as_str(), s.version.as_str(), s.extra_info.as_str()),
            ("Apache httpd", "2.4.62", "Debian")
        );
        assert_eq!(
            named(Some(HTTP), b"HTTP/1.1 404 Not Found\r\nServer: Microsoft-IIS/10.0\r\n\r\n"),
            triple("http", "Microsoft IIS httpd", "10.0")
        );
        assert_eq!(
            named(Some(HTTP), b"HTTP/1.0 200 OK\nServer: SimpleHTTP/0.6 Python/3.11.2\n\n").1,
            "Python http.server"
        );
        assert_eq!(
            named(Some(HTTP), b"HTTP/1.1 200 OK\r\nServer: cloudflare\r\n\r\n"),
            triple("http", "cloudflare", "")
        );
        assert_eq!(named(Some(HTTP), b"HTTP/1.1 302 Found\r\nLocation: /\r\n\r\n"), triple("http", "", ""));
        // A Server line in the body is not a header.
        assert_eq!(named(Some(HTTP), b"HTTP/1.1 200 OK\r\nX: y\r\n\r\nServer: nginx/1.0\r\n"), triple("http", "", ""));
        // An HTTP answer as the banner or to a binary probe.
        assert_eq!(named(None, b"HTTP/1.0 408 Request Timeout\r\n\r\n").0, "http");
        assert_eq!(
            named(Some("smb"), b"HTTP/1.1 400 Bad Request\r\nServer: lighttpd/1.4.69\r\n\r\n"),
            triple("http", "lighttpd", "1.4.69")
        );
    }

    #[test]
    fn tls() {
        // openssl s_server (OpenSSL 3.0) answering the tls-hello probe: TLS 1.3
        // (legacy version 1.2 in the ServerHello), TLS 1.2 only, TLS 1.0 only,
        // and refusing every suite offered.
        let tls13 = b"\x16\x03\x03\x00Z\x02\x00\x00V\x03\x03p?\xfd;H";
        let s = identify(Some("tls-hello"), tls13);
        assert_eq!((s.name.as_str(), s.extra_info.as_str(), s.rule.as_str()), ("ssl", "", "builtin:tls"));
        assert_eq!(
            identify(Some("tls-hello"), b"\x16\x03\x03\x00Y\x02\x00\x00U\x03\x03\"\x9e%s\x91").rule,
            "builtin:tls"
        );
        assert_eq!(
            identify(Some("tls-hello"), b"\x16\x03\x01\x00Y\x02\x00\x00U\x03\x01\x7f7=V\x1c").extra_info,
            "TLSv1.0"
        );
        assert_eq!(identify(Some("tls-hello"), b"\x15\x03\x03\x00\x02\x02(").rule, "builtin:tls-alert");
        // Not a ServerHello: a ClientHello echoed back.
        let echo = &Rules::builtin().probe("tls-hello").unwrap().payload;
        assert_eq!(Rules::builtin().identify(Some("tls-hello"), echo), None);
    }

    // From the protocol specifications (no such server on this machine).

    /// A MySQL protocol-10 handshake packet carrying `version`.
    fn mysql_greeting(version: &str) -> Vec<u8> {
        let mut body = vec![0x0a];
        body.extend(version.as_bytes());
        body.push(0);
        body.extend([0x2a, 0, 0, 0]); // connection id
        body.extend(b"abcdefgh\x00"); // auth-plugin-data part 1, filler
        body.extend([0xff, 0xf7, 0x2d, 0x02, 0x00, 0xff, 0x81, 0x15]); // capabilities, charset, status
        body.extend([0; 10]);
        body.extend(b"ijklmnopqrst\x00caching_sha2_password\x00");
        let len = body.len().to_le_bytes();
        [&[len[0], len[1], len[2], 0][..], &body].concat()
    }

    #[test]
    fn mysql_and_mariadb() {
        let s = identify(None, &mysql_greeting("8.0.36-0ubuntu0.22.04.1"));
        assert_eq!((s.name.as_str(), s.product.as_str(), s.version.as_str()), ("mysql", "MySQL", "8.0.36"));
        assert_eq!(
            named(None, &mysql_greeting("5.5.5-10.11.6-MariaDB-0+deb12u1")),
            triple("mysql", "MariaDB", "10.11.6")
        );
        assert_eq!(named(None, &mysql_greeting("11.4.2-MariaDB")), triple("mysql", "MariaDB", "11.4.2"));
        let refused = b"\x45\x00\x00\x00\xff\x6a\x04Host '192.0.2.7' is not allowed to connect to this MariaDB server";
        let s = identify(None, refused);
        assert_eq!((s.name.as_str(), s.product.as_str(), s.extra_info.as_str()), ("mysql", "MariaDB", "unauthorized"));
        let busy = b"\x17\x00\x00\x00\xff\x10\x04Too many connections";
        assert_eq!(identify(None, busy).rule, "builtin:mysql-error");
    }

    #[test]
    fn mongodb() {
        // OP_REPLY to request id "pf\0\1" holding {ismaster: true, maxWireVersion: 21, ok: 1.0}.
        let doc =
            b"\x08ismaster\x00\x01\x10maxWireVersion\x00\x15\x00\x00\x00\x01ok\x00\x00\x00\x00\x00\x00\x00\xf0\x3f\x00";
        let mut doc = [&((doc.len() + 4) as u32).to_le_bytes()[..], doc].concat();
        let mut reply = Vec::new();
        reply.extend(((16 + 20 + doc.len()) as u32).to_le_bytes());
        reply.extend(b"\x07\x00\x00\x00pf\x00\x01\x01\x00\x00\x00"); // request id, response to, OP_REPLY
        reply.extend([8, 0, 0, 0]); // AwaitCapable
        reply.extend([0; 12]); // cursor id, starting from
        reply.extend([1, 0, 0, 0]);
        reply.append(&mut doc);
        assert_eq!(named(Some("mongodb"), &reply), triple("mongodb", "MongoDB", ""));
        assert_eq!(identify(Some("mongodb"), &reply).rule, "builtin:mongodb");
        // A reply to someone else's request is no answer to ours.
        reply[8] = b'x';
        assert_eq!(Rules::builtin().identify(Some("mongodb"), &reply), None);
    }

    #[test]
    fn ldap() {
        // bindResponse success, short and long (Active Directory) lengths.
        assert_eq!(named(Some("ldap"), b"\x30\x0c\x02\x01\x01\x61\x07\x0a\x01\x00\x04\x00\x04\x00").0, "ldap");
        let long = b"\x30\x84\x00\x00\x00\x10\x02\x01\x01\x61\x84\x00\x00\x00\x07\x0a\x01\x00\x04\x00\x04\x00";
        assert_eq!(named(Some("ldap"), long).0, "ldap");
    }

    #[test]
    fn telnet_vnc_nats_rsync() {
        assert_eq!(named(None, b"\xff\xfd\x18\xff\xfd\x20\xff\xfd\x23\xff\xfd\x27").0, "telnet");
        assert_eq!(named(None, b"\xff\xfb\x01\xff\xfb\x03login: ").0, "telnet");
        let s = identify(None, b"RFB 003.008\n");
        assert_eq!((s.name.as_str(), s.extra_info.as_str()), ("vnc", "protocol 003.008"));
        let nats = br#"INFO {"server_id":"NDJ4WGOXM6QZ","server_name":"n1","version":"2.10.22","proto":1,"go":"go1.22.8","host":"0.0.0.0","port":4222,"headers":true,"max_payload":1048576}"#;
        assert_eq!(named(None, &[&nats[..], b"\r\n"].concat()), triple("nats", "NATS server", "2.10.22"));
        assert_eq!(identify(None, b"@RSYNCD: 31.0\n").extra_info, "protocol 31.0");
    }

    #[test]
    fn rdp() {
        // X.224 Connection Confirm with RDP_NEG_RSP choosing CredSSP, TLS, and a bare confirm.
        let nla = b"\x03\x00\x00\x13\x0e\xd0\x00\x00\x12\x34\x00\x02\x1f\x08\x00\x02\x00\x00\x00";
        let s = identify(Some("rdp"), nla);
        assert_eq!((s.name.as_str(), s.extra_info.as_str()), ("ms-wbt-server", "security: CredSSP (NLA)"));
        let tls = b"\x03\x00\x00\x13\x0e\xd0\x00\x00\x12\x34\x00\x02\x00\x08\x00\x01\x00\x00\x00";
        assert_eq!(identify(Some("rdp"), tls).extra_info, "security: TLS");
        assert_eq!(identify(Some("rdp"), b"\x03\x00\x00\x0b\x06\xd0\x00\x00\x12\x34\x00").rule, "builtin:rdp");
    }

    #[test]
    fn smb() {
        let mut response = b"\x00\x00\x00\x86\xfeSMB\x40\x00".to_vec();
        response.extend([0; 58]); // the rest of the SMB2 header
        response.extend(b"\x41\x00\x01\x00\x10\x02"); // StructureSize 65, signing enabled, dialect 2.1
        response.extend([0; 58]);
        let s = identify(Some("smb"), &response);
        assert_eq!((s.name.as_str(), s.extra_info.as_str()), ("microsoft-ds", "SMB 2.1"));
        response[72..74].copy_from_slice(b"\x02\x03");
        assert_eq!(identify(Some("smb"), &response).extra_info, "SMB 3.0.2");
        assert_eq!(identify(Some("smb"), b"\x00\x00\x00\x55\xffSMBr\x00\x00\x00\x00").extra_info, "SMB1");
    }

    /// A DNS-over-TCP answer to the dns probe with one CHAOS TXT record.
    fn version_bind(txt: &str) -> Vec<u8> {
        let mut m = b"pf\x84\x00\x00\x01\x00\x01\x00\x00\x00\x00\x07version\x04bind\x00\x00\x10\x00\x03".to_vec();
        m.extend(b"\xc0\x0c\x00\x10\x00\x03\x00\x00\x00\x00");
        m.extend(((txt.len() + 1) as u16).to_be_bytes());
        m.push(txt.len() as u8);
        m.extend(txt.as_bytes());
        [&(m.len() as u16).to_be_bytes()[..], &m].concat()
    }

    #[test]
    fn dns() {
        let s = identify(Some("dns"), &version_bind("9.18.28-1~deb12u2-Debian"));
        assert_eq!((s.name.as_str(), s.product.as_str(), s.version.as_str()), ("domain", "ISC BIND", "9.18.28"));
        assert_eq!(named(Some("dns"), &version_bind("dnsmasq-2.89")), triple("domain", "dnsmasq", "2.89"));
        assert_eq!(named(Some("dns"), &version_bind("unbound 1.17.1")), triple("domain", "Unbound", "1.17.1"));
        assert_eq!(
            named(Some("dns"), &version_bind("PowerDNS Recursor 4.8.4")),
            triple("domain", "PowerDNS Recursor", "4.8.4")
        );
        assert_eq!(
            identify(Some("dns"), &version_bind("none of your business")).extra_info,
            "version.bind: none of your business"
        );
        // REFUSED, no answer.
        let refused = b"\x00\x1epf\x80\x05\x00\x01\x00\x00\x00\x00\x00\x00\x07version\x04bind\x00\x00\x10\x00\x03";
        assert_eq!(identify(Some("dns"), refused).rule, "builtin:dns");
        // Our own query echoed (QR clear) is not an answer.
        let query = &Rules::builtin().probe("dns").unwrap().payload;
        assert_eq!(Rules::builtin().identify(Some("dns"), query), None);
    }

    #[test]
    fn garbage_identifies_nothing() {
        let rules = Rules::builtin();
        let sources = [None, Some(HTTP)].into_iter().chain(rules.probes.iter().map(|p| Some(p.name.as_str())));
        for source in sources {
            for junk in [&b""[..], b"\x00", b"hello world\r\n", b"\xde\xad\xbe\xef\x00\x01\x02\x03", &[0xaa; 4096]] {
                assert_eq!(rules.identify(source, junk), None, "{source:?} {junk:?}");
            }
        }
    }

    #[test]
    fn templates_expand_groups_and_tidy_the_text() {
        let re = RegexBuilder::new(r"(a+)(x)?(b+)").unicode(false).build().unwrap();
        let caps = re.captures(b"aab").unwrap();
        assert_eq!(expand("$1-$3", &caps), "aa-b");
        assert_eq!(expand("  $2; v$3 \t", &caps), "vb");
        assert_eq!(expand("$$1 $0 $", &caps), "$aa $0 $");
        let caps = Regex::new(r"(?s-u)(.+)").unwrap().captures(b"\xff\x01z\n").unwrap();
        assert_eq!(expand("$1", &caps), "\u{fffd} z");
    }

    #[test]
    fn malformed_files_are_rejected_with_their_line() {
        let cases = [
            ("bogus x", 1, "unknown record"),
            ("probe p\n  send \\q", 2, "unknown escape"),
            ("probe p\n  send \\x4", 2, "two hex digits"),
            ("probe p\n  ports 1-0\n  send x", 2, "empty range"),
            ("probe p\n  ports 70000\n  send x", 2, "no port"),
            ("probe p", 1, "sends nothing"),
            ("probe banner\n  send x", 1, "reserved"),
            ("probe p\n  send x\nprobe p\n  send y", 3, "twice"),
            ("  send x", 1, "outside"),
            ("match m\n  on banner\n  service s", 1, "no `pattern`"),
            ("match m\n  on banner\n  service s\n  pattern (", 1, "match m"),
            ("match m\n  on nope\n  service s\n  pattern x", 1, "no probe"),
            ("match m\n  on banner\n  service s\n  pattern (x)\n  version $2", 1, "uses $2"),
            ("match m\n  on banner\n  service s\n  service t", 4, "twice"),
            ("match m\n  on banner\n  service s\n  colour red", 4, "unknown key"),
            ("match m\n  on banner\n  service s\n  pattern %{nope}", 1, "no define"),
            ("match M", 1, "no name"),
            ("guess 22", 1, "guess PORTS NAME"),
        ];
        for (text, line, message) in cases {
            let e = Rules::parse(text).expect_err(text);
            assert_eq!(e.line, line, "{text}: {e}");
            assert!(e.to_string().contains(message), "{text}: {e}");
        }
    }

    #[test]
    fn a_small_file_parses_as_documented() {
        let rules = Rules::parse(
            "# a comment\n\nprobe hello\n  # a comment inside\n  send HI\\r\\n\\x00\\\\\n  send !\n  ports 7, 10-12\n\
             define word\n  pattern \\w+\n\
             match greeting\n  on hello banner\n  service greeter\n  pattern \\AHELLO (%{word})/(\\d+)\n  product $1\n  version $2\n  cpe cpe:/a:x:$1:$2\n  cpe cpe:/a:y\n\
             guess 7 echo\n",
        )
        .unwrap();
        let probe = rules.probe("hello").unwrap();
        assert_eq!(probe.payload, b"HI\r\n\x00\\!");
        assert!(probe.suits(7) && probe.suits(11) && !probe.suits(8));
        let s = rules.identify(Some("hello"), b"HELLO world/3").unwrap();
        assert_eq!((s.name.as_str(), s.product.as_str(), s.version.as_str()), ("greeter", "world", "3"));
        assert_eq!(s.cpes, ["cpe:/a:x:world:3", "cpe:/a:y"]);
        assert_eq!(s.rule, "builtin:greeting");
        assert!(rules.identify(None, b"HELLO a/1").is_some());
        assert_eq!(rules.guess(7), Some("echo"));
    }
}
