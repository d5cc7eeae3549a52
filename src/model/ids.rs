//! Identities and the enumerations shared by the desired and observed state.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Milliseconds since the Unix epoch. Time enters the pure core only as a value of this type.
pub type UnixMillis = i64;

pub type ItemId = String;
pub type SubjectId = String;
pub type NodeId = String;
pub type RuntimeId = String;
/// A network is identified by the owner (service provider) of the items in it.
pub type NetworkId = String;

/// A content digest as written in OCI descriptors: `sha256:<64 lower-case hex>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Digest(String);

impl Digest {
    /// Accepts `sha256:` followed by exactly 64 hex digits (upper case is normalised).
    pub fn parse(s: &str) -> Result<Digest, String> {
        let Some(hex) = s.strip_prefix("sha256:") else {
            return Err(format!("digest {s:?} does not start with \"sha256:\""));
        };
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "digest {s:?} is not sha256: followed by 64 hex digits"
            ));
        }
        Ok(Digest(format!("sha256:{}", hex.to_ascii_lowercase())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hex part, as used in the content-addressed file name.
    pub fn hex(&self) -> &str {
        self.0.split_once(':').map(|(_, h)| h).unwrap_or(&self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identity of one instance of an item run for a subject.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InstanceIdent {
    pub item_id: ItemId,
    pub subject_id: SubjectId,
    pub instance: u64,
}

impl InstanceIdent {
    pub fn new(item_id: &str, subject_id: &str, instance: u64) -> Self {
        InstanceIdent {
            item_id: item_id.to_string(),
            subject_id: subject_id.to_string(),
            instance,
        }
    }
}

impl fmt::Display for InstanceIdent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.item_id, self.subject_id, self.instance)
    }
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every wire string of this enumeration, in declaration order.
            pub const ALL: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses the exact wire string (enum strings are case-sensitive upstream).
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// Kind of an update item (v7 `UpdateItemType`).
    ItemType {
        Service = "service",
        Component = "component",
        Layer = "layer",
        Subject = "subject",
        Oem = "oem",
        Sp = "sp",
        Fleet = "fleet",
        Node = "node",
        NodeSubject = "node-subject",
        Runtime = "runtime",
    }
);

string_enum!(
    /// State of an update item on the unit.
    ItemState {
        Unknown = "unknown",
        Downloading = "downloading",
        Pending = "pending",
        Installing = "installing",
        Installed = "installed",
        Removing = "removing",
        Removed = "removed",
        Failed = "failed",
    }
);

string_enum!(
    /// State of an instance as reported by its SM.
    InstanceState {
        Activating = "activating",
        Active = "active",
        Inactive = "inactive",
        Failed = "failed",
    }
);

string_enum!(
    /// State of a node as IAM and the CM see it.
    NodeState {
        Unprovisioned = "unprovisioned",
        Provisioned = "provisioned",
        Paused = "paused",
        Error = "error",
    }
);

string_enum!(
    /// The node state the cloud asks for.
    DesiredNodeState {
        Provisioned = "provisioned",
        Paused = "paused",
    }
);

string_enum!(
    /// State of the installed unit config.
    UnitConfigState {
        Absent = "absent",
        Installed = "installed",
        Failed = "failed",
    }
);

string_enum!(
    SubjectType {
        Group = "group",
        User = "user",
    }
);

string_enum!(
    /// Item config `balancingPolicy`.
    BalancingPolicy {
        Enabled = "enabled",
        Disabled = "disabled",
    }
);

// The enums above come from a macro, which cannot mark a variant `#[default]`.
#[allow(clippy::derivable_impls)]
impl Default for BalancingPolicy {
    fn default() -> Self {
        BalancingPolicy::Enabled
    }
}

#[allow(clippy::derivable_impls)]
impl Default for NodeState {
    fn default() -> Self {
        NodeState::Unprovisioned
    }
}
