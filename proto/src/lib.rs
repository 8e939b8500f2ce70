//! The `portfleet.v1` wire contract shared by the controller, the agent and
//! clients. Generated from `proto/portfleet/v1/*.proto` at build time; wire
//! types stop at the edge of each crate, which converts them into validated
//! domain types.

pub mod codec;
pub mod service;

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("portfleet.v1");
}

/// The encoded `FileDescriptorSet` of every portfleet proto, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/portfleet_descriptor.bin"));

/// Agent protocol versions this build speaks (see docs/protocol.md).
pub const PROTOCOL_VERSION_MIN: u32 = 1;
pub const PROTOCOL_VERSION_MAX: u32 = 1;

/// Clients of `ScanService` send an API token as `authorization: Bearer
/// <token>` on every call (docs/security.md).
pub mod auth {
    use tonic::{Request, Status, metadata::MetadataValue, service::Interceptor, transport::Channel};

    /// Adds the bearer token to every request (none when empty).
    #[derive(Clone)]
    pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

    impl Bearer {
        /// Fails if the token holds characters a header cannot carry.
        pub fn new(token: &str) -> Result<Self, String> {
            if token.is_empty() {
                return Ok(Self(None));
            }
            let mut v: MetadataValue<_> = format!("Bearer {token}")
                .parse()
                .map_err(|_| "the API token has characters a header cannot carry".to_string())?;
            v.set_sensitive(true);
            Ok(Self(Some(v)))
        }
    }

    impl std::fmt::Debug for Bearer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(if self.0.is_some() { "Bearer(..)" } else { "Bearer(none)" })
        }
    }

    impl Interceptor for Bearer {
        fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
            if let Some(v) = &self.0 {
                request.metadata_mut().insert("authorization", v.clone());
            }
            Ok(request)
        }
    }

    /// A `ScanService` client that sends a token.
    pub type ApiClient = crate::v1::scan_service_client::ScanServiceClient<
        tonic::service::interceptor::InterceptedService<Channel, Bearer>,
    >;

    pub fn client(channel: Channel, bearer: Bearer) -> ApiClient {
        crate::v1::scan_service_client::ScanServiceClient::with_interceptor(channel, bearer)
    }

    /// TLS to a controller: trust `ca_pem` (the controller's CA, or a
    /// corporate one), and present `identity` (certificate, key; agents
    /// under mTLS) when given.
    pub fn client_tls(ca_pem: &[u8], identity: Option<(&[u8], &[u8])>) -> tonic::transport::ClientTlsConfig {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        tls
    }
}
