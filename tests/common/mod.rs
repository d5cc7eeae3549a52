//! Shared harness for integration tests over loopback: `aos_cm::sim::unit::SimUnit` seeded
//! from a scenario folder, in a temporary directory.
#![allow(dead_code)]

pub mod process;

use aos_cm::api::sm::SmConfig;
use aos_cm::api::sm::server::TlsPem;
use aos_cm::model::*;
use aos_cm::scenario;
use aos_cm::sim::sm::{SimOptions, SimSm};
use aos_cm::sim::unit::{self, SimUnit};
use aos_cm::store::Store;
use std::path::Path;
use std::time::Duration;
use tonic::transport::Channel;

#[allow(unused_imports)]
pub use aos_cm::sim::unit::converged;

pub struct Unit {
    pub unit: SimUnit,
    pub store: std::sync::Arc<Store>,
    pub sm: aos_cm::api::sm::SmController,
    pub addr: std::net::SocketAddr,
    pub nodes: Vec<(String, SmInfo)>,
    _dir: tempfile::TempDir,
}

/// The store as a fresh daemon would have it for a scenario: desired state, IAM's node info
/// (no SM connected yet), the installed unit config, the catalogue and every blob present.
pub fn seed(store: &Store, dir: &Path) -> Vec<(String, SmInfo)> {
    let sc = scenario::load(dir).unwrap();
    let mut snap = sc.snapshot;
    let sms = unit::before_sms_connect(&mut snap);
    store.write(|tx| tx.set_snapshot(&snap)).unwrap();
    sms
}

pub fn example(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/desired-states")
        .join(name)
}

impl Unit {
    pub async fn start(scenario_dir: &Path, config: SmConfig, tls: Option<TlsPem>) -> Unit {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cm.redb");
        let nodes = {
            let store = Store::open(&path).unwrap();
            seed(&store, scenario_dir)
        };
        let unit = SimUnit::start(&path, config, tls, unit::quick_runner())
            .await
            .unwrap();
        Unit {
            store: unit.store.clone(),
            sm: unit.sm.clone(),
            addr: unit.addr,
            unit,
            nodes,
            _dir: dir,
        }
    }

    pub async fn channel(&self) -> Channel {
        self.unit.channel().await.unwrap()
    }

    /// A plaintext channel that connects on first use (for refusal tests).
    pub fn channel_lazy(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_lazy()
    }

    pub async fn sim(&self, node: &str, options: SimOptions) -> SimSm {
        let info = self
            .nodes
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, i)| i.clone())
            .unwrap();
        self.unit.sim(node, info, options).await.unwrap()
    }

    /// Waits for a committed state that satisfies `cond`, woken by store changes.
    pub async fn wait_for(
        &self,
        what: &str,
        secs: u64,
        cond: impl Fn(&Snapshot) -> bool,
    ) -> Snapshot {
        match unit::wait_for(&self.store, Duration::from_secs(secs), cond).await {
            Ok(s) => s,
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    }
}

/// A system alert as an SM sends it (at a fixed time).
pub fn system_alert(message: &str) -> aos_cm::api::proto::servicemanager::v5::SmOutgoingMessages {
    use aos_cm::api::proto::servicemanager::v5 as pb;
    pb::SmOutgoingMessages {
        sm_outgoing_message: Some(pb::sm_outgoing_messages::SmOutgoingMessage::Alert(
            pb::Alert {
                timestamp: Some(prost_types::Timestamp {
                    seconds: 1_790_000_000,
                    nanos: 0,
                }),
                alert_item: Some(pb::alert::AlertItem::SystemAlert(pb::SystemAlert {
                    message: message.to_owned(),
                })),
            },
        )),
    }
}
