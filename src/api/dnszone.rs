//! Keeps the embedded DNS server's zone equal to the stored instance addresses: the zone is
//! derived from the store on start and after every commit that changes addresses, placements
//! or SM network parameters. A name bound to two addresses is a condition until resolved.

use crate::api::dns::DnsServer;
use crate::model::Condition;
use crate::reconcilers::network::zone_records;
use crate::store::{Store, StoreError, tables};
use std::sync::Arc;

/// Names change only with addresses and SM parameters (a hostname from the item config comes
/// with the address the reconciler assigns).
const WATCHED: [&str; 2] = [tables::INSTANCE_IPS, tables::NETWORK_PARAMS];

/// How long changes are collected before the zone is rebuilt: well inside the one second in
/// which a name must follow its address, and it keeps a burst of commits to one rebuild.
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(250);

/// Sets the zone from the store once; returns the number of names served and whether any
/// name conflicts.
pub fn sync_once(
    store: &Store,
    dns: &DnsServer,
    had_conflicts: bool,
) -> Result<(usize, bool), StoreError> {
    let snap = store.shared_snapshot()?;
    let zone = zone_records(&snap);
    let conflicts = dns.set_records(&zone).err().unwrap_or_default();
    if conflicts.is_empty() && !had_conflicts {
        return Ok((zone.len(), false));
    }
    store.write(|tx| {
        let existing = tx.conditions()?;
        let mut keep = std::collections::BTreeSet::new();
        for c in &conflicts {
            let key = format!("dns/{}", c.name);
            let ips: Vec<String> = c.ips.iter().map(|i| i.to_string()).collect();
            let cond = Condition::new(
                format!("dns name {}", c.name),
                "NameConflict",
                format!("bound to {}: not served", ips.join(" and ")),
            );
            if existing.get(&key).map(|e| (&e.reason, &e.message))
                != Some((&cond.reason, &cond.message))
            {
                tx.put_condition(&key, &cond)?;
            }
            keep.insert(key);
        }
        for key in existing.keys() {
            if key.starts_with("dns/") && !keep.contains(key) {
                tx.remove_condition(key)?;
            }
        }
        Ok(())
    })?;
    Ok((zone.len() - conflicts.len(), !conflicts.is_empty()))
}

/// Follows the store until `shutdown` turns true.
pub async fn keep_in_sync(
    store: Arc<Store>,
    dns: Arc<DnsServer>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut changes = store.subscribe();
    // Conditions may be left from a previous run: look once.
    let mut conflicts = true;
    match sync_once(&store, &dns, conflicts) {
        Ok((_, c)) => conflicts = c,
        Err(e) => tracing::warn!(error = %e, "could not set the DNS zone"),
    }
    loop {
        let got = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            got = changes.recv() => got,
        };
        match got {
            Some(tables) if tables.iter().any(|t| WATCHED.contains(t)) => {
                tokio::time::sleep(SETTLE).await;
                while changes.try_recv().is_ok() {}
                match sync_once(&store, &dns, conflicts) {
                    Ok((_, c)) => conflicts = c,
                    Err(e) => tracing::warn!(error = %e, "could not update the DNS zone"),
                }
            }
            Some(_) => {}
            None => return,
        }
    }
}

/// Resolvers named by a resolv.conf text (`nameserver` lines), port 53; the embedded server
/// forwards names outside its zone to them. Loopback resolvers (a local stub resolver) are
/// kept; the caller must not point them back at the embedded server.
pub fn resolvers_from_resolv_conf(text: &str) -> Vec<std::net::SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or("").trim();
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
                .map(|ip| std::net::SocketAddr::new(ip, 53))
        })
        .collect()
}

/// The embedded DNS server's settings from aos_cm.cfg: it listens on `dnsIp` (`ip` for port
/// 53, or `ip:port`) and forwards other names to the resolvers of `resolv_conf` (the host's
/// /etc/resolv.conf); `None` when `dnsIp` is unset (no DNS server). Instances get the listen
/// address as their DNS server.
pub fn dns_config(
    dns_ip: &str,
    resolv_conf: Option<&str>,
) -> Result<Option<crate::api::dns::DnsConfig>, String> {
    let dns_ip = dns_ip.trim();
    if dns_ip.is_empty() {
        return Ok(None);
    }
    let listen = dns_ip
        .parse::<std::net::SocketAddr>()
        .or_else(|_| {
            dns_ip
                .parse::<std::net::IpAddr>()
                .map(|ip| std::net::SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("dnsIp: {dns_ip:?} is not an IP address or ip:port"))?;
    let mut config = crate::api::dns::DnsConfig::new(listen);
    config.upstream = resolv_conf
        .map(resolvers_from_resolv_conf)
        .unwrap_or_default()
        .into_iter()
        .filter(|r| *r != listen)
        .collect();
    Ok(Some(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_config_from_dns_ip_and_resolv_conf() {
        assert!(dns_config("", None).unwrap().is_none());
        let c = dns_config(
            "10.0.0.100",
            Some("nameserver 192.0.2.1\nnameserver 10.0.0.100\n"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.listen.to_string(), "10.0.0.100:53");
        // The server never forwards to itself.
        assert_eq!(
            c.upstream.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            vec!["192.0.2.1:53"]
        );
        let c = dns_config("127.0.0.1:5353", None).unwrap().unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:5353");
        assert!(
            c.upstream.is_empty(),
            "no resolvers: names outside the zone are refused"
        );
        let e = dns_config("ten.zero", None).unwrap_err();
        assert!(e.contains("dnsIp"), "{e}");
    }

    #[test]
    fn resolv_conf_nameservers_in_order() {
        let text = "# generated\nsearch lan\nnameserver 192.0.2.53\nnameserver  2001:db8::1 # v6\n;nameserver 198.51.100.1\nnameserver bogus\noptions ndots:1\n";
        let got: Vec<String> = resolvers_from_resolv_conf(text)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(got, vec!["192.0.2.53:53", "[2001:db8::1]:53"]);
        assert!(resolvers_from_resolv_conf("").is_empty());
    }
}
