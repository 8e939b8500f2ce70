//! What answers on an open port: the identification an agent attaches to a
//! result. One type on both sides: the agent fills it in, the controller
//! stores it (as JSON, beside the result), the tools print it.
//!
//! Field names follow naabu's `-sV` output (nmap's vocabulary: `name`,
//! `product`, `version`, `extra_info`, `os_type`, `device_type`, `cpes`,
//! `tunnel`, `confidence`, `method`) where naabu has one; `tls`, `http`,
//! `banner` and `rule` are ours.

use serde::{Deserialize, Serialize};

/// Longest banner kept, in bytes of the escaped text.
pub const MAX_BANNER: usize = 512;
/// Longest text field kept (titles, versions, certificate names).
pub const MAX_FIELD: usize = 256;
/// Most HTTP identifications per port (one per virtual host).
pub const MAX_HTTP: usize = 16;
/// Most CPEs and certificate names kept.
pub const MAX_LIST: usize = 32;

/// The identification of one open port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Service {
    /// nmap's service names where there is one ("ssh", "http", "https",
    /// "redis"); "unknown" when nothing matched, "tcpwrapped" when the
    /// server closed without a word.
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub product: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub extra_info: String,
    /// The host name the service announces (nmap's `h/`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub os_type: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub device_type: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cpes: Vec<String>,
    /// "ssl" when the service spoke inside TLS.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tunnel: String,
    /// 0-10, nmap's scale: 10 is a hard match, 3 a port-number guess.
    pub confidence: u8,
    /// How it was identified: "probed" (a rule matched a response),
    /// "softmatch", "table" (a guess from the port number).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub method: String,
    /// Which rule matched: "builtin:ssh", "nmap:GetRequest:http:42".
    #[serde(skip_serializing_if = "String::is_empty")]
    pub rule: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<Http>,
    /// The first bytes the server sent, printable ASCII with `\xHH`
    /// escapes, at most [`MAX_BANNER`] long.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub banner: String,
    /// The identification connection completed a TCP handshake. A SYN-open
    /// that no connection could reach is reported unverified.
    pub verified: bool,
}

/// What the TLS handshake showed. Recorded, never trusted: the agent
/// accepts any certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Tls {
    /// "TLSv1.3", "TLSv1.2".
    pub version: String,
    /// IANA name, e.g. "TLS13_AES_256_GCM_SHA384".
    pub cipher: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub alpn: String,
    /// The name sent as SNI, if any.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sni: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub subject_cn: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sans: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub issuer: String,
    /// Validity, seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    pub self_signed: bool,
    /// SHA-256 of the leaf certificate's DER, lowercase hex.
    pub sha256: String,
}

/// One HTTP response: one per virtual host the port was asked as.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Http {
    /// The endpoint: `https://app.example.com:8443`.
    pub url: String,
    pub status: u16,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub title: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub server: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub location: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub content_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_length: Option<u64>,
}

impl Service {
    /// An open port nothing identified, with what it said.
    pub fn unknown(banner: &[u8], verified: bool) -> Self {
        Self { name: "unknown".into(), banner: escape_banner(banner), verified, ..Self::default() }
    }

    /// Cuts every field to its bound and drops control characters, so a
    /// hostile server or a bad frame can neither make a stored row large
    /// nor put escape sequences on someone's terminal.
    pub fn bounded(mut self) -> Self {
        for s in [
            &mut self.name,
            &mut self.product,
            &mut self.version,
            &mut self.extra_info,
            &mut self.hostname,
            &mut self.os_type,
            &mut self.device_type,
            &mut self.tunnel,
            &mut self.method,
            &mut self.rule,
        ] {
            truncate(s, MAX_FIELD);
        }
        truncate(&mut self.banner, MAX_BANNER);
        self.confidence = self.confidence.min(10);
        self.cpes.truncate(MAX_LIST);
        self.cpes.iter_mut().for_each(|c| truncate(c, MAX_FIELD));
        if let Some(tls) = &mut self.tls {
            for s in
                [&mut tls.version, &mut tls.cipher, &mut tls.alpn, &mut tls.sni, &mut tls.subject_cn, &mut tls.issuer]
            {
                truncate(s, MAX_FIELD);
            }
            truncate(&mut tls.sha256, 64);
            tls.sans.truncate(MAX_LIST);
            tls.sans.iter_mut().for_each(|s| truncate(s, MAX_FIELD));
        }
        self.http.truncate(MAX_HTTP);
        for h in &mut self.http {
            for s in [&mut h.url, &mut h.title, &mut h.server, &mut h.location, &mut h.content_type] {
                truncate(s, MAX_FIELD);
            }
        }
        self
    }

