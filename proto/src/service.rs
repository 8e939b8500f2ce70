//! The one mapping between the wire's `Service` and the shared domain's
//! [`portfleet_core::Service`]: the agent sends it, the controller stores
//! and serves it, the CLI prints it - all through these two impls.
//! Inbound values are cut to the domain's bounds ([`Service::bounded`]).

use portfleet_core::service::{Http, Service, Tls};

use crate::v1 as pb;

fn ts(secs: i64) -> Option<prost_types::Timestamp> {
    (secs != 0).then_some(prost_types::Timestamp { seconds: secs, nanos: 0 })
}

impl From<&Service> for pb::Service {
    fn from(s: &Service) -> Self {
        pb::Service {
            name: s.name.clone(),
            product: s.product.clone(),
            version: s.version.clone(),
            extra_info: s.extra_info.clone(),
            hostname: s.hostname.clone(),
            os_type: s.os_type.clone(),
            device_type: s.device_type.clone(),
            cpes: s.cpes.clone(),
            tunnel: s.tunnel.clone(),
            confidence: u32::from(s.confidence),
            method: s.method.clone(),
            rule: s.rule.clone(),
            tls: s.tls.as_ref().map(|t| pb::TlsInfo {
                version: t.version.clone(),
                cipher: t.cipher.clone(),
                alpn: t.alpn.clone(),
                sni: t.sni.clone(),
                subject_cn: t.subject_cn.clone(),
                sans: t.sans.clone(),
                issuer: t.issuer.clone(),
                not_before: ts(t.not_before),
                not_after: ts(t.not_after),
                self_signed: t.self_signed,
                sha256: t.sha256.clone(),
            }),
            http: s
                .http
                .iter()
                .map(|h| pb::HttpInfo {
                    url: h.url.clone(),
                    status: u32::from(h.status),
                    title: h.title.clone(),
                    server: h.server.clone(),
                    location: h.location.clone(),
                    content_type: h.content_type.clone(),
                    content_length: h.content_length,
                })
                .collect(),
            banner: s.banner.clone(),
            verified: s.verified,
        }
    }
}

impl From<pb::Service> for Service {
    fn from(s: pb::Service) -> Self {
        Service {
            name: s.name,
            product: s.product,
            version: s.version,
            extra_info: s.extra_info,
            hostname: s.hostname,
            os_type: s.os_type,
            device_type: s.device_type,
            cpes: s.cpes,
            tunnel: s.tunnel,
            confidence: u8::try_from(s.confidence.min(10)).unwrap_or(10),
            method: s.method,
            rule: s.rule,
            tls: s.tls.map(|t| Tls {
                version: t.version,
                cipher: t.cipher,
                alpn: t.alpn,
                sni: t.sni,
                subject_cn: t.subject_cn,
                sans: t.sans,
                issuer: t.issuer,
                not_before: t.not_before.map_or(0, |t| t.seconds),
                not_after: t.not_after.map_or(0, |t| t.seconds),
                self_signed: t.self_signed,
                sha256: t.sha256,
            }),
            http: s
                .http
                .into_iter()
                .map(|h| Http {
                    url: h.url,
                    // Not an HTTP status: kept as 0 ("none") rather than wrapped.
                    status: u16::try_from(h.status).unwrap_or(0),
                    title: h.title,
                    server: h.server,
                    location: h.location,
                    content_type: h.content_type,
                    content_length: h.content_length,
                })
                .collect(),
            banner: s.banner,
            verified: s.verified,
        }
        .bounded()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_survives_the_wire_and_oversized_input_is_cut() {
        let s = Service {
            name: "https".into(),
            product: "nginx".into(),
            confidence: 10,
            tls: Some(Tls { version: "TLSv1.3".into(), not_after: 1_900_000_000, ..Tls::default() }),
            http: vec![Http { url: "https://a.example:8443".into(), status: 200, ..Http::default() }],
            verified: true,
            ..Service::default()
        };
        assert_eq!(Service::from(pb::Service::from(&s)), s);
        let hostile = pb::Service {
            name: "x".repeat(100_000),
            confidence: 4_000_000_000,
            http: vec![pb::HttpInfo { status: 70_000, ..Default::default() }; 1000],
            ..Default::default()
        };
        let cut = Service::from(hostile);
        assert_eq!(cut.name.len(), portfleet_core::service::MAX_FIELD);
        assert_eq!(cut.confidence, 10);
        assert_eq!(cut.http.len(), portfleet_core::service::MAX_HTTP);
        assert_eq!(cut.http[0].status, 0);
    }
}
