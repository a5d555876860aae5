//! Finding an account's containers: by full ID, name (the VM's alias, with or without a
//! leading `/`), or unique ID prefix, as moby's `GetContainer` does. Another account's
//! containers and destroyed ones are never found: moby's 404 `No such container: X`.

use super::super::accounts::Account;
use super::super::error;
use crate::control::container_spec::ContainerSpec;
use crate::control::db::{Db, Val};
use crate::control::error::OpError;
use crate::control::vms::{self, Vm};

/// A container: its VM and spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// The VM.
    pub vm: Vm,
    /// Its container spec.
    pub spec: ContainerSpec,
}

/// The VM UUID of a container ID: its first 32 hex digits as 8-4-4-4-12.
pub fn vm_uuid(id: &str) -> Option<String> {
    let h = id.get(..32)?;
    if !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let h = h.to_ascii_lowercase();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

fn found(vm: Vm) -> Option<Found> {
    let spec = vm.container.clone()?;
    Some(Found { vm, spec })
}

/// moby's 404.
pub fn no_such(name: &str) -> OpError {
    error::not_found(format!("No such container: {name}"))
}

/// Every container of `account` that is not destroyed, oldest first.
pub fn all(db: &mut Db<'_>, account: &Account) -> Result<Vec<Found>, OpError> {
    let rows = db.query(
        "SELECT doc FROM fabric_vms WHERE owner_uuid = $1 AND state <> 'destroyed' \
         ORDER BY created_ms, uuid",
        &[Val::text(&account.uuid)],
    )?;
    let mut out = Vec::new();
    for r in rows {
        let vm: Vm = crate::control::db::doc_from_row(r, "vm")?;
        if let Some(f) = found(vm) {
            out.push(f);
        }
    }
    Ok(out)
}

/// The account's container named `name_or_id`: full 64-hex ID, then name, then unique ID
/// prefix (ambiguous: 400 as moby's truncindex words it).
pub fn find(db: &mut Db<'_>, account: &Account, name_or_id: &str) -> Result<Found, OpError> {
    let term = name_or_id;
    if term.is_empty() {
        return Err(no_such(term));
    }
    if term.len() == 64 && term.bytes().all(|b| b.is_ascii_hexdigit()) {
        let id = term.to_ascii_lowercase();
        if let Some(u) = vm_uuid(&id) {
            if let Some(vm) = vms::get(db, &u)? {
                if vm.owner_uuid == account.uuid && vm.state != "destroyed" {
                    if let Some(f) = found(vm).filter(|f| f.spec.id == id) {
                        return Ok(f);
                    }
                }
            }
        }
    }
    let name = term.strip_prefix('/').unwrap_or(term);
    let by_name = db.query_opt(
        "SELECT doc FROM fabric_vms WHERE owner_uuid = $1 AND alias = $2 AND state <> 'destroyed'",
        &[Val::text(&account.uuid), Val::text(name)],
    )?;
    if let Some(r) = by_name {
        let vm: Vm = crate::control::db::doc_from_row(r, "vm")?;
        if let Some(f) = found(vm) {
            return Ok(f);
        }
    }
    if term.bytes().all(|b| b.is_ascii_hexdigit()) {
        let prefix = term.to_ascii_lowercase();
        let mut hits: Vec<Found> = all(db, account)?
            .into_iter()
            .filter(|f| f.spec.id.starts_with(&prefix))
            .collect();
        match hits.len() {
            1 => return Ok(hits.remove(0)),
            0 => {}
            _ => {
                return Err(error::bad_request(format!(
                    "Multiple IDs found with provided prefix: {term}"
                )))
            }
        }
    }
    Err(no_such(term))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_uuid_is_the_first_32_hex() {
        let id = format!("{}{}", "0123456789abcdef".repeat(2), "f".repeat(32));
        assert_eq!(
            vm_uuid(&id).unwrap(),
            "01234567-89ab-cdef-0123-456789abcdef"
        );
        assert_eq!(vm_uuid("xyz"), None);
        assert_eq!(vm_uuid(&"g".repeat(64)), None);
    }
}
