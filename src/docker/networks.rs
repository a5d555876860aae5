//! Docker networks over fabric VLANs and fabric networks (being built: see
//! /work/briefs/i18-net.md).

use super::accounts::Account;
use super::api::{Op, Req};
use crate::control::db::Db;
use crate::control::error::OpError;

/// The operation of a `/networks/...` request, if it is one this module serves.
pub fn route(_req: &Req) -> Option<Op> {
    None
}

/// Creates `account`'s default network; returns its UUID.
pub fn create_default(
    _db: &mut Db<'_>,
    _cfg: &crate::control::Config,
    _account: &Account,
) -> Result<Option<String>, OpError> {
    Ok(None)
}
