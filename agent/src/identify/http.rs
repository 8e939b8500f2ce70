//! HTTP for identification: the one request the agent sends to an open port
//! and a lenient parser for whatever comes back.
//!
//! The parser reads what a scanner meets, not what RFC 9112 promises:
//! missing CRs, headers cut off mid-line, bodies cut off by
//! [`MAX_RESPONSE`], bytes that are not UTF-8. It never panics, and every
//! field it returns is bounded by [`MAX_FIELD`].

use portfleet_core::service::{Http, MAX_FIELD, truncate};

/// Most bytes of a response the driver should read before parsing.
pub const MAX_RESPONSE: usize = 16 * 1024;

/// Most raw bytes of a `<title>` looked at (before entity decoding).
const MAX_RAW_TITLE: usize = 4 * MAX_FIELD;

/// A `GET /` for `host`, the value of the `Host` header as it should be
/// sent: `example.com`, `example.com:8080`, `[2001:db8::1]`. CR, LF and
/// other control characters in it are dropped so the request stays one
/// request.
pub fn request(host: &str) -> Vec<u8> {
    let host: String = host.chars().filter(|c| !c.is_control()).collect();
    format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: portfleet/{} (service identification)\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes()
}

/// The endpoint as a URL: `http://example.com`, `https://10.0.0.1:8443`,
/// `http://[2001:db8::1]:8080`. The scheme's default port (80 for http,
/// 443 for https) is left out; an IPv6 address is bracketed.
pub fn url(scheme: &str, host: &str, port: u16) -> String {
    let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_string() };
    let default = matches!((scheme, port), ("http", 80) | ("https", 443));
    if default { format!("{scheme}://{host}") } else { format!("{scheme}://{host}:{port}") }
}

/// The HTTP answer in `response` (the first bytes a server sent), or None
/// unless it starts with an HTTP/1.x status line. `url` is recorded as is.
pub fn parse(response: &[u8], url: String) -> Option<Http> {
    let mut lines = Lines { rest: response };
    let status = status(lines.next()?.line)?;
    let mut http = Http { url, status, ..Http::default() };

    let mut body: &[u8] = &[];
    while let Some(Line { line, terminated }) = lines.next() {
        if line.is_empty() && terminated {
            body = lines.rest;
            break;
        }
        if !terminated {
            // A header cut off by the read: its value may be cut too.
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let field = if name.eq_ignore_ascii_case(b"server") {
            &mut http.server
        } else if name.eq_ignore_ascii_case(b"location") {
            &mut http.location
        } else if name.eq_ignore_ascii_case(b"content-type") {
            &mut http.content_type
        } else {
            if name.eq_ignore_ascii_case(b"content-length") && http.content_length.is_none() {
                http.content_length = std::str::from_utf8(value).ok().and_then(|v| v.trim().parse().ok());
            }
            continue;
        };
        if field.is_empty() {
            *field = text(value);
        }
    }
    http.title = title(body).unwrap_or_default();
    Some(http)
}

/// One line of a response, without its `\n` or `\r\n`.
struct Line<'a> {
    line: &'a [u8],
    /// Whether a `\n` ended it (else the response ended first).
    terminated: bool,
}

struct Lines<'a> {
    rest: &'a [u8],
}

impl<'a> Lines<'a> {
    fn next(&mut self) -> Option<Line<'a>> {
        if self.rest.is_empty() {
            return None;
        }
        let (mut line, terminated) = match self.rest.iter().position(|&b| b == b'\n') {
            Some(end) => {
                let line = &self.rest[..end];
                self.rest = &self.rest[end + 1..];
                (line, true)
            }
            None => (std::mem::take(&mut self.rest), false),
        };
        if let [head @ .., b'\r'] = line {
            line = head;
        }
        Some(Line { line, terminated })
    }
}

/// The status code of an `HTTP/1.x NNN reason` line.
fn status(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let [minor, b' ', rest @ ..] = rest else { return None };
    if !minor.is_ascii_digit() {
        return None;
    }
    let rest = rest.trim_ascii_start();
    let code = rest.get(..3)?;
    if !code.iter().all(u8::is_ascii_digit) || rest.get(3).is_some_and(|b| !b.is_ascii_whitespace()) {
        return None;
    }
    code.iter().try_fold(0u16, |n, d| Some(n * 10 + u16::from(d - b'0')))
}

/// A header value as text: lossy UTF-8, control characters dropped,
/// trimmed and bounded.
fn text(value: &[u8]) -> String {
    let value = &value[..value.len().min(4 * MAX_FIELD)];
    let mut s: String = String::from_utf8_lossy(value).chars().filter(|c| !c.is_control()).collect();
    s = s.trim().to_string();
    truncate(&mut s, MAX_FIELD);
    s
}