    /// One line for a table: "ssh OpenSSH 9.2p1", "https nginx 1.22.1".
    pub fn summary(&self) -> String {
        let mut out = self.name.clone();
        for part in [&self.product, &self.version] {
            if !part.is_empty() {
                out.push(' ');
                out.push_str(part);
            }
        }
        if let Some(title) = self.http.iter().map(|h| h.title.as_str()).find(|t| !t.is_empty()) {
            out.push_str(&format!(" \"{title}\""));
        }
        if !self.verified {
            out.push_str(" (unverified)");
        }
        out
    }
}

/// Printable ASCII as is, everything else as `\xHH` (and `\\`), cut at
/// [`MAX_BANNER`] characters.
pub fn escape_banner(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        let piece = match b {
            b'\\' => "\\\\".to_string(),
            b'\r' => "\\r".to_string(),
            b'\n' => "\\n".to_string(),
            b'\t' => "\\t".to_string(),
            0x20..=0x7e => (b as char).to_string(),
            _ => format!("\\x{b:02x}"),
        };
        if out.len() + piece.len() > MAX_BANNER {
            break;
        }
        out.push_str(&piece);
    }
    out
}

/// Drops control characters from `s` and cuts it to at most `max` bytes
/// on a character boundary.
pub fn truncate(s: &mut String, max: usize) {
    if s.chars().any(char::is_control) {
        s.retain(|c| !c.is_control());
    }
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banners_are_escaped_and_bounded() {
        assert_eq!(escape_banner(b"SSH-2.0-OpenSSH_9.2\r\n"), "SSH-2.0-OpenSSH_9.2\\r\\n");
        assert_eq!(escape_banner(&[0, 0xff, b'a', b'\\']), "\\x00\\xffa\\\\");
        let long = escape_banner(&[0u8; 10_000]);
        assert!(long.len() <= MAX_BANNER && long.ends_with("\\x00"));
    }

    #[test]
    fn every_field_is_cut_to_its_bound_on_a_char_boundary() {
        let s = Service {
            name: "é".repeat(1000),
            cpes: vec!["x".into(); 100],
            http: vec![Http { title: "t".repeat(10_000), ..Http::default() }; 100],
            confidence: 99,
            ..Service::default()
        }
        .bounded();
        assert!(s.name.len() <= MAX_FIELD && s.name.chars().all(|c| c == 'é'));
        assert_eq!(s.cpes.len(), MAX_LIST);
        assert_eq!(s.http.len(), MAX_HTTP);
        assert_eq!(s.http[0].title.len(), MAX_FIELD);
        assert_eq!(s.confidence, 10);
        let s = Service { product: "evil\u{1b}[2J\r\nname".into(), ..Service::default() }.bounded();
        assert_eq!(s.product, "evil[2Jname");
    }

    #[test]
    fn json_round_trips_and_leaves_empty_fields_out() {
        let s = Service { name: "ssh".into(), product: "OpenSSH".into(), verified: true, ..Service::default() };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"{"name":"ssh","product":"OpenSSH","confidence":0,"verified":true}"#);
        assert_eq!(serde_json::from_str::<Service>(&json).unwrap(), s);
        assert_eq!(s.summary(), "ssh OpenSSH");
    }
}
