//! A one-shot StateExport: runs once; its status keeps the result for good; a failed attempt is
//! retried with backoff until `backoffLimit`, then Failed for good.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::status::{failed, write_status};
use super::verification;
use crate::api::labels::SCHEDULE_LABEL;
use crate::api::phases;
use crate::api::state_export::{StateExport, StateExportStatus};
use crate::controller::access::{self, OperatedStore, file_url, resolve_destination};
use crate::controller::conditions::{Desired, READY, RECONCILING, STALLED};
use crate::controller::context::{Context, ReconcileError};
use crate::engine::{
    Compression, Destination, Error as EngineError, ExportFormat, ExportOptions, ExportReport,
    MeltanoLocks, Recipients, prefix_url, redact,
};

/// The reconcile ends here, with this result.
type Done = Result<Action, ReconcileError>;

pub(super) async fn reconcile(
    export: Arc<StateExport>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let namespace = export.namespace().ok_or(ReconcileError::NotNamespaced)?;
    let previous = export.status.clone().unwrap_or_default();
    // Finished exports are never run again; one written is still verified when asked.
    if phases::export_is_finished(previous.phase.as_deref()) {
        if verification::pending(&export) {
            return verification::resume(&export, &ctx, &namespace).await;
        }
        return Ok(Action::await_change());
    }
    // A retry waits for its backoff even when a watch event (our own status write) wakes us.
    if let Some(wait) = retry_wait(&previous, ctx.now()) {
        return Ok(Action::requeue(wait));
    }
    let mut attempt = Attempt::new(&ctx, &export, namespace, previous);
    let (destination, store) = match attempt.prepare().await {
        Ok(prepared) => prepared,
        Err(done) => return done,
    };
    attempt.run(&destination, store).await
}

/// One reconcile of a one-shot export: the object, where it writes, and its status so far.
struct Attempt<'a> {
    ctx: &'a Context,
    export: &'a StateExport,
    namespace: String,
    url: String,
    /// Meltano's backend layout is a folder the export writes into; every other format, one file.
    to_folder: bool,
    previous: StateExportStatus,
    status: StateExportStatus,
    /// The age public keys the file is encrypted to (none: not encrypted).
    recipients: Recipients,
}

impl<'a> Attempt<'a> {
    fn new(
        ctx: &'a Context,
        export: &'a StateExport,
        namespace: String,
        previous: StateExportStatus,
    ) -> Self {
        let spec = &export.spec;
        let to_folder = ExportFormat::from(spec.format) == ExportFormat::MeltanoBackend;
        let url = if to_folder {
            prefix_url(&spec.destination.url).to_owned()
        } else {
            file_url(
                &spec.destination.url,
                &export.name_any(),
                &spec.file_extension(),
            )
        };
        let status = StateExportStatus {
            observed_generation: export.meta().generation,
            url: Some(url.clone()),
            ..previous.clone()
        };
        Self {
            ctx,
            export,
            namespace,
            url,
            to_folder,
            previous,
            status,
            recipients: Recipients::default(),
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.export.name_any())
    }

    /// Everything an attempt needs, checked before one is spent: the destination, the store
    /// (connected and ready), no file to overwrite, nothing left of an interrupted attempt, an
    /// attempt left.
    async fn prepare(&mut self) -> Result<(Destination, OperatedStore), Done> {
        let spec = &self.export.spec;
        let destination = match resolve_destination(
            self.ctx,
            &self.namespace,
            &spec.destination,
            &self.url,
        )
        .await
        {
            Ok(destination) => destination,
            // A destination that cannot work never will: fail for good, now. A missing
            // Secret may still appear: stay Pending.
            Err(problem) => {
                return Err(self
                    .stop(problem.reason, &problem.message, problem.permanent)
                    .await);
            }
        };
        if let Some(encryption) = &spec.encryption {
            match access::read_recipients(self.ctx, &self.namespace, encryption).await {
                Ok(recipients) => self.recipients = recipients,
                // A missing Secret may still appear; a key that is not one never will.
                Err(problem) => {
                    return Err(self
                        .stop(problem.reason, &problem.message, problem.permanent)
                        .await);
                }
            }
        }
        let store = match access::store_for_operation(
            self.ctx,
            &self.namespace,
            &spec.store_ref.name,
        )
        .await
        {
            Ok(Ok(store)) => store,
            // The store may appear or heal: stay Pending, say why, and look again later.
            Ok(Err((reason, message))) => return Err(self.stop(&reason, &message, false).await),
            Err(error) => return Err(Err(error)),
        };
        self.refuse_to_overwrite(&destination).await?;
        self.wait_until_store_ready(&store).await?;
        self.clean_up_interrupted_attempt(&destination).await?;
        self.fail_when_no_attempt_left().await?;
        Ok((destination, store))
    }

