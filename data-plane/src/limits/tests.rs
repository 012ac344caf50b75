//! Tests of the limiters.
