//! Caller authentication against the current snapshot: no database on the request path.

use std::sync::Arc;

use flex_shared::keys;
use http::{HeaderMap, StatusCode};

use crate::error::ApiError;
use crate::formats::CallerFormat;
use crate::snapshot::{Indexed, KeyEntry, SnapshotStore, TooOld};

/// Who is calling: their key and org, and the snapshot the request is served from.
pub struct Caller {
    pub snapshot: Arc<Indexed>,
    pub key: KeyEntry,
}

fn presented_key(format: CallerFormat, headers: &HeaderMap) -> Option<String> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(auth) = header("authorization") {
        let token = auth
            .strip_prefix("Bearer ")
            .or_else(|| auth.strip_prefix("bearer "))
            .unwrap_or(auth);
        return Some(token.trim().to_string());
    }
    match format {
        CallerFormat::Messages => header("x-api-key").map(str::to_string),
        CallerFormat::Interactions => header("x-goog-api-key").map(str::to_string),
        _ => None,
    }
}

fn unauthorized(code: &'static str, message: String) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, message)
        .fix("send your FlexInference key (not a provider key) as `Authorization: Bearer flex_live_...`; create one with `flex admin key create --org ORG_ID`.")
        .example("curl -H \"Authorization: Bearer $FLEX_API_KEY\" .../v1/responses")
}

/// The 503 of a proxy whose snapshot is older than `--max-snapshot-age-secs`.
pub fn snapshot_too_old(t: &TooOld) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "snapshot_too_old",
        format!(
            "This proxy has not heard from the control plane since {} ({} s ago, more than its \
             limit of {} s), so it cannot know whether your key is still valid and refuses \
             requests rather than serve a stale configuration (e.g. a key revoked meanwhile).",
            t.produced_at(),
            t.age_secs,
            t.max_age_secs
        ),
    )
    .fix("retry later or through another proxy; operators: restore the proxy's connection to the control plane (its log and /readyz say why), or raise --max-snapshot-age-secs.")
    .example("curl -s http://PROXY/readyz   # says since when the snapshot is too old")
    .header("retry-after", http::HeaderValue::from_static("5"))
}

/// Checks the caller's key against the snapshot `store` serves (503 when none is loaded yet or
/// it is older than `--max-snapshot-age-secs`).
pub fn authenticate(
    store: &SnapshotStore,
    format: CallerFormat,
    headers: &HeaderMap,
    now_unix: i64,
) -> Result<Caller, ApiError> {
    let Some(presented) = presented_key(format, headers) else {
        let alt = match format {
            CallerFormat::Messages => " (or `x-api-key`)",
            CallerFormat::Interactions => " (or `x-goog-api-key`)",
            _ => "",
        };
        return Err(unauthorized("missing_api_key", format!("No API key was sent: FlexInference needs your flex_live_ key in the Authorization header{alt}.")));
    };
    if let Err(e) = keys::check_format(&presented) {
        return Err(unauthorized(
            "invalid_api_key",
            format!("The API key is not a valid FlexInference key: {e}."),
        ));
    }
    if let Some(t) = store.too_old() {
        return Err(snapshot_too_old(&t));
    }
    let snapshot: Option<Arc<Indexed>> = store.load();
    let Some(snapshot) = snapshot else {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "This proxy has not received its configuration from the control plane yet.")
            .fix("retry in a moment; if it persists, check that the proxy can reach the control plane (see /readyz)."));
    };
    let hash = keys::hash(&presented);
    let entry = snapshot.keys.get(&hash).ok_or_else(|| {
        unauthorized(
            "invalid_api_key",
            "The API key is unknown or has been revoked.".into(),
        )
    })?;
    if entry.expires_at > 0 && entry.expires_at <= now_unix {
        return Err(unauthorized(
            "api_key_expired",
            format!("The API key {} has expired.", entry.key_id),
        ));
    }
    match snapshot.orgs.get(&entry.org_id) {
        Some(org) if org.active => {}
        _ => {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "org_suspended", format!("The organization {} is suspended, so its keys cannot make requests.", entry.org_id))
                .fix("ask your FlexInference operator to reactivate the organization (`flex admin org reactivate`)."));
        }
    }
    Ok(Caller {
        snapshot,
        key: entry,
    })
}
