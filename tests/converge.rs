//! The plans converge: carrying out every action of a scenario's plan (with nodes that report
//! what they were asked to run) leads to an empty plan.

use aos_cm::model::*;
use aos_cm::reconcilers::{CHAIN, plan_one, project};
use aos_cm::scenario;
use std::path::Path;

fn converge(dir: &Path) -> (Snapshot, usize) {
    let sc = scenario::load(dir).unwrap();
    let mut snap = sc.snapshot;
    for round in 0..8 {
        let mut acted = false;
        for kind in CHAIN {
            let plan = plan_one(kind, &snap, sc.now);
            for a in &plan.actions {
                project::apply_as_unit(&mut snap, a, sc.now);
                acted = true;
            }
        }
        if !acted {
            return (snap, round);
        }
    }
    panic!("{} did not converge in 8 rounds", dir.display());
}

#[test]
fn fresh_install_converges_with_expected_placement() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/desired-states/fresh-install");
    let (snap, rounds) = converge(&dir);
    assert!(rounds <= 3, "took {rounds} rounds");
    let node_of = |item: &str, i: u64| {
        let ident = snap
            .allocations
            .instances
            .keys()
            .find(|k| k.item_id.starts_with(item) && k.instance == i)
            .unwrap()
            .clone();
        let p = &snap.allocations.instances[&ident];
        (p.node_id.clone(), p.runtime_type.clone())
    };
    // Example README, "Expected CM behaviour" table.
    assert_eq!(node_of("8f3a6b2c", 0), ("main".into(), "crun".into())); // gateway
    assert_eq!(node_of("2d7c4e1a", 0), ("main".into(), "crun".into())); // telemetry
    assert_eq!(node_of("2d7c4e1a", 1), ("main".into(), "crun".into()));
    assert_eq!(
        node_of("c41e9d7b", 0),
        ("secondary-1".into(), "runc".into())
    ); // vision
    let boots: Vec<_> = (0..2).map(|i| node_of("e7b2a5d9", i)).collect();
    assert_eq!(
        boots,
        vec![
            ("secondary-1".into(), "boot".into()),
            ("secondary-2".into(), "boot".into())
        ]
    );
    // Items installed, all blobs present, two networks.
    assert_eq!(
        snap.observed
            .items
            .values()
            .filter(|i| i.state == ItemState::Installed)
            .count(),
        5
    );
    assert_eq!(snap.allocations.networks.len(), 2);
}