/// The text of the first `<title>` in `body`, or None without one.
fn title(body: &[u8]) -> Option<String> {
    let open = find_ascii_ci(body, b"<title")?;
    let after_name = &body[open + b"<title".len()..];
    // `<title>` or `<title lang="en">`, not `<titlebar>`.
    if !after_name.first().is_some_and(|&b| b == b'>' || b.is_ascii_whitespace()) {
        return None;
    }
    let start = after_name.iter().position(|&b| b == b'>')? + 1;
    let inner = &after_name[start..];
    // A body cut off inside the title still gives what arrived.
    let end = find_ascii_ci(inner, b"</title").unwrap_or(inner.len());
    let raw = &inner[..end.min(MAX_RAW_TITLE)];
    let decoded = decode_entities(&String::from_utf8_lossy(raw));
    let mut collapsed = String::with_capacity(decoded.len());
    for word in decoded.split(|c: char| c.is_whitespace() || c.is_control()).filter(|w| !w.is_empty()) {
        if !collapsed.is_empty() {
            collapsed.push(' ');
        }
        collapsed.push_str(word);
    }
    truncate(&mut collapsed, MAX_FIELD);
    Some(collapsed)
}

/// Where `needle` (lowercase ASCII) first occurs in `haystack`, ignoring
/// ASCII case.
fn find_ascii_ci(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w.eq_ignore_ascii_case(needle))
}

