//! The codec every generated portfleet service and client uses: prost's,
//! except that a message that does not decode - a truncated field, a string
//! that is not UTF-8, a wrong wire type - is the sender's fault and fails
//! with `INVALID_ARGUMENT` instead of tonic's default `INTERNAL` (which
//! says the receiver is broken, and which clients and dashboards treat as a
//! server bug). The decoder's message, which names the field, is kept.
//!
//! `build.rs` names this codec in the generated code (`codec_path`).

use prost::Message;
use tonic::{
    Code, Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with decode errors mapped to `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct ProtoCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder(self.0.decoder())
    }
}

/// [`ProstDecoder`] whose errors are `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct ProtoDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(src).map_err(undecodable)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// prost reports every decode failure as `INTERNAL`; it is the input that is
/// wrong. Any other code is passed through unchanged.
fn undecodable(status: Status) -> Status {
    if status.code() == Code::Internal { Status::invalid_argument(status.message()) } else { status }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_errors_are_invalid_argument_with_their_message() {
        let internal = Status::internal("failed to decode Protobuf message: GetScanRequest.id: invalid string value");
        let mapped = undecodable(internal);
        assert_eq!(mapped.code(), Code::InvalidArgument);
        assert!(mapped.message().contains("GetScanRequest.id"), "{}", mapped.message());
        assert_eq!(undecodable(Status::out_of_range("too big")).code(), Code::OutOfRange);
    }
}
