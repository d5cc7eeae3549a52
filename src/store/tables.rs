//! Table names, used by the runner to decide which reconcilers to wake: a committed write
//! announces the names of the tables it changed.
//!
//! Every table maps a string key to the serde_json bytes of a model value. Singletons (the
//! desired state, the unit config status, ...) live under the key [`CURRENT`].

/// Schema version record (`schema_version` → u32). Never announced.
pub const META: &str = "meta";
/// The cloud's desired state (singleton, absent until the first `desiredStatus`).
pub const DESIRED: &str = "desired";
/// Observed nodes by node ID.
pub const NODES: &str = "nodes";
/// Instances as the SMs last reported them, by instance ident.
pub const REPORTED_INSTANCES: &str = "reported_instances";
/// The installed unit config status (singleton).
pub const UNIT_CONFIG: &str = "unit_config";
/// Items the unit holds, by item ID and version.
pub const ITEMS: &str = "items";
/// Blobs present in the content-addressed store, by digest.
pub const BLOBS: &str = "blobs";
/// Subjects IAM reports as unit subjects, by subject ID.
pub const UNIT_SUBJECTS: &str = "unit_subjects";
/// IPv4 routes of the host (singleton list).
pub const HOST_ROUTES: &str = "host_routes";
/// Parsed item images, by index digest.
pub const CATALOGUE: &str = "catalogue";
/// Instance placements (node, runtime, UID, reservation), by instance ident.
pub const PLACEMENTS: &str = "placements";
/// GIDs, by item ID.
pub const GIDS: &str = "gids";
/// Network allocations (subnet, VLAN, host IPs), by network ID.
pub const NETWORKS: &str = "networks";
/// Instance addresses, by instance ident.
pub const INSTANCE_IPS: &str = "instance_ips";
/// Firewall rules, by instance ident.
pub const FIREWALL: &str = "firewall";
/// Conditions (why something has not converged), by the caller's key.
pub const CONDITIONS: &str = "conditions";
/// Update progress for the update scheduler (singleton).
pub const UPDATE_PROGRESS: &str = "update_progress";
/// Plan settings (singleton).
pub const SETTINGS: &str = "settings";
/// Network parameters SMs sent for their instances, by instance ident.
pub const NETWORK_PARAMS: &str = "network_params";

/// Where the journal alerts reader stands (singleton: the journal cursor of the last entry it
/// handled). Bookkeeping of one task, not state anyone reacts to: never announced.
pub const JOURNAL_CURSOR: &str = "journal_cursor";

/// The key of the record in a singleton table.
pub const CURRENT: &str = "current";

/// Every data table of the current schema (everything but [`META`]), in a fixed order.
pub const ALL: [&str; 19] = [
    DESIRED,
    NODES,
    REPORTED_INSTANCES,
    UNIT_CONFIG,
    ITEMS,
    BLOBS,
    UNIT_SUBJECTS,
    HOST_ROUTES,
    CATALOGUE,
    PLACEMENTS,
    GIDS,
    NETWORKS,
    INSTANCE_IPS,
    FIREWALL,
    CONDITIONS,
    UPDATE_PROGRESS,
    SETTINGS,
    NETWORK_PARAMS,
    JOURNAL_CURSOR,
];

/// Tables whose changes are committed like any other but not announced to subscribers: their
/// records are private to the task that writes them.
pub const UNANNOUNCED: [&str; 1] = [JOURNAL_CURSOR];
