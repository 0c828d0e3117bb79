use std::time::Duration;

/// Every failure the engine reports. Messages never contain credentials: connection errors are
/// classified here from sqlx's error kinds instead of echoing connection strings.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid schema name \"{name}\": {reason}")]
    InvalidSchemaName { name: String, reason: String },

    #[error("invalid connection settings: {0}")]
    InvalidConnection(String),

    #[error("cannot reach PostgreSQL at {target}: {reason}")]
    Unreachable { target: String, reason: String },

    #[error("PostgreSQL rejected the credentials of user \"{user}\" ({how})")]
    AuthenticationFailed { user: String, how: String },

    #[error(
        "cannot reach PostgreSQL at {target}: the server's certificate is not trusted ({detail}); {hint}"
    )]
    ServerCertificateUntrusted {
        target: String,
        detail: String,
        hint: String,
    },

    #[error("database \"{database}\" does not exist")]
    DatabaseNotFound { database: String },

    #[error("timed out after {}s connecting to PostgreSQL at {target}", .after.as_secs())]
    ConnectTimeout { target: String, after: Duration },

    #[error("the {framework} state store in schema \"{schema}\" is not initialized: {hint}")]
    NotInitialized {
        schema: String,
        framework: String,
        hint: String,
    },

    #[error(
        "schema \"{schema}\" holds {found} state tables, not {expected}'s: use --framework {flag} \
         (on a StateStore: spec.framework: {flag})"
    )]
    WrongFramework {
        schema: String,
        found: String,
        expected: String,
        flag: String,
    },

    #[error(
        "no {expected} state store in schema \"{schema}\", but this database holds {found}: use \
         {names_it}{hint}"
    )]
    OtherFrameworkInDatabase {
        schema: String,
        expected: &'static str,
        /// The store found, as users read it ("SQLMesh state in schema …").
        found: String,
        /// The CLI options and StateStore fields that name the store found.
        names_it: String,
        hint: &'static str,
    },

    #[error("schema \"{schema}\" does not exist in this database{elsewhere}")]
    SchemaNotFound { schema: String, elsewhere: String },

    #[error("statekeeper does not {operation} {framework} stores: {hint}")]
    UnsupportedOperation {
        operation: String,
        framework: String,
        hint: String,
    },

    #[error("{framework} stores cannot be exported as \"{format}\" (formats: {supported})")]
    UnsupportedFormat {
        format: String,
        framework: String,
        supported: String,
    },

    #[error(
        "schema \"{schema}\" is at version {current}, newer than version {latest}, the latest this \
         statekeeper knows; upgrade statekeeper before operating on this store"
    )]
    SchemaNewer {
        schema: String,
        current: i32,
        latest: i32,
    },

    #[error(
        "migration {version} was changed after it was applied: the database records checksum \
         {recorded}, this statekeeper ships {shipped}"
    )]
    ChecksumMismatch {
        version: i32,
        recorded: String,
        shipped: String,
    },

    #[error(
        "{operation} needs schema version {required} or later, but \"{schema}\" is at version \
         {current}; run `statekeeper state upgrade` first"
    )]
    SchemaTooOld {
        schema: String,
        current: i32,
        required: i32,
        operation: String,
    },

    #[error("unknown target version {target}: this statekeeper ships versions 1 to {latest}")]
    UnknownTargetVersion { target: i32, latest: i32 },

    #[error(
        "target version {target} is older than the current version {current}; use rollback to \
         return to an earlier version"
    )]
    DowngradeRefused { target: i32, current: i32 },

    #[error("{0}")]
    InvalidOperation(String),

    #[error(
        "{} processes started by `{command}` could not be stopped (pids {}); the store was not \
         restored while they may still write to it{}",
        .pids.len(),
        .pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", "),
        .backup.as_ref().map(|id| format!(": once they are gone, restore it with `statekeeper state rollback --backup-id {id}`")).unwrap_or_default()
    )]
    CommandStillRunning {
        command: String,
        pids: Vec<i32>,
        backup: Option<String>,
    },

    #[error("reset refused: {0}")]
    ResetRefused(String),

    #[error("schema \"{schema}\" has no backups")]
    NoBackups { schema: String },

    #[error("backup \"{id}\" of schema \"{schema}\" not found")]
    BackupNotFound { schema: String, id: String },

    #[error(
        "backup \"{id}\" of schema \"{schema}\" is in use: a running operation (`state run \
         --backup`) may still restore it; try again once it has ended"
    )]
    BackupInUse { schema: String, id: String },

    #[error("backup \"{id}\" cannot be restored: {reason}")]
    IncompatibleBackup { id: String, reason: String },

    #[error("migration {version} ({description}) failed, nothing was changed: {source}")]
    MigrationFailed {
        version: i32,
        description: String,
        source: sqlx::Error,
    },

    #[error(
        "state store \"{schema}\" is busy: another operation held its lock for more than {}s",
        .waited.as_secs()
    )]
    Busy { schema: String, waited: Duration },

    #[error("{what} not found in the store: {}", .names.join(", "))]
    UnknownEnvironments {
        /// "environments", or Meltano's "state IDs".
        what: &'static str,
        names: Vec<String>,
    },

    /// A restore in part asked for names its source does not hold; nothing changed.
    #[error("{source_name} has no {what} {}; it has {available}", .names.join(", "))]
    NothingToRestore {
        /// "the file", "backup 2026…".
        source_name: String,
        /// "environment", "model", "state ID".
        what: &'static str,
        names: Vec<String>,
        /// Some of what it has, for people.
        available: String,
    },

    /// `state diff` was given two sides it cannot compare.
    #[error("cannot compare {from} with {to}: {reason}")]
    Incomparable {
        from: String,
        to: String,
        reason: String,
    },

    #[error("cannot use \"{url}\": {reason}")]
    InvalidDestination { url: String, reason: String },

    #[error("\"{url}\" is unavailable: {reason}")]
    DestinationUnavailable { url: String, reason: String },

    #[error("{0}")]
    InvalidExportRequest(String),

    #[error(
        "Meltano state ID \"{state_id}\" at {url} is locked: its lock file is younger than {}s \
         after waiting {}s; a Meltano run is writing it, try again when it is done",
        .lock_timeout.as_secs(), .waited.as_secs()
    )]
    MeltanoStateLocked {
        state_id: String,
        url: String,
        lock_timeout: Duration,
        waited: Duration,
    },

    #[error("cannot write the export: {0}")]
    ExportWrite(String),

    #[error("the export file is not importable: {0}; nothing was changed")]
    InvalidExport(String),

    /// `state verify` found the file unrestorable or not what was exported.
    #[error("the export failed verification: {0}")]
    VerificationFailed(String),

    /// A recipient or identity that is not an age key. Says where and on which line, never
    /// the text of the line (it may be a secret key given in the wrong place).
    #[error("{origin}{}: {problem}", .line.map(|n| format!(", line {n}")).unwrap_or_default())]
    InvalidEncryptionKey {
        origin: String,
        line: Option<usize>,
        problem: &'static str,
    },

    #[error(
        "the file is encrypted to {}: pass --identity FILE (on a StateMigration: \
         spec.import.identitySecretRef); nothing was changed",
        super::words::counted(*.recipients as u64, "recipients")
    )]
    IdentityRequired { recipients: usize },

    #[error(
        "no identity matches: the file is encrypted to {} and none of the {} given is one of \
         them; nothing was changed",
        super::words::counted(*.recipients as u64, "recipients"),
        super::words::counted(*.identities as u64, "identities")
    )]
    NoMatchingIdentity {
        recipients: usize,
        identities: usize,
    },

    /// An operation id a Job's report would be kept under is not one (`engine::job_report`).
    #[error("invalid operation id \"{id}\": {reason}")]
    InvalidOperationId { id: String, reason: String },

    /// The command's work was done, but its report could not be kept: the operator must not
    /// count the operation as succeeded.
    #[error(
        "the {kind} was done but its report was not recorded under operation \"{operation}\": \
         {reason}; it does not count as succeeded"
    )]
    ReportNotRecorded {
        operation: String,
        kind: String,
        reason: String,
    },

    /// The server went away or ended the session mid-operation (a restart, a failover, a
    /// network cut). The transaction either committed whole or changed nothing.
    #[error("lost the connection to PostgreSQL: {0}")]
    ConnectionLost(String),

    #[error("database error: {0}")]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        let lost = match &error {
            sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => true,
            // Class 08: connection exception; 57P0x: the server shut down or restarted.
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
            _ => false,
        };
        if lost {
            Error::ConnectionLost(error.to_string())
        } else {
            Error::Database(error)
        }
    }
}

