//! Placement (DESIGN "Placement"): among servers with a fresh heartbeat (never a removed
//! one), the one with the fewest VMs of this owner that are not destroyed (provisioning
//! included), then the fewest overall, ties by UUID. Run inside the create transaction, under
//! the owner's lock, so two creates of one owner see each other's VMs and spread. Filters
//! (affinity, traits) plug in as predicates over [`Candidate`]s.

use super::db::{Db, Val};
use super::error::{ApiError, FieldError, OpError};

/// A live server, with the counts placement ranks by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Server UUID.
    pub uuid: String,
    /// Its VMs of the owner being placed (not destroyed).
    pub owner_vms: i64,
    /// All its VMs (not destroyed).
    pub all_vms: i64,
}

/// The pure choice: the best candidate that passes `filter`.
pub fn choose<'a>(
    candidates: &'a [Candidate],
    filter: &dyn Fn(&Candidate) -> bool,
) -> Option<&'a Candidate> {
    candidates
        .iter()
        .filter(|c| filter(c))
        .min_by(|a, b| (a.owner_vms, a.all_vms, &a.uuid).cmp(&(b.owner_vms, b.all_vms, &b.uuid)))
}

/// The live servers (last heartbeat at or after `since_ms`) with their counts for `owner`.
pub fn candidates(db: &mut Db<'_>, owner: &str, since_ms: i64) -> Result<Vec<Candidate>, OpError> {
    let rows = db.query(
        "SELECT s.uuid,
           (SELECT COUNT(*) FROM fabric_vms v
              WHERE v.server_uuid = s.uuid AND v.state <> 'destroyed' AND v.owner_uuid = $1),
           (SELECT COUNT(*) FROM fabric_vms v
              WHERE v.server_uuid = s.uuid AND v.state <> 'destroyed')
         FROM fabric_servers s
         WHERE s.last_heartbeat_ms >= $2 AND s.removed_ms IS NULL
         ORDER BY s.uuid",
        &[Val::text(owner), Val::int(since_ms)],
    )?;
    rows.into_iter()
        .map(|r| {
            let mut it = r.into_iter();
            let mut next = || {
                it.next()
                    .ok_or_else(|| OpError::Corrupt("placement row".into()))
            };
            Ok(Candidate {
                uuid: next()?.into_string("server uuid")?,
                owner_vms: next()?.as_i64("count")?,
                all_vms: next()?.as_i64("count")?,
            })
        })
        .collect()
}

/// Picks a server for a new VM of `owner` at `now_ms` (servers heartbeating within
/// `lifetime_ms`); none → 409 `InsufficientCapacity` saying why.
pub fn place(
    db: &mut Db<'_>,
    owner: &str,
    now_ms: i64,
    lifetime_ms: i64,
    filter: &dyn Fn(&Candidate) -> bool,
) -> Result<String, OpError> {
    let c = candidates(db, owner, now_ms.saturating_sub(lifetime_ms))?;
    match choose(&c, filter) {
        Some(best) => Ok(best.uuid.clone()),
        None => {
            let why = if c.is_empty() {
                format!(
                    "no server has sent a heartbeat in the last {} ms: register a server \
                     (PUT /servers/:uuid) and keep its agent running, or give server_uuid",
                    lifetime_ms
                )
            } else {
                "no live server passes the placement filters".to_string()
            };
            let mut e = ApiError::invalid_params(vec![FieldError {
                code: "InsufficientCapacity",
                ..FieldError::invalid("server_uuid", why.clone())
            }]);
            e.status = 409;
            e.code = "InsufficientCapacity";
            e.message = format!("cannot place the VM: {why}");
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(u: &str, owner_vms: i64, all_vms: i64) -> Candidate {
        Candidate {
            uuid: u.into(),
            owner_vms,
            all_vms,
        }
    }

    #[test]
    fn fewest_of_owner_then_overall_then_uuid() {
        let all = |_: &Candidate| true;
        let s = [c("b", 1, 1), c("a", 1, 5), c("c", 0, 9)];
        assert_eq!(choose(&s, &all).unwrap().uuid, "c");
        let s = [c("b", 1, 1), c("a", 1, 5)];
        assert_eq!(choose(&s, &all).unwrap().uuid, "b");
        let s = [c("b", 1, 1), c("a", 1, 1)];
        assert_eq!(choose(&s, &all).unwrap().uuid, "a");
        assert_eq!(choose(&[], &all), None);
    }

    #[test]
    fn filters_exclude() {
        let s = [c("a", 0, 0), c("b", 3, 3)];
        let not_a = |x: &Candidate| x.uuid != "a";
        assert_eq!(choose(&s, &not_a).unwrap().uuid, "b");
        let none = |_: &Candidate| false;
        assert_eq!(choose(&s, &none), None);
    }

    #[test]
    fn spreading_six_over_three_is_two_each() {
        let mut s = vec![c("a", 0, 0), c("b", 0, 4), c("c", 0, 1)];
        for _ in 0..6 {
            let u = choose(&s, &|_| true).unwrap().uuid.clone();
            let x = s.iter_mut().find(|x| x.uuid == u).unwrap();
            x.owner_vms += 1;
            x.all_vms += 1;
        }
        assert!(s.iter().all(|x| x.owner_vms == 2), "{s:?}");
    }
}