    /// A backup never overwrites a file it did not write: only the first attempt can find one.
    /// (Replacing the state files below a Meltano backend's folder is what that format is for.)
    async fn refuse_to_overwrite(&self, destination: &Destination) -> Result<(), Done> {
        if self.previous.attempts != 0 || self.to_folder {
            return Ok(());
        }
        match destination.exists().await {
            Ok(false) => Ok(()),
            Ok(true) => {
                let message = format!(
                    "{} already exists; refusing to overwrite it (delete it or choose another destination)",
                    self.url
                );
                Err(self.stop("DestinationExists", &message, true).await)
            }
            Err(e) => Err(self.stop(e.reason(), &e.to_string(), false).await),
        }
    }

    /// A store that is not ready yet (its tables not created) is waited for like a missing one:
    /// no attempt is spent on it.
    async fn wait_until_store_ready(&self, store: &OperatedStore) -> Result<(), Done> {
        let Err(e) = store.engine.version().await else {
            return Ok(());
        };
        let message = format!(
            "StateStore \"{}\" is not ready: {}",
            self.export.spec.store_ref.name,
            redact(
                &e.to_string(),
                &store.secrets.iter().map(String::as_str).collect::<Vec<_>>()
            )
        );
        let reason = if e.is_connection_error() {
            e.reason()
        } else {
            "StoreNotReady"
        };
        Err(self.stop(reason, &message, false).await)
    }

    /// What an interrupted attempt left (a multipart upload, a local staging file) goes first,
    /// whether a retry follows or not: nothing is left behind, or billed, for ever.
    async fn clean_up_interrupted_attempt(
        &mut self,
        destination: &Destination,
    ) -> Result<(), Done> {
        if self.previous.attempts == 0 {
            return Ok(());
        }
        if let Err(e) = destination
            .clean_up(self.previous.staging_upload.as_deref())
            .await
        {
            let message = destination.redact(&e.to_string());
            return Err(self.stop(e.reason(), &message, false).await);
        }
        self.status.staging_upload = None;
        Ok(())
    }

    /// An attempt that was interrupted (operator restart) still counts.
    async fn fail_when_no_attempt_left(&self) -> Result<(), Done> {
        let limit = self.export.spec.backoff_limit;
        if self.previous.attempts < limit {
            return Ok(());
        }
        let message = format!(
            "attempt {} of {limit} was interrupted (the operator stopped) and no attempts are left",
            self.previous.attempts
        );
        Err(self.stop("BackoffLimitExceeded", &message, true).await)
    }

    /// Records the attempt, runs the export, and records its outcome.
    async fn run(mut self, destination: &Destination, store: OperatedStore) -> Done {
        let spec = &self.export.spec;
        // A folder is written object by object, with no upload to stage.
        let upload = if self.to_folder {
            None
        } else {
            match destination.begin_upload().await {
                Ok(upload) => Some(upload),
                Err(e) => {
                    let message = destination.redact(&e.to_string());
                    return self.stop(e.reason(), &message, false).await;
                }
            }
        };
        self.status.staging_upload = upload
            .as_ref()
            .and_then(|upload| upload.staging_id())
            .map(str::to_owned);
        self.record_attempt().await?;
        let mut options = ExportOptions {
            environments: (!spec.environments.is_empty()).then(|| spec.environments.clone()),
            compression: Compression::from(spec.compression),
            format: ExportFormat::from(spec.format),
            ..Default::default()
        };
        options.recipients = self.recipients.clone();
        let outcome = match upload {
            Some(upload) => {
                store
                    .engine
                    .export_upload(destination, upload, &options, |_| {})
                    .await
            }
            None => {
                store
                    .engine
                    .export_meltano_backend(destination, &options, MeltanoLocks::default())
                    .await
            }
        };
        // Completed or aborted: no upload of this attempt is left to clean up.
        self.status.staging_upload = None;
        match outcome {
            Ok(report) => self.succeeded(report, destination, &store).await,
            Err(e) => self.attempt_failed(e, destination, &store.secrets).await,
        }
    }

    /// Records the attempt before running it: after a crash, the retry knows it is one (and
    /// which upload to abort). Every attempt is news, a retry after an operator restart
    /// included.
    async fn record_attempt(&mut self) -> Result<(), ReconcileError> {
        let limit = self.export.spec.backoff_limit;
        let url = &self.url;
        self.status.attempts += 1;
        self.status.started_at = Some(self.ctx.now().to_string());
        self.status.phase = Some(phases::RUNNING.into());
        let running = vec![
            Desired::new(READY, false, "ExportRunning", format!("exporting to {url}")),
            Desired::new(
                RECONCILING,
                true,
                "ExportRunning",
                format!("attempt {} of {limit}", self.status.attempts),
            ),
            Desired::new(STALLED, false, "ExportRunning", "the export is running"),
        ];
        self.previous = self.write(self.status.clone(), running).await?;
        let reference = self.export.object_ref(&());
        self.ctx
            .notify_occurrence(
                &reference,
                EventType::Normal,
                "ExportRunning",
                "Export",
                &format!(
                    "attempt {} of {limit}: exporting to {url}",
                    self.status.attempts
                ),
                &format!("status.attempts={}", self.status.attempts),
            )
            .await;
        Ok(())
    }

