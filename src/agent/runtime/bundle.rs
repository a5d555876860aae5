//! OCI bundles (in progress).
