//! Types generated from `proto/` (prost + tonic).

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// Generated modules nest as their proto packages (`flex.admin.v1` imports `flex.control.v1`
/// types, and the generated code refers to them by that path); the short names below are the
/// public API.
mod flex {
    pub mod admin {
        pub mod v1 {
            tonic::include_proto!("flex.admin.v1");

            impl std::fmt::Debug for SetProviderKeyRequest {
                fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.debug_struct("SetProviderKeyRequest")
                        .field("org_id", &self.org_id)
                        .field("provider", &self.provider)
                        .field("secret", &"<redacted>")
                        .finish()
                }
            }
        }
    }

    pub mod control {
        pub mod v1 {
            tonic::include_proto!("flex.control.v1");
        }
    }
}

pub use flex::admin::v1 as admin;
pub use flex::control::v1 as control;

#[cfg(test)]
mod tests {
    #[test]
    fn the_provider_secret_never_shows_in_debug_output() {
        let r = super::admin::SetProviderKeyRequest {
            org_id: "o".into(),
            provider: "openai".into(),
            secret: "sk-canary-1234567890".into(),
        };
        assert!(!format!("{r:?}").contains("canary"));
    }
}

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("flex_descriptor");
