//! Replays the fuzz corpora (`fuzz/corpus/<target>/`) through the same entry functions the
//! fuzz targets call (`aos_cm::fuzzing`): no input may panic, and a rejected input must come
//! with a non-empty error.

use aos_cm::api::proto::common::v2 as pbc;
use aos_cm::api::proto::servicemanager::v5 as pb;
use aos_cm::fuzzing;
use prost::Message as _;
use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn replay(target: &str) {
    let Some((_, entry)) = fuzzing::TARGETS.iter().find(|(name, _)| *name == target) else {
        panic!("no fuzz target {target}");
    };
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    let (mut accepted, mut rejected) = (0, 0);
    for file in &files {
        let data = std::fs::read(file).unwrap();
        match std::panic::catch_unwind(|| entry(&data)) {
            Ok(Ok(())) => accepted += 1,
            Ok(Err(e)) => {
                assert!(!e.trim().is_empty(), "{}: empty error", file.display());
                rejected += 1;
            }
            Err(_) => panic!("{} panicked on {}", target, file.display()),
        }
    }
    // The seeds include valid inputs: a corpus that only holds rejects has lost its point.
    assert!(accepted > 0, "{target}: no corpus file was accepted");
    eprintln!("{target}: {accepted} accepted, {rejected} rejected");
}

#[test]
fn fuzz_corpus_cloud_frame() {
    replay("cloud_frame");
}

#[test]
fn fuzz_corpus_unit_config() {
    replay("unit_config");
}

#[test]
fn fuzz_corpus_config_file() {
    replay("config_file");
}

#[test]
fn fuzz_corpus_desired_plan() {
    replay("desired_plan");
}

#[test]
fn fuzz_corpus_sm_message() {
    replay("sm_message");
}

fn ident(item: &str, subject: &str, instance: u64) -> Option<pbc::InstanceIdent> {
    Some(pbc::InstanceIdent {
        item_id: item.into(),
        subject_id: subject.into(),
        instance,
        ..Default::default()
    })
}

/// Writes the seed messages of the `sm_message` target (run once, then `cargo fuzz cmin`):
/// `cargo nextest run --test fuzz_corpus -- --ignored write_sm_seeds`.
#[test]
#[ignore = "writes fuzz seeds"]
fn write_sm_seeds() {
    use pb::sm_outgoing_messages::SmOutgoingMessage as Out;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/desired-states/fresh-install");
    let mut snap = aos_cm::scenario::load(&dir).unwrap().snapshot;
    let mut seeds: Vec<Out> = aos_cm::sim::unit::before_sms_connect(&mut snap)
        .into_iter()
        .map(|(node, info)| Out::SmInfo(aos_cm::api::sm::convert::sm_info_to_pb(&node, &info)))
        .collect();
    let status = |state: &str| pb::InstanceStatus {
        instance: ident("svc1", "subj1", 0),
        version: "1.0.0".into(),
        runtime_id: "runc".into(),
        state: state.into(),
        error: Some(pbc::ErrorInfo {
            aos_code: 1,
            exit_code: 2,
            message: "failed".into(),
        }),
        ..Default::default()
    };
    seeds.push(Out::NodeInstancesStatus(pb::NodeInstancesStatus {
        instances: vec![status("active"), status("failed")],
    }));
    seeds.push(Out::UpdateInstancesStatus(pb::UpdateInstancesStatus {
        instances: vec![status("activating"), status("bogus")],
    }));
    seeds.push(Out::NodeConfigStatus(pb::NodeConfigStatus {
        version: "1.0.0".into(),
        ..Default::default()
    }));
    seeds.push(Out::Log(pb::LogData {
        correlation_id: "log-1".into(),
        part: 1,
        part_count: 2,
        data: b"line\n".to_vec(),
        status: "ok".into(),
        ..Default::default()
    }));
    let sample = pb::MonitoringData {
        ram: 1024,
        cpu: 50,
        download: 1,
        upload: 2,
        timestamp: Some(prost_types::Timestamp {
            seconds: 1_780_000_000,
            nanos: 5,
        }),
        partitions: vec![pb::PartitionUsage {
            name: "storages".into(),
            used_size: 10,
        }],
    };
    seeds.push(Out::InstantMonitoring(pb::InstantMonitoring {
        node_monitoring: Some(sample.clone()),
        instances_monitoring: vec![pb::InstanceMonitoring {
            instance: ident("svc1", "subj1", 0),
            monitoring_data: Some(sample.clone()),
            ..Default::default()
        }],
    }));
    seeds.push(Out::AverageMonitoring(pb::AverageMonitoring {
        node_monitoring: Some(sample),
        instances_monitoring: Vec::new(),
    }));
    let alert = |item| {
        Out::Alert(pb::Alert {
            timestamp: Some(prost_types::Timestamp {
                seconds: 1_780_000_000,
                nanos: 0,
            }),
            alert_item: Some(item),
        })
    };
    use pb::alert::AlertItem as A;
    seeds.push(alert(A::SystemAlert(pb::SystemAlert {
        message: "disk".into(),
    })));
    seeds.push(alert(A::CoreAlert(pb::CoreAlert {
        core_component: "SM".into(),
        message: "restart".into(),
    })));
    seeds.push(alert(A::SystemQuotaAlert(pb::SystemQuotaAlert {
        parameter: "cpu".into(),
        value: 90,
        status: "raise".into(),
    })));
    seeds.push(alert(A::InstanceQuotaAlert(pb::InstanceQuotaAlert {
        instance: ident("svc1", "subj1", 0),
        parameter: "ram".into(),
        value: 90,
        status: "raise".into(),
    })));
    seeds.push(alert(A::ResourceAllocateAlert(pb::ResourceAllocateAlert {
        instance: ident("svc1", "subj1", 0),
        resource: "gpu".into(),
        message: "busy".into(),
    })));
    seeds.push(alert(A::InstanceAlert(pb::InstanceAlert {
        instance: ident("svc1", "subj1", 0),
        service_version: "1.0.0".into(),
        message: "crash".into(),
    })));
    let out = corpus_dir("sm_message");
    std::fs::create_dir_all(&out).unwrap();
    for (n, seed) in seeds.into_iter().enumerate() {
        let bytes = pb::SmOutgoingMessages {
            sm_outgoing_message: Some(seed),
        }
        .encode_to_vec();
        std::fs::write(out.join(format!("seed-{n:02}")), bytes).unwrap();
    }
}
