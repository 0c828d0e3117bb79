//! What an operation reads besides its store: the file of an import (from its source or a
//! finished StateExport), the store a copy comes from.

use kube::api::Api;

use super::requested::Requested;
use super::run::Run;
use crate::api::common::KeysSecretRef;
use crate::api::phases;
use crate::api::state_export::StateExport;
use crate::api::state_migration::{ExportRef, ImportOperation};
use crate::api::state_store::StateStore;
use crate::controller::access::{
    DestinationProblem, connect_for_operation, read_identities, resolve_destination,
};
use crate::engine::{Destination, Identities, ImportMode, Selection, Store, copy_source_label};

/// The file an import reads, resolved from `import.source` or a finished StateExport.
pub(super) struct ImportInput {
    pub(super) url: String,
    pub(super) expected_sha256: Option<String>,
    pub(super) mode: ImportMode,
    pub(super) destination: Destination,
    /// The age identities that decrypt an encrypted file.
    pub(super) identities: Identities,
    /// A restore in part: `import.environments`, `.models`, `.stateIds`.
    pub(super) selection: Selection,
}

/// Everything an operation needs besides the store: resolved once per reconcile.
pub(super) enum Inputs {
    None,
    Import(ImportInput),
    Copy { source: Store, label: String },
}

/// Why the inputs cannot be used: for now (pending) or for good.
pub(super) enum Stop {
    Pending(String, String),
    Fail(String, String),
}

impl From<DestinationProblem> for Stop {
    /// A Secret that may still appear waits; a destination or key that cannot work fails.
    fn from(problem: DestinationProblem) -> Self {
        if problem.permanent {
            Stop::Fail(problem.reason.into(), problem.message)
        } else {
            Stop::Pending(problem.reason.into(), problem.message)
        }
    }
}

/// The inputs of the requested operation: the file an import reads, the store a copy reads
/// (connected; its secrets join the ones kept out of the status).
pub(super) async fn resolve_inputs(
    run: &mut Run<'_>,
    requested: &Requested,
) -> Result<Inputs, Stop> {
    match requested {
        Requested::Import => {
            let Some(import) = &run.migration.spec.import else {
                return Err(Stop::Fail("InvalidSpec".into(), "no import".into()));
            };
            let (url, spec_destination, expected, identity_ref) =
                match (&import.source, &import.from_export) {
                    (Some(source), _) => (
                        source.url.clone(),
                        source.clone(),
                        import.expected_sha256.clone(),
                        import.identity_secret_ref.clone(),
                    ),
                    (None, Some(export_ref)) => {
                        finished_export_file(run, import, export_ref).await?
                    }
                    (None, None) => {
                        return Err(Stop::Fail(
                            "InvalidSpec".into(),
                            "set either import.source or import.fromExport".into(),
                        ));
                    }
                };
            let destination =
                resolve_destination(run.ctx, &run.namespace, &spec_destination, &url).await?;
            let identities = match &identity_ref {
                Some(secret_ref) => read_identities(run.ctx, &run.namespace, secret_ref).await?,
                None => Identities::default(),
            };
            Ok(Inputs::Import(ImportInput {
                url,
                expected_sha256: expected,
                mode: import.mode.into(),
                destination,
                identities,
                selection: import.selection(),
            }))
        }
        Requested::Copy { store: name } => {
            let stores: Api<StateStore> = Api::namespaced(run.ctx.client.clone(), &run.namespace);
            let source_store = stores
                .get_opt(name)
                .await
                .map_err(|e| Stop::Pending("StoreUnreadable".into(), e.to_string()))?
                .ok_or_else(|| {
                    Stop::Pending(
                        "SourceStoreNotFound".into(),
                        format!(
                            "source StateStore \"{name}\" not found in namespace \"{}\"",
                            run.namespace
                        ),
                    )
                })?;
            let (source, secrets) = connect_for_operation(&source_store, &run.namespace, run.ctx)
                .await
                .map_err(|(reason, message)| Stop::Pending(reason, message))?;
            run.secrets.extend(secrets);
            Ok(Inputs::Copy {
                source,
                label: copy_source_label(name),
            })
        }
        _ => Ok(Inputs::None),
    }
}

/// The file of the finished StateExport an import names (`fromExport`): its url, destination,
/// recorded sha256 and the identity that decrypts it (the import's, else the export's own).
async fn finished_export_file(
    run: &Run<'_>,
    import: &ImportOperation,
    export_ref: &ExportRef,
) -> Result<
    (
        String,
        crate::api::state_export::Destination,
        Option<String>,
        Option<KeysSecretRef>,
    ),
    Stop,
> {
    let exports: Api<StateExport> = Api::namespaced(run.ctx.client.clone(), &run.namespace);
    let export = exports
        .get_opt(&export_ref.name)
        .await
        .map_err(|e| Stop::Pending("ExportUnreadable".into(), e.to_string()))?
        .ok_or_else(|| {
            Stop::Pending(
                "ExportNotFound".into(),
                format!(
                    "StateExport \"{}\" not found in namespace \"{}\"",
                    export_ref.name, run.namespace
                ),
            )
        })?;
    let status = export.status.clone().unwrap_or_default();
    match status.phase.as_deref() {
        Some(phases::SUCCEEDED) => {}
        Some(phases::FAILED) => {
            return Err(Stop::Fail(
                "ExportFailed".into(),
                format!(
                    "StateExport \"{}\" failed; there is no file to import",
                    export_ref.name
                ),
            ));
        }
        _ if export.spec.schedule.is_some() => {
            return Err(Stop::Fail(
                "InvalidSpec".into(),
                format!(
                    "StateExport \"{}\" is a schedule: name one of its exports \
                     (status.lastSuccessfulExport)",
                    export_ref.name
                ),
            ));
        }
        _ => {
            return Err(Stop::Pending(
                "ExportNotFinished".into(),
                format!("waiting for StateExport \"{}\" to succeed", export_ref.name),
            ));
        }
    }
    let (Some(url), Some(sha256)) = (status.url.clone(), status.sha256.clone()) else {
        return Err(Stop::Fail(
            "ExportIncomplete".into(),
            format!(
                "StateExport \"{}\" records no url or sha256",
                export_ref.name
            ),
        ));
    };
    if let Some(expected) = &import.expected_sha256
        && *expected != sha256
    {
        return Err(Stop::Fail(
            "ChecksumMismatch".into(),
            format!(
                "expectedSha256 is {expected}, but StateExport \"{}\" recorded {sha256}; nothing was changed",
                export_ref.name
            ),
        ));
    }
    let destination = crate::api::state_export::Destination {
        url: url.clone(),
        ..export.spec.destination.clone()
    };
    // The export's own identity, unless the import names one.
    let identity_ref = import.identity_secret_ref.clone().or_else(|| {
        export
            .spec
            .encryption
            .as_ref()
            .and_then(|e| e.identity_secret_ref.clone())
    });
    Ok((url, destination, Some(sha256), identity_ref))
}
