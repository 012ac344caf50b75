//! Rate limits on sign-in and sign-up, in memory per control-plane instance: fixed windows per
//! client address (every attempt counts) and per account (failed attempts count; a success
//! clears them). Over a limit the attempt is refused before any password is checked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limits (attempts per window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sign-in attempts from one address.
    pub sign_in_per_address: u32,
    /// Failed sign-ins of one account (from anywhere).
    pub sign_in_failures_per_account: u32,
    /// Sign-ups from one address.
    pub sign_up_per_address: u32,
    pub window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            sign_in_per_address: 30,
            sign_in_failures_per_account: 5,
            sign_up_per_address: 10,
            window: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
}

/// At most this many keys are tracked; the oldest windows go first past it.
const MAX_TRACKED: usize = 100_000;

#[derive(Debug)]
pub(crate) struct Limiter {
    limits: Limits,
    windows: Mutex<HashMap<String, Window>>,
}

/// The attempt may go ahead, or must wait this long.
pub(crate) type Verdict = Result<(), Duration>;

impl Limiter {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            windows: Mutex::new(HashMap::new()),
        }
    }

    fn address_key(kind: &str, ip: Option<IpAddr>) -> String {
        match ip {
            // An IPv6 client usually has a whole /64: count it as one address.
            Some(IpAddr::V6(v6)) => {
                let s = v6.segments();
                format!("{kind}:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
            Some(ip) => format!("{kind}:{ip}"),
            None => format!("{kind}:unknown"),
        }
    }

    /// Counts one attempt under `key` if it is under `limit`.
    fn hit(&self, key: String, limit: u32, count_it: bool) -> Verdict {
        let now = Instant::now();
        let mut w = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.len() >= MAX_TRACKED && !w.contains_key(&key) {
            let window = self.limits.window;
            w.retain(|_, v| now.duration_since(v.start) < window);
            if w.len() >= MAX_TRACKED {
                // A flood of distinct addresses or accounts: refuse new ones rather than grow.
                return Err(window);
            }
        }
        let entry = w.entry(key).or_insert(Window {
            start: now,
            count: 0,
        });
        if now.duration_since(entry.start) >= self.limits.window {
            *entry = Window {
                start: now,
                count: 0,
            };
        }
        if entry.count >= limit {
            return Err(self
                .limits
                .window
                .saturating_sub(now.duration_since(entry.start)));
        }
        if count_it {
            entry.count += 1;
        }
        Ok(())
    }

    /// Before checking a sign-in's password: the address's attempts (counted now) and the
    /// account's failures (counted by [`Limiter::sign_in_failed`]).
    pub fn sign_in(&self, ip: Option<IpAddr>, email: &str) -> Verdict {
        self.hit(
            format!("acct:{email}"),
            self.limits.sign_in_failures_per_account,
            false,
        )?;
        self.hit(
            Self::address_key("signin", ip),
            self.limits.sign_in_per_address,
            true,
        )
    }

    pub fn sign_in_failed(&self, email: &str) {
        let _ = self.hit(
            format!("acct:{email}"),
            self.limits.sign_in_failures_per_account,
            true,
        );
    }

    pub fn sign_in_succeeded(&self, email: &str) {
        self.windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&format!("acct:{email}"));
    }

    pub fn sign_up(&self, ip: Option<IpAddr>) -> Verdict {
        self.hit(
            Self::address_key("signup", ip),
            self.limits.sign_up_per_address,
            true,
        )
    }
}

/// "in 14 minutes" / "in 30 seconds", for the refusal.
pub(crate) fn wait_text(d: Duration) -> String {
    let secs = d.as_secs().max(1);
    if secs >= 90 {
        format!("in {} minutes", secs.div_ceil(60))
    } else {
        format!("in {secs} seconds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_lock_an_account_and_attempts_an_address() {
        let l = Limiter::new(Limits {
            sign_in_per_address: 4,
            sign_in_failures_per_account: 2,
            sign_up_per_address: 1,
            window: Duration::from_secs(60),
        });
        let a: Option<IpAddr> = "10.0.0.1".parse().ok();
        let b: Option<IpAddr> = "10.0.0.2".parse().ok();
        assert!(l.sign_in(a, "x@y.z").is_ok());
        l.sign_in_failed("x@y.z");
        assert!(l.sign_in(a, "x@y.z").is_ok());
        l.sign_in_failed("x@y.z");
        // Locked from every address.
        let wait = l.sign_in(b, "x@y.z").unwrap_err();
        assert!(wait <= Duration::from_secs(60));
        // Another account from the same address still works, until the address's limit.
        assert!(l.sign_in(a, "other@y.z").is_ok());
        assert!(l.sign_in(a, "other@y.z").is_ok());
        assert!(l.sign_in(a, "third@y.z").is_err(), "4 attempts from a");
        // A success clears the account's failures.
        l.sign_in_succeeded("x@y.z");
        assert!(l.sign_in(b, "x@y.z").is_ok());
        assert!(l.sign_up(a).is_ok());
        assert!(l.sign_up(a).is_err());
        assert!(l.sign_up(b).is_ok());
        assert_eq!(wait_text(Duration::from_secs(600)), "in 10 minutes");
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let one = Limiter::address_key("k", "2001:db8:1:2::1".parse().ok());
        let two = Limiter::address_key("k", "2001:db8:1:2:ffff::9".parse().ok());
        assert_eq!(one, two);
    }
}