impl Error {
    /// A stable PascalCase reason, used for Kubernetes condition reasons and CLI JSON output.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidSchemaName { .. } => "InvalidSchemaName",
            Error::InvalidConnection(_) => "InvalidConnection",
            Error::Unreachable { .. } => "DatabaseUnreachable",
            Error::ServerCertificateUntrusted { .. } => "ServerCertificateUntrusted",
            Error::AuthenticationFailed { .. } => "AuthenticationFailed",
            Error::DatabaseNotFound { .. } => "DatabaseNotFound",
            Error::ConnectTimeout { .. } => "ConnectTimeout",
            Error::NotInitialized { .. } => "NotInitialized",
            Error::WrongFramework { .. } | Error::OtherFrameworkInDatabase { .. } => {
                "WrongFramework"
            }
            Error::SchemaNotFound { .. } => "SchemaNotFound",
            Error::UnsupportedOperation { .. } => "UnsupportedOperation",
            Error::UnsupportedFormat { .. } => "UnsupportedFormat",
            Error::SchemaNewer { .. } => "SchemaNewerThanOperator",
            Error::ChecksumMismatch { .. } => "ChecksumMismatch",
            Error::SchemaTooOld { .. } => "SchemaTooOld",
            Error::UnknownTargetVersion { .. } => "UnknownTargetVersion",
            Error::DowngradeRefused { .. } => "DowngradeRefused",
            Error::InvalidOperation(_) => "InvalidOperation",
            Error::CommandStillRunning { .. } => "CommandStillRunning",
            Error::ResetRefused(_) => "ResetRefused",
            Error::NoBackups { .. } => "NoBackups",
            Error::BackupNotFound { .. } => "BackupNotFound",
            Error::BackupInUse { .. } => "BackupInUse",
            Error::IncompatibleBackup { .. } => "IncompatibleBackup",
            Error::MigrationFailed { .. } => "MigrationFailed",
            Error::Busy { .. } => "StoreBusy",
            Error::UnknownEnvironments { .. } => "UnknownEnvironments",
            Error::NothingToRestore { .. } => "NothingToRestore",
            Error::Incomparable { .. } => "Incomparable",
            Error::InvalidDestination { .. } => "InvalidDestination",
            Error::DestinationUnavailable { .. } => "DestinationUnavailable",
            Error::InvalidExportRequest(_) => "InvalidExportRequest",
            Error::MeltanoStateLocked { .. } => "StateIdLocked",
            Error::ExportWrite(_) => "ExportWriteFailed",
            Error::InvalidExport(_) => "InvalidExport",
            Error::VerificationFailed(_) => "VerificationFailed",
            Error::InvalidEncryptionKey { .. } => "InvalidEncryptionKey",
            Error::IdentityRequired { .. } => "IdentityRequired",
            Error::NoMatchingIdentity { .. } => "NoMatchingIdentity",
            Error::InvalidOperationId { .. } => "InvalidOperationId",
            Error::ReportNotRecorded { .. } => "ReportNotRecorded",
            Error::ConnectionLost(_) => "DatabaseUnreachable",
            Error::Database(sqlx::Error::PoolTimedOut) => "ConnectTimeout",
            Error::Database(_) => "DatabaseError",
        }
    }

    /// Errors about reaching or logging into the database, as opposed to the store's content.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            Error::InvalidConnection(_)
                | Error::Unreachable { .. }
                | Error::ServerCertificateUntrusted { .. }
                | Error::AuthenticationFailed { .. }
                | Error::DatabaseNotFound { .. }
                | Error::ConnectTimeout { .. }
                | Error::ConnectionLost(_)
                | Error::Database(sqlx::Error::PoolTimedOut)
        )
    }
}
