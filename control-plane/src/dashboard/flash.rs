//! One-time messages between a form's POST and the page it redirects to (post/redirect/get, so a
//! reload never repeats a change): a notice, and a secret to show once (a new API key, an invite
//! link). They live only in this process's memory, for at most [`FLASH_TTL`], and the next page
//! of the same session takes them: reloading that page does not show the secret again. The
//! database never sees a secret.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use secrecy::SecretString;

/// How long an unclaimed message is kept.
pub const FLASH_TTL: Duration = Duration::from_secs(300);

/// A secret shown once: what it is (e.g. "API key ci"), and its value.
#[derive(Clone)]
pub(crate) struct ShownOnce {
    pub label: String,
    pub value: SecretString,
}

/// What the next page of a session shows.
#[derive(Clone, Default)]
pub(crate) struct Flash {
    pub notice: Option<String>,
    pub secret: Option<ShownOnce>,
}

#[derive(Default)]
pub(crate) struct Flashes {
    by_session: Mutex<HashMap<String, (Instant, Flash)>>,
}

impl Flashes {
    fn update(&self, session: &str, f: impl FnOnce(&mut Flash)) {
        let now = Instant::now();
        let mut m = self
            .by_session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.retain(|_, (at, _)| now.duration_since(*at) < FLASH_TTL);
        let entry = m
            .entry(session.to_string())
            .or_insert_with(|| (now, Flash::default()));
        entry.0 = now;
        f(&mut entry.1);
    }

    pub fn notice(&self, session: &str, text: impl Into<String>) {
        let text = text.into();
        self.update(session, |f| f.notice = Some(text));
    }

    pub fn secret(&self, session: &str, label: impl Into<String>, value: SecretString) {
        let label = label.into();
        self.update(session, |f| {
            f.secret = Some(ShownOnce { label, value });
        });
    }

    /// Takes (and forgets) what is waiting for `session`.
    pub fn take(&self, session: &str) -> Flash {
        let mut m = self
            .by_session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match m.remove(session) {
            Some((at, f)) if at.elapsed() < FLASH_TTL => f,
            _ => Flash::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn a_secret_is_taken_once_by_its_session() {
        let f = Flashes::default();
        f.secret(
            "s1",
            "API key ci",
            SecretString::from("flex_live_x".to_string()),
        );
        f.notice("s1", "created");
        assert!(f.take("s2").secret.is_none());
        let got = f.take("s1");
        assert_eq!(
            got.secret.map(|s| s.value.expose_secret().to_string()),
            Some("flex_live_x".to_string())
        );
        assert_eq!(got.notice.as_deref(), Some("created"));
        assert!(f.take("s1").secret.is_none(), "shown once");
    }
}
