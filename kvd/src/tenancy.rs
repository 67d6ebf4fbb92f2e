//! Who may open which tenant's namespaces. A namespace's bytes are readable and writable by
//! whoever opens it (its arena is handed over mapped), so opening is where tenants are kept
//! apart: a tenant string's base (the part before the first `|`; the connector appends
//! `|salt=…` for vLLM's cache salts) must be allowed to the peer's uid or gid.
//!
//! With `server.tenants` rules configured, a peer may open a tenant that a rule naming its
//! uid or (primary) gid matches. Without rules — today's single-tenant setups — the empty
//! tenant is shared by every allowed peer and any other tenant belongs to the first uid that
//! opens it while the daemon runs; sharing one across uids needs a rule.

use hashbrown::HashMap;
use parking_lot::Mutex;

use crate::config::TenantRule;

/// Most tenants claimed first-come (without rules); a bound on the claims map.
const MAX_CLAIMS: usize = 4096;

/// The tenant rules and, without rules, which uid claimed which tenant.
#[derive(Debug)]
pub struct Tenancy {
    rules: Vec<TenantRule>,
    owners: Mutex<HashMap<String, u32>>,
}

/// The part of a tenant string that authorization looks at.
pub fn base(tenant: &str) -> &str {
    tenant.split('|').next().unwrap_or("")
}

/// Whether `pattern` (an exact name, a prefix ending in `*`, or `*`) matches `tenant`.
pub fn matches(pattern: &str, tenant: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => tenant.starts_with(prefix),
        None => pattern == tenant,
    }
}

impl Tenancy {
    /// From `server.tenants`.
    pub fn new(rules: Vec<TenantRule>) -> Tenancy {
        Tenancy {
            rules,
            owners: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a peer of `uid`/`gid` may open namespaces of `tenant`; if not, why, in words
    /// that name the setting (and never another tenant's full string).
    pub fn check(&self, uid: u32, gid: u32, tenant: &str) -> Result<(), String> {
        let b = base(tenant);
        if !self.rules.is_empty() {
            let allowed = self.rules.iter().any(|r| {
                (r.uids.contains(&uid) || r.gids.contains(&gid))
                    && r.tenants.iter().any(|p| matches(p, b))
            });
            return if allowed {
                Ok(())
            } else {
                Err(format!(
                    "uid {uid} / gid {gid} may not open tenant {b:?} (server.tenants)"
                ))
            };
        }
        if b.is_empty() {
            return Ok(());
        }
        let mut owners = self.owners.lock();
        if owners.len() >= MAX_CLAIMS && !owners.contains_key(b) {
            return Err(format!(
                "{MAX_CLAIMS} tenants are claimed on this node already; configure \
                 server.tenants rules instead of first-come claims"
            ));
        }
        let owner = *owners.entry(b.to_owned()).or_insert(uid);
        if owner == uid {
            Ok(())
        } else {
            Err(format!(
                "tenant {b:?} belongs to another uid on this node; configure server.tenants \
                 to share it"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_come_claims_are_bounded() {
        let t = Tenancy::new(Vec::new());
        for i in 0..MAX_CLAIMS {
            t.check(1, 1, &format!("t{i}")).unwrap();
        }
        let e = t.check(1, 1, "one-more").unwrap_err();
        assert!(e.contains("server.tenants"), "{e}");
        t.check(1, 1, "t7|salt=x").unwrap();
        t.check(2, 2, "").unwrap();
    }

    fn rule(uids: &[u32], gids: &[u32], tenants: &[&str]) -> TenantRule {
        TenantRule {
            uids: uids.to_vec(),
            gids: gids.to_vec(),
            tenants: tenants.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn without_rules_the_empty_tenant_is_shared_and_others_go_to_their_first_uid() {
        let t = Tenancy::new(Vec::new());
        assert!(t.check(1000, 1000, "").is_ok());
        assert!(t.check(1001, 1001, "|salt=abc").is_ok());
        assert!(t.check(1000, 1000, "team-a").is_ok());
        assert!(t.check(1000, 1000, "team-a|salt=x").is_ok());
        let e = t.check(1001, 1000, "team-a|salt=x").unwrap_err();
        assert!(!e.contains("salt"), "{e}");
    }

    #[test]
    fn rules_match_uid_or_gid_and_patterns() {
        let t = Tenancy::new(vec![
            rule(&[1000], &[], &["team-a", "shared-*"]),
            rule(&[], &[50], &["*"]),
        ]);
        assert!(t.check(1000, 1, "team-a|salt=x").is_ok());
        assert!(t.check(1000, 1, "shared-1").is_ok());
        assert!(t.check(1000, 1, "team-b").is_err());
        assert!(
            t.check(1000, 1, "").is_err(),
            "the empty tenant needs a rule too"
        );
        assert!(t.check(7, 50, "team-b").is_ok());
        assert!(t.check(7, 51, "team-a").is_err());
    }
}