/// Decodes `&amp; &lt; &gt; &quot; &apos; &nbsp;` and numeric references
/// (`&#39;`, `&#x27;`); anything else is left as written.
fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        // The longest reference decoded is `&#x10FFFF;`, 10 bytes.
        let semi = rest.char_indices().take(12).find(|&(_, c)| c == ';').map(|(i, _)| i);
        let decoded = semi.and_then(|semi| entity(&rest[1..semi]).map(|c| (c, semi)));
        match decoded {
            Some((c, semi)) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The character an entity name (between `&` and `;`) stands for.
fn entity(name: &str) -> Option<char> {
    let named = match name {
        "amp" => Some('&'),
        "lt" => Some('<'),
        "gt" => Some('>'),
        "quot" => Some('"'),
        "apos" => Some('\''),
        "nbsp" => Some(' '),
        _ => None,
    };
    if named.is_some() {
        return named;
    }
    let number = name.strip_prefix('#')?;
    let code = match number.strip_prefix(['x', 'X']) {
        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
        None => number.parse().ok()?,
    };
    // NUL and invalid code points become the replacement character, as
    // browsers do.
    Some(char::from_u32(code).filter(|&c| c != '\0').unwrap_or(char::REPLACEMENT_CHARACTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(response: &[u8]) -> Http {
        parse(response, "http://t".into()).expect("an HTTP response")
    }

    #[test]
    fn the_request_is_one_well_formed_get() {
        let req = String::from_utf8(request("example.com:8080")).unwrap();
        assert!(req.starts_with("GET / HTTP/1.1\r\nHost: example.com:8080\r\n"), "{req}");
        assert!(req.contains("\r\nUser-Agent: portfleet/"));
        assert!(req.contains("\r\nAccept: */*\r\n"));
        assert!(req.ends_with("\r\nConnection: close\r\n\r\n"));
        let injected = String::from_utf8(request("a\r\nX-Evil: 1")).unwrap();
        assert!(injected.contains("Host: aX-Evil: 1\r\n"), "{injected}");
    }

    #[test]
    fn urls_leave_out_default_ports_and_bracket_ipv6() {
        assert_eq!(url("http", "example.com", 80), "http://example.com");
        assert_eq!(url("https", "example.com", 443), "https://example.com");
        assert_eq!(url("http", "example.com", 443), "http://example.com:443");
        assert_eq!(url("https", "10.0.0.1", 8443), "https://10.0.0.1:8443");
        assert_eq!(url("http", "2001:db8::1", 8080), "http://[2001:db8::1]:8080");
        assert_eq!(url("https", "::1", 443), "https://[::1]");
        assert_eq!(url("http", "[::1]", 81), "http://[::1]:81");
    }

    #[test]
    fn a_real_nginx_response_is_read() {
        // Captured from nginx-light 1.22.1 on 127.0.0.1.
        let response = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 03 Dec 2025 08:00:00 GMT\r\n\
Content-Type: text/html\r\nContent-Length: 615\r\nLast-Modified: Mon, 01 Dec 2025 10:00:00 GMT\r\n\
Connection: close\r\nETag: \"6565a0e0-267\"\r\nAccept-Ranges: bytes\r\n\r\n<!DOCTYPE html>\n<html>\n<head>\n\
<title>Welcome to nginx!</title>\n<style>\nhtml { color-scheme: light dark; }\n";
        let http = parse(response, "http://127.0.0.1:8080".into()).unwrap();
        assert_eq!(
            http,
            Http {
                url: "http://127.0.0.1:8080".into(),
                status: 200,
                title: "Welcome to nginx!".into(),
                server: "nginx/1.22.1".into(),
                location: String::new(),
                content_type: "text/html".into(),
                content_length: Some(615),
            }
        );
    }

    #[test]
    fn only_http_1x_status_lines_are_http() {
        for not_http in [
            &b""[..],
            b"SSH-2.0-OpenSSH_9.2p1\r\n",
            b"HTTP/2 200\r\n\r\n",
            b"HTTP/1.1\r\n",
            b"HTTP/1.1 20\r\n",
            b"HTTP/1.1 2000 OK\r\n",
            b"HTTP/1.x 200 OK\r\n",
            b"http/1.1 200 OK\r\n",
            b"\x16\x03\x03\x00\x02\x02\x28",
        ] {
            assert_eq!(parse(not_http, String::new()), None, "{not_http:?}");
        }
        assert_eq!(parsed(b"HTTP/1.0 404").status, 404);
        assert_eq!(parsed(b"HTTP/1.1 301 Moved Permanently").status, 301);
    }

    #[test]
    fn redirects_without_a_body_or_title() {
        let http =
            parsed(b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://example.com/\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(http.status, 301);
        assert_eq!(http.location, "https://example.com/");
        assert_eq!(http.content_length, Some(0));
        assert_eq!(http.title, "");
    }

    #[test]
    fn bare_line_feeds_and_odd_header_case_are_read() {
        let http = parsed(
            b"HTTP/1.0 200 OK\nSERVER:   Apache/2.4.62 (Debian)  \nContent-TYPE:text/html\n\n<TITLE>It works</TiTlE>",
        );
        assert_eq!(http.server, "Apache/2.4.62 (Debian)");
        assert_eq!(http.content_type, "text/html");
        assert_eq!(http.title, "It works");
    }

    #[test]
    fn titles_are_decoded_collapsed_and_bounded() {
        let http = parsed(
            b"HTTP/1.1 200 OK\r\n\r\n<html><head><title lang=\"en\">\n  Tom &amp; Jerry&#39;s\t&lt;b&gt; &quot;shop&quot; &#x41;&#66; &bogus; &#0; & </title>",
        );
        assert_eq!(http.title, "Tom & Jerry's <b> \"shop\" AB &bogus; \u{fffd} &");
        let long = [&b"HTTP/1.1 200 OK\r\n\r\n<title>"[..], &b"word ".repeat(100_000), b"</title>"].concat();
        let title = parsed(&long).title;
        assert!(title.len() <= MAX_FIELD && title.starts_with("word word"), "{}", title.len());
        assert_eq!(parsed(b"HTTP/1.1 200 OK\r\n\r\n<titlebar>x</titlebar>").title, "");
    }

    #[test]
    fn truncated_bodies_and_headers_give_what_arrived() {
        assert_eq!(parsed(b"HTTP/1.1 200 OK\r\n\r\n<html><title>Half a ti").title, "Half a ti");
        // A header cut off by the read is not trusted: 12 may be 1234.
        let http = parsed(b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 12");
        assert_eq!((http.server.as_str(), http.content_length), ("x", None));
        // Without the end of the headers there is no body to find a title in.
        assert_eq!(parsed(b"HTTP/1.1 200 OK\r\nX: <title>t</title>\r\n").title, "");
    }

    #[test]
    fn binary_junk_and_huge_headers_are_survived() {
        let junk = [
            &b"HTTP/1.1 500 \xff\xfe\x00\r\nServer: caf\xc3\xa9 \xff\x01srv\r\n"[..],
            &[0xffu8; 3000],
            b"\r\n\r\n<title>\xe2\x82\xac \xff</title>",
        ]
        .concat();
        let http = parsed(&junk);
        assert_eq!(http.status, 500);
        assert_eq!(http.server, "café \u{fffd}srv");
        assert_eq!(http.title, "€ \u{fffd}");
        let huge_header =
            [&b"HTTP/1.1 200 OK\r\nServer: "[..], &b"a".repeat(MAX_RESPONSE), b"\r\nContent-Length: x1\r\n\r\n"]
                .concat();
        let http = parsed(&huge_header);
        assert_eq!(http.server.len(), MAX_FIELD);
        assert_eq!(http.content_length, None);
        let many_headers = [&b"HTTP/1.1 200 OK\r\n"[..], &b"X: y\r\n".repeat(10_000), b"Location: /z\r\n\r\n"].concat();
        assert_eq!(parsed(&many_headers).location, "/z");
    }

    #[test]
    fn the_first_of_repeated_headers_wins() {
        let http =
            parsed(b"HTTP/1.1 200 OK\r\nServer: a\r\nServer: b\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n");
        assert_eq!((http.server.as_str(), http.content_length), ("a", Some(5)));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let with_status = [&b"HTTP/1.1 200 OK\r\n"[..], &bytes].concat();
            let _ = parse(&bytes, String::new());
            let http = parse(&with_status, String::new()).unwrap();
            proptest::prop_assert!(http.title.len() <= MAX_FIELD && http.server.len() <= MAX_FIELD);
        }
    }
}
