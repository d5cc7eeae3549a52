//! Stable string encodings of composite map keys.
//!
//! Item and subject IDs come from the cloud and may contain `/`, so components are escaped
//! (`%` → `%25`, `/` → `%2F`) before they are joined with `/`: the encoding is injective and
//! can be decoded back, which the tables keyed by an ident alone (instance IPs, firewall) need.
//! The instance number is zero-padded to 20 digits (all of `u64`) so that the instances of one
//! item and subject sort in numeric order. Nothing relies on the order of keys across items:
//! reads decode into ordered maps.
//!
//! These encodings are part of the on-disk format: changing them needs a migration.

use crate::model::InstanceIdent;

/// Escapes one key component so that it contains no `/`.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
    out
}

/// Reverses [`escape`]; `None` for anything `escape` cannot have produced, so that every
/// stored key has exactly one reading.
pub(crate) fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find(['%', '/']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if tail.starts_with("%25") {
            out.push('%');
        } else if tail.starts_with("%2F") {
            out.push('/');
        } else {
            return None;
        }
        rest = &tail[3..];
    }
    out.push_str(rest);
    Some(out)
}

/// `item/subject/instance`, with the instance zero-padded.
pub(crate) fn ident(ident: &InstanceIdent) -> String {
    format!(
        "{}/{}/{:020}",
        escape(&ident.item_id),
        escape(&ident.subject_id),
        ident.instance
    )
}

pub(crate) fn parse_ident(key: &str) -> Option<InstanceIdent> {
    let mut parts = key.split('/');
    let (item, subject, instance) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || instance.len() != 20
        || !instance.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some(InstanceIdent {
        item_id: unescape(item)?,
        subject_id: unescape(subject)?,
        instance: instance.parse().ok()?,
    })
}

/// `item/version` of a stored item.
pub(crate) fn item(item_id: &str, version: &str) -> String {
    format!("{}/{}", escape(item_id), escape(version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ident_keys_round_trip_and_do_not_collide() {
        let idents = [
            InstanceIdent::new("a/b", "c", 1),
            InstanceIdent::new("a", "b/c", 1),
            InstanceIdent::new("a%2F", "c", 1),
            InstanceIdent::new("", "", 0),
            InstanceIdent::new("svc", "subj", u64::MAX),
        ];
        let keys: Vec<String> = idents.iter().map(ident).collect();
        for (i, k) in idents.iter().zip(&keys) {
            assert_eq!(parse_ident(k).as_ref(), Some(i), "{k}");
        }
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len());
        assert_eq!(
            ident(&InstanceIdent::new("svc", "subj", 7)),
            "svc/subj/00000000000000000007"
        );
    }

    #[test]
    fn instances_of_one_item_sort_numerically() {
        let a = ident(&InstanceIdent::new("svc", "subj", 9));
        let b = ident(&InstanceIdent::new("svc", "subj", 10));
        assert!(a < b);
    }

    #[test]
    fn malformed_keys_are_rejected() {
        for bad in [
            "svc/subj",
            "svc/subj/1",
            "svc/subj/0000000000000000000x",
            "svc/subj/00000000000000000001/x",
            "s%41/subj/00000000000000000001",
            "s%/subj/00000000000000000001",
        ] {
            assert_eq!(parse_ident(bad), None, "{bad}");
        }
    }
}
