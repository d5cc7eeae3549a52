//! `communicationmanager.v3.UpdateSchedulerService` over the scheduler: the wire conversion
//! of the statuses and the server on its own listener (plaintext, meant for loopback).

use super::{Scheduler, SchedulerError, StatusChange};
use crate::api::proto::common::v1 as common;
use crate::api::proto::communicationmanager::v3 as pb;
use crate::model::{UpdateKind, UpdateState};
use crate::reconcilers::schedule::UpdateStatus;
use pb::scheduler_notifications::SchedulerNotification;
use pb::update_scheduler_service_server::{UpdateSchedulerService, UpdateSchedulerServiceServer};
use std::pin::Pin;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

/// Aos error code "failed" (index 1 of the C++ `ErrorEnum`).
const AOS_FAILED: i32 = 1;

fn state(s: UpdateState) -> i32 {
    let v = match s {
        UpdateState::NoUpdate => pb::UpdateState::NoUpdate,
        UpdateState::Downloading => pb::UpdateState::Downloading,
        UpdateState::ReadyToUpdate => pb::UpdateState::ReadyToUpdate,
        UpdateState::Updating => pb::UpdateState::Updating,
    };
    v as i32
}

fn error(e: Option<&String>) -> Option<common::ErrorInfo> {
    e.map(|message| common::ErrorInfo {
        aos_code: AOS_FAILED,
        exit_code: 0,
        message: message.clone(),
    })
}

pub fn fota_status(st: &UpdateStatus) -> pb::UpdateFotaStatus {
    pb::UpdateFotaStatus {
        state: state(st.state),
        components: st
            .components
            .iter()
            .map(|(id, t, v)| pb::ComponentInfo {
                component_id: id.clone(),
                component_type: t.clone(),
                version: v.clone(),
            })
            .collect(),
        error: error(st.error.as_ref()),
    }
}

pub fn sota_status(st: &UpdateStatus) -> pb::UpdateSotaStatus {
    let services = |list: &[(String, String)]| -> Vec<pb::ServiceInfo> {
        list.iter()
            .map(|(id, v)| pb::ServiceInfo {
                service_id: id.clone(),
                version: v.clone(),
            })
            .collect()
    };
    let layers = |list: &[(String, String, String)]| -> Vec<pb::LayerInfo> {
        list.iter()
            .map(|(id, d, v)| pb::LayerInfo {
                layer_id: id.clone(),
                digest: d.clone(),
                version: v.clone(),
            })
            .collect()
    };
    pb::UpdateSotaStatus {
        state: state(st.state),
        unit_config: st
            .unit_config
            .as_ref()
            .map(|v| pb::UnitConfigInfo { version: v.clone() }),
        install_services: services(&st.install_services),
        remove_services: services(&st.remove_services),
        install_layers: layers(&st.install_layers),
        remove_layers: layers(&st.remove_layers),
        rebalance_request: false,
        error: error(st.error.as_ref()),
    }
}

fn notification(kind: UpdateKind, st: &UpdateStatus) -> pb::SchedulerNotifications {
    let n = match kind {
        UpdateKind::Sota => SchedulerNotification::SotaStatus(sota_status(st)),
        UpdateKind::Fota => SchedulerNotification::FotaStatus(fota_status(st)),
    };
    pb::SchedulerNotifications {
        scheduler_notification: Some(n),
    }
}

#[derive(Clone)]
pub struct SchedulerService {
    scheduler: Arc<Scheduler>,
}

impl SchedulerService {
    pub fn new(scheduler: Arc<Scheduler>) -> Self {
        SchedulerService { scheduler }
    }

    fn start(&self, kind: UpdateKind) -> Result<Response<()>, Status> {
        match self.scheduler.start_update(kind) {
            Ok(()) => Ok(Response::new(())),
            Err(e @ SchedulerError::NotReady { .. }) => {
                Err(Status::failed_precondition(e.to_string()))
            }
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }
}

type NotificationStream =
    Pin<Box<dyn Stream<Item = Result<pb::SchedulerNotifications, Status>> + Send>>;

#[tonic::async_trait]
impl UpdateSchedulerService for SchedulerService {
    async fn start_fota_update(&self, _: Request<()>) -> Result<Response<()>, Status> {
        self.start(UpdateKind::Fota)
    }

    async fn start_sota_update(&self, _: Request<()>) -> Result<Response<()>, Status> {
        self.start(UpdateKind::Sota)
    }

    type SubscribeNotificationsStream = NotificationStream;

    async fn subscribe_notifications(
        &self,
        _: Request<()>,
    ) -> Result<Response<NotificationStream>, Status> {
        let (current, mut changes) = self.scheduler.subscribe();
        let scheduler = self.scheduler.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let initial = [
                notification(UpdateKind::Fota, &current.fota),
                notification(UpdateKind::Sota, &current.sota),
            ];
            for n in initial {
                if tx.send(Ok(n)).await.is_err() {
                    return;
                }
            }
            loop {
                let n = match changes.recv().await {
                    Ok(StatusChange { kind, status }) => vec![notification(kind, &status)],
                    // Too slow to follow every change: send where both stand now.
                    Err(RecvError::Lagged(_)) => {
                        let now = scheduler.statuses();
                        vec![
                            notification(UpdateKind::Fota, &now.fota),
                            notification(UpdateKind::Sota, &now.sota),
                        ]
                    }
                    Err(RecvError::Closed) => return,
                };
                for n in n {
                    if tx.send(Ok(n)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves the update scheduler on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    scheduler: Arc<Scheduler>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .add_service(UpdateSchedulerServiceServer::new(SchedulerService::new(
            scheduler,
        )))
        .serve_with_incoming_shutdown(crate::api::grpc_incoming(listener), shutdown)
        .await
}
