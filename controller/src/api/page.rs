//! Opaque page tokens: a base64url-encoded keyset position, tagged with the
//! list it belongs to so a token from one list is refused by another.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Serialize, de::DeserializeOwned};
use tonic::Status;

#[derive(serde::Serialize, serde::Deserialize)]
struct Token<K> {
    list: String,
    after: K,
}

pub fn encode<K: Serialize>(list: &str, after: Option<K>) -> String {
    let Some(after) = after else {
        return String::new();
    };
    let token = Token { list: list.to_string(), after };
    // Serialising plain keys cannot fail.
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).unwrap_or_default())
}

pub fn decode<K: DeserializeOwned>(list: &str, token: &str) -> Result<Option<K>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Status::invalid_argument("page_token: not a token returned by this list");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let token: Token<K> = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if token.list != list {
        return Err(bad());
    }
    Ok(Some(token.after))
}

/// The page size to use: `default` when unset, never above `max`.
pub fn size(requested: u32, default: u32, max: u32) -> u32 {
    match requested {
        0 => default,
        n => n.min(max),
    }
}
