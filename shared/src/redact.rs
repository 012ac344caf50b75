//! URLs as they may appear in a log line or an error: without credentials.

/// Query parameters whose value is a secret (Postgres accepts `?password=`).
const SECRET_PARAMS: &[&str] = &[
    "password",
    "pass",
    "token",
    "secret",
    "sslpassword",
    "auth_token",
];

/// `url` (or a comma-separated list of URLs, as NATS takes) with the user info
/// (`user:password@`, `token@`) replaced by `…@` and secret query values by `…`:
/// `nats://u:p@h:4222` → `nats://…@h:4222`. Anything else is kept, for the reader to find the
/// host.
pub fn url(url: &str) -> String {
    url.split(',').map(one).collect::<Vec<_>>().join(",")
}

fn one(url: &str) -> String {
    let (head, query) = match url.find(['?', '#']) {
        Some(q) => url.split_at(q),
        None => (url, ""),
    };
    let head = match (head.find("://"), head.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &head[..s], &head[at + 1..]),
        // No scheme: a bare `user:pass@host`.
        (None, Some(at)) => format!("…@{}", &head[at + 1..]),
        _ => head.to_string(),
    };
    if query.is_empty() {
        return head;
    }
    let (sep, rest) = query.split_at(1);
    let params: Vec<String> = rest
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if SECRET_PARAMS.iter().any(|s| k.eq_ignore_ascii_case(s)) => {
                format!("{k}=…")
            }
            _ => kv.to_string(),
        })
        .collect();
    format!("{head}{sep}{}", params.join("&"))
}

#[cfg(test)]
mod tests {
    use super::url;

    #[test]
    fn credentials_are_gone_and_the_host_stays() {
        for (given, shown) in [
            (
                "nats://alice:s3cret@nats.example:4222",
                "nats://…@nats.example:4222",
            ),
            ("nats://tok3n@nats:4222", "nats://…@nats:4222"),
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            (
                "nats://a:p1@h1:4222,nats://b:p2@h2:4222",
                "nats://…@h1:4222,nats://…@h2:4222",
            ),
            ("redis://:hunter2@redis:6379/0", "redis://…@redis:6379/0"),
            ("rediss://default:pw@r:6380", "rediss://…@r:6380"),
            (
                "postgres://flex:pw@db:5432/flex",
                "postgres://…@db:5432/flex",
            ),
            (
                "postgres://db/flex?user=flex&password=pw&sslmode=require",
                "postgres://db/flex?user=flex&password=…&sslmode=require",
            ),
            ("postgres://u:p@ss@db/x", "postgres://…@db/x"),
            (
                "sqlite:///var/lib/flex/flex.db?mode=rwc",
                "sqlite:///var/lib/flex/flex.db?mode=rwc",
            ),
            ("http://127.0.0.1:50051", "http://127.0.0.1:50051"),
        ] {
            let out = url(given);
            assert_eq!(out, shown, "{given}");
            for secret in ["s3cret", "tok3n", "p1", "p2", "hunter2", "pw", "p@ss"] {
                assert!(!out.contains(secret), "{out} still holds {secret}");
            }
        }
    }
}
