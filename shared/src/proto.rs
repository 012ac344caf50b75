//! Types generated from `proto/` (prost + tonic).

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod admin {
    tonic::include_proto!("flex.admin.v1");
}

pub mod control {
    tonic::include_proto!("flex.control.v1");
}

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("flex_descriptor");
