//! Crash safety of the store.
//!
//! The parent test runs this same test binary again as a child (`crash_child`, selected with
//! `--exact` and switched on by `AOS_CM_CRASH_CHILD=<dir>`). The child opens the store and
//! commits in a loop, each commit a coherent multi-table state for a counter N, printing
//! `committed N` once `Store::write` has returned. The parent reads the child's output until it
//! has seen enough commits, kills the child with SIGKILL, reopens the store and checks that it
//! opens, that the last announced commit is there (or the one in flight, which may have reached
//! the file before the print), and that every table agrees on N. Three rounds on one store, so
//! each round also opens a store that was left by a killed process.
//!
//! SIGKILL stops the process, not the machine: this checks that a commit is atomic and that a
//! store left mid-transaction reopens, not that the disk honours fsync (redb's `Immediate`
//! durability is trusted for that).

use aos_cm::model::*;
use aos_cm::store::{SCHEMA_VERSION, Store, UpdateProgress};
use core::net::Ipv4Addr;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

const CHILD_ENV: &str = "AOS_CM_CRASH_CHILD";
const CHILD_TEST: &str = "crash_child";
const DB_FILE: &str = "cm.redb";
/// Commits the parent waits for before it kills the child, per round.
const MIN_COMMITS: u64 = 50;
/// A bound on the child's loop, so that an orphaned child cannot run for ever.
const MAX_COMMITS: u64 = 1_000_000;

fn digest_for(n: u64) -> Digest {
    Digest::parse(&format!("sha256:{n:064x}")).unwrap()
}

/// The whole state of commit `n`. Every table it touches carries something derived from `n`,
/// and the set of instances and blobs changes from one commit to the next, so that a commit
/// both inserts and deletes records.
fn snapshot_for(n: u64) -> Snapshot {
    let mut s = Snapshot {
        desired: Some(DesiredState {
            correlation_id: Some(n.to_string()),
            ..DesiredState::default()
        }),
        ..Snapshot::default()
    };
    s.observed.nodes.insert(
        "node0".to_string(),
        ObservedNode {
            info: NodeInfo {
                node_id: "node0".to_string(),
                title: format!("commit {n}"),
                state: NodeState::Provisioned,
                ..NodeInfo::default()
            },
            sm: None,
            node_config: None,
            connection: Connection::Connected,
            usage: None,
        },
    );
    s.observed.blobs.insert(digest_for(n));
    s.observed.blobs.insert(digest_for(n + 1));
    // One to four instances, depending on n.
    for i in 0..=(n % 4) {
        let ident = InstanceIdent::new("svc", "subj", i);
        s.allocations.instances.insert(
            ident.clone(),
            InstancePlacement {
                ident: ident.clone(),
                node_id: "node0".to_string(),
                runtime_id: "crun".to_string(),
                runtime_type: "crun".to_string(),
                manifest_digest: digest_for(n),
                version: n.to_string(),
                uid: UID_FIRST + (n % 4000) as u32 + i as u32,
                gid: GID_FIRST + (n % 4000) as u32,
                requested: Reservation::default(),
                env: Vec::new(),
            },
        );
        s.allocations.instance_ips.insert(
            ident,
            InstanceAddress {
                network_id: "sp".to_string(),
                node_id: "node0".to_string(),
                ip: Ipv4Addr::from(0x0a00_0000 + (n % 60_000) as u32 * 4 + i as u32 + 2),
            },
        );
    }
    s.allocations
        .gids
        .insert("svc".to_string(), GID_FIRST + (n % 4000) as u32);
    s.allocations.networks.insert(
        "sp".to_string(),
        NetworkAllocation {
            subnet: Ipv4Net::parse("10.0.0.0/8").unwrap(),
            vlan_id: 1 + (n % 4094) as u16,
            hosts: BTreeMap::from([(
                "node0".to_string(),
                Ipv4Addr::from(0x0a00_0000 + (n % 60_000) as u32 * 4 + 1),
            )]),
            sm_hosts: Default::default(),
        },
    );
    s.progress = progress_for(n);
    s
}

fn progress_for(n: u64) -> UpdateProgress {
    UpdateProgress {
        state: "DOWNLOADING".to_string(),
        correlation_id: Some(n.to_string()),
        ..UpdateProgress::default()
    }
}

fn condition_for(n: u64) -> Condition {
    Condition::new("unit", "Committing", format!("commit {n}"))
}

/// The counter of the last commit in the store, from the desired state.
fn stored_n(store: &Store) -> Option<u64> {
    let desired = store.read(|r| r.desired()).unwrap()?;
    Some(desired.correlation_id?.parse().unwrap())
}

/// Every table agrees with commit `n`.
fn assert_coherent(store: &Store, n: u64) {
    assert_eq!(
        store.snapshot().unwrap(),
        snapshot_for(n),
        "snapshot of commit {n}"
    );
    assert_eq!(store.update_progress().unwrap(), Some(progress_for(n)));
    assert_eq!(
        store.conditions().unwrap(),
        BTreeMap::from([("commit".to_string(), condition_for(n))])
    );
}

/// The child: commits until killed. Does nothing in a normal test run.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let store = Store::open(&Path::new(&dir).join(DB_FILE)).unwrap();
    let first = stored_n(&store).map_or(1, |n| n + 1);
    let mut out = std::io::stdout().lock();
    for n in first..first + MAX_COMMITS {
        store
            .write(|tx| {
                tx.set_snapshot(&snapshot_for(n))?;
                tx.set_update_progress(&progress_for(n))?;
                tx.put_condition("commit", &condition_for(n))
            })
            .unwrap();
        // Announced only after the commit returned; a failed write means the parent is gone.
        if writeln!(out, "committed {n}")
            .and_then(|_| out.flush())
            .is_err()
        {
            return;
        }
    }
}

/// The counter of a `committed N` line. libtest may print `test crash_child ... ` on the same
/// line before the first one.
fn committed(line: &str) -> Option<u64> {
    let (_, n) = line.split_once("committed ")?;
    Some(n.trim().parse().unwrap())
}

/// Runs the child until it has announced `min` commits, kills it, and returns the last
/// commit it announced (including lines still in the pipe when it died).
fn run_child_and_kill(dir: &Path, min: u64) -> u64 {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = 0;
    let mut last = None;
    while seen < min {
        let Some(line) = lines.next() else { break };
        if let Some(n) = committed(&line.unwrap()) {
            last = Some(n);
            seen += 1;
        }
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    // Whatever the child printed before it died counts as announced.
    for line in lines {
        if let Some(n) = committed(&line.unwrap()) {
            last = Some(n);
        }
    }
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        seen >= min,
        "the child stopped after {seen} commits ({status}); stderr:\n{stderr}"
    );
    assert_eq!(
        status.signal(),
        Some(9),
        "the child was not killed: {status}"
    );
    last.unwrap()
}

#[test]
fn store_survives_sigkill_during_commits() {
    let dir = tempfile::tempdir().unwrap();
    let mut previous = 0;
    for round in 1..=3 {
        let announced = run_child_and_kill(dir.path(), MIN_COMMITS);
        let store = Store::open(&dir.path().join(DB_FILE)).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        let stored = stored_n(&store).unwrap();
        assert!(
            stored == announced || stored == announced + 1,
            "round {round}: the store holds commit {stored}, the child announced {announced}"
        );
        assert!(
            stored >= previous + MIN_COMMITS,
            "round {round}: commit {stored} after {previous}: the child did not continue"
        );
        assert_coherent(&store, stored);
        previous = stored;
    }
}