    async fn succeeded(
        mut self,
        report: ExportReport,
        destination: &Destination,
        store: &OperatedStore,
    ) -> Done {
        let ctx = self.ctx;
        self.status.phase = Some(phases::SUCCEEDED.into());
        self.status.bytes = Some(report.bytes);
        self.status.sha256 = report.sha256.clone();
        self.status.encrypted_to = (report.encrypted_to > 0).then_some(report.encrypted_to);
        self.status.environments = Some(report.environments);
        self.status.schema_version = Some(report.schema_version);
        self.status.duration_ms = Some(report.duration.as_millis() as u64);
        self.status.finished_at = Some(ctx.now().to_string());
        let message = report.summary(&self.url);
        self.status.rows = Some(report.rows);
        ctx.reset_failures(&self.key()).await;
        ctx.metrics.record_export(
            &self.namespace,
            backup_name(self.export),
            "Succeeded",
            report.bytes,
            ctx.now().as_second(),
        );
        if verification::requested(self.export) {
            // Written: recorded first, so that a restart verifies it rather than exporting again.
            let written = self
                .write(self.status.clone(), verification::verifying(&self.url))
                .await?;
            return verification::run(ctx, self.export, &written, destination, store).await;
        }
        let desired = vec![
            Desired::new(READY, true, "ExportSucceeded", message),
            Desired::new(
                RECONCILING,
                false,
                "ExportSucceeded",
                "the export is complete",
            ),
            Desired::new(STALLED, false, "ExportSucceeded", "the export is complete"),
        ];
        self.write(self.status.clone(), desired).await?;
        Ok(Action::await_change())
    }

    /// A failed attempt: retried after a backoff while attempts are left and a retry can help.
    async fn attempt_failed(
        mut self,
        e: EngineError,
        destination: &Destination,
        secrets: &[String],
    ) -> Done {
        let ctx = self.ctx;
        let limit = self.export.spec.backoff_limit;
        let secret_refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
        // A request the store can never serve (a format its framework lacks) is not retried.
        let exhausted = self.status.attempts >= limit
            || matches!(
                e,
                EngineError::UnsupportedFormat { .. } | EngineError::InvalidExportRequest(_)
            );
        let message = format!(
            "attempt {} of {limit} failed: {}",
            self.status.attempts,
            destination.redact(&redact(&e.to_string(), &secret_refs))
        );
        ctx.metrics
            .record_export(&self.namespace, backup_name(self.export), e.reason(), 0, 0);
        self.status.phase = Some(
            if exhausted {
                phases::FAILED
            } else {
                phases::PENDING
            }
            .into(),
        );
        if exhausted {
            self.status.finished_at = Some(ctx.now().to_string());
        }
        self.write(self.status.clone(), failed(e.reason(), &message, exhausted))
            .await?;
        Ok(if exhausted {
            Action::await_change()
        } else {
            Action::requeue(retry_backoff(self.status.attempts))
        })
    }

    /// Writes `status` with these conditions over the last status written.
    async fn write(
        &self,
        status: StateExportStatus,
        desired: Vec<Desired>,
    ) -> Result<StateExportStatus, ReconcileError> {
        let reference = self.export.object_ref(&());
        write_status(
            self.ctx,
            self.export,
            status,
            &self.previous,
            desired,
            &reference,
        )
        .await
    }

    /// Ends a reconcile without running the export: Failed for good (`final_`), or Pending and
    /// looked at again after a backoff.
    async fn stop(&self, reason: &str, message: &str, final_: bool) -> Done {
        let mut status = self.status.clone();
        status.phase = Some(
            if final_ {
                phases::FAILED
            } else {
                phases::PENDING
            }
            .into(),
        );
        if final_ {
            status.finished_at = Some(self.ctx.now().to_string());
        }
        self.write(status, failed(reason, message, final_)).await?;
        if final_ {
            return Ok(Action::await_change());
        }
        Ok(Action::requeue(self.ctx.next_backoff(&self.key()).await))
    }
}

/// Backoff after the n-th failed attempt: 10 s, doubling, at most 5 minutes.
pub fn retry_backoff(attempts: u32) -> Duration {
    Duration::from_secs(
        10u64
            .saturating_mul(1 << attempts.saturating_sub(1).min(10))
            .min(300),
    )
}

/// How long a failed export still has to wait before its next attempt, if at all.
fn retry_wait(previous: &StateExportStatus, now: k8s_openapi::jiff::Timestamp) -> Option<Duration> {
    if previous.attempts == 0 {
        return None;
    }
    let started: k8s_openapi::jiff::Timestamp = previous.started_at.as_deref()?.parse().ok()?;
    let elapsed = Duration::try_from(now.duration_since(started)).unwrap_or_default();
    retry_backoff(previous.attempts)
        .checked_sub(elapsed)
        .filter(|d| !d.is_zero())
}

/// The backup an export belongs to, for metrics: its schedule, or itself.
fn backup_name(export: &StateExport) -> &str {
    export.labels().get(SCHEDULE_LABEL).map_or_else(
        || export.meta().name.as_deref().unwrap_or_default(),
        String::as_str,
    )
}
